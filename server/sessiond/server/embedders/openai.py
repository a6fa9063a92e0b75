"""`openai` embedder: any OpenAI-compatible `/v1/embeddings` endpoint, with the
same retry policy (tenacity; 408/429/5xx/timeouts retried with backoff or the
server's Retry-After) and key handling (file or environment, never logged) as the
OpenAI-compatible Phase 2 engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

import openai
from sessiond.server.config import EmbedderSettings
from sessiond.server.embedders.base import EmbedderError, clip_texts, normalized
from sessiond.server.observability import metrics
from sessiond.server.phase2.engines.openai.engine import openai_client, read_api_key
from sessiond.server.phase2.engines.openai.retry import (
    BAD_OUTPUT,
    TIMEOUT,
    Backoff,
    CallFailed,
    Failure,
    classify,
)
from sessiond.server.phase2.sanitize import sanitize
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

log = logging.getLogger(__name__)


def reason_of(failure: Failure) -> str:
    """LLM_TIMEOUT -> EMBEDDER_TIMEOUT, and so on for every reason."""
    return "EMBEDDER_" + failure.reason.removeprefix("LLM_")


def check_settings(settings: EmbedderSettings) -> None:
    if urlsplit(settings.base_url.strip()).scheme not in ("http", "https"):
        raise ValueError("the openai embedder needs --embedder-base-url, an http:// or "
                         "https:// URL (e.g. https://api.openai.com/v1)")
    if not settings.model.strip():
        raise ValueError("the openai embedder needs --embedder-model (e.g. "
                         "text-embedding-3-small)")
    if settings.timeout_seconds <= 0 or settings.max_retries < 0 or settings.batch_size < 1:
        raise ValueError("--embedder-timeout must be > 0, --embedder-max-retries >= 0 "
                         "and --embedder-batch-size >= 1")
    if settings.dimensions < 0:
        raise ValueError("--embedder-dimensions must be 0 (the model's own) or more")


class OpenAIEmbedder:
    def __init__(self, settings: EmbedderSettings, *, api_key: str | None = None,
                 backoff: Backoff | None = None) -> None:
        check_settings(settings)
        self.settings = settings
        key = read_api_key(settings, "embedder") if api_key is None else api_key.strip()
        self._client, self.secrets = openai_client(key, settings.base_url,
                                                   settings.timeout_seconds)
        self._model = settings.model.strip()
        self.backoff = backoff or Backoff()
        self.max_attempts = settings.max_retries + 1
        log.info("embedder openai: model %s at %s", self._model,
                 sanitize(settings.base_url.strip(), self.secrets))

    @property
    def model(self) -> str:
        dims = f"@{self.settings.dimensions}" if self.settings.dimensions else ""
        return f"openai:{self._model}{dims}"

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        batch = self.settings.batch_size
        for start in range(0, len(texts), batch):
            out += await self._call(clip_texts(texts[start:start + batch]))
        return out

    async def _call(self, texts: list[str]) -> list[list[float]]:
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None
            return self.backoff.delay(state.attempt_number,
                                      exc.failure if isinstance(exc, CallFailed) else None)

        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            label = exc.failure.label if isinstance(exc, CallFailed) else "error"
            metrics.record_embedding_retry(
                "openai", reason_of(exc.failure) if isinstance(exc, CallFailed) else "error")
            log.warning("embedding call failed (%s); attempt %d of %d", label,
                        state.attempt_number + 1, self.max_attempts)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts), wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, CallFailed)
                                     and e.failure.retryable),
            before_sleep=before_sleep, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._call_once(texts)
        except CallFailed as exc:
            raise self._final(exc.failure) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_once(self, texts: list[str]) -> list[list[float]]:
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                reply = await self._client.embeddings.create(
                    model=self._model, input=texts, encoding_format="float",
                    dimensions=self.settings.dimensions or openai.omit)
        except TimeoutError:
            raise CallFailed(Failure(TIMEOUT, "timeout", True)) from None
        except openai.OpenAIError as exc:
            raise CallFailed(classify(exc)) from None
        usage = getattr(reply, "usage", None)
        tokens = getattr(usage, "total_tokens", None) or getattr(usage, "prompt_tokens", None)
        if isinstance(tokens, int):
            metrics.record_embedding_tokens("openai", tokens)
        data = getattr(reply, "data", None)
        if not isinstance(data, list) or len(data) != len(texts):
            raise CallFailed(Failure(BAD_OUTPUT, "invalid reply", False, 200, None,
                                     f"expected {len(texts)} embeddings"))
        vectors: dict[int, list[float]] = {}
        for i, item in enumerate(data):
            vec = getattr(item, "embedding", None)
            if not isinstance(vec, list) or not vec:
                raise CallFailed(Failure(BAD_OUTPUT, "invalid reply", False, 200, None,
                                         "an embedding is not a list of numbers"))
            index = getattr(item, "index", i)
            vectors[index if isinstance(index, int) else i] = [float(x) for x in vec]
        if sorted(vectors) != list(range(len(texts))):
            raise CallFailed(Failure(BAD_OUTPUT, "invalid reply", False, 200, None,
                                     "the embeddings' indexes do not match the inputs"))
        dims = {len(v) for v in vectors.values()}
        if len(dims) != 1:
            raise CallFailed(Failure(BAD_OUTPUT, "invalid reply", False, 200, None,
                                     "embeddings of different lengths"))
        return [normalized(vectors[i]) for i in range(len(texts))]

    def _final(self, failure: Failure) -> EmbedderError:
        what = failure.message().replace("a chat completion", "an embeddings reply")
        if failure.retryable and self.max_attempts > 1:
            what += f" (gave up after {self.max_attempts} attempts)"
        safe = sanitize(what, self.secrets)
        log.warning("embedding call failed for good: %s", safe)
        return EmbedderError(f"embedder: {safe}",
                             reason=reason_of(failure),
                             retryable=failure.retryable)

    async def aclose(self) -> None:
        await self._client.close()
