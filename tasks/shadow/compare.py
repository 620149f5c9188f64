"""The champion/challenger comparison of one deployment and its decision. `compare_variants`
measures, per variant, on the interactions of the deployment: requests, backend errors, reacted
interactions (those with a terminal `done`/`dismiss` reaction; the first one counts), the
magic-zone done rate (done with 15 s <= dwell <= 120 s), the quick-dismiss rate (dismiss with
dwell < 5 s), mean dwell, a dwell histogram and Wilson intervals. Rates are over reacted
interactions: an interaction without a reaction yet may still get one, so counting it as a
failure would penalise the variant with the most recent traffic. Two-proportion z-tests
(challenger vs champion) run only once both variants have `min_samples` reacted interactions; in
mirror mode the evidence is the pairwise judge of mirrored pairs (`tasks.shadow.pairwise`).
`decide` turns the tests into promote / keep_collecting / rollback (the rule is in its
docstring).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from tasks.core.ids import content_hash, stable_id
from tasks.shadow.config import (
    CHALLENGER,
    CHAMPION,
    DWELL_BIN_LABELS,
    DWELL_BINS_MS,
    Decision,
    ShadowError,
    SignalWindows,
)
from tasks.shadow.deployments import load_deployment, shadow_engine
from tasks.shadow.pairwise import judge_pairs, pairwise_summary
from tasks.shadow.stats import two_proportion_ztest, wilson_interval

log = logging.getLogger(__name__)

_VARIANT_SQL = """
WITH terminal AS (
    SELECT DISTINCT ON (r.interaction_id) r.interaction_id, r.reaction, r.dwell_ms
    FROM reactions r JOIN interactions i ON i.id = r.interaction_id
    WHERE i.deployment_id = :deployment_id AND r.reaction IN ('done', 'dismiss')
    ORDER BY r.interaction_id, r.created_at, r.id
)
SELECT i.variant AS variant,
       count(*) FILTER (WHERE i.status = 'ok') AS requests,
       count(*) FILTER (WHERE i.status <> 'ok') AS errors,
       count(t.interaction_id) FILTER (WHERE i.status = 'ok') AS reacted,
       count(*) FILTER (WHERE i.status = 'ok' AND t.reaction = 'done'
                        AND t.dwell_ms BETWEEN :done_min AND :done_max) AS magic_done,
       count(*) FILTER (WHERE i.status = 'ok' AND t.reaction = 'dismiss'
                        AND t.dwell_ms < :dismiss_max) AS quick_dismiss,
       avg(t.dwell_ms) FILTER (WHERE i.status = 'ok') AS mean_dwell_ms,
       count(*) FILTER (WHERE i.status = 'ok' AND t.dwell_ms < :b0) AS h0,
       count(*) FILTER (WHERE i.status = 'ok' AND t.dwell_ms >= :b0 AND t.dwell_ms < :b1) AS h1,
       count(*) FILTER (WHERE i.status = 'ok' AND t.dwell_ms >= :b1 AND t.dwell_ms < :b2) AS h2,
       count(*) FILTER (WHERE i.status = 'ok' AND t.dwell_ms >= :b2 AND t.dwell_ms <= :b3) AS h3,
       count(*) FILTER (WHERE i.status = 'ok' AND t.dwell_ms > :b3) AS h4
FROM interactions i LEFT JOIN terminal t ON t.interaction_id = i.id
WHERE i.deployment_id = :deployment_id
GROUP BY i.variant
"""

_REACTIONS_SQL = """
SELECT i.variant AS variant, r.reaction AS reaction, count(*) AS n
FROM reactions r JOIN interactions i ON i.id = r.interaction_id
WHERE i.deployment_id = :deployment_id AND i.status = 'ok'
GROUP BY i.variant, r.reaction
"""

_VERSIONS_SQL = """
SELECT variant, model_version, count(*) AS n FROM interactions
WHERE deployment_id = :deployment_id AND status = 'ok'
GROUP BY variant, model_version
"""

_PAIRS_SQL = """
SELECT c.id AS champion_id, m.id AS mirror_id, c.request_messages AS messages,
       c.context AS context, c.response AS champion_response, m.response AS challenger_response
FROM interactions m JOIN interactions c ON c.id = m.mirror_of
WHERE m.deployment_id = :deployment_id AND m.variant = 'mirror'
  AND m.status = 'ok' AND c.status = 'ok' AND m.response <> '' AND c.response <> ''
  AND m.erased_at IS NULL AND c.erased_at IS NULL
  AND m.text_purged_at IS NULL AND c.text_purged_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM user_erasures e
                  WHERE e.user_hash = c.user_hash AND c.created_at < e.requested_at)
  AND NOT EXISTS (SELECT 1 FROM user_erasures e
                  WHERE e.user_hash = m.user_hash AND m.created_at < e.requested_at)
ORDER BY md5(c.id) COLLATE "C", c.id
LIMIT :limit
"""
# Which mirrored pairs the judge sees: a uniform sample of the whole deployment, chosen by a hash
# of the champion interaction id. It is stable from run to run (so the verdicts already given
# come back from the LLM response cache instead of being paid for again) and follows the
# traffic: a newly mirrored pair whose hash sorts into the first `max_judge_pairs` joins it.
# The context comes along only for the names under its name fields: the judge sees each pair
# de-identified (`tasks.shadow.pairwise.deid_pair`).
# Never a pair with text of an erased user or past retention (issue #15): the timestamps decide,
# not whether the text looks wiped, and, as in the reaction-dataset build
# (`tasks.signals.labels`), a row an erased user sent before the erasure was requested is left
# out even where `erased_at` is not set on it (written late, by another path).


def variant_metrics(counts: dict[str, Any], confidence: float = 0.95) -> dict[str, Any]:
    """Rates, Wilson intervals and the histogram for one variant from its raw counts."""
    reacted = int(counts.get("reacted", 0))
    requests = int(counts.get("requests", 0))
    errors = int(counts.get("errors", 0))
    magic = int(counts.get("magic_done", 0))
    dismiss = int(counts.get("quick_dismiss", 0))
    mean_dwell = counts.get("mean_dwell_ms")
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / (requests + errors) if requests + errors else None,
        "reacted": reacted,
        "magic_done": magic,
        "magic_done_rate": magic / reacted if reacted else None,
        "magic_done_ci": list(wilson_interval(magic, reacted, confidence)),
        "quick_dismiss": dismiss,
        "quick_dismiss_rate": dismiss / reacted if reacted else None,
        "quick_dismiss_ci": list(wilson_interval(dismiss, reacted, confidence)),
        "mean_dwell_ms": float(mean_dwell) if mean_dwell is not None else None,
        "dwell_histogram": dict(zip(DWELL_BIN_LABELS,
                                    [int(counts.get(f"h{i}", 0)) for i in range(5)],
                                    strict=True)),
        "reactions": dict(counts.get("reactions", {})),
        "model_version": counts.get("model_version"),
    }


def reaction_tests(champion: dict[str, Any], challenger: dict[str, Any],
                   min_samples: int) -> dict[str, Any] | None:
    """z-tests challenger vs champion, or None below the minimum sample size."""
    if champion["reacted"] < min_samples or challenger["reacted"] < min_samples:
        return None
    return {
        "magic_done": two_proportion_ztest(champion["magic_done"], champion["reacted"],
                                           challenger["magic_done"],
                                           challenger["reacted"]).as_dict(),
        "quick_dismiss": two_proportion_ztest(champion["quick_dismiss"], champion["reacted"],
                                              challenger["quick_dismiss"],
                                              challenger["reacted"]).as_dict(),
    }


def error_test(champion: dict[str, Any], challenger: dict[str, Any],
               min_samples: int) -> dict[str, Any] | None:
    """z-test of backend error rates (all attempts), behind the same minimum."""
    n1 = champion["requests"] + champion["errors"]
    n2 = challenger["requests"] + challenger["errors"]
    if n1 < min_samples or n2 < min_samples:
        return None
    return two_proportion_ztest(champion["errors"], n1, challenger["errors"], n2).as_dict()


def decide(mode: str, tests: dict[str, Any] | None, errors: dict[str, Any] | None,
           pairwise: dict[str, Any] | None, *, min_samples: int,
           alpha: float) -> tuple[Decision, list[str]]:
    """The decision rule; returns (decision, reasons).

    1. not enough evidence (canary: either variant < min_samples reacted interactions; mirror:
       < min_samples judged pairs) → keep_collecting;
    2. the challenger is significantly worse (p < alpha) on any guard — lower magic-zone done
       rate, higher quick-dismiss rate, higher backend error rate, or (mirror) losing the sign
       test → rollback;
    3. the challenger is significantly better on the primary metric (canary: magic-zone done rate;
       mirror: pairwise wins, sign test) → promote;
    4. otherwise → keep_collecting.
    A deployment in mode `off` serves no challenger traffic: always keep_collecting.
    """
    reasons: list[str] = []
    worse: list[str] = []
    if errors is not None and errors["p_value"] < alpha and errors["diff"] > 0:
        worse.append(f"higher backend error rate ({errors['p2']:.3f} vs {errors['p1']:.3f}, "
                     f"p={errors['p_value']:.4f})")
    if mode == "off":
        return "keep_collecting", ["deployment mode is off: no challenger traffic to compare"]
    if mode == "canary":
        if tests is None:
            if worse:
                return "rollback", worse
            return "keep_collecting", [f"fewer than {min_samples} reacted interactions in a "
                                       "variant"]
        magic, dismiss = tests["magic_done"], tests["quick_dismiss"]
        if magic["p_value"] < alpha and magic["diff"] < 0:
            worse.append(f"lower magic-zone done rate ({magic['p2']:.3f} vs {magic['p1']:.3f}, "
                         f"p={magic['p_value']:.4f})")
        if dismiss["p_value"] < alpha and dismiss["diff"] > 0:
            worse.append(f"higher quick-dismiss rate ({dismiss['p2']:.3f} vs "
                         f"{dismiss['p1']:.3f}, p={dismiss['p_value']:.4f})")
        if worse:
            return "rollback", worse
        if magic["p_value"] < alpha and magic["diff"] > 0:
            return "promote", [f"higher magic-zone done rate ({magic['p2']:.3f} vs "
                               f"{magic['p1']:.3f}, p={magic['p_value']:.4f})"]
        reasons.append(f"no significant difference at alpha={alpha} "
                       f"(magic-zone p={magic['p_value']:.4f})")
        return "keep_collecting", reasons
    # mirror: the judge is the evidence
    if pairwise is None or pairwise["judged"] < min_samples:
        if worse:
            return "rollback", worse
        judged = 0 if pairwise is None else pairwise["judged"]
        return "keep_collecting", [f"{judged} judged mirrored pairs < min_samples={min_samples}"]
    p = pairwise["sign_test_p"]
    wins, losses = pairwise["challenger_wins"], pairwise["champion_wins"]
    if p < alpha and wins < losses:
        worse.append(f"loses the pairwise judge ({wins} wins, {losses} losses, p={p:.4f})")
    if worse:
        return "rollback", worse
    if p < alpha and wins > losses:
        return "promote", [f"wins the pairwise judge ({wins} wins, {losses} losses, "
                           f"{pairwise['ties']} ties, p={p:.4f})"]
    return "keep_collecting", [f"pairwise judge not significant ({wins} wins, {losses} losses, "
                               f"p={p:.4f})"]


def compare_variants(
    deployment_id: str | None = None,
    *,
    min_samples: int = 100,
    alpha: float = 0.05,
    windows: SignalWindows | dict[str, Any] | None = None,
    judge: bool = True,
    max_judge_pairs: int = 1000,
    judge_client: Any = None,
    model_name: str | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """Compare champion and challenger of a deployment (default: the active one).

    Returns a JSON-able report: {"report_id", "deployment_id", "model_name", "mode", "share",
    "champion_version", "challenger_version", "min_samples", "alpha", "windows",
    "variants": {"champion": {...}, "challenger": {...}}, "tests": {...} | None,
    "error_test": {...} | None, "pairwise": {...} | None, "decision", "reasons"}.
    Raises ShadowError when there is no such (or no active) deployment.
    """
    from tasks.core.db.engine import session_scope

    if min_samples < 1:
        raise ShadowError(f"min_samples must be >= 1, got {min_samples}; e.g. 100")
    if not 0.0 < alpha < 1.0:
        raise ShadowError(f"alpha must be in (0, 1), got {alpha}; e.g. 0.05")
    if windows is None:
        windows = SignalWindows()
    elif isinstance(windows, dict):
        windows = SignalWindows(**windows)
    eng = shadow_engine(engine)
    with session_scope(eng) as session:
        dep = _deployment_row(session, deployment_id, model_name)
        raw = _variant_counts(session, dep["id"], windows)
        pairs: list[dict[str, Any]] = []
        if dep["mode"] == "mirror" and judge:
            pairs = _mirrored_pairs(session, dep["id"], max_judge_pairs)

    variants = {v: variant_metrics(raw.get(v, {})) for v in (CHAMPION, CHALLENGER)}
    mirror_counts = raw.get("mirror")
    if dep["mode"] == "mirror":
        # The challenger's answers were logged as "mirror" rows: report them as its numbers.
        variants[CHALLENGER] = variant_metrics(mirror_counts or {})
    champion_version = dep["champion_version"] or variants[CHAMPION]["model_version"]
    tests = reaction_tests(variants[CHAMPION], variants[CHALLENGER], min_samples) \
        if dep["mode"] == "canary" else None
    errors = error_test(variants[CHAMPION], variants[CHALLENGER], min_samples) \
        if dep["mode"] != "off" else None

    pairwise = None
    if dep["mode"] == "mirror" and judge:
        pairwise = _pairwise_evidence(pairs, judge_client)
    decision, reasons = decide(dep["mode"], tests, errors, pairwise, min_samples=min_samples,
                               alpha=alpha)
    report: dict[str, Any] = {
        "deployment_id": dep["id"], "model_name": dep["model_name"], "mode": dep["mode"],
        "share": dep["share"], "deployment_active": dep["active"],
        "champion_version": champion_version,
        "challenger_version": dep["challenger_version"],
        "min_samples": min_samples, "alpha": alpha, "windows": windows.model_dump(),
        "variants": variants, "tests": tests, "error_test": errors, "pairwise": pairwise,
        "decision": decision, "reasons": reasons,
    }
    report["report_id"] = stable_id("comparison", dep["id"], content_hash(report))
    log.info("comparison %s of deployment %s: %s (%s)", report["report_id"], dep["id"],
             decision, "; ".join(reasons))
    return report


def _deployment_row(session: Any, deployment_id: str | None,
                    model_name: str | None) -> dict[str, Any]:
    """The deployment compared (by id, else the model's active one) as a plain dict."""
    deployment = load_deployment(session, deployment_id, model_name)
    if deployment is None:
        raise ShadowError("no active deployment; deploy a challenger first "
                          "(tasks.shadow.stage.deploy_challenger)")
    return {"id": deployment.id, "model_name": deployment.model_name,
            "mode": deployment.mode, "share": float(deployment.share),
            "champion_version": deployment.champion_version,
            "challenger_version": deployment.challenger_version,
            "active": deployment.active}


def _variant_counts(session: Any, deployment_id: str,
                    windows: SignalWindows) -> dict[str, dict[str, Any]]:
    """Raw counts per logged variant: the `_VARIANT_SQL` row, reaction counts by kind and the
    model version that served most of its interactions."""
    from sqlalchemy import text

    params = {"deployment_id": deployment_id, "done_min": windows.done_min_ms,
              "done_max": windows.done_max_ms, "dismiss_max": windows.dismiss_max_ms,
              **{f"b{i}": edge for i, edge in enumerate(DWELL_BINS_MS)}}
    raw: dict[str, dict[str, Any]] = {
        row["variant"]: dict(row)
        for row in session.execute(text(_VARIANT_SQL), params).mappings()
    }
    for row in session.execute(text(_REACTIONS_SQL),
                               {"deployment_id": deployment_id}).mappings():
        raw.setdefault(row["variant"], {}).setdefault("reactions", {})[row["reaction"]] = \
            int(row["n"])
    served: dict[str, Counter[str]] = {}
    for row in session.execute(text(_VERSIONS_SQL),
                               {"deployment_id": deployment_id}).mappings():
        served.setdefault(row["variant"], Counter())[row["model_version"] or ""] += row["n"]
    for variant, counter in served.items():
        raw.setdefault(variant, {})["model_version"] = counter.most_common(1)[0][0] or None
    return raw


def _mirrored_pairs(session: Any, deployment_id: str, limit: int) -> list[dict[str, Any]]:
    """The (champion, mirror) pairs the judge sees (see `_PAIRS_SQL`)."""
    from sqlalchemy import text

    return [dict(r) for r in session.execute(
        text(_PAIRS_SQL), {"deployment_id": deployment_id, "limit": limit}
    ).mappings()]


def _pairwise_evidence(pairs: list[dict[str, Any]], judge_client: Any) -> dict[str, Any]:
    """Judge the pairs (the "judge" role's client unless one is given) and summarise them; the
    per-pair verdicts are kept under "details"."""
    pair_details: list[dict[str, Any]] = []
    if pairs:
        if judge_client is None:
            from tasks.core.llm import client_for_role

            judge_client = client_for_role("judge")
        pair_details = judge_pairs(pairs, judge_client)
    pairwise = pairwise_summary([p["outcome"] for p in pair_details])
    pairwise["details"] = pair_details
    return pairwise
