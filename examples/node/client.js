// A Node.js client of sessiond over TLS, authenticated with an API key.
//
//   npm install            (in this directory, or point NODE_PATH at a node_modules)
//   SESSIOND_TARGET=host:port SESSIOND_CA_FILE=ca.pem SESSIOND_API_KEY=sessiond_... \
//     node client.js [session-id]
//
// The key travels as `authorization: Bearer <key>` through call credentials, which
// grpc-js only sends over a secure channel. Prints one JSON line per step.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = process.env.SESSIOND_PROTOS || path.join(__dirname, "..", "..", "protos");
const target = process.env.SESSIOND_TARGET || "localhost:50051";
const apiKey = process.env.SESSIOND_API_KEY || "";
const ca = process.env.SESSIOND_CA_FILE ? fs.readFileSync(process.env.SESSIOND_CA_FILE) : null;
const sessionId = process.argv[2] || "node-demo";

const def = protoLoader.loadSync("sessiond/v1/session.proto", {
  includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true,
});
const { SessionService } = grpc.loadPackageDefinition(def).sessiond.v1;

const tls = grpc.credentials.createSsl(ca);
const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${apiKey}`);
  callback(null, md);
});
const client = new SessionService(target, grpc.credentials.combineChannelCredentials(tls, bearer));
const anonymous = new SessionService(target, tls);

const call = (stub, method, request) => new Promise((resolve, reject) => {
  stub[method](request, { deadline: Date.now() + 10000 }, (err, reply) =>
    (err ? reject(err) : resolve(reply)));
});
const out = (obj) => console.log(JSON.stringify(obj));

async function main() {
  const session = await call(client, "GetSession", { session_id: sessionId, auto_create: true });
  out({ step: "GetSession", session_id: session.session_id });
  const added = await call(client, "AddMessage", {
    session_id: sessionId, role: "ROLE_USER",
    parts: [{ text: { text: "Hello from Node.js. I prefer short answers." } }],
  });
  out({ step: "AddMessage", message_id: added.message.id, seq: added.message.seq });
  const reply = await call(client, "Commit", { session_id: sessionId });
  out({ step: "Commit", task_id: reply.task_id, archive_uri: reply.archive_uri });
  try {
    await call(anonymous, "GetSession", { session_id: sessionId });
    out({ step: "WithoutKey", code: "OK" });
  } catch (err) {
    out({ step: "WithoutKey", code: grpc.status[err.code] });
  }
  client.close();
  anonymous.close();
}

main().catch((err) => {
  console.error(`sessiond node client: ${err.code !== undefined ? grpc.status[err.code] : ""} ${err.message}`);
  process.exit(1);
});
