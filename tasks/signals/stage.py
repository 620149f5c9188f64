"""Datasets from production reaction signals (seed 004): served interactions + user reactions.

Rules (windows configurable in `SignalConfig`):
- **positive**: reaction ``done`` with ``done_min_ms <= dwell_ms <= done_max_ms`` (15 s–2 min,
  inclusive, as the seed's ``BETWEEN 15000 AND 120000``);
- **negative**: reaction ``dismiss`` with ``dwell_ms < dismiss_max_ms`` (under 5 s);
- an interaction with both a positive and a negative reaction is *conflicting* and left out;
  every other reaction is no signal.

Positives become SFT rows (the served prompt + the reply, in the openai/sharegpt/alpaca
formats); chosen/rejected pairs for the same context — or, failing that, an embedding-near-
identical one (MiniLM cosine >= `pair_similarity`) — become DPO pairs (TRL's conversational
``prompt``/``chosen``/``rejected``). Below `min_positive`/`min_negative` the build refuses with
`InsufficientSignals`, which carries the counts; `count_new_signals` / `nightly_decision` give the
nightly retrain its skip decision without building anything.

Privacy (seed 004): user ids are HMAC-hashed with the secret salt, and every exported text and
artifact is scrubbed by `tasks.datasets.deid` (emails, phones, secret URLs, tokens, names from known
context fields). The written snapshot is scanned for PII before it is published.

Security (#15):
- only interactions the router served and the user saw are signals: variant champion or
  challenger, status ok — or rows an operator imported from a trusted log
  (`tasks.signals.importing`), marked three ways (variant ``imported``, context source
  ``import``, client id ``import:<source>``; none of which the router writes); mirror copies, failed requests, interactions whose text was purged
  (retention) or erased (`tuneloop forget`), and anything an erased user sent before their erasure
  was requested are never read as signals (counted as ``reactions_not_served`` /
  ``reactions_text_purged`` / ``reactions_erased``);
- **no forged feedback**: a client sends the whole chat history, so it could write "assistant"
  turns itself and react ``done`` to have its own words trained on. Every message of a request
  whose role is not one a client authors (system, developer, user, tool, function) must be an
  answer the router itself served earlier to the same user (and the same API client, when the
  interaction names one): same md5 of the raw content as the indexed `response_md5` of a served
  champion/challenger row with status ok. An example with any other assistant turn is dropped
  (``unverified_history``). Anonymous users have a random hash per request, so only their
  single-turn examples can be signals;
- each hashed user contributes at most `max_examples_per_user` examples (``capped_per_user``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tasks.core.db.engine import session_scope
from tasks.core.db.models import Dataset, Interaction, Reaction
from tasks.core.ids import canonical_json, content_hash, stable_id
from tasks.datasets import deid
from tasks.datasets.export import (
    MANIFEST,
    ExportRow,
    SnapshotWriter,
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
    write_stat_plots,
)
from tasks.signals.config import SignalConfig, SignalConfigError
from tasks.signals.labels import (
    CLIENT_ROLES,
    QUERY_CHUNK,
    SERVED_VARIANTS,
    Label,
    Labels,
    classify_reaction,
    label_interactions,
    over_user_cap,
    unverified_history,
)

# Re-exported: the DAGs, the CLI and the tests import them here.
__all__ = ["SERVED_VARIANTS", "Labels", "SignalConfig", "SignalConfigError", "classify_reaction",
           "label_interactions", "over_user_cap", "unverified_history"]

log = logging.getLogger(__name__)

DATASET_KIND = "reaction"
# Context keys the router records for routing, never exported: `bucket` is a function of the
# user hash (it would link one user's examples across snapshots, and kept two users' identical
# prompts from ever being the "same context"; its 0.dddddd digits also read as a phone number).
ROUTING_ONLY_CONTEXT = frozenset({"bucket"})
DWELL_HISTOGRAM_MAX_MS = 24 * 3600 * 1000  # a multiple of the 24 bins' whole seconds


class InsufficientSignals(RuntimeError):
    """Too few reaction signals to build a dataset; carries the counts and the minimums."""

    def __init__(self, *, positive: int, negative: int, min_positive: int, min_negative: int,
                 conflicting: int = 0, since_dataset_id: str | None = None):
        self.positive = positive
        self.negative = negative
        self.min_positive = min_positive
        self.min_negative = min_negative
        self.conflicting = conflicting
        self.since_dataset_id = since_dataset_id
        short = []
        if positive < min_positive:
            short.append(f"{positive} positive (need >= {min_positive})")
        if negative < min_negative:
            short.append(f"{negative} negative (need >= {min_negative})")
        since = f" since dataset {since_dataset_id}" if since_dataset_id else ""
        super().__init__(
            f"not enough reaction signals{since}: {' and '.join(short)}; collect more reactions "
            "or lower min_positive/min_negative in SignalConfig"
        )

    def counts(self) -> dict[str, Any]:
        return {"positive": self.positive, "negative": self.negative,
                "conflicting": self.conflicting, "min_positive": self.min_positive,
                "min_negative": self.min_negative}


def _latest_reaction_dataset(session: Session) -> str | None:
    stmt = (select(Dataset.id).where(Dataset.kind == DATASET_KIND)
            .order_by(Dataset.created_at.desc(), Dataset.id).limit(1))
    return session.scalar(stmt)


def count_new_signals(since_dataset_id: str | None = None, cfg: SignalConfig | None = None, *,
                      engine: Engine | None = None) -> dict[str, Any]:
    """Signals from interactions not already in `since_dataset_id` (all when None)."""
    cfg = cfg or SignalConfig()
    with session_scope(engine) as session:
        labels = label_interactions(session, cfg, since_dataset_id)
    counts = labels.counts()
    return {"since_dataset_id": since_dataset_id, **counts,
            "min_positive": cfg.min_positive, "min_negative": cfg.min_negative,
            "enough": counts["positive"] >= cfg.min_positive
            and counts["negative"] >= cfg.min_negative}


def nightly_signal_config(min_new_positive: int, min_new_negative: int) -> SignalConfig:
    """The nightly build's config: its minimums are the nightly thresholds, so a run whose new
    signals met them is never refused for a stricter total (all signals >= new ones)."""
    return SignalConfig(min_positive=min_new_positive, min_negative=min_new_negative)


def nightly_decision(min_new_positive: int = 500, min_new_negative: int = 500, *,
                     cfg: SignalConfig | None = None, engine: Engine | None = None
                     ) -> dict[str, Any]:
    """Whether the nightly run should rebuild and retrain: enough new signals since the latest
    reaction dataset. Returns {"retrain", "reason", "since_dataset_id", "positive", ...}."""
    cfg = cfg or SignalConfig()
    with session_scope(engine) as session:
        since = _latest_reaction_dataset(session)
    counts = count_new_signals(since, cfg.model_copy(update={
        "min_positive": min_new_positive, "min_negative": min_new_negative}), engine=engine)
    where = f"since dataset {since}" if since else "in total (no reaction dataset yet)"
    if counts["enough"]:
        reason = (f"retraining: {counts['positive']} positive and {counts['negative']} negative "
                  f"new signals {where} (need >= {min_new_positive} / >= {min_new_negative})")
    else:
        short = []
        if counts["positive"] < min_new_positive:
            short.append(f"{counts['positive']} positive < {min_new_positive}")
        if counts["negative"] < min_new_negative:
            short.append(f"{counts['negative']} negative < {min_new_negative}")
        reason = f"skipping retrain: too few new signals {where}: {', '.join(short)}"
    return {"retrain": bool(counts["enough"]), "reason": reason, **counts}


# ---- rows --------------------------------------------------------------------------------------
@dataclass
class Signal:
    """One labelled interaction, de-identified."""

    interaction_id: str
    label: Label
    prompt: list[dict[str, str]]
    response: str
    context: dict[str, Any]
    context_key: str
    user: str
    model_name: str
    model_version: str | None
    variant: str
    dwell_ms: list[int]
    names: set[str]

    @property
    def messages(self) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": self.response}]

    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)

    def metadata(self) -> dict[str, Any]:
        return {"interaction_id": self.interaction_id, "label": self.label, "user": self.user,
                "context": self.context, "context_hash": self.context_key,
                "model_name": self.model_name, "model_version": self.model_version,
                "variant": self.variant, "dwell_ms": self.dwell_ms}


def _prompt_messages(interaction: Interaction, context: dict[str, Any], names: set[str],
                     pseudonyms: deid.Pseudonyms | None = None) -> list[dict[str, str]]:
    messages = [{"role": _role(m.get("role")),
                 "content": deid.scrub_text(str(m.get("content", "")), names,
                                            pseudonyms=pseudonyms)}
                for m in (interaction.request_messages or []) if isinstance(m, dict)]
    if not any(m["role"] == "user" for m in messages):
        # No recorded prompt: the context is what the model answered to (seed: context_json).
        messages.append({"role": "user", "content": canonical_json(context)})
    return messages


def _role(role: Any) -> str:
    """A client role as such; any other role was verified as a served answer (the examples
    with one that was not are dropped), so it is exported as what it is: the assistant's."""
    name = str(role or "user").strip().lower()
    return name if name in CLIENT_ROLES else "assistant"


def _context_key(prompt: list[dict[str, str]], context: dict[str, Any]) -> str:
    """What "the same context" means for DPO pairs: the prompt and the context, minus who the
    user was (their id is not part of the situation the reply answered)."""
    situation = {k: v for k, v in context.items() if str(k).lower() not in deid.USER_ID_FIELDS}
    return content_hash({"prompt": prompt, "context": situation})[:32]


def load_signals(session: Session, labels: Labels, *, pseudonymize: bool = False
                 ) -> list[Signal]:
    wanted = {**{i: "positive" for i in labels.positive},
              **{i: "negative" for i in labels.negative}}
    dwell: dict[str, list[int]] = defaultdict(list)
    ids = sorted(wanted)
    for start in range(0, len(ids), QUERY_CHUNK):
        chunk = ids[start:start + QUERY_CHUNK]
        for interaction_id, dwell_ms in session.execute(
                select(Reaction.interaction_id, Reaction.dwell_ms)
                .where(Reaction.interaction_id.in_(chunk))):
            dwell[interaction_id].append(int(dwell_ms))
    signals: list[Signal] = []
    for start in range(0, len(ids), QUERY_CHUNK):
        chunk = ids[start:start + QUERY_CHUNK]
        for interaction in session.scalars(select(Interaction).where(Interaction.id.in_(chunk))):
            raw_context = {k: v for k, v in (interaction.context or {}).items()
                           if k not in ROUTING_ONLY_CONTEXT}
            names = deid.names_in(raw_context) | deid.names_in(interaction.request_messages or [])
            pseudonyms = deid.Pseudonyms() if pseudonymize else None  # one per interaction
            context = deid.scrub_value(raw_context, names, pseudonyms=pseudonyms)
            prompt = _prompt_messages(interaction, context, names, pseudonyms)
            signals.append(Signal(
                interaction_id=interaction.id, label=wanted[interaction.id], prompt=prompt,
                response=deid.scrub_text(interaction.response or "", names,
                                         pseudonyms=pseudonyms), context=context,
                context_key=_context_key(prompt, context),
                user=deid.hash_user_id(interaction.user_hash),
                model_name=interaction.model_name, model_version=interaction.model_version,
                variant=interaction.variant, dwell_ms=sorted(dwell[interaction.id]),
                names=names))
    signals.sort(key=lambda s: s.interaction_id)
    return signals


def _split(item_id: str, seed: int, val_fraction: float) -> str:
    # A hash in [0, 1): stable per item, independent of what else is in the dataset.
    bucket = int(stable_id(seed, item_id, length=8), 16) / 16**8
    return "validation" if bucket < val_fraction else "train"


@dataclass(frozen=True)
class Pair:
    chosen: Signal
    rejected: Signal
    how: Literal["same_context", "embedding"]
    similarity: float


def pair_signals(signals: Sequence[Signal], cfg: SignalConfig) -> list[Pair]:
    """DPO pairs: same context first (each interaction used once), then the nearest unpaired
    context by MiniLM cosine >= pair_similarity (greedy, most similar first)."""
    by_key: dict[str, dict[str, list[Signal]]] = defaultdict(lambda: defaultdict(list))
    for signal in signals:
        by_key[signal.context_key][signal.label].append(signal)
    pairs: list[Pair] = []
    left_pos: list[Signal] = []
    left_neg: list[Signal] = []
    for key in sorted(by_key):
        pos, neg = by_key[key]["positive"], by_key[key]["negative"]
        n = min(len(pos), len(neg))
        pairs.extend(Pair(p, q, "same_context", 1.0) for p, q in zip(pos[:n], neg[:n],
                                                                      strict=True))
        left_pos.extend(pos[n:])
        left_neg.extend(neg[n:])
    if cfg.pair_by_embedding and left_pos and left_neg:
        from tasks.core.embeddings import embed

        def prompt_text(s: Signal) -> str:
            return "\n".join(f"{m['role']}: {m['content']}" for m in s.prompt)

        vectors = embed([prompt_text(s) for s in left_pos + left_neg])
        pos_v, neg_v = vectors[:len(left_pos)], vectors[len(left_pos):]
        candidates: list[tuple[float, int, int]] = []
        for start in range(0, len(left_neg), 2048):
            sims = neg_v[start:start + 2048] @ pos_v.T
            rows, cols = np.nonzero(sims >= cfg.pair_similarity)
            candidates.extend((float(sims[r, c]), start + int(r), int(c))
                              for r, c in zip(rows, cols, strict=True))
        candidates.sort(key=lambda x: (-x[0], x[1], x[2]))
        used_neg: set[int] = set()
        used_pos: set[int] = set()
        for similarity, ni, pi in candidates:
            if ni in used_neg or pi in used_pos:
                continue
            used_neg.add(ni)
            used_pos.add(pi)
            pairs.append(Pair(left_pos[pi], left_neg[ni], "embedding", round(similarity, 4)))
    pairs.sort(key=lambda p: (p.chosen.interaction_id, p.rejected.interaction_id))
    return pairs


def signal_frame(signals: Sequence[Signal]):
    """The frame the reaction gate validates (columns: tasks.datasets.gate.SIGNAL_COLUMNS)."""
    import pandas as pd

    return pd.DataFrame({
        "interaction_id": [s.interaction_id for s in signals],
        "label": [s.label for s in signals],
        "is_positive": np.asarray([int(s.label == "positive") for s in signals], dtype=int),
        "is_negative": np.asarray([int(s.label == "negative") for s in signals], dtype=int),
        "context_hash": [s.context_key for s in signals],
        "text": [s.text() + "\n" + canonical_json(s.context) for s in signals],
        "pii": [",".join(deid.pii_categories(s.text() + "\n" + canonical_json(s.context),
                                             s.names)) for s in signals],
    })


# ---- the stage ---------------------------------------------------------------------------------
def build_reaction_dataset(cfg: SignalConfig | None = None, *, engine: Engine | None = None
                           ) -> dict[str, Any]:
    """Build (or find) the reaction-signal snapshot. Raises InsufficientSignals below the
    minimums. Returns {"dataset_id", "gate_passed", "failed_expectations", "counts",
    "artifact_uri", "train_path", "val_path", "dpo_path", "data_docs", "content_hash",
    "created"}."""
    from tasks.datasets.gate import SignalGateSpec, run_signal_gate

    cfg = cfg or SignalConfig()
    with session_scope(engine) as session:
        labels = label_interactions(session, cfg, cfg.since_dataset_id)
        counts = labels.counts()
        if counts["positive"] < cfg.min_positive or counts["negative"] < cfg.min_negative:
            raise InsufficientSignals(
                positive=counts["positive"], negative=counts["negative"],
                min_positive=cfg.min_positive, min_negative=cfg.min_negative,
                conflicting=counts["conflicting"], since_dataset_id=cfg.since_dataset_id)
        signals = load_signals(session, labels, pseudonymize=cfg.pseudonymize)

    positives = [s for s in signals if s.label == "positive"]
    pairs = pair_signals(signals, cfg)
    sft_rows = [ExportRow(item_id=stable_id("sft", s.interaction_id),
                          split=_split(s.interaction_id, cfg.seed, cfg.val_fraction),
                          messages=s.messages, metadata=s.metadata(),
                          interaction_id=s.interaction_id) for s in positives]
    dpo_rows: list[ExportRow] = []
    rejected_lineage: list[ExportRow] = []
    for pair in pairs:
        pair_id = stable_id("dpo", pair.chosen.interaction_id, pair.rejected.interaction_id)
        record = {"prompt": pair.chosen.prompt,
                  "chosen": [{"role": "assistant", "content": pair.chosen.response}],
                  "rejected": [{"role": "assistant", "content": pair.rejected.response}]}
        split = _split(pair_id, cfg.seed, cfg.val_fraction)
        metadata = {"pair_id": pair_id, "pairing": pair.how, "similarity": pair.similarity,
                    "chosen": pair.chosen.metadata(), "rejected": pair.rejected.metadata()}
        dpo_rows.append(ExportRow(item_id=pair_id, split=split, messages=[], metadata=metadata,
                                  interaction_id=pair.chosen.interaction_id,
                                  records={"dpo": record}))
        rejected_lineage.append(ExportRow(
            item_id=stable_id("dpo-rejected", pair_id), split=split, messages=[],
            interaction_id=pair.rejected.interaction_id, records={"dpo": record}))

    # Negatives no pair used are still consumed signals: recording them (split "unused") keeps
    # them from counting as new signals for the nightly decision forever.
    paired = {p.rejected.interaction_id for p in pairs}
    unused = [ExportRow(item_id=stable_id("unused", s.interaction_id), split="unused",
                        messages=[], interaction_id=s.interaction_id,
                        records={"signal": {"label": s.label}})
              for s in signals if s.label == "negative" and s.interaction_id not in paired]

    filters = cfg.fingerprint()
    # The consumed signals (unused negatives too) define the snapshot, not only the files.
    snapshot_content_hash = snapshot_hash(DATASET_KIND, [*sft_rows, *dpo_rows, *unused], filters)
    dataset_id = snapshot_content_hash[:16]
    final = snapshot_dir(dataset_id)
    counts.update({
        "sft_rows": len(sft_rows),
        "sft_train": sum(r.split == "train" for r in sft_rows),
        "sft_validation": sum(r.split == "validation" for r in sft_rows),
        "dpo_pairs": len(dpo_rows),
        "dpo_pairs_same_context": sum(p.how == "same_context" for p in pairs),
        "dpo_pairs_embedding": sum(p.how == "embedding" for p in pairs),
        "negatives_unpaired": len(unused),
    })
    names = sorted(set().union(*(s.names for s in signals)) if signals else set())
    existing = existing_dataset(engine, snapshot_content_hash)
    created = False
    if existing is not None and snapshot_complete(final):
        gate_result = dict(existing.gate_result)
    elif snapshot_complete(final):
        gate_result = _read_json(final / "gate" / "result.json")
    else:
        with SnapshotWriter(dataset_id) as writer:
            gate_result = run_signal_gate(
                signal_frame(signals),
                SignalGateSpec(min_positive=cfg.min_positive, min_negative=cfg.min_negative),
                docs_dir=writer.tmp / "gate" / "data_docs")
            files = write_formats(writer.tmp, sft_rows, cfg.formats)
            files.update(write_formats(writer.tmp, dpo_rows, ["dpo"]))
            stats = _stats(labels, counts, cfg)
            write_json(writer.tmp / "stats" / "stats.json", stats)
            write_stat_plots(writer.tmp / "stats", stats)
            docs = gate_result.get("data_docs")
            gate_result = {**gate_result,
                           "data_docs": str(_relative(docs, writer.tmp)) if docs else None}
            write_json(writer.tmp / "gate" / "result.json", gate_result)
            write_json(writer.tmp / MANIFEST, manifest(
                dataset_id, DATASET_KIND, snapshot_content_hash, filters, counts, files,
                gate_result))
            # Defence in depth: nothing with PII is ever published.
            deid.assert_no_pii([p for p in writer.tmp.rglob("*") if p.is_file()], names)
            created = writer.commit()
        if not created:
            gate_result = _read_json(final / "gate" / "result.json")
    docs = gate_result.get("data_docs")
    if docs and not str(docs).startswith("/"):
        gate_result = {**gate_result, "data_docs": str(final / docs)}
    if existing is None:
        record_snapshot(engine, dataset={
            "id": dataset_id, "name": cfg.name, "kind": DATASET_KIND,
            "content_hash": snapshot_content_hash, "filters": filters, "counts": counts,
            "gate_passed": bool(gate_result["success"]), "gate_result": gate_result,
            "artifact_uri": final.as_uri(),
        }, rows=[*sft_rows, *dpo_rows, *rejected_lineage, *unused])
    log.info("reaction dataset %s: %d SFT rows, %d DPO pairs, gate %s", dataset_id,
             len(sft_rows), len(dpo_rows), "passed" if gate_result["success"] else "FAILED")
    primary = "openai" if "openai" in cfg.formats else cfg.formats[0]
    return {
        "dataset_id": dataset_id,
        "gate_passed": bool(gate_result["success"]),
        "failed_expectations": list(gate_result["failed_expectations"]),
        "counts": counts,
        "artifact_uri": final.as_uri(),
        "train_path": str(format_path(final, primary, "train")),
        "val_path": str(format_path(final, primary, "validation")),
        "dpo_path": str(format_path(final, "dpo", "train")),
        "data_docs": gate_result.get("data_docs"),
        "content_hash": snapshot_content_hash,
        "created": created,
    }


def build_reaction_dataset_or_skip(cfg: SignalConfig | None = None, *,
                                   engine: Engine | None = None) -> dict[str, Any]:
    """`build_reaction_dataset`, but too few signals is a skip, not an error:
    {"built": False, "reason", **counts} — what the DAGs short-circuit on."""
    try:
        result = build_reaction_dataset(cfg, engine=engine)
    except InsufficientSignals as exc:
        log.warning("%s", exc)
        return {"built": False, "gate_passed": False, "reason": str(exc), **exc.counts()}
    return {"built": True, **result}


def _relative(path: str, root: Any) -> Any:
    from pathlib import Path

    return Path(path).relative_to(root)


def _read_json(path: Any) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _stats(labels: Labels, counts: dict[str, Any], cfg: SignalConfig) -> dict[str, Any]:
    bins = 24
    high = max([cfg.done_max_ms * 1.5, *[max(v) for v in labels.dwell.values() if v]])
    # Whole-second edges written as integers: a long dwell (an imported log's) made edges such
    # as 8333.333333 or 168000.0, which the PII scan of the snapshot reads as phone numbers.
    # Longer dwells than a day count in the last bin.
    high = min(math.ceil(high / (bins * 1000)) * bins * 1000, DWELL_HISTOGRAM_MAX_MS)
    histograms = {}
    for reaction, values in sorted(labels.dwell.items()):
        h = histogram(values, bins=bins, low=0.0, high=float(high))
        histograms[f"dwell_ms_{reaction}"] = {"edges": [int(round(e)) for e in h["edges"]],
                                              "kept": {"counts": h["counts"]},
                                              "threshold": None}
    return {
        "kept": counts["positive"] + counts["negative"],
        "dropped_by_reason": {"conflicting_interactions": counts["conflicting"],
                              "reactions_outside_windows": labels.outside_windows,
                              "unverified_history": labels.unverified_history,
                              "capped_per_user": labels.capped_per_user,
                              "reactions_not_served": labels.not_served,
                              "reactions_text_purged": labels.text_purged,
                              "reactions_erased": labels.erased},
        "counts": counts,
        "windows": {"positive": [cfg.done_min_ms, cfg.done_max_ms],
                    "negative_below": cfg.dismiss_max_ms},
        "reactions": dict(Counter({k: len(v) for k, v in labels.dwell.items()})),
        "histograms": histograms,
    }
