"""Post-processing and validity checks for generated turns.

`clean_turn` strips what small and chat-tuned models leak into a message: chat-template tokens
(ChatML, Llama-2/3, Gemma, Phi), role labels ("User:", "Assistant:", "**Coach:**", the persona's
name), a continuation of the other side of the dialogue, wrapping quotes and "Here is the message:"
preambles; then it normalises whitespace. `turn_problem` decides whether a cleaned turn is usable:
empty, truncated (finish_reason "length"), looping (repeated n-grams, a repeated sentence or
character run) or identical to an earlier turn all become recorded failures, never training data.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

# Chat-template and special tokens of common model families.
_SPECIAL_TOKEN_RE = re.compile(
    r"<\|im_start\|>\s*(?:system|user|assistant)?"
    r"|<\|start_header_id\|>\s*\w*\s*<\|end_header_id\|>"
    r"|<start_of_turn>\s*(?:user|model)?"
    r"|<\|[A-Za-z0-9_.:\-]{1,40}\|>"
    r"|</?s>|<<SYS>>|<</SYS>>|\[/?INST\]|<end_of_turn>|<eos>|<bos>|<pad>|<unk>",
    re.IGNORECASE,
)
USER_LABELS = ("user", "human", "person", "client", "question", "q")
ASSISTANT_LABELS = ("assistant", "ai", "coach", "bot", "tune", "model", "gpt", "answer", "a",
                    "response")
_LABEL_TEMPLATE = r"^\s*(?:[*_#>]+\s*)?(?:{names})\s*(?:[*_]+\s*)?[:：]\s*(?:[*_]+\s*)?"
_PREAMBLE_RE = re.compile(
    r"^\s*(?:sure|okay|ok|certainly|of course|here(?:'s| is| are)|below is)\b[^\n]{0,100}?:\s*\n",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'", "«": "»"}
_WORD_RE = re.compile(r"[\w']+")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+")
_CHAR_RUN_RE = re.compile(r"(.{1,12}?)\1{11,}", re.DOTALL)

LOOP_NGRAM = 4
LOOP_MIN_WORDS = 24
LOOP_MAX_REPEATED_SHARE = 0.5
LOOP_SENTENCE_REPEATS = 3


def _label_re(names: Sequence[str], *, anywhere: bool) -> re.Pattern[str]:
    """A role label at the start of the text, or (anywhere=True) at the start of any line."""
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True) if n)
    pattern = _LABEL_TEMPLATE.format(names=alternatives)
    if anywhere:
        return re.compile(pattern, re.IGNORECASE | re.MULTILINE)
    return re.compile(r"\A" + pattern[1:], re.IGNORECASE)


def _labels(role: str, persona_name: str | None) -> tuple[list[str], list[str]]:
    """(labels of this role, labels of the other side) for a message by `role`."""
    user = list(USER_LABELS) + ([persona_name] if persona_name else [])
    assistant = list(ASSISTANT_LABELS)
    return (user, assistant) if role == "user" else (assistant, user)


def strip_special_tokens(text: str) -> str:
    return _SPECIAL_TOKEN_RE.sub("", text)


def normalise_whitespace(text: str) -> str:
    """CRLF → LF, tabs/runs of spaces → one space, no trailing spaces, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _strip_wrapping_quotes(text: str) -> str:
    if len(text) >= 2 and text[0] in _QUOTE_PAIRS and text[-1] == _QUOTE_PAIRS[text[0]]:
        inner = text[1:-1]
        # Only a single quoted block: "a" and "b" is two quotes, not a wrapper.
        if text[0] not in inner and _QUOTE_PAIRS[text[0]] not in inner:
            return inner.strip()
    return text


def clean_turn(text: str | None, role: str, *, persona_name: str | None = None) -> str:
    """A generated message without template tokens, role leaks, quotes and messy whitespace."""
    if not text:
        return ""
    own, other = _labels(role, persona_name)
    cleaned = strip_special_tokens(text)
    cleaned = normalise_whitespace(cleaned)
    # The model wrote the other side of the dialogue too: keep only its own message.
    other_label = _label_re(other, anywhere=True).search(cleaned)
    if other_label is not None and other_label.start() > 0:
        cleaned = cleaned[: other_label.start()]
    cleaned = _PREAMBLE_RE.sub("", cleaned, count=1)
    # A label of this role (or, at the very start, of the other) before the message itself.
    for _ in range(2):
        stripped = _label_re(own + other, anywhere=False).sub("", cleaned, count=1)
        stripped = _strip_wrapping_quotes(stripped.strip())
        if stripped == cleaned:
            break
        cleaned = stripped
    cleaned = _strip_wrapping_quotes(cleaned.strip())
    return normalise_whitespace(cleaned)


def _fingerprint(text: str) -> str:
    return " ".join(_WORD_RE.findall(text.lower()))


def looping_reason(text: str) -> str | None:
    """Why a message looks degenerate (repeated n-grams/sentences/characters), or None."""
    run = _CHAR_RUN_RE.search(text)
    if run is not None and len(run.group(0)) >= 30:
        return f"looping: {run.group(1)!r} repeated {len(run.group(0)) // len(run.group(1))} times"
    words = _WORD_RE.findall(text.lower())
    if len(words) >= LOOP_MIN_WORDS:
        grams = [tuple(words[i: i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1)]
        counts = Counter(grams)
        repeated = sum(c for c in counts.values() if c > 1) / len(grams)
        if repeated > LOOP_MAX_REPEATED_SHARE:
            return f"looping: {repeated:.0%} of {LOOP_NGRAM}-grams repeated"
    sentences = [_fingerprint(s) for s in _SENTENCE_SPLIT_RE.split(text)]
    sentence_counts = Counter(s for s in sentences if len(s.split()) >= 3)
    if sentence_counts:
        sentence, times = sentence_counts.most_common(1)[0]
        if times >= LOOP_SENTENCE_REPEATS:
            return f"looping: sentence {sentence[:60]!r} repeated {times} times"
    return None


def turn_problem(
    text: str,
    *,
    finish_reason: str | None,
    earlier: Sequence[dict[str, str]] = (),
    role: str = "assistant",
) -> str | None:
    """Why a cleaned turn cannot be used, or None when it is fine.

    `earlier` holds the conversation's previous messages; repeating one of them verbatim (same
    role: a loop across turns; other role: parroting) is a failure too.
    """
    if finish_reason == "length":
        return "truncated (finish_reason=length); raise max_tokens"
    if not text.strip():
        return "empty after post-processing"
    reason = looping_reason(text)
    if reason is not None:
        return reason
    fingerprint = _fingerprint(text)
    for position, message in enumerate(earlier):
        if fingerprint and _fingerprint(message.get("content", "")) == fingerprint:
            same = message.get("role") == role
            kind = "repeats its own" if same else "parrots the"
            return f"looping: {kind} message {position + 1} verbatim"
    return None
