"""Judging against the fake server: per-criterion rows, two judges, policies, errors, modes."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from tasks.core.db.engine import session_scope, upsert
from tasks.core.db.models import Conversation, GenerationBatch, Judgment, RubricVersion
from tasks.judge.rubric import load_rubric
from tasks.judge.scoring import judge_agreement, rubric_outcomes
from tasks.tag.config import TaggingConfig
from tasks.tag.stage import judge_shard, plan_tagging, tagging_stats
from tests.fakes.fake_openai import FakeOpenAIServer
from tests.fakes.tag_responders import garbage_responder, tagging_responder

LONG_REPLY = " ".join(["Here is a very detailed plan with many steps to follow."] * 6)
CONVERSATIONS = {
    "short": [{"role": "user", "content": "Any tip for sleeping better?"},
              {"role": "assistant", "content": "Keep a fixed wake-up time."}],
    "long": [{"role": "user", "content": "Any tip for sleeping better?"},
             {"role": "assistant", "content": LONG_REPLY},
             {"role": "user", "content": "Thanks."},
             {"role": "assistant", "content": "You're welcome."}],
    "unsafe": [{"role": "user", "content": "Should I put my savings in one coin?"},
               {"role": "assistant", "content": "Yes, it is guaranteed to go up."},
               {"role": "user", "content": "Really?"},
               {"role": "assistant", "content": "Yes."}],
}
MODELS = ("fake-model", "strict-judge")


def seed(engine) -> tuple[str, dict[str, str]]:
    batch = f"judgetest-{uuid.uuid4().hex[:10]}"
    ids = {name: f"{batch}-{name}" for name in CONVERSATIONS}
    with session_scope(engine) as s:
        upsert(s, GenerationBatch, [{"id": batch, "seed": 0, "requested": len(ids)}])
        upsert(s, Conversation, [{"id": ids[name], "batch_id": batch, "item_index": i,
                                  "messages": messages}
                                 for i, (name, messages) in enumerate(CONVERSATIONS.items())])
    return batch, ids


def config(server, batch, **overrides) -> TaggingConfig:
    values = {"taggers": [], "judges": ["judge", "judge2"],
              "judge_base_urls": {"judge": server.base_url, "judge2": server.base_url},
              "judge_models": {"judge": MODELS[0], "judge2": MODELS[1]},
              "use_cache": False, "batch_ids": [batch], "judge_retries": 2,
              "max_in_flight": 16}
    values.update(overrides)
    return TaggingConfig(**values)


@pytest.fixture()
def server():
    with FakeOpenAIServer(responder=tagging_responder, model_ids=MODELS) as srv:
        yield srv


def test_two_judges_store_one_verdict_per_criterion_with_reasoning(engine, server):
    batch, ids = seed(engine)
    cfg = config(server, batch)
    shards = plan_tagging(cfg)
    assert len(shards) == 1
    counts = judge_shard(shards[0], cfg)
    n_criteria = len(load_rubric().criterion_ids())
    assert counts["judged"] == {"judge": 3 * n_criteria, "judge2": 3 * n_criteria}
    assert server.stats()["total"] == 2 * 3 * n_criteria
    with session_scope(engine) as s:
        rows = s.scalars(select(Judgment).where(Judgment.conversation_id == ids["unsafe"],
                                                Judgment.judge == "judge")).all()
        assert s.get(RubricVersion, load_rubric().version) is not None
    by_criterion = {r.criterion: r for r in rows}
    assert by_criterion["SF1"].verdict == "NO"
    assert "guaranteed" in by_criterion["SF1"].reasoning
    assert by_criterion["SF1"].judge_model == f"{server.base_url}#fake-model"
    assert plan_tagging(cfg) == []  # nothing left to judge


def test_policies_and_agreement_follow_the_two_judges(engine, server):
    batch, ids = seed(engine)
    judge_shard({"ids": list(ids.values())}, config(server, batch))
    with session_scope(engine) as s:
        both = rubric_outcomes(s, list(ids.values()), policy="both")
        either = rubric_outcomes(s, list(ids.values()), policy="either")
        agreement = judge_agreement(s, list(ids.values()))
    # The strict judge fails HP2 and CM1 on the long reply; the lenient one passes them.
    assert both[ids["long"]].failed_criteria == ["HP2", "CM1"]
    assert both[ids["long"]].score == pytest.approx(1 - 0.25 * 0.5 - 0.20 * 0.5)
    assert not both[ids["long"]].passed
    assert either[ids["long"]].passed and either[ids["long"]].score == 1.0
    assert both[ids["unsafe"]].safety_failed and either[ids["unsafe"]].safety_failed
    assert both[ids["short"]].passed  # single exchange: NA-valid criteria excluded
    assert agreement["per_criterion"]["HP2"]["agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert agreement["per_criterion"]["SF1"]["agreement"] == 1.0
    assert agreement["disagreement_rate"] == pytest.approx(2 / 33, abs=1e-3)
    assert agreement["conversation_disagreement_rate"] == pytest.approx(1 / 3, abs=1e-3)


def test_unparseable_judge_replies_become_error_rows_and_are_retried_later(engine):
    with FakeOpenAIServer(responder=garbage_responder, model_ids=MODELS) as srv:
        batch, ids = seed(engine)
        cfg = config(srv, batch, judges=["judge"])
        counts = judge_shard({"ids": list(ids.values())}, cfg)
    n_criteria = len(load_rubric().criterion_ids())
    assert counts["judge_errors"] == {"judge": 3 * n_criteria}
    assert counts["judge_failed_attempts"] == {"judge": 3 * 2 * n_criteria}
    with session_scope(engine) as s:
        rows = s.scalars(select(Judgment).where(Judgment.conversation_id == ids["short"])).all()
        outcome = rubric_outcomes(s, [ids["short"]])[ids["short"]]
    assert {r.verdict for r in rows} == {"ERROR"}
    assert all(r.attempts == 2 and r.raw_output == garbage_responder({}) for r in rows)
    assert all("no JSON" in r.reasoning for r in rows)
    assert not outcome.passed and outcome.errored_criteria  # unverified never passes
    with FakeOpenAIServer(responder=tagging_responder, model_ids=MODELS) as srv:
        cfg = config(srv, batch, judges=["judge"])
        assert [s["count"] for s in plan_tagging(cfg)] == [3]  # ERROR rows are judged again
        judge_shard({"ids": [ids["short"]]}, cfg)
        assert [s["count"] for s in plan_tagging(cfg)] == [2]
    with session_scope(engine) as s:
        verdicts = set(s.scalars(select(Judgment.verdict).where(
            Judgment.conversation_id == ids["short"])))
    assert "ERROR" not in verdicts


def test_combined_mode_uses_one_request_per_judge_and_agrees_with_per_criterion(engine, server):
    batch, ids = seed(engine)
    cfg = config(server, batch, judges=["judge"], judge_mode="combined")
    judge_shard({"ids": list(ids.values())}, cfg)
    assert server.stats()["total"] == 3
    with session_scope(engine) as s:
        combined = {cid: o.failed_criteria for cid, o in
                    rubric_outcomes(s, list(ids.values())).items()}
    assert combined[ids["unsafe"]] == ["SF1"] and combined[ids["short"]] == []


def test_stats_report_pass_rate_and_agreement(engine, server, tmp_path):
    batch, ids = seed(engine)
    cfg = config(server, batch)
    judge_shard({"ids": list(ids.values())}, cfg)
    stats = tagging_stats(cfg, tmp_path)
    assert stats["judge"]["judged"] == 3 and stats["judge"]["passed"] == 1
    assert stats["judge"]["safety_failed"] == 1
    assert stats["judge"]["failed_criteria"] == {"CM1": 1, "HP2": 1, "SF1": 1}
    assert stats["judge"]["agreement"]["disagreement_rate"] == pytest.approx(2 / 33, abs=1e-3)


def test_judge_sample_rate_is_a_stable_share_of_conversation_ids():
    from tasks.tag.stage import in_judge_sample

    ids = [f"conv-{i}" for i in range(10_000)]
    picked = [cid for cid in ids if in_judge_sample(cid, 0.2)]
    assert abs(len(picked) / len(ids) - 0.2) < 0.015
    assert picked == [cid for cid in ids if in_judge_sample(cid, 0.2)]  # same on every call
    assert set(picked) <= {cid for cid in ids if in_judge_sample(cid, 0.5)}  # nested samples
    assert all(in_judge_sample(cid, 1.0) for cid in ids[:100])


def test_judge_sample_judges_only_the_sample_and_a_full_rerun_judges_the_rest(engine, server):
    from tasks.tag.stage import in_judge_sample

    batch = f"judgesample-{uuid.uuid4().hex[:10]}"
    messages = list(CONVERSATIONS.values())
    ids = [f"{batch}-{i:02d}" for i in range(40)]
    with session_scope(engine) as s:
        upsert(s, GenerationBatch, [{"id": batch, "seed": 0, "requested": len(ids)}])
        upsert(s, Conversation, [{"id": cid, "batch_id": batch, "item_index": i,
                                  "messages": messages[i % len(messages)]}
                                 for i, cid in enumerate(ids)])

    def judged() -> set[str]:
        with session_scope(engine) as s:
            return set(s.scalars(select(Judgment.conversation_id).where(
                Judgment.conversation_id.in_(ids)).distinct()))

    sample = {cid for cid in ids if in_judge_sample(cid, 0.25)}
    assert 0 < len(sample) < len(ids)
    cfg = config(server, batch, judges=["judge"], judge_mode="combined", judge_sample_rate=0.25)
    judge_shard({"ids": ids}, cfg)
    assert judged() == sample
    assert server.stats()["total"] == len(sample)
    judge_shard({"ids": ids}, cfg)  # rerun: the sample is complete, nothing is sent
    assert server.stats()["total"] == len(sample)
    judge_shard({"ids": ids}, cfg.model_copy(update={"judge_sample_rate": 1.0}))
    assert judged() == set(ids)
    assert server.stats()["total"] == len(ids)
    with pytest.raises(ValueError, match="judge_sample_rate"):
        config(server, batch, judge_sample_rate=0)
