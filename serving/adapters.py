"""PEFT LoRA adapters served by name on top of the one base model of a `ChatModel`.

An adapter is a folder holding `adapter_config.json` + `adapter_model.safetensors`, found under one
of the adapter roots (`<data_dir>/adapters/<name>/` by default) or registered at runtime with
`register_adapter`; the model id `<base>:<adapter>` selects it. `AdapterRegistry` (a mixin of
`ChatModel`, which provides `model`, `model_name`, `adapter_roots` and the scheduler's
`_exclusive`) lists and resolves adapters, checks each against the base model's layer shapes when
it is resolved, and loads it lazily with peft on first use, reloading it when its weights file
changes; the base is served with the adapters disabled.

The adapter roots are the only folders served from: a registered path must resolve (symlinks
followed) inside one of them, and a root's entry whose symlink leads outside it is ignored, so
whoever may register or drop a folder cannot make the server read an arbitrary directory. What
clients see of an adapter's folder is its path relative to its root (`AdapterInfo.location`);
messages never carry the server's absolute paths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.chat_types import AdapterInfo, ModelServerError
from tasks.core.ids import stable_id

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class _LoadedAdapter:
    peft_name: str  # the name inside peft (must be a valid module key, so no dots)
    path: Path
    version: int  # mtime_ns of the weights file when loaded


def adapter_weights_file(path: Path) -> Path | None:
    for name in ADAPTER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    return None


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and adapter_weights_file(path) is not None


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, ValueError):  # a symlink loop, an embedded NUL byte
        return None


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def resolve_under_roots(path: str | Path, roots: Sequence[Path]) -> tuple[Path, str] | None:
    """(the resolved folder, its path relative to its root) for `path` given relative to an
    adapter root (tried in order; the first root holding an adapter there wins) or absolute;
    None when it resolves, symlinks followed, outside every root (or is a root itself)."""
    path = Path(path)
    inside: list[tuple[Path, str]] = []
    for root in roots:
        resolved_root = _resolved(root)
        if resolved_root is None:
            continue
        candidate = _resolved(path if path.is_absolute() else resolved_root / path)
        if candidate is not None and _inside(candidate, resolved_root):
            inside.append((candidate, candidate.relative_to(resolved_root).as_posix()))
    if not inside:
        return None
    return next((found for found in inside if is_adapter_dir(found[0])), inside[0])


def _base_model_label(value: Any) -> Any:
    """The base model an adapter config names, without the trainer's folder: peft writes the
    local path the base was loaded from, which is nobody's business outside this machine."""
    if isinstance(value, str) and re.match(r"^([/~\\]|[A-Za-z]:[/\\])", value):
        return Path(value.replace("\\", "/")).name
    return value


ROOTS_SETTING = ("the adapter roots (<data_dir>/adapters, i.e. TUNELOOP_DATA_DIR/adapters, and "
                 "each --adapter-root of python -m serving.model_server)")


class AdapterRegistry:
    """The adapters a `ChatModel` may serve: listing, resolving, checking, loading, unloading."""

    # Provided by ChatModel: the base model and its name, the adapter roots, and the scheduler's
    # hold on the model lock between batches.
    model: Any
    model_name: str
    adapter_roots: list[Path]
    _exclusive: Callable[[], contextlib.AbstractContextManager[None]]

    def _init_adapters(self) -> None:
        self._peft: Any = None  # peft.PeftModel once the first adapter is loaded
        self._loaded: dict[str, _LoadedAdapter] = {}
        self._registered: dict[str, tuple[Path, str]] = {}  # name -> (folder, location)
        self._checked: dict[tuple[str, int], None] = {}
        self._escapes_logged: set[Path] = set()
        self._registry_lock = threading.Lock()

    def adapters(self) -> dict[str, AdapterInfo]:
        """Every adapter that can be served: registered ones first, then adapter roots in order.

        A root's entry is served only when it resolves inside that root: a symlink to a folder
        elsewhere is skipped (and logged once)."""
        found: dict[str, AdapterInfo] = {}
        with self._registry_lock:
            registered = dict(self._registered)
        for name, (path, location) in registered.items():
            found[name] = AdapterInfo(name, path, "registered", location=location)
        for root in self.adapter_roots:
            resolved_root = _resolved(root)
            if resolved_root is None or not resolved_root.is_dir():
                continue
            for child in sorted(resolved_root.iterdir()):
                if child.name in found or not ADAPTER_NAME_RE.match(child.name):
                    continue
                target = _resolved(child)
                if target is None or not _inside(target, resolved_root):
                    if child not in self._escapes_logged:
                        self._escapes_logged.add(child)
                        log.warning("ignoring adapter %s: it resolves outside its adapter root "
                                    "%s", child, resolved_root)
                    continue
                if is_adapter_dir(target):
                    found[child.name] = AdapterInfo(child.name, target, "root",
                                                    location=child.name)
        for name, info in found.items():
            info.loaded = name in self._loaded
        return found

    def _location(self, path: Path) -> str:
        """`path` as clients may see it: relative to the adapter root holding it."""
        for root in self.adapter_roots:
            resolved_root = _resolved(root)
            if resolved_root is not None and _inside(path, resolved_root):
                return path.relative_to(resolved_root).as_posix()
        return path.name

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
                f"adapter {adapter!r} not found: no folder {adapter}/ with {ADAPTER_CONFIG} in "
                "an adapter root and none registered with POST /v1/adapters; available models: "
                + ", ".join(self.model_ids()),
                status_code=404, param="model", code="model_not_found",
                available=self.model_ids(),
            )
        raise ModelServerError(
            f"model {model_id!r} does not exist on this server; available models: "
            + ", ".join(self.model_ids()),
            status_code=404, param="model", code="model_not_found", available=self.model_ids(),
        )

    def register_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Serve the adapter folder `path` as `<base>:<name>` (replacing an earlier registration).

        `path` is relative to an adapter root (e.g. `tuneloop-assistant-v3`, or
        `staging/run-12` for a folder the root scan does not serve by itself) or absolute; either
        way it must resolve inside an adapter root, else nothing is registered (a 400)."""
        if not ADAPTER_NAME_RE.match(name or ""):
            raise ModelServerError(
                f"adapter name {name!r} is invalid; use letters, digits, '.', '_' or '-' "
                "(e.g. champion or v3)", param="name",
            )
        found = resolve_under_roots(path, self.adapter_roots)
        if found is None:
            # The given path is echoed only when relative: it then names no server folder.
            given = "an absolute path" if Path(path).is_absolute() else repr(str(path))
            fix = ("put the adapter folder under an adapter root and send its path relative "
                   'to the root, e.g. {"path": "tuneloop-assistant-v3"}' if self.adapter_roots
                   else "this server has none: start it with --adapter-root <folder>")
            raise ModelServerError(
                f"path must lie inside one of {ROOTS_SETTING}, after following symlinks; "
                f"{given} does not: {fix}",
                param="path", code="path_outside_adapter_roots",
            )
        folder, location = found
        if not is_adapter_dir(folder):
            raise ModelServerError(
                f"{location} is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS[0]} (write one with peft's save_pretrained)",
                param="path",
            )
        details = self._check_adapter(name, folder)
        with self._registry_lock:
            self._registered[name] = (folder, location)
        log.info("registered adapter %s -> %s", name, folder)
        return AdapterInfo(name, folder, "registered", location=location,
                           loaded=name in self._loaded, details=details)

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
        where = self._location(path)
        weights = adapter_weights_file(path)
        if weights is None:
            raise ModelServerError(f"adapter {name!r} at {where} has no {ADAPTER_WEIGHTS[0]}",
                                   status_code=404, param="model")
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else exc  # an OSError names the path
            raise ModelServerError(
                f"adapter {name!r}: unreadable {where}/{ADAPTER_CONFIG}: {reason}",
                param="model") from None
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise ModelServerError(
                f"adapter {name!r} at {where} is a {peft_type or 'unknown'} adapter; "
                "only LoRA adapters (peft_type LORA) are served", param="model",
            )
        base_model = _base_model_label(config.get("base_model_name_or_path"))
        details = {"r": config.get("r"), "target_modules": config.get("target_modules"),
                   "base_model_name_or_path": base_model}
        key = (str(path), weights.stat().st_mtime_ns)
        if key in self._checked or weights.suffix != ".safetensors":
            return details
        from safetensors import safe_open

        problems: list[str] = []
        try:
            handle_cm = safe_open(str(weights), framework="pt")
        except Exception as exc:  # a truncated or foreign file
            raise ModelServerError(
                f"adapter {name!r}: unreadable weights {where}/{weights.name}: "
                f"{str(exc).replace(str(path), where)}", param="model") from None
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
                f"adapter {name!r} at {where} does not fit {self.model_name} (was it trained on "
                f"another base model? its config says "
                f"{base_model!r}): " + "; ".join(problems),
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
            where = self._location(path)
            raise ModelServerError(
                f"adapter {adapter!r} at {where} could not be loaded onto {self.model_name}: "
                f"{type(exc).__name__}: {str(exc).replace(str(path), where)}",
                status_code=500, param="model",
            ) from exc
        self._loaded[adapter] = _LoadedAdapter(peft_name, path, version)
        if replacing is not None:
            self._peft.set_adapter(peft_name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._peft.delete_adapter(replacing.peft_name)
