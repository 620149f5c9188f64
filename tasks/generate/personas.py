"""Personas: author profiles, communication styles, per-message flaws, and conversational modes.

`include/rubrics/personas.yaml` defines the template (seed 001) and the author profiles and
conversational modes (seed 000). A batch draws a deterministic pool of personas from a persona set
(stratified like the taxonomy, so 20% of a pool has no flaws and the styles match their weights);
every item is assigned a persona and a conversational mode. Flaws vary per *message*: each user
message independently shows the persona's primary flaw with probability 0.5 and each secondary flaw
with probability 0.2 (`active_flaws`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.ids import content_hash, stable_id
from tasks.core.paths import RUBRICS_DIR
from tasks.generate.taxonomy import seed_for, stratified_choices, stratified_indices

DEFAULT_PERSONAS_PATH = RUBRICS_DIR / "personas.yaml"


class PersonaError(ValueError):
    """The persona file or the requested persona set is invalid; says what to fix."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"personas {self.path}: {problem}")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo or an unquoted comma in YAML must not pass silently."""

    model_config = ConfigDict(extra="forbid")


class WeightedOption(_Strict):
    weight: float
    description: str = ""
    label: str = ""

    @field_validator("weight")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"weight must be > 0, got {value}; e.g. weight: 0.25")
        return value


class FlawPatterns(_Strict):
    no_flaw_share: float = 0.20
    primary_probability: float = 0.50
    secondary_probability: float = 0.20
    secondary_count: list[int] = Field(default_factory=lambda: [1, 2])
    primary: dict[str, str]
    secondary: dict[str, str]

    @field_validator("no_flaw_share", "primary_probability", "secondary_probability")
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"must be a probability within [0, 1], got {value}; e.g. 0.2")
        return value

    @model_validator(mode="after")
    def _counts(self) -> FlawPatterns:
        if not self.primary:
            raise ValueError("flaw_patterns.primary needs at least one flaw; e.g. resistance: ...")
        if any(c < 0 or c > len(self.secondary) for c in self.secondary_count):
            raise ValueError(
                f"secondary_count {self.secondary_count} must lie within [0, "
                f"{len(self.secondary)}] (the number of secondary flaws); e.g. [1, 2]"
            )
        return self


class DomainAttribute(_Strict):
    options: dict[str, float]
    description: str = ""


class PersonaSet(_Strict):
    description: str = ""
    author_profiles: Literal["all"] | list[str] = "all"
    conversational_modes: dict[str, float] | None = None


class PersonaTemplate(_Strict):
    """The parsed personas.yaml; `content_hash` versions it for provenance and batch ids."""

    version: int = 1
    communication_styles: dict[str, WeightedOption]
    flaw_patterns: FlawPatterns
    domain_attributes: dict[str, DomainAttribute] = Field(default_factory=dict)
    author_profiles: dict[str, WeightedOption]
    conversational_modes: dict[str, WeightedOption]
    first_names: list[str] = Field(default_factory=lambda: ["Alex"])
    persona_sets: dict[str, PersonaSet] = Field(
        default_factory=lambda: {"default": PersonaSet()})
    content_hash: str = ""
    path: str = ""

    @model_validator(mode="after")
    def _sets_refer_to_known_names(self) -> PersonaTemplate:
        for set_name, persona_set in self.persona_sets.items():
            if persona_set.author_profiles != "all":
                unknown = set(persona_set.author_profiles) - set(self.author_profiles)
                if unknown:
                    raise ValueError(
                        f"persona set {set_name!r} names unknown author profiles "
                        f"{sorted(unknown)}; use some of {sorted(self.author_profiles)}"
                    )
            if persona_set.conversational_modes:
                unknown = set(persona_set.conversational_modes) - set(self.conversational_modes)
                if unknown:
                    raise ValueError(
                        f"persona set {set_name!r} weights unknown modes {sorted(unknown)}; "
                        f"use some of {sorted(self.conversational_modes)}"
                    )
        return self

    def persona_set(self, name: str) -> PersonaSet:
        if name not in self.persona_sets:
            raise PersonaError(
                self.path, f"unknown persona_set {name!r}; use one of {sorted(self.persona_sets)}"
            )
        return self.persona_sets[name]

    def author_weights(self, set_name: str) -> dict[str, float]:
        chosen = self.persona_set(set_name).author_profiles
        names = list(self.author_profiles) if chosen == "all" else list(chosen)
        return {n: self.author_profiles[n].weight for n in names}

    def mode_weights(self, set_name: str) -> dict[str, float]:
        override = self.persona_set(set_name).conversational_modes
        if override:
            return dict(override)
        return {n: m.weight for n, m in self.conversational_modes.items()}

    def style_weights(self) -> dict[str, float]:
        return {n: s.weight for n, s in self.communication_styles.items()}


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int) -> PersonaTemplate:
    from tasks.core.configs import load_yaml_model

    return load_yaml_model(path, PersonaTemplate, PersonaError, "communication_styles, flaw_patterns, ...")


def load_personas(path: Path | str | None = None) -> PersonaTemplate:
    """Parse and validate a personas YAML (default: include/rubrics/personas.yaml)."""
    source = Path(path) if path else DEFAULT_PERSONAS_PATH
    if not source.is_file():
        raise PersonaError(
            source, f"not found; point personas_path at a YAML file such as {DEFAULT_PERSONAS_PATH}"
        )
    return _load_cached(str(source.resolve()), source.stat().st_mtime_ns)


class Persona(BaseModel):
    """One simulated user. `id` is content-addressed: equal personas share a row."""

    id: str
    name: str
    persona_set: str
    author_profile: str
    communication_style: str
    primary_flaw: str | None = None
    secondary_flaws: list[str] = Field(default_factory=list)
    attributes: dict[str, str] = Field(default_factory=dict)

    @property
    def has_flaws(self) -> bool:
        return self.primary_flaw is not None or bool(self.secondary_flaws)

    def row(self) -> dict[str, Any]:
        """The `personas` table row."""
        return {
            "id": self.id, "name": self.name, "persona_set": self.persona_set,
            "attributes": self.model_dump(exclude={"id", "name", "persona_set"}),
        }


def persona_pool(template: PersonaTemplate, persona_set: str, size: int, seed: int) -> list[Persona]:
    """A deterministic pool of `size` personas for a persona set and seed."""
    if size < 1:
        raise PersonaError(template.path, f"persona pool size must be >= 1, got {size}; e.g. 50")
    flaws = template.flaw_patterns
    styles = stratified_choices(template.style_weights(), size, seed_for("styles", seed))
    authors = stratified_choices(template.author_weights(persona_set), size,
                                 seed_for("authors", persona_set, seed))
    flawless = stratified_choices({"none": flaws.no_flaw_share, "flawed": 1.0 - flaws.no_flaw_share},
                                  size, seed_for("flawless", seed))
    attribute_picks = {
        name: stratified_choices(attr.options, size, seed_for("attribute", name, seed))
        for name, attr in template.domain_attributes.items()
    }
    primary_names = list(flaws.primary)
    secondary_names = list(flaws.secondary)
    pool: list[Persona] = []
    for j in range(size):
        rng = random.Random(seed_for("persona", persona_set, seed, j))
        primary: str | None = None
        secondary: list[str] = []
        if flawless[j] == "flawed":
            primary = rng.choice(primary_names)
            k = rng.choice(flaws.secondary_count) if flaws.secondary_count else 0
            secondary = sorted(rng.sample(secondary_names, k))
        first_name = rng.choice(template.first_names)
        author = authors[j]
        fields = {
            "persona_set": persona_set, "author_profile": author,
            "communication_style": styles[j], "primary_flaw": primary,
            "secondary_flaws": secondary,
            "attributes": {name: picks[j] for name, picks in attribute_picks.items()},
        }
        label = template.author_profiles[author].label or author.replace("_", " ")
        name = f"{first_name}, {label}"
        pool.append(Persona(id=stable_id("persona", name, content_hash(fields)), name=name,
                            **fields))
    return pool


def active_flaws(persona: Persona, template: PersonaTemplate, rng: random.Random) -> list[str]:
    """The flaws this persona shows in one message (drawn afresh for every message)."""
    shown: list[str] = []
    if persona.primary_flaw and rng.random() < template.flaw_patterns.primary_probability:
        shown.append(persona.primary_flaw)
    for flaw in persona.secondary_flaws:
        if rng.random() < template.flaw_patterns.secondary_probability:
            shown.append(flaw)
    return shown


def flaw_description(template: PersonaTemplate, flaw: str) -> str:
    patterns = template.flaw_patterns
    return patterns.primary.get(flaw) or patterns.secondary.get(flaw) or flaw.replace("_", " ")


class PersonaAssignment:
    """Which persona (from the pool) and conversational mode each item of a batch gets."""

    def __init__(self, template: PersonaTemplate, persona_set: str, pool_size: int,
                 count: int, seed: int) -> None:
        self.template = template
        self.pool = persona_pool(template, persona_set, pool_size, seed)
        rng = np.random.default_rng(seed_for("persona-assignment", persona_set, seed))
        # Round-robin over a seeded permutation: every persona used equally often (±1).
        self._persona_of = rng.permutation(max(count, 1)) % len(self.pool)
        self._modes = stratified_choices(template.mode_weights(persona_set), count,
                                         seed_for("modes", persona_set, seed))

    def persona(self, index: int) -> Persona:
        return self.pool[int(self._persona_of[index])]

    def mode(self, index: int) -> str:
        return self._modes[index]


def mode_targets(template: PersonaTemplate, persona_set: str) -> dict[str, float]:
    weights = template.mode_weights(persona_set)
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def stratified_flags(share: float, count: int, seed: int) -> list[bool]:
    """count booleans, True for a stratified `share` of them (document scenarios etc.)."""
    if share <= 0:
        return [False] * count
    if share >= 1:
        return [True] * count
    picks = stratified_indices([1.0 - share, share], count, seed)
    return [bool(p) for p in picks]


def describe_persona(persona: Persona, template: PersonaTemplate) -> Mapping[str, Any]:
    """Template-ready details of a persona (labels and descriptions resolved)."""
    author = template.author_profiles[persona.author_profile]
    style = template.communication_styles[persona.communication_style]
    return {
        "name": persona.name,
        "first_name": persona.name.split(",")[0],
        "author_label": author.label or persona.author_profile.replace("_", " "),
        "author_description": author.description,
        "style": persona.communication_style.replace("_", " "),
        "style_description": style.description,
        "attributes": {
            name.replace("_", " "): value.replace("_", " ")
            for name, value in persona.attributes.items()
        },
    }
