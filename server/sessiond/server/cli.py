"""The `sessiond` command: serve, migrate, keys, reindex, import-openviking, and the
client commands (cli_client.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from sessiond.server.cli_auth import (
    add_keys_command,
    add_security_flags,
    apply_security_flags,
    keys_main,
)
from sessiond.server.cli_client import DefaultsFormatter, add_client_commands, run_client
from sessiond.server.cli_import import add_import_command, import_main
from sessiond.server.cli_recall import (
    add_embedder_flags,
    add_reindex_command,
    apply_embedder_flags,
    reindex_main,
)
from sessiond.server.config import Settings
from sessiond.server.domain.autocommit import AutoCommitPolicy
from sessiond.server.domain.errors import InvalidArgument, SessiondError
from sessiond.server.domain.limits import Limits
from sessiond.server.observability import logs
from sessiond.server.observability.settings import (
    add_observability_flags,
    apply_observability_flags,
)
from sessiond.server.redact import install_log_redaction, redact_text, redact_url
from sessiond.server.supervisor import serve_processes
from sessiond.server.version import version


def _parser() -> argparse.ArgumentParser:
    env = Settings.from_env()
    p = argparse.ArgumentParser(prog="sessiond", description="Session and memory service")
    p.add_argument("--version", action="version", version=f"sessiond {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server",
                           formatter_class=DefaultsFormatter)
    serve.add_argument("--address", default=env.address, help="host:port to listen on")
    serve.add_argument("--data-dir", type=Path, default=env.data_dir,
                       help="directory of the embedded SQLite store")
    serve.add_argument("--store", default=env.store,
                       help="'sqlite' (embedded, default) or a postgresql:// URL")
    serve.add_argument("--engine", default=env.engine, choices=["offline", "openai"],
                       help="Phase 2 engine")
    serve.add_argument("--llm-base-url", default=env.llm.base_url)
    serve.add_argument("--llm-model", default=env.llm.model)
    serve.add_argument("--llm-api-key-env", default=env.llm.api_key_env,
                       help="environment variable holding the API key")
    serve.add_argument("--llm-api-key-file", default=env.llm.api_key_file,
                       help="file holding the API key (wins over the env variable)")
    serve.add_argument("--llm-timeout", type=float, default=env.llm.timeout_seconds)
    serve.add_argument("--llm-temperature", type=float, default=env.llm.temperature)
    serve.add_argument("--llm-max-concurrency", type=int, default=env.llm.max_concurrency)
    serve.add_argument("--llm-max-retries", type=int, default=env.llm.max_retries)
    serve.add_argument("--llm-json-mode", default=env.llm.json_mode,
                       choices=["auto", "json_schema", "json_object", "none"],
                       help="structured-output mode of the endpoint for extraction")
    serve.add_argument("--processes", type=int, default=env.processes,
                       help="server processes on one port (SO_REUSEPORT), each with its "
                            "own Phase 2 workers; PostgreSQL only (docs/deployment.md)")
    serve.add_argument("--workers", type=int, default=env.worker_concurrency,
                       help="Phase 2 tasks run at once by this process")
    serve.add_argument("--workers-per-identity", type=int, default=env.worker_per_identity,
                       help="Phase 2 tasks one identity may run at once (0: no cap)")
    serve.add_argument("--phase2-cpu-slots", type=int, default=env.phase2_cpu_slots,
                       help="Phase 2 CPU-bound work units run at once, granted fairly by "
                            "identity (0: no gate; docs/architecture.md)")
    serve.add_argument("--phase2-sync", default=env.phase2_sync, choices=["relaxed", "durable"],
                       help="relaxed: Phase 2 writes are acknowledged before the disk flush "
                       "(a power loss may undo the last ~0.2 s of them, which are redone); "
                       "calls' writes are always durable")
    serve.add_argument("--lease-seconds", type=float, default=env.lease_seconds)
    serve.add_argument("--poll-seconds", type=float, default=env.poll_seconds)
    serve.add_argument("--heartbeat-seconds", type=float, default=env.heartbeat_seconds)
    serve.add_argument("--shutdown-grace", type=float, default=env.shutdown_grace_seconds)
    serve.add_argument("--completed-retention-hours", type=float,
                       default=env.completed_retention_hours)
    serve.add_argument("--failed-retention-hours", type=float,
                       default=env.failed_retention_hours)
    serve.add_argument("--request-id-retention-hours", type=float,
                       default=env.request_id_retention_hours,
                       help="how long an idempotency key (request_id) is remembered")
    serve.add_argument("--max-stored-tasks", type=int, default=env.max_stored_tasks)
    serve.add_argument("--sqlite-synchronous", default=env.sqlite_synchronous,
                       choices=["FULL", "NORMAL"])
    serve.add_argument("--pg-pool-max", type=int, default=env.pg_pool_max)
    serve.add_argument("--pg-channel", default=env.pg_channel,
                       help="LISTEN/NOTIFY channel shared by the replicas of one deployment")
    for name in ("read", "write", "commit"):
        serve.add_argument(f"--rate-limit-{name}", type=float,
                           default=getattr(env.rate_limits, name),
                           help=f"{name} calls per second per caller (0: unlimited)")
        serve.add_argument(f"--rate-limit-{name}-burst", type=int,
                           default=getattr(env.rate_limits, f"{name}_burst"),
                           help=f"burst of {name} calls (0: one second's worth)")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    for f in fields(Limits):
        serve.add_argument(f"--limit-{f.name.replace('_', '-')}", type=int,
                           default=getattr(env.limits, f.name), metavar="N",
                           help=f"limit {f.name} (docs/api.md)")
    serve.add_argument("--auto-retry-failed", action=argparse.BooleanOptionalAction,
                       default=env.auto_retry_failed,
                       help="retry FAILED Phase 2 tasks whose error is UNAVAILABLE or "
                            "DEADLINE_EXCEEDED automatically, with exponential backoff")
    serve.add_argument("--auto-retry-max", type=int, default=env.auto_retry_max,
                       help="automatic retries per task at most")
    serve.add_argument("--auto-retry-backoff", type=float,
                       default=env.auto_retry_backoff_seconds,
                       help="seconds before the first automatic retry; doubles each time")
    serve.add_argument("--auto-retry-backoff-max", type=float,
                       default=env.auto_retry_backoff_max_seconds,
                       help="longest wait between automatic retries, seconds")
    for name, attr, what in (
            ("messages", "max_messages", "live messages"),
            ("tokens", "max_tokens", "estimated tokens (message bytes / 4) of the live buffer"),
            ("idle", "idle_seconds", "seconds without a new message"),
            ("keep-recent", "keep_recent_count", "")):
        serve.add_argument(f"--auto-commit-{name}", type=int,
                           default=getattr(env.auto_commit, attr),
                           help=(f"server default auto-commit: commit at this many {what} "
                                 "(0: off; a session's UpdateSessionConfig overrides)"
                                 if what else "server default auto-commit: the newest this "
                                 "many messages stay live"))
    add_security_flags(serve, env)
    add_embedder_flags(serve, env)
    add_observability_flags(serve, env.observe)
    mig = sub.add_parser("migrate", help="apply schema migrations to a PostgreSQL store")
    mig.add_argument("--store", default=env.store, help="postgresql:// URL")
    add_keys_command(sub, env)
    add_reindex_command(sub, env)
    add_import_command(sub, env)
    add_client_commands(sub)
    return p


def settings_from_args(ns: argparse.Namespace) -> Settings:
    s = Settings.from_env()
    s.address, s.data_dir, s.store, s.engine = ns.address, ns.data_dir, ns.store, ns.engine
    s.llm.base_url, s.llm.model = ns.llm_base_url, ns.llm_model
    s.llm.api_key_env, s.llm.api_key_file = ns.llm_api_key_env, ns.llm_api_key_file
    s.llm.timeout_seconds, s.llm.temperature = ns.llm_timeout, ns.llm_temperature
    s.llm.max_concurrency, s.llm.max_retries = ns.llm_max_concurrency, ns.llm_max_retries
    s.llm.json_mode = ns.llm_json_mode
    s.worker_concurrency, s.lease_seconds = ns.workers, ns.lease_seconds
    s.processes = ns.processes
    s.worker_per_identity, s.phase2_sync = ns.workers_per_identity, ns.phase2_sync
    s.phase2_cpu_slots = ns.phase2_cpu_slots
    s.poll_seconds, s.heartbeat_seconds = ns.poll_seconds, ns.heartbeat_seconds
    s.shutdown_grace_seconds = ns.shutdown_grace
    s.completed_retention_hours = ns.completed_retention_hours
    s.failed_retention_hours = ns.failed_retention_hours
    s.request_id_retention_hours = ns.request_id_retention_hours
    s.max_stored_tasks, s.sqlite_synchronous = ns.max_stored_tasks, ns.sqlite_synchronous
    s.pg_pool_max, s.pg_channel = ns.pg_pool_max, ns.pg_channel
    s.limits = replace(s.limits, **{f.name: getattr(ns, f"limit_{f.name}")
                                    for f in fields(Limits)})
    s.limits.validate()
    for name in ("read", "write", "commit"):
        setattr(s.rate_limits, name, getattr(ns, f"rate_limit_{name}"))
        setattr(s.rate_limits, f"{name}_burst", getattr(ns, f"rate_limit_{name}_burst"))
    s.auto_retry_failed, s.auto_retry_max = ns.auto_retry_failed, ns.auto_retry_max
    s.auto_retry_backoff_seconds = ns.auto_retry_backoff
    s.auto_retry_backoff_max_seconds = ns.auto_retry_backoff_max
    s.auto_commit = AutoCommitPolicy(ns.auto_commit_messages, ns.auto_commit_tokens,
                                     ns.auto_commit_idle, ns.auto_commit_keep_recent)
    try:
        s.auto_commit.validate(prefix="")
    except InvalidArgument as exc:
        flags = {".max_messages": "--auto-commit-messages", ".max_tokens": "--auto-commit-tokens",
                 ".idle_seconds": "--auto-commit-idle",
                 ".keep_recent_count": "--auto-commit-keep-recent"}
        raise ValueError("; ".join(f"{flags[v.field]} {v.description}"
                                   for v in exc.violations)) from None
    apply_security_flags(ns, s)
    apply_embedder_flags(ns, s)
    apply_observability_flags(ns, s.observe)
    s.observe.validate()
    return s


ReadyHook = Callable[[int, int, str], None]


async def _serve(settings: Settings, ready: ReadyHook | None = None,
                 parent_pid: int = 0) -> None:
    """Run one server process until SIGTERM/SIGINT. `ready(port, metrics_port,
    describe)` replaces the "serving on" lines in a child of `--processes N`, which
    stops on SIGTERM only, or when its parent `parent_pid` is gone."""
    from sessiond.server.app import App

    app = App(settings)
    port = await app.start()
    host = settings.address.rsplit(":", 1)[0]
    describe = (f"store={redact_url(settings.store)}, engine={settings.engine}; "
                f"{app.security.describe()}")
    if ready is not None:
        ready(port, app.metrics_port, describe)
    else:
        print(f"sessiond serving on {host}:{port} ({describe})", flush=True)
        if app.metrics_port:
            mhost = settings.observe.metrics_address.rsplit(":", 1)[0]
            print(f"sessiond metrics on {mhost}:{app.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM,) if ready is not None else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    orphan = (asyncio.create_task(_wait_orphaned(parent_pid, stop), name="parent-watch")
              if parent_pid else None)
    await stop.wait()
    if orphan is not None:
        orphan.cancel()
    if ready is None:
        print("sessiond: shutting down", flush=True)
    await app.stop()


async def _wait_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            break
    logging.getLogger(__name__).warning("parent process %d is gone; shutting down",
                                        parent_pid)
    stop.set()


def serve_main(settings: Settings, log_level: str, log_format: str,
               ready: ReadyHook | None = None, parent_pid: int = 0) -> int:
    """Serve in this process; the exit code (2: bad settings or address, 1: store)."""
    if ready is not None:  # a spawned child of `--processes N`: a fresh interpreter
        logs.configure(log_level, log_format)
        install_log_redaction()
    try:
        asyncio.run(_serve(settings, ready, parent_pid))
    except (OSError, ValueError) as exc:
        print(f"sessiond: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except SessiondError as exc:
        print(f"sessiond: {redact_text(exc.message)} ({exc.reason})", file=sys.stderr)
        return 1
    return 0


async def _migrate(url: str) -> None:
    from sessiond.server.store.postgres.migrations import migrate_url

    before, after = await migrate_url(url)
    print(f"schema version {before} -> {after}")


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if getattr(ns, "client_fn", None) is not None:
        return run_client(ns)
    if ns.command == "serve":
        logs.configure(ns.log_level, ns.log_format)
        install_log_redaction()
        try:
            settings = settings_from_args(ns)
            if settings.processes != 1:
                return serve_processes(settings, ns.log_level, ns.log_format)
        except (OSError, ValueError) as exc:
            print(f"sessiond: {redact_text(str(exc))}", file=sys.stderr)
            return 2
        return serve_main(settings, ns.log_level, ns.log_format)
    if getattr(ns, "output", None) == "json":  # the admin commands: like --json
        ns.json = True
    if ns.command == "keys":
        return keys_main(ns)
    if ns.command == "reindex":
        return reindex_main(ns)
    if ns.command == "import-openviking":
        return import_main(ns)
    if ns.command == "migrate":
        if not ns.store.startswith(("postgresql://", "postgres://")):
            print("sessiond migrate: SQLite migrates itself at start; give --store "
                  "postgresql://...", file=sys.stderr)
            return 2
        try:
            asyncio.run(_migrate(ns.store))
        except SessiondError as exc:
            print(f"sessiond migrate: {redact_text(exc.message)} ({exc.reason})",
                  file=sys.stderr)
            return 1
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
