"""SQLAlchemy 2 models: Postgres is tuneloop's system of record.

Primary keys of pipeline rows are deterministic text ids (see `tasks.core.ids`) derived from their
inputs, so a rerun upserts instead of duplicating. Timestamps record when a row was written; no
logic depends on them. Alembic migrations under `tasks/core/db/migrations` create these tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class GenerationBatch(Base):
    __tablename__ = "generation_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    requested: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False, default="running")
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    coverage: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = _created()


class Persona(Base):
    __tablename__ = "personas"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    persona_set: Mapped[str] = mapped_column(String(100), nullable=False, default="default")
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = _created()


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_batch_status", "batch_id", "status"),
        Index("ix_conversations_content_hash", "content_hash"),
        # generation shards read and dedup item ranges of a batch (migration 0002)
        Index("ix_conversations_batch_item", "batch_id", "item_index"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(
        ForeignKey("generation_batches.id", ondelete="CASCADE"), nullable=False
    )
    item_index: Mapped[int] = mapped_column(Integer, nullable=False)
    persona_id: Mapped[str | None] = mapped_column(ForeignKey("personas.id"), nullable=True)
    taxonomy_cell: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    is_edge_case: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    system_prompt: Mapped[str] = mapped_column(Text, nullable=False, default="")
    messages: Mapped[list[Any]] = mapped_column(JSONB, nullable=False, default=list)
    # status: ok | failed | duplicate
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="ok")
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    endpoint: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    template_hashes: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    seed: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    token_usage: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    embedding: Mapped[list[float] | None] = mapped_column(ARRAY(Float), nullable=True)
    opening_embedding: Mapped[list[float] | None] = mapped_column(ARRAY(Float), nullable=True)
    duplicate_of: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = _created()


class TagResult(Base):
    __tablename__ = "tag_results"
    __table_args__ = (
        UniqueConstraint("conversation_id", "tagger", "tagger_version", name="uq_tag_result"),
        Index("ix_tag_results_tagger_version", "tagger", "tagger_version"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    tagger: Mapped[str] = mapped_column(String(64), nullable=False)
    tagger_version: Mapped[str] = mapped_column(String(64), nullable=False)
    backend: Mapped[str] = mapped_column(String(64), nullable=False, default="llm")
    model: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    output: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[datetime] = _created()


class TagFailure(Base):
    __tablename__ = "tag_failures"
    __table_args__ = (
        UniqueConstraint(
            "conversation_id", "tagger", "tagger_version", "attempt", name="uq_tag_failure"
        ),
        Index("ix_tag_failures_tagger_version", "tagger", "tagger_version"),  # 0003
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    tagger: Mapped[str] = mapped_column(String(64), nullable=False)
    tagger_version: Mapped[str] = mapped_column(String(64), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    raw_output: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _created()


class Judgment(Base):
    __tablename__ = "judgments"
    __table_args__ = (
        UniqueConstraint(
            "conversation_id", "rubric_version", "criterion", "judge", name="uq_judgment"
        ),
        Index("ix_judgments_conversation", "conversation_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    rubric_version: Mapped[str] = mapped_column(String(64), nullable=False)
    criterion: Mapped[str] = mapped_column(String(64), nullable=False)
    judge: Mapped[str] = mapped_column(String(64), nullable=False)  # judge slot: judge | judge2
    judge_model: Mapped[str] = mapped_column(String(300), nullable=False)
    verdict: Mapped[str] = mapped_column(String(8), nullable=False)  # YES | NO | NA | ERROR
    reasoning: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # 0003 (judge): structured-output attempts used, and the raw reply when verdict is ERROR.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default="1")
    raw_output: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _created()


class TaggerVersion(Base):
    """0003 (tagging): what a tagger version was, so results of older versions stay readable.

    `definition_hash` covers the template and output schema (or label set) but not the model,
    so "current" results can be found whichever model or endpoint produced them.
    """

    __tablename__ = "tagger_versions"
    __table_args__ = (Index("ix_tagger_versions_definition", "tagger", "definition_hash"),)

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    tagger: Mapped[str] = mapped_column(String(64), nullable=False)
    backend: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    definition_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    template: Mapped[str] = mapped_column(Text, nullable=False, default="")
    output_schema: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = _created()


class RubricVersion(Base):
    """0003 (judge): the rubric content a `judgments.rubric_version` refers to."""

    __tablename__ = "rubric_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    content: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _created()


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)  # curated | reaction_sft | ...
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    filters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    gate_passed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    gate_result: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    artifact_uri: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = _created()


class DatasetItem(Base):
    __tablename__ = "dataset_items"

    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    item_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str | None] = mapped_column(
        ForeignKey("conversations.id"), nullable=True, index=True
    )
    interaction_id: Mapped[str | None] = mapped_column(
        ForeignKey("interactions.id"), nullable=True, index=True
    )
    split: Mapped[str] = mapped_column(String(16), nullable=False, default="train")
    row_hash: Mapped[str] = mapped_column(String(64), nullable=False)


class DatasetExclusion(Base):
    """Why a candidate row is not in a dataset: one row per (dataset, conversation, reason)."""

    __tablename__ = "dataset_exclusions"
    __table_args__ = (Index("ix_dataset_exclusions_conversation", "conversation_id"),)

    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    conversation_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)


class Interaction(Base):
    __tablename__ = "interactions"
    __table_args__ = (
        Index("ix_interactions_deployment_variant", "deployment_id", "variant"),
        Index("ix_interactions_created", "created_at"),
        # 0009 (security): a client's X-Request-Id names one interaction of that client only.
        Index("uq_interactions_client_request", "client_id", "request_id", unique=True,
              postgresql_where=text("request_id IS NOT NULL")),
        # 0009: "did the router serve this assistant turn to this user?" (forged history).
        Index("ix_interactions_user_response", "user_hash", "response_md5"),
        # 0010: the rows `tuneloop retention` has yet to wipe (its predicate, no filter left).
        Index("ix_interactions_retention_pending", "created_at",
              postgresql_where=text("text_purged_at IS NULL AND erased_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    deployment_id: Mapped[str | None] = mapped_column(
        ForeignKey("deployments.id"), nullable=True
    )
    variant: Mapped[str] = mapped_column(String(16), nullable=False)  # champion|challenger|mirror
    model_name: Mapped[str] = mapped_column(String(300), nullable=False)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    request_messages: Mapped[list[Any]] = mapped_column(JSONB, nullable=False, default=list)
    response: Mapped[str] = mapped_column(Text, nullable=False, default="")
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    mirror_of: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # 0007 (router): ok | backend_error | client_disconnected; only "ok" rows are compared.
    status: Mapped[str] = mapped_column(String(32), nullable=False, default="ok",
                                        server_default="ok")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False,
                                         server_default=false())
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = _created()
    # 0009 (security): the named API client that made the request, and its X-Request-Id.
    client_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # md5 of the response, computed by PostgreSQL: looks up served assistant turns by content.
    response_md5: Mapped[str | None] = mapped_column(
        String(32), Computed("md5(response)", persisted=True), nullable=True)
    # Retention and erasure (tuneloop forget / retention purge): when the text was removed.
    text_purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                            nullable=True)
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Reaction(Base):
    __tablename__ = "reactions"
    __table_args__ = (
        Index("ix_reactions_interaction", "interaction_id"),
        # 0004 (signals): reaction datasets and the nightly count read reactions by type.
        Index("ix_reactions_signal", "reaction", "dwell_ms"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # idempotency key hash
    interaction_id: Mapped[str] = mapped_column(
        ForeignKey("interactions.id", ondelete="CASCADE"), nullable=False
    )
    reaction: Mapped[str] = mapped_column(String(32), nullable=False)
    dwell_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)  # 0007
    created_at: Mapped[datetime] = _created()
    client_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # 0009


class UserErasure(Base):
    """A user whose data was erased (`tuneloop forget`): by salted hash, never the raw id.
    Future snapshots exclude the user; `snapshots` lists the existing ones that held them."""

    __tablename__ = "user_erasures"

    user_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    requested_at: Mapped[datetime] = _created()
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    snapshots: Mapped[list[Any]] = mapped_column(JSONB, nullable=False, default=list)


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_model_active", "model_name", "active"),)  # 0007

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), nullable=False)
    champion_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    challenger_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mode: Mapped[str] = mapped_column(String(16), nullable=False)  # canary | mirror | off
    share: Mapped[float] = mapped_column(Float, nullable=False, default=0.05)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    started_at: Mapped[datetime] = _created()
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ComparisonReport(Base):
    __tablename__ = "comparison_reports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    decision: Mapped[str] = mapped_column(String(32), nullable=False)
    applied: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    report_uri: Mapped[str] = mapped_column(Text, nullable=False, default="")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # 0007
    created_at: Mapped[datetime] = _created()


class LlmCacheEntry(Base):
    """Response cache keyed by sha256 of (endpoint, model, messages, params)."""

    __tablename__ = "llm_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(500), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    response: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _created()
