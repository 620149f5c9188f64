"""Shared helpers for stage configs: build a pydantic config from Airflow Params with errors
that list every bad field (each validator's message already says the fix)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def http_url(value: str, example: str) -> str:
    """`value` without its trailing slash, if it is an http(s) URL; else the error with `example`."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"base_url {value!r} is not an http(s) URL; use e.g. {example}")
    return value.rstrip("/")


def validation_lines(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}" for e in exc.errors()]


def config_from_params(model: type[ConfigT], params: dict[str, Any] | None,
                       error: type[Exception], label: str) -> ConfigT:
    """`model(**params)` with None values dropped; raise `error` naming every bad field."""
    values = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        return model(**values)
    except ValidationError as exc:
        raise error(f"invalid {label} config:\n  " + "\n  ".join(validation_lines(exc))) from None


def load_yaml_model(path: str, model: type[ConfigT], error: Callable[[str, str], Exception],
                    mapping_hint: str) -> ConfigT:
    """Parse a YAML file into `model`, stamped with its content hash and path.

    `error(path, message)` builds the domain exception; messages say what to fix.
    """
    import yaml

    from tasks.core.ids import content_hash

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise error(path, f"is not valid YAML ({exc}); check indentation") from None
    if not isinstance(raw, dict):
        raise error(path, f"must be a mapping with {mapping_hint}")
    try:
        parsed = model(**raw)
    except ValidationError as exc:
        raise error(path, "; ".join(validation_lines(exc))) from None
    return parsed.model_copy(update={"content_hash": content_hash(raw), "path": path})


def at_least(value: Any, minimum: int, field: str, example: Any) -> Any:
    """A validator body for numeric floors: None passes (optional fields); a value below
    `minimum` raises a message naming the field, what it got and a setting that works."""
    if value is not None and value < minimum:
        raise ValueError(f"{field} must be >= {minimum} (got {value}); set {field}: {example}")
    return value


def split_fraction(value: float) -> float:
    """The validation share of a seeded train/validation split: [0, 0.5)."""
    if not 0.0 <= value < 0.5:
        raise ValueError(f"val_fraction must be within [0, 0.5) (got {value}); "
                         "set val_fraction: 0.1")
    return value


def field_default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].default
