"""Token bounds use the training tokenizer's chat template (SmolLM2), counted exactly and fast."""

from __future__ import annotations

import pytest

from tasks.curate.config import CurationConfig
from tasks.curate.filters import apply_filters
from tasks.curate.rows import CandidateRow
from tasks.curate.tokens import TokenCounter, measure_rows

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there, how are you?"},
     {"role": "assistant", "content": " I am fine.\n\nThanks!"}],
    [{"role": "system", "content": "You are a concise coach."},
     {"role": "user", "content": "My manager keeps moving deadlines — what now?"},
     {"role": "assistant", "content": "Ask which one matters most this week."},
     {"role": "user", "content": "Ok. Und auf Deutsch? Ça va? 日本語も"},
     {"role": "assistant", "content": "Gern: frag, was diese Woche zählt. 🙂"}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "  leading and trailing spaces  "},
     {"role": "assistant", "content": "code: `x = 1`\n```python\nprint(x)\n```"}],
]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.load("smollm2-135m-instruct")


def test_fast_count_equals_the_chat_template_token_count(counter):
    assert counter.count(CONVERSATIONS) == [counter.exact(c) for c in CONVERSATIONS]


def test_rows_over_sequence_len_are_counted_exactly_and_dropped(counter):
    long_reply = "word " * 400
    rows = [
        CandidateRow(conversation_id="short", persona_id="p", taxonomy_cell={"topic": "t"},
                     messages=CONVERSATIONS[0], tags={}, rubric=None),
        CandidateRow(conversation_id="long", persona_id="p", taxonomy_cell={"topic": "t"},
                     messages=[{"role": "user", "content": "Tell me more please"},
                               {"role": "assistant", "content": long_reply}], tags={}, rubric=None),
    ]
    cfg = CurationConfig(sequence_len=256, required_taggers=[], require_rubric_pass=False,
                         dedup_threshold=None, max_words=5000)
    measure_rows(rows, cfg, counter)
    exact_long = counter.exact([{"role": "user", "content": "Tell me more please"},
                                {"role": "assistant", "content": long_reply}])
    assert rows[1].tokens == exact_long > 256
    # Short rows carry a proven upper bound (template + bytes) instead of a tokenizer pass.
    assert counter.exact(CONVERSATIONS[0]) <= rows[0].tokens <= 256
    kept, exclusions, _ = apply_filters(rows, cfg)
    assert [r.conversation_id for r in kept] == ["short"]
    assert exclusions[0]["reason"] == "tokens_exceed_sequence_len"
    assert exclusions[0]["detail"] == {"value": exact_long, "threshold": 256}


def test_exact_token_counts_can_be_forced(counter):
    row = CandidateRow(conversation_id="c", messages=CONVERSATIONS[1][1:],
                       system_prompt=CONVERSATIONS[1][0]["content"])
    measure_rows([row], CurationConfig(exact_token_counts=True), counter)
    assert row.tokens == counter.exact(CONVERSATIONS[1])
    assert (row.turns, row.words) == (2, 29)
