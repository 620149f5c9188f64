"""Local trainer: the Axolotl config trained with transformers + peft on CPU (or a local GPU).

A plain torch loop, because packing needs exact control: rows are bin-packed into
`sequence_len` slots (first-fit-decreasing), each packed row gets position ids restarting at 0
and a block-diagonal causal mask (SDPA with an explicit 4-D mask), and targets are shifted inside
each row, so packed rows neither attend to nor predict each other. Loss is the token-mean
cross-entropy over assistant tokens across the whole gradient-accumulation step (the same
normalisation as HF's `num_items_in_batch`); logits are computed only at trained positions.

Output folder (the same layout `tasks.train.container.collect_axolotl_output` writes for the GPU
container): `adapter/` (PEFT adapter_config.json + adapter_model.safetensors + tokenizer with its
chat template), `chat_template.jinja`, `axolotl.yaml`, `metrics.json`, `trainer_state.json`
(HF-style log_history: loss curve, eval curve) and `checkpoints/checkpoint-<step>/`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.ids import content_hash
from tasks.train.config import (
    AxolotlConfig,
    TrainingConfigError,
    TrainingError,
    load_training_config,
    suggest_sequence_len,
)
from tasks.train.data import (
    EncodedRow,
    encode_conversation,
    end_of_turn_marker,
    load_conversations,
    resolve_chat_template,
    split_rows,
)
from tasks.train.loop import (
    STATE_FILENAME,
    BatchPlan,
    Optimisation,
    RunLog,
    train_loop,
    write_state,
)

log = logging.getLogger(__name__)

ADAPTER_DIRNAME = "adapter"
METRICS_FILENAME = "metrics.json"
CONFIG_FILENAME = "axolotl.yaml"
TEMPLATE_FILENAME = "chat_template.jinja"

# Schedulers transformers.get_scheduler builds without extra state; the rest are Axolotl-only.
LOCAL_SCHEDULERS = {
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
}
_ADAMW_FAMILY = {
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "adamw_bnb_8bit", "adamw_8bit",
    "paged_adamw_32bit", "paged_adamw_8bit", "optimi_adamw", "ao_adamw_4bit", "ao_adamw_8bit",
    "ao_adamw_fp8", "stable_adamw",
}


@dataclass
class TrainResult:
    """What a training run produced. `metrics` holds numbers only (ready for mlflow.log_metrics)."""

    adapter_dir: Path
    metrics: dict[str, float]
    loss_curve: list[tuple[int, float]]
    eval_curve: list[tuple[int, float]]
    config_yaml_path: Path
    chat_template: str
    output_dir: Path
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Small JSON-able summary for XCom (curves stay in trainer_state.json)."""
        return {
            "output_dir": str(self.output_dir),
            "adapter_dir": str(self.adapter_dir),
            "config_yaml_path": str(self.config_yaml_path),
            "metrics": dict(self.metrics),
            "info": dict(self.info),
        }


# ---- helpers ----------------------------------------------------------------------------------
def _base_model_dir(base_model: str) -> Path:
    from tasks.core.weights import resolve_base_model

    try:
        return resolve_base_model(base_model)
    except ValueError as exc:
        raise TrainingConfigError(str(exc), base_model=base_model) from None


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _precision(cfg: AxolotlConfig) -> tuple[Any, Any, Any]:
    """(device, model dtype, autocast dtype or None).

    On CPU the frozen base model is held in bfloat16 when `bf16` is true, or `auto` and the CPU
    computes bf16 natively (AVX512-BF16 / AMX: a LoRA step on SmolLM2 ran 1.7x faster than in
    float32, bench/dtype.py); the LoRA weights and their optimizer state stay float32 (peft upcasts adapters) and
    the loss is taken in float32. Otherwise, and for fp16, CPU training is float32.
    """
    import torch

    if not torch.cuda.is_available():
        from tasks.core.weights import cpu_has_native_bf16

        if cfg.bf16 is True or (cfg.bf16 == "auto" and cpu_has_native_bf16()):
            if cfg.bf16 is True and not cpu_has_native_bf16():
                log.info("bf16 requested on a CPU without native bf16: emulated, and slow")
            return torch.device("cpu"), torch.bfloat16, None
        if cfg.fp16:
            log.info("fp16 requested but training on CPU: using float32")
        return torch.device("cpu"), torch.float32, None
    device = torch.device("cuda")
    if cfg.fp16:
        return device, torch.float32, torch.float16
    if cfg.bf16 is True or (cfg.bf16 == "auto" and torch.cuda.is_bf16_supported()):
        return device, torch.bfloat16, torch.bfloat16
    return device, torch.float32, None


def _build_optimizer(cfg: AxolotlConfig, params: list) -> Any:
    import torch

    name = cfg.optimizer
    if name in _ADAMW_FAMILY:
        if name not in ("adamw_torch", "adamw_torch_fused"):
            log.info("optimizer %s runs as torch AdamW on the local backend", name)
        fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                         relative_step=False, scale_parameter=False, warmup_init=False)
    raise TrainingConfigError(
        f"optimizer {name!r} is not available on the local backend",
        fix="set optimizer: adamw_torch (or train with backend docker/kubernetes)")


def _build_scheduler(cfg: AxolotlConfig, optimizer: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    if cfg.lr_scheduler not in LOCAL_SCHEDULERS:
        raise TrainingConfigError(
            f"lr_scheduler {cfg.lr_scheduler!r} is Axolotl-only and not available locally",
            fix="set lr_scheduler: cosine (or train with backend docker/kubernetes)")
    kwargs: dict[str, Any] = {}
    if cfg.lr_scheduler in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        kwargs["min_lr_rate"] = 0.1
    return get_scheduler(cfg.lr_scheduler, optimizer,
                         num_warmup_steps=min(cfg.warmup_steps, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)


def _encode_datasets(cfg: AxolotlConfig, tokenizer: Any, template: str) -> tuple[list[EncodedRow],
                                                                                  list[str]]:
    marker = end_of_turn_marker(tokenizer, template)
    rows: list[EncodedRow] = []
    hashes: list[str] = []
    for spec in cfg.datasets:
        path = Path(spec.path)
        conversations = load_conversations(path, field_messages=spec.field_messages)
        hashes.append(content_hash(path.read_bytes()))
        for index, messages in enumerate(conversations):
            row = encode_conversation(
                tokenizer, messages, chat_template=template,
                roles_to_train=spec.roles_to_train, train_on_inputs=cfg.train_on_inputs,
                train_on_eos=spec.train_on_eos, eot_marker=marker)
            if len(row) > cfg.sequence_len:
                suggested = suggest_sequence_len(max(len(row), _longest(cfg, tokenizer, template)))
                raise TrainingConfigError(
                    f"sequence_len {cfg.sequence_len} is below a kept row ({len(row)} tokens, "
                    f"row {index} of {path})",
                    fix=f"set sequence_len: {suggested} (or drop longer rows in curation)",
                    longest_tokens=len(row), row_index=index, suggested_sequence_len=suggested)
            rows.append(row)
    return rows, hashes


def _longest(cfg: AxolotlConfig, tokenizer: Any, template: str) -> int:
    longest = 0
    for spec in cfg.datasets:
        for messages in load_conversations(spec.path, field_messages=spec.field_messages):
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
            longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return longest


# ---- the entry point --------------------------------------------------------------------------


def _attach_lora(cfg: AxolotlConfig, model_dir: Path, model_dtype: Any):
    """The base model with a LoRA adapter attached (the only trainable parameters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if cfg.load_in_4bit or cfg.load_in_8bit:
        log.warning("load_in_4bit/8bit needs bitsandbytes on CUDA; the local backend trains "
                    "the same LoRA on an unquantised base model")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=model_dtype,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if cfg.lora_target_linear else list(cfg.lora_target_modules),
        bias="none", task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise TrainingConfigError(
            f"LoRA could not attach to {cfg.base_model}: {exc}",
            fix="set lora_target_modules to module names of this model "
                "(e.g. [q_proj, k_proj, v_proj, o_proj]) or lora_target_linear: true") from None


def _summary_metrics(run: RunLog, step: int, steps_per_epoch: int, train_rows: int,
                     val_rows: int, eval_loss: float | None) -> dict[str, float]:
    metrics: dict[str, float] = {
        "train_loss": run.loss_curve[-1][1],
        "train_loss_first": run.loss_curve[0][1],
        "train_loss_mean": sum(v for _, v in run.loss_curve) / len(run.loss_curve),
        "tokens_per_s": run.real_tokens / run.train_seconds if run.train_seconds else 0.0,
        "steps": step,
        "packing_efficiency": run.real_tokens / run.slots if run.slots else 0.0,
        "train_rows": train_rows,
        "val_rows": val_rows,
        "train_tokens": run.real_tokens,
        "train_runtime_s": run.train_seconds,
        "train_cpu_s": run.train_cpu_seconds,
        "tokens_per_cpu_s": (run.real_tokens / run.train_cpu_seconds
                             if run.train_cpu_seconds else 0.0),
        "epochs": step / steps_per_epoch if steps_per_epoch else 0.0,
    }
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
        metrics["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
    return metrics


def train_local(
    cfg: AxolotlConfig,
    *,
    output_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter for `cfg` on this machine and write the output folder.

    Raises TrainingConfigError for config/data problems (with the fix), TrainingError when the
    loss diverges to NaN/inf.
    """
    import torch
    from transformers import AutoTokenizer

    out = Path(output_dir or cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.with_overrides(output_dir=str(out))
    _seed_everything(cfg.seed)
    device, model_dtype, autocast_dtype = _precision(cfg)

    model_dir = _base_model_dir(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = resolve_chat_template(cfg, tokenizer)
    tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    rows, dataset_hashes = _encode_datasets(cfg, tokenizer, template)
    train_rows, val_rows = split_rows(rows, cfg.val_set_size, cfg.seed)
    if not train_rows:
        raise TrainingConfigError("no training rows after the validation split",
                                  fix="export more rows or set val_set_size: 0")
    train_plan = BatchPlan(train_rows, cfg, pad_token_id, packing=cfg.sample_packing)
    eval_packing = cfg.sample_packing if cfg.eval_sample_packing is None else cfg.eval_sample_packing
    val_plan = BatchPlan(val_rows, cfg, pad_token_id, packing=eval_packing)

    steps_per_epoch = math.ceil(train_plan.micro_batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_epochs))

    model = _attach_lora(cfg, model_dir, model_dtype)
    model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(cfg, trainable)
    opt = Optimisation(trainable=trainable, optimizer=optimizer,
                        scheduler=_build_scheduler(cfg, optimizer, total_steps),
                        scaler=(torch.amp.GradScaler("cuda")
                                if autocast_dtype == torch.float16 else None))

    log.info("local training: %d train / %d val rows, %d steps, packing=%s, device=%s",
             len(train_rows), len(val_rows), total_steps, cfg.sample_packing, device)
    run, step, eval_loss = train_loop(model, cfg, opt, train_plan, val_plan, out, total_steps=total_steps,
                                       steps_per_epoch=steps_per_epoch, device=device,
                                       autocast_dtype=autocast_dtype, progress=progress)
    metrics = _summary_metrics(run, step, steps_per_epoch, len(train_rows), len(val_rows),
                               eval_loss)
    run.log_history.append({"step": step, "train_loss": metrics["train_loss_mean"],
                            "train_runtime": run.train_seconds,
                            "train_tokens_per_second": metrics["tokens_per_s"]})
    info = {
        "backend": "local",
        "device": str(device),
        "base_model": cfg.base_model,
        "base_model_path": str(model_dir),
        "sample_packing": cfg.sample_packing,
        "config_hash": cfg.config_hash(),
        "dataset_hashes": dataset_hashes,
        "dataset_paths": [d.path for d in cfg.datasets],
    }
    config_path = _write_outputs(out, model, tokenizer, template, cfg, metrics, info, run,
                                 step=step, total_steps=total_steps)
    log.info("local training done: %d steps, loss %.4f → %.4f, eval %s, %.0f tokens/s",
             step, metrics["train_loss_first"], metrics["train_loss"],
             f"{eval_loss:.4f}" if eval_loss is not None else "n/a", metrics["tokens_per_s"])
    return TrainResult(adapter_dir=out / ADAPTER_DIRNAME, metrics=metrics,
                       loss_curve=run.loss_curve, eval_curve=run.eval_curve,
                       config_yaml_path=config_path, chat_template=template, output_dir=out,
                       info=info)


def _write_outputs(out: Path, model, tokenizer, template: str, cfg: AxolotlConfig,
                   metrics: dict[str, float], info: dict[str, Any], run: RunLog, *,
                   step: int, total_steps: int) -> Path:
    """Adapter, tokenizer, chat template, rendered config, metrics and trainer state; returns
    the config path."""
    adapter_dir = out / ADAPTER_DIRNAME
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    (out / TEMPLATE_FILENAME).write_text(template)
    config_path = out / CONFIG_FILENAME
    config_path.write_text(cfg.to_axolotl_yaml())
    (out / METRICS_FILENAME).write_text(json.dumps({**metrics, **{"info": info}}, indent=2))
    write_state(out / STATE_FILENAME, global_step=step, max_steps=total_steps,
                 log_history=run.log_history)
    return config_path


def train_dataset(dataset_path: str, output_dir: str,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DAG-facing stage: defaults + overrides + this snapshot → train locally → small summary."""
    merged = dict(overrides or {})
    merged["datasets"] = [{"path": str(dataset_path)}]
    cfg = load_training_config(merged)
    return train_local(cfg, output_dir=Path(output_dir)).to_dict()


def load_train_result(output_dir: Path | str) -> TrainResult:
    """Read a finished output folder (local trainer or collected container run) back."""
    out = Path(output_dir)
    metrics_path = out / METRICS_FILENAME
    if not metrics_path.exists():
        raise TrainingError(f"{out} has no {METRICS_FILENAME}",
                            fix="train first (train_local, or the trainer container's collect "
                                "step)", output_dir=str(out))
    data = json.loads(metrics_path.read_text())
    info = data.pop("info", {})
    metrics = {k: v for k, v in data.items() if isinstance(v, int | float)}
    state_path = out / STATE_FILENAME
    history = json.loads(state_path.read_text()).get("log_history", []) if state_path.exists() \
        else []
    template_path = out / TEMPLATE_FILENAME
    return TrainResult(
        adapter_dir=out / ADAPTER_DIRNAME,
        metrics=metrics,
        loss_curve=[(int(e["step"]), float(e["loss"])) for e in history if "loss" in e],
        eval_curve=[(int(e["step"]), float(e["eval_loss"])) for e in history if "eval_loss" in e],
        config_yaml_path=out / CONFIG_FILENAME,
        chat_template=template_path.read_text() if template_path.exists() else "",
        output_dir=out,
        info=info,
    )
