"""`CandidateRow`: a candidate conversation with all the filters, the gate and the export need.

A row carries the conversation (system prompt, messages, generation status and provenance), its
persona and taxonomy cell, the stored embedding, the latest tagger outputs and the rubric outcome
(`tasks.curate.stage.load_candidates` fills it from the database), plus what `measure_rows` adds
(turns, words, tokens) and the split it lands in; the score properties read tolerant numbers out
of the tagger and rubric outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.core.ids import content_hash


@dataclass
class CandidateRow:
    """A conversation with everything the filters, the gate and the export need."""

    conversation_id: str
    messages: list[dict[str, Any]]
    system_prompt: str = ""
    batch_id: str = ""
    status: str = "ok"
    failure_reason: str | None = None
    duplicate_of: str | None = None
    persona_id: str | None = None
    persona: dict[str, Any] = field(default_factory=dict)  # {"name", "attributes"}
    taxonomy_cell: dict[str, Any] = field(default_factory=dict)
    is_edge_case: bool = False
    content_hash: str | None = None
    embedding: Any = None  # 384 floats (whole-conversation MiniLM) or None
    template_hashes: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    tags: dict[str, dict[str, Any]] = field(default_factory=dict)  # tagger -> output
    rubric: dict[str, Any] | None = None  # RubricOutcome.to_dict()
    # measured by `measure_rows`
    turns: int = 0
    words: int = 0
    tokens: int = 0
    split: str = "train"

    def __post_init__(self) -> None:
        if not self.content_hash:
            self.content_hash = content_hash(
                {"system": self.system_prompt, "messages": self.messages})

    @property
    def hallucination_score(self) -> float | None:
        return _number(self.tags.get("hallucination", {}).get("hallucination_score"))

    @property
    def emotion_confidence(self) -> float | None:
        return _number(self.tags.get("emotion", {}).get("confidence"))

    @property
    def topic(self) -> str | None:
        topic = self.taxonomy_cell.get("topic")
        if topic:
            return str(topic)
        topics = self.tags.get("topic", {}).get("topics") or []
        return str(topics[0]) if topics else None

    @property
    def rubric_score(self) -> float | None:
        return _number(self.rubric.get("score")) if self.rubric else None


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
