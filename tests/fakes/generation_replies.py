"""Canned replies for generation tests and benchmarks: responders for `FakeOpenAIServer`.

`reply` recognises the generation prompts (persona question, document scenario, user simulator,
assistant) and answers each with varied, deterministic text: the random generator is seeded by a
hash of the request, so the same request always gets the same reply while different items get
different people, places, numbers and phrasings (distinct enough that MiniLM dedup keeps them).
Variants inject the failure modes the pipeline must catch: `looping_reply` (an assistant stuck
repeating itself), `leaky_reply` (ChatML tokens and role labels leaking into messages) and
`duplicate_openings_reply` (only three distinct opening questions).

Use as `FakeOpenAIServer(responder="tests.fakes.generation_replies:reply")`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

_NAMES = ["Dana", "Luis", "my sister", "my roommate", "my manager", "my dad", "Priya",
          "my partner", "our team lead", "a coworker called Ben", "my best friend", "Mrs. Okafor",
          "my neighbour", "my cousin Teo", "the new hire", "my tutor"]
_PLACES = ["on the bus", "in the library", "at the kitchen table", "in the break room",
           "at the gym", "in my car", "on the balcony", "at my desk", "in the supermarket queue",
           "at the hospital", "in the garden", "at the bakery counter", "on a video call"]
_TIMES = ["every Tuesday", "since March", "after nine at night", "for about six weeks",
          "most mornings", "since the holidays", "twice this week", "on weekends",
          "since I turned thirty", "every payday", "before every deadline", "all autumn"]
_OBJECTS = ["a sticky note on my fridge", "a spreadsheet", "my phone calendar", "a paper planner",
            "a shoebox of receipts", "a voice memo", "my old laptop", "a whiteboard",
            "a habit app", "a borrowed book", "a notebook with a red cover", "an alarm clock"]
_FEELINGS = ["tired", "restless", "embarrassed", "oddly calm", "on edge", "hopeful",
             "stuck", "irritated", "curious", "drained", "a bit lost", "guilty"]
_OPENERS = ["", "Hi.", "Hey,", "Hello!", "So,", "Okay,", "Quick one:", "Honestly,", "Um,",
            "Good evening.", "Right,", "Hi there,"]
_CONTEXT = [
    "I've been dealing with {topic} {time} and it keeps coming back {place}.",
    "{Name} mentioned {topic} to me {time}, and now I can't stop thinking about it.",
    "Last {day} I tried to sort out {topic} with {object}, but it fell apart by {hour}.",
    "The short version: {topic}, {number} attempts so far, and I feel {feeling}.",
    "It started {time}; {name} noticed before I did that {topic} was getting to me.",
    "I wrote down {number} reasons to deal with {topic} {place}, then lost the list.",
]
_DETAILS = [
    "I usually end up scrolling until {hour} instead.",
    "{Name} thinks I'm overreacting, which doesn't help.",
    "I have about {number} minutes a day that are really mine.",
    "The weird part is I'm fine {place}, just not anywhere else.",
    "Money is tight this month, so anything expensive is out.",
    "I already told {name} I'd have an answer by {day}.",
    "My {object_plain} is full of half-finished plans.",
    "I feel {feeling} when I think about it for too long.",
    "There's a {number}-week deadline hanging over all of this.",
    "Part of me wants to ignore it until {day}.",
]
_QUESTIONS = [
    "Where would you even start with {topic}?",
    "Is it normal to feel this way about {topic}?",
    "What's one small thing I could try before {day}?",
    "How do other people handle {topic} without burning out?",
    "Should I talk to {name} about it or figure it out alone first?",
    "What am I missing here?",
    "Can you help me think this through?",
    "Is {number} weeks enough to change something like this?",
]
_REPLY_OPENINGS = [
    "It sounds like {echo} has been weighing on you.",
    "I'm hearing that {echo} matters a lot right now.",
    "That's a lot to carry, especially with {echo} in the mix.",
    "Thank you for spelling out {echo} so clearly.",
    "So {echo} is the part that keeps pulling at you.",
]
_REPLY_MIDDLES = [
    "I wonder if starting with something as small as {object} {time} might take the pressure off.",
    "It might be that {name} sees only part of the picture.",
    "One option is to block {number} minutes {place} and treat it as an experiment, not a test.",
    "Maybe the goal for {day} is just noticing when the {feeling} feeling shows up.",
    "It could help to write the next step on {object} where you'll see it.",
    "Perhaps the first move is a short, honest conversation with {name}.",
]
_REPLY_QUESTIONS = [
    "What would a good week look like to you?",
    "Which part feels most urgent?",
    "How did it go the last time you tried something similar?",
    "",
    "What would make this easier to start?",
    "",
]
_FOLLOWUPS = [
    "I guess that makes sense, but {detail}",
    "Hmm. I tried something like that {time} and {name} laughed at it.",
    "Okay, {object} I can do. What if it doesn't stick past {day}?",
    "That's fair. The thing is, {detail}",
    "Maybe. I'm {feeling} just thinking about it, honestly.",
    "Right, and what about the {number} other things on my plate?",
]
_DOC_SUBJECTS = ["The steering group", "Finance", "Our night team", "The landlord", "Marketing",
                 "The union rep", "Two volunteers", "The vendor", "Head office", "The clinic",
                 "Our biggest client", "The school board", "Facilities", "The auditors"]
_DOC_VERBS = ["postponed", "questioned", "approved", "rejected", "rewrote", "escalated",
              "paused", "doubled", "trimmed", "audited", "challenged", "reopened", "merged"]
_DOC_ADJECTIVES = ["quarterly", "overdue", "revised", "informal", "costly", "temporary",
                   "contested", "weekend", "seasonal", "draft", "shared", "urgent", "legacy"]
_DOC_NOUNS = ["rota", "forecast", "contract", "handover", "budget", "timeline", "survey",
              "policy", "roadmap", "invoice", "schedule", "inventory", "appraisal", "refund"]
_DOC_REASONS = ["citing staff shortages", "after complaints", "without consultation",
                "pending legal review", "to save money", "despite objections",
                "because of delays", "at short notice", "ahead of the audit", "under pressure"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend", "the 14th",
         "next month", "the end of the term", "payday"]
_HOURS = ["1am", "11pm", "midnight", "2am", "10pm", "half past twelve"]
_SUBTOPIC_RE = re.compile(r'specifically "([^"]+)"')
_NAME_RE = re.compile(r"(?:message that|role-playing|that) ([A-Z][a-z]+)")


def _rng(request: dict, salt: str = "") -> random.Random:
    key = json.dumps([request.get("messages"), request.get("seed"), request.get("model"), salt],
                     sort_keys=True)
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


def _fill(template: str, rng: random.Random, topic: str, **extra: str) -> str:
    name = rng.choice(_NAMES)
    values = {
        "topic": topic, "time": rng.choice(_TIMES), "place": rng.choice(_PLACES),
        "name": name, "Name": name[0].upper() + name[1:], "object": rng.choice(_OBJECTS),
        "object_plain": rng.choice(_OBJECTS).removeprefix("a ").removeprefix("an "),
        "feeling": rng.choice(_FEELINGS), "number": rng.randint(2, 40), "day": rng.choice(_DAYS),
        "hour": rng.choice(_HOURS), **extra,
    }
    return template.format(**values)


def _text(content: object) -> str:
    return content if isinstance(content, str) else ""


def classify(request: dict) -> str:
    """Which generation prompt a request carries: question|document|user_sim|assistant|other."""
    messages = request.get("messages") or []
    system = next((_text(m.get("content")) for m in messages if m.get("role") == "system"), "")
    if "How to write your next reply" in system:
        return "assistant"
    last_user = next((_text(m.get("content")) for m in reversed(messages)
                      if m.get("role") == "user"), "")
    if last_user.startswith("Write the first message"):
        return "question"
    if last_user.startswith("Write a realistic"):
        return "document"
    if last_user.startswith("You are role-playing"):
        return "user_sim"
    return "other"


def _topic(request: dict) -> str:
    for message in request.get("messages") or []:
        found = _SUBTOPIC_RE.search(_text(message.get("content")))
        if found:
            return found.group(1)
    return "this"


def _question(request: dict, rng: random.Random) -> str:
    topic = _topic(request)
    parts = [rng.choice(_OPENERS), _fill(rng.choice(_CONTEXT), rng, topic)]
    parts += [_fill(d, rng, topic) for d in rng.sample(_DETAILS, rng.randint(1, 3))]
    parts.append(_fill(rng.choice(_QUESTIONS), rng, topic))
    return " ".join(p for p in parts if p)


def _assistant(request: dict, rng: random.Random) -> str:
    last_user = next((_text(m.get("content")) for m in reversed(request["messages"])
                      if m.get("role") == "user"), "")
    words = re.findall(r"[A-Za-z']+", last_user)
    echo = " ".join(words[rng.randint(0, max(0, len(words) - 4)):][:4]).lower() or "this"
    topic = _topic(request)
    parts = [rng.choice(_REPLY_OPENINGS).format(echo=echo)]
    parts += [_fill(m, rng, topic) for m in rng.sample(_REPLY_MIDDLES, rng.randint(1, 3))]
    parts.append(rng.choice(_REPLY_QUESTIONS))
    return " ".join(p for p in parts if p)


def _followup(request: dict, rng: random.Random) -> str:
    topic = _topic(request)
    detail = _fill(rng.choice(_DETAILS), rng, topic)
    first = _fill(rng.choice(_FOLLOWUPS), rng, topic, detail=detail)
    extra = _fill(rng.choice(_QUESTIONS), rng, topic) if rng.random() < 0.6 else ""
    return " ".join(p for p in (first, extra) if p)


def _document(request: dict, rng: random.Random) -> str:
    topic = _topic(request)
    title = f"{rng.choice(['Memo', 'Report', 'Proposal', 'Email'])}: {topic.title()} — next steps"
    body: list[str] = []
    words = 0
    while words < 640:
        sentences = []
        for _ in range(rng.randint(3, 5)):
            sentence = (f"On {rng.choice(_DAYS)} {rng.choice(_DOC_SUBJECTS).lower()} "
                        f"{rng.choice(_DOC_VERBS)} the {rng.choice(_DOC_ADJECTIVES)} "
                        f"{rng.choice(_DOC_NOUNS)} {rng.choice(_DOC_REASONS)}, "
                        f"{rng.randint(2, 97)} {rng.choice(_DOC_NOUNS)}s affected "
                        f"{rng.choice(_PLACES)}.")
            sentences.append(sentence)
        paragraph = " ".join(sentences)
        words += len(paragraph.split())
        body.append(paragraph)
    request_line = _fill(rng.choice(_QUESTIONS), rng, topic)
    return "\n\n".join([title, *body, f"Could you help me with this? {request_line}"])


def reply(request: dict) -> str:
    """The generation responder: a varied, deterministic answer per prompt kind."""
    rng = _rng(request)
    kind = classify(request)
    if kind == "question":
        return _question(request, rng)
    if kind == "document":
        return _document(request, rng)
    if kind == "user_sim":
        return _followup(request, rng)
    if kind == "assistant":
        return _assistant(request, rng)
    return "I am not sure what you mean."


def looping_reply(request: dict) -> str:
    """Like `reply`, but every assistant turn is stuck in a loop."""
    if classify(request) == "assistant":
        return " ".join(["I hear you and that is valid."] * 6)
    return reply(request)


def leaky_reply(request: dict) -> str:
    """Like `reply`, wrapped in the template tokens and role labels small models leak."""
    text = reply(request)
    if classify(request) == "assistant":
        return f"<|im_start|>assistant\nAssistant: {text}<|im_end|>\nUser: thanks, bye"
    return f'User: "{text}"<|im_end|>'


_FIXED_OPENINGS = [
    "How can I stop procrastinating on my thesis?",
    "I want to ask my boss for a raise but I'm scared. How should I start?",
    "My sleep schedule is a mess, I go to bed at 3am every night. Any tips?",
]


def duplicate_openings_reply(request: dict) -> str:
    """Like `reply`, but opening questions come from only three fixed questions."""
    if classify(request) == "question":
        return _FIXED_OPENINGS[_rng(request).randrange(len(_FIXED_OPENINGS))]
    return reply(request)
