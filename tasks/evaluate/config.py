"""The fixed scenario set the evaluation answers (include/eval/scenarios.yaml) and its loading.

`ScenarioSet` is the stage's pydantic input: 10-20 scenarios (seed 001) covering the taxonomy,
each a conversation ending with a user turn plus its taxonomy cell and what a good reply does,
with an optional system prompt prepended to every chat. `load_scenarios` turns a bad file into an
`EvaluationError` that names the fix, and `subset_scenarios` picks an evenly spread subset for a
quick run. `EvaluationError` (evaluation cannot start) lives here because the scenario file is
the first thing an evaluation reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.ids import content_hash
from tasks.core.paths import INCLUDE_DIR

EVAL_DIR = INCLUDE_DIR / "eval"
DEFAULT_SCENARIOS_PATH = EVAL_DIR / "scenarios.yaml"


class EvaluationError(RuntimeError):
    """Evaluation cannot start (bad scenario file, empty validation set, missing adapter)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


# ---- scenarios ---------------------------------------------------------------------------------

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class EvalScenario(BaseModel):
    """One fixed scenario: a conversation ending with a user turn, plus its taxonomy cell."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    topic: str
    verbosity: str
    tone: str
    difficulty: Literal["easy", "medium", "hard"]
    edge_case: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    expect: str = ""

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("a scenario's last message must be a user turn (the reply to judge "
                             "comes next); remove trailing assistant turns")
        return messages


class ScenarioSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    system_prompt: str = ""
    scenarios: list[EvalScenario]

    @model_validator(mode="after")
    def _shape(self) -> ScenarioSet:
        count = len(self.scenarios)
        if not 10 <= count <= 20:
            raise ValueError(f"the scenario set has {count} scenarios; seed 001 asks for 10-20 "
                             "covering the taxonomy — add or remove scenarios")
        ids = [s.id for s in self.scenarios]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"scenario ids must be unique; rename {duplicates}")
        return self

    @property
    def digest(self) -> str:
        return content_hash(self.model_dump(mode="json"))[:16]

    def messages_for(self, scenario: EvalScenario) -> list[dict[str, str]]:
        """The chat the model answers: the set's system prompt, then the scenario's turns."""
        head = ([{"role": "system", "content": self.system_prompt}]
                if self.system_prompt and scenario.messages[0].role != "system" else [])
        return head + [m.model_dump() for m in scenario.messages]


def subset_scenarios(scenarios: ScenarioSet, limit: int | None) -> ScenarioSet:
    """At most `limit` scenarios, evenly spread over the set (first and spread-out ones)."""
    total = len(scenarios.scenarios)
    if limit is None or limit >= total:
        return scenarios
    if limit < 1:
        raise EvaluationError(f"max_scenarios must be >= 1, got {limit}; e.g. 6, or leave it "
                              "unset for the whole set")
    picked = [scenarios.scenarios[(i * total) // limit] for i in range(limit)]
    return scenarios.model_copy(update={"scenarios": picked})


def load_scenarios(path: Path | str | None = None) -> ScenarioSet:
    path = Path(path) if path is not None else DEFAULT_SCENARIOS_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"scenario file {path} not found; the default set is "
                              f"{DEFAULT_SCENARIOS_PATH}", path=str(path)) from None
    try:
        return ScenarioSet.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors())
        raise EvaluationError(f"invalid scenario file {path}: {problems}", path=str(path)) \
            from None
