"""Dataset snapshots and export formats: immutable, content-hashed folders plus their lineage rows.

A snapshot lives at `<settings.data_dir>/datasets/<dataset_id>/`, where dataset_id is a prefix of
the content hash of (training rows + filters). It is written into a temporary sibling folder and
renamed into place in one step, so a reader sees either nothing or the whole snapshot; a snapshot
that exists is never overwritten (same content → same id → no-op).

Formats (one folder each, a train and a validation file, each with a provenance twin):
- ``openai``   — ``{"messages": [{"role", "content"}, ...]}``: what the local trainer reads.
- ``sharegpt`` — ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}]}``: the form
  Axolotl's ``chat_template`` dataset type reads (``field_messages: conversations``).
- ``alpaca``   — ``{"instruction", "input", "output"}`` (seed 004).
Training files carry only what training reads; ``*.provenance.jsonl`` adds a ``metadata`` field
with ids, persona, tags, scores and template hashes.

The datasets row, its dataset_items (lineage, one per exported example) and dataset_exclusions
(why a candidate is not in it) are written with `record_snapshot` in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Dataset, DatasetExclusion, DatasetItem
from tasks.core.ids import canonical_json, content_hash
from tasks.core.settings import get_settings

log = logging.getLogger(__name__)

ExportFormat = Literal["openai", "sharegpt", "alpaca"]
EXPORT_FORMATS: tuple[str, ...] = ("openai", "sharegpt", "alpaca")
SPLITS = ("train", "validation")
DATASET_ID_LENGTH = 16
MANIFEST = "manifest.json"

SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


# ---- formats -----------------------------------------------------------------------------------
def chat_messages(system_prompt: str, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages: the system prompt first (when set), then role/content only."""
    out: list[dict[str, str]] = []
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        out.append({"role": "system", "content": system_prompt})
    out.extend({"role": str(m["role"]), "content": str(m.get("content", ""))} for m in messages)
    return out


def to_openai(messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def to_sharegpt(messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    return {"conversations": [{"from": SHAREGPT_ROLES.get(m["role"], m["role"]),
                               "value": m["content"]} for m in messages]}


def render_history(messages: Sequence[Mapping[str, str]]) -> str:
    """Earlier turns as plain text, one `role: content` paragraph each (Alpaca `input`)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def to_alpaca(messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """instruction = the last user message, input = everything before it, output = the reply."""
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    last_user = max(i for i, m in enumerate(messages[:last_assistant]) if m["role"] == "user")
    return {
        "instruction": messages[last_user]["content"],
        "input": render_history(messages[:last_user]),
        "output": messages[last_assistant]["content"],
    }


FORMATTERS = {"openai": to_openai, "sharegpt": to_sharegpt, "alpaca": to_alpaca}


def format_row(fmt: str, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    try:
        return FORMATTERS[fmt](messages)
    except KeyError:
        raise ValueError(f"unknown export format {fmt!r}; use one of "
                         f"{', '.join(EXPORT_FORMATS)}") from None


# ---- snapshot rows -----------------------------------------------------------------------------
@dataclass
class ExportRow:
    """One exported example: chat messages (already de-identified) and its provenance."""

    item_id: str
    split: str
    messages: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    conversation_id: str | None = None
    interaction_id: str | None = None
    # Rows that are not chat transcripts (DPO pairs) carry their own record per format.
    records: dict[str, dict[str, Any]] | None = None

    def record(self, fmt: str) -> dict[str, Any]:
        if self.records is not None:
            return self.records[fmt]
        return format_row(fmt, self.messages)

    @property
    def row_hash(self) -> str:
        if self.records is not None:
            return content_hash(self.records)
        return content_hash(self.messages)


def snapshot_hash(kind: str, rows: Iterable[ExportRow], filters: Mapping[str, Any]) -> str:
    """Content hash of a snapshot: what is trained on (rows, their split) and how it was chosen."""
    body = sorted((r.item_id, r.split, r.row_hash) for r in rows)
    return content_hash({"kind": kind, "filters": dict(filters), "rows": body})


def datasets_dir() -> Path:
    return (get_settings().data_dir / "datasets").resolve()


def snapshot_dir(dataset_id: str) -> Path:
    return datasets_dir() / dataset_id


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(dumps(record))
            handle.write("\n")
            count += 1
    return count


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str),
                    encoding="utf-8")


def format_path(root: Path, fmt: str, split: str, provenance: bool = False) -> Path:
    return root / fmt / (f"{split}.provenance.jsonl" if provenance else f"{split}.jsonl")


def write_formats(root: Path, rows: Sequence[ExportRow], formats: Sequence[str]) -> dict[str, str]:
    """Write every format × split (training + provenance twin); returns {relative path: sha256}.

    Each record is JSON-encoded once: the provenance line is the training line with the
    (once-per-row encoded) metadata spliced in, so the two files cannot disagree.
    """
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
    metadata = {id(r): encode(r.metadata) for r in rows}
    written: dict[str, str] = {}
    by_split = {split: [r for r in rows if r.split == split] for split in SPLITS}
    for fmt in formats:
        for split, split_rows in by_split.items():
            train_path = format_path(root, fmt, split)
            prov_path = format_path(root, fmt, split, provenance=True)
            train_path.parent.mkdir(parents=True, exist_ok=True)
            train_digest, prov_digest = hashlib.sha256(), hashlib.sha256()
            with open(train_path, "wb") as train, open(prov_path, "wb") as prov:
                for row in split_rows:
                    line = encode(row.record(fmt))
                    train_line = (line + "\n").encode()
                    prov_line = (f'{line[:-1]},"metadata":{metadata[id(row)]}}}\n').encode()
                    train.write(train_line)
                    prov.write(prov_line)
                    train_digest.update(train_line)
                    prov_digest.update(prov_line)
            written[str(train_path.relative_to(root))] = train_digest.hexdigest()
            written[str(prov_path.relative_to(root))] = prov_digest.hexdigest()
    return written


class SnapshotWriter:
    """Write a snapshot into a temporary folder, then rename it into place atomically.

    Use as a context manager: files go under `.tmp`; `commit()` publishes them. If the final
    folder already exists (a rerun, or another worker won the race) the temporary folder is
    discarded and the existing snapshot is kept untouched.
    """

    def __init__(self, dataset_id: str, root: Path | None = None):
        self.dataset_id = dataset_id
        self.root = (root or datasets_dir())
        self.final = self.root / dataset_id
        self.tmp = self.root / f".tmp-{dataset_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def __enter__(self) -> SnapshotWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True)
        return self

    def commit(self) -> bool:
        """Publish the snapshot; False when it already existed (nothing replaced)."""
        if self.final.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if self.final.exists():  # lost a race: the other copy has the same content
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            raise
        self.committed = True
        return True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def snapshot_complete(path: Path) -> bool:
    """A published snapshot has its manifest (written last into the temporary folder)."""
    return (path / MANIFEST).is_file()


# ---- statistics --------------------------------------------------------------------------------
def histogram(values: Sequence[float], bins: int = 10, low: float = 0.0, high: float = 1.0
              ) -> dict[str, list[float] | list[int]]:
    import numpy as np

    array = np.asarray([v for v in values if v is not None], dtype=float)
    counts, edges = np.histogram(np.clip(array, low, high), bins=bins, range=(low, high))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def write_stat_plots(root: Path, stats: Mapping[str, Any]) -> list[str]:
    """PNG charts for the stats: kept/dropped per reason, score histograms, tag frequencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(root / name, dpi=90)
        plt.close(fig)
        written.append(name)

    dropped = dict(stats.get("dropped_by_reason", {}))
    labels = ["kept", *dropped]
    values = [stats.get("kept", 0), *dropped.values()]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    ax.barh(labels, values, color=["#2a9d8f"] + ["#e76f51"] * len(dropped))
    ax.invert_yaxis()
    ax.set_xlabel("conversations")
    ax.set_title("kept vs dropped (per reason; a row may have several reasons)")
    save(fig, "kept_dropped.png")

    for name, hist in stats.get("histograms", {}).items():
        fig, ax = plt.subplots(figsize=(6, 3.2))
        edges = hist["edges"]
        width = edges[1] - edges[0] if len(edges) > 1 else 0.1
        kept = hist.get("kept", {}).get("counts", [])
        dropped_counts = hist.get("dropped", {}).get("counts", [])
        if kept:
            ax.bar(edges[:-1], kept, width=width, align="edge", label="kept", color="#2a9d8f")
        if dropped_counts:
            ax.bar(edges[:-1], dropped_counts, width=width, align="edge", bottom=kept or None,
                   label="dropped", color="#e76f51")
        if hist.get("threshold") is not None:
            ax.axvline(hist["threshold"], color="black", linestyle="--", label="threshold")
        ax.set_xlabel(name)
        ax.set_ylabel("conversations")
        ax.legend()
        save(fig, f"{name}_hist.png")

    frequencies = stats.get("tag_frequencies", {})
    flat = sorted(((f"{tagger}:{label}", n) for tagger, counts in frequencies.items()
                   for label, n in counts.items()), key=lambda x: (-x[1], x[0]))[:25]
    if flat:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(flat) + 1.2))
        ax.barh([k for k, _ in flat], [v for _, v in flat], color="#264653")
        ax.invert_yaxis()
        ax.set_title("tag frequencies among kept rows (top 25)")
        save(fig, "tag_frequencies.png")
    return written


# ---- lineage -----------------------------------------------------------------------------------
def record_snapshot(
    engine: Engine | None,
    *,
    dataset: dict[str, Any],
    rows: Sequence[ExportRow],
    exclusions: Sequence[dict[str, Any]] = (),
) -> None:
    """Upsert the datasets row, its items and exclusions in one transaction (idempotent)."""
    items = [{"dataset_id": dataset["id"], "item_id": r.item_id,
              "conversation_id": r.conversation_id, "interaction_id": r.interaction_id,
              "split": r.split, "row_hash": r.row_hash} for r in rows]
    excluded = [{"dataset_id": dataset["id"], **e} for e in exclusions]
    with session_scope(engine) as session:
        upsert(session, Dataset, [dataset])
        # Bulk rows go as one executemany of INSERT ... ON CONFLICT (SQLAlchemy batches it
        # into multi-row statements): as idempotent as `upsert`, ~5x faster at 100k rows than
        # compiling one large VALUES list per chunk.
        if items:
            session.execute(pg_insert(DatasetItem).on_conflict_do_nothing(), items)
        if excluded:
            stmt = pg_insert(DatasetExclusion)
            session.execute(stmt.on_conflict_do_update(
                index_elements=["dataset_id", "conversation_id", "reason"],
                set_={"detail": stmt.excluded.detail}), excluded)


def existing_dataset(engine: Engine | None, snapshot_content_hash: str) -> Dataset | None:
    with session_scope(engine) as session:
        return session.scalar(select(Dataset).where(Dataset.content_hash == snapshot_content_hash))


def manifest(dataset_id: str, kind: str, snapshot_content_hash: str, filters: Mapping[str, Any],
             counts: Mapping[str, Any], files: Mapping[str, str], gate: Mapping[str, Any] | None
             ) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "kind": kind,
        "content_hash": snapshot_content_hash,
        "filters": json.loads(canonical_json(filters)),
        "counts": dict(counts),
        "files": dict(sorted(files.items())),
        "gate": {k: gate[k] for k in ("success", "failed_expectations") if k in gate}
        if gate else None,
    }
