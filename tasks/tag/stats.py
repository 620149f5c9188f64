"""Per-batch tagging statistics: counts, histograms (PNG), tag frequency tables, judge agreement.

Computed in Postgres where it can be (counts, JSONB frequency tables) so a batch of any size costs
a few queries. Written under `out_dir` as `tagging_stats.json`, `tag_frequencies.md`,
`emotion_confidence.png` and `hallucination_score.png`; the returned dict is the same summary
with the tables cut to their top entries (small enough for XCom).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import and_, exists, func, select, text
from sqlalchemy.orm import Session

from tasks.core.db.models import Conversation, TagFailure, TagResult

if TYPE_CHECKING:
    from tasks.tag.config import TaggingConfig

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 10
TOP_IN_FILE = 25
TOP_RETURNED = 10
# (tagger, output field, kind): "array" fields are exploded, "scalar" fields counted as-is.
FREQUENCY_FIELDS = [
    ("emotion", "tones", "array"),
    ("topic", "topics", "array"),
    ("topic", "subtopics", "array"),
    ("temporal", "focus", "scalar"),
    ("belief", "values", "array"),
    ("belief", "stances", "array"),
]


def _scope_sql(cfg: TaggingConfig) -> tuple[str, dict[str, Any]]:
    if cfg.batch_ids:
        return "c.status = 'ok' AND c.batch_id = ANY(:batch_ids)", {"batch_ids": cfg.batch_ids}
    return "c.status = 'ok'", {}


def _frequencies(session: Session, cfg: TaggingConfig, version: str, field: str,
                 kind: str) -> list[tuple[str, int]]:
    scope, params = _scope_sql(cfg)
    if kind == "array":
        source = ("CROSS JOIN LATERAL jsonb_array_elements_text(CASE WHEN "
                  "jsonb_typeof(r.output -> :field) = 'array' THEN r.output -> :field "
                  "ELSE '[]'::jsonb END) AS item(value)")
        value = "item.value"
    else:
        source, value = "", "r.output ->> :field"
    sql = text(
        f"SELECT {value} AS label, count(*) AS n FROM tag_results r "
        f"JOIN conversations c ON c.id = r.conversation_id {source} "
        f"WHERE r.tagger_version = :version AND {scope} AND {value} IS NOT NULL "
        f"GROUP BY label ORDER BY n DESC, label LIMIT {TOP_IN_FILE}"
    )
    rows = session.execute(sql, {"field": field, "version": version, **params}).tuples()
    return [(str(label), int(n)) for label, n in rows]


def _histogram(values: list[float]) -> dict[str, Any]:
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=HISTOGRAM_BINS,
                                 range=(0.0, 1.0))
    return {
        "bins": [round(float(e), 2) for e in edges],
        "counts": [int(c) for c in counts],
        "n": len(values),
        "mean": round(float(np.mean(values)), 4) if values else None,
        "median": round(float(np.median(values)), 4) if values else None,
    }


def _plot(values: list[float], title: str, xlabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if values:
        ax.hist(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0), color="#4C72B0",
                edgecolor="white")
        ax.set_ylabel("conversations")
    else:
        ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(f"{title} (n={len(values)})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _tagger_counts(session: Session, scope: list[Any], name: str, version: str,
                   total: int) -> dict[str, Any]:
    in_scope = select(Conversation.id).where(and_(*scope))
    tagged, mean_attempts = session.execute(
        select(func.count(), func.avg(TagResult.attempts)).where(
            TagResult.tagger_version == version, TagResult.conversation_id.in_(in_scope))
    ).one()
    failed_attempts = session.scalar(select(func.count()).select_from(TagFailure).where(
        TagFailure.tagger_version == version, TagFailure.conversation_id.in_(in_scope)))
    has_result = exists().where(TagResult.conversation_id == TagFailure.conversation_id,
                                TagResult.tagger_version == version)
    failed = session.scalar(select(func.count(func.distinct(TagFailure.conversation_id))).where(
        TagFailure.tagger_version == version, TagFailure.conversation_id.in_(in_scope),
        ~has_result))
    retried = session.scalar(select(func.count()).select_from(TagResult).where(
        TagResult.tagger_version == version, TagResult.conversation_id.in_(in_scope),
        TagResult.attempts > 1))
    return {
        "version": version,
        "tagged": int(tagged),
        "failed": int(failed or 0),
        "pending": int(total - tagged - (failed or 0)),
        "failed_attempts": int(failed_attempts or 0),
        "tagged_after_retry": int(retried or 0),
        "mean_attempts": round(float(mean_attempts), 3) if mean_attempts is not None else None,
        "success_rate": round(tagged / total, 4) if total else None,
    }


def compute_stats(cfg: TaggingConfig, out_dir: Path) -> dict[str, Any]:
    from tasks.core.db.engine import get_engine, session_scope
    from tasks.judge.scoring import judge_agreement, rubric_outcomes
    from tasks.tag.config import conversation_scope

    out_dir.mkdir(parents=True, exist_ok=True)
    taggers = {t.name: t for t in cfg.build_taggers()}
    scope = conversation_scope(cfg)
    result: dict[str, Any] = {"batch_ids": cfg.batch_ids, "taggers": {}, "frequencies": {}}
    emotion_scores: list[float] = []
    hallucination_scores: list[float] = []
    with session_scope(get_engine()) as session:
        ids = list(session.scalars(select(Conversation.id).where(and_(*scope))))
        total = len(ids)
        result["conversations"] = total
        for name, tagger in taggers.items():
            result["taggers"][name] = {"backend": tagger.backend, "model": tagger.model,
                                       **_tagger_counts(session, scope, name, tagger.version,
                                                        total)}
        in_scope = select(Conversation.id).where(and_(*scope))
        for name, sink in (("emotion", emotion_scores), ("hallucination", hallucination_scores)):
            if name in taggers:
                sink.extend(float(s) for s in session.scalars(select(TagResult.score).where(
                    TagResult.tagger_version == taggers[name].version,
                    TagResult.conversation_id.in_(in_scope), TagResult.score.is_not(None))))
        for name, field, kind in FREQUENCY_FIELDS:
            if name in taggers:
                result["frequencies"][f"{name}.{field}"] = _frequencies(
                    session, cfg, taggers[name].version, field, kind)
        if "hallucination" in taggers:
            claims = session.execute(text(
                "SELECT jsonb_array_length(CASE WHEN jsonb_typeof(r.output->'claims') = 'array' "
                "THEN r.output->'claims' ELSE '[]'::jsonb END) AS n, count(*) FROM tag_results r "
                "JOIN conversations c ON c.id = r.conversation_id WHERE r.tagger_version = :v AND "
                + _scope_sql(cfg)[0] + " GROUP BY n ORDER BY n"),
                {"v": taggers["hallucination"].version, **_scope_sql(cfg)[1]}).tuples()
            result["frequencies"]["hallucination.claims_per_conversation"] = [
                (str(n), int(c)) for n, c in claims]
        if cfg.judges:
            rubric = cfg.rubric()
            outcomes = rubric_outcomes(session, ids, rubric.version if cfg.rubric_path else None,
                                       cfg.policy)
            failed_criteria: dict[str, int] = {}
            for outcome in outcomes.values():
                for criterion in outcome.failed_criteria:
                    failed_criteria[criterion] = failed_criteria.get(criterion, 0) + 1
            judged = len(outcomes)
            passed = sum(o.passed for o in outcomes.values())
            result["judge"] = {
                "rubric_version": rubric.version,
                "policy": cfg.policy,
                "judged": judged,
                "passed": passed,
                "pass_rate": round(passed / judged, 4) if judged else None,
                "safety_failed": sum(o.safety_failed for o in outcomes.values()),
                "with_errors": sum(bool(o.errored_criteria) for o in outcomes.values()),
                "mean_score": (round(float(np.mean([o.score for o in outcomes.values()])), 4)
                               if judged else None),
                "failed_criteria": dict(sorted(failed_criteria.items(),
                                               key=lambda kv: (-kv[1], kv[0]))),
            }
            if len(cfg.judges) == 2:
                result["judge"]["agreement"] = judge_agreement(
                    session, ids, rubric.version if cfg.rubric_path else None,
                    (cfg.judges[0], cfg.judges[1]))
    result["histograms"] = {"emotion_confidence": _histogram(emotion_scores),
                            "hallucination_score": _histogram(hallucination_scores)}
    paths = {
        "json": out_dir / "tagging_stats.json",
        "frequencies": out_dir / "tag_frequencies.md",
        "emotion_confidence_png": out_dir / "emotion_confidence.png",
        "hallucination_score_png": out_dir / "hallucination_score.png",
    }
    _plot(emotion_scores, "emotion confidence", "confidence of the top tone",
          paths["emotion_confidence_png"])
    _plot(hallucination_scores, "hallucination score", "hallucination_score",
          paths["hallucination_score_png"])
    result["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    paths["frequencies"].write_text(_markdown(result["frequencies"]), encoding="utf-8")
    log.info("tagging stats (%d conversations): %s", result["conversations"],
             {n: (c["tagged"], c["failed"]) for n, c in result["taggers"].items()})
    summary = dict(result)
    summary["frequencies"] = {k: v[:TOP_RETURNED] for k, v in result["frequencies"].items()}
    if "judge" in summary and "agreement" in summary["judge"]:
        agreement = summary["judge"]["agreement"]
        summary["judge"] = {**summary["judge"], "agreement": {
            k: agreement[k] for k in ("agreement_rate", "disagreement_rate", "kappa", "compared",
                                      "conversation_disagreement_rate")} | {
            "per_criterion": {c: v["agreement"] for c, v in agreement["per_criterion"].items()}}}
    return summary


def _markdown(frequencies: dict[str, list[tuple[str, int]]]) -> str:
    lines = ["# Tag frequencies", ""]
    for name, rows in frequencies.items():
        lines += [f"## {name}", "", "| label | count |", "|---|---:|"]
        lines += [f"| {label} | {n} |" for label, n in rows] or ["| (none) | 0 |"]
        lines.append("")
    return "\n".join(lines)
