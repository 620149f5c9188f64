"""The shared pairwise judge: verdict schema, messages per order, both orders through a client,
the combining rule and the failed-order rule."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tasks.core.llm import StructuredOutputError, StructuredResult, parse_structured
from tasks.judge.pairwise import (
    PAIRWISE_TEMPLATE,
    OrderVerdict,
    PairJudgment,
    PairwiseVerdict,
    combine_orders,
    judge_both_orders,
    judge_order,
    pairwise_messages,
    parse_pairwise_winner,
)

LABELS = ("x", "y")
CRITERIA = [{"id": "HP1", "name": "Helps", "question": "Does it help?", "safety_gate": False}]


class FakeClient:
    """Records every request; answers from `replies` keyed by the reply shown in position A."""

    def __init__(self, replies: dict[str, str | None]) -> None:
        self.replies = replies
        self.calls: list[dict[str, Any]] = []

    async def structured(self, messages: list[dict[str, Any]], schema: type[BaseModel], *,
                         corrective_retries: int = 1, **params: Any) -> StructuredResult:
        self.calls.append({"messages": messages, "schema": schema,
                           "corrective_retries": corrective_retries, **params})
        text = self.replies[_reply(messages, "A")]
        if text is None:
            return StructuredResult(ok=False, value=None, raw=None, error="HTTP 500",
                                    attempts=1, usage={})
        try:
            value = parse_structured(text, schema)
        except StructuredOutputError as exc:
            return StructuredResult(ok=False, value=None, raw=text, error=exc.reason,
                                    attempts=1, usage={})
        return StructuredResult(ok=True, value=value, raw=text, error=None, attempts=1,
                                usage={})


def _reply(messages: list[dict[str, Any]], label: str) -> str:
    prompt = messages[-1]["content"]
    following = "\n\n## Reply B" if label == "A" else "\n\n## Your answer"
    return prompt.split(f"## Reply {label}\n", 1)[1].split(following, 1)[0]


def _build(a: str, b: str) -> list[dict[str, str]]:
    return pairwise_messages(CRITERIA, [{"role": "user", "content": "hi"}], a, b)


def _winner(name: str) -> str:
    return json.dumps({"winner": name, "reason": "because"})


def _both(client: FakeClient, x: str = "reply x", y: str = "reply y") -> PairJudgment:
    return asyncio.run(judge_both_orders(client, _build, x, y, labels=LABELS, max_tokens=99))


# ---- schema ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "winner"), [
    ("A", "A"), ("b", "B"), (" Tie. ", "tie"), ('"a"', "A"), ("draw", "tie"), ("Neither", "tie"),
])
def test_verdict_normalises_lenient_spellings(raw, winner):
    assert PairwiseVerdict.model_validate({"winner": raw}).winner == winner


@pytest.mark.parametrize("data", [
    {"winner": "both"}, {"winner": "C"}, {"winner": 1}, {"winner": None}, {"reason": "no winner"},
])
def test_verdict_rejects_anything_but_a_b_or_tie(data):
    with pytest.raises(ValidationError, match="winner"):
        PairwiseVerdict.model_validate(data)


def test_verdict_reason_defaults_and_extra_fields_are_ignored():
    verdict = PairwiseVerdict.model_validate({"winner": "A", "reason": None, "score": 3})
    assert verdict.reason == "" and not hasattr(verdict, "score")
    assert PairwiseVerdict.model_validate({"winner": "B"}).reason == ""


def test_raw_replies_are_parsed_or_raise_with_the_reply_kept():
    assert parse_pairwise_winner('{"winner": "b", "reason": "x"}') == "B"
    assert parse_pairwise_winner('Sure.\n```json\n{"winner": "Tie."}\n```') == "tie"
    with pytest.raises(StructuredOutputError, match="no JSON") as prose:
        parse_pairwise_winner("I think A is better.")
    assert prose.value.raw == "I think A is better."
    with pytest.raises(StructuredOutputError, match="winner") as invalid:
        parse_pairwise_winner('{"winner": "both"}')
    assert invalid.value.errors[0]["loc"] == ["winner"]


# ---- messages ----------------------------------------------------------------------------------

def test_messages_put_each_reply_in_its_position_and_mark_empty_ones():
    messages = pairwise_messages(CRITERIA, [{"role": "user", "content": "hello"}], "first", "",
                                 system_prompt="Be kind.", expect="Says hello.")
    assert [m["role"] for m in messages] == ["user"]
    prompt = messages[0]["content"]
    assert (_reply(messages, "A"), _reply(messages, "B")) == ("first", "(empty reply)")
    assert "[system] Be kind.\n[user] hello\n" in prompt
    assert "## What a good reply does here\nSays hello.\n" in prompt
    assert "- HP1 (Helps): Does it help?\n" in prompt and "[safety gate" not in prompt
    bare = pairwise_messages(CRITERIA, [{"role": "user", "content": "hello"}], "a", "b")
    assert "[system]" not in bare[0]["content"]
    assert "What a good reply does here" not in bare[0]["content"]


def test_a_caller_may_pass_its_own_template(tmp_path):
    template = tmp_path / "mine.jinja2"
    template.write_text("{{ criteria | length }}|{{ response_a }}|{{ response_b }}")
    messages = pairwise_messages(CRITERIA, [], "one", "two", template=template)
    assert messages == [{"role": "user", "content": "1|one|two"}]
    assert PAIRWISE_TEMPLATE.is_file()


# ---- combining ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("first", "second", "outcome"), [
    ("A", "B", "x"),      # x preferred in both positions
    ("B", "A", "y"),      # y preferred in both positions
    ("A", "A", "tie"),    # always position A: position bias → tie
    ("B", "B", "tie"),    # always position B → tie
    ("A", "tie", "tie"),  # one order undecided → tie
    ("tie", "B", "tie"),
    ("tie", "tie", "tie"),
    (None, "B", None),    # a failed order leaves the pair undecided
    ("A", None, None),
    (None, None, None),
])
def test_combine_orders(first, second, outcome):
    assert combine_orders(first, second, LABELS) == outcome


def test_combine_orders_rejects_an_unknown_winner():
    with pytest.raises(ValueError, match="'A', 'B' or 'tie'"):
        combine_orders("C", "A", LABELS)  # type: ignore[arg-type]


def test_order_verdict_records():
    assert OrderVerdict("A").as_dict() == {"ok": True, "winner": "A"}
    failed = OrderVerdict(None, failure="bad", raw="z" * 5000)
    assert failed.ok is False
    assert failed.as_dict() == {"ok": False, "failure": "bad", "raw": "z" * 2000}


# ---- both orders through a client --------------------------------------------------------------

def test_both_orders_are_asked_with_the_positions_swapped():
    client = FakeClient({"reply x": _winner("A"), "reply y": _winner("B")})
    judgment = _both(client)
    positions = sorted((_reply(c["messages"], "A"), _reply(c["messages"], "B"))
                       for c in client.calls)
    assert positions == [("reply x", "reply y"), ("reply y", "reply x")]
    assert {(c["schema"], c["max_tokens"], c["temperature"], c["corrective_retries"])
            for c in client.calls} == {(PairwiseVerdict, 99, 0.0, 1)}
    assert judgment.labels == LABELS
    assert (judgment.first.winner, judgment.second.winner) == ("A", "B")


def test_agreement_in_both_orders_names_the_winner():
    assert _both(FakeClient({"reply x": _winner("A"), "reply y": _winner("B")})).outcome == "x"
    assert _both(FakeClient({"reply x": _winner("B"), "reply y": _winner("A")})).outcome == "y"


def test_disagreement_between_the_orders_is_a_tie():
    position_bias = FakeClient({"reply x": _winner("A"), "reply y": _winner("A")})
    assert _both(position_bias).outcome == "tie"
    one_tie = FakeClient({"reply x": _winner("A"), "reply y": _winner("tie")})
    assert _both(one_tie).outcome == "tie"


def test_a_failed_order_leaves_the_pair_undecided_with_its_reason():
    judgment = _both(FakeClient({"reply x": _winner("A"), "reply y": "I prefer the first one"}))
    assert judgment.first.as_dict() == {"ok": True, "winner": "A"}
    assert judgment.second.winner is None and judgment.outcome is None
    record = judgment.second.as_dict()
    assert record["ok"] is False and record["raw"] == "I prefer the first one"
    assert record["failure"].startswith("unusable pairwise verdict: ")
    transport = _both(FakeClient({"reply x": None, "reply y": _winner("B")}))
    assert transport.outcome is None
    assert transport.first.as_dict() == {"ok": False,
                                         "failure": "unusable pairwise verdict: HTTP 500",
                                         "raw": ""}


def test_judge_order_passes_its_request_options():
    client = FakeClient({"a": _winner("tie")})
    verdict = asyncio.run(judge_order(client, _build("a", "b"), max_tokens=7,
                                      corrective_retries=0))
    assert verdict == OrderVerdict("tie")
    assert (client.calls[0]["max_tokens"], client.calls[0]["corrective_retries"]) == (7, 0)


def test_both_orders_over_http_with_the_real_client():
    from tasks.core.llm import LLMClient
    from tasks.core.settings import Endpoint
    from tests.fakes.fake_openai import FakeOpenAIServer

    def prefers_x(request: dict) -> str:
        return _winner("A" if _reply(request["messages"], "A") == "reply x" else "B")

    with FakeOpenAIServer(responder=prefers_x) as server:
        client = LLMClient([Endpoint(base_url=server.base_url, model="fake-model")],
                           max_retries=0)
        judgment = _both(client)  # type: ignore[arg-type]
        requests = server.requests
    assert judgment.outcome == "x" and len(requests) == 2
    assert {r["max_tokens"] for r in requests} == {99}
