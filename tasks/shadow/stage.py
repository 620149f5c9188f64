"""Shadow deployments, the champion/challenger comparison, its decision and its report.

- `deploy_challenger` writes the active `deployments` row (deterministic id from versions, mode
  and share) and ends the previous one; the router picks it up within its deployment TTL.
- `compare_variants` measures, per variant, on the interactions of one deployment: requests,
  backend errors, reacted interactions (those with a terminal `done`/`dismiss` reaction; the first
  one counts), the magic-zone done rate (done with 15 s <= dwell <= 120 s), the quick-dismiss rate
  (dismiss with dwell < 5 s), mean dwell, a dwell histogram and Wilson intervals. Rates are over
  reacted interactions: an interaction without a reaction yet may still get one, so counting it as
  a failure would penalise the variant with the most recent traffic. Two-proportion z-tests
  (challenger vs champion) run only once both variants have `min_samples` reacted interactions.
  In mirror mode the users only saw the champion, so the evidence is a pairwise judge on mirrored
  pairs, asked in both orders (A/B and B/A); a pair counts as a win only when both orders agree,
  anything else is a tie (this cancels position bias).
- The decision rule (`decide`):
    1. not enough evidence (canary: either variant < min_samples reacted interactions; mirror:
       < min_samples judged pairs) → keep_collecting;
    2. the challenger is significantly worse (p < alpha) on any guard — lower magic-zone done
       rate, higher quick-dismiss rate, higher backend error rate, or (mirror) losing the sign
       test → rollback;
    3. the challenger is significantly better on the primary metric (canary: magic-zone done rate;
       mirror: pairwise wins, sign test) → promote;
    4. otherwise → keep_collecting.
  A deployment in mode `off` serves no challenger traffic: always keep_collecting.
- `apply_decision` moves the MLflow aliases (promote: champion ← challenger version, challenger
  alias removed; rollback: challenger alias removed) and ends the deployment; it refuses a stale
  report (the champion alias moved since) and is idempotent.
- `write_report` renders HTML with charts (+ PNG files, matplotlib Agg), logs them to an MLflow
  run in the experiment "shadow-reports" and stores a `comparison_reports` row with the URI.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from tasks.core.ids import content_hash, stable_id
from tasks.core.settings import get_settings
from tasks.shadow.stats import sign_test, two_proportion_ztest, wilson_interval

log = logging.getLogger(__name__)

MODES = ("canary", "mirror", "off")
DECISIONS = ("promote", "keep_collecting", "rollback")
Decision = Literal["promote", "keep_collecting", "rollback"]
REPORT_EXPERIMENT = "shadow-reports"
CHAMPION, CHALLENGER = "champion", "challenger"
TERMINAL_REACTIONS = ("done", "dismiss")
DWELL_BINS_MS = (5_000, 15_000, 60_000, 120_000)  # histogram edges: <5s, 5-15s, 15-60s, ...
DWELL_BIN_LABELS = ("<5s", "5-15s", "15-60s", "60-120s", ">120s")


class ShadowError(RuntimeError):
    """A deployment/comparison step cannot proceed; carries the ids the user needs to act."""

    def __init__(self, message: str, *, deployment_id: str | None = None,
                 version: str | None = None) -> None:
        super().__init__(message)
        self.deployment_id = deployment_id
        self.version = version


class SignalWindows(BaseModel):
    """Which reactions count: done in the magic zone is positive, a quick dismiss negative."""

    model_config = ConfigDict(extra="forbid")

    done_min_ms: int = 15_000
    done_max_ms: int = 120_000
    dismiss_max_ms: int = 5_000  # exclusive: dwell < dismiss_max_ms

    @model_validator(mode="after")
    def _ordered(self) -> SignalWindows:
        if not 0 <= self.done_min_ms < self.done_max_ms:
            raise ValueError(
                f"need 0 <= done_min_ms < done_max_ms, got {self.done_min_ms} and "
                f"{self.done_max_ms}; e.g. done_min_ms: 15000, done_max_ms: 120000"
            )
        if self.dismiss_max_ms <= 0:
            raise ValueError(f"dismiss_max_ms must be > 0, got {self.dismiss_max_ms}; e.g. 5000")
        return self


def _engine(engine: Any = None) -> Any:
    if engine is not None:
        return engine
    from tasks.core.db.engine import get_engine

    return get_engine()


def _mlflow_client(tracking_uri: str | None = None) -> Any:
    from mlflow import MlflowClient

    uri = tracking_uri or get_settings().resolved_mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_version(client: Any, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


# ---- deployments -------------------------------------------------------------------------------


def deployment_id_for(model_name: str, champion_version: str | None, challenger_version: str,
                      mode: str, share: float) -> str:
    return stable_id("deployment", model_name, champion_version or "@champion",
                     challenger_version, mode, f"{share:.6f}")


def deploy_challenger(
    challenger_version: str,
    *,
    champion_version: str | None = None,
    mode: str = "canary",
    share: float = 0.05,
    model_name: str | None = None,
    materialize: bool = False,
    engine: Any = None,
) -> dict[str, Any]:
    """Make (challenger, champion, mode, share) the active deployment of `model_name`.

    `champion_version=None` means "whatever the champion alias points at while serving".
    `share`: canary — the fraction of users served by the challenger; mirror — the fraction of
    users whose requests are copied to the challenger. Earlier active deployments of the model
    are ended. With `materialize`, the adapters are downloaded from the registry first (into
    `<data_dir>/adapters/`, where the local model server finds them). Rerunning is a no-op.
    Returns {"deployment_id", "model_name", "mode", "share", "champion_version",
    "challenger_version", "ended": [ids], "adapters": {variant: path|None}}.
    """
    from sqlalchemy import select, update

    from tasks.core.db.engine import session_scope, upsert
    from tasks.core.db.models import Deployment

    if mode not in MODES:
        raise ShadowError(f"mode {mode!r} is not one of {', '.join(MODES)}; e.g. mode='canary'")
    if not 0.0 <= share <= 1.0 or (mode == "canary" and share == 0.0):
        raise ShadowError(
            f"share {share} is out of range; use 0 < share <= 1 for canary (e.g. 0.05 = 5% of "
            "users) and 0 <= share <= 1 for mirror (e.g. 1.0 = copy every request)"
        )
    challenger_version = str(challenger_version).strip()
    if not challenger_version:
        raise ShadowError("challenger_version is empty; pass the registered version, e.g. '3'")
    champion_version = str(champion_version) if champion_version is not None else None
    if champion_version == challenger_version:
        raise ShadowError(
            f"champion and challenger are both version {challenger_version}; deploy a different "
            "challenger", version=challenger_version)
    name = model_name or get_settings().registered_model_name
    base_id = deployment_id_for(name, champion_version, challenger_version, mode, share)

    adapters: dict[str, str | None] = {}
    if materialize:
        from tasks.register.registry import get_alias_version, materialize_adapter

        versions = {CHALLENGER: challenger_version,
                    CHAMPION: champion_version or get_alias_version(name, CHAMPION)}
        for variant, version in versions.items():
            if version is None:
                continue
            path = materialize_adapter(version, model_name=name)
            adapters[variant] = str(path) if path is not None else None

    with session_scope(_engine(engine)) as session:
        deployment_id = _generation_id(session, base_id)
        ended = list(session.execute(
            select(Deployment.id).where(Deployment.model_name == name,
                                        Deployment.active.is_(True),
                                        Deployment.id != deployment_id)
        ).scalars())
        if ended:
            session.execute(update(Deployment).where(Deployment.id.in_(ended))
                            .values(active=False, ended_at=datetime.now(UTC)))
        upsert(session, Deployment, [{
            "id": deployment_id, "model_name": name, "champion_version": champion_version,
            "challenger_version": challenger_version, "mode": mode, "share": share,
            "active": True, "ended_at": None,
        }], update=["active", "ended_at"])
    log.info("deployment %s: %s v%s vs champion %s, mode=%s share=%.3f (ended %d)",
             deployment_id, name, challenger_version, champion_version or "@champion", mode,
             share, len(ended))
    return {"deployment_id": deployment_id, "model_name": name, "mode": mode, "share": share,
            "champion_version": champion_version, "challenger_version": challenger_version,
            "ended": ended, "adapters": adapters}


def _generation_id(session: Any, base_id: str) -> str:
    """The id this deployment gets: `base_id` the first time and while it is active (a rerun is
    a no-op); once that one has ended, a fresh id per redeployment, so the new period's
    comparison starts empty instead of mixing in the ended period's traffic."""
    from tasks.core.db.models import Deployment

    generation, candidate = 0, base_id
    while True:
        row = session.get(Deployment, candidate)
        if row is None or row.active:
            return candidate
        generation += 1
        candidate = stable_id(base_id, "redeployed", generation)


def end_deployment(deployment_id: str, *, engine: Any = None) -> bool:
    """Mark a deployment inactive (the router falls back to champion only); True if it was."""
    from sqlalchemy import update

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import Deployment

    with session_scope(_engine(engine)) as session:
        result = session.execute(
            update(Deployment).where(Deployment.id == deployment_id, Deployment.active.is_(True))
            .values(active=False, ended_at=datetime.now(UTC))
        )
        return bool(result.rowcount)


def _load_deployment(session: Any, deployment_id: str | None, model_name: str | None) -> Any:
    from sqlalchemy import select

    from tasks.core.db.models import Deployment

    if deployment_id:
        row = session.get(Deployment, deployment_id)
        if row is None:
            raise ShadowError(f"no deployment with id {deployment_id!r}; list them with "
                              "SELECT id, mode, active FROM deployments",
                              deployment_id=deployment_id)
        return row
    name = model_name or get_settings().registered_model_name
    return session.execute(
        select(Deployment).where(Deployment.model_name == name, Deployment.active.is_(True))
        .order_by(Deployment.started_at.desc(), Deployment.id).limit(1)
    ).scalar_one_or_none()


# ---- measuring ---------------------------------------------------------------------------------

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
       c.response AS champion_response, m.response AS challenger_response
FROM interactions m JOIN interactions c ON c.id = m.mirror_of
WHERE m.deployment_id = :deployment_id AND m.variant = 'mirror'
  AND m.status = 'ok' AND c.status = 'ok' AND m.response <> '' AND c.response <> ''
ORDER BY md5(c.id) COLLATE "C", c.id
LIMIT :limit
"""
# Which mirrored pairs the judge sees: a uniform sample of the whole deployment, chosen by a hash
# of the champion interaction id. It is stable from run to run (so the verdicts already given
# come back from the LLM response cache instead of being paid for again) and follows the
# traffic: a newly mirrored pair whose hash sorts into the first `max_judge_pairs` joins it.


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


def pairwise_summary(outcomes: list[str], confidence: float = 0.95) -> dict[str, Any]:
    """Counts of challenger wins/losses/ties (errors excluded), win rate and sign test."""
    counts = Counter(outcomes)
    wins, losses, ties = counts[CHALLENGER], counts[CHAMPION], counts["tie"]
    decisive = wins + losses
    return {
        "pairs": len(outcomes),
        "judged": wins + losses + ties,
        "errors": counts["error"],
        "challenger_wins": wins,
        "champion_wins": losses,
        "ties": ties,
        "challenger_win_rate": wins / decisive if decisive else None,
        "challenger_win_rate_ci": list(wilson_interval(wins, decisive, confidence)),
        "sign_test_p": sign_test(wins, losses),
    }


def decide(mode: str, tests: dict[str, Any] | None, errors: dict[str, Any] | None,
           pairwise: dict[str, Any] | None, *, min_samples: int,
           alpha: float) -> tuple[Decision, list[str]]:
    """The decision rule of the module docstring; returns (decision, reasons)."""
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


# ---- pairwise judge ----------------------------------------------------------------------------


class PairwiseVerdict(BaseModel):
    """The judge's answer to one ordered pair."""

    winner: Literal["A", "B", "tie"]
    reason: str = ""


def pairwise_messages(messages: list[dict[str, Any]], response_a: str,
                      response_b: str) -> list[dict[str, str]]:
    """The judge prompt (include/prompts/judge/pairwise.jinja2) for one ordered pair."""
    import jinja2

    from tasks.core.paths import PROMPTS_DIR
    from tasks.judge.stage import load_rubric

    rubric = load_rubric()
    criteria = [{"id": cid, "name": rubric.criteria[cid].name,
                 "question": rubric.criteria[cid].question,
                 "safety_gate": cid in rubric.safety_gates} for cid in rubric.criterion_ids()]
    system = [m for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    template = env.from_string((PROMPTS_DIR / "judge" / "pairwise.jinja2").read_text())
    prompt = template.render(criteria=criteria, expect="",
                             system_prompt=system[0]["content"] if system else "",
                             messages=turns, response_a=response_a, response_b=response_b)
    return [{"role": "user", "content": prompt}]


def combine_orders(first: str | None, second: str | None) -> str:
    """Outcome of a pair from two ordered verdicts (first: A=champion; second: A=challenger).

    Each verdict is "A", "B", "tie" or None (the judge failed). Both orders must name the same
    variant for a win; a disagreement (position bias) or any tie is a tie; a failure is "error".
    """
    if first is None or second is None:
        return "error"
    first_variant = {"A": CHAMPION, "B": CHALLENGER}.get(first, "tie")
    second_variant = {"A": CHALLENGER, "B": CHAMPION}.get(second, "tie")
    if first_variant == second_variant and first_variant != "tie":
        return first_variant
    return "tie"


def judge_pairs(pairs: list[dict[str, Any]], client: Any) -> list[dict[str, Any]]:
    """Judge each (champion, challenger) pair in both orders through an LLMClient."""
    import asyncio

    from tasks.core.llm import run_sync

    async def one(pair: dict[str, Any]) -> dict[str, Any]:
        messages = pair["messages"] or []
        orders = [(pair["champion_response"], pair["challenger_response"]),
                  (pair["challenger_response"], pair["champion_response"])]
        results = await asyncio.gather(*(
            client.structured(pairwise_messages(messages, a, b), PairwiseVerdict,
                              temperature=0.0, max_tokens=200)
            for a, b in orders))
        verdicts = [r.value.winner if r.ok and r.value is not None else None for r in results]
        return {"champion_id": pair["champion_id"], "mirror_id": pair["mirror_id"],
                "verdicts": verdicts, "outcome": combine_orders(*verdicts)}

    async def all_pairs() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(p) for p in pairs)))

    return run_sync(all_pairs())


# ---- comparison --------------------------------------------------------------------------------


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
    from sqlalchemy import text

    from tasks.core.db.engine import session_scope

    if min_samples < 1:
        raise ShadowError(f"min_samples must be >= 1, got {min_samples}; e.g. 100")
    if not 0.0 < alpha < 1.0:
        raise ShadowError(f"alpha must be in (0, 1), got {alpha}; e.g. 0.05")
    if windows is None:
        windows = SignalWindows()
    elif isinstance(windows, dict):
        windows = SignalWindows(**windows)
    eng = _engine(engine)
    with session_scope(eng) as session:
        deployment = _load_deployment(session, deployment_id, model_name)
        if deployment is None:
            raise ShadowError("no active deployment; deploy a challenger first "
                              "(tasks.shadow.stage.deploy_challenger)")
        dep = {"id": deployment.id, "model_name": deployment.model_name,
               "mode": deployment.mode, "share": float(deployment.share),
               "champion_version": deployment.champion_version,
               "challenger_version": deployment.challenger_version,
               "active": deployment.active}
        params = {"deployment_id": dep["id"], "done_min": windows.done_min_ms,
                  "done_max": windows.done_max_ms, "dismiss_max": windows.dismiss_max_ms,
                  **{f"b{i}": edge for i, edge in enumerate(DWELL_BINS_MS)}}
        raw: dict[str, dict[str, Any]] = {
            row["variant"]: dict(row)
            for row in session.execute(text(_VARIANT_SQL), params).mappings()
        }
        for row in session.execute(text(_REACTIONS_SQL), {"deployment_id": dep["id"]}).mappings():
            raw.setdefault(row["variant"], {}).setdefault("reactions", {})[row["reaction"]] = \
                int(row["n"])
        served: dict[str, Counter[str]] = {}
        for row in session.execute(text(_VERSIONS_SQL), {"deployment_id": dep["id"]}).mappings():
            served.setdefault(row["variant"], Counter())[row["model_version"] or ""] += row["n"]
        pairs: list[dict[str, Any]] = []
        if dep["mode"] == "mirror" and judge:
            pairs = [dict(r) for r in session.execute(
                text(_PAIRS_SQL), {"deployment_id": dep["id"], "limit": max_judge_pairs}
            ).mappings()]

    for variant, counter in served.items():
        raw.setdefault(variant, {})["model_version"] = counter.most_common(1)[0][0] or None
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
    pair_details: list[dict[str, Any]] = []
    if dep["mode"] == "mirror" and judge:
        if pairs:
            if judge_client is None:
                from tasks.core.llm import client_for_role

                judge_client = client_for_role("judge")
            pair_details = judge_pairs(pairs, judge_client)
        pairwise = pairwise_summary([p["outcome"] for p in pair_details])
        pairwise["details"] = pair_details
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


# ---- decision ----------------------------------------------------------------------------------


def apply_decision(report: dict[str, Any], enabled: bool, *, tracking_uri: str | None = None,
                   engine: Any = None) -> dict[str, Any]:
    """Act on a report: promote/rollback move the MLflow aliases and end the deployment.

    Disabled or keep_collecting → nothing changes. Refuses (ShadowError) when the champion alias
    no longer points at the report's champion (someone moved it since). Safe to rerun.
    Returns {"applied", "decision", "deployment_id", "champion_version", "challenger_version",
    "reason"}.
    """
    decision = report.get("decision")
    if decision not in DECISIONS:
        raise ShadowError(f"report decision {decision!r} is not one of {', '.join(DECISIONS)}",
                          deployment_id=report.get("deployment_id"))
    deployment_id = report.get("deployment_id")
    out: dict[str, Any] = {"applied": False, "decision": decision,
                           "deployment_id": deployment_id,
                           "champion_version": report.get("champion_version"),
                           "challenger_version": report.get("challenger_version"),
                           "reason": ""}
    if not enabled:
        out["reason"] = "automatic decisions are disabled"
        return out
    if decision == "keep_collecting" or not deployment_id:
        out["reason"] = "nothing to apply: keep collecting"
        return out
    name = report["model_name"]
    challenger = str(report["challenger_version"])
    client = _mlflow_client(tracking_uri)
    current_champion = _alias_version(client, name, CHAMPION)
    expected = report.get("champion_version")
    already_promoted = decision == "promote" and current_champion == challenger
    if expected and current_champion not in (str(expected), None) and not already_promoted:
        raise ShadowError(
            f"the champion alias of {name} points at version {current_champion}, but the report "
            f"compared against version {expected}; rerun the comparison before applying",
            deployment_id=deployment_id, version=current_champion)
    if decision == "promote":
        client.set_registered_model_alias(name, CHAMPION, challenger)
        out["champion_version"] = challenger
        out["previous_champion_version"] = current_champion
    if _alias_version(client, name, CHALLENGER) == challenger:
        client.delete_registered_model_alias(name, CHALLENGER)
    end_deployment(deployment_id, engine=engine)
    _mark_applied(report.get("report_id"), engine)
    out["applied"] = True
    out["reason"] = "; ".join(report.get("reasons") or [])
    log.info("applied %s for deployment %s: champion=%s", decision, deployment_id,
             out["champion_version"])
    return out


def _mark_applied(report_id: str | None, engine: Any) -> None:
    if not report_id:
        return
    from sqlalchemy import update

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import ComparisonReport

    with session_scope(_engine(engine)) as session:
        session.execute(update(ComparisonReport).where(ComparisonReport.id == report_id)
                        .values(applied=True))


# ---- report ------------------------------------------------------------------------------------


def _charts(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """PNG charts: rates with Wilson intervals, dwell histograms, pairwise outcomes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [CHAMPION, CHALLENGER]
    colours = {CHAMPION: "#4c72b0", CHALLENGER: "#dd8452"}
    charts: dict[str, Path] = {}

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, title in ((axes[0], "magic_done", "magic-zone done rate"),
                              (axes[1], "quick_dismiss", "quick-dismiss rate")):
        rates = [variants[v][f"{metric}_rate"] or 0.0 for v in names]
        lows = [rates[i] - variants[v][f"{metric}_ci"][0] for i, v in enumerate(names)]
        highs = [variants[v][f"{metric}_ci"][1] - rates[i] for i, v in enumerate(names)]
        ax.bar(names, rates, yerr=[lows, highs], capsize=6,
               color=[colours[v] for v in names])
        ax.set_ylim(0, 1)
        ax.set_title(f"{title} (95% Wilson CI)")
        for i, v in enumerate(names):
            ax.text(i, min(0.95, rates[i] + 0.03), f"n={variants[v]['reacted']}",
                    ha="center", fontsize=8)
    fig.tight_layout()
    charts["rates"] = out_dir / "rates.png"
    fig.savefig(charts["rates"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.2))
    width = 0.4
    for offset, v in ((-width / 2, CHAMPION), (width / 2, CHALLENGER)):
        hist = variants[v]["dwell_histogram"]
        total = sum(hist.values()) or 1
        ax.bar([i + offset for i in range(len(DWELL_BIN_LABELS))],
               [hist[label] / total for label in DWELL_BIN_LABELS], width,
               label=v, color=colours[v])
    ax.set_xticks(range(len(DWELL_BIN_LABELS)), DWELL_BIN_LABELS)
    ax.set_ylabel("share of reactions")
    ax.set_title("dwell time of the terminal reaction")
    ax.legend()
    fig.tight_layout()
    charts["dwell"] = out_dir / "dwell.png"
    fig.savefig(charts["dwell"], dpi=110)
    plt.close(fig)

    pairwise = report.get("pairwise")
    if pairwise:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        labels = ["challenger wins", "ties", "champion wins"]
        values = [pairwise["challenger_wins"], pairwise["ties"], pairwise["champion_wins"]]
        ax.barh(labels, values, color=[colours[CHALLENGER], "#999999", colours[CHAMPION]])
        ax.set_title(f"pairwise judge, both orders (sign test p={pairwise['sign_test_p']:.4f})")
        fig.tight_layout()
        charts["pairwise"] = out_dir / "pairwise.png"
        fig.savefig(charts["pairwise"], dpi=110)
        plt.close(fig)
    return charts


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def render_html(report: dict[str, Any], charts: dict[str, Path]) -> str:
    """A self-contained HTML page (charts embedded as data URIs)."""
    v = report["variants"]
    rows = []
    for label, key, digits in (
        ("requests", "requests", 0), ("backend errors", "errors", 0),
        ("reacted interactions", "reacted", 0),
        ("magic-zone done", "magic_done", 0), ("magic-zone done rate", "magic_done_rate", 3),
        ("quick dismiss", "quick_dismiss", 0), ("quick-dismiss rate", "quick_dismiss_rate", 3),
        ("mean dwell (ms)", "mean_dwell_ms", 0), ("model version", "model_version", 0),
    ):
        cells = "".join(f"<td>{_fmt(v[name][key], digits)}</td>" for name in (CHAMPION,
                                                                              CHALLENGER))
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    for label, key in (("magic-zone 95% CI", "magic_done_ci"),
                       ("quick-dismiss 95% CI", "quick_dismiss_ci")):
        cells = "".join(f"<td>[{v[n][key][0]:.3f}, {v[n][key][1]:.3f}]</td>"
                        for n in (CHAMPION, CHALLENGER))
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    tests_html = "<p>Tests not run: below the minimum sample size.</p>"
    if report.get("tests"):
        items = []
        for name, test in report["tests"].items():
            items.append(f"<li>{name}: diff={test['diff']:+.4f}, z={test['z']:.3f}, "
                         f"p={test['p_value']:.4g}</li>")
        tests_html = "<ul>" + "".join(items) + "</ul>"
    if report.get("error_test"):
        e = report["error_test"]
        tests_html += (f"<p>backend error rate: {e['p1']:.4f} vs {e['p2']:.4f}, "
                       f"p={e['p_value']:.4g}</p>")
    pairwise_html = ""
    if report.get("pairwise"):
        p = report["pairwise"]
        pairwise_html = (
            f"<h2>Pairwise judge (mirror)</h2><p>{p['judged']} judged pairs "
            f"({p['errors']} judge failures): challenger {p['challenger_wins']} wins, "
            f"champion {p['champion_wins']} wins, {p['ties']} ties; sign test "
            f"p={p['sign_test_p']:.4g}.</p>")
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"/></figure>'
        for name, path in charts.items())
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report.get("reasons", []))
    w = report["windows"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Shadow comparison {_fmt(report['deployment_id'])}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{text-align:left}}.decision{{font-size:1.4em;font-weight:bold}}</style></head><body>
<h1>Shadow comparison: {_fmt(report['model_name'])}</h1>
<p>Deployment <code>{_fmt(report['deployment_id'])}</code>, mode <b>{_fmt(report['mode'])}</b>,
share {report['share']:.3f}; champion v{_fmt(report['champion_version'])} vs challenger
v{_fmt(report['challenger_version'])}. Report <code>{_fmt(report.get('report_id'))}</code>.</p>
<p class="decision">Decision: {_fmt(report['decision'])}</p><ul>{reasons}</ul>
<p>Positive: <code>done</code> with {w['done_min_ms']} ms &le; dwell &le; {w['done_max_ms']} ms;
negative: <code>dismiss</code> with dwell &lt; {w['dismiss_max_ms']} ms. Rates are over reacted
interactions; tests need {report['min_samples']} per variant; alpha={report['alpha']}.</p>
<table><tr><th></th><th>champion</th><th>challenger</th></tr>{''.join(rows)}</table>
<h2>Tests (challenger vs champion)</h2>{tests_html}{pairwise_html}
<h2>Charts</h2>{images}
</body></html>
"""


def _experiment_id(client: Any, tracking_uri: str) -> str:
    existing = client.get_experiment_by_name(REPORT_EXPERIMENT)
    if existing is not None:
        return existing.experiment_id
    location = None
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        root = get_settings().mlflow_artifact_root / REPORT_EXPERIMENT
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return client.create_experiment(REPORT_EXPERIMENT, artifact_location=location)
    except Exception:  # noqa: BLE001 - a concurrent creator won
        return client.get_experiment_by_name(REPORT_EXPERIMENT).experiment_id


def _log_to_mlflow(report: dict[str, Any], files: list[Path],
                   tracking_uri: str | None) -> tuple[str, str]:
    """Log the report to a run (reused for the same report id); return (run_id, html uri)."""
    from mlflow.entities import Metric, Param, RunTag

    uri = tracking_uri or get_settings().resolved_mlflow_tracking_uri
    client = _mlflow_client(uri)
    experiment_id = _experiment_id(client, uri)
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.report_id = '{report['report_id']}'",
                               max_results=1)
    if found:
        run = found[0]
    else:
        run = client.create_run(experiment_id,
                                run_name=f"shadow-{report['deployment_id'][:12]}",
                                tags={"report_id": report["report_id"],
                                      "deployment_id": report["deployment_id"],
                                      "decision": report["decision"]})
    run_id = run.info.run_id
    if not found:
        params = {"deployment_id": report["deployment_id"], "mode": report["mode"],
                  "share": report["share"], "champion_version": report["champion_version"],
                  "challenger_version": report["challenger_version"],
                  "min_samples": report["min_samples"], "alpha": report["alpha"]}
        metrics = []
        for variant, values in report["variants"].items():
            for key in ("requests", "errors", "reacted", "magic_done_rate",
                        "quick_dismiss_rate", "mean_dwell_ms"):
                if values.get(key) is not None:
                    metrics.append(Metric(f"{variant}.{key}", float(values[key]), 0, 0))
        for name, test in (report.get("tests") or {}).items():
            metrics.append(Metric(f"test.{name}.p_value", float(test["p_value"]), 0, 0))
            metrics.append(Metric(f"test.{name}.diff", float(test["diff"]), 0, 0))
        if report.get("pairwise"):
            metrics.append(Metric("pairwise.sign_test_p",
                                  float(report["pairwise"]["sign_test_p"]), 0, 0))
        client.log_batch(run_id, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("decision", report["decision"])])
    for path in files:
        client.log_artifact(run_id, str(path))
    if not found:
        client.set_terminated(run_id, status="FINISHED")
    return run_id, f"{run.info.artifact_uri.rstrip('/')}/report.html"


def write_report_files(report: dict[str, Any], out_dir: Path | str, *,
                       log_to_mlflow: bool = True, tracking_uri: str | None = None,
                       engine: Any = None) -> dict[str, Any]:
    """Render, log and store a report; return {"path", "report_uri", "mlflow_run_id"}."""
    from tasks.core.db.engine import session_scope, upsert
    from tasks.core.db.models import ComparisonReport

    folder = Path(out_dir) / report["report_id"]
    folder.mkdir(parents=True, exist_ok=True)
    charts = _charts(report, folder)
    page = folder / "report.html"
    page.write_text(render_html(report, charts), encoding="utf-8")
    data = folder / "report.json"
    data.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    run_id, report_uri = None, page.resolve().as_uri()
    if log_to_mlflow:
        run_id, report_uri = _log_to_mlflow(report, [page, data, *charts.values()],
                                            tracking_uri)
    with session_scope(_engine(engine)) as session:
        upsert(session, ComparisonReport, [{
            "id": report["report_id"], "deployment_id": report["deployment_id"],
            "metrics": json.loads(json.dumps(report, default=str)),
            "decision": report["decision"], "report_uri": report_uri, "mlflow_run_id": run_id,
        }], update=["metrics", "decision", "report_uri", "mlflow_run_id"])
    log.info("shadow report %s: %s (%s)", report["report_id"], page, report_uri)
    return {"path": page, "report_uri": report_uri, "mlflow_run_id": run_id}


def write_report(report: dict[str, Any], out_dir: Path | str, *, log_to_mlflow: bool = True,
                 tracking_uri: str | None = None, engine: Any = None) -> Path:
    """Render the HTML (+ PNG) report, log it to MLflow ("shadow-reports"), store a
    `comparison_reports` row with its URI; return the local HTML path."""
    return write_report_files(report, out_dir, log_to_mlflow=log_to_mlflow,
                              tracking_uri=tracking_uri, engine=engine)["path"]


def compare_and_report(
    deployment_id: str | None = None,
    *,
    min_samples: int = 100,
    alpha: float = 0.05,
    windows: SignalWindows | dict[str, Any] | None = None,
    judge: bool = True,
    out_dir: Path | str | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """`compare_variants` + `write_report`: the Airflow task's entry point.

    Returns the report (per-pair judge details left out, they are in report.json) plus
    "report_path", "report_uri" and "mlflow_run_id". Without any deployment: a
    keep_collecting stub with empty report_uri (a scheduled run must not fail for that).
    """
    try:
        report = compare_variants(deployment_id, min_samples=min_samples, alpha=alpha,
                                  windows=windows, judge=judge, engine=engine)
    except ShadowError:
        if deployment_id:
            raise
        log.info("no active deployment: nothing to compare")
        return {"deployment_id": None, "decision": "keep_collecting",
                "reasons": ["no active deployment"], "report_uri": "", "report_path": "",
                "mlflow_run_id": None}
    folder = Path(out_dir) if out_dir else get_settings().data_dir / "reports" / "shadow"
    written = write_report_files(report, folder, log_to_mlflow=log_to_mlflow,
                                 tracking_uri=tracking_uri, engine=engine)
    if report.get("pairwise"):
        report["pairwise"] = {k: v for k, v in report["pairwise"].items() if k != "details"}
    report.update(report_path=str(written["path"]), report_uri=written["report_uri"],
                  mlflow_run_id=written["mlflow_run_id"])
    return report
