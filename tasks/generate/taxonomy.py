"""The input taxonomy (WHAT / HOW / WHO / DIFFICULTY / EDGE CASES) and its seeded sampling.

The taxonomy lives in `include/rubrics/taxonomy.yaml`. A batch of N conversations gets one
taxonomy *cell* per item: one value per dimension, plus a subtopic and an edge-case category
(``none`` for ~85%). Each dimension is sampled by stratified sampling over a seeded permutation
(a Latin-hypercube design): item i's value comes from stratum perm_d(i) of the dimension's
cumulative weights. Every dimension's achieved share is therefore within 1/N of its target even for
small batches, while the independent per-dimension permutations keep the cross product random.
The cell of item i depends only on (taxonomy, count, seed, i), so any shard can compute its items
without coordination, and a rerun lands on the same cells.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.ids import canonical_json, stable_id
from tasks.core.paths import RUBRICS_DIR

DEFAULT_TAXONOMY_PATH = RUBRICS_DIR / "taxonomy.yaml"
EDGE_CASE_DIMENSION = "edge_case"
SUBTOPIC_DIMENSION = "subtopic"
NO_EDGE_CASE = "none"


class TaxonomyError(ValueError):
    """The taxonomy file is missing or invalid; carries the path and what to fix."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"taxonomy {self.path}: {problem}")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo or an unquoted comma in YAML must not pass silently."""

    model_config = ConfigDict(extra="forbid")


class DimensionValue(_Strict):
    weight: float
    description: str = ""
    subtopics: list[str] = Field(default_factory=list)

    @field_validator("weight")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"weight must be > 0, got {value}; e.g. weight: 0.2")
        return value


class Dimension(_Strict):
    group: str
    values: dict[str, DimensionValue]

    @field_validator("values")
    @classmethod
    def _non_empty(cls, value: dict[str, DimensionValue]) -> dict[str, DimensionValue]:
        if not value:
            raise ValueError("a dimension needs at least one value; e.g. values: {easy: {weight: 1}}")
        return value

    def weights(self) -> dict[str, float]:
        return {name: v.weight for name, v in self.values.items()}


class EdgeCaseCategory(_Strict):
    weight: float
    description: str
    handling: str = ""

    @field_validator("weight")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"weight must be > 0, got {value}; e.g. weight: 0.2")
        return value


class EdgeCases(_Strict):
    share: float = 0.15
    group: str = "edge_case"
    categories: dict[str, EdgeCaseCategory]

    @field_validator("share")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"edge_cases.share must be within [0, 1], got {value}; e.g. share: 0.15")
        return value


class DocumentScenarios(_Strict):
    min_words: int = 500
    max_words: int = 1000
    doc_types: dict[str, DimensionValue]

    @model_validator(mode="after")
    def _range(self) -> DocumentScenarios:
        if not 0 < self.min_words <= self.max_words:
            raise ValueError(
                f"document_scenarios needs 0 < min_words <= max_words, got {self.min_words} and "
                f"{self.max_words}; e.g. min_words: 500, max_words: 1000"
            )
        return self


class Taxonomy(_Strict):
    """The parsed taxonomy file; `content_hash` versions it for provenance and batch ids."""

    version: int = 1
    domain: str = ""
    dimensions: dict[str, Dimension]
    edge_cases: EdgeCases
    document_scenarios: DocumentScenarios | None = None
    content_hash: str = ""
    path: str = ""

    @model_validator(mode="after")
    def _reserved(self) -> Taxonomy:
        for reserved in (EDGE_CASE_DIMENSION, SUBTOPIC_DIMENSION):
            if reserved in self.dimensions:
                raise ValueError(
                    f"dimension name {reserved!r} is reserved; rename it (e.g. {reserved}_kind)"
                )
        return self

    def edge_case_weights(self, share: float | None = None) -> dict[str, float]:
        """Target shares of the edge-case dimension: `none` plus each category."""
        share = self.edge_cases.share if share is None else share
        total = sum(c.weight for c in self.edge_cases.categories.values())
        weights = {NO_EDGE_CASE: 1.0 - share}
        for name, category in self.edge_cases.categories.items():
            weights[name] = share * category.weight / total
        return weights

    def targets(self, edge_case_share: float | None = None) -> dict[str, dict[str, float]]:
        """Target share of every value of every dimension (subtopics included), normalised."""
        targets = {name: _normalise(dim.weights()) for name, dim in self.dimensions.items()}
        if "topic" in self.dimensions:
            sub: dict[str, float] = {}
            for topic, share in targets["topic"].items():
                subtopics = self.dimensions["topic"].values[topic].subtopics
                for subtopic in subtopics:
                    sub[f"{topic}/{subtopic}"] = share / len(subtopics)
            if sub:
                targets[SUBTOPIC_DIMENSION] = sub
        targets[EDGE_CASE_DIMENSION] = _normalise(self.edge_case_weights(edge_case_share))
        return targets


def _normalise(weights: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(weights.values()))
    return {k: float(v) / total for k, v in weights.items()}


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int) -> Taxonomy:
    from tasks.core.configs import load_yaml_model

    return load_yaml_model(path, Taxonomy, TaxonomyError, "`dimensions:` and `edge_cases:`")


def load_taxonomy(path: Path | str | None = None) -> Taxonomy:
    """Parse and validate a taxonomy YAML (default: include/rubrics/taxonomy.yaml)."""
    source = Path(path) if path else DEFAULT_TAXONOMY_PATH
    if not source.is_file():
        raise TaxonomyError(
            source, f"not found; point taxonomy_path at a YAML file such as {DEFAULT_TAXONOMY_PATH}"
        )
    return _load_cached(str(source.resolve()), source.stat().st_mtime_ns)


def seed_for(*parts: Any) -> int:
    """A 63-bit integer seed derived deterministically from parts."""
    return int(stable_id(*parts, length=15), 16)


def stratified_indices(weights: Sequence[float], n: int, seed: int) -> np.ndarray:
    """n draws from a categorical distribution, stratified over a seeded permutation.

    Systematic sampling: one random offset r, points (k + r) / n for k < n, so every category's
    count is floor or ceil of n × its share; a seeded permutation decides which item gets which
    point, so items (and the dimensions among themselves) stay randomly matched.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    probs = np.asarray(weights, dtype=np.float64)
    cdf = np.cumsum(probs / probs.sum())
    cdf[-1] = 1.0
    rng = np.random.default_rng(seed)
    u = (rng.permutation(n) + rng.random()) / n
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(probs) - 1)


def stratified_choices(weights: Mapping[str, float], n: int, seed: int) -> list[str]:
    names = list(weights)
    return [names[i] for i in stratified_indices([weights[k] for k in names], n, seed)]


class CellPlan:
    """The taxonomy cells of one batch: cell(i) for 0 <= i < count, computed once per process."""

    def __init__(self, taxonomy: Taxonomy, count: int, seed: int,
                 edge_case_share: float | None = None) -> None:
        self.taxonomy = taxonomy
        self.count = count
        self.seed = seed
        self.edge_case_share = edge_case_share
        self._names: dict[str, list[str]] = {}
        self._picks: dict[str, np.ndarray] = {}
        for name, dim in taxonomy.dimensions.items():
            weights = dim.weights()
            self._names[name] = list(weights)
            self._picks[name] = stratified_indices(
                list(weights.values()), count, seed_for("taxonomy", seed, name))
        edge = taxonomy.edge_case_weights(edge_case_share)
        self._names[EDGE_CASE_DIMENSION] = list(edge)
        self._picks[EDGE_CASE_DIMENSION] = stratified_indices(
            list(edge.values()), count, seed_for("taxonomy", seed, EDGE_CASE_DIMENSION))
        self._subtopic = self._stratified_subtopics(seed)

    def _stratified_subtopics(self, seed: int) -> np.ndarray:
        """Per item, the index of its subtopic: round-robin over a seeded shuffle within each
        topic, so subtopics of a topic are used equally often (±1)."""
        picks = np.zeros(self.count, dtype=np.int64)
        if "topic" not in self.taxonomy.dimensions:
            return picks
        rng = np.random.default_rng(seed_for("taxonomy", seed, SUBTOPIC_DIMENSION))
        topics = self._picks["topic"]
        for position, name in enumerate(self._names["topic"]):
            members = np.flatnonzero(topics == position)
            n_sub = len(self.taxonomy.dimensions["topic"].values[name].subtopics)
            if n_sub == 0 or members.size == 0:
                continue
            order = rng.permutation(members.size)
            picks[members] = (order + int(rng.integers(n_sub))) % n_sub
        return picks

    def cell(self, index: int) -> dict[str, str]:
        if not 0 <= index < self.count:
            raise IndexError(f"item index {index} outside the batch [0, {self.count})")
        cell = {name: self._names[name][int(self._picks[name][index])]
                for name in self.taxonomy.dimensions}
        if "topic" in cell:
            subtopics = self.taxonomy.dimensions["topic"].values[cell["topic"]].subtopics
            if subtopics:
                cell[SUBTOPIC_DIMENSION] = subtopics[int(self._subtopic[index])]
        cell[EDGE_CASE_DIMENSION] = self._names[EDGE_CASE_DIMENSION][
            int(self._picks[EDGE_CASE_DIMENSION][index])]
        return cell


@functools.lru_cache(maxsize=8)
def _cell_plan_cached(taxonomy_key: str, count: int, seed: int,
                      edge_case_share: float | None) -> CellPlan:
    path, _hash = taxonomy_key.split("\0")
    return CellPlan(load_taxonomy(path), count, seed, edge_case_share)


def cell_plan(taxonomy: Taxonomy, count: int, seed: int,
              edge_case_share: float | None = None) -> CellPlan:
    """A (per-process cached) CellPlan, so shards of one batch do not resample."""
    if taxonomy.path:
        return _cell_plan_cached(f"{taxonomy.path}\0{taxonomy.content_hash}", count, seed,
                                 edge_case_share)
    return CellPlan(taxonomy, count, seed, edge_case_share)


def cell_key(cell: Mapping[str, Any]) -> str:
    """A stable string naming a cell, used in deterministic conversation ids."""
    return canonical_json(dict(cell))


def coverage_report(
    targets: Mapping[str, Mapping[str, float]], cells: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Target vs achieved share for every value of every dimension over `cells`.

    `cells` carry the dimension values (subtopics under `subtopic`, joined to their topic here).
    Values seen but not in the targets are reported with target 0.
    """
    total = len(cells)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for dimension, target in targets.items():
        counts: dict[str, int] = dict.fromkeys(target, 0)
        for cell in cells:
            value = cell.get(dimension)
            if dimension == SUBTOPIC_DIMENSION and value is not None:
                value = f"{cell.get('topic')}/{value}"
            if value is None:
                continue
            counts[str(value)] = counts.get(str(value), 0) + 1
        report[dimension] = {
            value: {
                "target": round(float(target.get(value, 0.0)), 4),
                "achieved": round(count / total, 4) if total else 0.0,
                "count": count,
            }
            for value, count in counts.items()
        }
    return report


def max_coverage_gap(report: Mapping[str, Mapping[str, Mapping[str, float]]]) -> float:
    """The largest |achieved - target| over every value of every dimension."""
    gaps = [abs(v["achieved"] - v["target"]) for dim in report.values() for v in dim.values()]
    return round(max(gaps), 4) if gaps else 0.0
