"""The training config: a pydantic model of the Axolotl keys tuneloop sets, with errors that say the fix.

One `AxolotlConfig` drives both backends. `to_axolotl_yaml()` renders the YAML that
`axolotl preprocess` / `axolotl train` (0.21) read inside Dockerfile.trainer; `tasks.train.local`
trains the same config with transformers + peft. Defaults live in `include/training/lora.yaml`
(`load_training_config`). Field names are Axolotl's own (`utils/schemas/config.py`,
`peft.py`, `training.py`, `datasets.py`, `integrations.py`), so the rendered YAML needs no
translation. Validation rejects what Axolotl rejects (qlora without 4-bit loading, eval steps with
no validation split, unknown schedulers/optimizers) plus what would silently train the wrong thing
here (bf16 and fp16 together, sample packing without an attention kernel that separates rows,
a sequence_len below the longest row: `check_sequence_len`).
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.core.configs import at_least
from tasks.core.ids import content_hash
from tasks.core.paths import TRAINING_DIR

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = TRAINING_DIR / "lora.yaml"

# transformers.SchedulerType values plus Axolotl's own schedulers (training.py).
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "one_cycle", "rex",
)
# transformers.training_args.OptimizerNames values plus Axolotl's CustomSupportedOptimizers.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit",
    "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
    "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "lomo",
    "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
    "apollo_adamw", "stable_adamw",
    "optimi_adamw", "ao_adamw_4bit", "ao_adamw_8bit", "ao_adamw_fp8", "adopt_adamw",
    "came_pytorch", "muon",
)
# Axolotl's ChatTemplate enum (top-level `chat_template`); `tokenizer_default_fallback_<name>`
# is accepted as well.
CHAT_TEMPLATES = (
    "alpaca", "chatml", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken",
    "gemma", "gemma3", "cohere", "llama3", "llama3_2_vision", "llama4", "phi_3", "phi_35",
    "phi_4", "deepseek_v2", "deepseek_v3", "jamba", "jinja", "qwen_25", "qwen3",
    "tokenizer_default", "exaone", "metharme", "pixtral", "llava", "qwen2_vl",
)
MESSAGE_ROLES = ("system", "user", "assistant", "tool")



class TrainingError(RuntimeError):
    """Training cannot run or failed; `fix` says what to change, `details` carries the numbers."""

    def __init__(self, message: str, *, fix: str = "", **details: Any) -> None:
        super().__init__(f"{message}; {fix}" if fix else message)
        self.fix = fix
        self.details = details


class TrainingConfigError(TrainingError, ValueError):
    """The training config (or its dataset) is invalid; the message names the key and the fix."""


def _closest(value: str, choices: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(value, choices, n=1, cutoff=0.0)
    return match[0] if match else choices[0]


class DatasetSpec(BaseModel):
    """One Axolotl `datasets:` entry: an exported snapshot JSONL in OpenAI/chat_template form."""

    model_config = ConfigDict(extra="forbid")

    path: str
    type: str = "chat_template"
    ds_type: str | None = "json"
    split: str | None = None
    field_messages: str = "messages"
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"}
    )
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"])
    train_on_eos: Literal["turn", "all", "last"] = "turn"
    chat_template: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "datasets[].path is empty; set path: <data_dir>/exports/<dataset_id>.jsonl "
                "(the exported snapshot)"
            )
        return value

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value != "chat_template":
            raise ValueError(
                f"datasets[].type {value!r} is not supported: tuneloop exports OpenAI-style "
                "messages; set type: chat_template"
            )
        return value

    @field_validator("roles_to_train")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        unknown = [r for r in value if r not in MESSAGE_ROLES]
        if not value or unknown:
            raise ValueError(
                f"roles_to_train {value!r} must be a non-empty subset of {list(MESSAGE_ROLES)}; "
                "set roles_to_train: [assistant]"
            )
        return value


class AxolotlConfig(BaseModel):
    """The Axolotl keys tuneloop sets. Unknown keys are rejected (a typo would be ignored by
    Axolotl and silently train with a default)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer_type: str | None = None
    adapter: Literal["lora", "qlora"] = "lora"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    lora_target_linear: bool | None = None

    sequence_len: int = 1024
    sample_packing: bool = False
    eval_sample_packing: bool | None = None
    pad_to_sequence_len: bool | None = None
    flash_attention: bool | None = None
    sdp_attention: bool | None = None

    chat_template: str = "tokenizer_default_fallback_chatml"
    chat_template_jinja: str | None = None
    datasets: list[DatasetSpec] = Field(default_factory=list)
    dataset_prepared_path: str | None = None
    val_set_size: float = 0.05
    train_on_inputs: bool = False

    num_epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch_fused"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool | Literal["auto"] = "auto"
    fp16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 42

    output_dir: str = "./outputs/tuneloop-lora"
    logging_steps: int = 1
    save_steps: int | None = None
    save_total_limit: int | None = None
    eval_steps: int | None = None
    include_tokens_per_second: bool = True

    use_mlflow: bool | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = "tuneloop-training"
    mlflow_run_name: str | None = None
    hf_mlflow_log_artifacts: bool = False

    special_tokens: dict[str, str] | None = None

    # ---- field-level checks (each message carries the fix) ---------------------------------
    @field_validator("lora_r")
    @classmethod
    def _lora_r(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"lora_r must be > 0 (got {value}); set lora_r: 16 for a small adapter")
        return value

    @field_validator("lora_alpha")
    @classmethod
    def _lora_alpha(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(
                f"lora_alpha must be > 0 (got {value}); set lora_alpha: 32 (about 2 x lora_r)"
            )
        return value

    @field_validator("lora_dropout")
    @classmethod
    def _lora_dropout(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"lora_dropout must be in [0, 1) (got {value}); set lora_dropout: 0.05"
            )
        return value

    @field_validator("sequence_len")
    @classmethod
    def _sequence_len(cls, value: int) -> int:
        if value < 16:
            raise ValueError(
                f"sequence_len must be >= 16 tokens (got {value}); set sequence_len: 1024"
            )
        return value

    @field_validator("val_set_size")
    @classmethod
    def _val_set_size(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"val_set_size is the held-out fraction and must be in [0, 1) (got {value}); "
                "set val_set_size: 0.05"
            )
        return value

    @field_validator("num_epochs")
    @classmethod
    def _num_epochs(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"num_epochs must be > 0 (got {value}); set num_epochs: 1")
        return value

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(
                f"max_steps must be > 0 when set (got {value}); remove it to train num_epochs, "
                "or set max_steps: 100"
            )
        return value

    @field_validator("micro_batch_size", "gradient_accumulation_steps", "logging_steps")
    @classmethod
    def _at_least_one(cls, value: int, info: ValidationInfo) -> int:
        return at_least(value, 1, info.field_name, 1)

    @field_validator("save_steps", "eval_steps", "save_total_limit")
    @classmethod
    def _positive_or_none(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1 when set (got {value}); remove it "
                             f"or set {info.field_name}: 50")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, value: int) -> int:
        return at_least(value, 0, "warmup_steps", 10)

    @field_validator("learning_rate")
    @classmethod
    def _learning_rate(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"learning_rate must be > 0 (got {value}); set learning_rate: 2e-4")
        return value

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay(cls, value: float) -> float:
        return at_least(value, 0, "weight_decay", 0.0)

    @field_validator("lr_scheduler")
    @classmethod
    def _lr_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(
                f"unknown lr_scheduler {value!r}; set lr_scheduler: "
                f"{_closest(value, LR_SCHEDULERS)} (one of {', '.join(LR_SCHEDULERS)})"
            )
        return value

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {value!r}; set optimizer: {_closest(value, OPTIMIZERS)} "
                "(e.g. adamw_torch_fused, adamw_torch, paged_adamw_8bit)"
            )
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str) -> str:
        fallback = "tokenizer_default_fallback_"
        name = value[len(fallback):] if value.startswith(fallback) else value
        if name not in CHAT_TEMPLATES:
            raise ValueError(
                f"unknown chat_template {value!r}; set chat_template: "
                "tokenizer_default_fallback_chatml (or chatml, tokenizer_default, jinja with "
                "chat_template_jinja)"
            )
        return value

    # ---- cross-field checks ------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _mlflow_on_when_uri_set(cls, data: Any) -> Any:
        # Axolotl turns its MLflow callback on from use_mlflow; a URI alone means "log there".
        if isinstance(data, dict) and data.get("mlflow_tracking_uri") and data.get(
                "use_mlflow") is None:
            data = {**data, "use_mlflow": True}
        return data

    @model_validator(mode="after")
    def _combinations(self) -> AxolotlConfig:
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError(
                "adapter: qlora requires load_in_4bit: true; set load_in_4bit: true "
                "(or use adapter: lora)"
            )
        if self.adapter == "qlora" and self.load_in_8bit:
            raise ValueError(
                "adapter: qlora cannot load the base model in 8-bit; set load_in_8bit: false"
            )
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError(
                "load_in_4bit and load_in_8bit are both true; keep one (load_in_4bit: true with "
                "adapter: qlora, or load_in_8bit: true with adapter: lora)"
            )
        if self.adapter == "lora" and self.load_in_4bit:
            raise ValueError(
                "load_in_4bit: true trains a QLoRA adapter; set adapter: qlora "
                "(or load_in_4bit: false)"
            )
        if self.bf16 is True and self.fp16:
            raise ValueError(
                "bf16 and fp16 are both true; pick one mixed precision: set fp16: false "
                "(bf16 on Ampere or newer) or bf16: false"
            )
        if self.flash_attention and self.sdp_attention:
            raise ValueError(
                "flash_attention and sdp_attention are both true; keep one: set "
                "sdp_attention: false"
            )
        if self.sample_packing and not (self.flash_attention or self.sdp_attention):
            raise ValueError(
                "sample_packing: true without flash_attention or sdp_attention lets packed rows "
                "attend to each other (cross-contamination); set flash_attention: true "
                "(or sdp_attention: true, or sample_packing: false)"
            )
        if not self.lora_target_modules and not self.lora_target_linear:
            raise ValueError(
                "lora_target_modules is empty; set lora_target_modules: "
                "[q_proj, k_proj, v_proj, o_proj] (or lora_target_linear: true)"
            )
        if not self.datasets:
            raise ValueError(
                "datasets is empty; add the exported snapshot: datasets: "
                "[{path: <data_dir>/exports/<dataset_id>.jsonl, type: chat_template}]"
            )
        if self.eval_steps and self.val_set_size == 0:
            raise ValueError(
                "eval_steps is set but val_set_size is 0, so there is nothing to evaluate; "
                "set val_set_size: 0.05 (or remove eval_steps)"
            )
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            raise ValueError(
                "chat_template: jinja requires chat_template_jinja; set chat_template_jinja to "
                "the template text, or chat_template: tokenizer_default_fallback_chatml"
            )
        if self.hf_mlflow_log_artifacts and not self.mlflow_tracking_uri:
            raise ValueError(
                "hf_mlflow_log_artifacts: true needs mlflow_tracking_uri; set "
                "mlflow_tracking_uri: http://mlflow:5000 (or hf_mlflow_log_artifacts: false)"
            )
        return self

    # ---- rendering ---------------------------------------------------------------------------
    def to_axolotl_dict(self) -> dict[str, Any]:
        """The config as Axolotl reads it: unset (None) keys left out so Axolotl's defaults apply."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["datasets"] = [d.model_dump(mode="json", exclude_none=True) for d in self.datasets]
        return data

    def to_axolotl_yaml(self) -> str:
        """YAML for `axolotl preprocess|train <file>` (keys in a stable, readable order)."""
        return yaml.safe_dump(self.to_axolotl_dict(), sort_keys=False, default_flow_style=None,
                              allow_unicode=True, width=100)

    @classmethod
    def from_yaml(cls, text: str) -> AxolotlConfig:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise TrainingConfigError("training config YAML is not a mapping",
                                      fix="write key: value pairs, e.g. lora_r: 16")
        return _validate(data, source="<yaml>")

    def with_overrides(self, **overrides: Any) -> AxolotlConfig:
        """A validated copy with some keys changed (model_copy(update=) would skip validation)."""
        return _validate(_merge(self.model_dump(mode="json"), overrides), source="overrides")

    def config_hash(self) -> str:
        """Content hash of the full config: the same settings give the same hash."""
        return content_hash(self.to_axolotl_dict())

    def dataset_paths(self) -> list[Path]:
        return [Path(d.path) for d in self.datasets]


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = tuple(AxolotlConfig.model_fields) + tuple(DatasetSpec.model_fields)
            key = str(err["loc"][-1])
            msg = (f"unknown key {key!r} (Axolotl would ignore it); did you mean "
                   f"{_closest(key, known)}?")
        lines.append(f"{loc}: {msg}")
    return "\n  ".join(lines)


def _validate(data: dict[str, Any], *, source: str) -> AxolotlConfig:
    try:
        return AxolotlConfig.model_validate(data)
    except ValidationError as exc:
        raise TrainingConfigError(
            f"invalid training config ({source}):\n  {_format_validation_error(exc)}"
        ) from None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:  # lists (datasets, target modules) replace rather than extend
            merged[key] = copy.deepcopy(value)
    return merged


def load_training_config(
    overrides: dict[str, Any] | None = None, path: Path | None = None
) -> AxolotlConfig:
    """Defaults from include/training/lora.yaml (or `path`), deep-merged with `overrides`.

    Raises TrainingConfigError listing every bad key with its fix.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not path.exists():
        raise TrainingConfigError(f"training config {path} does not exist",
                                  fix=f"create it or pass path={DEFAULT_CONFIG_PATH}")
    base = yaml.safe_load(path.read_text()) or {}
    if not isinstance(base, dict):
        raise TrainingConfigError(f"training config {path} is not a YAML mapping",
                                  fix="write key: value pairs, e.g. lora_r: 16")
    data = _merge(base, overrides or {})
    return _validate(data, source=str(path))


def suggest_sequence_len(longest_tokens: int) -> int:
    """The next multiple of 64 at or above the longest row (GPU-friendly shapes)."""
    return max(64, -(-longest_tokens // 64) * 64)


