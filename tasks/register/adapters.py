"""What counts as an adapter's own files, and where a base model's weights are on disk.

`stage_adapter` copies only a PEFT adapter's files out of a trainer's output folder (never full
model weights, optimizer or RNG state, checkpoints or GGUF exports), refusing a folder that holds
no adapter so a base model can never be registered by mistake. Base-model weights are found by
`tasks.core.weights.resolve_base_model` (the one resolver).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from tasks.register.tracking import RegistryError

log = logging.getLogger(__name__)

# Files a trainer may leave next to an adapter that must never be uploaded as "the adapter":
# full-model weights, optimizer/scheduler state, RNG state, trainer pickles.
_EXCLUDED_FILE_PATTERNS = (
    re.compile(r"^model(-\d+-of-\d+)?\.safetensors$"),
    re.compile(r"^model\.safetensors\.index\.json$"),
    re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$"),
    re.compile(r"^pytorch_model\.bin\.index\.json$"),
    re.compile(r"^(optimizer|scheduler|scaler)\.pt$"),
    re.compile(r"^rng_state.*\.pth$"),
    re.compile(r"^training_args\.bin$"),
    re.compile(r".*\.gguf$"),
)
_EXCLUDED_DIR_PATTERN = re.compile(r"^(checkpoint-\d+|runs|global_step\d+)$")


def is_excluded_artifact(relative: Path) -> bool:
    """True for files that are not part of an adapter (full weights, optimizer state, ...)."""
    if any(_EXCLUDED_DIR_PATTERN.match(part) for part in relative.parts[:-1]):
        return True
    return any(p.match(relative.name) for p in _EXCLUDED_FILE_PATTERNS)


def stage_adapter(adapter_dir: Path, out_dir: Path) -> list[str]:
    """Copy only the adapter's own files from `adapter_dir` into `out_dir`; return their names.

    Raises RegistryError when the folder holds no PEFT adapter (adapter_config.json and
    adapter weights), so a full model folder can never be registered by mistake.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RegistryError(
            f"{adapter_dir} has no adapter_config.json; pass the PEFT adapter folder written by "
            "model.save_pretrained() (TrainResult.adapter_dir), not a base-model folder"
        )
    weights = [p for p in ("adapter_model.safetensors", "adapter_model.bin")
               if (adapter_dir / p).is_file()]
    if not weights:
        raise RegistryError(
            f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors; the "
            "training run did not finish saving its adapter — rerun the train task"
        )
    copied: list[str] = []
    skipped: list[str] = []
    for path in sorted(adapter_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(adapter_dir)
        if is_excluded_artifact(relative):
            skipped.append(str(relative))
            continue
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(str(relative))
    if skipped:
        log.info("not uploading %d non-adapter files from %s (e.g. %s)", len(skipped),
                 adapter_dir, ", ".join(skipped[:3]))
    return copied


