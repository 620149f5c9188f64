"""Shared helpers for stage configs: build a pydantic config from Airflow Params with errors
that list every bad field (each validator's message already says the fix)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


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
