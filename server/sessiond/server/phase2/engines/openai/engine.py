"""`OpenAIEngine`: Phase 2 through an OpenAI-compatible `/v1/chat/completions` server
(OpenAI, vLLM, llama.cpp, Ollama, LM Studio, ...), using the official `openai` package.

The client's own retries are off (`max_retries=0`); tenacity runs the policy of
`retry.py` and reports each retry to the pipeline, which journals it as a RETRYING
event. One semaphore per engine bounds the calls in flight; the service builds one
engine per process, so the bound is shared by every session and worker of it.
The API key goes to the client only: it is returned as a secret for redaction and
every error text leaving the engine is passed through `sanitize` with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletionMessageParam, completion_create_params
from sessiond.server.config import LLMSettings
from sessiond.server.domain.values import CandidateMemory, Role, TokenUsage
from sessiond.server.observability import tracing
from sessiond.server.phase2.engines.base import (
    EngineError,
    ExtractionRequest,
    ExtractionResponse,
    RetryReporter,
    SummaryRequest,
    SummaryResponse,
    no_report,
)
from sessiond.server.phase2.engines.openai import prompts
from sessiond.server.phase2.engines.openai.retry import (
    BAD_OUTPUT,
    BAD_REQUEST,
    TIMEOUT,
    Backoff,
    CallFailed,
    Failure,
    classify,
)
from sessiond.server.phase2.engines.openai.schema import (
    BadOutput,
    candidates_from,
    parse_json_reply,
)
from sessiond.server.phase2.engines.openai.summary import parse_summary
from sessiond.server.phase2.sanitize import sanitize
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

log = logging.getLogger(__name__)

JSON_MODES = ("auto", "json_schema", "json_object", "none")
# Sent when no key is configured (local servers usually need none); the openai client
# refuses to start without one.
NO_KEY = "sessiond-no-api-key"
BAD_REPLY_ECHO_MAX = 8000

ResponseFormat = completion_create_params.ResponseFormat


class KeySource(Protocol):
    api_key_env: str
    api_key_file: str


def read_api_key(settings: KeySource, what: str = "LLM") -> str:
    """The key from `api_key_file` (wins; surrounding whitespace dropped) or from the
    environment variable named by `api_key_env`; "" when neither is set."""
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the {what} API key file {path}: "
                             f"{exc.strerror or type(exc).__name__}") from None
        if not key:
            raise ValueError(f"the {what} API key file {path} is empty")
        return key
    if settings.api_key_env:
        return os.environ.get(settings.api_key_env, "").strip()
    return ""


def openai_client(key: str, base_url: str, timeout: float
                  ) -> tuple[openai.AsyncOpenAI, tuple[str, ...]]:
    """An AsyncOpenAI client with its own retries off (tenacity owns the policy), and
    the secrets it carries (the key, a password in the URL) that must never be shown."""
    url = base_url.strip().rstrip("/")
    secrets = [key] if key else []
    if password := urlsplit(url).password:
        secrets.append(password)
    client = openai.AsyncOpenAI(api_key=key or NO_KEY, base_url=url, timeout=timeout,
                                max_retries=0)
    return client, tuple(secrets)


def check_settings(settings: LLMSettings) -> None:
    """ValueError with a clear message for settings the engine cannot run with."""
    if not settings.base_url.strip():
        raise ValueError("the openai engine needs the model server's base URL: set "
                         "--llm-base-url (or SESSIOND_LLM_BASE_URL), e.g. "
                         "https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    if urlsplit(settings.base_url.strip()).scheme not in ("http", "https"):
        raise ValueError("--llm-base-url must be an http:// or https:// URL")
    if not settings.model.strip():
        raise ValueError("the openai engine needs a model name: set --llm-model "
                         "(or SESSIOND_LLM_MODEL)")
    if settings.timeout_seconds <= 0:
        raise ValueError("--llm-timeout must be more than 0 seconds")
    if settings.max_concurrency < 1:
        raise ValueError("--llm-max-concurrency must be at least 1")
    if settings.max_retries < 0:
        raise ValueError("--llm-max-retries must be 0 or more")
    if settings.json_mode not in JSON_MODES:
        raise ValueError(f"json_mode must be one of {', '.join(JSON_MODES)}")


def build_llm_engine(settings: LLMSettings) -> tuple[OpenAIEngine, tuple[str, ...]]:
    """The engine for `settings` and the secrets that must never be shown."""
    check_settings(settings)
    engine = OpenAIEngine(settings)
    return engine, engine.secrets


def _usage_of(raw: Any) -> TokenUsage:
    """Token usage of a completion or of a decoded error body that carries one."""
    usage = raw.get("usage") if isinstance(raw, dict) else getattr(raw, "usage", None)
    if usage is None:
        return TokenUsage()
    get = usage.get if isinstance(usage, dict) else (lambda k: getattr(usage, k, 0))
    try:
        return TokenUsage(int(get("prompt_tokens") or 0), int(get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return TokenUsage()


class LLMCallError(EngineError):
    """A model call that failed for good; `status` is the HTTP status (0 if none)."""

    def __init__(self, message: str, *, reason: str, retryable: bool, status: int) -> None:
        super().__init__(message, reason=reason, retryable=retryable)
        self.status = status


class _Meter:
    """Token usage summed over every call of one stage, retries and repair included."""

    def __init__(self) -> None:
        self.total = TokenUsage()

    def add(self, usage: TokenUsage) -> None:
        self.total = self.total + usage


class OpenAIEngine:
    """Summaries and memory extraction by a model behind an OpenAI-compatible API."""

    name = "openai"

    def __init__(self, settings: LLMSettings, *, api_key: str | None = None,
                 backoff: Backoff | None = None) -> None:
        check_settings(settings)
        self.settings = settings
        key = read_api_key(settings) if api_key is None else api_key.strip()
        self._client, self.secrets = openai_client(key, settings.base_url,
                                                   settings.timeout_seconds)
        base_url = settings.base_url.strip().rstrip("/")
        self.model = settings.model.strip()
        self.backoff = backoff or Backoff()
        self.max_attempts = settings.max_retries + 1
        self._gate = asyncio.Semaphore(settings.max_concurrency)
        # In "auto", the response_format the server accepted last (json_schema first).
        self._json_mode = "json_schema" if settings.json_mode == "auto" else settings.json_mode
        self._summary_prompt = prompts.load_prompt(*prompts.SUMMARY_PROMPT)
        self._extraction_prompt = prompts.load_prompt(*prompts.EXTRACTION_PROMPT)
        self._repair_prompt = prompts.load_prompt(*prompts.REPAIR_PROMPT)
        self._schema = prompts.load_schema(*prompts.EXTRACTION_SCHEMA)
        self._schema_name = "{}_v{}".format(*prompts.EXTRACTION_SCHEMA)
        log.info("Phase 2 engine openai: model %s at %s, prompts %s, json_mode %s, "
                 "%d concurrent calls, %d attempts per call%s", self.model,
                 self._safe(base_url), ", ".join(self.prompt_versions), settings.json_mode,
                 settings.max_concurrency, self.max_attempts,
                 "" if key else ", no API key configured")

    @property
    def prompt_versions(self) -> tuple[str, ...]:
        return (self._summary_prompt.id, self._extraction_prompt.id, self._repair_prompt.id)

    # ------------------------------------------------------------------ summarize
    async def summarize(self, request: SummaryRequest,
                        report: RetryReporter = no_report) -> SummaryResponse:
        meter = _Meter()
        system, user = self._summary_prompt.render(
            session_id=request.session_id, archive_index=str(request.archive_index),
            message_count=str(len(request.messages)),
            previous_overview=request.previous_overview.strip(),
            messages=prompts.render_messages(request.messages, request.usage))
        conversation = _conversation(system, user)
        user_texts = [m.text() for m in request.messages if m.role is Role.USER]

        def read(text: str, strict: bool) -> tuple[str, str]:
            return parse_summary(text, session_id=request.session_id,
                                 archive_index=request.archive_index,
                                 user_texts=user_texts, strict=strict)

        text = await self._call(conversation, None, report, meter)
        try:
            overview, abstract = read(text, True)
        except BadOutput as bad:
            text = await self._repair(conversation, text, bad, None, report, meter,
                                      "Start with the ABSTRACT: line, then every required "
                                      "'## ' section in order.")
            try:
                overview, abstract = read(text, False)
            except BadOutput as again:
                raise self._bad_output("summary", again, meter) from None
        return SummaryResponse(overview=overview, abstract=abstract, usage=meter.total)

    # ------------------------------------------------------------------ extract
    async def extract(self, request: ExtractionRequest,
                      report: RetryReporter = no_report) -> ExtractionResponse:
        meter = _Meter()
        system, user = self._extraction_prompt.render(
            schema=json.dumps(self._schema), session_id=request.session_id,
            archive_uri=request.archive_uri,
            previous_overview=request.previous_overview.strip(),
            overview=request.overview.strip(),
            messages=prompts.render_messages(request.messages, request.usage))
        conversation = _conversation(system, user)
        ids = {m.id for m in request.messages}

        def read(text: str) -> tuple[CandidateMemory, ...]:
            return candidates_from(parse_json_reply(text), self._schema, ids)

        text, mode = await self._call_json(conversation, report, meter)
        try:
            candidates = read(text)
        except BadOutput as bad:
            text = await self._repair(conversation, text, bad, self._response_format(mode),
                                      report, meter, "Reply with the JSON object only, no "
                                      "prose and no code fences.")
            try:
                candidates = read(text)
            except BadOutput as again:
                raise self._bad_output("memory extraction", again, meter) from None
        return ExtractionResponse(candidates=candidates, usage=meter.total)

    async def _call_json(self, conversation: list[ChatCompletionMessageParam],
                         report: RetryReporter, meter: _Meter) -> tuple[str, str]:
        """Call with the JSON mode in use; in "auto", a 400/422 (a server that does not
        know the response_format) steps down json_schema -> json_object -> none, and
        the mode that worked is kept for later calls."""
        order = ["json_schema", "json_object", "none"]
        modes = (order[order.index(self._json_mode):]
                 if self.settings.json_mode == "auto" else [self._json_mode])
        for i, mode in enumerate(modes):
            try:
                text = await self._call(conversation, self._response_format(mode), report,
                                        meter)
            except LLMCallError as err:
                if (err.reason == BAD_REQUEST and err.status in (400, 422)
                        and i + 1 < len(modes)):
                    log.warning("the model server rejected response_format %s (%s); "
                                "trying %s", mode, err, modes[i + 1])
                    continue
                raise
            if mode != self._json_mode:
                log.warning("JSON mode auto: using response_format %s from now on", mode)
                self._json_mode = mode
            return text, mode
        raise AssertionError("unreachable")  # pragma: no cover

    def _response_format(self, mode: str) -> ResponseFormat | None:
        if mode == "json_schema":
            return {"type": "json_schema",
                    "json_schema": {"name": self._schema_name, "schema": self._schema,
                                    "strict": True}}
        if mode == "json_object":
            return {"type": "json_object"}
        return None

    async def _repair(self, conversation: list[ChatCompletionMessageParam], bad_text: str,
                      problem: BadOutput, response_format: ResponseFormat | None,
                      report: RetryReporter, meter: _Meter, expectation: str) -> str:
        """The one repair attempt: the unusable reply and what is wrong with it go back
        to the model, which is asked for the whole answer again."""
        log.warning("unusable model reply (%s); asking once for a corrected one", problem)
        _, ask = self._repair_prompt.render(problem=str(problem), expectation=expectation)
        echoed = bad_text if len(bad_text) <= BAD_REPLY_ECHO_MAX else (
            bad_text[:BAD_REPLY_ECHO_MAX] + "\n[… reply cut …]")
        follow_up: list[ChatCompletionMessageParam] = [
            *conversation,
            {"role": "assistant", "content": echoed or "(empty reply)"},
            {"role": "user", "content": ask},
        ]
        return await self._call(follow_up, response_format, report, meter)

    def _bad_output(self, what: str, problem: BadOutput, meter: _Meter) -> EngineError:
        log.warning("%s: the model's %s reply is unusable after the repair attempt (%d "
                    "tokens spent in this stage are not counted)", BAD_OUTPUT, what,
                    meter.total.total_tokens)
        return EngineError(self._safe(f"the model's {what} reply was unusable, also after "
                                      f"one repair attempt: {problem}"),
                           reason=BAD_OUTPUT, retryable=False)

    # ------------------------------------------------------------------ calls
    async def _call(self, conversation: Sequence[ChatCompletionMessageParam],
                    response_format: ResponseFormat | None, report: RetryReporter,
                    meter: _Meter) -> str:
        """The reply text of one logical call, retried by policy; EngineError when it
        fails for good."""
        max_attempts = self.max_attempts

        def wait(state: RetryCallState) -> float:
            return self.backoff.delay(state.attempt_number, _failure_of(state))

        async def before_sleep(state: RetryCallState) -> None:
            failure = _failure_of(state)
            label = failure.label if failure is not None else "error"
            pause = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning("model call failed (%s); attempt %d of %d in %.2fs", label,
                        state.attempt_number + 1, max_attempts, pause)
            await report(state.attempt_number + 1, max_attempts, label)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max_attempts), wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, CallFailed)
                                     and e.failure.retryable),
            before_sleep=before_sleep, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._call_once(conversation, response_format, meter)
        except CallFailed as exc:
            raise self._final(exc.failure, max_attempts, meter) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_once(self, conversation: Sequence[ChatCompletionMessageParam],
                         response_format: ResponseFormat | None, meter: _Meter) -> str:
        """One request to the endpoint: a span of its own (`llm chat.completions`)."""
        before = meter.total
        with tracing.span("llm chat.completions", {"gen_ai.system": "openai",
                                                   "gen_ai.request.model": self.model}):
            text = await self._request(conversation, response_format, meter)
            tracing.set_attributes({
                "gen_ai.usage.input_tokens":
                    meter.total.prompt_tokens - before.prompt_tokens,
                "gen_ai.usage.output_tokens":
                    meter.total.completion_tokens - before.completion_tokens})
            return text

    async def _request(self, conversation: Sequence[ChatCompletionMessageParam],
                       response_format: ResponseFormat | None, meter: _Meter) -> str:
        started = time.monotonic()
        async with self._gate:
            try:
                async with asyncio.timeout(self.settings.timeout_seconds):
                    completion = await self._client.chat.completions.create(
                        model=self.model, messages=list(conversation),
                        temperature=self.settings.temperature,
                        response_format=(response_format if response_format is not None
                                         else openai.omit))
            except TimeoutError:
                raise CallFailed(Failure(TIMEOUT, "timeout", True)) from None
            except openai.APIStatusError as exc:
                meter.add(_usage_of(exc.body))
                raise CallFailed(classify(exc)) from None
            except openai.OpenAIError as exc:
                raise CallFailed(classify(exc)) from None
        usage = _usage_of(completion)
        meter.add(usage)
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise CallFailed(Failure(BAD_OUTPUT, "invalid reply", False, 200, None,
                                     "no choices in the reply; is the base URL right?"))
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if not isinstance(text, str):
            refusal = getattr(message, "refusal", None)
            text = f"(no content; refusal: {refusal})" if refusal else ""
        log.debug("model call done in %.2fs: %d prompt + %d completion tokens, finish %s",
                  time.monotonic() - started, usage.prompt_tokens, usage.completion_tokens,
                  getattr(choices[0], "finish_reason", None))
        return text

    def _final(self, failure: Failure, max_attempts: int, meter: _Meter) -> LLMCallError:
        message = failure.message()
        if failure.retryable and max_attempts > 1:
            message += f" (gave up after {max_attempts} attempts)"
        safe = self._safe(message)
        log.warning("model call failed for good, %s: %s (%d tokens spent in this stage "
                    "are not counted)", failure.reason, safe, meter.total.total_tokens)
        return LLMCallError(safe, reason=failure.reason, retryable=failure.retryable,
                            status=failure.status)

    def _safe(self, text: str) -> str:
        return sanitize(text, self.secrets)

    async def aclose(self) -> None:
        await self._client.close()


def _failure_of(state: RetryCallState) -> Failure | None:
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc.failure if isinstance(exc, CallFailed) else None


def _conversation(system: str, user: str) -> list[ChatCompletionMessageParam]:
    out: list[ChatCompletionMessageParam] = []
    if system:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": user})
    return out
