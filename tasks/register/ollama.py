"""Ollama export: a Modelfile (FROM base, ADAPTER, TEMPLATE, stops, PARAMETERs) for an adapter.

Ollama runs GGUF models; a LoRA adapter is applied with `ADAPTER`. This module

- translates a ChatML Jinja chat template (SmolLM2's, tinycoder's) into Ollama's Go template,
  keeping the template's default system prompt as `SYSTEM`;
- converts a PEFT LoRA adapter on a Llama-architecture base to a GGUF LoRA adapter with the
  `gguf` package (the same tensor layout llama.cpp's convert_lora_to_gguf.py writes: per target
  weight `<gguf name>.lora_a` / `.lora_b`, q/k rows permuted like the base conversion,
  `adapter.lora.alpha` so llama.cpp's scale alpha/rank equals PEFT's);
- optionally merges the adapter into the base as a safetensors model;
- converts that merged model to a full GGUF only where llama.cpp's convert_hf_to_gguf.py is on
  PATH; where it is not, the returned dict and README.txt say so, with the command to run.

Nothing here talks to an Ollama server; `ollama create <name> -f Modelfile` is the next step.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.weights import (
    resolve_base_model,
    shipped_base_gguf,
)

log = logging.getLogger(__name__)

CHATML_STOP_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_PARAMETERS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "num_ctx": 2048}
ADAPTER_GGUF_NAME = "adapter.gguf"

# Ollama's Go template for ChatML. Works for /api/chat (.Messages, incl. the SYSTEM message
# Ollama prepends) and /api/generate (.System/.Prompt/.Response).
CHATML_OLLAMA_TEMPLATE = (
    "{{- if .Messages }}\n"
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ if and (ne .Role \"assistant\") $last }}<|im_start|>assistant\n"
    "{{ end }}\n"
    "{{- end }}\n"
    "{{- else }}\n"
    "{{- if .System }}<|im_start|>system\n"
    "{{ .System }}<|im_end|>\n"
    "{{ end }}{{ if .Prompt }}<|im_start|>user\n"
    "{{ .Prompt }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
    "{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"
)

# HF Llama q/k weights are stored with rotary halves interleaved differently from GGUF; the
# base conversion permutes their rows, so a LoRA B matrix (rows = outputs) must match.
_PERMUTED = {"q_proj": "q", "k_proj": "k"}
_LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}


class OllamaExportError(RuntimeError):
    """The adapter cannot be exported as asked; the message says what to change or run."""

    def __init__(self, message: str, *, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command


# ---- chat template -----------------------------------------------------------------------------

def is_chatml(chat_template: str) -> bool:
    return "<|im_start|>" in chat_template and "<|im_end|>" in chat_template


def default_system_prompt(chat_template: str) -> str | None:
    """The system prompt a ChatML Jinja template injects when a conversation has none."""
    match = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", chat_template,
                      flags=re.DOTALL)
    if not match or "{{" in match.group(1) or "message" in match.group(1):
        return None
    return match.group(1).replace("\\n", "\n")


def to_ollama_template(chat_template: str) -> str:
    """Translate a Hugging Face Jinja chat template into Ollama's Go template syntax."""
    if is_chatml(chat_template):
        return CHATML_OLLAMA_TEMPLATE
    raise OllamaExportError(
        "only ChatML chat templates (<|im_start|>role ... <|im_end|>) are translated to "
        "Ollama's Go template; pass template=<a Go template> to write_modelfile for this model "
        "(see https://github.com/ollama/ollama/blob/main/docs/template.md)"
    )


def stop_tokens_for(chat_template: str) -> list[str]:
    return list(CHATML_STOP_TOKENS) if is_chatml(chat_template) else []


# ---- Modelfile ---------------------------------------------------------------------------------

def _quote(value: str) -> str:
    if '"""' in value:
        raise OllamaExportError('a Modelfile block cannot contain """; remove it from the text')
    return f'"""{value}"""'


def _path_ref(path: str | Path, out_dir: Path) -> str:
    """Paths inside out_dir are written relative (./x) so the export folder can move."""
    text = str(path)
    candidate = Path(text)
    if not candidate.is_absolute() and not text.startswith("."):
        return text  # an Ollama tag such as smollm2:135m
    try:
        return "./" + str(candidate.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(candidate.resolve()) if candidate.exists() else text


def _format_parameter(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and (" " in value or '"' in value):
        return json.dumps(value)
    return str(value)


def render_modelfile(
    *,
    base: str,
    adapter: str | None,
    template: str | None,
    system: str | None,
    stop_tokens: Sequence[str],
    parameters: Mapping[str, Any],
    header: str | None = None,
) -> str:
    """The Modelfile text (pure; write_modelfile decides paths and writes it)."""
    lines: list[str] = []
    if header:
        lines.extend(f"# {line}".rstrip() for line in header.splitlines())
    lines.append(f"FROM {base}")
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template:
        lines.append(f"TEMPLATE {_quote(template)}")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for token in stop_tokens:
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    for key, value in parameters.items():
        if key == "stop":
            continue
        lines.append(f"PARAMETER {key} {_format_parameter(value)}")
    return "\n".join(lines) + "\n"


def write_modelfile(
    adapter_dir: Path | str | None,
    base_model_name: str,
    chat_template: str | None,
    out_dir: Path | str,
    *,
    stop_tokens: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    system: str | None = None,
    template: str | None = None,
) -> Path:
    """Write `<out_dir>/Modelfile` and return its path.

    `base_model_name` is an Ollama tag (`smollm2:135m`) or a GGUF path; `adapter_dir` a GGUF
    LoRA file or a safetensors adapter folder (Ollama accepts both for Llama-family models), or
    None for the base alone. The Jinja `chat_template` is translated to a Go TEMPLATE unless
    `template` is given; stop tokens default to the template's (ChatML: <|im_start|>,
    <|im_end|>); `parameters` override temperature/top_p/num_ctx defaults; `system` defaults to
    the template's built-in system prompt.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if template is None and chat_template:
        template = to_ollama_template(chat_template)
    if stop_tokens is None:
        stop_tokens = stop_tokens_for(chat_template or "")
    if system is None and chat_template:
        system = default_system_prompt(chat_template)
    merged_parameters = {**DEFAULT_PARAMETERS, **(parameters or {})}
    for key, value in merged_parameters.items():
        if key in {"temperature", "top_p"} and not 0 <= float(value) <= (2 if key == "temperature"
                                                                           else 1):
            raise OllamaExportError(
                f"PARAMETER {key}={value} is out of range; use e.g. temperature 0.7, top_p 0.9"
            )
        if key == "num_ctx" and int(value) < 1:
            raise OllamaExportError("PARAMETER num_ctx must be >= 1; use e.g. num_ctx 2048")
    text = render_modelfile(
        base=_path_ref(base_model_name, out),
        adapter=_path_ref(adapter_dir, out) if adapter_dir is not None else None,
        template=template, system=system, stop_tokens=list(stop_tokens),
        parameters=merged_parameters,
        header="Generated by tuneloop (tasks/register/ollama.py). Create the model with:\n"
               "  ollama create <name> -f Modelfile",
    )
    path = out / "Modelfile"
    path.write_text(text)
    return path


# ---- LoRA -> GGUF ------------------------------------------------------------------------------

def permute_rows(weights, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's LlamaModel.permute: reorder q/k output rows from HF to GGUF rotary layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return (weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.numpy import load_file

    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise OllamaExportError(
            f"{adapter_dir} is not a PEFT adapter folder (needs adapter_config.json and "
            "adapter_model.safetensors); pass TrainResult.adapter_dir or materialize_adapter()"
        )
    return json.loads(config_path.read_text()), load_file(str(weights_path))


def _base_config(base_model: str | Path) -> dict[str, Any]:
    path = resolve_base_model(str(base_model))
    return json.loads((Path(path) / "config.json").read_text())


def convert_lora_to_gguf(adapter_dir: Path | str, base_model: str | Path,
                         out_path: Path | str) -> Path:
    """Write a llama.cpp/Ollama GGUF LoRA adapter from a PEFT adapter on a Llama-family base.

    Raises OllamaExportError for what llama.cpp LoRA adapters cannot express (DoRA, embedding
    LoRA, modules_to_save, non-Llama bases), naming llama.cpp's converter as the alternative.
    """
    import numpy as np
    from gguf import MODEL_ARCH, GGUFType, GGUFWriter, Keys, get_tensor_name_map

    adapter_dir = Path(adapter_dir)
    peft_config, tensors = _read_adapter(adapter_dir)
    base_config = _base_config(base_model)
    command = (f"python convert_lora_to_gguf.py --base <hf base folder> "
               f"--outfile {out_path} {adapter_dir}")
    architectures = set(base_config.get("architectures") or [])
    if not architectures & _LLAMA_ARCHITECTURES:
        raise OllamaExportError(
            f"the built-in LoRA→GGUF converter handles Llama-family bases, not "
            f"{sorted(architectures)}; run llama.cpp's converter: {command}", command=command,
        )
    if peft_config.get("use_dora"):
        raise OllamaExportError("DoRA adapters have no GGUF LoRA form; train with use_dora: "
                                "false", command=command)
    if peft_config.get("modules_to_save"):
        raise OllamaExportError(
            "adapters with modules_to_save carry full weights that a GGUF LoRA cannot hold; "
            "merge instead (merge_adapter) and convert the merged model", command=command)
    rank = int(peft_config.get("r") or 0)
    alpha = float(peft_config.get("lora_alpha") or rank)
    if rank <= 0:
        raise OllamaExportError("adapter_config.json has no positive r; re-save the adapter")
    if peft_config.get("use_rslora"):
        # PEFT scales by alpha/sqrt(r); llama.cpp by alpha/r — fold sqrt(r) into alpha.
        alpha = alpha * math.sqrt(rank)
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise OllamaExportError("per-module rank/alpha patterns are not supported in a GGUF "
                                "LoRA; train with one lora_r/lora_alpha", command=command)

    n_layers = int(base_config["num_hidden_layers"])
    n_head = int(base_config["num_attention_heads"])
    n_head_kv = int(base_config.get("num_key_value_heads") or n_head)
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)

    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not match:
            raise OllamaExportError(
                f"adapter tensor {key!r} is not a LoRA A/B matrix (embedding LoRA or extra "
                "weights); target only linear layers (q/k/v/o/gate/up/down_proj)",
                command=command,
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = value

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out_path), arch="llama")
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"tuneloop LoRA ({adapter_dir.name})")
    count = 0
    for module in sorted(pairs):
        pair = pairs[module]
        if set(pair) != {"A", "B"}:
            raise OllamaExportError(f"adapter module {module} lacks its lora_A or lora_B weight")
        gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise OllamaExportError(
                f"no GGUF tensor matches adapter module {module!r}; drop it from "
                "target_modules or convert with llama.cpp", command=command)
        lora_a = np.ascontiguousarray(pair["A"], dtype=np.float32)
        lora_b = np.ascontiguousarray(pair["B"], dtype=np.float32)
        leaf = module.rsplit(".", 1)[-1]
        if _PERMUTED.get(leaf) == "q":
            lora_b = permute_rows(lora_b, n_head, n_head)
        elif _PERMUTED.get(leaf) == "k":
            lora_b = permute_rows(lora_b, n_head, n_head_kv)
        writer.add_tensor(f"{gguf_name}.lora_a", lora_a)
        writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(lora_b))
        count += 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote GGUF LoRA %s (%d tensors, alpha %.3g, r %d)", out_path, count, alpha, rank)
    return out_path


# ---- merge and full-model GGUF -----------------------------------------------------------------

def merge_adapter(adapter_dir: Path | str, base_model: str | Path, out_dir: Path | str) -> Path:
    """Merge the LoRA into the base weights; write a standalone safetensors model + tokenizer."""

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = resolve_base_model(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_path))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer_source = Path(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json"
                                             ).is_file() else base_path
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out))
    return out


def find_llama_cpp_converter(script: str = "convert_hf_to_gguf.py") -> list[str] | None:
    """The command prefix for a llama.cpp converter on PATH (or LLAMA_CPP_DIR), else None."""
    import os

    for candidate in (script, script.removesuffix(".py"), script.replace("_", "-")):
        found = shutil.which(candidate)
        if found:
            return [sys.executable, found] if found.endswith(".py") else [found]
    root = os.environ.get("LLAMA_CPP_DIR")  # the conventional place to point at a checkout
    if root and (Path(root) / script).is_file():
        return [sys.executable, str(Path(root) / script)]
    return None


def convert_merged_to_gguf(merged_dir: Path, out_path: Path) -> dict[str, Any]:
    """Run llama.cpp's convert_hf_to_gguf.py when available; report plainly when it is not."""
    command = f"python convert_hf_to_gguf.py {merged_dir} --outfile {out_path} --outtype f16"
    prefix = find_llama_cpp_converter()
    if prefix is None:
        return {"status": "unavailable", "path": None, "command": command,
                "reason": "llama.cpp's convert_hf_to_gguf.py is not on PATH (set LLAMA_CPP_DIR "
                          "to a llama.cpp checkout or run the command by hand)"}
    proc = subprocess.run([*prefix, str(merged_dir), "--outfile", str(out_path),
                           "--outtype", "f16"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"status": "failed", "path": None, "command": command,
                "reason": proc.stderr.strip()[-2000:]}
    return {"status": "ok", "path": str(out_path), "command": command, "reason": ""}


# ---- one-call export ---------------------------------------------------------------------------

def export_ollama(
    adapter_dir: Path | str,
    base_model: str,
    out_dir: Path | str,
    *,
    chat_template: str | None = None,
    ollama_from: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    merge: bool = False,
) -> dict[str, Any]:
    """Export an adapter for Ollama: Modelfile + GGUF LoRA (+ merged model), README.txt.

    `ollama_from` overrides FROM (an Ollama tag); by default FROM is the base's shipped GGUF.
    Returns {"modelfile", "adapter", "adapter_format", "gguf": {...}, "merged_dir",
    "merged_gguf": {...}, "readme"} — every path a string, JSON-able.
    """
    adapter_dir = Path(adapter_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if chat_template is None:
        template_file = adapter_dir / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text()
        else:
            from transformers import AutoTokenizer

            chat_template = AutoTokenizer.from_pretrained(
                str(resolve_base_model(base_model))).chat_template
    if not chat_template:
        raise OllamaExportError(
            f"no chat template for {base_model}; pass chat_template= (TrainResult.chat_template)")

    notes: list[str] = []
    base_gguf = shipped_base_gguf(base_model)
    from_ref = ollama_from or (str(base_gguf) if base_gguf else None)
    if from_ref is None:
        from_ref = base_model
        notes.append(f"FROM {base_model}: no GGUF of this base is shipped; replace FROM with an "
                     "Ollama tag or a GGUF path (python convert_hf_to_gguf.py <base folder>).")

    gguf_result: dict[str, Any] = {"status": "ok", "converter": "tuneloop (gguf package)"}
    adapter_ref: Path
    try:
        adapter_ref = convert_lora_to_gguf(adapter_dir, base_model, out / ADAPTER_GGUF_NAME)
        gguf_result["path"] = str(adapter_ref)
        adapter_format = "gguf"
    except OllamaExportError as exc:
        gguf_result = {"status": "unavailable", "path": None, "reason": str(exc),
                       "command": exc.command}
        adapter_ref = out / "adapter"
        shutil.rmtree(adapter_ref, ignore_errors=True)
        shutil.copytree(adapter_dir, adapter_ref)
        adapter_format = "safetensors"
        notes.append(f"GGUF LoRA conversion not done: {exc}. The Modelfile points ADAPTER at "
                     "the safetensors adapter folder, which Ollama imports for Llama/Mistral/"
                     "Gemma bases.")

    modelfile = write_modelfile(adapter_ref, from_ref, chat_template, out,
                                parameters=parameters)
    merged_dir: Path | None = None
    merged_gguf: dict[str, Any] = {"status": "skipped", "path": None,
                                   "reason": "merge=False", "command": None}
    if merge:
        merged_dir = merge_adapter(adapter_dir, base_model, out / "merged")
        merged_gguf = convert_merged_to_gguf(merged_dir, out / "merged.gguf")
        if merged_gguf["status"] != "ok":
            notes.append(f"Merged model GGUF {merged_gguf['status']}: {merged_gguf['reason']}. "
                         f"Run: {merged_gguf['command']}")
    readme = out / "README.txt"
    readme.write_text(_readme(modelfile, adapter_format, gguf_result, merged_dir, merged_gguf,
                              notes))
    return {
        "modelfile": str(modelfile), "adapter": str(adapter_ref),
        "adapter_format": adapter_format, "gguf": gguf_result,
        "merged_dir": str(merged_dir) if merged_dir else None, "merged_gguf": merged_gguf,
        "readme": str(readme), "from": from_ref,
    }


def _readme(modelfile: Path, adapter_format: str, gguf_result: Mapping[str, Any],
            merged_dir: Path | None, merged_gguf: Mapping[str, Any], notes: list[str]) -> str:
    lines = [
        "tuneloop Ollama export",
        "======================",
        f"Modelfile: {modelfile.name}",
        f"Adapter format: {adapter_format}",
        f"GGUF LoRA conversion: {gguf_result['status']}"
        + (f" ({gguf_result.get('converter')})" if gguf_result["status"] == "ok" else ""),
    ]
    if gguf_result["status"] != "ok":
        lines.append(f"  reason: {gguf_result.get('reason')}")
        if gguf_result.get("command"):
            lines.append(f"  to convert by hand: {gguf_result['command']}")
    if merged_dir is not None:
        lines.append(f"Merged safetensors model: {merged_dir}")
    lines.append(f"Merged model GGUF: {merged_gguf['status']}"
                 + (f" — {merged_gguf['reason']}" if merged_gguf.get("reason") else ""))
    if merged_gguf.get("command") and merged_gguf["status"] != "ok":
        lines.append(f"  to convert by hand: {merged_gguf['command']}")
    lines += ["", "Next step:", f"  cd {modelfile.parent} && ollama create <name> -f Modelfile"]
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
