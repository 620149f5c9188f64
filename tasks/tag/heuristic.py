"""LLM-free heuristics for the hallucination and belief taggers, named as heuristics in their output.

They exist so that an offline run without a capable LLM still yields an interpretable signal; the
output's `"method"` says `heuristic:<name>` so that nobody mistakes it for a model's judgment.

- hallucination, `heuristic:unsupported-specifics`: specific checkable details in the assistant's
  turns (numbers, years, percentages, money, "a study/research shows", quotations, multi-word
  proper names) that appear nowhere in the user's turns or the assistant's instructions make
  their sentence an unsupported claim; score = 1 - 0.75^n for n such sentences (0 → 0,
  1 → 0.25, 3 → 0.58, 8 → 0.90).
- belief, `heuristic:stance-markers`: sentences with first-person belief markers ("I think",
  "I believe", "for me ... matters") are explicit beliefs, sentences with normative markers
  ("should", "always", "never", "everyone") implied ones; values come from a small lexicon;
  stances from "I'm against/for X", "in favour of X" and "I refuse to/won't X". Confidence is
  null.
"""

from __future__ import annotations

import re
from typing import Any

from tasks.tag.taggers import BaseTagger, ConversationInput

HALLUCINATION_METHOD = "heuristic:unsupported-specifics"
BELIEF_METHOD = "heuristic:stance-markers"
HEURISTIC_VERSION = "v1"
CLAIM_DECAY = 0.75

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_SPECIFICS = [
    ("a specific number", re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:\s?%| percent)?")),
    ("a research citation", re.compile(
        r"\b(?:a|one|the|recent|new)?\s*(?:study|studies|survey|research|researchers|scientists"
        r"|experts|statistics)\s+(?:show|shows|showed|found|find|prove|proves|proved|say|says"
        r"|suggest|suggests)\b", re.I)),
    ("a quotation", re.compile(r"[\"“][^\"”]{12,}[\"”]")),
    ("a proper name", re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+\b")),
]
_EXPLICIT = re.compile(
    r"\b(?:i (?:really |truly |strongly )?(?:believe|think|feel that|am convinced|'m convinced|"
    r"value)|in my (?:opinion|view)|to me,|for me,|(?:matters|is important) to me)\b", re.I)
_IMPLIED = re.compile(
    r"\b(?:should|shouldn't|must|ought to|always|never|everyone|nobody|no one|the right thing)\b",
    re.I)
_STANCE = re.compile(
    r"\b(?P<pre>(?:i'?m|i am)\s+(?:all\s+|totally\s+)?(?:against|for)|in favou?r of|against)"
    r"\s+(?P<object>[a-z][a-z\s'-]{3,60}?)(?=[.,;!?]|$)"
    r"|\bi (?:refuse to|won't|will not|don't want to)\s+(?P<refused>[a-z][a-z\s'-]{3,60}?)"
    r"(?=[.,;!?]|$)",
    re.I)
VALUE_LEXICON: dict[str, tuple[str, ...]] = {
    "family": ("family", "my kids", "my children", "my parents", "my mom", "my dad"),
    "honesty": ("honest", "honesty", "truth", "lying", "lie to"),
    "health": ("health", "healthy", "sleep", "exercise", "wellbeing"),
    "security": ("security", "stable", "stability", "savings", "safe"),
    "freedom": ("freedom", "independent", "independence", "my own boss"),
    "achievement": ("success", "achieve", "promotion", "ambitious", "career"),
    "friendship": ("friend", "friends", "friendship"),
    "fairness": ("fair", "unfair", "fairness", "deserve"),
    "growth": ("learn", "grow", "growth", "improve", "better myself"),
    "respect": ("respect", "disrespect", "boundaries"),
}


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def _normalise(text: str) -> str:
    return re.sub(r"[\s,]+", " ", text.lower()).strip()


class HeuristicTagger(BaseTagger):
    """Mixin over the hallucination/belief tagger classes: outputs from rules, not a model."""

    def __init__(self, backend: str = "heuristic", model: str = "") -> None:
        super().__init__(backend="heuristic", model="")

    @classmethod
    def wrap(cls, tagger_cls: type[BaseTagger]) -> HeuristicTagger:
        if "heuristic" not in tagger_cls.backends:
            raise ValueError(f"tagger {tagger_cls.name!r} has no heuristic backend")
        return type(f"Heuristic{tagger_cls.__name__}", (cls, tagger_cls), {})()

    @property
    def method(self) -> str:
        return HALLUCINATION_METHOD if self.name == "hallucination" else BELIEF_METHOD

    def definition(self) -> dict[str, Any]:
        return {
            "tagger": self.name,
            "backend": "heuristic",
            "schema": self.output_schema.model_json_schema(),
            "method": f"{self.method}/{HEURISTIC_VERSION}",
        }

    def format_input(self, conversation: ConversationInput) -> list[dict[str, str]]:
        raise NotImplementedError("the heuristic backend sends no prompt; use tag()")

    def tag(self, conversation: ConversationInput) -> dict[str, Any]:
        data = (_hallucination(conversation) if self.name == "hallucination"
                else _beliefs(conversation))
        return self.validate(data)

    def tag_many(self, conversations: list[ConversationInput]) -> list[dict[str, Any]]:
        return [self.tag(c) for c in conversations]


def _hallucination(conversation: ConversationInput) -> dict[str, Any]:
    grounding = _normalise(" ".join(
        [conversation.system_prompt]
        + [m["content"] for m in conversation.messages if m["role"] != "assistant"]))
    claims: list[dict[str, str]] = []
    seen: set[str] = set()
    for message in conversation.messages:
        if message["role"] != "assistant":
            continue
        for sentence in _sentences(message["content"]):
            details: list[str] = []
            for kind, pattern in _SPECIFICS:
                for match in pattern.finditer(sentence):
                    detail = match.group(0).strip()
                    key = _normalise(detail)
                    if not key or key in seen or key in grounding:
                        continue
                    seen.add(key)
                    details.append(f"{kind} {detail!r}")
            if details:
                claims.append({"claim": sentence[:300],
                               "reason": "not found in the user's turns or the instructions: "
                                         + "; ".join(details)})
    claims = claims[:20]
    score = 1.0 - CLAIM_DECAY ** len(claims)
    return {"hallucination_score": round(score, 4), "claims": claims}


def _beliefs(conversation: ConversationInput) -> dict[str, Any]:
    beliefs: list[dict[str, str]] = []
    stances: list[str] = []
    values: list[str] = []
    for message in conversation.messages:
        holder = "assistant" if message["role"] == "assistant" else "user"
        text = message["content"]
        lowered = text.lower()
        for value, cues in VALUE_LEXICON.items():
            if value not in values and any(re.search(rf"\b{re.escape(c)}\b", lowered)
                                           for c in cues):
                values.append(value)
        for sentence in _sentences(text):
            if _EXPLICIT.search(sentence):
                beliefs.append({"statement": sentence[:300], "holder": holder, "kind": "explicit"})
            elif _IMPLIED.search(sentence) and holder == "user":
                # The assistant's "you should" is advice, not a belief; the user's is a norm.
                beliefs.append({"statement": sentence[:300], "holder": holder, "kind": "implied"})
            for match in _STANCE.finditer(sentence):
                if match.group("pre"):
                    side = "against" if "against" in match.group("pre").lower() else "for"
                    stance = f"{side} {match.group('object').strip().lower()}"
                else:
                    stance = f"won't {match.group('refused').strip().lower()}"
                if stance not in stances:
                    stances.append(stance[:300])
    return {"beliefs": beliefs[:10], "values": values[:10], "stances": stances[:10],
            "confidence": None}
