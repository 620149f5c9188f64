"""Curation: row filters, near-duplicate pruning, the gate and the snapshot of a curated dataset.

`curate(cfg)` is the stage entry point (DAG `curate_dataset`). It loads candidate conversations
(`CandidateRow`, tasks/curate/rows.py) with their latest tags (`tasks.tag.stage.latest_tags`)
and rubric outcomes (`tasks.judge.stage.rubric_outcomes`), measures turns, words and tokens
(tasks/curate/tokens.py), then (tasks/curate/filters.py):

1. **Row filters** (seed 000 §6) — pure functions of (row, config), each returning an `Exclusion`
   (reason + detail with the observed value and the threshold) or None: generation status,
   malformed messages, incomplete provenance, required taggers present, hallucination score
   <= max_hallucination, emotion confidence >= min_emotion_confidence, no rubric safety-gate
   failure, rubric pass, and length bounds (turns, words, tokens vs `sequence_len`). Every
   failing filter is recorded, not just the first, so `explain_exclusion` gives the whole story.
2. **Set filters**: exact content duplicates, then cosine pruning of near duplicates (greedy, the
   best-scored row of a group survives) — exact blocked matrix products up to `exact_limit` rows,
   random-hyperplane LSH (verified with exact cosine) beyond.
3. **Split** (seeded by conversation id, so a row keeps its split when others are added), PII
   scrubbing of every exported text (`tasks.datasets.deid`), the **GE gate** on the kept rows
   (`tasks.datasets.gate`), and the immutable **snapshot** (`tasks.datasets.export`) with stats
   and Data Docs.

The knobs are `CurationConfig` (tasks/curate/config.py). A failed gate raises nothing: the
snapshot records gate_passed=False and the DAG short-circuits.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tasks.core.db.engine import session_scope
from tasks.core.db.models import Conversation, Dataset, DatasetExclusion, GenerationBatch, Persona
from tasks.curate.config import CurationConfig, CurationError
from tasks.curate.filters import apply_filters, assign_splits, explain
from tasks.curate.rows import CandidateRow
from tasks.curate.tokens import TokenCounter, measure_rows
from tasks.datasets import deid
from tasks.datasets.export import (
    MANIFEST,
    ExportRow,
    SnapshotWriter,
    chat_messages,
    existing_dataset,
    format_path,
    histogram,
    manifest,
    record_snapshot,
    snapshot_complete,
    snapshot_dir,
    snapshot_hash,
    write_formats,
    write_json,
    write_jsonl,
    write_stat_plots,
)

log = logging.getLogger(__name__)

DEFAULT_EDGE_CASE_SHARE = 0.15  # seed 001: ~15% edge cases, when no taxonomy is readable
DATASET_KIND = "curated"


# ---- loading -----------------------------------------------------------------------------------
def load_candidates(session: Session, cfg: CurationConfig) -> list[CandidateRow]:
    """Conversations (one batch, or all) with persona, latest tags and rubric outcome."""
    from tasks.judge.stage import rubric_outcomes
    from tasks.tag.stage import latest_tags

    stmt = (select(Conversation, Persona.name, Persona.attributes)
            .outerjoin(Persona, Persona.id == Conversation.persona_id)
            .order_by(Conversation.id))
    if cfg.batch_id:
        stmt = stmt.where(Conversation.batch_id == cfg.batch_id)
    rows: list[CandidateRow] = []
    for conv, persona_name, persona_attributes in session.execute(stmt):
        rows.append(CandidateRow(
            conversation_id=conv.id, messages=list(conv.messages or []),
            system_prompt=conv.system_prompt or "", batch_id=conv.batch_id, status=conv.status,
            failure_reason=conv.failure_reason, duplicate_of=conv.duplicate_of,
            persona_id=conv.persona_id,
            persona={"name": persona_name, "attributes": persona_attributes or {}},
            taxonomy_cell=dict(conv.taxonomy_cell or {}), is_edge_case=bool(conv.is_edge_case),
            content_hash=conv.content_hash, embedding=conv.embedding,
            template_hashes=dict(conv.template_hashes or {}), model=conv.model or ""))
    ok_ids = [r.conversation_id for r in rows if r.status == "ok"]
    tags = latest_tags(session, ok_ids) if ok_ids else {}
    outcomes = (rubric_outcomes(session, ok_ids, rubric_version=cfg.rubric_version,
                                policy=cfg.rubric_policy) if ok_ids else {})
    for row in rows:
        row.tags = dict(tags.get(row.conversation_id, {}))
        outcome = outcomes.get(row.conversation_id)
        row.rubric = outcome.to_dict() if outcome is not None else None
    return rows


def resolve_edge_case_target(session: Session | None, cfg: CurationConfig) -> float | None:
    """The edge-case share the gate expects: config, else the batch's generation setting, else
    the taxonomy file (include/rubrics/taxonomy.yaml), else seed 001's 15%."""
    if cfg.edge_case_tolerance is None:
        return None
    if cfg.edge_case_target is not None:
        return cfg.edge_case_target
    if session is not None and cfg.batch_id:
        batch = session.get(GenerationBatch, cfg.batch_id)
        share = (batch.params or {}).get("edge_case_share") if batch else None
        if share is not None:
            return float(share)
    try:
        from tasks.generate.taxonomy import load_taxonomy

        return float(load_taxonomy().edge_cases.share)
    except Exception:  # no readable taxonomy: fall back to the seed's default
        log.warning("taxonomy not readable; edge-case target falls back to %.2f",
                    DEFAULT_EDGE_CASE_SHARE, exc_info=True)
        return DEFAULT_EDGE_CASE_SHARE


# ---- export rows, gate frame, stats ------------------------------------------------------------
def _persona_names(row: CandidateRow) -> set[str]:
    names = set()
    if row.persona.get("name"):
        names.add(str(row.persona["name"]))
        names.update(p for p in str(row.persona["name"]).split() if len(p) >= 3)
    return names | deid.names_in(row.persona.get("attributes") or {})


@dataclass
class Exported:
    """Export rows plus what the gate checks about them."""

    rows: list[ExportRow]
    texts: list[str]  # joined message texts, what the PII expectation scans
    pii: list[str]  # PII categories still detected per row, comma-joined (must be '')
    scrubbed_rows: int  # rows whose text changed by scrubbing


def export_rows(rows: Sequence[CandidateRow], cfg: CurationConfig) -> Exported:
    """De-identified export rows with their provenance metadata."""
    out: list[ExportRow] = []
    texts: list[str] = []
    pii: list[str] = []
    scrubbed = 0
    for row in rows:
        names = _persona_names(row) if cfg.scrub_persona_names else set()
        chat = chat_messages(row.system_prompt, row.messages)
        clean = deid.scrub_messages(chat, names, pseudonymize=cfg.pseudonymize)
        if clean != chat:
            scrubbed += 1
        metadata = {
            "conversation_id": row.conversation_id,
            "batch_id": row.batch_id,
            "split": row.split,
            "persona": {"id": row.persona_id,
                        "attributes": deid.scrub_value(row.persona.get("attributes") or {},
                                                       names)},
            "taxonomy_cell": row.taxonomy_cell,
            "is_edge_case": row.is_edge_case,
            "tags": deid.scrub_value(row.tags, names),
            "scores": {"hallucination_score": row.hallucination_score,
                       "emotion_confidence": row.emotion_confidence,
                       "rubric_score": row.rubric_score,
                       "rubric_passed": (row.rubric or {}).get("passed"),
                       "turns": row.turns, "words": row.words, "tokens": row.tokens},
            "rubric": ({k: row.rubric.get(k) for k in ("rubric_version", "failed_criteria",
                                                       "judges")} if row.rubric else None),
            "template_hashes": row.template_hashes,
            "model": row.model,
            "content_hash": row.content_hash,
        }
        out.append(ExportRow(item_id=row.conversation_id, split=row.split, messages=clean,
                             metadata=metadata, conversation_id=row.conversation_id))
        text = "\n".join(m["content"] for m in clean)
        texts.append(text)
        pii.append(",".join(deid.pii_categories(text, names)))
    return Exported(out, texts, pii, scrubbed)


def gate_frame(rows: Sequence[CandidateRow], texts: Sequence[str], cfg: CurationConfig,
               pii: Sequence[str] | None = None):
    """The pandas frame the gate validates (columns: tasks.datasets.gate.CURATED_COLUMNS)."""
    import pandas as pd

    if pii is None:  # detect here: a frame never reaches the gate without its PII column
        from tasks.datasets.gate import pii_column

        pii = pii_column(list(texts))
    return pd.DataFrame({
        "conversation_id": [r.conversation_id for r in rows],
        "content_hash": [r.content_hash for r in rows],
        "persona_id": [r.persona_id for r in rows],
        "topic": [r.topic for r in rows],
        "is_edge_case": np.asarray([float(r.is_edge_case) for r in rows], dtype=float),
        "hallucination_score": np.asarray(
            [np.nan if r.hallucination_score is None else r.hallucination_score for r in rows],
            dtype=float),
        "emotion_confidence": np.asarray(
            [np.nan if r.emotion_confidence is None else r.emotion_confidence for r in rows],
            dtype=float),
        "missing_taggers": np.asarray(
            [sum(1 for t in cfg.required_taggers if t not in r.tags) for r in rows], dtype=int),
        "rubric_passed": [bool((r.rubric or {}).get("passed")) for r in rows],
        "safety_failed": [bool((r.rubric or {}).get("safety_failed")) for r in rows],
        "turns": np.asarray([r.turns for r in rows], dtype=int),
        "words": np.asarray([r.words for r in rows], dtype=int),
        "tokens": np.asarray([r.tokens for r in rows], dtype=int),
        "text": list(texts),
        "pii": list(pii),
    })


def _labels(output: dict[str, Any]) -> list[str]:
    """Short categorical labels in a tagger output (lists of strings, short strings)."""
    labels: list[str] = []
    for key, value in output.items():
        if key in ("confidence", "hallucination_score", "reasoning", "claims", "beliefs",
                   "stances", "raw", "backend", "method"):
            continue
        if isinstance(value, str) and 0 < len(value) <= 40:
            labels.append(value)
        elif isinstance(value, list):
            labels.extend(v for v in value if isinstance(v, str) and 0 < len(v) <= 40)
    return labels


def build_stats(rows: Sequence[CandidateRow], kept: Sequence[CandidateRow],
                exclusions: Sequence[dict[str, Any]], cfg: CurationConfig,
                dedup: dict[str, Any], exported: Exported) -> dict[str, Any]:
    """kept/dropped per reason, score histograms (kept vs dropped), tag frequencies (from the
    de-identified tags: labels are free text a tagger wrote), topics, lengths."""
    kept_ids = {r.conversation_id for r in kept}
    dropped_rows = [r for r in rows if r.conversation_id not in kept_ids]
    by_reason = Counter(e["reason"] for e in exclusions)
    frequencies: dict[str, Counter] = {}
    for export_row in exported.rows:
        for tagger, output in export_row.metadata.get("tags", {}).items():
            if isinstance(output, dict):
                frequencies.setdefault(tagger, Counter()).update(_labels(output))

    def hist(values_kept: list, values_dropped: list, threshold: float | None) -> dict:
        k = histogram(values_kept)
        d = histogram(values_dropped)
        return {"edges": k["edges"], "kept": {"counts": k["counts"]},
                "dropped": {"counts": d["counts"]}, "threshold": threshold}

    tokens = [r.tokens for r in kept]
    return {
        "candidates": len(rows),
        "kept": len(kept),
        "excluded": len(dropped_rows),
        "train": sum(1 for r in kept if r.split == "train"),
        "validation": sum(1 for r in kept if r.split == "validation"),
        "dropped_by_reason": dict(sorted(by_reason.items(), key=lambda x: (-x[1], x[0]))),
        "histograms": {
            "hallucination_score": hist(
                [r.hallucination_score for r in kept], [r.hallucination_score for r in dropped_rows],
                cfg.max_hallucination),
            "emotion_confidence": hist(
                [r.emotion_confidence for r in kept], [r.emotion_confidence for r in dropped_rows],
                cfg.min_emotion_confidence),
        },
        "tag_frequencies": {t: dict(c.most_common(50)) for t, c in sorted(frequencies.items())},
        "topics": dict(Counter(r.topic for r in kept).most_common()),
        "personas": len({r.persona_id for r in kept}),
        "edge_case_share": (sum(r.is_edge_case for r in kept) / len(kept)) if kept else None,
        "max_tokens": max(tokens) if tokens else 0,
        "mean_tokens": (sum(tokens) / len(tokens)) if tokens else 0,
        "pii_scrubbed_rows": exported.scrubbed_rows,
        "dedup": dedup,
    }


# ---- the stage ---------------------------------------------------------------------------------
def curate(cfg: CurationConfig | None = None, *, engine: Engine | None = None) -> dict[str, Any]:
    """Filter, gate and snapshot the candidate conversations. Returns the XCom-sized result:
    {"dataset_id", "gate_passed", "failed_expectations", "counts", "artifact_uri", "train_path",
    "val_path", "data_docs", "content_hash", "created", "timings"}."""
    cfg = cfg or CurationConfig()
    with session_scope(engine) as session:
        rows = load_candidates(session, cfg)
        target = resolve_edge_case_target(session, cfg)
    if not rows:
        where = f"batch {cfg.batch_id!r}" if cfg.batch_id else "the database"
        raise CurationError(f"no conversations in {where}; generate (and tag) a batch first, "
                            "or set batch_id to an existing generation batch")
    return curate_rows(rows, cfg, engine=engine, edge_case_target=target)


def curate_rows(rows: Sequence[CandidateRow], cfg: CurationConfig, *,
                engine: Engine | None = None, edge_case_target: float | None = None,
                counter: TokenCounter | None = None, record: bool = True) -> dict[str, Any]:
    """The curation pipeline on in-memory candidate rows (what `curate` runs after loading)."""
    from tasks.datasets.gate import run_curated_gate

    clock = _Stopwatch()
    with clock("measure"):
        measure_rows(rows, cfg, counter)
    with clock("filter"):
        kept, exclusions, dedup = apply_filters(rows, cfg)
        assign_splits(kept, cfg.val_fraction, cfg.seed)
    with clock("deidentify"):
        exported = export_rows(kept, cfg)
    if edge_case_target is None and cfg.edge_case_tolerance is not None:
        edge_case_target = (cfg.edge_case_target if cfg.edge_case_target is not None
                            else resolve_edge_case_target(None, cfg))
    filters = cfg.fingerprint(edge_case_target)
    snapshot_content_hash = snapshot_hash(DATASET_KIND, exported.rows, filters)
    dataset_id = snapshot_content_hash[:16]
    final = snapshot_dir(dataset_id)
    existing = existing_dataset(engine, snapshot_content_hash) if record else None
    stats = build_stats(rows, kept, exclusions, cfg, dedup, exported)
    counts = {k: stats[k] for k in ("candidates", "kept", "excluded", "train", "validation",
                                    "dropped_by_reason", "max_tokens")}

    created = False
    if existing is not None and snapshot_complete(final):
        gate_result = dict(existing.gate_result)
        log.info("dataset %s already exists with the same content; nothing to do", dataset_id)
    elif snapshot_complete(final):
        gate_result = _read_gate_result(final)
    else:
        with SnapshotWriter(dataset_id) as writer:
            with clock("gate"):
                frame = gate_frame(kept, exported.texts, cfg, exported.pii)
                gate_result = run_curated_gate(frame, _gate_spec(cfg, edge_case_target),
                                               docs_dir=writer.tmp / "gate" / "data_docs")
            with clock("write"):
                files = write_formats(writer.tmp, exported.rows, cfg.formats)
                write_json(writer.tmp / "stats" / "stats.json", stats)
                write_stat_plots(writer.tmp / "stats", stats)
                write_jsonl(writer.tmp / "exclusions.jsonl", (deid.scrub_value(
                    {**e, "explanation": explain(e["reason"], e["detail"])})
                    for e in exclusions))
            gate_result = _relative_docs(gate_result, writer.tmp)
            write_json(writer.tmp / "gate" / "result.json", gate_result)
            write_json(writer.tmp / MANIFEST, manifest(
                dataset_id, DATASET_KIND, snapshot_content_hash, filters, counts, files,
                gate_result))
            created = writer.commit()
        if not created:
            gate_result = _read_gate_result(final)
    gate_result = _absolute_docs(gate_result, final)
    if existing is None and record:
        with clock("record"):
            record_snapshot(engine, dataset={
                "id": dataset_id, "name": cfg.name, "kind": DATASET_KIND,
                "content_hash": snapshot_content_hash, "filters": filters, "counts": counts,
                "gate_passed": bool(gate_result["success"]), "gate_result": gate_result,
                "artifact_uri": final.as_uri(),
            }, rows=exported.rows, exclusions=exclusions)
    passed = bool(gate_result["success"])
    log_fn = log.info if passed else log.warning
    log_fn("dataset %s: %d kept of %d, gate %s%s", dataset_id, len(kept), len(rows),
           "passed" if passed else "FAILED",
           "" if passed else f" ({', '.join(gate_result['failed_expectations'])})")
    primary = "openai" if "openai" in cfg.formats else cfg.formats[0]
    return {
        "dataset_id": dataset_id,
        "gate_passed": passed,
        "failed_expectations": list(gate_result["failed_expectations"]),
        "counts": counts,
        "artifact_uri": final.as_uri(),
        "train_path": str(format_path(final, primary, "train")),
        "val_path": str(format_path(final, primary, "validation")),
        "data_docs": gate_result.get("data_docs"),
        "content_hash": snapshot_content_hash,
        "created": created,
        "timings": clock.seconds(),
    }


class _Stopwatch:
    """Wall time per named stage (logged and returned, so slow stages are visible in XCom)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._seconds.items()}


def _gate_spec(cfg: CurationConfig, edge_case_target: float | None):
    from tasks.datasets.gate import GateSpec

    return GateSpec(
        max_hallucination=cfg.max_hallucination,
        min_emotion_confidence=cfg.min_emotion_confidence,
        required_taggers=cfg.required_taggers, require_rubric_pass=cfg.require_rubric_pass,
        max_turns=cfg.max_turns, min_words=cfg.min_words, max_words=cfg.max_words,
        sequence_len=cfg.sequence_len, edge_case_target=edge_case_target,
        edge_case_tolerance=cfg.edge_case_tolerance or 0.0, min_rows=cfg.min_rows,
        min_topic_diversity=cfg.min_topic_diversity,
        min_persona_diversity=cfg.min_persona_diversity)


def _relative_docs(gate_result: dict[str, Any], root: Path) -> dict[str, Any]:
    docs = gate_result.get("data_docs")
    if docs:
        gate_result = {**gate_result, "data_docs": str(Path(docs).relative_to(root))}
    return gate_result


def _absolute_docs(gate_result: dict[str, Any], root: Path) -> dict[str, Any]:
    docs = gate_result.get("data_docs")
    if docs and not Path(docs).is_absolute():
        gate_result = {**gate_result, "data_docs": str(root / docs)}
    return gate_result


def _read_gate_result(root: Path) -> dict[str, Any]:
    import json

    return json.loads((root / "gate" / "result.json").read_text(encoding="utf-8"))


# ---- explainability ----------------------------------------------------------------------------
def explain_exclusion(session: Session, conversation_id: str) -> list[dict[str, Any]]:
    """Why a conversation is not in each dataset that considered it, newest dataset first:
    [{"dataset_id", "dataset_name", "dataset_kind", "reason", "detail", "explanation",
    "created_at"}]. Empty when it was never excluded."""
    stmt = (select(DatasetExclusion, Dataset.name, Dataset.kind, Dataset.created_at)
            .join(Dataset, Dataset.id == DatasetExclusion.dataset_id)
            .where(DatasetExclusion.conversation_id == conversation_id)
            .order_by(Dataset.created_at.desc(), Dataset.id, DatasetExclusion.reason))
    return [{
        "dataset_id": exclusion.dataset_id,
        "dataset_name": name,
        "dataset_kind": kind,
        "reason": exclusion.reason,
        "detail": exclusion.detail,
        "explanation": explain(exclusion.reason, exclusion.detail),
        "created_at": created_at.isoformat() if created_at else None,
    } for exclusion, name, kind, created_at in session.execute(stmt)]
