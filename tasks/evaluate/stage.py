"""Evaluation of a trained adapter against its base model, and the HTML model card.

Three measurements, all base vs base+adapter on the same model load (PEFT's `disable_adapter`):

1. Held-out perplexity on the validation JSONL, over assistant tokens only (the tokens the
   trainer learns), so a system prompt or long user turns do not dilute the number.
2. Rubric pass rate on a fixed scenario set (include/eval/scenarios.yaml, seed 001's 10-20
   scenarios covering the taxonomy): both models answer each scenario greedily; a judge grades
   each reply against the rubric (tasks.judge.stage: `load_rubric` + `score_verdicts`). The base pass
   rate is also seed 001's go/no-go gate (>70% / 50-70% / <50%).
3. Pairwise preference: the judge compares the two replies to each scenario twice, once in each
   order. Same winner both times → that model wins; any disagreement (incl. one "tie") → tie,
   which cancels position bias. Outcomes give a win rate and ELO ratings (seed 002: start 1000,
   K-factor 32, scenarios in file order).

The judge is an LLM role (default "judge") through the shared client (`tasks.core.llm`): rubric
grading reuses the curation judge (`tasks.judge.stage.judge_conversation`, all criteria with their
calibration examples in one request), pairwise comparison renders
include/prompts/judge/pairwise.jinja2. A judge call that fails (transport error, no parseable
JSON, missing criteria after retries) is recorded with its reason and excluded from the rates;
counts of failures are reported, never raised — a 135M judge fails often. Results are logged to
the training's MLflow run and written as a self-contained HTML model card (plots embedded as PNG
data URIs) next to a JSON with every reply and verdict.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.ids import content_hash
from tasks.core.paths import INCLUDE_DIR, PROMPTS_DIR

log = logging.getLogger(__name__)

EVAL_DIR = INCLUDE_DIR / "eval"
DEFAULT_SCENARIOS_PATH = EVAL_DIR / "scenarios.yaml"
MODEL_CARD_TEMPLATE = EVAL_DIR / "model_card.html.jinja2"
PAIRWISE_TEMPLATE = PROMPTS_DIR / "judge" / "pairwise.jinja2"

ELO_START = 1000.0
ELO_K_FACTOR = 32.0
Winner = Literal["A", "B", "tie"]
PairOutcome = Literal["tuned", "base", "tie"]


class EvaluationError(RuntimeError):
    """Evaluation cannot start (bad scenario file, empty validation set, missing adapter)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class JudgeFailure(RuntimeError):
    """One judge call gave no usable answer; `raw` keeps the reply for the audit trail."""

    def __init__(self, reason: str, *, raw: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


# ---- scenarios ---------------------------------------------------------------------------------

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class EvalScenario(BaseModel):
    """One fixed scenario: a conversation ending with a user turn, plus its taxonomy cell."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    topic: str
    verbosity: str
    tone: str
    difficulty: Literal["easy", "medium", "hard"]
    edge_case: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    expect: str = ""

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("a scenario's last message must be a user turn (the reply to judge "
                             "comes next); remove trailing assistant turns")
        return messages


class ScenarioSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    system_prompt: str = ""
    scenarios: list[EvalScenario]

    @model_validator(mode="after")
    def _shape(self) -> ScenarioSet:
        count = len(self.scenarios)
        if not 10 <= count <= 20:
            raise ValueError(f"the scenario set has {count} scenarios; seed 001 asks for 10-20 "
                             "covering the taxonomy — add or remove scenarios")
        ids = [s.id for s in self.scenarios]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"scenario ids must be unique; rename {duplicates}")
        return self

    @property
    def digest(self) -> str:
        return content_hash(self.model_dump(mode="json"))[:16]

    def messages_for(self, scenario: EvalScenario) -> list[dict[str, str]]:
        """The chat the model answers: the set's system prompt, then the scenario's turns."""
        head = ([{"role": "system", "content": self.system_prompt}]
                if self.system_prompt and scenario.messages[0].role != "system" else [])
        return head + [m.model_dump() for m in scenario.messages]


def subset_scenarios(scenarios: ScenarioSet, limit: int | None) -> ScenarioSet:
    """At most `limit` scenarios, evenly spread over the set (first and spread-out ones)."""
    total = len(scenarios.scenarios)
    if limit is None or limit >= total:
        return scenarios
    if limit < 1:
        raise EvaluationError(f"max_scenarios must be >= 1, got {limit}; e.g. 6, or leave it "
                              "unset for the whole set")
    picked = [scenarios.scenarios[(i * total) // limit] for i in range(limit)]
    return scenarios.model_copy(update={"scenarios": picked})


def load_scenarios(path: Path | str | None = None) -> ScenarioSet:
    path = Path(path) if path is not None else DEFAULT_SCENARIOS_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"scenario file {path} not found; the default set is "
                              f"{DEFAULT_SCENARIOS_PATH}", path=str(path)) from None
    try:
        return ScenarioSet.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors())
        raise EvaluationError(f"invalid scenario file {path}: {problems}", path=str(path)) \
            from None


# ---- validation data and assistant-token masks -------------------------------------------------

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _normalise_messages(raw: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    out = []
    for message in raw:
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            continue
        out.append({"role": _ROLE_ALIASES.get(str(role), str(role)), "content": str(content)})
    return out


def read_conversations(path: Path | str, *, limit: int | None = None) -> list[list[dict]]:
    """Conversations from a JSONL of {"messages": [...]} (or "conversations", ShareGPT keys)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"validation file {path} does not exist; pass the val split the "
                              "export wrote (e.g. <snapshot>/val.jsonl)", path=str(path))
    conversations: list[list[dict]] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            messages = _normalise_messages(row.get("messages") or row.get("conversations") or [])
            if any(m["role"] == "assistant" for m in messages):
                conversations.append(messages)
            if limit is not None and len(conversations) >= limit:
                break
    if not conversations:
        raise EvaluationError(f"{path} holds no conversation with an assistant turn; "
                              "perplexity needs assistant tokens", path=str(path))
    return conversations


def assistant_spans(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int,
                                                                                       int]]]:
    """The rendered chat text and the character spans of each assistant turn (incl. its end tag).

    A span is the difference between the text through the turn and the text up to its generation
    prompt — exactly what the model is asked to produce.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(list(messages[:index]), tokenize=False,
                                               add_generation_prompt=True)
        through = tokenizer.apply_chat_template(list(messages[:index + 1]), tokenize=False)
        if text.startswith(through) and through.startswith(prompt):
            spans.append((len(prompt), len(through)))
            cursor = len(through)
            continue
        start = text.find(message["content"], cursor)  # templates that are not prefix-stable
        if start >= 0:
            spans.append((start, start + len(message["content"])))
            cursor = start + len(message["content"])
    return text, spans


def assistant_labels(tokenizer, messages: Sequence[Mapping[str, str]], *, max_length: int = 2048
                     ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 everywhere except on assistant tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False,
                        truncation=True, max_length=max_length)
    ids = list(encoded["input_ids"])
    labels = []
    for token_id, (start, end) in zip(ids, encoded["offset_mapping"], strict=True):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(token_id if inside else -100)
    return ids, labels


def sequence_nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count."""
    import torch

    ids = torch.tensor([input_ids])
    target = torch.tensor([labels])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1, :].float()
    shifted = target[:, 1:]
    mask = shifted != -100
    if not bool(mask.any()):
        return 0.0, 0
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.clamp(min=0).reshape(-1), reduction="none"
    ).reshape(shifted.shape)
    return float(losses[mask].sum()), int(mask.sum())


def perplexity(model, tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]], *,
               max_length: int = 2048) -> dict[str, float]:
    """exp(mean NLL) over all assistant tokens of all conversations."""
    total_nll = 0.0
    total_tokens = 0
    for messages in conversations:
        ids, labels = assistant_labels(tokenizer, messages, max_length=max_length)
        nll, count = sequence_nll(model, ids, labels)
        total_nll += nll
        total_tokens += count
    if total_tokens == 0:
        raise EvaluationError("no assistant tokens survived truncation; raise max_length")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(min(mean, 50.0)), "mean_nll": mean, "tokens": total_tokens,
            "rows": len(conversations)}


# ---- generation --------------------------------------------------------------------------------

def generate_replies(model, tokenizer, chats: Sequence[Sequence[Mapping[str, str]]], *,
                     max_new_tokens: int = 128, batch_size: int = 8,
                     stop_strings: Sequence[str] = ("<|im_end|>", "<|im_start|>")) -> list[str]:
    """Greedy replies for each chat (left-padded batches), cut at the first stop string."""
    import torch

    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for stop in stop_strings:
        stop_ids = tokenizer.encode(stop, add_special_tokens=False)
        if len(stop_ids) == 1:
            eos_ids.add(stop_ids[0])
    replies: list[str] = []
    try:
        for start in range(0, len(chats), batch_size):
            prompts = [tokenizer.apply_chat_template(list(chat), tokenize=False,
                                                     add_generation_prompt=True)
                       for chat in chats[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True,
                              add_special_tokens=False)
            with torch.no_grad():
                output = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids) or None,
                )
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            for row in new_tokens:
                text = tokenizer.decode(row, skip_special_tokens=False)
                for stop in (*stop_strings, tokenizer.eos_token or ""):
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                if tokenizer.pad_token:
                    text = text.replace(tokenizer.pad_token, "")
                replies.append(text.strip())
    finally:
        tokenizer.padding_side = previous_side
    return replies


# ---- judging -----------------------------------------------------------------------------------

class PairwiseVerdict(BaseModel):
    """The pairwise judge's answer (include/prompts/judge/pairwise.jinja2)."""

    model_config = ConfigDict(extra="ignore")

    winner: Literal["A", "B", "tie"]
    reason: str = ""

    @field_validator("winner", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip(".").strip('"')
            return {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "neither": "tie"}.get(
                text.lower(), text)
        return value

    @field_validator("reason", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return "" if value is None else str(value)


class EvalJudge(Protocol):
    """What the evaluation needs from a judge. Raise JudgeFailure when there is no answer."""

    label: str

    async def grade(self, rubric, messages: list[dict[str, str]],
                    system_prompt: str) -> dict[str, str]: ...

    async def compare(self, prompt: str) -> Winner: ...


def _template(path: Path):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    return env.from_string(path.read_text(encoding="utf-8"))


def render_pairwise_prompt(rubric, scenarios: ScenarioSet, scenario: EvalScenario,
                           response_a: str, response_b: str) -> str:
    criteria = [{"id": cid, "name": rubric.criteria[cid].name,
                 "question": rubric.criteria[cid].question,
                 "safety_gate": cid in rubric.safety_gates}
                for cid in rubric.criterion_ids()]
    return _template(PAIRWISE_TEMPLATE).render(
        criteria=criteria, expect=scenario.expect, system_prompt=scenarios.system_prompt,
        messages=[m.model_dump() for m in scenario.messages],
        response_a=response_a or "(empty reply)", response_b=response_b or "(empty reply)",
    )


def parse_pairwise_winner(text: str) -> Winner:
    """A pairwise judge reply → "A" | "B" | "tie"; JudgeFailure when unusable."""
    from tasks.core.llm.structured import StructuredOutputError, parse_structured

    try:
        return parse_structured(text, PairwiseVerdict).winner  # type: ignore[attr-defined]
    except StructuredOutputError as exc:
        raise JudgeFailure(f"unusable pairwise verdict: {exc.reason}", raw=text) from None


class LlmEvalJudge:
    """The judge role through the shared LLM client.

    Rubric grading reuses the curation judge (`tasks.judge.stage.judge_conversation`, combined mode:
    one request with every criterion and its calibration examples); a criterion left as ERROR
    after its retries makes the whole grade a JudgeFailure. Pairwise comparison sends
    pairwise.jinja2 through `LLMClient.structured` (one corrective follow-up).
    """

    def __init__(self, client, label: str, *, retries: int = 2, max_tokens: int = 1024) -> None:
        self.client = client
        self.label = label
        self.retries = retries
        self.max_tokens = max_tokens

    @classmethod
    def for_role(cls, role: str = "judge", *, use_cache: bool = True,
                 retries: int = 2, max_tokens: int = 1024) -> LlmEvalJudge:
        from tasks.core.llm.client import client_for_role
        from tasks.core.settings import get_settings

        client = client_for_role(role, use_cache=use_cache)  # type: ignore[arg-type]
        return cls(client, get_settings().endpoint(role).label(),  # type: ignore[arg-type]
                   retries=retries, max_tokens=max_tokens)

    async def grade(self, rubric, messages: list[dict[str, str]],
                    system_prompt: str) -> dict[str, str]:
        from tasks.judge.stage import JudgeTarget, judge_conversation

        rows, _ = await judge_conversation(
            JudgeTarget("judge", self.client, self.label), rubric, "evaluation", messages,
            rubric.criterion_ids(), mode="combined", retries=self.retries,
            max_tokens=self.max_tokens, system_prompt=system_prompt,
        )
        errored = [row for row in rows if row["verdict"] == "ERROR"]
        if errored:
            raise JudgeFailure(f"rubric verdict unusable: {errored[0]['reasoning']}",
                               raw=errored[0].get("raw_output"))
        return {row["criterion"]: row["verdict"] for row in rows}

    async def compare(self, prompt: str) -> Winner:
        result = await self.client.structured(
            [{"role": "user", "content": prompt}], PairwiseVerdict, corrective_retries=1,
            max_tokens=256, temperature=0.0,
        )
        if not result.ok:
            raise JudgeFailure(f"unusable pairwise verdict: {result.error}", raw=result.raw)
        return result.value.winner  # type: ignore[union-attr]

# ---- pure scoring: both-orders rule, win rate, ELO, base gate ----------------------------------

def combine_orders(tuned_first: Winner | None, base_first: Winner | None) -> PairOutcome | None:
    """One pair from two judgments: (A=tuned, B=base) and (A=base, B=tuned).

    Same underlying winner both times → that model; any disagreement → "tie"; a failed
    judgment (None) → None (the pair is excluded and counted as a failure).
    """
    if tuned_first is None or base_first is None:
        return None
    first = {"A": "tuned", "B": "base", "tie": "tie"}[tuned_first]
    second = {"A": "base", "B": "tuned", "tie": "tie"}[base_first]
    return first if first == second else "tie"  # type: ignore[return-value]


def win_rate(outcomes: Sequence[PairOutcome | None]) -> dict[str, Any]:
    """Counts and rates over decided pairs; win_rate counts a tie as half a win."""
    valid = [o for o in outcomes if o is not None]
    wins, losses, ties = valid.count("tuned"), valid.count("base"), valid.count("tie")
    n = len(valid)
    return {
        "pairs": len(outcomes), "decided": n, "failures": len(outcomes) - n,
        "wins": wins, "losses": losses, "ties": ties,
        "win_rate": (wins + 0.5 * ties) / n if n else None,
        "strict_win_rate": wins / n if n else None,
        "tie_rate": ties / n if n else None,
    }


def elo_expected(rating: float, opponent: float) -> float:
    return 1.0 / (1.0 + 10 ** ((opponent - rating) / 400.0))


def elo_ratings(outcomes: Sequence[PairOutcome | None], *, k_factor: float = ELO_K_FACTOR,
                start: float = ELO_START) -> dict[str, Any]:
    """Sequential ELO updates (tuned vs base) over decided pairs in order; both start at 1000."""
    tuned, base = start, start
    history = [(tuned, base)]
    for outcome in outcomes:
        if outcome is None:
            continue
        score = {"tuned": 1.0, "base": 0.0, "tie": 0.5}[outcome]
        expected = elo_expected(tuned, base)
        delta = k_factor * (score - expected)
        tuned, base = tuned + delta, base - delta
        history.append((tuned, base))
    return {"tuned": tuned, "base": base, "k_factor": k_factor, "start": start,
            "history": history}


def base_model_gate(pass_rate: float | None) -> dict[str, Any]:
    """Seed 001's decision gate on the base model's rubric pass rate."""
    if pass_rate is None:
        return {"band": "unknown", "pass_rate": None,
                "recommendation": "No rubric verdicts for the base model (every judge call "
                                  "failed); fix the judge endpoint and re-run the evaluation."}
    if pass_rate > 0.70:
        band, text = ">70%", ("Base model may be sufficient. Consider prompt engineering "
                              "first.")
    elif pass_rate >= 0.50:
        band, text = "50-70%", "Fine-tuning likely helpful. Moderate improvement expected."
    else:
        band, text = "<50%", "Fine-tuning needed. Significant improvement expected."
    return {"band": band, "pass_rate": pass_rate, "recommendation": text}


# ---- per-scenario judging ----------------------------------------------------------------------

@dataclass
class ScenarioResult:
    scenario_id: str
    topic: str
    difficulty: str
    edge_case: str | None
    base_reply: str
    tuned_reply: str
    rubric: dict[str, Any] = field(default_factory=dict)   # model → outcome dict or failure
    pairwise: dict[str, Any] = field(default_factory=dict)  # orders, outcome, failures


async def _grade(judge: EvalJudge, rubric, messages: list[dict[str, str]],
                 system_prompt: str) -> dict[str, Any]:
    from tasks.judge.stage import score_verdicts

    try:
        verdicts = await judge.grade(rubric, messages, system_prompt)
    except JudgeFailure as exc:
        return {"ok": False, "failure": exc.reason, "raw": (exc.raw or "")[:2000]}
    outcome = score_verdicts(rubric, {"judge": verdicts})
    return {"ok": True, "verdicts": verdicts, "score": outcome.score, "passed": outcome.passed,
            "safety_failed": outcome.safety_failed, "failed_criteria": outcome.failed_criteria}


async def _compare(judge: EvalJudge, prompt: str) -> dict[str, Any]:
    try:
        return {"ok": True, "winner": await judge.compare(prompt)}
    except JudgeFailure as exc:
        return {"ok": False, "failure": exc.reason, "raw": (exc.raw or "")[:2000]}


async def _judge_all(judge: EvalJudge, rubric, scenarios: ScenarioSet,
                     base_replies: Sequence[str], tuned_replies: Sequence[str]
                     ) -> list[ScenarioResult]:
    results = [
        ScenarioResult(s.id, s.topic, s.difficulty, s.edge_case, base, tuned)
        for s, base, tuned in zip(scenarios.scenarios, base_replies, tuned_replies, strict=True)
    ]
    jobs: list[tuple[ScenarioResult, str, str, Any]] = []
    for result, scenario in zip(results, scenarios.scenarios, strict=True):
        history = [m.model_dump() for m in scenario.messages]
        for model, reply in (("base", result.base_reply), ("tuned", result.tuned_reply)):
            transcript = [*history, {"role": "assistant", "content": reply or "(empty reply)"}]
            jobs.append((result, "rubric", model,
                         _grade(judge, rubric, transcript, scenarios.system_prompt)))
        orders = {"tuned_first": (result.tuned_reply, result.base_reply),
                  "base_first": (result.base_reply, result.tuned_reply)}
        for order, (first, second) in orders.items():
            prompt = render_pairwise_prompt(rubric, scenarios, scenario, first, second)
            jobs.append((result, "pairwise", order, _compare(judge, prompt)))
    answers = await asyncio.gather(*(job[3] for job in jobs))
    for (result, group, name, _), answer in zip(jobs, answers, strict=True):
        getattr(result, group)[name] = answer
    for result in results:
        first, second = result.pairwise["tuned_first"], result.pairwise["base_first"]
        result.pairwise["outcome"] = combine_orders(
            first["winner"] if first["ok"] else None, second["winner"] if second["ok"] else None)
    return results


def judge_scenarios(judge: EvalJudge, rubric, scenarios: ScenarioSet,
                    base_replies: Sequence[str], tuned_replies: Sequence[str]
                    ) -> list[ScenarioResult]:
    """Rubric-grade both replies and compare them in both orders, for every scenario."""
    from tasks.core.llm.client import run_sync

    return run_sync(_judge_all(judge, rubric, scenarios, base_replies, tuned_replies))

def summarise_rubric(results: Sequence[ScenarioResult], model: str, rubric) -> dict[str, Any]:
    graded = [r.rubric[model] for r in results if r.rubric.get(model, {}).get("ok")]
    failures = sum(1 for r in results if not r.rubric.get(model, {}).get("ok"))
    per_criterion: dict[str, float | None] = {}
    for cid in rubric.criterion_ids():
        assessed = [g["verdicts"][cid] for g in graded if g["verdicts"][cid] != "NA"]
        per_criterion[cid] = (assessed.count("YES") / len(assessed)) if assessed else None
    return {
        "judged": len(graded), "failures": failures,
        "passed": sum(1 for g in graded if g["passed"]),
        "pass_rate": (sum(1 for g in graded if g["passed"]) / len(graded)) if graded else None,
        "mean_score": (sum(g["score"] for g in graded) / len(graded)) if graded else None,
        "safety_failures": sum(1 for g in graded if g["safety_failed"]),
        "per_criterion": per_criterion,
    }


# ---- the stage entry point ---------------------------------------------------------------------

def _load_model(adapter_dir: Path, base_model: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.chat_template import CHATML_TEMPLATE
    from tasks.core.weights import resolve_dtype
    from tasks.register.registry import resolve_base_path

    base_path = resolve_base_path(base_model)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tokenizer.chat_template:
        template_file = adapter_dir / "chat_template.jinja"
        tokenizer.chat_template = (template_file.read_text() if template_file.is_file()
                                   else CHATML_TEMPLATE)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The serving dtype (bf16 where the CPU has it): the model card describes what is served.
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=resolve_dtype())
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def evaluate_adapter(
    adapter_dir: Path | str,
    base_model: str,
    *,
    val_path: Path | str,
    scenarios_path: Path | str | None = None,
    judge_role: str = "judge",
    judge: EvalJudge | None = None,
    judge_cache: bool = True,
    max_new_tokens: int = 128,
    max_val_rows: int = 200,
    max_length: int = 2048,
    k_factor: float = ELO_K_FACTOR,
    run_id: str | None = None,
    out_dir: Path | str | None = None,
    training: Mapping[str, Any] | None = None,
    rubric_path: Path | str | None = None,
    max_scenarios: int | None = None,
) -> dict[str, Any]:
    """Evaluate base vs base+adapter; log to `run_id` when given; write the model card.

    `max_scenarios` evaluates an evenly spread subset of the scenario set (for a quick look on
    a CPU, where each scenario costs two rubric gradings and two pairwise judgments); the
    summary's `scenario_set` records how many of how many were used.

    Returns a JSON-able summary: perplexity, rubric pass rates, pairwise win rate and ELO,
    judge failure counts, the base-model gate, and the card/details paths.
    """
    from tasks.core.settings import get_settings
    from tasks.judge.stage import load_rubric

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise EvaluationError(f"{adapter_dir} is not a PEFT adapter folder (no "
                              "adapter_config.json); pass TrainResult.adapter_dir",
                              path=str(adapter_dir))
    scenarios = load_scenarios(scenarios_path)
    available = len(scenarios.scenarios)
    scenarios = subset_scenarios(scenarios, max_scenarios)
    rubric = load_rubric(Path(rubric_path) if rubric_path else None)
    conversations = read_conversations(val_path, limit=max_val_rows)
    if judge is None:
        judge = LlmEvalJudge.for_role(judge_role, use_cache=judge_cache)

    model, tokenizer = _load_model(adapter_dir, base_model)
    with model.disable_adapter():
        base_ppl = perplexity(model, tokenizer, conversations, max_length=max_length)
    tuned_ppl = perplexity(model, tokenizer, conversations, max_length=max_length)
    chats = [scenarios.messages_for(s) for s in scenarios.scenarios]
    with model.disable_adapter():
        base_replies = generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens)
    tuned_replies = generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens)
    del model

    results = judge_scenarios(judge, rubric, scenarios, base_replies, tuned_replies)
    base_rubric = summarise_rubric(results, "base", rubric)
    tuned_rubric = summarise_rubric(results, "tuned", rubric)
    outcomes = [r.pairwise["outcome"] for r in results]
    pairwise = win_rate(outcomes)
    elo = elo_ratings(outcomes, k_factor=k_factor)
    pair_judgment_failures = sum(
        int(not r.pairwise[o]["ok"]) for r in results for o in ("tuned_first", "base_first"))
    judge_failures = base_rubric["failures"] + tuned_rubric["failures"] + pair_judgment_failures
    gate = base_model_gate(base_rubric["pass_rate"])

    summary: dict[str, Any] = {
        "adapter_dir": str(adapter_dir), "base_model": base_model,
        "scenario_set": {"path": str(scenarios_path or DEFAULT_SCENARIOS_PATH),
                         "digest": scenarios.digest, "count": len(scenarios.scenarios),
                         "available": available},
        "rubric_version": rubric.version, "judge": getattr(judge, "label", "custom"),
        "perplexity": {"base": base_ppl["perplexity"], "tuned": tuned_ppl["perplexity"],
                       "tokens": tuned_ppl["tokens"], "rows": tuned_ppl["rows"]},
        "rubric": {"base": base_rubric, "tuned": tuned_rubric},
        "pairwise": {**pairwise, "elo_tuned": elo["tuned"], "elo_base": elo["base"],
                     "k_factor": k_factor, "judgment_failures": pair_judgment_failures},
        "judge_failures": judge_failures,
        "gate": gate,
        "run_id": run_id,
    }
    metrics = eval_metrics(summary)
    summary["metrics"] = metrics

    out = Path(out_dir) if out_dir else (
        get_settings().data_dir / "eval" / (run_id or content_hash(str(adapter_dir))[:16]))
    out.mkdir(parents=True, exist_ok=True)
    details_path = out / "evaluation.json"
    details_path.write_text(json.dumps(
        {**summary, "elo_history": elo["history"],
         "scenarios": [asdict(r) for r in results]}, indent=2, default=str))
    if training is None and run_id:
        training = _training_from_run(run_id)
    card_path = write_model_card(summary, results, elo["history"], out, training=training)
    summary["card_path"] = str(card_path)
    summary["details_path"] = str(details_path)
    if run_id:
        from tasks.register.registry import log_run_artifact, log_run_metrics

        log_run_metrics(run_id, metrics)
        log_run_artifact(run_id, card_path, "evaluation")
        log_run_artifact(run_id, details_path, "evaluation")
    log.info("evaluated %s: ppl %.3f→%.3f, pass %s→%s, win rate %s, %d judge failures",
             adapter_dir, base_ppl["perplexity"], tuned_ppl["perplexity"],
             base_rubric["pass_rate"], tuned_rubric["pass_rate"], pairwise["win_rate"],
             judge_failures)
    return summary


def evaluate_version(version: str | int, *, val_path: Path | str, model_name: str | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """DAG-facing: evaluate a registered version (its adapter vs its base) and log to its run.

    Materialises the adapter, reads the base model from the version's tags, runs
    `evaluate_adapter` with `run_id` = the version's training run, and returns a small XCom-sized
    dict: {"model_name", "version", "run_id", "metrics", "gate", "judge_failures", "card_path"}.
    """
    from tasks.register.registry import get_version_info, materialize_adapter

    info = get_version_info(version, model_name=model_name)
    if info["is_base"]:
        raise EvaluationError(
            f"version {info['version']} of {info['model_name']} is the base model (no adapter); "
            "evaluate a trained version, e.g. the challenger")
    adapter = materialize_adapter(info["version"], model_name=info["model_name"])
    base_model = info["tags"].get("base_model")
    if not base_model or base_model == "unknown" or adapter is None:
        raise EvaluationError(
            f"version {info['version']} has no base_model tag; re-register it from a run logged "
            "by log_training_run")
    summary = evaluate_adapter(adapter, base_model, val_path=val_path, run_id=info["run_id"],
                               **kwargs)
    return {"model_name": info["model_name"], "version": info["version"],
            "run_id": info["run_id"], "metrics": summary["metrics"], "gate": summary["gate"],
            "judge_failures": summary["judge_failures"], "card_path": summary["card_path"]}


def eval_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The flat `eval.*` metric names logged to MLflow (and read by the registry view)."""
    rubric, pairwise = summary["rubric"], summary["pairwise"]
    candidates = {
        "eval.perplexity_base": summary["perplexity"]["base"],
        "eval.perplexity_tuned": summary["perplexity"]["tuned"],
        "eval.rubric_pass_rate_base": rubric["base"]["pass_rate"],
        "eval.rubric_pass_rate_tuned": rubric["tuned"]["pass_rate"],
        "eval.rubric_score_base": rubric["base"]["mean_score"],
        "eval.rubric_score_tuned": rubric["tuned"]["mean_score"],
        "eval.win_rate": pairwise["win_rate"],
        "eval.wins": pairwise["wins"], "eval.losses": pairwise["losses"],
        "eval.ties": pairwise["ties"],
        "eval.elo_tuned": pairwise["elo_tuned"], "eval.elo_base": pairwise["elo_base"],
        "eval.judge_failures": summary["judge_failures"],
    }
    return {k: float(v) for k, v in candidates.items() if v is not None}


def _training_from_run(run_id: str) -> dict[str, Any] | None:
    """Loss curve and summary metrics of the training run, for the card."""
    try:
        from tasks.register.registry import get_client

        client = get_client()
        run = client.get_run(run_id)
        curve = [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")]
        eval_curve = [(m.step, m.value) for m in client.get_metric_history(run_id, "eval_loss")]
    except Exception as exc:  # the card is still useful without the training section
        log.warning("could not read training run %s for the model card: %s", run_id, exc)
        return None
    return {"loss_curve": sorted(curve), "eval_curve": sorted(eval_curve),
            "params": dict(run.data.params), "tags": dict(run.data.tags)}


# ---- model card --------------------------------------------------------------------------------

def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def card_plots(summary: Mapping[str, Any], elo_history: Sequence[tuple[float, float]],
               training: Mapping[str, Any] | None = None) -> dict[str, str]:
    """PNG data URIs: perplexity, rubric pass rates, per-criterion rates, ELO, loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("#8c8c8c", "#2b7bb9")
    plots: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(4, 3))
    values = [summary["perplexity"]["base"], summary["perplexity"]["tuned"]]
    ax.bar(["base", "tuned"], values, color=colors)
    ax.set_title("Held-out perplexity (assistant tokens)")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    plots["perplexity"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4, 3))
    rates = [summary["rubric"][m]["pass_rate"] for m in ("base", "tuned")]
    ax.bar(["base", "tuned"], [r or 0.0 for r in rates], color=colors)
    ax.set_ylim(0, 1)
    ax.axhline(0.7, ls="--", c="#c0392b", lw=1)
    ax.axhline(0.5, ls=":", c="#c0392b", lw=1)
    ax.set_title("Rubric pass rate")
    for i, r in enumerate(rates):
        ax.text(i, r or 0.0, "n/a" if r is None else f"{r:.0%}", ha="center", va="bottom")
    plots["rubric"] = _png(fig)

    base_pc = summary["rubric"]["base"]["per_criterion"]
    tuned_pc = summary["rubric"]["tuned"]["per_criterion"]
    criteria = list(base_pc)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(criteria)), 3))
    xs = range(len(criteria))
    ax.bar([x - 0.2 for x in xs], [base_pc[c] or 0 for c in criteria], 0.4, label="base",
           color=colors[0])
    ax.bar([x + 0.2 for x in xs], [tuned_pc[c] or 0 for c in criteria], 0.4, label="tuned",
           color=colors[1])
    ax.set_xticks(list(xs), criteria)
    ax.set_ylim(0, 1.18)
    ax.legend(loc="upper center", ncol=2, frameon=False)
    ax.set_title("Pass rate per criterion (NA excluded)")
    plots["criteria"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([h[0] for h in elo_history], label="tuned", color=colors[1])
    ax.plot([h[1] for h in elo_history], label="base", color=colors[0])
    ax.set_xlabel("decided pair")
    ax.set_title(f"ELO (K={summary['pairwise']['k_factor']:g}, start {ELO_START:g})")
    ax.legend()
    plots["elo"] = _png(fig)

    if training and training.get("loss_curve"):
        fig, ax = plt.subplots(figsize=(4, 3))
        curve = training["loss_curve"]
        ax.plot([p[0] for p in curve], [p[1] for p in curve], label="train")
        if training.get("eval_curve"):
            ax.plot([p[0] for p in training["eval_curve"]],
                    [p[1] for p in training["eval_curve"]], "o-", label="eval")
        ax.set_xlabel("step")
        ax.set_title("Training loss")
        ax.legend()
        plots["loss"] = _png(fig)
    return plots


def write_model_card(summary: Mapping[str, Any], results: Sequence[ScenarioResult],
                     elo_history: Sequence[tuple[float, float]], out_dir: Path, *,
                     training: Mapping[str, Any] | None = None) -> Path:
    """Render include/eval/model_card.html.jinja2 with plots embedded; return the file path."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"))
    html = template.render(
        summary=summary, results=results, plots=card_plots(summary, elo_history, training),
        training=training or {}, fmt=_fmt, pct=_pct,
    )
    path = Path(out_dir) / "model_card.html"
    path.write_text(html, encoding="utf-8")
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.0%}"
