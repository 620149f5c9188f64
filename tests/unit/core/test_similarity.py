"""The near-duplicate engine: pair search (exact and LSH), greedy pruning, two-view matching."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.core.similarity import (
    as_matrix,
    best_match,
    best_over_threshold,
    conversation_text,
    exact_pairs,
    greedy_prune,
    lsh_pairs,
    opening_text,
    resolve_method,
    similar_pairs,
    two_view_duplicates,
    unit,
)


def _random_unit(rng: np.random.Generator, n: int, dim: int = 64) -> np.ndarray:
    return unit(rng.standard_normal((n, dim)))


def _planted(seed: int = 0, n: int = 400, plants: int = 20, dim: int = 64
             ) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Random unit rows plus `plants` near copies (cosine ~0.99) appended after them."""
    rng = np.random.default_rng(seed)
    base = _random_unit(rng, n, dim)
    sources = rng.choice(n, size=plants, replace=False)
    near = unit(base[sources] + 0.1 / np.sqrt(dim) * rng.standard_normal((plants, dim)))
    pairs = {(int(s), n + k) for k, s in enumerate(sources)}
    return np.vstack([base, near]), pairs


def _above(value: float) -> float:
    """The next float32 above `value` (the comparisons run in float32)."""
    return float(np.nextafter(np.float32(value), np.float32(2)))


def test_text_forms_are_the_first_user_message_and_role_lines():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert opening_text(messages) == "Hi"
    assert opening_text([{"role": "assistant", "content": "x"}]) == ""
    assert conversation_text(messages) == "system: be brief\nuser: Hi\nassistant: Hello\nuser: Bye"
    assert conversation_text([]) == ""


def test_unit_rows_have_norm_one_and_zero_rows_stay_zero():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    result = unit(vectors)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], rtol=1e-6)


def test_as_matrix_makes_an_empty_matrix_of_none_and_flattens_rows():
    assert as_matrix(None).shape == (0, 384)
    assert as_matrix(None, dim=8).shape == (0, 8)
    matrix = as_matrix(np.ones((3, 2, 2), dtype=np.float64))
    assert matrix.shape == (3, 4) and matrix.dtype == np.float32 and matrix.flags.c_contiguous


@pytest.mark.parametrize("block", [1, 7, 64, 2048])
def test_exact_search_finds_exactly_the_planted_near_duplicates_at_any_block_size(block):
    vectors, planted = _planted()
    pairs = exact_pairs(vectors, 0.95, block)
    assert set(pairs) == planted
    assert all(i < j for i, j in pairs)
    for (i, j), sim in pairs.items():
        assert sim == pytest.approx(float(vectors[i] @ vectors[j]), abs=1e-5)


def test_exact_search_includes_a_pair_at_the_threshold_and_excludes_it_just_above():
    vectors = unit(np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]))
    cosine = float((vectors[:2] @ vectors[:2].T)[0, 1])
    assert set(exact_pairs(vectors, cosine)) == {(0, 1)}
    assert exact_pairs(vectors, _above(cosine)) == {}


def test_lsh_verifies_candidates_so_every_pair_it_reports_is_a_true_pair():
    vectors, planted = _planted(seed=1, n=1500, plants=30)
    exact = exact_pairs(vectors, 0.9)
    lsh = lsh_pairs(vectors, 0.9, seed=5)
    assert set(lsh) <= set(exact)
    assert all(lsh[k] == pytest.approx(exact[k], abs=1e-5) for k in lsh)
    assert planted <= set(lsh)  # cosine ~0.99: missed with probability far below 1e-6


def test_lsh_and_exact_agree_on_pairs_above_the_threshold_and_lsh_is_seeded():
    vectors, planted = _planted(seed=2, n=800, plants=25)
    exact, method_exact = similar_pairs(vectors, 0.95, method="exact")
    lsh, method_lsh = similar_pairs(vectors, 0.95, method="lsh", seed=3)
    assert (method_exact, method_lsh) == ("exact", "lsh")
    assert set(lsh) == set(exact) == planted
    assert lsh_pairs(vectors, 0.95, seed=3) == lsh
    assert lsh_pairs(vectors[:1], 0.5) == {}


def test_auto_uses_exact_up_to_the_limit_and_lsh_beyond():
    assert resolve_method("auto", 20000, 20000) == "exact"
    assert resolve_method("auto", 20001, 20000) == "lsh"
    assert resolve_method("lsh", 3, 20000) == "lsh"
    assert resolve_method("exact", 10**6, 10) == "exact"
    vectors, _ = _planted(n=50, plants=5)
    assert similar_pairs(vectors, 0.95, exact_limit=len(vectors))[1] == "exact"
    assert similar_pairs(vectors, 0.95, exact_limit=len(vectors) - 1)[1] == "lsh"


def test_greedy_prune_keeps_the_first_and_a_dropped_row_does_not_drop_others():
    # 0 ~ 1 and 1 ~ 2 but 0 !~ 2: 1 goes (duplicates kept 0), 2 stays (its only match was dropped)
    assert greedy_prune({(0, 1): 0.97, (1, 2): 0.98}) == {1: (0, 0.97)}
    # 3 matches kept 0 and kept 2: it points to the more similar one
    assert greedy_prune({(0, 3): 0.96, (2, 3): 0.99}) == {3: (2, 0.99)}
    # on equal similarity, the earlier kept row
    assert greedy_prune({(2, 3): 0.96, (0, 3): 0.96}) == {3: (0, 0.96)}
    assert greedy_prune({}) == {}


def test_best_over_threshold_ranks_hits_by_margin_over_each_views_threshold():
    sim_o = np.array([[0.80, 0.76], [0.10, 0.20], [0.50, 0.74]], dtype=np.float32)
    sim_c = np.array([[0.91, 0.99], [0.10, 0.95], [0.20, 0.89]], dtype=np.float32)
    hit, column, kind, similarity = best_over_threshold(sim_o, sim_c, 0.75, 0.90)
    assert hit.tolist() == [True, True, False]
    # row 0: opening 0.80 (margin 0.05) vs conversation 0.99 (margin 0.09) -> conversation col 1
    assert (int(column[0]), int(kind[0])) == (1, 1)
    assert similarity[0] == np.float32(0.99)
    assert (int(column[1]), int(kind[1])) == (1, 1)


def test_best_match_over_chunks_finds_what_one_pass_finds():
    rng = np.random.default_rng(4)
    ref_o, ref_c = _random_unit(rng, 90, 16), _random_unit(rng, 90, 16)
    scale = rng.uniform(0.05, 0.4, (30, 1))  # cosines of about 0.6-0.99 around the thresholds
    q_o = unit(ref_o[:30] + scale * rng.standard_normal((30, 16)))
    q_c = unit(ref_c[:30] + scale * rng.standard_normal((30, 16)))
    whole = best_match(q_o, q_c, ref_o, ref_c, 0.8, 0.85, chunk=1000)
    assert whole[0].any() and not whole[0].all()
    for chunk in (1, 7, 89):
        *found, similarity = best_match(q_o, q_c, ref_o, ref_c, 0.8, 0.85, chunk)
        for a, b in zip(found, whole[:3], strict=True):
            np.testing.assert_array_equal(a, b)
        # a chunk's product may differ from the full one in the last float32 bit
        np.testing.assert_allclose(similarity, whole[3], rtol=1e-6)


def _brute_two_view(q_o, q_c, r_o, r_c, t_o, t_c) -> dict[int, str]:
    kept: list[int] = []
    result: dict[int, str] = {}
    for j in range(len(q_o)):
        if len(r_o) and ((r_o @ q_o[j] >= t_o) | (r_c @ q_c[j] >= t_c)).any():
            result[j] = "stored"
        elif any(q_o[i] @ q_o[j] >= t_o or q_c[i] @ q_c[j] >= t_c for i in kept):
            result[j] = "batch"
        else:
            kept.append(j)
    return result


@pytest.mark.parametrize("block_size", [1, 5, 32, 1024])
def test_two_view_search_is_the_greedy_brute_force_at_any_block_size(block_size):
    rng = np.random.default_rng(6)
    base = _random_unit(rng, 60, 32)
    # noisy copies, some in chains, with cosines of about 0.8-0.99 around the thresholds
    near = unit(base[rng.integers(0, 60, size=40)] + rng.uniform(0.1, 0.8, (40, 1)) / np.sqrt(32)
                * rng.standard_normal((40, 32)))
    q_o = np.vstack([base, near])[rng.permutation(100)]
    q_c = unit(q_o + 0.3 / np.sqrt(32) * rng.standard_normal(q_o.shape))
    r_o = unit(np.vstack([q_o[:4] + 0.05 * rng.standard_normal((4, 32)),
                          rng.standard_normal((20, 32))]))
    r_c = r_o.copy()
    found = two_view_duplicates(q_o, q_c, r_o, r_c, 0.85, 0.9, block_size)
    expected = _brute_two_view(q_o, q_c, r_o, r_c, 0.85, 0.9)
    assert {m.index: m.against for m in found} == expected
    assert 10 < len(expected) < 100
    assert [m.index for m in found] == sorted(m.index for m in found)
    for m in found:
        ref = (r_o, r_c) if m.against == "stored" else (q_o, q_c)
        view = (q_o, q_c)[m.kind]
        assert m.similarity == pytest.approx(float(view[m.index] @ ref[m.kind][m.other]), abs=1e-5)
        if m.against == "batch":
            assert m.other < m.index and m.other not in expected  # points to a kept query


def test_two_view_first_of_a_group_survives_and_either_view_suffices():
    same = unit(np.ones((3, 8)))
    found = two_view_duplicates(same, same, same[:0], same[:0], 0.75, 0.9, 2)
    assert [(m.index, m.other, m.kind, m.against) for m in found] == [(1, 0, 0, "batch"),
                                                                     (2, 0, 0, "batch")]
    rng = np.random.default_rng(7)
    opening = _random_unit(rng, 2, 8)  # different openings, same whole conversation
    whole = unit(np.ones((2, 8)))
    found = two_view_duplicates(opening, whole, whole[:0], whole[:0], 0.99, 0.9, 1024)
    assert [(m.index, m.other, m.kind) for m in found] == [(1, 0, 1)]


def test_two_view_threshold_is_inclusive():
    q = unit(np.array([[1.0, 0.0], [0.6, 0.8]]))
    cosine = float((q @ q.T)[0, 1])
    far = unit(np.array([[-1.0, 0.0], [0.0, -1.0]]))
    for block_size in (1, 2):  # across blocks (kept set) and within a block
        at = two_view_duplicates(q, far, far[:0], far[:0], cosine, 1.0, block_size)
        assert [(m.index, m.other) for m in at] == [(1, 0)]
        assert two_view_duplicates(q, far, far[:0], far[:0], _above(cosine), 1.0,
                                   block_size) == []
    stored = two_view_duplicates(q[1:], far[1:], q[:1], far[:1], cosine, 1.0, 1)
    assert [(m.index, m.other, m.against) for m in stored] == [(0, 0, "stored")]
