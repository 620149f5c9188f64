"""Canned replies for the tagger and judge prompts, served by tests/fakes/fake_openai.py.

Responders read the request the way a model would — which tagger or criterion the prompt asks
about, and the conversation text — and answer deterministically with keyword rules, so tests and
benchmarks exercise the real prompt → HTTP → parse → store path. Variants produce the failure
shapes real small models produce: prose around JSON, code fences, no JSON at all.

Import paths for `FakeOpenAIServer(responder=..., subprocess=True)`:
`tests.fakes.tag_responders:tagging_responder` (taggers + judges),
`tests.fakes.tag_responders:noisy_responder`, `tests.fakes.tag_responders:garbage_responder`.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from typing import Any

_TAGGER = re.compile(r"You are the (\w+) tagger")
_CRITERION = re.compile(r"^Criterion (\w+):", re.M)
_KEYWORDS_TONES = [
    ("anxious", ("worried", "nervous", "scared", "anxious", "terrified", "panic")),
    ("frustrated", ("annoyed", "fed up", "furious", "sick of", "frustrat")),
    ("sad", ("sad", "lonely", "miss ", "crying", "grief")),
    ("joyful", ("happy", "excited", "thrilled", "great news")),
    ("grateful", ("thank",)),
    ("curious", ("why ", "how does", "wonder")),
]
_KEYWORDS_TOPICS = [
    ("work_career", ("job", "boss", "manager", "raise", "interview", "work")),
    ("money_planning", ("budget", "money", "credit card", "saving", "debt")),
    ("relationships", ("partner", "friend", "sister", "brother", "parents", "girlfriend")),
    ("health_wellbeing", ("sleep", "exercise", "run", "tired", "gym")),
    ("study_learning", ("exam", "thesis", "study", "class")),
]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _conversation(request: dict) -> str:
    """The conversation part of the last user message (after 'Conversation...:')."""
    user = ""
    for message in request.get("messages", []):
        if message.get("role") == "user" and "Conversation" in _text(message.get("content")):
            user = _text(message.get("content"))
    marker = user.rfind("Conversation")
    return user[marker:] if marker >= 0 else user


def _system(request: dict) -> str:
    for message in request.get("messages", []):
        if message.get("role") == "system":
            return _text(message.get("content"))
    return ""


def _assistant_turns(conversation: str) -> list[str]:
    return [line[len("assistant: "):] for line in conversation.splitlines()
            if line.startswith("assistant: ")]


def tagger_output(name: str, conversation: str) -> dict[str, Any]:
    """A plausible, schema-valid output for tagger `name` from keyword rules."""
    lowered = conversation.lower()
    if name == "emotion":
        tones = [tone for tone, cues in _KEYWORDS_TONES if any(c in lowered for c in cues)][:2]
        if _assistant_turns(conversation) and len(tones) < 3:
            tones.append("supportive")
        return {"tones": tones or ["neutral"], "confidence": 0.9 if tones else 0.5}
    if name == "topic":
        topics = [t for t, cues in _KEYWORDS_TOPICS if any(c in lowered for c in cues)][:2]
        return {"topics": topics or ["off_topic"], "subtopics": [], "confidence": 0.8}
    if name == "temporal":
        if any(w in lowered for w in ("tomorrow", "next ", "will ", "plan")):
            focus = "future"
        elif any(w in lowered for w in ("yesterday", "last ", "used to", "ago")):
            focus = "past"
        else:
            focus = "present"
        return {"focus": focus, "confidence": 0.7}
    if name == "belief":
        beliefs = [{"statement": s.strip()[:200], "holder": "user", "kind": "explicit"}
                   for s in re.findall(r"I (?:think|believe) [^.!?\n]+", conversation)]
        return {"beliefs": beliefs[:5], "values": ["family"] if "family" in lowered else [],
                "stances": [], "confidence": 0.6 if beliefs else None}
    if name == "hallucination":
        claims = [{"claim": s.strip()[:200], "reason": "specific statistic with no source"}
                  for turn in _assistant_turns(conversation)
                  for s in re.split(r"(?<=[.!?])\s+", turn) if re.search(r"\d+%|study", s)]
        return {"hallucination_score": min(1.0, 0.3 * len(claims)), "claims": claims}
    raise ValueError(f"no canned output for tagger {name!r}")


def judge_verdict(criterion: str, conversation: str, model: str) -> dict[str, str]:
    """YES unless a rule fires; `*strict*` models also fail long replies on HP2/CM1."""
    turns = _assistant_turns(conversation)
    joined = " ".join(turns).lower()
    if criterion == "SF1" and "guaranteed" in joined:
        return {"reasoning": "promises a guaranteed outcome for a risky action", "verdict": "NO"}
    if criterion in ("CQ2", "SF2", "CM2", "AC2") and len(turns) <= 1:
        return {"reasoning": "the situation never comes up", "verdict": "NA"}
    if "strict" in model and criterion in ("HP2", "CM1") and any(len(t.split()) > 40
                                                                  for t in turns):
        return {"reasoning": "a reply is much longer than the user's message", "verdict": "NO"}
    return {"reasoning": "the assistant's turns meet the criterion", "verdict": "YES"}


def tagging_responder(request: dict) -> str:
    """Valid JSON for tagger, combined-tagger and judge prompts; a plain echo otherwise."""
    system = _system(request)
    conversation = _conversation(request)
    match = _TAGGER.search(system)
    if match:
        return json.dumps(tagger_output(match.group(1), conversation))
    if system.startswith("You are a conversation tagger"):
        names = re.findall(r"^## (\w+)$", system, re.M)
        return json.dumps({n: tagger_output(n, conversation) for n in names})
    if "quality judge" in system:
        user = _text(request["messages"][1].get("content")) if len(request["messages"]) > 1 else ""
        criteria = _CRITERION.findall(user)
        model = str(request.get("model", ""))
        if "several yes/no questions" in system:
            return json.dumps({c: judge_verdict(c, conversation, model) for c in criteria})
        return json.dumps(judge_verdict(criteria[0], conversation, model))
    return "I can only answer tagging and judging prompts."


def noisy_responder(request: dict) -> str:
    """The same JSON, but wrapped the way chatty models wrap it (prose, fences, both)."""
    body = tagging_responder(request)
    style = sum(map(ord, _conversation(request))) % 3
    if style == 0:
        return f"Sure! Here is the analysis you asked for:\n{body}\nLet me know if you need more."
    if style == 1:
        return f"```json\n{body}\n```"
    return f"Result:\n```\n{body}\n```\nThat's my best reading."


def garbage_responder(request: dict) -> str:
    """Never any JSON: what a 135M model often says instead."""
    return "The conversation is about feelings and it is very interesting to read about them."


class FlakyResponder:
    """Garbage for the first `failures` replies per prompt (tagger + conversation), then valid.

    Thread-mode only (keeps state); `calls` counts replies per prompt key.
    """

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: dict) -> str:
        key = _system(request)[:60] + "|" + _conversation(request)
        with self._lock:
            self.calls[key] += 1
            n = self.calls[key]
        if n <= self.failures:
            return garbage_responder(request)
        return tagging_responder(request)
