"""The async LLM client every stage calls: bounded, retrying, falling back, cached, accounted.

`LLMClient.chat` sends one chat completion through the official `openai` SDK (its own retries
off) and never raises for provider or network trouble: it returns a `ChatResult` that is either
ok or a recorded failure with the reason. Around each call:

- concurrency is bounded by an `asyncio.Semaphore` (client-wide), and per endpoint by
  `Endpoint.max_concurrency` when that was set explicitly;
- 429, 5xx, timeouts, connection errors and malformed bodies are retried with exponential backoff
  and full jitter, waiting at least the server's `Retry-After` when it sends one;
- after the retries on one endpoint are spent (or on a non-retryable error such as 400/401/404)
  the next endpoint of the fallback chain is tried;
- a `finish_reason` of "length" is a truncated reply: ok=False unless `allow_truncated=True`;
- successful replies go to the response cache and a rerun of the same request is answered from
  it without a network call; token usage is summed per endpoint (`usage_summary()`).

`structured()` layers JSON extraction + pydantic validation + one corrective follow-up on top.
Each logical request carries one `X-Request-Id` (and `X-Attempt`) across its attempts, so a
server log can match every attempt to its logical request; `ChatResult.attempt_errors` lists why
each earlier attempt failed. `run_sync` drives a coroutine from synchronous code (Airflow tasks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import importlib.util
import json
import logging
import random
import time
import uuid
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from tasks.core.llm.cache import ResponseCache, cache_key
from tasks.core.llm.structured import StructuredOutputError, parse_structured
from tasks.core.llm.usage import UsageTracker, add_usage, empty_usage, normalise_usage
from tasks.core.settings import Endpoint, LlmRole, Settings, get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_RETRY_AFTER_S = 120.0
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class LLMConfigError(ValueError):
    """The client was built with impossible settings; the message says what to pass instead."""


@dataclass(frozen=True, slots=True)
class ChatResult:
    """One logical chat request's outcome. `usage` sums every attempt that returned a body."""

    ok: bool
    text: str | None
    finish_reason: str | None
    usage: dict[str, int]
    endpoint: str
    model: str
    attempts: int
    cached: bool
    latency_s: float
    error: str | None
    request_id: str = ""
    # One "<endpoint label>: <reason>" per attempt that failed before the outcome (retried or
    # handed to the next endpoint); empty when the first attempt settled it.
    attempt_errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



@dataclass(frozen=True, slots=True)
class StructuredResult:
    """A validated pydantic value, or a recorded failure carrying the raw reply and the reason."""

    ok: bool
    value: BaseModel | None
    raw: str | None
    error: str | None
    attempts: int
    usage: dict[str, int]
    endpoint: str = ""
    model: str = ""
    cached: bool = False
    chat_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "value"}
        out["value"] = self.value.model_dump(mode="json") if self.value is not None else None
        return out


@dataclass(slots=True)
class _Attempt:
    """What one HTTP attempt produced; `retryable` decides between retry and moving on."""

    ok: bool
    text: str | None = None
    finish_reason: str | None = None
    model: str = ""
    usage: dict[str, int] = field(default_factory=empty_usage)
    error: str | None = None
    retryable: bool = False
    retry_after_s: float | None = None


class _LoopState:
    """asyncio primitives and HTTP clients are bound to one event loop; one of these per loop."""

    __slots__ = ("semaphore", "endpoint_semaphores", "sdk_clients")

    def __init__(self, max_concurrency: int, endpoints: Sequence[Endpoint]) -> None:
        self.semaphore = asyncio.Semaphore(max_concurrency)
        # An endpoint's own limit applies only when set explicitly; otherwise the client-wide one.
        self.endpoint_semaphores = [
            asyncio.Semaphore(ep.max_concurrency) if "max_concurrency" in ep.model_fields_set
            else None
            for ep in endpoints
        ]
        self.sdk_clients: list[Any] = [None] * len(endpoints)


# Every SDK client opened on a loop, held strongly so run_sync can close them all at the end
# even when the LLMClient that opened them was a temporary already garbage-collected.
_OPENED_ON_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Any]] = (
    weakref.WeakKeyDictionary())


class LLMClient:
    """Chat completions against `endpoints[0]`, falling back along `endpoints[1:]`."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        max_concurrency: int = 16,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        timeout_s: float | None = None,
        cache: ResponseCache | None = None,
        http_backend: Literal["auto", "aiohttp", "httpx"] = "auto",
    ) -> None:
        if not endpoints:
            raise LLMConfigError(
                "LLMClient needs at least one endpoint; e.g. "
                "[Endpoint(base_url='http://127.0.0.1:8300/v1', model='smollm2-135m-instruct')]"
            )
        if max_concurrency < 1:
            raise LLMConfigError(f"max_concurrency must be >= 1, got {max_concurrency}; e.g. 16")
        if max_retries < 0:
            raise LLMConfigError(f"max_retries must be >= 0, got {max_retries}; e.g. 5")
        if backoff_base_s < 0 or backoff_max_s < backoff_base_s:
            raise LLMConfigError(
                f"need 0 <= backoff_base_s <= backoff_max_s, got {backoff_base_s} and "
                f"{backoff_max_s}; e.g. backoff_base_s=0.5, backoff_max_s=20"
            )
        if timeout_s is not None and timeout_s <= 0:
            raise LLMConfigError(f"timeout_s must be > 0 or None, got {timeout_s}; e.g. 120")
        self.endpoints = list(endpoints)
        self.labels = [ep.label() for ep in self.endpoints]
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        if http_backend not in ("auto", "aiohttp", "httpx"):
            raise LLMConfigError(
                f"http_backend must be 'auto', 'aiohttp' or 'httpx', got {http_backend!r}")
        if http_backend == "auto":
            http_backend = "aiohttp" if importlib.util.find_spec("aiohttp") else "httpx"
        self.http_backend = http_backend
        self.cache = cache
        self.usage = UsageTracker()
        self._rng = random.Random()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary())

    # ---- public API ---------------------------------------------------------------------
    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        temperature: float | None = 0.7,
        max_tokens: int | None = 512,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        allow_truncated: bool = False,
        request_id: str | None = None,
        use_cache: bool = True,
        **extra: Any,
    ) -> ChatResult:
        """One chat completion; never raises for provider/network failures (see ChatResult)."""
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens,
                                  "top_p": top_p, "seed": seed, "stop": stop, **extra}
        params = {k: v for k, v in params.items() if v is not None}
        state = self._state()

        keys: list[str] = []
        if self.cache is not None and use_cache:
            keys = [cache_key(ep.base_url, ep.model, messages, params) for ep in self.endpoints]
            hits = await self.cache.get_many(keys)
            for index, key in enumerate(keys):
                if key in hits:
                    return self._from_cache(hits[key], index, request_id, started)

        async with state.semaphore:
            result, cache_entry = await self._chat_uncached(
                state, messages, params, keys, allow_truncated, request_id, started)
        if cache_entry is not None and self.cache is not None:
            # Written after the slot is released: a slow database must not throttle the calls.
            await self.cache.put(cache_entry[0], endpoint=result.endpoint,
                                 model=cache_entry[1], response=cache_entry[2])
        return result

    async def chat_many(self, requests: Sequence[list[dict[str, Any]]],
                        **params: Any) -> list[ChatResult]:
        """`chat` for many message lists concurrently (bounded by max_concurrency), in order."""
        return list(await asyncio.gather(*(self.chat(m, **params) for m in requests)))

    async def structured(
        self,
        messages: list[dict[str, Any]],
        schema: type[BaseModel],
        *,
        corrective_retries: int = 1,
        **params: Any,
    ) -> StructuredResult:
        """Chat, extract + validate JSON against `schema`; on failure quote the error back to the
        model up to `corrective_retries` times; then a recorded failure with the raw reply."""
        params.setdefault("temperature", 0.0)
        conversation = list(messages)
        usage = empty_usage()
        attempts = 0
        chat_calls = 0
        result: ChatResult | None = None
        error: str | None = None
        raw: str | None = None
        for round_index in range(corrective_retries + 1):
            result = await self.chat(conversation, **params)
            chat_calls += 1
            attempts += result.attempts
            add_usage(usage, result.usage)
            raw = result.text if result.text is not None else raw  # keep the last reply seen
            if not result.ok:
                error = result.error
                break
            try:
                value = parse_structured(result.text or "", schema)
            except StructuredOutputError as exc:
                error = exc.reason
                if round_index < corrective_retries:
                    conversation = [
                        *conversation,
                        {"role": "assistant", "content": result.text or ""},
                        {"role": "user", "content": corrective_prompt(exc.reason, schema)},
                    ]
                continue
            return StructuredResult(ok=True, value=value, raw=result.text, error=None,
                                    attempts=attempts, usage=usage, endpoint=result.endpoint,
                                    model=result.model, cached=result.cached,
                                    chat_calls=chat_calls)
        assert result is not None
        return StructuredResult(ok=False, value=None, raw=raw, error=error,
                                attempts=attempts, usage=usage, endpoint=result.endpoint,
                                model=result.model, cached=result.cached, chat_calls=chat_calls)

    def usage_summary(self) -> dict[str, Any]:
        """Cumulative usage: {"endpoints": {label: {...}}, "total": {...}} (see UsageTracker)."""
        return self.usage.summary()

    async def aclose(self) -> None:
        """Close the HTTP clients opened on the running loop (run_sync does this for you)."""
        loop = asyncio.get_running_loop()
        state = self._states.pop(loop, None)
        if state is not None:
            opened = _OPENED_ON_LOOP.get(loop, [])
            for sdk in state.sdk_clients:
                if sdk is not None:
                    if sdk in opened:
                        opened.remove(sdk)
                    await sdk.close()

    # ---- internals ----------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = _LoopState(self.max_concurrency, self.endpoints)
            self._states[loop] = state
        return state

    def _sdk_client(self, state: _LoopState, index: int) -> Any:
        sdk = state.sdk_clients[index]
        if sdk is None:
            import httpx2
            import openai

            ep = self.endpoints[index]
            pool = max(self.max_concurrency, ep.max_concurrency) + 8
            # One pooled HTTP client per endpoint and loop; keep-alive for every slot so 64 in
            # flight never reconnect. aiohttp's pool costs less CPU per request than httpcore's,
            # whose per-request scan of every pooled connection dominated the 200 ms benchmark.
            limits = httpx2.Limits(max_connections=pool, max_keepalive_connections=pool)
            if self.http_backend == "aiohttp":
                http_client = openai.DefaultAioHttpClient(limits=limits)
            else:
                http_client = openai.DefaultAsyncHttpxClient(limits=limits)
            # SDK retries off: this class owns the retry policy.
            sdk = openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key.get_secret_value(),
                                     max_retries=0, http_client=http_client)
            state.sdk_clients[index] = sdk
            _OPENED_ON_LOOP.setdefault(asyncio.get_running_loop(), []).append(sdk)
        return sdk

    def _from_cache(self, response: dict[str, Any], index: int, request_id: str,
                    started: float) -> ChatResult:
        usage = normalise_usage(response.get("usage"))
        label = self.labels[index]
        self.usage.record(label, self.endpoints[index].model, usage, ok=True, cached=True)
        return ChatResult(ok=True, text=response.get("text"),
                          finish_reason=response.get("finish_reason"), usage=usage,
                          endpoint=label, model=response.get("model") or self.endpoints[index].model,
                          attempts=0, cached=True, latency_s=time.perf_counter() - started,
                          error=None, request_id=request_id)

    async def _chat_uncached(self, state: _LoopState, messages: list[dict[str, Any]],
                             params: dict[str, Any], keys: list[str], allow_truncated: bool,
                             request_id: str, started: float
                             ) -> tuple[ChatResult, tuple[str, str, dict[str, Any]] | None]:
        """The attempts loop; returns the result and what to cache (key, model, response)."""
        usage = empty_usage()
        attempts = 0
        errors: list[str] = []
        attempt_errors: list[str] = []
        last: _Attempt | None = None
        index = 0
        for index in range(len(self.endpoints)):
            for retry in range(self.max_retries + 1):
                attempts += 1
                endpoint_limit = state.endpoint_semaphores[index]
                if endpoint_limit is None:
                    last = await self._attempt(state, index, messages, params, request_id,
                                               attempts)
                else:
                    async with endpoint_limit:
                        last = await self._attempt(state, index, messages, params, request_id,
                                                   attempts)
                add_usage(usage, last.usage)
                if last.ok:
                    break
                attempt_errors.append(f"{self.labels[index]}: {last.error}")
                if not last.retryable or retry == self.max_retries:
                    break
                delay = self._backoff(retry, last.retry_after_s)
                log.debug("llm %s attempt %d failed (%s); retrying in %.2fs",
                          self.labels[index], attempts, last.error, delay)
                await asyncio.sleep(delay)
            assert last is not None
            if last.ok:
                break
            errors.append(f"{self.labels[index]}: {last.error}")
            if index + 1 < len(self.endpoints):
                log.warning("llm endpoint %s gave up (%s); falling back to %s",
                            self.labels[index], last.error, self.labels[index + 1])

        assert last is not None
        label = self.labels[index]
        model = last.model or self.endpoints[index].model
        if not last.ok:
            error = " | ".join(errors)
            self.usage.record(label, self.endpoints[index].model, usage, ok=False,
                              attempts=attempts)
            return ChatResult(ok=False, text=None, finish_reason=None, usage=usage,
                              endpoint=label, model=model, attempts=attempts, cached=False,
                              latency_s=time.perf_counter() - started, error=error,
                              request_id=request_id,
                              attempt_errors=tuple(attempt_errors)), None

        truncated = last.finish_reason == "length"
        ok = allow_truncated or not truncated
        error = None
        if not ok:
            error = (f"truncated: finish_reason=length after {last.usage['completion_tokens']} "
                     "completion tokens; raise max_tokens or pass allow_truncated=True")
        self.usage.record(label, self.endpoints[index].model, usage, ok=ok, attempts=attempts)
        cache_entry = None
        if ok and not truncated and keys:
            cache_entry = (keys[index], self.endpoints[index].model,
                           {"text": last.text, "finish_reason": last.finish_reason,
                            "usage": last.usage, "model": model})
        return ChatResult(ok=ok, text=last.text, finish_reason=last.finish_reason, usage=usage,
                          endpoint=label, model=model, attempts=attempts, cached=False,
                          latency_s=time.perf_counter() - started, error=error,
                          request_id=request_id,
                          attempt_errors=tuple(attempt_errors)), cache_entry

    async def _attempt(self, state: _LoopState, index: int, messages: list[dict[str, Any]],
                       params: dict[str, Any], request_id: str, attempt: int) -> _Attempt:
        import httpx2
        import openai

        ep = self.endpoints[index]
        timeout = self.timeout_s or ep.timeout_s
        sdk = self._sdk_client(state, index)
        try:
            # asyncio.timeout bounds the whole call; the SDK timeout alone bounds each socket read.
            async with asyncio.timeout(timeout):
                # The SDK's documented low-level `post` keeps its auth, base URL and error mapping
                # but skips the per-request TypedDict transform and pydantic model building, which
                # cost more CPU than the HTTP itself at a few hundred requests/s.
                response = await sdk.post(
                    "/chat/completions",
                    cast_to=httpx2.Response,
                    body={"model": ep.model, "messages": messages, **params},
                    options={"timeout": timeout,
                             "headers": {"X-Request-Id": request_id, "X-Attempt": str(attempt)}},
                )
                body = await response.aread()
        except (TimeoutError, openai.APITimeoutError) as exc:
            refused = _connection_failure(exc)
            if refused is not None:
                # the SDK's aiohttp transport maps a refused connection to a connect timeout
                return _Attempt(ok=False, error=f"connection error: {_short(str(refused))}",
                                retryable=True)
            return _Attempt(ok=False, error=f"timeout after {timeout:g}s", retryable=True)
        except openai.APIConnectionError as exc:
            return _Attempt(ok=False, error=f"connection error: {exc}", retryable=True)
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status >= 500 or status in RETRYABLE_STATUS
            return _Attempt(ok=False, error=f"HTTP {status}: {_short(exc.message)}",
                            retryable=retryable, retry_after_s=_retry_after(exc.response))
        except Exception as exc:  # noqa: BLE001 - a batch must survive anything one call does
            log.exception("unexpected error calling %s", self.labels[index])
            return _Attempt(ok=False, error=f"{type(exc).__name__}: {_short(str(exc))}",
                            retryable=False)
        return _parse_completion(body, ep.model)

    def _backoff(self, retry: int, retry_after_s: float | None) -> float:
        """Full jitter: uniform(0, min(max, base * 2**retry)); at least Retry-After if given."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** retry))
        jittered = self._rng.uniform(0, ceiling)
        if retry_after_s is not None:
            wait = min(retry_after_s, MAX_RETRY_AFTER_S)
            # A little jitter on top spreads a burst of 429s instead of re-synchronising it.
            return wait + self._rng.uniform(0, 0.1 * wait)
        return jittered


def _parse_completion(body: bytes, requested_model: str) -> _Attempt:
    """A chat.completion JSON body → _Attempt; anything unusable is a retryable malformed reply."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError(f"message.content is {type(text).__name__}, not a string")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return _Attempt(ok=False, retryable=True,
                        error=f"malformed response: {type(exc).__name__}: {_short(str(exc))}")
    return _Attempt(ok=True, text=text, finish_reason=choice.get("finish_reason"),
                    model=data.get("model") or requested_model,
                    usage=normalise_usage(data.get("usage")))


def corrective_prompt(reason: str, schema: type[BaseModel]) -> str:
    """The follow-up that quotes a parse/validation error back to the model."""
    schema_json = json.dumps(schema.model_json_schema(), separators=(",", ":"))
    return (
        f"Your previous reply could not be used: {reason}\n"
        "Reply again with only the JSON value, no prose and no code fences. It must match this "
        f"JSON schema:\n{schema_json}"
    )


def _connection_failure(exc: BaseException) -> OSError | None:
    """A non-timeout OSError (refused, reset, unreachable) somewhere in exc's cause chain."""
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return cause
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(response: Any) -> float | None:
    """Seconds from `retry-after-ms`, `retry-after` (seconds or an HTTP date); None if absent."""
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


def client_for_role(role: LlmRole, settings: Settings | None = None, *,
                    use_cache: bool = True) -> LLMClient:
    """The configured endpoint for `role` plus `settings.fallback_endpoints(role)`, with the
    Postgres response cache (settings' database) unless `use_cache=False`."""
    settings = settings or get_settings()
    endpoints = [settings.endpoint(role), *settings.fallback_endpoints(role)]
    cache = None
    if use_cache:
        from tasks.core.db.engine import get_engine
        from tasks.core.llm.cache import PostgresResponseCache

        cache = PostgresResponseCache(get_engine(settings))
    return LLMClient(endpoints, max_concurrency=settings.llm_max_concurrency,
                     timeout_s=settings.llm_timeout_s, cache=cache)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion from synchronous code and return its result.

    Without a running loop in this thread: `asyncio.run`. Inside one (a notebook, an async
    caller): on a fresh loop in a worker thread, blocking until done. Either way the HTTP clients
    LLMClients opened on that loop are closed before it ends.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_with_cleanup(coro))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                               thread_name_prefix="llm-run-sync") as pool:
        return pool.submit(asyncio.run, _with_cleanup(coro)).result()


async def _with_cleanup(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        for sdk in _OPENED_ON_LOOP.pop(asyncio.get_running_loop(), []):
            try:
                await sdk.close()
            except Exception as exc:  # noqa: BLE001 - cleanup must not mask the result
                log.debug("closing an LLM HTTP pool failed: %s", exc)
