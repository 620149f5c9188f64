"""The rubric model: binary criteria in weighted categories, loaded from YAML and stored by version.

The rubric (include/rubrics/rubric.yaml, seed 001) groups binary YES/NO/NA criteria into weighted
categories, carries 3-8 calibration examples per criterion (rendered into the judge prompt so that
different backends read the criteria alike) and names safety gates; `load_rubric` /
`rubric_from_dict` parse and validate it (every problem reported with its fix in a `RubricError`),
`Rubric.version` is the content hash judgments are stored under, `store_rubric` records that
content in `rubric_versions` and `rubric_for_version` reads an older version back.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.orm import Session

from tasks.core.db.models import RubricVersion
from tasks.core.ids import content_hash
from tasks.core.paths import RUBRICS_DIR

DEFAULT_RUBRIC_PATH = RUBRICS_DIR / "rubric.yaml"
Verdict = Literal["YES", "NO", "NA"]
STORED_VERDICTS = ("YES", "NO", "NA", "ERROR")


class RubricError(ValueError):
    """The rubric file is missing or invalid; carries the path and every problem found."""

    def __init__(self, path: Path | str, problems: Sequence[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(f"invalid rubric {self.path}:\n  " + "\n  ".join(self.problems))


# ---- rubric model ----------------------------------------------------------------------------
class CalibrationExample(BaseModel):
    """One anchored judgment: a context, a response, the expected verdict and why."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["PASS", "FAIL", "NA"]
    context: str = Field(min_length=1)
    response: str = Field(min_length=1)
    reasoning: str = Field(min_length=1)

    @property
    def verdict(self) -> Verdict:
        return {"PASS": "YES", "FAIL": "NO", "NA": "NA"}[self.type]  # type: ignore[return-value]


class Criterion(BaseModel):
    """A binary question about the assistant's turns; YES means the criterion is met."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    question: str = Field(min_length=1)
    na_valid: bool = False
    calibration_examples: list[CalibrationExample]

    @model_validator(mode="after")
    def _calibrated(self) -> Criterion:
        n = len(self.calibration_examples)
        if not 3 <= n <= 8:
            raise ValueError(
                f"criterion {self.name!r} has {n} calibration examples; give 3-8 (at least one "
                "PASS and one FAIL, each with context, response and reasoning)"
            )
        kinds = {ex.type for ex in self.calibration_examples}
        if not {"PASS", "FAIL"} <= kinds:
            raise ValueError(
                f"criterion {self.name!r} needs at least one PASS and one FAIL calibration "
                f"example; it has {sorted(kinds)}"
            )
        if "NA" in kinds and not self.na_valid:
            raise ValueError(
                f"criterion {self.name!r} has an NA calibration example but na_valid is false; "
                "set na_valid: true or change the example's type to PASS/FAIL"
            )
        return self


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float
    criteria: list[str] = Field(min_length=1)

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"category weight must be in (0, 1], got {value}; e.g. weight: 0.2")
        return value


class Rubric(BaseModel):
    """A parsed, validated rubric; `version` is the content hash of everything else."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    pass_threshold: float = 0.80
    categories: dict[str, Category]
    criteria: dict[str, Criterion]
    safety_gates: list[str] = Field(default_factory=list)

    @field_validator("pass_threshold")
    @classmethod
    def _threshold(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"pass_threshold must be in (0, 1], got {value}; e.g. 0.80")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Rubric:
        total = sum(c.weight for c in self.categories.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"category weights sum to {total:.4f}; they must sum to 1.0 (e.g. scale each "
                f"weight by {1 / total:.4f})"
            )
        seen: dict[str, str] = {}
        for cat_name, cat in self.categories.items():
            for cid in cat.criteria:
                if cid not in self.criteria:
                    raise ValueError(
                        f"category {cat_name!r} lists criterion {cid!r} which is not defined "
                        f"under criteria:; define it or remove it (defined: {sorted(self.criteria)})"
                    )
                if cid in seen:
                    raise ValueError(
                        f"criterion {cid!r} is in both {seen[cid]!r} and {cat_name!r}; "
                        "put each criterion in exactly one category"
                    )
                seen[cid] = cat_name
        orphans = sorted(set(self.criteria) - set(seen))
        if orphans:
            raise ValueError(
                f"criteria {orphans} belong to no category; add them to a category's criteria list"
            )
        unknown = sorted(set(self.safety_gates) - set(self.criteria))
        if unknown:
            raise ValueError(
                f"safety_gates {unknown} are not defined criteria; use ids from "
                f"{sorted(self.criteria)}"
            )
        return self

    @cached_property
    def version(self) -> str:
        return content_hash(self.model_dump(mode="json"))[:16]

    def criterion_ids(self) -> list[str]:
        """Criteria in category order (the order prompts and reports use)."""
        return [cid for cat in self.categories.values() for cid in cat.criteria]


def load_rubric(path: Path | None = None) -> Rubric:
    """Parse and validate a rubric YAML (default include/rubrics/rubric.yaml)."""
    path = Path(path) if path is not None else DEFAULT_RUBRIC_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RubricError(path, [f"file not found; expected a rubric at {DEFAULT_RUBRIC_PATH}"]) \
            from None
    except yaml.YAMLError as exc:
        raise RubricError(path, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise RubricError(path, ["top level must be a mapping with categories/criteria/..."])
    return rubric_from_dict(data, source=path)


def rubric_from_dict(data: dict[str, Any], *, source: Path | str = "<dict>") -> Rubric:
    try:
        return Rubric.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise RubricError(source, problems) from None


def store_rubric(session: Session, rubric: Rubric) -> str:
    """Record the rubric content under its version (idempotent); returns the version."""
    from tasks.core.db.engine import upsert

    upsert(session, RubricVersion, [{
        "version": rubric.version, "name": rubric.name, "content": rubric.model_dump(mode="json"),
    }], update=[])
    return rubric.version


def rubric_for_version(session: Session, version: str | None) -> Rubric:
    """The current rubric file if `version` is None or matches it, else the stored content."""
    current = load_rubric()
    if version is None or version == current.version:
        return current
    row = session.get(RubricVersion, version)
    if row is None:
        raise RubricError(
            DEFAULT_RUBRIC_PATH,
            [f"rubric version {version!r} is neither the current file ({current.version}) nor "
             "stored in rubric_versions; judge with it first or pass rubric_version=None"],
        )
    return rubric_from_dict(row.content, source=f"rubric_versions:{version}")
