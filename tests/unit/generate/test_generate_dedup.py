"""Dedup: real MiniLM rejects paraphrases and keeps distinct questions; blocked search is exact."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.generate.dedup import (
    DEFAULT_CONVERSATION_THRESHOLD,
    DEFAULT_OPENING_THRESHOLD,
    conversation_text,
    embed_conversations,
    find_duplicates,
    opening_text,
)

PARAPHRASES = [
    ("How can I build a morning routine that sticks?",
     "What's a way to create a morning routine I'll actually keep?"),
    ("I feel lonely since moving to a new city. How do I make friends?",
     "Since I moved to a new city I've been lonely. How can I make new friends?"),
    ("I spend too much money on impulse buys online. How do I stop?",
     "How can I quit making impulsive online purchases? I overspend all the time."),
    ("Every Sunday evening I get this dread about Monday. Is that normal?",
     "Is it normal to feel dread every Sunday night before the work week starts?"),
]
# A looser rewording (cosine ~0.68 on MiniLM): below the default opening threshold, so it takes a
# lower, configurable threshold to reject it.
LOOSE_PARAPHRASE = ("My partner and I keep fighting about chores. What can we do?",
                    "We argue constantly about housework, my partner and I. How do we fix this?")
DISTINCT = [
    "How do I ask for a raise after two years at the bakery?",
    "How do I ask for a raise when my manager keeps cancelling our one-on-ones?",
    "My thesis advisor never answers emails, how do I get feedback?",
    "I wake up at 5am and can't fall back asleep, what helps?",
    "Should I pick a major based on salary or interest?",
    "My best friend moved away and we barely talk anymore. Should I reach out?",
    "How much of my salary should go into savings each month?",
    "I love my job but I'm exhausted every Friday. How do I recover on weekends?",
    "My partner wants to move abroad for work and I don't. How do we decide?",
    "How do I say no to meetings without upsetting my team?",
]


def _conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": "I wonder what feels most pressing about that."}]


@pytest.fixture(scope="module")
def minilm():
    """Load MiniLM once for the module."""
    from tasks.core.embeddings import get_embedder

    return get_embedder()


@pytest.mark.slow
def test_paraphrased_openings_are_rejected_as_duplicates(minilm):
    conversations = [_conversation(q) for pair in PARAPHRASES for q in pair]
    opening, whole = embed_conversations(conversations)
    ids = [f"c{i}" for i in range(len(conversations))]
    duplicates = find_duplicates(ids, opening, whole)
    assert [(d.index, d.duplicate_of) for d in duplicates] == [
        (2 * k + 1, f"c{2 * k}") for k in range(len(PARAPHRASES))]
    assert all(d.similarity >= DEFAULT_OPENING_THRESHOLD for d in duplicates)


@pytest.mark.slow
def test_a_looser_paraphrase_needs_a_lower_threshold(minilm):
    opening, whole = embed_conversations([_conversation(q) for q in LOOSE_PARAPHRASE])
    assert find_duplicates(["a", "b"], opening, whole) == []
    found = find_duplicates(["a", "b"], opening, whole, opening_threshold=0.65)
    assert [(d.index, d.duplicate_of, d.kind) for d in found] == [(1, "a", "opening")]


@pytest.mark.slow
def test_distinct_questions_on_the_same_topics_are_all_kept(minilm):
    opening, whole = embed_conversations([_conversation(q) for q in DISTINCT])
    assert find_duplicates([f"d{i}" for i in range(len(DISTINCT))], opening, whole) == []


@pytest.mark.slow
def test_paraphrase_of_a_stored_conversation_is_a_duplicate_of_the_stored_one(minilm):
    stored_open, stored_whole = embed_conversations([_conversation(DISTINCT[3])])
    new = [_conversation("I wake up at 5 in the morning and can't get back to sleep. What helps?"),
           _conversation(DISTINCT[4])]
    opening, whole = embed_conversations(new)
    duplicates = find_duplicates(["n0", "n1"], opening, whole, stored_ids=["s0"],
                                 stored_opening=stored_open, stored_conversation=stored_whole)
    assert [(d.index, d.duplicate_of, d.against) for d in duplicates] == [(0, "s0", "stored")]


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(ids, opening, whole, t_open, t_conv, stored_open=None, stored_whole=None):
    kept: list[int] = []
    result = {}
    for j in range(len(ids)):
        if stored_open is not None and len(stored_open) and (
                (stored_open @ opening[j] >= t_open) | (stored_whole @ whole[j] >= t_conv)).any():
            result[j] = "stored"
            continue
        if any(opening[i] @ opening[j] >= t_open or whole[i] @ whole[j] >= t_conv for i in kept):
            result[j] = "batch"
            continue
        kept.append(j)
    return result


@pytest.mark.parametrize("block_size", [7, 64, 4096])
def test_blocked_search_matches_brute_force_greedy_across_block_boundaries(block_size):
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(120, 384)))
    # plant near-duplicates at various distances (some across blocks, some in chains): noise of
    # norm 0.2-0.9 gives cosines of about 0.75-0.98 around the 0.85 threshold
    scale = rng.uniform(0.2, 0.9, size=(80, 1)) / np.sqrt(384)
    noisy = _unit(base[rng.integers(0, 120, size=80)] + scale * rng.normal(size=(80, 384)))
    opening = np.vstack([base, noisy])
    whole = _unit(opening + 0.4 / np.sqrt(384) * rng.normal(size=opening.shape))
    order = rng.permutation(len(opening))
    opening, whole = opening[order], whole[order]
    stored_open = _unit(rng.normal(size=(30, 384)))
    stored_open[:5] = _unit(opening[:5] + 0.1 / np.sqrt(384) * rng.normal(size=(5, 384)))
    stored_whole = stored_open.copy()
    ids = [f"x{i}" for i in range(len(opening))]
    t_open, t_conv = 0.85, 0.9
    expected = _brute_force(ids, opening, whole, t_open, t_conv, stored_open, stored_whole)
    found = find_duplicates(ids, opening, whole, stored_ids=[f"s{i}" for i in range(30)],
                            stored_opening=stored_open, stored_conversation=stored_whole,
                            opening_threshold=t_open, conversation_threshold=t_conv,
                            block_size=block_size)
    assert {d.index: d.against for d in found} == expected
    assert 20 < len(expected) < len(ids)  # the planted duplicates exist and not all are dups


def test_the_first_of_a_duplicate_group_survives_and_others_point_to_it():
    vec = _unit(np.ones((1, 384)))
    opening = np.vstack([vec, vec, vec])
    found = find_duplicates(["a", "b", "c"], opening, opening)
    assert [(d.index, d.duplicate_of, d.kind) for d in found] == [(1, "a", "opening"),
                                                                  (2, "a", "opening")]


def test_whole_conversation_similarity_alone_can_mark_a_duplicate():
    rng = np.random.default_rng(1)
    opening = _unit(rng.normal(size=(2, 384)))  # different openings
    whole = _unit(np.vstack([np.ones(384), np.ones(384)]))
    found = find_duplicates(["a", "b"], opening, whole)
    assert [(d.index, d.kind) for d in found] == [(1, "conversation")]
    assert DEFAULT_CONVERSATION_THRESHOLD <= found[0].similarity


def test_mismatched_shapes_say_what_to_pass():
    with pytest.raises(ValueError, match="one row of each per id"):
        find_duplicates(["a", "b"], np.zeros((1, 384)), np.zeros((2, 384)))


def test_embedding_texts_are_the_opening_and_the_whole_conversation():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert opening_text(messages) == "Hi"
    assert conversation_text(messages) == "user: Hi\nassistant: Hello"
