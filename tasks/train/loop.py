"""The local trainer's torch loop: batch plans, the token-mean loss, optimizer steps, periodic
evaluation and checkpoints. `tasks.train.local.train_local` sets the run up and calls
`train_loop`; nothing here reads the config files or writes the final output folder.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.train.config import AxolotlConfig, TrainingError
from tasks.train.data import Batch, EncodedRow, collate_packed, collate_padded, pack_rows

STATE_FILENAME = "trainer_state.json"


class BatchPlan:
    """Per-epoch micro-batches: shuffled packed bins, or shuffled rows padded per batch."""

    def __init__(self, rows: Sequence[EncodedRow], cfg: AxolotlConfig, pad_token_id: int,
                 *, packing: bool) -> None:
        self.rows = rows
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.packing = packing
        lengths = [len(r) for r in rows]
        self.units: list[list[int]] = (pack_rows(lengths, cfg.sequence_len) if packing
                                       else [[i] for i in range(len(rows))])

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.units) / self.cfg.micro_batch_size) if self.units else 0

    def _width(self, members: list[list[int]]) -> int:
        if self.cfg.pad_to_sequence_len:
            return self.cfg.sequence_len
        return max(sum(len(self.rows[i]) for i in unit) for unit in members)

    def epoch(self, epoch: int, *, shuffle: bool = True) -> Iterator[Batch]:
        order = list(range(len(self.units)))
        if shuffle:
            random.Random(self.cfg.seed + epoch).shuffle(order)
        size = self.cfg.micro_batch_size
        for start in range(0, len(order), size):
            members = [self.units[i] for i in order[start:start + size]]
            width = self._width(members)
            if self.packing:
                yield collate_packed(self.rows, members, pad_token_id=self.pad_token_id,
                                     width=width)
            else:
                yield collate_padded([self.rows[unit[0]] for unit in members],
                                     pad_token_id=self.pad_token_id, width=width)


def token_loss_sum(model: Any, tensors: dict[str, Any], autocast_dtype: Any) -> tuple[Any, int]:
    """Summed cross-entropy over trained positions, projecting only those through the LM head."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    targets = tensors["targets"]
    selected = targets != -100
    n_trained = int(selected.sum())
    if n_trained == 0:
        return None, 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    direct_head = (hasattr(base, "get_decoder") and base.get_output_embeddings() is not None
                   and not getattr(config, "final_logit_softcapping", None)
                   and getattr(config, "logit_scale", None) in (None, 1.0))
    device_type = targets.device.type
    with torch.autocast(device_type=device_type, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
        inputs = {"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"],
                  "position_ids": tensors["position_ids"], "use_cache": False}
        if direct_head:
            hidden = base.get_decoder()(**inputs).last_hidden_state
            logits = base.get_output_embeddings()(hidden[selected])
        else:  # models that post-process logits (soft-capping, scaling): full forward
            logits = model(**inputs).logits[selected]
    loss_sum = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
    return loss_sum, n_trained


def evaluate_loss(model: Any, plan: BatchPlan, *, device: Any, autocast_dtype: Any,
                  mask_dtype: Any = None) -> float | None:
    """Token-mean cross-entropy over the validation rows (None when there are none)."""
    import torch

    if not plan.units:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in plan.epoch(0, shuffle=False):
            tensors = batch.to_tensors(device=device, mask_dtype=mask_dtype)
            loss_sum, n = token_loss_sum(model, tensors, autocast_dtype)
            if n:
                total += float(loss_sum)
                tokens += n
    if was_training:
        model.train()
    return total / tokens if tokens else None


def write_state(path: Path, *, global_step: int, max_steps: int, log_history: list[dict],
                 extra: dict | None = None) -> None:
    state = {"global_step": global_step, "max_steps": max_steps, "log_history": log_history,
             **(extra or {})}
    path.write_text(json.dumps(state, indent=2))


def save_checkpoint(model: Any, out: Path, step: int, *, max_steps: int,
                     log_history: list[dict], keep: int | None) -> Path:
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(checkpoint))
    write_state(checkpoint / STATE_FILENAME, global_step=step, max_steps=max_steps,
                 log_history=log_history)
    if keep:
        existing = sorted((out / "checkpoints").glob("checkpoint-*"),
                          key=lambda p: int(p.name.rsplit("-", 1)[1]))
        for old in existing[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return checkpoint


@dataclass
class RunLog:
    """What a training run accumulates step by step (curves, history, token and time totals)."""

    log_history: list[dict] = field(default_factory=list)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    real_tokens: int = 0
    slots: int = 0
    train_seconds: float = 0.0
    # CPU time of this process (all threads): steadier than wall time on a shared machine.
    train_cpu_seconds: float = 0.0


def _micro_batches(train_plan: BatchPlan) -> Iterator[Batch]:
    """Micro-batches epoch after epoch, until an epoch yields none."""
    epoch = 0
    while True:
        produced = False
        for batch in train_plan.epoch(epoch):
            produced = True
            yield batch
        epoch += 1
        if not produced:
            return


@dataclass
class Optimisation:
    """Optimizer, scheduler and (fp16 only) grad scaler over the trainable parameters."""

    trainable: list
    optimizer: Any
    scheduler: Any
    scaler: Any


def _optimizer_step(model, group: list[Batch], opt: Optimisation, cfg: AxolotlConfig, *,
                    device, autocast_dtype, mask_dtype) -> float:
    """One optimizer step over a gradient-accumulation group; returns the step's loss."""
    import torch

    step_tokens = sum(b.trained_tokens for b in group)
    step_loss = 0.0
    for batch in group:
        tensors = batch.to_tensors(device=device, mask_dtype=mask_dtype)
        loss_sum, n_trained = token_loss_sum(model, tensors, autocast_dtype)
        if not n_trained:
            continue
        loss = loss_sum / max(1, step_tokens)
        (opt.scaler.scale(loss) if opt.scaler else loss).backward()
        step_loss += float(loss.detach())
    if opt.scaler:
        opt.scaler.unscale_(opt.optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(opt.trainable, cfg.max_grad_norm)
    if opt.scaler:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return step_loss


def _record_eval(run: RunLog, step: int, eval_loss: float | None,
                 progress: Callable[[dict], None] | None) -> None:
    if eval_loss is not None:
        run.eval_curve.append((step, eval_loss))
        run.log_history.append({"step": step, "eval_loss": eval_loss})
        if progress:
            progress({"step": step, "eval_loss": eval_loss})


def train_loop(model, cfg: AxolotlConfig, opt: Optimisation, train_plan: BatchPlan,
                val_plan: BatchPlan, out: Path, *, total_steps: int, steps_per_epoch: int,
                device, autocast_dtype, progress: Callable[[dict], None] | None,
                ) -> tuple[RunLog, int, float | None]:
    """Run optimizer steps until `total_steps` (or the data runs out); returns the log, the
    number of steps taken and the final eval loss. Evaluates and checkpoints on the configured
    cadence."""
    import torch

    # A boolean 4-D mask is what SDPA takes directly, in any compute dtype.
    mask_dtype = None
    run = RunLog()
    step = 0
    stream = _micro_batches(train_plan)
    while step < total_steps:
        group: list[Batch] = []
        for _ in range(cfg.gradient_accumulation_steps):
            item = next(stream, None)
            if item is None:
                break
            group.append(item)
        if not group:
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        started_cpu = time.process_time()
        step_loss = _optimizer_step(model, group, opt, cfg, device=device,
                                    autocast_dtype=autocast_dtype, mask_dtype=mask_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        run.train_seconds += time.perf_counter() - started
        run.train_cpu_seconds += time.process_time() - started_cpu
        step += 1
        run.real_tokens += sum(b.real_tokens for b in group)
        run.slots += sum(b.slots for b in group)
        if not math.isfinite(step_loss):
            raise TrainingError(f"training loss became {step_loss} at step {step}",
                                fix="lower learning_rate (e.g. 1e-4) or set max_grad_norm: 1.0",
                                step=step)
        run.loss_curve.append((step, step_loss))
        learning_rate = opt.scheduler.get_last_lr()[0]
        tokens_per_s = run.real_tokens / run.train_seconds if run.train_seconds else 0.0
        if step % cfg.logging_steps == 0 or step == total_steps:
            run.log_history.append({"step": step,
                                    "epoch": round(step / max(1, steps_per_epoch), 4),
                                    "loss": step_loss, "learning_rate": learning_rate})
        if progress:
            progress({"step": step, "total_steps": total_steps, "loss": step_loss,
                      "learning_rate": learning_rate, "tokens_per_s": tokens_per_s})
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
            _record_eval(run, step, evaluate_loss(model, val_plan, device=device,
                                                  autocast_dtype=autocast_dtype,
                                                  mask_dtype=mask_dtype), progress)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            save_checkpoint(model, out, step, max_steps=total_steps,
                             log_history=run.log_history, keep=cfg.save_total_limit)
    eval_loss = evaluate_loss(model, val_plan, device=device, autocast_dtype=autocast_dtype,
                              mask_dtype=mask_dtype)
    _record_eval(run, step, eval_loss, progress)
    return run, step, eval_loss

