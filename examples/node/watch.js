// A Node.js @grpc/grpc-js client that loads protos/ directly (all three services,
// including task.proto, which imports the vendored google/rpc/status.proto): add
// messages, commit, watch Phase 2 live, then recall.
//
//   npm install            (in this directory, or point NODE_PATH at a node_modules)
//   SESSIOND_TARGET=127.0.0.1:50051 node watch.js [session-id]
//
// Plaintext, for a server on this machine without --auth (client.js shows TLS and an
// API key). Prints one JSON line per step; exits 1 with "CODE message" on an error.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = process.env.SESSIOND_PROTOS || path.join(__dirname, "..", "..", "protos");
const target = process.env.SESSIOND_TARGET || "127.0.0.1:50051";
const sessionId = process.argv[2] || "node-watch-demo";

const def = protoLoader.loadSync(
  ["sessiond/v1/session.proto", "sessiond/v1/task.proto", "sessiond/v1/memory.proto"],
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(def).sessiond.v1;
const creds = grpc.credentials.createInsecure();
const sessions = new v1.SessionService(target, creds);
const tasks = new v1.TaskService(target, creds);
const memories = new v1.MemoryService(target, creds);

const call = (stub, method, request) => new Promise((resolve, reject) => {
  stub[method](request, { deadline: Date.now() + 10000 }, (err, reply) =>
    (err ? reject(err) : resolve(reply)));
});
const out = (obj) => console.log(JSON.stringify(obj));

function watch(taskId) {
  return new Promise((resolve, reject) => {
    const stream = tasks.WatchTask({ task_id: taskId, after_seq: 0 },
      { deadline: Date.now() + 60000 });
    let last = null;
    stream.on("data", (item) => {
      if (item.event) {
        last = item.event.kind;
        out({ step: "WatchTask", seq: item.event.seq, kind: item.event.kind,
              stage: item.event.stage });
      }
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(last));
  });
}

async function main() {
  await call(sessions, "GetSession", { session_id: sessionId, auto_create: true });
  for (const [role, text] of [
    ["ROLE_USER", "Hi, my name is Linus. I prefer short answers."],
    ["ROLE_ASSISTANT", "Noted. What is the problem?"],
    ["ROLE_USER", "The deploy of project Comet fails with a timeout error."],
    ["ROLE_ASSISTANT", "Raise the health-check timeout to 30 s and redeploy."],
  ]) {
    await call(sessions, "AddMessage", { session_id: sessionId, role, parts: [{ text: { text } }] });
  }
  const reply = await call(sessions, "Commit", { session_id: sessionId });
  out({ step: "Commit", task_id: reply.task_id, archive_uri: reply.archive_uri });
  const final = await watch(reply.task_id);
  const task = await call(tasks, "GetTask", { task_id: reply.task_id });
  out({ step: "GetTask", state: task.state, final });
  const answer = await call(memories, "Recall", {
    query: "why did the Comet deploy fail?", session_id: sessionId, max_chars: 2000 });
  out({ step: "Recall", kinds: answer.items.map((i) => i.kind),
        texts: answer.items.map((i) => i.text) });
  sessions.close(); tasks.close(); memories.close();
}

main().catch((err) => {
  console.error(`${err.code !== undefined ? grpc.status[err.code] : "ERROR"} ${err.message}`);
  process.exit(1);
});
