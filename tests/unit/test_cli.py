"""`tuneloop` (tasks/cli/): every subcommand's help, one-line errors for bad flag values, the
wiring from flags to the stage functions and configs the DAGs use, the DAG Param defaults, and a
real run of `migrate` + `build-reaction-dataset` against the test Postgres."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.cli import build_parser, main
from tasks.cli.common import params_of

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["migrate", "generate", "tag", "curate", "import-reactions", "build-reaction-dataset",
            "forget",
            "retention", "scrub", "train", "evaluate", "register", "shadow-deploy",
            "shadow-compare", "adapters", "serve-model", "serve-router", "demo", "secrets"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _summary(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {out!r}"
    return json.loads(lines[0])


# ---- help ---------------------------------------------------------------------------------------

def test_the_parser_has_exactly_the_documented_commands():
    commands = build_parser().get_default("commands")
    assert list(commands) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_exits_0_with_examples(command, capsys):
    code, out, _ = _run([command, "--help"], capsys)
    assert code == 0
    assert f"tuneloop {command}" in out
    assert "examples:" in out
    examples = out.split("examples:", 1)[1]
    assert f"tuneloop {command}" in examples


def test_top_level_help_lists_every_command_and_the_exit_status(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:
        assert command in out
    assert "exit status:" in out and "examples:" in out


def test_help_imports_no_stage_and_no_heavy_library():
    probe = ("import sys; from tasks.cli import build_parser; build_parser(); "
             "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    loaded = set(out.split())
    # tasks.core.settings (pydantic-settings) gives the default ports; nothing heavier loads
    heavy = {"sqlalchemy", "torch", "transformers", "mlflow", "numpy", "airflow", "tqdm",
             "httpx", "yaml"}
    stages = {f"tasks.{s}" for s in ("generate", "tag", "judge", "curate", "signals", "train",
                                     "register", "evaluate", "shadow", "datasets", "demo")}
    assert not (heavy | stages) & loaded


# ---- bad flag values ----------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    (["curate", "--val-fraction", "2"],
     ["--val-fraction", "val_fraction must be within [0, 0.5) (got 2.0)", "set val_fraction: 0.1"]),
    (["curate", "--max-hallucination", "3", "--min-rows", "0"],
     ["--max-hallucination", "max_hallucination must be within [0, 1]", "--min-rows",
      "set min_rows: 10"]),
    (["tag", "--taggers", "emotion,sentiment"],
     ["--taggers", "unknown taggers ['sentiment']", "use some of emotion"]),
    (["tag", "--retries", "0"], ["--retries", "retries must be >= 1", "e.g. 3"]),
    (["build-reaction-dataset", "--min-negative", "-1"],
     ["--min-negative", "min_negative must be >= 0", "set min_negative: 500"]),
    (["build-reaction-dataset", "--done-min-ms", "200000"],
     ["--done-min-ms", "--done-max-ms", "done_min_ms (200000) > done_max_ms"]),
    (["build-reaction-dataset", "--max-examples-per-user", "-1"],
     ["--max-examples-per-user", "max_examples_per_user must be >= 0",
      "set max_examples_per_user: 50"]),
    (["import-reactions", "--file", "tips.csv"],
     ["--mapping", "mapping is empty", "e.g. mapping: tip_scores"]),
    (["import-reactions", "--mapping", "tip_scores"],
     ["--file, --sql", "give exactly one log to import (neither is set)"]),
    (["import-reactions", "--mapping", "tip_scores", "--sql", "SELECT 1", "--allow-bad", "-1"],
     ["--allow-bad", "max_bad_rows must be >= 0", "set max_bad_rows: 10"]),
    (["import-reactions", "--mapping", "no_such_mapping", "--sql", "SELECT 1"],
     ["--mapping", "no_such_mapping.yaml: does not exist", "use a shipped mapping (tip_scores)"]),
    (["import-reactions", "--mapping", "tip_scores", "--sql", "DROP TABLE tip_scores"],
     ["--sql", "read-only query starting with SELECT", "e.g. sql: SELECT * FROM tip_scores"]),
    (["train", "--lora-r", "0"], ["--lora-r", "lora_r must be > 0", "set lora_r: 16"]),
    (["train", "--learning-rate", "-1"], ["--learning-rate", "set learning_rate: 2e-4"]),
    (["shadow-compare", "--alpha", "0.9"], ["--alpha", "within (0, 0.5]", "set alpha: 0.05"]),
    (["shadow-compare", "--min-samples", "0"], ["--min-samples", "set min_samples: 100"]),
    (["shadow-deploy", "--share", "0"], ["--share", "for canary", "set share: 0.05"]),
])
def test_a_bad_flag_value_exits_2_with_one_line_naming_the_flag_and_the_fix(argv, expected,
                                                                             capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"tuneloop {argv[0]}: error: ")
    for text in expected:
        assert text in line


def test_argparse_rejects_wrong_types_and_unknown_flags_with_exit_2(capsys):
    code, _, err = _run(["curate", "--val-fraction", "lots"], capsys)
    assert code == 2 and "argument --val-fraction: invalid float value: 'lots'" in err
    code, _, err = _run(["curate", "--bogus", "1"], capsys)
    assert code == 2 and "tuneloop curate: error: unrecognized arguments: --bogus 1" in err
    code, _, err = _run(["evaluate", "--max-scenarios", "0"], capsys)
    assert code == 2 and "argument --max-scenarios: must be >= 1" in err


# ---- wiring: flags → the stage function and the config the DAG builds -------------------------

class Recorder:
    """Replaces stage functions by recorders: `of[name]` = [(args, kwargs), ...]."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.of: dict[str, list] = {}

    def patch(self, module: str, name: str, result=None, *, raises: Exception | None = None):
        import importlib

        def fake(*args, **kwargs):
            self.of.setdefault(name, []).append((args, kwargs))
            if raises is not None:
                raise raises
            return result

        self.monkeypatch.setattr(importlib.import_module(module), name, fake)


@pytest.fixture()
def calls(monkeypatch) -> Recorder:
    return Recorder(monkeypatch)


def test_tag_builds_the_dags_tagging_config(calls, capsys, tmp_path):
    from tasks.tag.config import TaggingConfig

    calls.patch("tasks.tag.stage", "run_tagging", {"shards": 1, "run": {}, "stats": {}})
    code, out, _ = _run(["tag", "--taggers", "emotion,topic", "--classifier-backend", "llm",
                         "--judges", "none", "--batch-id", "b-1", "--judge-policy", "either",
                         "--shard-size", "7"], capsys)
    assert code == 0
    assert _summary(out) == {"shards": 1, "run": {}, "stats": {}}
    (cfg,), kwargs = calls.of["run_tagging"][0]
    assert cfg == TaggingConfig.from_params({
        "taggers": ["emotion", "topic"], "classifier_backend": "llm", "retries": 3,
        "judges": [], "judge_policy": "either", "batch_id": "b-1", "shard_size": 7})
    assert cfg.backends == {"emotion": "llm", "topic": "llm", "temporal": "llm"}
    assert cfg.batch_ids == ["b-1"] and cfg.policy == "either" and cfg.judges == []
    assert kwargs["out_dir"].parts[-2:] == ("reports", "tagging")


def test_curate_passes_the_dag_defaults_and_exits_1_when_the_gate_fails(calls, capsys):
    from tasks.curate.config import CurationConfig

    result = {"dataset_id": "ds-1", "gate_passed": True, "failed_expectations": []}
    calls.patch("tasks.curate.stage", "curate", result)
    code, out, _ = _run(["curate", "--val-fraction", "0.2", "--min-rows", "5"], capsys)
    assert code == 0 and _summary(out) == result
    (cfg,), _ = calls.of["curate"][0]
    assert isinstance(cfg, CurationConfig)
    # the DAG's Param defaults, not the config class's (which requires a rubric pass)
    assert cfg.require_rubric_pass is False and cfg.min_emotion_confidence == 0.0
    assert cfg.val_fraction == 0.2 and cfg.min_rows == 5 and cfg.batch_id is None

    failed = {**result, "gate_passed": False, "failed_expectations": ["min_rows"]}
    calls.patch("tasks.curate.stage", "curate", failed)
    code, out, _ = _run(["curate", "--require-rubric-pass"], capsys)
    assert code == 1 and _summary(out)["gate_passed"] is False
    assert calls.of["curate"][-1][0][0].require_rubric_pass is True


def test_build_reaction_dataset_passes_the_signal_config_and_exits_3_when_skipped(calls, capsys):
    skipped = {"built": False, "gate_passed": False, "reason": "not enough reaction signals"}
    calls.patch("tasks.signals.stage", "build_reaction_dataset_or_skip", skipped)
    code, out, _ = _run(["build-reaction-dataset", "--min-positive", "50", "--min-negative", "40",
                         "--dismiss-max-ms", "3000"], capsys)
    assert code == 3 and _summary(out) == skipped
    (cfg,), _ = calls.of["build_reaction_dataset_or_skip"][0]
    assert (cfg.min_positive, cfg.min_negative, cfg.dismiss_max_ms) == (50, 40, 3000)
    assert (cfg.done_min_ms, cfg.done_max_ms) == (15000, 120000)

    built = {"built": True, "gate_passed": True, "dataset_id": "ds-r"}
    calls.patch("tasks.signals.stage", "build_reaction_dataset_or_skip", built)
    code, out, _ = _run(["build-reaction-dataset"], capsys)
    assert code == 0 and _summary(out)["dataset_id"] == "ds-r"


def test_build_reaction_dataset_passes_the_per_user_cap(calls, capsys):
    calls.patch("tasks.signals.stage", "build_reaction_dataset_or_skip",
                {"built": True, "gate_passed": True, "dataset_id": "ds-r"})
    code, _, _ = _run(["build-reaction-dataset", "--max-examples-per-user", "7"], capsys)
    assert code == 0
    (cfg,), _ = calls.of["build_reaction_dataset_or_skip"][0]
    assert cfg.max_examples_per_user == 7


TIPS_CSV = str(ROOT / "tests" / "data" / "import" / "tip_scores.csv")


def test_import_reactions_passes_the_import_config(calls, capsys):
    imported = {"imported": True, "rows": 6, "interactions_inserted": 5}
    calls.patch("tasks.signals.importing", "import_reactions", imported)
    code, out, _ = _run(["import-reactions", "--mapping", "tip_scores", "--file", TIPS_CSV,
                         "--allow-bad", "3", "--dry-run"], capsys)
    assert code == 0 and _summary(out) == imported
    (cfg,), kwargs = calls.of["import_reactions"][0]
    assert (cfg.mapping, cfg.file, cfg.max_bad_rows, cfg.dry_run) == (
        "tip_scores", TIPS_CSV, 3, True)
    assert cfg.source_format == "csv" and "progress" in kwargs


def test_a_rejected_import_exits_1_with_the_report_on_stdout_and_one_line_on_stderr(
        calls, capsys):
    from tasks.signals.importing import ImportRejected

    report = {"imported": False, "bad": 2, "bad_rows": [{"line": 3, "reason": "x"}]}
    calls.patch("tasks.signals.importing", "import_reactions",
                raises=ImportRejected("2 bad row(s) in tips.csv; nothing was imported", report))
    code, out, err = _run(["import-reactions", "--mapping", "tip_scores", "--file", TIPS_CSV],
                          capsys)
    assert code == 1 and _summary(out) == report
    assert err.strip().splitlines()[-1] == ("tuneloop import-reactions: error: 2 bad row(s) in "
                                            "tips.csv; nothing was imported")


ERASED = {"user_hash": "ab" * 32, "reactions_deleted": 2, "interactions_erased": 3,
          "snapshots": [{"dataset_id": "ds-9", "name": "reactions", "kind": "reaction",
                         "artifact_uri": "file:///data/datasets/ds-9", "items": 4}],
          "requested_at": "2026-12-07T00:00:00+00:00", "totals": {}}


def test_forget_calls_forget_user_or_forget_user_hash_and_lists_the_snapshots(calls, capsys):
    calls.patch("tasks.signals.erasure", "forget_user", ERASED)
    calls.patch("tasks.signals.erasure", "forget_user_hash", ERASED)
    code, out, err = _run(["forget", "--user", "alice@example.com"], capsys)
    assert code == 0 and _summary(out) == ERASED
    assert calls.of["forget_user"] == [(("alice@example.com",), {})]
    assert "ds-9  reactions (reaction, 4 items of theirs)  file:///data/datasets/ds-9" in err
    code, out, _ = _run(["forget", "--user-hash", "ab" * 32], capsys)
    assert code == 0 and calls.of["forget_user_hash"] == [(("ab" * 32,), {})]


def test_retention_passes_days_and_refuses_without_a_period(calls, capsys, monkeypatch):
    from tasks.core.settings import get_settings

    calls.patch("tasks.signals.erasure", "purge_expired_text", {"interactions_purged": 0})
    code, out, _ = _run(["retention", "--days", "45"], capsys)
    assert code == 0 and calls.of["purge_expired_text"] == [((45,), {})]
    monkeypatch.delenv("TUNELOOP_RETENTION_DAYS", raising=False)
    get_settings.cache_clear()
    try:
        code, out, err = _run(["retention"], capsys)
    finally:
        get_settings.cache_clear()
    assert code == 2 and out == ""
    assert "no retention period: pass --days N" in err


def _patch_training(calls, backend: str = "local"):
    dataset = {"dataset_id": "ds-1", "train_path": "t.jsonl", "val_path": "v.jsonl"}
    prepared = {"backend": backend, "run_key": "rk", "run_dir": "/runs/rk", "dataset": dataset,
                "host_config_dir": "/runs/rk/container/config",
                "host_output_dir": "/runs/rk/container/output",
                "container_config_path": "/config/axolotl.yaml"}
    trained = {"adapter_dir": "/runs/rk/output/adapter", "metrics": {"train_loss": 1.5}}
    calls.patch("tasks.train.stage", "resolve_dataset", dataset)
    calls.patch("tasks.train.stage", "prepare_training", prepared)
    calls.patch("tasks.train.stage", "run_local_training", trained)
    calls.patch("tasks.train.stage", "collect_training", trained)
    calls.patch("tasks.register.stage", "register_training", {"version": "4"})
    return dataset, prepared, trained


def test_train_chains_resolve_prepare_train_collect_and_register(calls, capsys):
    dataset, prepared, trained = _patch_training(calls)
    code, out, _ = _run(["train", "--dataset-id", "ds-1", "--max-steps", "3", "--lora-r", "8",
                         "--backend", "local"], capsys)
    assert code == 0
    assert calls.of["resolve_dataset"][0][0] == ("ds-1",)
    (got_dataset, params), _ = calls.of["prepare_training"][0]
    assert got_dataset == dataset
    assert params == {"dataset_id": "ds-1", "base_model": "smollm2-135m-instruct",
                      "num_epochs": 1, "max_steps": 3, "learning_rate": 2e-4, "lora_r": 8,
                      "backend": "local"}
    assert calls.of["run_local_training"][0][0] == (prepared,)
    assert calls.of["register_training"][0][0] == (prepared, trained)
    summary = _summary(out)
    assert summary["status"] == "registered" and summary["registered"] == {"version": "4"}
    assert summary["metrics"] == {"train_loss": 1.5}


def test_train_no_register_and_empty_dataset_id(calls, capsys):
    _patch_training(calls)
    code, out, _ = _run(["train", "--no-register"], capsys)
    assert code == 0
    assert calls.of["resolve_dataset"][0][0] == (None,)  # latest gated dataset, as the DAG
    assert "register_training" not in calls.of
    assert _summary(out)["status"] == "trained" and _summary(out)["registered"] is None


def test_train_with_a_container_backend_prepares_and_exits_3_until_the_trainer_ran(calls, capsys):
    from tasks.train.config import TrainingError

    _patch_training(calls, backend="docker")
    calls.patch("tasks.train.stage", "collect_training",
                   raises=TrainingError("no trainer_state.json under /runs/rk/output"))
    code, out, err = _run(["train", "--backend", "docker"], capsys)
    assert code == 3
    assert "run_local_training" not in calls.of and "register_training" not in calls.of
    summary = _summary(out)
    assert summary["status"] == "prepared"
    assert "docker run" in summary["next"] and "/runs/rk/container/config:/config:ro" in \
        summary["next"]
    assert "rerun this command" in err


def test_a_stage_refusal_exits_1_with_its_message_on_one_line(calls, capsys):
    from tasks.train.stage import DatasetNotTrainable

    calls.patch("tasks.train.stage", "resolve_dataset",
                   raises=DatasetNotTrainable("no dataset has passed its gate yet; run "
                                              "curate_dataset first"))
    code, out, err = _run(["train"], capsys)
    assert code == 1 and out == ""
    assert err.strip() == ("tuneloop train: error: no dataset has passed its gate yet; run "
                           "curate_dataset first")


def test_evaluate_calls_evaluate_version_with_the_flags(calls, capsys):
    result = {"version": "3", "metrics": {"eval.win_rate": 0.5}}
    calls.patch("tasks.evaluate.stage", "evaluate_version", result)
    code, out, _ = _run(["evaluate", "--version", "3", "--val-path", "v.jsonl",
                         "--model-name", "m", "--max-scenarios", "2"], capsys)
    assert code == 0 and _summary(out) == result
    (version,), kwargs = calls.of["evaluate_version"][0]
    assert version == "3"
    assert kwargs["val_path"] == "v.jsonl" and kwargs["model_name"] == "m"
    assert kwargs["max_scenarios"] == 2 and "max_val_rows" not in kwargs
    assert kwargs["out_dir"].parts[-3:] == ("reports", "model-cards", "m-v3")


def test_shadow_deploy_calls_deploy_challenger(calls, capsys):
    calls.patch("tasks.shadow.stage", "deploy_challenger", {"deployment_id": "dep-1"})
    calls.patch("tasks.register.registry", "ensure_champion", {"version": "1"})
    calls.patch("tasks.register.registry", "get_version_info",
                   {"tags": {"base_model": "smollm2-135m-instruct"}})
    code, out, _ = _run(["shadow-deploy", "--version", "3", "--mode", "mirror", "--share", "1",
                         "--model-name", "m"], capsys)
    assert code == 0
    assert _summary(out) == {"deployment_id": "dep-1", "champion": {"version": "1"}}
    assert calls.of["ensure_champion"][0] == (("m",), {"base_model": "smollm2-135m-instruct"})
    assert calls.of["deploy_challenger"][0] == (("3",), {
        "champion_version": None, "mode": "mirror", "share": 1.0, "model_name": "m",
        "materialize": True})

    code, _, _ = _run(["shadow-deploy", "--version", "3", "--champion-version", "2",
                       "--no-materialize"], capsys)
    assert code == 0 and len(calls.of["ensure_champion"]) == 1  # a pinned champion: no base needed
    _, kwargs = calls.of["deploy_challenger"][1]
    assert kwargs["champion_version"] == "2" and kwargs["materialize"] is False
    assert (kwargs["mode"], kwargs["share"]) == ("canary", 0.05)


def test_shadow_compare_calls_compare_and_report_then_apply_decision(calls, capsys):
    report = {"deployment_id": "dep-1", "decision": "promote", "reasons": ["better"],
              "report_uri": "file:///r.html", "details": "left out of the summary"}
    calls.patch("tasks.shadow.stage", "compare_and_report", report)
    calls.patch("tasks.shadow.stage", "apply_decision", {"applied": True})
    code, out, err = _run(["shadow-compare", "--min-samples", "20", "--alpha", "0.1",
                           "--apply"], capsys)
    assert code == 0
    assert calls.of["compare_and_report"][0] == ((), {"deployment_id": None, "min_samples": 20,
                                                  "alpha": 0.1, "judge": True})
    assert calls.of["apply_decision"][0] == ((report,), {"enabled": True})
    summary = _summary(out)
    assert summary["decision"] == "promote" and summary["applied"] == {"applied": True}
    assert "details" not in summary and "file:///r.html" in err

    code, _, _ = _run(["shadow-compare", "--deployment-id", "dep-2", "--no-judge"], capsys)
    assert code == 0
    assert calls.of["compare_and_report"][1][1]["deployment_id"] == "dep-2"
    assert calls.of["compare_and_report"][1][1]["judge"] is False
    assert calls.of["apply_decision"][1] == ((report,), {"enabled": False})  # as the DAG's default


def test_generate_forwards_its_flags_to_tasks_generate(calls, capsys):
    calls.patch("tasks.generate.__main__", "main", 0)
    code, _, _ = _run(["generate", "--count", "3", "--turns", "1", "--preview", "2"], capsys)
    assert code == 0
    assert calls.of["main"][0] == ((["--count", "3", "--turns", "1", "--preview", "2"],),
                                {"prog": "tuneloop generate"})


# ---- the DAGs' Param defaults are the flags' defaults -------------------------------------------

@pytest.fixture(scope="module")
def dag_params():
    plugins = str(ROOT / "plugins")
    if plugins not in sys.path:
        sys.path.insert(0, plugins)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return {dag_id: {k: dag.params[k] for k in dag.params} for dag_id, dag in bag.dags.items()}


@pytest.mark.parametrize(("command", "dag_id", "renamed", "excluded"), [
    ("tag", "tag_conversations", {}, ()),
    ("curate", "curate_dataset", {}, ("val_fraction",)),
    ("build-reaction-dataset", "build_reaction_dataset", {}, ()),
    # The CLI's --source-url is the DAG's source_conn_id, resolved through Airflow.
    ("import-reactions", "import_reactions", {}, ("source_url",)),
    ("train", "train_and_register", {}, ("backend",)),  # the CLI's: TUNELOOP_TRAINER_BACKEND
    ("shadow-deploy", "train_and_register", {"mode": "shadow_mode", "share": "shadow_share"}, ()),
    ("shadow-compare", "shadow_compare", {}, ()),
])
def test_flag_defaults_are_the_dag_param_defaults(command, dag_id, renamed, excluded, dag_params):
    cli = params_of(build_parser().parse_args([command]))
    dag = dag_params[dag_id]
    for field, value in cli.items():
        if field in excluded:
            continue
        assert dag[renamed.get(field, field)] == value, (command, field)


# ---- a real run against the test Postgres -------------------------------------------------------

def test_migrate_then_build_reaction_dataset_on_an_empty_database_is_a_clear_skip(make_database):
    url = make_database("tuneloop_cli")
    script = Path(sys.executable).parent / "tuneloop"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "tasks.cli"]
    env = {**os.environ, "DATABASE_URL": url}

    def tuneloop(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*argv, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=300)

    before = tuneloop("build-reaction-dataset")
    assert before.returncode == 1 and before.stdout == ""
    assert "run `tuneloop migrate` first" in before.stderr and "Traceback" not in before.stderr

    migrated = tuneloop("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "schema is up to date" in migrated.stdout

    built = tuneloop("build-reaction-dataset", "--min-positive", "5", "--min-negative", "5")
    assert built.returncode == 3, built.stderr
    summary = _summary(built.stdout)
    assert summary["built"] is False
    assert (summary["positive"], summary["negative"]) == (0, 0)
    assert (summary["min_positive"], summary["min_negative"]) == (5, 5)
    assert "not enough reaction signals" in summary["reason"]
    assert "not enough reaction signals" in built.stderr  # the log line, on stderr


def test_train_backend_choices_are_the_train_stage_backends():
    from tasks.cli.model import BACKENDS
    from tasks.train.stage import BACKENDS as STAGE_BACKENDS

    assert BACKENDS == STAGE_BACKENDS
