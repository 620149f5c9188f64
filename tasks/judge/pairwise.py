"""The pairwise judge: which of two replies to the same conversation is better, asked in both orders.

One code path for every stage that compares two replies (evaluation: tuned vs base; shadow:
champion vs challenger):

- `PairwiseVerdict`: the judge's answer, {"winner": "A" | "B" | "tie", "reason": ...}, with lenient
  spellings ("b", "Tie.", "draw") normalised and anything else a validation error;
- `pairwise_messages`: the chat messages for one ordered pair, rendered from a pairwise template
  (default include/prompts/judge/pairwise.jinja2; a caller may pass its own);
- `judge_order` / `judge_both_orders`: one ordered judgment, and both orders concurrently, through
  an OpenAI-compatible client's `structured` call (`tasks.core.llm.LLMClient`);
- `combine_orders`: the both-orders rule. With x in position A of the first order and y in
  position A of the second, the pair goes to x (or y) only when both orders name it; any
  disagreement or "tie" is a tie, which cancels position bias.

The failed-order rule: an order without a usable verdict has winner None, and a pair with a
failed order has outcome None — undecided, excluded from every rate and counted as a failure by
the caller. It is never a fourth outcome string.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, field_validator

from tasks.core.paths import PROMPTS_DIR

PAIRWISE_TEMPLATE = PROMPTS_DIR / "judge" / "pairwise.jinja2"
EMPTY_REPLY = "(empty reply)"
RAW_LIMIT = 2000  # characters of a failed reply kept for the audit trail

Winner = Literal["A", "B", "tie"]
PromptBuilder = Callable[[str, str], list[dict[str, str]]]
"""(reply in position A, reply in position B) → the judge's chat messages for that order."""

_WINNER_SPELLINGS = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "neither": "tie"}


class PairwiseVerdict(BaseModel):
    """The pairwise judge's answer to one ordered pair."""

    model_config = ConfigDict(extra="ignore")

    winner: Winner
    reason: str = ""

    @field_validator("winner", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip(".").strip('"')
            return _WINNER_SPELLINGS.get(text.lower(), text)
        return value

    @field_validator("reason", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return "" if value is None else str(value)


def parse_pairwise_winner(text: str) -> Winner:
    """A raw judge reply → "A" | "B" | "tie"; StructuredOutputError (with `raw`) when unusable."""
    from tasks.core.llm.structured import parse_structured

    return parse_structured(text, PairwiseVerdict).winner


# ---- messages ----------------------------------------------------------------------------------

def pairwise_criteria(rubric: Any) -> list[dict[str, Any]]:
    """The rubric's criteria as the pairwise template lists them (id, name, question, gate)."""
    return [{"id": cid, "name": rubric.criteria[cid].name,
             "question": rubric.criteria[cid].question,
             "safety_gate": cid in rubric.safety_gates}
            for cid in rubric.criterion_ids()]


@lru_cache(maxsize=8)
def _template(path: Path) -> Any:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    return env.from_string(path.read_text(encoding="utf-8"))


def pairwise_messages(
    criteria: Sequence[Mapping[str, Any]],
    messages: Sequence[Mapping[str, Any]],
    response_a: str,
    response_b: str,
    *,
    system_prompt: str = "",
    expect: str = "",
    template: Path = PAIRWISE_TEMPLATE,
) -> list[dict[str, str]]:
    """The judge's messages for one ordered pair: one user turn rendering `template`.

    `messages` is the conversation so far without its system prompt (pass that as
    `system_prompt`); an empty reply is shown as "(empty reply)".
    """
    prompt = _template(Path(template)).render(
        criteria=list(criteria), expect=expect or "", system_prompt=system_prompt or "",
        messages=list(messages),
        response_a=response_a or EMPTY_REPLY, response_b=response_b or EMPTY_REPLY,
    )
    return [{"role": "user", "content": prompt}]


# ---- judging -----------------------------------------------------------------------------------

class StructuredClient(Protocol):
    """What the runner needs from a client: `tasks.core.llm.LLMClient.structured`."""

    def structured(self, messages: list[dict[str, Any]], schema: type[BaseModel], *,
                   corrective_retries: int = 1, **params: Any) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class OrderVerdict:
    """One ordered judgment: the winner, or (winner None) why there is none."""

    winner: Winner | None
    failure: str | None = None
    raw: str | None = None

    @property
    def ok(self) -> bool:
        return self.winner is not None

    def as_dict(self) -> dict[str, Any]:
        """{"ok": True, "winner"} or {"ok": False, "failure", "raw"} (raw cut to 2000 chars)."""
        if self.winner is not None:
            return {"ok": True, "winner": self.winner}
        return {"ok": False, "failure": self.failure or "no verdict",
                "raw": (self.raw or "")[:RAW_LIMIT]}


@dataclass(frozen=True, slots=True)
class PairJudgment:
    """Both orders of one pair. `first` had x in position A, `second` had y in position A."""

    labels: tuple[str, str]
    first: OrderVerdict
    second: OrderVerdict

    @property
    def outcome(self) -> str | None:
        """x's label, y's label, "tie", or None when an order failed (see `combine_orders`)."""
        return combine_orders(self.first.winner, self.second.winner, self.labels)


def combine_orders(first: Winner | None, second: Winner | None,
                   labels: tuple[str, str]) -> str | None:
    """The both-orders rule for a pair (x, y) = `labels`.

    `first` is the verdict with x as A and y as B, `second` the verdict with y as A and x as B.
    The same underlying winner in both orders → its label; any disagreement or a "tie" → "tie";
    a failed order (None) → None: the pair is undecided and the caller counts it as a failure.
    """
    if first is None or second is None:
        return None
    x, y = labels
    if first not in ("A", "B", "tie") or second not in ("A", "B", "tie"):
        raise ValueError(f"pairwise winners must be 'A', 'B' or 'tie', got {first!r} and "
                         f"{second!r}")
    first_pick = {"A": x, "B": y}.get(first, "tie")
    second_pick = {"A": y, "B": x}.get(second, "tie")
    return first_pick if first_pick == second_pick else "tie"


async def judge_order(client: StructuredClient, messages: list[dict[str, str]], *,
                      max_tokens: int = 256, corrective_retries: int = 1) -> OrderVerdict:
    """One ordered judgment at temperature 0; a reply that stays unusable is a failed order."""
    result = await client.structured(messages, PairwiseVerdict,
                                     corrective_retries=corrective_retries,
                                     max_tokens=max_tokens, temperature=0.0)
    if result.ok and result.value is not None:
        return OrderVerdict(result.value.winner)
    return OrderVerdict(None, failure=f"unusable pairwise verdict: {result.error}",
                        raw=result.raw)


async def judge_both_orders(client: StructuredClient, build: PromptBuilder, x: str, y: str, *,
                            labels: tuple[str, str], max_tokens: int = 256,
                            corrective_retries: int = 1) -> PairJudgment:
    """Judge reply x against reply y twice, concurrently: (A=x, B=y) then (A=y, B=x)."""
    first, second = await asyncio.gather(
        judge_order(client, build(x, y), max_tokens=max_tokens,
                    corrective_retries=corrective_retries),
        judge_order(client, build(y, x), max_tokens=max_tokens,
                    corrective_retries=corrective_retries),
    )
    return PairJudgment(labels, first, second)
