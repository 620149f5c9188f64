"""Chat generation on one shared CPU model: SmolLM2 (transformers) plus PEFT LoRA adapters by name.

`ChatModel` owns a tokenizer, a causal LM and the adapters it may serve. A model id is either the
base name (`smollm2-135m-instruct`) or `<base>:<adapter>`; an adapter is a folder holding
`adapter_config.json` + `adapter_model.safetensors`, found under one of the adapter roots
(`<data_dir>/adapters/<name>/` by default) or registered at runtime with `register_adapter`.
Adapters are checked against the base model's layer shapes when they are resolved and loaded
lazily with peft on first use; the base is served with the adapters disabled.

Requests are batched dynamically: `submit` queues a prepared request, and one scheduler thread
gathers the queued requests for the same model id (for up to `batch_window_ms`, at most
`max_batch_size`) and decodes them together, step by step, over one KV cache. Prompts are left
padded with an attention mask and per-row position ids, so each row computes what it would alone
(greedy output is the same batched or not). Each row keeps its own sampler, token budget and stop
strings and leaves the batch when it finishes; later requests for the same model id are prefilled
and spliced into the running batch (continuous batching) unless requests for another model id or
an adapter change are waiting, in which case the batch drains first.

Temperature 0 is greedy, otherwise temperature + nucleus (top_p) sampling from a per-request
`torch.Generator` seeded with the request's `seed`, so seeded requests are reproducible regardless
of what runs around them. Stop strings are cut from the text (never emitted, even across token
boundaries, because text that could still become a stop string is held back). One lock guards the
model and its active adapter: a batch holds it while it decodes, adapter loads and deletions take
it between batches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import queue
import re
import secrets
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from tasks.core.ids import stable_id

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WINDOW_MS = 5.0
GREEDY_BELOW_TEMPERATURE = 1e-5
# Prompts prefilled together are padded to the longest; a group may hold at most 25% padding,
# beyond that (one long prompt among short ones) prompts are prefilled in separate passes.
PREFILL_PADDING_SLACK = 1.25


class ModelServerError(Exception):
    """A request the model server cannot serve, with the HTTP status and what to change.

    `status_code` is the HTTP status the server answers with (400 bad parameter, 404 unknown
    model or adapter, 503 busy); `param` names the offending request field; `available` lists the
    model ids that can be asked for when the model was the problem.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        param: str | None = None,
        code: str | None = None,
        available: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.available = list(available)


class GenerationParams(BaseModel):
    """Sampling parameters of one request (OpenAI names and defaults)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_tokens must be >= 1, got {value}; e.g. max_tokens: 64")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not 0.0 <= value <= 2.0:
            raise ValueError(
                f"temperature must be in [0, 2], got {value}; use 0 for greedy or e.g. 0.7"
            )
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {value}; e.g. top_p: 0.9")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError('stop must be a string or a list of strings; e.g. stop: ["\\n\\n"]')
        stops = [s for s in value if s]
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stops)}"
            )
        return stops


@dataclass(frozen=True)
class PreparedChat:
    """A validated request: the resolved adapter, the prompt token ids and the token budget."""

    model_id: str
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    params: GenerationParams

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class StreamEvent:
    """A piece of generated text; the last event also carries finish_reason and token counts."""

    delta: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model_id: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class _LoadedAdapter:
    peft_name: str  # the name inside peft (must be a valid module key, so no dots)
    path: Path
    version: int  # mtime_ns of the weights file when loaded


@dataclass
class AdapterInfo:
    name: str
    path: Path
    source: Literal["registered", "root"]
    loaded: bool = False
    details: dict[str, Any] = field(default_factory=dict)


def adapter_weights_file(path: Path) -> Path | None:
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    return None


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and adapter_weights_file(path) is not None


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise ModelServerError(
                    "only text content parts are supported by the local model server; "
                    'send {"type": "text", "text": "..."} parts or a plain string',
                    param="messages",
                )
        return "".join(parts)
    raise ModelServerError(f"message content must be a string, got {type(content).__name__}",
                           param="messages")


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def check_batching(max_batch_size: int, batch_window_ms: float) -> None:
    """Raise ValueError (saying the fix) for batching options out of range."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}; use 1 to turn "
                         f"batching off or e.g. {DEFAULT_MAX_BATCH_SIZE}")
    if not 0 <= batch_window_ms <= 10_000:
        raise ValueError(f"batch_window_ms must be in [0, 10000], got {batch_window_ms}; "
                         f"e.g. {DEFAULT_BATCH_WINDOW_MS:g}")


class ChatModel:
    """One causal LM (plus LoRA adapters) answering chat requests in dynamic batches; thread-safe."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_name: str,
        adapter_roots: Sequence[Path] = (),
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        num_threads: int | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
        dtype: str | None = None,
    ) -> None:
        """Load the model. `dtype` (auto | float32 | bfloat16; None = TUNELOOP_MODEL_DTYPE) is
        the compute dtype, see `tasks.core.weights.resolve_dtype`. `num_threads` sets torch's (process-wide) intra-op thread count: on a
        machine whose cores are busy with other work, 1 thread is several times faster than
        spin-waiting on 2; None keeps torch's default (one per core). `max_batch_size` caps how
        many requests decode together (1 turns batching off); the scheduler waits up to
        `batch_window_ms` after a request arrives for others to batch with it."""
        check_batching(max_batch_size, batch_window_ms)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}; e.g. 1")
            torch.set_num_threads(num_threads)

        if ":" in model_name:
            raise ValueError(f"model_name {model_name!r} must not contain ':'; e.g. smollm2-135m-instruct")
        self.model_path = Path(model_path)
        self.model_name = model_name
        self.adapter_roots = [Path(p) for p in adapter_roots]
        self.default_max_tokens = default_max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        if not self.tokenizer.chat_template:
            raise ModelServerError(
                f"the tokenizer at {self.model_path} has no chat template; "
                "use a chat model such as smollm2-135m-instruct", status_code=500,
            )
        from tasks.core.weights import resolve_dtype

        self.dtype = resolve_dtype(dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=self.dtype)
        self.model.eval()
        self.context_length = int(
            getattr(self.model.config, "max_position_embeddings", 0) or 2048
        )
        self.eos_token_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if isinstance(pad, int) else min(self.eos_token_ids, default=0)
        self.fingerprint = "fp_" + stable_id(self.model_name, self.model_path.resolve(),
                                             str(self.dtype), length=12)
        self._peft: Any = None  # peft.PeftModel once the first adapter is loaded
        self._loaded: dict[str, _LoadedAdapter] = {}
        self._registered: dict[str, Path] = {}
        self._checked: dict[tuple[str, int], None] = {}
        self._lock = threading.Lock()  # the model and its active adapter
        # Counters for /health and benchmarks, updated by the scheduler thread. decode_rows /
        # decode_steps is the mean number of requests sharing a forward pass.
        self.stats = {"requests": 0, "completion_tokens": 0, "cancelled": 0, "batches": 0,
                      "joined": 0, "prefills": 0, "decode_steps": 0, "decode_rows": 0}
        self._registry_lock = threading.Lock()
        # The scheduler: queued requests, batching knobs and who waits for the model lock.
        self.max_batch_size = max_batch_size
        self.batch_window_ms = float(batch_window_ms)
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._scheduler: threading.Thread | None = None
        self._closed = False
        self._admin_waiting = 0
        self._running: _Batch | None = None
        self._cache_spliceable: bool | None = None  # known after the first prefill
        log.info("loaded %s from %s (context %d tokens)", model_name, model_path,
                 self.context_length)

    # ---- names and adapters ------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return ids

    def adapters(self) -> dict[str, AdapterInfo]:
        """Every adapter that can be served: registered ones first, then adapter roots in order."""
        found: dict[str, AdapterInfo] = {}
        with self._registry_lock:
            registered = dict(self._registered)
        for name, path in registered.items():
            found[name] = AdapterInfo(name, path, "registered")
        for root in self.adapter_roots:
            if not root.is_dir():
                continue
            for child in sorted(root.iterdir()):
                if child.name not in found and ADAPTER_NAME_RE.match(child.name) \
                        and is_adapter_dir(child):
                    found[child.name] = AdapterInfo(child.name, child, "root")
        for name, info in found.items():
            info.loaded = name in self._loaded
        return found

    def model_ids(self) -> list[str]:
        return [self.model_name, *(f"{self.model_name}:{name}" for name in self.adapters())]

    def resolve(self, model_id: str) -> tuple[str | None, Path | None]:
        """(adapter name, adapter folder) for a model id; (None, None) is the base model."""
        base, sep, adapter = model_id.partition(":")
        if base == self.model_name and not sep:
            return None, None
        if base == self.model_name and adapter:
            info = self.adapters().get(adapter)
            if info is not None:
                self._check_adapter(adapter, info.path)
                return adapter, info.path
            raise ModelServerError(
                f"adapter {adapter!r} not found: no folder {adapter}/ with {ADAPTER_CONFIG} under "
                f"{', '.join(str(r) for r in self.adapter_roots) or '(no adapter roots)'} and none "
                "registered with POST /v1/adapters; available models: "
                + ", ".join(self.model_ids()),
                status_code=404, param="model", code="model_not_found",
                available=self.model_ids(),
            )
        raise ModelServerError(
            f"model {model_id!r} does not exist on this server; available models: "
            + ", ".join(self.model_ids()),
            status_code=404, param="model", code="model_not_found", available=self.model_ids(),
        )

    def register_adapter(self, name: str, path: Path) -> AdapterInfo:
        """Serve the adapter folder `path` as `<base>:<name>` (replacing an earlier registration)."""
        if not ADAPTER_NAME_RE.match(name or ""):
            raise ModelServerError(
                f"adapter name {name!r} is invalid; use letters, digits, '.', '_' or '-' "
                "(e.g. champion or v3)", param="name",
            )
        path = Path(path).expanduser().resolve()
        if not is_adapter_dir(path):
            raise ModelServerError(
                f"{path} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS[0]} (write one with peft's save_pretrained)",
                param="path",
            )
        details = self._check_adapter(name, path)
        with self._registry_lock:
            self._registered[name] = path
        log.info("registered adapter %s -> %s", name, path)
        return AdapterInfo(name, path, "registered", loaded=name in self._loaded, details=details)

    def loaded_adapters(self) -> list[str]:
        return sorted(self._loaded)

    def load_adapter(self, model_id: str) -> None:
        """Load the adapter behind `model_id` now instead of on its first request."""
        adapter, path = self.resolve(model_id)
        with self._exclusive():
            self._activate(adapter, path)

    def unregister_adapter(self, name: str) -> bool:
        """Forget a registered adapter and free its weights; False when it was not registered."""
        with self._registry_lock:
            removed = self._registered.pop(name, None) is not None
        if removed:
            with self._exclusive():
                loaded = self._loaded.pop(name, None)
                if loaded is not None:
                    with warnings.catch_warnings():  # "deleted the active adapter": expected
                        warnings.simplefilter("ignore", UserWarning)
                        self._peft.delete_adapter(loaded.peft_name)
        return removed

    def _check_adapter(self, name: str, path: Path) -> dict[str, Any]:
        """Validate the adapter config and its weight shapes against the base model."""
        weights = adapter_weights_file(path)
        if weights is None:
            raise ModelServerError(f"adapter {name!r} at {path} has no {ADAPTER_WEIGHTS[0]}",
                                   status_code=404, param="model")
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise ModelServerError(f"adapter {name!r}: unreadable {path / ADAPTER_CONFIG}: {exc}",
                                   param="model") from None
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise ModelServerError(
                f"adapter {name!r} at {path} is a {peft_type or 'unknown'} adapter; "
                "only LoRA adapters (peft_type LORA) are served", param="model",
            )
        details = {"r": config.get("r"), "target_modules": config.get("target_modules"),
                   "base_model_name_or_path": config.get("base_model_name_or_path")}
        key = (str(path), weights.stat().st_mtime_ns)
        if key in self._checked or weights.suffix != ".safetensors":
            return details
        from safetensors import safe_open

        problems: list[str] = []
        try:
            handle_cm = safe_open(str(weights), framework="pt")
        except Exception as exc:  # a truncated or foreign file
            raise ModelServerError(f"adapter {name!r}: unreadable weights {weights}: {exc}",
                                   param="model") from None
        with handle_cm as handle:
            for tensor_name in handle.keys():
                match = re.match(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$",
                                 tensor_name)
                if match is None:
                    continue
                module_path, which = match.groups()
                try:
                    module = self.model.get_submodule(module_path)
                except AttributeError:
                    problems.append(f"{module_path} does not exist in {self.model_name}")
                    continue
                base_layer = getattr(module, "base_layer", module)
                weight = getattr(base_layer, "weight", None)
                if weight is None or weight.dim() != 2:
                    continue
                out_features, in_features = weight.shape
                shape = handle.get_slice(tensor_name).get_shape()
                if which == "A" and shape[-1] != in_features:
                    problems.append(f"{module_path}.lora_A expects {shape[-1]} inputs, "
                                    f"the base layer has {in_features}")
                if which == "B" and shape[0] != out_features:
                    problems.append(f"{module_path}.lora_B gives {shape[0]} outputs, "
                                    f"the base layer has {out_features}")
                if len(problems) >= 3:
                    break
        if problems:
            raise ModelServerError(
                f"adapter {name!r} at {path} does not fit {self.model_name} (was it trained on "
                f"another base model? its config says "
                f"{config.get('base_model_name_or_path')!r}): " + "; ".join(problems),
                param="model",
            )
        self._checked[key] = None
        return details

    def _activate(self, adapter: str | None, path: Path | None) -> None:
        """Make `adapter` (None: no adapter) the active one. Caller holds the lock."""
        if adapter is None or path is None:
            return
        weights = adapter_weights_file(path)
        version = weights.stat().st_mtime_ns if weights else 0
        current = self._loaded.get(adapter)
        if current is None or current.path != path or current.version != version:
            self._load_adapter(adapter, path, version, replacing=current)
        self._peft.set_adapter(self._loaded[adapter].peft_name)

    def _load_adapter(self, adapter: str, path: Path, version: int,
                      replacing: _LoadedAdapter | None) -> None:
        from peft import PeftModel

        peft_name = "a_" + stable_id(adapter, path, version, length=16)
        log.info("loading adapter %s from %s", adapter, path)
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=peft_name, is_trainable=False
                )
                self._peft.eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=peft_name, is_trainable=False)
        except Exception as exc:
            if self._peft is not None and peft_name in self._peft.peft_config:
                with contextlib.suppress(Exception), warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    self._peft.delete_adapter(peft_name)  # drop what got half-injected
            raise ModelServerError(
                f"adapter {adapter!r} at {path} could not be loaded onto {self.model_name}: "
                f"{type(exc).__name__}: {exc}", status_code=500, param="model",
            ) from exc
        self._loaded[adapter] = _LoadedAdapter(peft_name, path, version)
        if replacing is not None:
            self._peft.set_adapter(peft_name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._peft.delete_adapter(replacing.peft_name)

    # ---- batching ----------------------------------------------------------------------------
    def configure_batching(self, *, max_batch_size: int | None = None,
                           batch_window_ms: float | None = None) -> None:
        """Change the batching knobs of a loaded model (applies to batches formed from now on)."""
        size = self.max_batch_size if max_batch_size is None else max_batch_size
        window = self.batch_window_ms if batch_window_ms is None else batch_window_ms
        check_batching(size, window)
        with self._cond:
            self.max_batch_size = size
            self.batch_window_ms = float(window)
            self._cond.notify_all()

    def batching_info(self) -> dict[str, Any]:
        """The batching knobs, the number of queued requests and the rows decoding right now."""
        running = self._running
        with self._cond:
            queued = len(self._queue)
        return {"max_batch_size": self.max_batch_size, "batch_window_ms": self.batch_window_ms,
                "dtype": str(self.dtype).removeprefix("torch."), "queued": queued, "running": len(running.rows) if running is not None else 0}

    def submit(
        self,
        prepared: PreparedChat,
        sink: Callable[[StreamEvent | BaseException], None],
        cancel: threading.Event | None = None,
    ) -> threading.Event:
        """Queue `prepared` for the scheduler thread; returns the event that cancels it.

        `sink` is called on the scheduler thread with each StreamEvent (the last one carries
        finish_reason) or, instead of a last event, with the exception that ended the request;
        it must return quickly. A sink that raises cancels its request.
        """
        cancel = threading.Event() if cancel is None else cancel
        request = _Request(prepared, sink, cancel, time.monotonic())
        with self._cond:
            if self._closed:
                raise ModelServerError("the model has been shut down; restart the model server",
                                       status_code=503, code="server_closed")
            self._queue.append(request)
            if self._scheduler is None:
                self._scheduler = threading.Thread(target=self._schedule, daemon=True,
                                                   name=f"tuneloop-batcher-{self.model_name}")
                self._scheduler.start()
            self._cond.notify_all()
        return cancel

    def close(self) -> None:
        """Stop the scheduler: queued requests fail with a 503 error; a running batch finishes."""
        with self._cond:
            self._closed = True
            leftovers = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for request in leftovers:
            self._fail(request, ModelServerError("the model server is shutting down; retry "
                                                 "against a running server", status_code=503,
                                                 code="server_closed"))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the model lock between batches; running batches stop taking newcomers meanwhile."""
        with self._cond:
            self._admin_waiting += 1
        try:
            with self._lock:
                yield
        finally:
            with self._cond:
                self._admin_waiting -= 1

    def _schedule(self) -> None:
        """The scheduler thread: form a batch from the oldest request's model id, decode it."""
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                model_id = self._queue[0].prepared.model_id
                deadline = self._queue[0].arrived + self.batch_window_ms / 1000
                while (not self._closed and self._queued_for(model_id) < self.max_batch_size
                       and (remaining := deadline - time.monotonic()) > 0):
                    self._cond.wait(remaining)
                if self._closed:  # close() has failed whatever was queued
                    return
                requests = self._take(model_id, self.max_batch_size)
            try:
                self._run_batch(requests)
            except Exception as exc:  # never let the scheduler die; _run_batch reports per request
                log.exception("batch for %s failed", model_id)
                for request in requests:
                    if not request.done:
                        self._fail(request, exc)

    def _queued_for(self, model_id: str) -> int:
        return sum(r.prepared.model_id == model_id for r in self._queue)

    def _take(self, model_id: str, limit: int) -> list[_Request]:
        """Remove up to `limit` queued requests for `model_id`, oldest first. Caller holds _cond."""
        taken: list[_Request] = []
        kept: deque[_Request] = deque()
        for request in self._queue:
            if len(taken) < limit and request.prepared.model_id == model_id:
                taken.append(request)
            else:
                kept.append(request)
        self._queue = kept
        return taken

    def _take_joiners(self, model_id: str, target: tuple[Any, ...], room: int) -> list[_Request]:
        """Queued requests that may join a running batch for `model_id` (none when others wait)."""
        with self._cond:
            if self._admin_waiting or self._closed or not self._queue:
                return []
            if any(r.prepared.model_id != model_id for r in self._queue):
                return []  # let the batch drain so the other model id gets its turn
        if target[0] is not None:  # the adapter must still be the very weights being served
            try:
                adapter, path = self.resolve(model_id)
            except ModelServerError:
                return []
            if self._target(adapter, path) != target:
                return []
        with self._cond:
            return self._take(model_id, room)

    @staticmethod
    def _target(adapter: str | None, path: Path | None) -> tuple[Any, ...]:
        weights = adapter_weights_file(path) if path is not None else None
        return adapter, path, weights.stat().st_mtime_ns if weights is not None else 0

    def _run_batch(self, requests: list[_Request]) -> None:
        """Decode `requests` (one model id) together, admitting newcomers as rows finish."""
        import torch

        prepared = requests[0].prepared
        members = list(requests)
        with self._lock, contextlib.ExitStack() as stack:
            try:
                adapter, path = self.resolve(prepared.model_id) if prepared.adapter else (None, None)
                self._activate(adapter, path)
                target = self._target(adapter, path)
                # With no adapter loaded (none yet, or all deleted) the plain model is the base.
                runner = self._peft if self._loaded else self.model
                if adapter is None and self._loaded:
                    stack.enter_context(self._peft.disable_adapter())
                stack.enter_context(torch.inference_mode())
                batch = _Batch(self, runner)
                self._running = batch
                self.stats["batches"] += 1
                batch.admit(requests)
                while batch.rows:
                    room = self.max_batch_size - len(batch.rows)
                    if room > 0 and batch.spliceable:
                        joiners = self._take_joiners(prepared.model_id, target, room)
                        if joiners:
                            members.extend(joiners)
                            self.stats["joined"] += len(joiners)
                            batch.admit(joiners)
                    batch.step()
            except Exception as exc:
                if not isinstance(exc, ModelServerError):
                    log.exception("generation for %s failed", prepared.model_id)
                for request in members:
                    if not request.done:
                        self._fail(request, exc)
            finally:
                self._running = None

    def _deliver(self, request: _Request, item: StreamEvent | BaseException) -> None:
        try:
            request.sink(item)
        except Exception as exc:  # the consumer is gone (e.g. its event loop closed)
            log.debug("dropping a request whose consumer failed: %s", exc)
            request.cancel.set()

    def _finish(self, sequence: _Sequence) -> None:
        request = sequence.request
        self.stats["requests"] += 1
        self.stats["completion_tokens"] += len(sequence.generated)
        self.stats["cancelled"] += sequence.finish == "cancelled"
        request.done = True
        self._deliver(request, sequence.final_event())

    def _fail(self, request: _Request, exc: BaseException) -> None:
        request.done = True
        try:  # each consumer raises its own copy: one exception object, raised on many threads,
            item = copy.copy(exc)  # would pile up their tracebacks
        except Exception:
            item = exc
        self._deliver(request, item)

    # ---- requests ----------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of the chat template applied to `messages`, ending with the assistant cue."""
        if not messages:
            raise ModelServerError("messages must contain at least one message", param="messages")
        conversation = []
        for message in messages:
            role = message.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise ModelServerError(
                    f"message role {role!r} is not supported; use system, user or assistant",
                    param="messages",
                )
            conversation.append({"role": role, "content": _message_text(message.get("content"))})
        # sanitize_control_tokens: a user writing "<|im_end|>" must not end their turn.
        encoded = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
            sanitize_control_tokens=True,
        )
        return list(encoded["input_ids"])

    def prepare(
        self, model_id: str, messages: Sequence[dict[str, Any]], params: GenerationParams
    ) -> PreparedChat:
        """Validate a request (model, messages, token budget) before any generation starts."""
        adapter, _ = self.resolve(model_id)
        prompt = self.prompt_ids(messages)
        room = self.context_length - len(prompt)
        if room < 1:
            raise ModelServerError(
                f"the prompt has {len(prompt)} tokens; {self.model_name} reads at most "
                f"{self.context_length}; shorten the messages", param="messages",
                code="context_length_exceeded",
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ModelServerError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(prompt)} tokens exceeds "
                f"the {self.context_length}-token context; set max_tokens <= {room}",
                param="max_tokens", code="context_length_exceeded",
            )
        max_tokens = params.max_tokens or min(self.default_max_tokens, room)
        return PreparedChat(model_id, adapter, prompt, max_tokens, params)

    def stream(
        self, prepared: PreparedChat, cancel: threading.Event | None = None
    ) -> Iterator[StreamEvent]:
        """Queue the request and yield its text deltas; the last event has finish_reason.

        The request decodes in a batch with whatever else is queued for the same model id.
        Closing the iterator early cancels it; so does setting `cancel` (the client went away),
        which ends it with finish_reason "cancelled". Errors (e.g. an adapter that fails to load)
        are raised here.
        """
        events: queue.SimpleQueue[StreamEvent | BaseException] = queue.SimpleQueue()
        cancel = threading.Event() if cancel is None else cancel
        self.submit(prepared, events.put, cancel)
        finished = False
        try:
            while not finished:
                item = events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                cancel.set()

    def generate(self, prepared: PreparedChat, cancel: threading.Event | None = None) -> Completion:
        parts: list[str] = []
        last: StreamEvent | None = None
        for event in self.stream(prepared, cancel):
            parts.append(event.delta)
            last = event
        assert last is not None and last.finish_reason is not None
        return Completion("".join(parts), last.finish_reason, last.prompt_tokens,
                          last.completion_tokens, prepared.model_id)

    def complete(self, model_id: str, messages: Sequence[dict[str, Any]], **params: Any) -> Completion:
        """Convenience: prepare + generate in one call (params as in GenerationParams)."""
        return self.generate(self.prepare(model_id, messages, GenerationParams(**params)))

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @staticmethod
    def _sample(logits: Any, params: GenerationParams, greedy: bool, generator: Any) -> int:
        import torch

        logits = logits.float()
        if greedy:
            return int(torch.argmax(logits))
        logits = logits / params.temperature
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens ranked above it already cover top_p (keeps >= 1).
            drop = torch.cumsum(probs, dim=-1) - probs >= params.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            choice = torch.multinomial(torch.softmax(sorted_logits, dim=-1), 1,
                                       generator=generator)
            return int(order[choice])
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))


# ---- batching internals --------------------------------------------------------------------------
@dataclass(eq=False)
class _Request:
    """A prepared chat waiting for, or decoding in, a batch; its events go to `sink`."""

    prepared: PreparedChat
    sink: Callable[[StreamEvent | BaseException], None]
    cancel: threading.Event
    arrived: float  # time.monotonic() when queued: the batch window counts from the oldest
    done: bool = False  # its last event (or error) has been delivered


class _Sequence:
    """One request's decoding state in a batch: its sampler, tokens so far and text emitted."""

    def __init__(self, request: _Request, model: ChatModel) -> None:
        import torch

        params = request.prepared.params
        self.request = request
        self.params = params
        self.greedy = params.temperature < GREEDY_BELOW_TEMPERATURE
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.generated: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        self.finish: FinishReason | None = None
        self.final_text = ""
        self._model = model

    def accept(self, token: int) -> str:
        """Record one sampled token; returns the text that became safe to send ('' for none).

        Sets `finish` when the token ends the request (end of turn, a stop string, max_tokens);
        the rest of the text then goes out with the final event.
        """
        stops = self.params.stop
        self.generated.append(token)
        if token in self._model.eos_token_ids:
            self.finish = "stop"
            text = self._model._decode(self.generated[:-1])
        else:
            text = self._model._decode(self.generated)
            if stops:
                start = max(0, self.emitted - self.max_stop)
                cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    self.finish = "stop"
            if self.finish is None and len(self.generated) >= self.request.prepared.max_tokens:
                self.finish = "length"
        if self.finish is not None:
            self.final_text = text
            return ""
        safe_end = len(text) - _stop_holdback(text, stops)
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of it.
        while safe_end > self.emitted and text[safe_end - 1] == "\ufffd":
            safe_end -= 1
        if safe_end <= self.emitted:
            return ""
        delta = text[self.emitted:safe_end]
        self.emitted = safe_end
        return delta

    def final_event(self) -> StreamEvent:
        tail = self.final_text[self.emitted:] if self.finish != "cancelled" else ""
        return StreamEvent(tail, finish_reason=self.finish,
                           prompt_tokens=self.request.prepared.prompt_tokens,
                           completion_tokens=len(self.generated))


def _prefill_groups(lengths: Sequence[int], slack: float) -> list[list[int]]:
    """Indices of prompts grouped for prefill, longest first: each group's padded size (rows x
    its longest prompt) stays within `slack` x the tokens it really holds."""
    groups: list[list[int]] = []
    held = 0
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups:
            group = groups[-1]
            if (len(group) + 1) * lengths[group[0]] <= slack * (held + lengths[index]):
                group.append(index)
                held += lengths[index]
                continue
        groups.append([index])
        held = lengths[index]
    return groups


def _is_spliceable(cache: Any) -> bool:
    """Whether rows of this cache can be padded and concatenated (plain per-layer K/V tensors)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers
    )


class _Batch:
    """Rows (sequences of one model id) decoding together over one KV cache.

    Rows are left padded and right aligned: each row's newest cached token sits in the last
    column, `mask` marks each row's real columns and `positions` holds the position id of the
    token each row feeds next, so every row computes what it would compute alone. Finished rows
    leave (and columns that are padding in every remaining row are cut); newcomers are prefilled
    on their own and spliced in, the shorter cache getting zero columns on its left.
    """

    def __init__(self, model: ChatModel, runner: Any) -> None:
        self.model = model
        self.runner = runner
        self.rows: list[_Sequence] = []
        self.cache: Any = None
        self.mask: Any = None  # (rows, cached columns), 1 where the column is the row's token
        self.positions: Any = None  # (rows,) position id of the token fed next
        self.last: Any = None  # (rows,) the token fed next (sampled, not yet cached)
        self.spliceable = True

    def admit(self, requests: list[_Request]) -> None:
        """Prefill `requests`, sample their first tokens and add the unfinished ones as rows."""
        fresh: list[_Sequence] = []
        for request in requests:
            sequence = _Sequence(request, self.model)
            if request.cancel.is_set():
                sequence.finish = "cancelled"
                self.model._finish(sequence)
            else:
                fresh.append(sequence)
        if not self.model._cache_spliceable:  # unknown yet, or rows cannot be spliced
            groups = [fresh]
        else:
            lengths = [s.request.prepared.prompt_tokens for s in fresh]
            groups = [[fresh[i] for i in group]
                      for group in _prefill_groups(lengths, PREFILL_PADDING_SLACK)]
        for group in groups:
            newcomers = _Batch(self.model, self.runner)
            newcomers.prefill(group)
            if self.model._cache_spliceable is None:
                self.model._cache_spliceable = newcomers.spliceable
            if not newcomers.rows:
                continue
            if self.rows:
                self.splice(newcomers)
            else:
                self.rows, self.cache, self.mask = newcomers.rows, newcomers.cache, newcomers.mask
                self.positions, self.last = newcomers.positions, newcomers.last
                self.spliceable = newcomers.spliceable

    def prefill(self, sequences: list[_Sequence]) -> None:
        import torch

        width = max(s.request.prepared.prompt_tokens for s in sequences)
        input_ids = torch.full((len(sequences), width), self.model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            prompt = sequence.request.prepared.prompt_ids
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.runner(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, logits_to_keep=1)
        self.model.stats["prefills"] += 1
        self.rows = sequences
        self.cache = out.past_key_values
        self.mask = mask
        self.positions = mask.sum(-1)
        self.spliceable = _is_spliceable(self.cache)
        self.last = self._sample(out.logits[:, -1])
        self._compact()

    def step(self) -> None:
        """One forward pass for every row: feed each row's last token, sample its next one."""
        import torch

        for sequence in self.rows:
            if sequence.request.cancel.is_set():
                sequence.finish = "cancelled"
                self.model._finish(sequence)
        self._compact()
        if not self.rows:
            return
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.runner(input_ids=self.last[:, None], attention_mask=mask,
                          position_ids=self.positions[:, None], past_key_values=self.cache,
                          use_cache=True, logits_to_keep=1)
        self.model.stats["decode_steps"] += 1
        self.model.stats["decode_rows"] += len(self.rows)
        self.cache = out.past_key_values
        self.mask = mask
        self.positions = self.positions + 1
        self.last = self._sample(out.logits[:, -1])
        self._compact()

    def _sample(self, logits: Any) -> Any:
        """Each row's next token by its own parameters; emits deltas and finishes rows."""
        import torch

        greedy = (logits.float().argmax(dim=-1).tolist()
                  if any(s.greedy for s in self.rows) else [])
        tokens: list[int] = []
        for row, sequence in enumerate(self.rows):
            token = greedy[row] if sequence.greedy else ChatModel._sample(
                logits[row], sequence.params, False, sequence.generator)
            tokens.append(token)
            delta = sequence.accept(token)
            if sequence.finish is not None:
                self.model._finish(sequence)
            elif delta:
                self.model._deliver(sequence.request, StreamEvent(delta))
        return torch.tensor(tokens, dtype=torch.long)

    def _compact(self) -> None:
        """Drop finished rows from the cache, then cut columns no remaining row uses."""
        import torch

        keep = [row for row, sequence in enumerate(self.rows) if sequence.finish is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.last = [], None, None, None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[row] for row in keep]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        if self.spliceable:
            lead = int(self.mask.any(dim=0).int().argmax())  # first column some row still uses
            if lead:
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, lead:]
                    layer.values = layer.values[:, :, lead:]
                self.mask = self.mask[:, lead:]

    def splice(self, other: _Batch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter with masked zeros."""
        import torch
        from torch.nn.functional import pad

        width = max(self.mask.shape[1], other.mask.shape[1])

        def widen(kv: Any) -> Any:  # (rows, heads, columns, dim): zeros on the left of columns
            return pad(kv, (0, 0, width - kv.shape[2], 0))

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([widen(mine.keys), widen(theirs.keys)])
            mine.values = torch.cat([widen(mine.values), widen(theirs.values)])
        self.mask = torch.cat([pad(self.mask, (width - self.mask.shape[1], 0)),
                               pad(other.mask, (width - other.mask.shape[1], 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.last = torch.cat([self.last, other.last])
        self.rows = self.rows + other.rows
