"""Taxonomy sampling: shares track the weights, the cross product stays random, ids are stable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tasks.generate.taxonomy import (
    EDGE_CASE_DIMENSION,
    NO_EDGE_CASE,
    CellPlan,
    TaxonomyError,
    coverage_report,
    load_taxonomy,
    max_coverage_gap,
    stratified_indices,
)

DRAWS = 10_000
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.fixture(scope="module")
def cells(taxonomy) -> list[dict[str, str]]:
    plan = CellPlan(taxonomy, DRAWS, seed=7)
    return [plan.cell(i) for i in range(DRAWS)]


def _shares(cells: list[dict[str, str]], dimension: str) -> dict[str, float]:
    counts = Counter(cell[dimension] for cell in cells)
    return {value: count / len(cells) for value, count in counts.items()}


def test_every_dimension_matches_its_weights_over_10k_draws(taxonomy, cells):
    targets = taxonomy.targets()
    for dimension in taxonomy.dimensions:
        shares = _shares(cells, dimension)
        for value, target in targets[dimension].items():
            assert shares.get(value, 0.0) == pytest.approx(target, abs=TOLERANCE), (dimension, value)


def test_edge_cases_take_about_15_percent_split_by_category_weight(taxonomy, cells):
    shares = _shares(cells, EDGE_CASE_DIMENSION)
    assert 1.0 - shares[NO_EDGE_CASE] == pytest.approx(0.15, abs=TOLERANCE)
    # safety_crisis weighs 0.20 of the edge-case weight: 3% of all conversations
    assert shares["safety_crisis"] == pytest.approx(0.15 * 0.20, abs=0.005)
    assert set(shares) == {NO_EDGE_CASE, *taxonomy.edge_cases.categories}


def test_edge_case_share_can_be_overridden(taxonomy):
    plan = CellPlan(taxonomy, 2000, seed=1, edge_case_share=0.4)
    edge = sum(plan.cell(i)[EDGE_CASE_DIMENSION] != NO_EDGE_CASE for i in range(2000))
    assert edge / 2000 == pytest.approx(0.4, abs=0.001)


def test_subtopics_belong_to_their_topic_and_are_used_evenly(taxonomy, cells):
    for cell in cells[:500]:
        assert cell["subtopic"] in taxonomy.dimensions["topic"].values[cell["topic"]].subtopics
    work = Counter(c["subtopic"] for c in cells if c["topic"] == "work_career")
    assert max(work.values()) - min(work.values()) <= 1


def test_dimensions_are_sampled_independently_as_a_cross_product(cells):
    """Joint shares ≈ product of marginals: stratifying each dimension does not couple them."""
    n = len(cells)
    topic, tone = Counter(c["topic"] for c in cells), Counter(c["tone"] for c in cells)
    joint = Counter((c["topic"], c["tone"]) for c in cells)
    for (t, s), count in joint.items():
        expected = topic[t] / n * tone[s] / n
        assert count / n == pytest.approx(expected, abs=0.01)
    edge = Counter((c["difficulty"], c[EDGE_CASE_DIMENSION] != NO_EDGE_CASE) for c in cells)
    for difficulty in ("easy", "medium", "hard"):
        total = edge[(difficulty, True)] + edge[(difficulty, False)]
        assert edge[(difficulty, True)] / total == pytest.approx(0.15, abs=0.03)


def test_small_batches_hit_every_share_within_one_item(taxonomy):
    plan = CellPlan(taxonomy, 40, seed=3)
    report = coverage_report(taxonomy.targets(), [plan.cell(i) for i in range(40)])
    for dimension in taxonomy.dimensions:
        for value in report[dimension].values():
            assert abs(value["count"] - value["target"] * 40) < 1.0 + 1e-9, (dimension, value)


def test_cells_are_deterministic_per_seed_and_index(taxonomy):
    a, b = CellPlan(taxonomy, 300, seed=11), CellPlan(taxonomy, 300, seed=11)
    other = CellPlan(taxonomy, 300, seed=12)
    assert [a.cell(i) for i in range(300)] == [b.cell(i) for i in range(300)]
    assert [a.cell(i) for i in range(300)] != [other.cell(i) for i in range(300)]


def test_stratified_indices_counts_are_floor_or_ceil_of_expectation():
    weights = [0.5, 0.3, 0.2]
    for seed in range(20):
        counts = np.bincount(stratified_indices(weights, 37, seed), minlength=3)
        expected = np.array(weights) * 37
        assert np.all(np.abs(counts - expected) < 1.0)


def test_coverage_report_gives_target_achieved_and_count():
    report = coverage_report({"tone": {"calm": 0.5, "angry": 0.5}},
                             [{"tone": "calm"}, {"tone": "calm"}, {"tone": "calm"},
                              {"tone": "angry"}])
    assert report["tone"]["calm"] == {"target": 0.5, "achieved": 0.75, "count": 3}
    assert max_coverage_gap(report) == 0.25


def test_coverage_report_lists_unplanned_values_with_target_zero():
    report = coverage_report({"tone": {"calm": 1.0}}, [{"tone": "calm"}, {"tone": "odd"}])
    assert report["tone"]["odd"] == {"target": 0.0, "achieved": 0.5, "count": 1}


def test_invalid_weight_names_the_field_and_the_fix(tmp_path: Path):
    path = tmp_path / "taxonomy.yaml"
    path.write_text(
        "dimensions:\n  tone:\n    group: how\n    values:\n      calm: {weight: -1}\n"
        "edge_cases:\n  categories:\n    abuse: {weight: 1, description: rude}\n"
    )
    with pytest.raises(TaxonomyError, match=r"dimensions.tone.values.calm.weight.*e.g. weight: 0.2"):
        load_taxonomy(path)


def test_an_unquoted_comma_in_yaml_is_caught_not_silently_dropped(tmp_path: Path):
    path = tmp_path / "taxonomy.yaml"
    path.write_text(
        "dimensions:\n  tone:\n    group: how\n    values:\n"
        "      anxious: {weight: 1, description: worried, a little rushed}\n"
        "edge_cases:\n  categories:\n    abuse: {weight: 1, description: rude}\n"
    )
    with pytest.raises(TaxonomyError, match="a little rushed"):
        load_taxonomy(path)


def test_missing_file_says_where_the_default_lives(tmp_path: Path):
    with pytest.raises(TaxonomyError, match="include/rubrics/taxonomy.yaml"):
        load_taxonomy(tmp_path / "nope.yaml")
