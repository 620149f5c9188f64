"""Shadow deployments, the comparison statistics (against hand-computed values), the decision rule,
the pairwise judge (fake judge server), the report, and the aliases moving in a real MLflow
(sqlite) registry — including the router following the aliases."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

from serving.router import create_router_app
from serving.router_config import BackendConfig, RouterConfig, key_digest
from serving.router_server import RouterServer
from serving.routing import StateResolver
from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import ComparisonReport, Deployment, Interaction, Reaction
from tasks.core.ids import stable_id
from tasks.core.llm import LLMClient
from tasks.core.settings import Endpoint
from tasks.judge.pairwise import combine_orders
from tasks.shadow.compare import compare_variants, decide
from tasks.shadow.config import ShadowError, SignalWindows
from tasks.shadow.pairwise import PAIR_LABELS
from tasks.shadow.report import write_report
from tasks.shadow.stage import (
    apply_decision,
    compare_and_report,
    deploy_challenger,
    end_deployment,
)
from tests.fakes.fake_openai import FakeOpenAIServer
from tests.unit.serving.registry_helpers import signed_version

T0 = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def shadow_engine(make_engine):
    return make_engine("tuneloop_shadow")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """A real MLflow store (sqlite); created once per module (its migrations take seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    return uri


@pytest.fixture()
def model_name() -> str:
    return f"shadow-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def registry(tracking_uri, model_name, tmp_path):
    """A registered model with versions 1..3 (any small artifact), champion=1, challenger=2."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model(model_name)
    artifact = tmp_path / "adapter"
    artifact.mkdir()
    (artifact / "adapter_config.json").write_text("{}")
    for _ in range(3):
        signed_version(client, model_name, artifact)
    client.set_registered_model_alias(model_name, "champion", "1")
    client.set_registered_model_alias(model_name, "challenger", "2")
    return client


def aliases(client, name: str) -> dict[str, str]:
    return {alias: str(version)
            for alias, version in client.get_registered_model(name).aliases.items()}


def seed(engine, deployment_id: str, variant: str, outcomes: list[tuple[str | None, int]],
         *, status: str = "ok", version: str | None = None) -> list[str]:
    """One interaction per outcome (reaction or None, dwell_ms); returns the interaction ids."""
    ids, interactions, reactions = [], [], []
    for index, (reaction, dwell) in enumerate(outcomes):
        iid = stable_id(deployment_id, variant, status, index, len(outcomes))
        ids.append(iid)
        interactions.append({
            "id": iid, "user_hash": stable_id("user", index), "deployment_id": deployment_id,
            "variant": variant, "model_name": f"m-{variant}", "model_version": version,
            "context": {}, "request_messages": [{"role": "user", "content": f"q{index}"}],
            "response": f"{variant} answer {index}", "latency_ms": 5.0, "status": status,
            "created_at": T0 + timedelta(seconds=index),
        })
        if reaction is not None:
            reactions.append({"id": stable_id("r", iid), "interaction_id": iid,
                              "reaction": reaction, "dwell_ms": dwell,
                              "created_at": T0 + timedelta(seconds=index + 1)})
    with session_scope(engine) as session:
        upsert(session, Interaction, interactions)
        if reactions:
            upsert(session, Reaction, reactions)
    return ids


def canary_deployment(engine, model_name: str, **kwargs) -> str:
    values = {"champion_version": "1", "mode": "canary", "share": 0.5, **kwargs}
    return deploy_challenger("2", model_name=model_name, engine=engine, **values)["deployment_id"]


def seed_promotable(engine, deployment_id: str) -> None:
    """champion: 60/120 magic done, 30/120 quick dismiss; challenger: 70/100 and 10/100."""
    seed(engine, deployment_id, "champion",
         [("done", 30_000)] * 60 + [("done", 200_000)] * 10 + [("dismiss", 1_000)] * 30
         + [("dismiss", 10_000)] * 20 + [(None, 0)] * 10, version="1")
    seed(engine, deployment_id, "challenger",
         [("done", 30_000)] * 70 + [("dismiss", 1_000)] * 10 + [("done", 5_000)] * 20,
         version="2")
    seed(engine, deployment_id, "champion", [(None, 0)] * 2, status="backend_error")


# ---- deployments -------------------------------------------------------------------------------


def test_deploy_challenger_is_deterministic_and_ends_the_previous_one(shadow_engine, model_name):
    first = deploy_challenger("2", champion_version="1", mode="canary", share=0.05,
                              model_name=model_name, engine=shadow_engine)
    again = deploy_challenger("2", champion_version="1", mode="canary", share=0.05,
                              model_name=model_name, engine=shadow_engine)
    assert again["deployment_id"] == first["deployment_id"] and again["ended"] == []
    second = deploy_challenger("3", champion_version="1", mode="mirror", share=1.0,
                               model_name=model_name, engine=shadow_engine)
    assert second["ended"] == [first["deployment_id"]]
    with session_scope(shadow_engine) as session:
        rows = {d.id: d for d in session.execute(
            select(Deployment).where(Deployment.model_name == model_name)).scalars()}
    assert rows[first["deployment_id"]].active is False
    assert rows[first["deployment_id"]].ended_at is not None
    assert rows[second["deployment_id"]].active is True
    assert (rows[second["deployment_id"]].mode, rows[second["deployment_id"]].share) == \
        ("mirror", 1.0)


def test_redeploying_an_ended_configuration_starts_a_fresh_deployment(shadow_engine, model_name):
    """Rolled back, then the same challenger deployed again: a new id with its own start time,
    so the old period's interactions are not in the new comparison; a rerun stays a no-op."""
    kwargs = dict(champion_version="1", mode="canary", share=0.5, model_name=model_name,
                  engine=shadow_engine)
    first = deploy_challenger("2", **kwargs)["deployment_id"]
    seed(shadow_engine, first, "challenger", [("dismiss", 1_000)] * 3, version="2")
    end_deployment(first, engine=shadow_engine)
    second = deploy_challenger("2", **kwargs)
    assert second["deployment_id"] != first and second["ended"] == []
    assert deploy_challenger("2", **kwargs)["deployment_id"] == second["deployment_id"]
    report = compare_variants(second["deployment_id"], min_samples=1, engine=shadow_engine)
    assert report["variants"]["challenger"]["requests"] == 0
    with session_scope(shadow_engine) as session:
        old, new = session.get(Deployment, first), session.get(Deployment, second["deployment_id"])
        assert not old.active and new.active and new.started_at >= old.ended_at
    end_deployment(second["deployment_id"], engine=shadow_engine)
    third = deploy_challenger("2", **kwargs)["deployment_id"]
    assert third not in (first, second["deployment_id"])


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "blue-green"}, "mode"),
    ({"mode": "canary", "share": 0.0}, "share"),
    ({"mode": "canary", "share": 1.5}, "share"),
    ({"mode": "mirror", "share": 1.5}, "within \\[0, 1\\] for mirror"),
    ({"champion_version": "2"}, "both version 2"),
])
def test_deploy_challenger_rejects_bad_arguments(shadow_engine, model_name, kwargs, message):
    with pytest.raises(ShadowError, match=message):
        deploy_challenger("2", model_name=model_name, engine=shadow_engine, **kwargs)


# ---- statistics --------------------------------------------------------------------------------


def test_compare_variants_matches_hand_computed_statistics(shadow_engine, model_name):
    deployment_id = canary_deployment(shadow_engine, model_name)
    seed_promotable(shadow_engine, deployment_id)
    report = compare_variants(deployment_id, min_samples=100, alpha=0.05, judge=False,
                              engine=shadow_engine)
    champion, challenger = report["variants"]["champion"], report["variants"]["challenger"]
    assert (champion["requests"], champion["errors"], champion["reacted"]) == (130, 2, 120)
    assert (champion["magic_done"], champion["quick_dismiss"]) == (60, 30)
    assert champion["magic_done_rate"] == pytest.approx(0.5)
    assert champion["quick_dismiss_rate"] == pytest.approx(0.25)
    assert champion["magic_done_ci"] == pytest.approx([0.411939, 0.588061], abs=1e-6)
    assert champion["quick_dismiss_ci"] == pytest.approx([0.181098, 0.334411], abs=1e-6)
    # (60*30000 + 10*200000 + 30*1000 + 20*10000) / 120
    assert champion["mean_dwell_ms"] == pytest.approx(33_583.333, abs=1e-3)
    assert champion["dwell_histogram"] == {"<5s": 30, "5-15s": 20, "15-60s": 60,
                                           "60-120s": 0, ">120s": 10}
    assert champion["model_version"] == "1" and challenger["model_version"] == "2"
    assert (challenger["reacted"], challenger["magic_done"], challenger["quick_dismiss"]) == \
        (100, 70, 10)
    assert challenger["magic_done_ci"] == pytest.approx([0.604151, 0.781051], abs=1e-6)
    assert challenger["mean_dwell_ms"] == pytest.approx(22_100.0)
    magic = report["tests"]["magic_done"]
    # pooled 130/220; SE = sqrt(0.590909 * 0.409091 * (1/120 + 1/100)) = 0.066572
    assert magic["z"] == pytest.approx(3.004270, abs=1e-6)
    assert magic["p_value"] == pytest.approx(0.002662, abs=1e-6)
    dismiss = report["tests"]["quick_dismiss"]
    assert dismiss["z"] == pytest.approx(-2.872281, abs=1e-6)
    assert dismiss["p_value"] == pytest.approx(0.004075, abs=1e-6)
    assert report["decision"] == "promote"
    assert report["champion_version"] == "1" and report["challenger_version"] == "2"


def test_only_the_first_terminal_reaction_counts(shadow_engine, model_name):
    deployment_id = canary_deployment(shadow_engine, model_name)
    [iid] = seed(shadow_engine, deployment_id, "champion", [("done", 30_000)])
    with session_scope(shadow_engine) as session:
        upsert(session, Reaction, [
            {"id": "later-dismiss", "interaction_id": iid, "reaction": "dismiss",
             "dwell_ms": 100, "created_at": T0 + timedelta(hours=1)},
            {"id": "thumbs", "interaction_id": iid, "reaction": "thumbs_up", "dwell_ms": 50,
             "created_at": T0 - timedelta(hours=1)},
        ])
    champion = compare_variants(deployment_id, min_samples=1, judge=False,
                                engine=shadow_engine)["variants"]["champion"]
    assert (champion["reacted"], champion["magic_done"], champion["quick_dismiss"]) == (1, 1, 0)
    assert champion["reactions"] == {"done": 1, "dismiss": 1, "thumbs_up": 1}


def test_custom_windows_move_the_magic_zone(shadow_engine, model_name):
    deployment_id = canary_deployment(shadow_engine, model_name)
    seed(shadow_engine, deployment_id, "champion", [("done", 10_000), ("done", 30_000)])
    report = compare_variants(deployment_id, min_samples=1, judge=False, engine=shadow_engine,
                              windows={"done_min_ms": 5_000, "done_max_ms": 20_000})
    assert report["variants"]["champion"]["magic_done"] == 1
    with pytest.raises(ValueError, match="done_min_ms < done_max_ms"):
        SignalWindows(done_min_ms=10, done_max_ms=5)


def test_below_min_samples_keeps_collecting_without_tests(shadow_engine, model_name):
    deployment_id = canary_deployment(shadow_engine, model_name)
    seed_promotable(shadow_engine, deployment_id)
    report = compare_variants(deployment_id, min_samples=101, judge=False, engine=shadow_engine)
    assert report["tests"] is None
    assert report["decision"] == "keep_collecting"


def test_worse_challenger_is_rolled_back(shadow_engine, model_name):
    deployment_id = canary_deployment(shadow_engine, model_name)
    seed(shadow_engine, deployment_id, "champion", [("done", 30_000)] * 70 + [("dismiss", 500)]
         * 30)
    seed(shadow_engine, deployment_id, "challenger",
         [("done", 30_000)] * 40 + [("dismiss", 500)] * 60)
    report = compare_variants(deployment_id, min_samples=100, judge=False, engine=shadow_engine)
    assert report["decision"] == "rollback"
    assert any("lower magic-zone done rate" in r for r in report["reasons"])
    assert any("higher quick-dismiss rate" in r for r in report["reasons"])


def test_no_active_deployment_is_an_error_but_not_for_the_scheduled_report(shadow_engine,
                                                                            model_name):
    with pytest.raises(ShadowError, match="no deployment"):
        compare_variants("does-not-exist", engine=shadow_engine)
    with pytest.raises(ShadowError, match="no active deployment"):
        compare_variants(model_name=model_name, engine=shadow_engine)


# ---- decision rule -----------------------------------------------------------------------------


def _test(p1: float, p2: float, p_value: float) -> dict:
    return {"p1": p1, "p2": p2, "diff": p2 - p1, "z": 0.0, "p_value": p_value, "n1": 1, "n2": 1}


@pytest.mark.parametrize("magic, dismiss, expected", [
    (_test(0.5, 0.7, 0.001), _test(0.2, 0.2, 0.9), "promote"),
    (_test(0.5, 0.7, 0.001), _test(0.2, 0.4, 0.01), "rollback"),  # a guard beats the gain
    (_test(0.5, 0.3, 0.001), _test(0.2, 0.2, 0.9), "rollback"),
    (_test(0.5, 0.55, 0.2), _test(0.2, 0.2, 0.9), "keep_collecting"),
])
def test_canary_decision_rule(magic, dismiss, expected):
    decision, reasons = decide("canary", {"magic_done": magic, "quick_dismiss": dismiss}, None,
                               None, min_samples=100, alpha=0.05)
    assert decision == expected and reasons


def test_error_rate_guard_rolls_back_even_without_reactions():
    decision, reasons = decide("canary", None, _test(0.01, 0.2, 1e-6), None, min_samples=100,
                               alpha=0.05)
    assert decision == "rollback" and "error rate" in reasons[0]


@pytest.mark.parametrize("wins, losses, ties, expected", [
    (90, 10, 20, "promote"), (10, 90, 20, "rollback"), (52, 48, 20, "keep_collecting"),
    (9, 1, 0, "keep_collecting"),  # significant but fewer than min_samples judged pairs
])
def test_mirror_decision_rule(wins, losses, ties, expected):
    from tasks.shadow.pairwise import pairwise_summary

    outcomes = ["challenger"] * wins + ["champion"] * losses + ["tie"] * ties
    decision, _ = decide("mirror", None, None, pairwise_summary(outcomes), min_samples=100,
                         alpha=0.05)
    assert decision == expected


def test_off_mode_never_decides():
    assert decide("off", None, None, None, min_samples=1, alpha=0.05)[0] == "keep_collecting"


@pytest.mark.parametrize("first, second, outcome", [
    ("B", "A", "challenger"), ("A", "B", "champion"), ("A", "A", "tie"), ("B", "B", "tie"),
    ("tie", "A", "tie"), (None, "A", None), ("B", None, None),  # a failed order: undecided
])
def test_pair_needs_both_orders_to_agree(first, second, outcome):
    assert combine_orders(first, second, PAIR_LABELS) == outcome


def test_a_failed_order_is_counted_as_an_error_not_judged():
    from tasks.shadow.pairwise import pairwise_summary

    summary = pairwise_summary(["challenger", None, "tie", "champion", None])
    assert (summary["pairs"], summary["judged"], summary["errors"]) == (5, 3, 2)
    assert (summary["challenger_wins"], summary["champion_wins"], summary["ties"]) == (1, 1, 1)
    assert summary["challenger_win_rate"] == 0.5


# ---- mirror mode: pairwise judge through the LLM client ----------------------------------------


def _reply(prompt: str, label: str) -> str:
    match = re.search(rf"## Reply {label}\n(.*?)\n\n## ", prompt, re.S)
    return match.group(1) if match else ""


def prefers_challenger(request: dict) -> str:
    prompt = request["messages"][-1]["content"]
    winner = "A" if "challenger" in _reply(prompt, "A") else "B"
    return json.dumps({"winner": winner, "reason": "more helpful"})


def always_a(request: dict) -> str:
    return json.dumps({"winner": "A", "reason": "first is best"})


def _add_pairs(engine, deployment_id: str, pairs: int) -> list[str]:
    champion_ids = seed(engine, deployment_id, "champion", [(None, 0)] * pairs, version="1")
    rows = [{"id": stable_id("mirror", cid), "user_hash": "u", "deployment_id": deployment_id,
             "variant": "mirror", "model_name": "m", "model_version": "2", "context": {},
             "request_messages": [{"role": "user", "content": f"q{i}"}],
             "response": f"challenger answer {i}", "latency_ms": 1.0, "mirror_of": cid,
             "status": "ok"} for i, cid in enumerate(champion_ids)]
    with session_scope(engine) as session:
        upsert(session, Interaction, rows)
    return champion_ids


def seed_mirror(engine, model_name: str, pairs: int) -> str:
    deployment_id = deploy_challenger("2", champion_version="1", mode="mirror", share=1.0,
                                      model_name=model_name, engine=engine)["deployment_id"]
    _add_pairs(engine, deployment_id, pairs)
    return deployment_id


@pytest.mark.parametrize("responder, wins, ties, decision", [
    (prefers_challenger, 12, 0, "promote"),
    (always_a, 0, 12, "keep_collecting"),  # pure position bias cancels out to ties
])
def test_mirror_pairs_are_judged_in_both_orders(shadow_engine, model_name, responder, wins,
                                                ties, decision):
    deployment_id = seed_mirror(shadow_engine, model_name, 12)
    with FakeOpenAIServer(responder=responder) as judge_server:
        client = LLMClient([Endpoint(base_url=judge_server.base_url, model="fake-model")],
                           max_retries=0)
        report = compare_variants(deployment_id, min_samples=10, judge_client=client,
                                  engine=shadow_engine)
        prompts = [r["messages"][-1]["content"] for r in judge_server.requests]
    assert len(prompts) == 24  # 12 pairs x 2 orders
    assert any(_reply(p, "A").startswith("champion answer") for p in prompts)
    assert any(_reply(p, "A").startswith("challenger answer") for p in prompts)
    pairwise = report["pairwise"]
    assert (pairwise["challenger_wins"], pairwise["ties"], pairwise["judged"]) == (wins, ties, 12)
    assert report["decision"] == decision
    assert report["variants"]["challenger"]["requests"] == 12  # the mirror rows


def test_a_judge_without_usable_verdicts_leaves_mirrored_pairs_undecided(shadow_engine,
                                                                         model_name):
    deployment_id = seed_mirror(shadow_engine, model_name, 3)
    with FakeOpenAIServer(responder=lambda request: "no json here") as judge_server:
        client = LLMClient([Endpoint(base_url=judge_server.base_url, model="fake-model")],
                           max_retries=0)
        report = compare_variants(deployment_id, min_samples=1, judge_client=client,
                                  engine=shadow_engine)
        requests = judge_server.stats()["total"]
    assert requests == 3 * 2 * 2  # 3 pairs x 2 orders x (1 call + 1 corrective follow-up)
    pairwise = report["pairwise"]
    assert (pairwise["pairs"], pairwise["judged"], pairwise["errors"]) == (3, 0, 3)
    assert all(p["outcome"] is None and p["verdicts"] == [None, None]
               for p in pairwise["details"])
    assert report["decision"] == "keep_collecting"


def _hash_sample(ids: list[str], k: int) -> set[str]:
    return set(sorted(ids, key=lambda i: (hashlib.md5(i.encode()).hexdigest(), i))[:k])


def test_the_judged_pairs_are_a_hash_sample_that_follows_new_traffic(shadow_engine, model_name):
    """Not the oldest pairs forever: a stable hash sample over all pairs, so new mirrored traffic
    enters it (and verdicts already given come back from the response cache)."""
    deployment_id = deploy_challenger("2", champion_version="1", mode="mirror", share=1.0,
                                      model_name=model_name, engine=shadow_engine)["deployment_id"]
    first = _add_pairs(shadow_engine, deployment_id, 12)
    with FakeOpenAIServer(responder=prefers_challenger) as judge_server:
        client = LLMClient([Endpoint(base_url=judge_server.base_url, model="fake-model")],
                           max_retries=0)

        def judged() -> set[str]:
            report = compare_variants(deployment_id, min_samples=1, max_judge_pairs=5,
                                      judge_client=client, engine=shadow_engine)
            return {p["champion_id"] for p in report["pairwise"]["details"]}

        assert judged() == _hash_sample(first, 5)
        assert judged() == _hash_sample(first, 5)  # stable from run to run
        later = _add_pairs(shadow_engine, deployment_id, 24)
        sample = judged()
    assert sample == _hash_sample(first + later, 5)
    assert sample & set(later), "newly mirrored pairs must be able to enter the sample"


# ---- report ------------------------------------------------------------------------------------


def test_write_report_renders_logs_to_mlflow_and_stores_a_row(shadow_engine, model_name,
                                                              tracking_uri, tmp_path):
    from mlflow import MlflowClient

    deployment_id = canary_deployment(shadow_engine, model_name)
    seed_promotable(shadow_engine, deployment_id)
    report = compare_variants(deployment_id, min_samples=100, judge=False, engine=shadow_engine)
    path = write_report(report, tmp_path, tracking_uri=tracking_uri, engine=shadow_engine)
    page = path.read_text()
    assert "Decision: promote" in page and page.count("data:image/png;base64,") == 2
    assert {p.name for p in path.parent.glob("*.png")} == {"rates.png", "dwell.png"}
    assert (path.parent / "rates.png").read_bytes()[:4] == b"\x89PNG"
    with session_scope(shadow_engine) as session:
        row = session.get(ComparisonReport, report["report_id"])
    assert row.decision == "promote" and row.report_uri.endswith("/report.html")
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(row.mlflow_run_id)
    assert client.get_experiment(run.info.experiment_id).name == "shadow-reports"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "report.html", "rates.png", "dwell.png", "report.json"}
    assert run.data.metrics["challenger.magic_done_rate"] == pytest.approx(0.7)
    # a rerun of the same report reuses the run
    write_report(report, tmp_path, tracking_uri=tracking_uri, engine=shadow_engine)
    with session_scope(shadow_engine) as session:
        assert session.get(ComparisonReport, report["report_id"]).mlflow_run_id == \
            row.mlflow_run_id


# ---- applying decisions to the registry --------------------------------------------------------


def test_promote_moves_champion_and_removes_challenger(shadow_engine, model_name, registry,
                                                       tracking_uri, tmp_path):
    deployment_id = canary_deployment(shadow_engine, model_name)
    seed_promotable(shadow_engine, deployment_id)
    report = compare_and_report(deployment_id, min_samples=100, judge=False, out_dir=tmp_path,
                                tracking_uri=tracking_uri, engine=shadow_engine)
    assert report["decision"] == "promote" and report["report_uri"]
    assert apply_decision(report, enabled=False, tracking_uri=tracking_uri,
                          engine=shadow_engine)["applied"] is False
    assert aliases(registry, model_name) == {"champion": "1", "challenger": "2"}
    result = apply_decision(report, enabled=True, tracking_uri=tracking_uri,
                            engine=shadow_engine)
    assert result["applied"] is True and result["champion_version"] == "2"
    assert aliases(registry, model_name) == {"champion": "2"}
    with session_scope(shadow_engine) as session:
        assert session.get(Deployment, deployment_id).active is False
        assert session.get(ComparisonReport, report["report_id"]).applied is True
    # applying again is harmless
    assert apply_decision(report, enabled=True, tracking_uri=tracking_uri,
                          engine=shadow_engine)["champion_version"] == "2"
    assert aliases(registry, model_name) == {"champion": "2"}


def test_the_router_serves_a_promotion_when_the_deployment_ends_not_an_alias_ttl_later(
        shadow_engine, model_name, registry, tracking_uri, tmp_path):
    backend = BackendConfig(base_url="http://127.0.0.1:9/v1", base_model="base")
    resolver = StateResolver(RouterConfig(
        backends={"champion": backend, "challenger": backend}, registered_model_name=model_name,
        api_keys=["k"], user_hash_salt="s", tracking_uri=tracking_uri, alias_ttl_s=3600),
        shadow_engine)
    deployment_id = canary_deployment(shadow_engine, model_name)
    assert resolver.refresh_deployment() is True  # as at start-up: a change reads the aliases
    assert resolver.state.deployment_id == deployment_id
    assert dict(resolver.state.versions) == {"champion": "1", "challenger": "2"}
    seed_promotable(shadow_engine, deployment_id)
    report = compare_and_report(deployment_id, min_samples=100, judge=False, out_dir=tmp_path,
                                tracking_uri=tracking_uri, engine=shadow_engine)
    apply_decision(report, enabled=True, tracking_uri=tracking_uri, engine=shadow_engine)
    # Only the deployment poll runs (every deployment_ttl_s); the alias poll is an hour away.
    assert resolver.refresh_deployment() is True
    assert resolver.state.deployment_id is None and resolver.state.mode == "off"
    assert dict(resolver.state.versions) == {"champion": "2", "challenger": None}
    assert resolver.refresh_deployment() is False  # nothing changed: no registry read


def test_rollback_removes_challenger_and_keeps_champion(shadow_engine, model_name, registry,
                                                        tracking_uri):
    deployment_id = canary_deployment(shadow_engine, model_name)
    report = {"decision": "rollback", "deployment_id": deployment_id, "model_name": model_name,
              "champion_version": "1", "challenger_version": "2", "reasons": ["worse"]}
    result = apply_decision(report, enabled=True, tracking_uri=tracking_uri,
                            engine=shadow_engine)
    assert result["applied"] is True
    assert aliases(registry, model_name) == {"champion": "1"}
    with session_scope(shadow_engine) as session:
        assert session.get(Deployment, deployment_id).active is False


def test_keep_collecting_changes_nothing(shadow_engine, model_name, registry, tracking_uri):
    deployment_id = canary_deployment(shadow_engine, model_name)
    report = {"decision": "keep_collecting", "deployment_id": deployment_id,
              "model_name": model_name, "champion_version": "1", "challenger_version": "2"}
    assert apply_decision(report, enabled=True, tracking_uri=tracking_uri,
                          engine=shadow_engine)["applied"] is False
    assert aliases(registry, model_name) == {"champion": "1", "challenger": "2"}


def test_stale_report_is_refused(shadow_engine, model_name, registry, tracking_uri):
    deployment_id = canary_deployment(shadow_engine, model_name)
    registry.set_registered_model_alias(model_name, "champion", "3")
    report = {"decision": "promote", "deployment_id": deployment_id, "model_name": model_name,
              "champion_version": "1", "challenger_version": "2"}
    with pytest.raises(ShadowError, match="points at version 3"):
        apply_decision(report, enabled=True, tracking_uri=tracking_uri, engine=shadow_engine)
    assert aliases(registry, model_name) == {"champion": "3", "challenger": "2"}


def test_router_follows_the_registry_aliases_through_a_promotion(
        shadow_engine, model_name, registry, tracking_uri, tmp_path):
    """deploy (champion from the alias) → router serves v1/v2 → promote → router serves v2."""
    with FakeOpenAIServer(model_ids=("base", f"{model_name}-v1", f"{model_name}-v2")) as backend:
        backend_config = BackendConfig(base_url=backend.base_url, base_model="base",
                                       model_template="vllm")
        config = RouterConfig(
            backends={"champion": backend_config}, registered_model_name=model_name,
            public_model="tuneloop", api_keys=["k"], admin_key_sha256=key_digest("admin-k"),
            user_hash_salt="s", tracking_uri=tracking_uri, alias_ttl_s=0.2,
            deployment_ttl_s=0.2, rate_limit_per_s=0, key_rate_limit_per_s=0)
        deployment = deploy_challenger("2", mode="canary", share=1.0, model_name=model_name,
                                       engine=shadow_engine)
        with RouterServer(create_router_app(config, engine=shadow_engine)) as server, \
                httpx.Client(base_url=server.base_url,
                             headers={"Authorization": "Bearer k"}) as client:
            def served(user: str) -> tuple[str, str, str]:
                response = client.post("/chat/completions", json={
                    "model": "tuneloop", "user": user,
                    "messages": [{"role": "user", "content": "hi"}]})
                assert response.status_code == 200, response.text
                # The router tells no client its variant, version or backend model (the
                # answer names the public model): the stored interaction has them.
                assert response.json()["model"] == "tuneloop"
                assert "x-tuneloop-model-version" not in response.headers
                interaction_id = response.headers["x-interaction-id"]
                assert server.app.state.router.log.wait_written(interaction_id, 10)
                with session_scope(shadow_engine) as session:
                    row = session.get(Interaction, interaction_id)
                    return row.variant, row.model_version, row.model_name

            assert served("a") == ("challenger", "2", f"{model_name}-v2")
            state = client.get("/router/state",
                               headers={"Authorization": "Bearer admin-k"}).json()["routing"]
            assert state["versions"] == {"champion": "1", "challenger": "2"}
            report = {"decision": "promote", "deployment_id": deployment["deployment_id"],
                      "model_name": model_name, "champion_version": None,
                      "challenger_version": "2", "reasons": ["test"]}
            apply_decision(report, enabled=True, tracking_uri=tracking_uri,
                           engine=shadow_engine)
            deadline = time.monotonic() + 10
            now = served("a")
            while now != ("champion", "2", f"{model_name}-v2") and time.monotonic() < deadline:
                time.sleep(0.1)
                now = served("a")
            assert now == ("champion", "2", f"{model_name}-v2")
