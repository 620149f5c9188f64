"""Rubric YAML validation: the shipped rubric is well formed; broken ones fail with the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tasks.judge.rubric import DEFAULT_RUBRIC_PATH, RubricError, load_rubric, rubric_from_dict

RAW = yaml.safe_load(DEFAULT_RUBRIC_PATH.read_text())


def _broken(edit) -> dict:
    data = copy.deepcopy(RAW)
    edit(data)
    return data


def test_shipped_rubric_follows_seed_001_structure():
    rubric = load_rubric()
    assert rubric.pass_threshold == pytest.approx(0.80)
    assert sum(c.weight for c in rubric.categories.values()) == pytest.approx(1.0)
    assert set(rubric.criterion_ids()) == set(rubric.criteria)
    assert rubric.safety_gates and set(rubric.safety_gates) <= set(rubric.criteria)
    for cid, criterion in rubric.criteria.items():
        kinds = [ex.type for ex in criterion.calibration_examples]
        assert 3 <= len(kinds) <= 8, cid
        assert "PASS" in kinds and "FAIL" in kinds, cid
    assert any(c.na_valid for c in rubric.criteria.values())
    assert any(not c.na_valid for c in rubric.criteria.values())


def test_version_is_a_content_hash_ignoring_comments_and_layout(tmp_path: Path):
    text = DEFAULT_RUBRIC_PATH.read_text()
    reformatted = tmp_path / "rubric.yaml"
    reformatted.write_text("# a new comment\n" + yaml.safe_dump(RAW, sort_keys=True))
    assert load_rubric(reformatted).version == load_rubric().version
    changed = tmp_path / "changed.yaml"
    changed.write_text(text.replace("pass_threshold: 0.80", "pass_threshold: 0.85"))
    assert load_rubric(changed).version != load_rubric().version


def test_weights_that_do_not_sum_to_one_say_how_to_fix_them():
    data = _broken(lambda d: d["categories"]["safety"].update(weight=0.5))
    with pytest.raises(RubricError, match=r"sum to 1\.3000; they must sum to 1\.0 .*scale"):
        rubric_from_dict(data)


def test_too_few_calibration_examples_are_rejected():
    data = _broken(lambda d: d["criteria"]["CQ1"].update(
        calibration_examples=d["criteria"]["CQ1"]["calibration_examples"][:2]))
    with pytest.raises(RubricError, match="has 2 calibration examples; give 3-8"):
        rubric_from_dict(data)


def test_calibration_needs_a_pass_and_a_fail_example():
    def only_pass(d):
        for ex in d["criteria"]["HP1"]["calibration_examples"]:
            ex["type"] = "PASS"
    with pytest.raises(RubricError, match="at least one PASS and one FAIL"):
        rubric_from_dict(_broken(only_pass))


def test_na_example_on_a_criterion_without_na_valid_is_rejected():
    def na_example(d):
        d["criteria"]["CQ1"]["calibration_examples"][0]["type"] = "NA"
    with pytest.raises(RubricError, match="set na_valid: true"):
        rubric_from_dict(_broken(na_example))


def test_category_naming_an_undefined_criterion_is_rejected():
    data = _broken(lambda d: d["categories"]["comprehension"]["criteria"].append("XX9"))
    with pytest.raises(RubricError, match="criterion 'XX9' which is not defined"):
        rubric_from_dict(data)


def test_criterion_outside_every_category_is_rejected():
    data = _broken(lambda d: d["categories"]["comprehension"]["criteria"].remove("CQ2"))
    with pytest.raises(RubricError, match=r"criteria \['CQ2'\] belong to no category"):
        rubric_from_dict(data)


def test_unknown_safety_gate_is_rejected():
    data = _broken(lambda d: d["safety_gates"].append("SF9"))
    with pytest.raises(RubricError, match=r"safety_gates \['SF9'\] are not defined"):
        rubric_from_dict(data)


def test_missing_rubric_file_names_the_expected_location(tmp_path: Path):
    with pytest.raises(RubricError, match="file not found"):
        load_rubric(tmp_path / "nope.yaml")
