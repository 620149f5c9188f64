"""Chat generation on one shared CPU model: SmolLM2 (transformers) plus PEFT LoRA adapters by name.

`ChatModel` owns a tokenizer, a causal LM and the adapters it may serve. A model id is either the
base name (`smollm2-135m-instruct`) or `<base>:<adapter>`. This module holds the model itself
(loading, the chat template, request validation, streaming and whole completions); the class is
assembled from two halves that live next to it: `serving.adapters.AdapterRegistry` (finding,
checking and lazily loading LoRA adapters) and `serving.batching.BatchScheduler` (the scheduler
thread that decodes queued requests in continuous batches over one KV cache, with per-request
seeded sampling and stop strings). The public records and errors (`ModelServerError`,
`GenerationParams`, `PreparedChat`, `StreamEvent`, `Completion`, `AdapterInfo`) are defined in
`serving.chat_types` and re-exported here, as are the adapter and batching helpers callers use.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from serving.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_NAME_RE,
    ADAPTER_WEIGHTS,
    AdapterRegistry,
    adapter_weights_file,
    is_adapter_dir,
)
from serving.batching import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_SIZE,
    GREEDY_BELOW_TEMPERATURE,
    PREFILL_PADDING_SLACK,
    BatchScheduler,
    check_batching,
)
from serving.chat_types import (
    DEFAULT_MAX_TOKENS,
    MAX_STOP_SEQUENCES,
    AdapterInfo,
    Completion,
    FinishReason,
    GenerationParams,
    ModelServerError,
    PreparedChat,
    StreamEvent,
)
from tasks.core.ids import stable_id

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_NAME_RE",
    "ADAPTER_WEIGHTS",
    "DEFAULT_BATCH_WINDOW_MS",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_TOKENS",
    "GREEDY_BELOW_TEMPERATURE",
    "MAX_STOP_SEQUENCES",
    "PREFILL_PADDING_SLACK",
    "AdapterInfo",
    "ChatModel",
    "Completion",
    "FinishReason",
    "GenerationParams",
    "ModelServerError",
    "PreparedChat",
    "StreamEvent",
    "adapter_weights_file",
    "check_batching",
    "is_adapter_dir",
]

log = logging.getLogger(__name__)


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


class ChatModel(AdapterRegistry, BatchScheduler):
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
        self._init_adapters()
        self._init_scheduler(max_batch_size, batch_window_ms)
        log.info("loaded %s from %s (context %d tokens)", model_name, model_path,
                 self.context_length)

    # ---- names -----------------------------------------------------------------------------------
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
