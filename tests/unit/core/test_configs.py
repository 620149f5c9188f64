"""The shared config helpers every stage's validators use."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from tasks.core.configs import at_least, config_from_params, field_default, split_fraction


@pytest.mark.parametrize(("value", "minimum"), [(1, 1), (0, 0), (16, 16), (None, 1), (0.0, 0)])
def test_at_least_passes_values_on_or_above_the_floor(value: float | None, minimum: int) -> None:
    assert at_least(value, minimum, "shard_size", 100) == value


def test_at_least_names_field_value_floor_and_a_working_setting() -> None:
    with pytest.raises(ValueError) as err:
        at_least(15, 16, "max_tokens", 384)
    assert str(err.value) == "max_tokens must be >= 16 (got 15); set max_tokens: 384"


@pytest.mark.parametrize("value", [-0.01, 0.5, 0.9])
def test_split_fraction_rejects_outside_zero_to_half(value: float) -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be within \[0, 0.5\).*val_fraction: 0.1"):
        split_fraction(value)


@pytest.mark.parametrize("value", [0.0, 0.1, 0.499])
def test_split_fraction_accepts_zero_to_half(value: float) -> None:
    assert split_fraction(value) == value


class _Example(BaseModel):
    shard_size: int = 100
    val_fraction: float = 0.1


def test_field_default_reads_the_model_default() -> None:
    assert field_default(_Example, "shard_size") == 100


def test_config_from_params_drops_none_and_lists_every_bad_field() -> None:
    assert config_from_params(_Example, {"shard_size": None}, RuntimeError, "x").shard_size == 100
    with pytest.raises(RuntimeError) as err:
        config_from_params(_Example, {"shard_size": "many", "val_fraction": "half"}, RuntimeError,
                           "example")
    text = str(err.value)
    assert text.startswith("invalid example config:")
    assert "shard_size:" in text and "val_fraction:" in text
    with pytest.raises(ValidationError):
        _Example(shard_size="many")
