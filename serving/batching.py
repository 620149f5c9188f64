"""The continuous-batching engine behind `ChatModel`: one scheduler thread, one KV cache per batch.

Requests are batched dynamically: `submit` queues a prepared request, and one scheduler thread
gathers the queued requests for the same model id (for up to `batch_window_ms`, at most
`max_batch_size`) and decodes them together, step by step, over one KV cache. Prompts are left
padded with an attention mask and per-row position ids, so each row computes what it would alone
(greedy output is the same batched or not). Each row keeps its own sampler, token budget and stop
strings and leaves the batch when it finishes; later requests for the same model id are prefilled
and spliced into the running batch (continuous batching) unless requests for another model id or
an adapter change are waiting, in which case the batch drains first. Temperature 0 is greedy,
otherwise temperature + nucleus (top_p) sampling from a per-request `torch.Generator` seeded with
the request's `seed`, so seeded requests are reproducible regardless of what runs around them.
Stop strings are cut from the text (never emitted, even across token boundaries, because text
that could still become a stop string is held back). One lock guards the model and its active
adapter: a batch holds it while it decodes, adapter loads and deletions take it between batches.
`BatchScheduler` is the scheduling half of `ChatModel` (a mixin); `_Batch` and `_Sequence` are the
decoding state.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.adapters import adapter_weights_file
from serving.chat_types import (
    FinishReason,
    GenerationParams,
    ModelServerError,
    PreparedChat,
    StreamEvent,
)

if TYPE_CHECKING:
    from serving.generation import ChatModel

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WINDOW_MS = 5.0
GREEDY_BELOW_TEMPERATURE = 1e-5
# Prompts prefilled together are padded to the longest; a group may hold at most 25% padding,
# beyond that (one long prompt among short ones) prompts are prefilled in separate passes.
PREFILL_PADDING_SLACK = 1.25


def check_batching(max_batch_size: int, batch_window_ms: float) -> None:
    """Raise ValueError (saying the fix) for batching options out of range."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}; use 1 to turn "
                         f"batching off or e.g. {DEFAULT_MAX_BATCH_SIZE}")
    if not 0 <= batch_window_ms <= 10_000:
        raise ValueError(f"batch_window_ms must be in [0, 10000], got {batch_window_ms}; "
                         f"e.g. {DEFAULT_BATCH_WINDOW_MS:g}")


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _sample_token(logits: Any, params: GenerationParams, greedy: bool, generator: Any) -> int:
    """One row's next token: argmax when greedy, else temperature + top_p sampling."""
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


# ---- decoding state ------------------------------------------------------------------------------
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
        safe_end = len(text) - stop_holdback(text, stops)
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


def prefill_groups(lengths: Sequence[int], slack: float) -> list[list[int]]:
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
                      for group in prefill_groups(lengths, PREFILL_PADDING_SLACK)]
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
            token = greedy[row] if sequence.greedy else _sample_token(
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


# ---- the scheduler ---------------------------------------------------------------------------
class BatchScheduler:
    """The scheduling half of `ChatModel`: the request queue, the scheduler thread and its batches."""

    # Provided by ChatModel (and its AdapterRegistry half).
    model: Any
    model_name: str
    dtype: Any
    _peft: Any
    _loaded: dict[str, Any]
    resolve: Callable[[str], tuple[str | None, Path | None]]
    _activate: Callable[[str | None, Path | None], None]

    def _init_scheduler(self, max_batch_size: int, batch_window_ms: float) -> None:
        self._lock = threading.Lock()  # the model and its active adapter
        # Counters for /health and benchmarks, updated by the scheduler thread. decode_rows /
        # decode_steps is the mean number of requests sharing a forward pass.
        self.stats = {"requests": 0, "completion_tokens": 0, "cancelled": 0, "batches": 0,
                      "joined": 0, "prefills": 0, "decode_steps": 0, "decode_rows": 0}
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
