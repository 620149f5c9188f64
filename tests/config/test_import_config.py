"""Reaction-log import config: the mapping file (every error names the file, the key and a fix;
the shipped tip_scores mapping loads) and the run's parameters (one source, a read-only query, a
PostgreSQL URL never echoed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.signals.import_config import (
    MAPPINGS_DIR,
    REACTIONS,
    ImportConfig,
    ImportConfigError,
    ImportMappingError,
    load_mapping,
)

ROOT = Path(__file__).resolve().parents[2]
CSV = ROOT / "tests" / "data" / "import" / "tip_scores.csv"
GOOD = {"name": "tips", "columns": {"user": "u", "prompt": "p", "response": "r", "action": "a",
                                    "dwell": "d", "timestamp": "t"}}


def _write(tmp_path: Path, mapping: object) -> Path:
    path = tmp_path / "mapping.yaml"
    path.write_text(mapping if isinstance(mapping, str) else yaml.safe_dump(mapping))
    return path


def _error(tmp_path: Path, mapping: object) -> str:
    path = _write(tmp_path, mapping)
    with pytest.raises(ImportMappingError) as exc:
        load_mapping(path)
    message = str(exc.value)
    assert message.startswith(f"mapping file {path}: ")
    return message


def test_the_shipped_tip_scores_mapping_loads():
    mapping = load_mapping("tip_scores")
    assert mapping.path == str(MAPPINGS_DIR / "tip_scores.yaml")
    assert mapping.columns.dwell == "dwell_ms" and mapping.dwell_unit == "ms"
    assert mapping.client_id == "import:tip_scores"
    assert mapping.reaction_of("Completed ") == "done"
    assert mapping.reaction_of("dismiss") == "dismiss"
    assert mapping.reaction_of("shown") is None
    assert mapping.key == ["user", "timestamp", "prompt"]
    assert len(mapping.content_hash) == 64


def test_defaults_of_a_minimal_mapping(tmp_path):
    mapping = load_mapping(_write(tmp_path, GOOD))
    assert (mapping.dwell_unit, mapping.timestamp_format, mapping.timezone) == ("ms", "iso8601",
                                                                                 "UTC")
    assert mapping.key == ["user", "timestamp", "prompt"] and mapping.model_name == "imported"


@pytest.mark.parametrize(("change", "expected"), [
    (lambda m: m["columns"].pop("dwell"),
     ["columns.dwell: missing", "e.g. dwell: dwell_ms"]),
    (lambda m: m.pop("columns"), ["columns: missing", "e.g. columns: {user: user_id"]),
    (lambda m: m.update(colums={}), ["colums: unknown key", "the keys here are name, columns"]),
    (lambda m: m["columns"].update(dwel="x"), ["columns.dwel: unknown key",
                                               "the keys here are user, prompt"]),
    (lambda m: m.update(dwell_unit="sec"), ["dwell_unit:", "'sec'", "e.g. dwell_unit: ms"]),
    (lambda m: m.update(timestamp_format="yyyy-mm-dd"),
     ["timestamp_format: 'yyyy-mm-dd' is neither iso8601", "e.g. timestamp_format: iso8601"]),
    (lambda m: m.update(timezone="Mars/Base"),
     ["timezone: unknown time zone 'Mars/Base'", "e.g. timezone: UTC"]),
    (lambda m: m.update(actions={"completed": "finished"}),
     ["actions: completed: 'finished' is not a reaction", "e.g. completed: done"]),
    (lambda m: m.update(key=["user", "when"]), ["key.1:", "'when'", "e.g. key: [user,"]),
    (lambda m: m.update(key=[]), ["key: must name distinct fields", "e.g. key: [user,"]),
    (lambda m: m.update(name="tip scores!"), ["name: 'tip scores!' is not", "e.g. name: "]),
    (lambda m: m.update(where={"source": []}), ["where: source: lists no value",
                                                "e.g. where: {source: [llm]}"]),
    (lambda m: m["columns"].update(user=3), ["columns.user:", "(got 3)",
                                             "e.g. user: user_id"]),
])
def test_a_bad_mapping_names_the_file_the_key_and_the_fix(tmp_path, change, expected):
    mapping = yaml.safe_load(yaml.safe_dump(GOOD))
    change(mapping)
    message = _error(tmp_path, mapping)
    for text in expected:
        assert text in message, message
    assert "\n" not in message


def test_every_problem_of_a_mapping_is_listed_at_once(tmp_path):
    mapping = yaml.safe_load(yaml.safe_dump(GOOD))
    del mapping["columns"]["user"], mapping["columns"]["action"]
    message = _error(tmp_path, mapping)
    assert "columns.user: missing" in message and "columns.action: missing" in message


@pytest.mark.parametrize(("content", "expected"), [
    ("name: [unclosed", "is not valid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping with name: and columns:"),
])
def test_a_mapping_file_that_is_not_a_yaml_mapping(tmp_path, content, expected):
    assert expected in _error(tmp_path, content)


def test_a_missing_mapping_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ImportMappingError, match=r"does not exist; use a shipped mapping "
                                                 r"\(tip_scores\)"):
        load_mapping("no_such_mapping")


def test_the_known_reactions_are_the_reaction_apis():
    from serving.reactions import REACTIONS as API_REACTIONS

    assert REACTIONS == API_REACTIONS


# ---- the run's parameters ----------------------------------------------------------------------
def test_a_file_import_knows_its_format_from_the_suffix():
    cfg = ImportConfig(mapping="tip_scores", file=str(CSV))
    assert cfg.source_format == "csv"
    assert cfg.reaction_mapping().name == "tip_scores"
    assert ImportConfig(mapping="tip_scores", file=str(CSV), format="jsonl").source_format == \
        "jsonl"


@pytest.mark.parametrize(("params", "expected"), [
    ({}, "give exactly one log to import (neither is set)"),
    ({"file": str(CSV), "sql": "SELECT 1"}, "give exactly one log to import (both are set)"),
    ({"file": "/nowhere/tips.csv"}, "file '/nowhere/tips.csv' does not exist"),
    ({"sql": "DELETE FROM tip_scores"}, "sql must be one read-only query starting with SELECT"),
    ({"sql": "SELECT 1", "format": "csv"}, "format applies to a file"),
    ({"file": str(CSV), "source_url": "postgresql://h/db"}, "source_url is where sql runs"),
    ({"file": str(CSV), "max_bad_rows": -1}, "max_bad_rows must be >= 0 (got -1)"),
    ({"mapping": ""}, "mapping is empty; name a mapping file, e.g. mapping: tip_scores"),
    ({"mapping": "nope"}, "mapping file"),
])
def test_bad_import_params_say_the_fix(params, expected):
    with pytest.raises(ImportConfigError) as exc:
        ImportConfig.from_params({"mapping": "tip_scores", **params})
    assert expected in str(exc.value)


def test_a_file_with_an_unknown_suffix_needs_a_format(tmp_path):
    log = tmp_path / "tips.txt"
    log.write_text("user_id\n")
    with pytest.raises(ImportConfigError, match="set format: csv or format: jsonl"):
        ImportConfig.from_params({"mapping": "tip_scores", "file": str(log)})
    assert ImportConfig(mapping="tip_scores", file=str(log), format="csv").source_format == "csv"


def test_a_source_url_that_is_not_postgres_is_refused_without_echoing_it():
    with pytest.raises(ImportConfigError) as exc:
        ImportConfig.from_params({"mapping": "tip_scores", "sql": "SELECT 1",
                                  "source_url": "mysql://reader:s3cret-pw@db/app"})
    assert "source_url must be a PostgreSQL URL" in str(exc.value)
    assert "s3cret-pw" not in str(exc.value)


def test_the_source_url_stays_out_of_the_configs_repr():
    cfg = ImportConfig(mapping="tip_scores", sql="SELECT 1",
                       source_url="postgresql://reader:s3cret-pw@db/app")
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in str(cfg.model_dump())
    assert cfg.source_url.get_secret_value().endswith("@db/app")
    assert cfg.source_format == "sql"
