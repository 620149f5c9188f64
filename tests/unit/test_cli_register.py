"""`tuneloop register` and the signature column of `tuneloop adapters` (tasks/cli/model.py,
tasks/cli/services.py), on the local sqlite MLflow store of tests/unit/register/test_signing.py:
a version registered before signing shows as not signed, with the reason and the command that
re-signs it, and `tuneloop register RUN_ID --alias ""` makes it signed."""

from __future__ import annotations

import json

from tasks.core.signing import SIGNATURE_TAG
from tests.unit.register import test_signing as signing
from tests.unit.test_cli import _run, _summary

# The signing tests' fixtures: a sqlite MLflow store with the signing key set, a fresh model
# name per test, a training-like run with lineage tags and an `adapter/` artifact.
store = signing.store
model_name = signing.model_name
adapter_run = signing.adapter_run

UNSIGNED = f"no {SIGNATURE_TAG} tag (not registered by tuneloop)"


def _adapters(capsys, model_name: str) -> list[dict]:
    code, out, err = _run(["adapters", "--model-name", model_name, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def _register_unsigned(run_id: str, model_name: str) -> str:
    """A version as tuneloop registered it before signing: lineage tags, no signature."""
    from tasks.register.tracking import get_client

    client = get_client()
    client.create_registered_model(model_name)
    run = client.get_run(run_id)
    version = client.create_model_version(
        model_name, source=f"{run.info.artifact_uri.rstrip('/')}/adapter", run_id=run_id,
        tags={"dataset_id": "ds-signed", "dataset_hash": "f" * 64, "gate_passed": "true",
              "is_base": "false", "tuneloop.run_id": run_id})
    return str(version.version)


def test_an_old_unsigned_version_shows_unsigned_until_tuneloop_register_re_signs_it(
        adapter_run, model_name, capsys):
    version = _register_unsigned(adapter_run, model_name)
    [row] = _adapters(capsys, model_name)
    assert (row["version"], row["signed"], row["signature_problem"]) == (version, False, UNSIGNED)

    code, out, err = _run(["register", adapter_run, "--alias", "", "--model-name", model_name],
                          capsys)
    assert code == 0, err
    summary = _summary(out)
    assert (summary["version"], summary["created"], summary["alias"]) == (version, False, "")
    assert (summary["signed"], summary["signature_problem"]) == (True, None)

    [row] = _adapters(capsys, model_name)
    assert (row["version"], row["signed"], row["signature_problem"]) == (version, True, None)
    assert row["aliases"] == []  # --alias "" moved none


def test_the_adapters_table_names_each_unsigned_version_and_the_command_that_re_signs_it(
        adapter_run, model_name, capsys):
    from tasks.register.registry import register_version

    unsigned = _register_unsigned(adapter_run, model_name)
    code, out, _ = _run(["adapters", "--model-name", model_name], capsys)
    assert code == 0
    header, dashes, row = out.splitlines()[:3]
    assert header.endswith("  signed") and dashes.endswith("  ------") and row.endswith("  NO")
    assert (f"version {unsigned}: {UNSIGNED}; if it is yours, re-sign it: tuneloop register "
            f'{adapter_run} --alias ""') in out

    register_version(adapter_run, model_name=model_name, alias="")
    code, out, _ = _run(["adapters", "--model-name", model_name], capsys)
    assert out.splitlines()[2].endswith("  yes") and "not signed" not in out


def test_register_points_the_challenger_alias_by_default(adapter_run, model_name, capsys):
    from tasks.register.registry import get_alias_version

    code, out, err = _run(["register", adapter_run, "--model-name", model_name], capsys)
    assert code == 0, err
    summary = _summary(out)
    assert (summary["created"], summary["alias"], summary["signed"]) == (True, "challenger", True)
    assert get_alias_version(model_name, "challenger") == summary["version"]


def test_a_run_without_dataset_lineage_registers_but_exits_1_as_not_signed(
        store, model_name, tmp_path, capsys, caplog):
    from tasks.register.tracking import ensure_experiment, get_client

    client = get_client()
    run = client.create_run(ensure_experiment("tuneloop-test-cli-register"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    client.log_artifact(run.info.run_id, str(tmp_path / "adapter"))
    code, out, _ = _run(["register", run.info.run_id, "--model-name", model_name], capsys)
    assert code == 1
    summary = _summary(out)
    assert summary["signed"] is False
    assert summary["signature_problem"].startswith("missing registration tags: dataset_id")
    assert "train it again from a gated dataset (`tuneloop train`)" in caplog.text


def test_an_unknown_run_exits_1_with_the_registry_message(store, model_name, capsys):
    code, out, err = _run(["register", "0" * 32, "--model-name", model_name], capsys)
    assert code == 1 and out == ""
    assert err.startswith("tuneloop register: error: MLflow run '" + "0" * 32 + "' does not exist")


def test_a_malformed_run_id_or_alias_exits_2_before_touching_mlflow(capsys):
    code, out, err = _run(["register", "x' or name = 'y"], capsys)
    assert code == 2 and out == ""
    assert "tuneloop register: error: RUN_ID \"x' or name = 'y\" is not an MLflow run id" in err
    assert "`tuneloop adapters --json`" in err
    code, _, err = _run(["register", "0" * 32, "--alias", "prod"], capsys)
    assert code == 2 and "argument --alias: invalid choice: 'prod'" in err


def test_register_aliases_are_the_registry_aliases():
    from tasks.cli.model import REGISTER_ALIASES
    from tasks.register.registry import CHALLENGER, CHAMPION

    assert REGISTER_ALIASES == (CHALLENGER, CHAMPION, "")
