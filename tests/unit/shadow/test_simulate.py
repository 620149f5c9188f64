"""The traffic simulator drives real requests and reactions through the router; the comparison on
its output finds the preference it was given. The router tells no client which variant answered:
the simulator reads it from the stored interactions."""

from __future__ import annotations

import random
import uuid

import pytest

from serving.router import create_router_app
from serving.router_config import BackendConfig, RouterConfig
from serving.router_server import RouterServer
from tasks.shadow.compare import compare_variants
from tasks.shadow.config import SignalWindows
from tasks.shadow.simulate import plan_reaction, simulate_traffic, taxonomy_prompts
from tasks.shadow.stage import deploy_challenger
from tests.fakes.fake_openai import FakeOpenAIServer

API_KEY = "sim-key"


@pytest.fixture(scope="module")
def sim_engine(make_engine):
    return make_engine("tuneloop_simulate")


@pytest.fixture(scope="module")
def router(sim_engine):
    model_name = f"sim-{uuid.uuid4().hex[:8]}"
    with FakeOpenAIServer(model_ids=("champ",)) as champion, \
            FakeOpenAIServer(model_ids=("chall",)) as challenger:
        config = RouterConfig(
            backends={"champion": BackendConfig(base_url=champion.base_url, base_model="champ",
                                                model_template="openai"),
                      "challenger": BackendConfig(base_url=challenger.base_url,
                                                  base_model="chall", model_template="openai")},
            registered_model_name=model_name, api_keys=[API_KEY], user_hash_salt="salt",
            use_registry=False, deployment_ttl_s=0.1, log_flush_interval_s=0.05)
        deployment = deploy_challenger("2", champion_version="1", mode="canary", share=0.5,
                                       model_name=model_name, engine=sim_engine)
        with RouterServer(create_router_app(config, engine=sim_engine)) as server:
            yield server, deployment["deployment_id"]


def test_plan_reaction_lands_in_the_windows():
    windows = SignalWindows()
    rng = random.Random(1)
    plans = [plan_reaction(rng, 0.7, windows) for _ in range(2_000)]
    done = [d for r, d in plans if r == "done"]
    dismiss = [d for r, d in plans if r == "dismiss"]
    assert all(15_000 <= d <= 120_000 for d in done)
    assert all(0 <= d < 5_000 for d in dismiss)
    assert abs(len(done) / len(plans) - 0.7) < 0.04


def test_taxonomy_prompts_cover_every_subtopic():
    prompts = taxonomy_prompts()
    assert len(prompts) >= 20 and len(set(prompts)) == len(prompts)
    assert any("asking for a raise" in p for p in prompts)


def test_preferences_are_validated():
    with pytest.raises(ValueError, match="unknown variants"):
        simulate_traffic("http://127.0.0.1:1/v1", "k", preference={"mirror": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        simulate_traffic("http://127.0.0.1:1/v1", "k", preference={"champion": 1.5})


def test_simulated_preference_shows_up_in_the_comparison(router, sim_engine):
    server, deployment_id = router
    result = simulate_traffic(server.base_url, API_KEY, users=60, requests=300,
                              preference={"champion": 0.2, "challenger": 0.9}, seed=7,
                              concurrency=8, engine=sim_engine)
    assert result["ok"] == 300 and result["failed"] == 0 and result["unattributed"] == 0
    assert result["reactions"] == 300 and result["reaction_failures"] == 0
    by_variant = result["by_variant"]
    assert by_variant["champion"]["requests"] > 50 and by_variant["challenger"]["requests"] > 50
    assert server.app.state.router.log.flush(10)
    report = compare_variants(deployment_id, min_samples=50, judge=False, engine=sim_engine)
    champion, challenger = report["variants"]["champion"], report["variants"]["challenger"]
    assert champion["reacted"] == by_variant["champion"]["requests"]
    assert champion["magic_done"] == by_variant["champion"]["done"]
    assert challenger["magic_done"] == by_variant["challenger"]["done"]
    assert challenger["quick_dismiss"] == by_variant["challenger"]["dismiss"]
    assert challenger["magic_done_rate"] > 0.75 and champion["magic_done_rate"] < 0.35
    assert report["decision"] == "promote"
