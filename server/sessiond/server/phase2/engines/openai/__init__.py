"""The LLM Phase 2 engine: an OpenAI-compatible chat-completions server summarizes
archives and extracts memories. See docs/phase2.md.

Modules: `engine` (OpenAIEngine, build_llm_engine), `retry` (which failures are
retried and how long to wait), `prompts` (versioned templates in
`sessiond.server.phase2.engines.prompts`), `summary` and `schema` (reading the replies).
"""

from sessiond.server.phase2.engines.openai.engine import (
    JSON_MODES,
    OpenAIEngine,
    build_llm_engine,
    read_api_key,
)
from sessiond.server.phase2.engines.openai.retry import Backoff

__all__ = ["JSON_MODES", "Backoff", "OpenAIEngine", "build_llm_engine", "read_api_key"]
