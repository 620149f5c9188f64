"""Chat generation on one shared CPU model: SmolLM2 (transformers) plus PEFT LoRA adapters by name.

`ChatModel` owns a tokenizer, a causal LM and the adapters it may serve. A model id is either the
base name (`smollm2-135m-instruct`) or `<base>:<adapter>`; an adapter is a folder holding
`adapter_config.json` + `adapter_model.safetensors`, found under one of the adapter roots
(`<data_dir>/adapters/<name>/` by default) or registered at runtime with `register_adapter`.
Adapters are checked against the base model's layer shapes when they are resolved and loaded
lazily with peft on first use; the base is served with the adapters disabled.

Generation is a manual token loop over a KV cache: temperature 0 is greedy, otherwise
temperature + nucleus (top_p) sampling from a per-request `torch.Generator` seeded with the
request's `seed`, so seeded requests are reproducible regardless of what runs around them. Stop
strings are cut from the text (never emitted, even across token boundaries, because text that
could still become a stop string is held back). One lock serializes generation and adapter
switching: the model and its active adapter are shared state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from tasks.ids import stable_id

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 512
GREEDY_BELOW_TEMPERATURE = 1e-5


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


class ChatModel:
    """One causal LM (plus LoRA adapters) answering chat requests; thread-safe via one lock."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_name: str,
        adapter_roots: Sequence[Path] = (),
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        num_threads: int | None = None,
    ) -> None:
        """Load the model. `num_threads` sets torch's (process-wide) intra-op thread count: on a
        machine whose cores are busy with other work, 1 thread is several times faster than
        spin-waiting on 2; None keeps torch's default (one per core)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=torch.float32)
        self.model.eval()
        self.context_length = int(
            getattr(self.model.config, "max_position_embeddings", 0) or 2048
        )
        self.eos_token_ids = self._eos_ids()
        self.fingerprint = "fp_" + stable_id(self.model_name, self.model_path.resolve(), length=12)
        self._peft: Any = None  # peft.PeftModel once the first adapter is loaded
        self._loaded: dict[str, _LoadedAdapter] = {}
        self._registered: dict[str, Path] = {}
        self._checked: dict[tuple[str, int], None] = {}
        self._lock = threading.Lock()
        # Counters for /health and benchmarks; updated under the model lock.
        self.stats = {"requests": 0, "completion_tokens": 0, "cancelled": 0}
        self._registry_lock = threading.Lock()
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
        with self._lock:
            self._activate(adapter, path)

    def unregister_adapter(self, name: str) -> bool:
        """Forget a registered adapter and free its weights; False when it was not registered."""
        with self._registry_lock:
            removed = self._registered.pop(name, None) is not None
        if removed:
            with self._lock:
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
        """Generate under the model lock, yielding text deltas; the last event has finish_reason.

        Close the iterator (or exhaust it) to release the lock; `cancel` stops generation early
        with finish_reason "cancelled" (the client went away).
        """
        import torch

        params = prepared.params
        stops = params.stop
        max_stop = max((len(s) for s in stops), default=0)
        greedy = params.temperature < GREEDY_BELOW_TEMPERATURE
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

        with contextlib.ExitStack() as stack:
            stack.enter_context(self._lock)
            _, path = self.resolve(prepared.model_id) if prepared.adapter else (None, None)
            self._activate(prepared.adapter, path)
            # With no adapter loaded (none yet, or all deleted) the plain model is the base.
            runner = self._peft if self._loaded else self.model
            if prepared.adapter is None and self._loaded:
                stack.enter_context(self._peft.disable_adapter())
            stack.enter_context(torch.inference_mode())
            generated: list[int] = []
            emitted = 0
            finish: FinishReason | None = None
            final_text = ""
            inputs = torch.tensor([prepared.prompt_ids], dtype=torch.long)
            cache = None
            while finish is None:
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                out = runner(input_ids=inputs, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
                cache = out.past_key_values
                token = self._sample(out.logits[0, -1], params, greedy, generator)
                generated.append(token)
                if token in self.eos_token_ids:
                    finish = "stop"
                    text = self._decode(generated[:-1])
                else:
                    text = self._decode(generated)
                    if stops:
                        start = max(0, emitted - max_stop)
                        cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0),
                                  default=-1)
                        if cut >= 0:
                            text = text[:cut]
                            finish = "stop"
                    if finish is None and len(generated) >= prepared.max_tokens:
                        finish = "length"
                if finish is not None:
                    final_text = text
                    break
                safe_end = len(text) - _stop_holdback(text, stops)
                # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of it.
                while safe_end > emitted and text[safe_end - 1] == "\ufffd":
                    safe_end -= 1
                if safe_end > emitted:
                    yield StreamEvent(text[emitted:safe_end])
                    emitted = safe_end
                inputs = torch.tensor([[token]], dtype=torch.long)
            self.stats["requests"] += 1
            self.stats["completion_tokens"] += len(generated)
            self.stats["cancelled"] += finish == "cancelled"
        tail = final_text[emitted:] if finish != "cancelled" else ""
        yield StreamEvent(tail, finish_reason=finish, prompt_tokens=prepared.prompt_tokens,
                          completion_tokens=len(generated))

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
