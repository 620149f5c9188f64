"""One contract for every tagger (distilabel `Task` style), the five taggers, and their registry.

A tagger is a name, a pydantic output schema, a Jinja2 template under include/prompts/taggers/,
`format_input(conversation) -> messages` and `format_output(raw) -> dict`. Its `version` is the
hash of everything that decides its output: template text, output schema JSON, vocabulary, the
backend and the model. Adding a tagger is one template, one small class and one registry line.

Templates define three blocks: `system` (the tagger's role plus its task), `task` (what to output,
reused when several taggers share one combined prompt) and `user` (the conversation); they are
rendered in the shared prompt environment of `tasks.core.prompts` (the judge's too).

`TagResult.score` convention (curation filters on it): emotion → confidence in [0, 1];
hallucination → hallucination_score in [0, 1]; topic and temporal → confidence; belief →
confidence or null.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from tasks.core.ids import canonical_json, content_hash
from tasks.core.paths import PROMPTS_DIR, RUBRICS_DIR
from tasks.core.prompts import MAX_MESSAGE_CHARS, clip_text, jinja_env, render_template

TAGGER_PROMPTS_DIR = PROMPTS_DIR / "taggers"
LABELS_PATH = RUBRICS_DIR / "labels.yaml"
BACKENDS = ("llm", "embedding", "heuristic")
Backend = Literal["llm", "embedding", "heuristic"]
# Tests point this at an edited copy of include/prompts to simulate a changed template.
PROMPTS_ROOT = PROMPTS_DIR


class TaggerOutputInvalid(ValueError):
    """A tagger's raw output could not be turned into its schema; carries what to audit."""

    def __init__(self, tagger: str, reason: str, raw: str | None) -> None:
        self.tagger = tagger
        self.reason = reason
        self.raw = raw
        super().__init__(f"{tagger} tagger output invalid: {reason}")


class UnknownTagger(ValueError):
    """A tagger name or backend that the registry does not have; says which exist."""


@dataclass(frozen=True)
class ConversationInput:
    """What a tagger sees of a conversation row."""

    id: str
    messages: list[dict[str, str]]
    system_prompt: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Any) -> ConversationInput:
        return cls(
            id=row.id,
            messages=[{"role": str(m.get("role", "")), "content": str(m.get("content", ""))}
                      for m in (row.messages or [])],
            system_prompt=row.system_prompt or "",
            meta={"batch_id": row.batch_id, "taxonomy_cell": row.taxonomy_cell or {}},
        )


# ---- output schemas ----------------------------------------------------------------------------
Label = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1,
                                         max_length=80)]
Phrase = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]


def _listify(value: Any) -> Any:
    """A lone string where a list belongs is the most common small-model slip; accept it."""
    return [value] if isinstance(value, str) else value


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _probability(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read True as 1.0
        raise ValueError("must be a number between 0 and 1, not a boolean")
    return value


class _Schema(BaseModel):
    # Extra keys are noise, not errors; wrong types and out-of-range values are errors.
    model_config = ConfigDict(extra="ignore")


class EmotionTags(_Schema):
    tones: list[Label] = Field(min_length=1, max_length=3)
    confidence: float = Field(ge=0.0, le=1.0)

    _tones_list = field_validator("tones", mode="before")(_listify)
    _tones_unique = field_validator("tones")(_dedupe)
    _confidence = field_validator("confidence", mode="before")(_probability)


class TopicTags(_Schema):
    topics: list[Label] = Field(min_length=1, max_length=3)
    subtopics: list[Label] = Field(default_factory=list, max_length=5)
    confidence: float = Field(ge=0.0, le=1.0)

    _lists = field_validator("topics", "subtopics", mode="before")(_listify)
    _unique = field_validator("topics", "subtopics")(_dedupe)
    _confidence = field_validator("confidence", mode="before")(_probability)


class TemporalTags(_Schema):
    focus: Literal["past", "present", "future", "timeless"]
    confidence: float = Field(ge=0.0, le=1.0)

    @field_validator("focus", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    _confidence = field_validator("confidence", mode="before")(_probability)


class Belief(_Schema):
    statement: Phrase
    holder: Literal["user", "assistant"]
    kind: Literal["explicit", "implied"]

    @field_validator("holder", "kind", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class BeliefTags(_Schema):
    beliefs: list[Belief] = Field(default_factory=list, max_length=10)
    values: list[Label] = Field(default_factory=list, max_length=10)
    stances: list[Phrase] = Field(default_factory=list, max_length=10)
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)

    _lists = field_validator("values", "stances", mode="before")(_listify)
    _confidence = field_validator("confidence", mode="before")(_probability)


class Claim(_Schema):
    claim: Phrase
    reason: str = ""

    @classmethod
    def _from_text(cls, value: Any) -> Any:
        return {"claim": value} if isinstance(value, str) else value


class HallucinationTags(_Schema):
    hallucination_score: float = Field(ge=0.0, le=1.0)
    claims: list[Claim] = Field(default_factory=list, max_length=20)

    _score = field_validator("hallucination_score", mode="before")(_probability)

    @field_validator("claims", mode="before")
    @classmethod
    def _claims(cls, value: Any) -> Any:
        value = _listify(value)
        if isinstance(value, list):
            return [Claim._from_text(v) for v in value]
        return value


# ---- contract ----------------------------------------------------------------------------------
@runtime_checkable
class Tagger(Protocol):
    """What every tagger offers; `BaseTagger` implements it from a template and a schema."""

    name: str
    output_schema: type[BaseModel]
    backend: str
    model: str

    @property
    def template_path(self) -> Path: ...

    @property
    def version(self) -> str: ...

    def format_input(self, conversation: ConversationInput) -> list[dict[str, str]]: ...

    def format_output(self, raw: str) -> dict[str, Any]: ...

    def score(self, output: dict[str, Any]) -> float | None: ...


@functools.lru_cache(maxsize=4)
def _labels_file(path: str, mtime_ns: int) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


def load_labels(path: Path | None = None) -> dict[str, Any]:
    """include/rubrics/labels.yaml (label descriptions + calibration sets), cached by mtime."""
    path = path or LABELS_PATH
    return _labels_file(str(path), path.stat().st_mtime_ns)


class BaseTagger:
    """A tagger bound to a backend and model. Subclasses set the class attributes only."""

    name: ClassVar[str]
    output_schema: ClassVar[type[BaseModel]]
    backends: ClassVar[tuple[str, ...]] = ("llm",)
    score_field: ClassVar[str] = "confidence"
    # labels.yaml section whose label ids are shown to the LLM as the allowed/suggested vocabulary
    vocabulary_section: ClassVar[str | None] = None
    # when True, format_output rejects labels outside the vocabulary
    closed_vocabulary: ClassVar[bool] = False
    vocabulary_field: ClassVar[str | None] = None

    def __init__(self, backend: str = "llm", model: str = "") -> None:
        if backend not in self.backends:
            raise UnknownTagger(
                f"tagger {self.name!r} has no {backend!r} backend; use one of "
                f"{', '.join(self.backends)}"
            )
        self.backend = backend
        self.model = model

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend}:{self.model or '-'} v={self.version}>"

    # ---- identity -----------------------------------------------------------------------
    @property
    def template_name(self) -> str:
        return f"taggers/{self.name}.jinja2"

    @property
    def template_path(self) -> Path:
        return PROMPTS_ROOT / self.template_name

    @functools.cached_property
    def template_source(self) -> str:
        return self.template_path.read_text(encoding="utf-8")

    def vocabulary(self) -> list[str]:
        return list(self._vocabulary)

    @functools.cached_property
    def _vocabulary(self) -> tuple[str, ...]:
        if self.vocabulary_section is None:
            return ()
        return tuple(load_labels()[self.vocabulary_section]["labels"])

    @functools.cached_property
    def _template(self):  # -> jinja2.Template
        # Compiled from the same text the version hashes, so a file edited mid-run can never
        # render under the old version.
        return jinja_env(str(PROMPTS_ROOT)).from_string(self.template_source)

    def render(self, block: str, context: dict[str, Any]) -> str:
        return render_template(self._template, block, context, self.template_name)

    @property
    def method(self) -> str:
        """How the output was produced, recorded in every output as "method"."""
        return f"llm:{self.model}"

    def definition(self) -> dict[str, Any]:
        """Everything except the model that decides this tagger's output."""
        return {
            "tagger": self.name,
            "backend": self.backend,
            "schema": self.output_schema.model_json_schema(),
            "template": self.template_source,
            "vocabulary": self.vocabulary(),
            "max_message_chars": MAX_MESSAGE_CHARS,
        }

    @functools.cached_property
    def definition_hash(self) -> str:
        return content_hash(self.definition())[:16]

    @functools.cached_property
    def version(self) -> str:
        return content_hash({"definition": self.definition_hash, "backend": self.backend,
                             "model": self.model})[:16]

    def version_row(self) -> dict[str, Any]:
        """The `tagger_versions` row describing this version."""
        definition = self.definition()
        return {
            "version": self.version, "tagger": self.name, "backend": self.backend,
            "model": self.model[:200], "definition_hash": self.definition_hash,
            "template": definition.get("template", ""),
            "output_schema": definition["schema"],
        }

    # ---- prompts ------------------------------------------------------------------------
    def context(self, conversation: ConversationInput) -> dict[str, Any]:
        return {
            "messages": [{"role": m["role"], "content": clip_text(m["content"])}
                         for m in conversation.messages],
            "system_prompt": clip_text(conversation.system_prompt),
            "vocabulary": self.vocabulary(),
        }

    def format_input(self, conversation: ConversationInput) -> list[dict[str, str]]:
        context = self.context(conversation)
        return [
            {"role": "system", "content": self.render("system", context)},
            {"role": "user", "content": self.render("user", context)},
        ]

    def task_text(self, conversation: ConversationInput) -> str:
        return self.render("task", self.context(conversation))

    # ---- outputs ------------------------------------------------------------------------
    def validate(self, data: Any) -> dict[str, Any]:
        """Schema-validate an already-parsed value; raises TaggerOutputInvalid."""
        from pydantic import ValidationError

        from tasks.core.llm.structured import describe_validation_error

        try:
            value = self.output_schema.model_validate(data)
        except ValidationError as exc:
            raise TaggerOutputInvalid(
                self.name, f"the JSON does not match {self.output_schema.__name__}: "
                f"{describe_validation_error(exc)}", canonical_json(data)) from None
        output = value.model_dump(mode="json")
        if self.closed_vocabulary and self.vocabulary_field:
            allowed = set(self._vocabulary)
            unknown = [v for v in output[self.vocabulary_field] if v not in allowed]
            if unknown:
                raise TaggerOutputInvalid(
                    self.name, f"{self.vocabulary_field} {unknown} are not in the vocabulary; "
                    f"use only {', '.join(sorted(allowed))}", canonical_json(data))
        output["method"] = self.method
        return output

    def format_output(self, raw: str) -> dict[str, Any]:
        """Raw LLM text → validated output dict (+ "method"); raises TaggerOutputInvalid."""
        from tasks.core.llm.structured import StructuredOutputError, extract_json

        try:
            data = extract_json(raw)
        except StructuredOutputError as exc:
            raise TaggerOutputInvalid(self.name, exc.reason, raw) from None
        try:
            output = self.validate(data)
        except TaggerOutputInvalid as exc:
            raise TaggerOutputInvalid(self.name, exc.reason, raw) from None
        example, instruction_lines = self._prompt_echo_markers
        if output == example and any(line in raw for line in instruction_lines):
            # Small models (SmolLM2-135M) often parrot the instructions and the example JSON;
            # that passes the schema but says nothing about this conversation.
            raise TaggerOutputInvalid(
                self.name, "the reply repeats the prompt's instructions and its example JSON "
                "instead of tagging this conversation", raw)
        return output

    @functools.cached_property
    def _prompt_echo_markers(self) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
        """The prompt's example output (validated) and its instruction lines (>= 25 chars)."""
        from tasks.core.llm.structured import StructuredOutputError, extract_json

        task = self.render("task", self.context(ConversationInput("", [])))
        lines = tuple(line.strip() for line in task.splitlines()
                      if len(line.strip()) >= 25 and not line.strip().startswith("{"))
        try:
            return self.validate(extract_json(task)), lines
        except (StructuredOutputError, TaggerOutputInvalid):
            return None, lines

    def score(self, output: dict[str, Any]) -> float | None:
        value = output.get(self.score_field)
        return None if value is None else float(value)


class EmotionTagger(BaseTagger):
    name = "emotion"
    output_schema = EmotionTags
    backends = ("llm", "embedding")
    vocabulary_section = "emotion"
    closed_vocabulary = True
    vocabulary_field = "tones"


class TopicTagger(BaseTagger):
    name = "topic"
    output_schema = TopicTags
    backends = ("llm", "embedding")
    vocabulary_section = "topic"


class TemporalTagger(BaseTagger):
    name = "temporal"
    output_schema = TemporalTags
    backends = ("llm", "embedding")


class BeliefTagger(BaseTagger):
    name = "belief"
    output_schema = BeliefTags
    backends = ("llm", "heuristic")


class HallucinationTagger(BaseTagger):
    name = "hallucination"
    output_schema = HallucinationTags
    backends = ("llm", "heuristic")
    score_field = "hallucination_score"


TAGGERS: dict[str, type[BaseTagger]] = {
    "emotion": EmotionTagger,
    "topic": TopicTagger,
    "temporal": TemporalTagger,
    "belief": BeliefTagger,
    "hallucination": HallucinationTagger,
}
TAGGER_NAMES = tuple(TAGGERS)


# ---- combined prompt (all taggers in one request; measured by bench/tag.py) -------------------
def combined_messages(taggers: Sequence[BaseTagger],
                      conversation: ConversationInput) -> list[dict[str, str]]:
    """One request doing every tagger's task: the conversation is sent once instead of N times.

    The reply is one JSON object keyed by tagger name; `split_combined_output` validates it.
    """
    parts = [
        "You are a conversation tagger. You read a conversation between a user and an assistant "
        "and do several tagging tasks at once. Reply with only one JSON object whose keys are "
        f"{', '.join(json.dumps(t.name) for t in taggers)}; under each key put that task's JSON "
        "object exactly as the task describes."
    ]
    parts += [f"## {t.name}\n{t.task_text(conversation)}" for t in taggers]
    # The hallucination template's user block also shows the assistant's instructions.
    source = next((t for t in taggers if t.name == "hallucination"), taggers[0])
    user = source.render("user", source.context(conversation))
    return [{"role": "system", "content": "\n\n".join(parts)}, {"role": "user", "content": user}]


def split_combined_output(taggers: Sequence[BaseTagger], raw: str) -> dict[str, dict[str, Any]]:
    """Validate a combined reply per tagger; a tagger whose part is invalid raises."""
    from tasks.core.llm.structured import StructuredOutputError, extract_json

    try:
        data = extract_json(raw)
    except StructuredOutputError as exc:
        raise TaggerOutputInvalid("combined", exc.reason, raw) from None
    if not isinstance(data, dict):
        raise TaggerOutputInvalid("combined", "expected a JSON object keyed by tagger name", raw)
    out: dict[str, dict[str, Any]] = {}
    for tagger in taggers:
        if tagger.name not in data:
            raise TaggerOutputInvalid(tagger.name, f"the combined reply has no {tagger.name!r} key",
                                      raw)
        out[tagger.name] = tagger.validate(data[tagger.name])
    return out
