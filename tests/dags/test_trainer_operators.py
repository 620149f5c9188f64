"""Container training: the real DockerOperator / KubernetesPodOperator built from
tasks.train.container kwargs carry the right image, command, mounts and GPU request (no Docker
engine or cluster needed), the run folder holds a container-ready axolotl.yaml, and the collect
step turns axolotl's output into the tuneloop output layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tasks.train.config import AxolotlConfig, TrainingConfigError, load_training_config
from tasks.train.container import (
    CONTAINER_CONFIG_PATH,
    ENTRYPOINT,
    collect_axolotl_output,
    docker_trainer_kwargs,
    kubernetes_trainer_kwargs,
    prepare_container_run,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/tuneloop-trainer:0.21.0-cu126"


@pytest.fixture()
def snapshot(tmp_path) -> Path:
    path = tmp_path / "exports" / "ds-abc.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    return path


@pytest.fixture()
def run(tmp_path, snapshot):
    cfg = load_training_config({"datasets": [{"path": str(snapshot)}],
                                "mlflow_tracking_uri": "sqlite:///host/only/mlflow.db"})
    return prepare_container_run(cfg, run_dir=tmp_path / "artifacts" / "training" / "run1",
                                 artifacts_root=tmp_path / "artifacts")


def test_run_folder_has_a_container_ready_config(run, snapshot):
    cfg = AxolotlConfig.from_yaml(Path(run.host_config_dir, "axolotl.yaml").read_text())
    assert run.container_config_path == CONTAINER_CONFIG_PATH == "/config/axolotl.yaml"
    assert cfg.datasets[0].path == "/config/data/00-ds-abc.jsonl"
    assert Path(run.host_config_dir, "data", "00-ds-abc.jsonl").read_bytes() == \
        snapshot.read_bytes()
    assert cfg.output_dir == "/output/axolotl"
    assert cfg.dataset_prepared_path == "/output/prepared"
    assert cfg.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # A host-only sqlite store is unreachable from the container: not passed on.
    assert cfg.mlflow_tracking_uri is None and cfg.use_mlflow is None
    assert run.run_sub_path == "training/run1"
    assert Path(run.host_output_dir).is_dir()


def test_local_base_model_folder_is_mounted_and_short_names_map_to_hub_ids(tmp_path, snapshot):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cfg = load_training_config({"datasets": [{"path": str(snapshot)}],
                                "base_model": str(model_dir)})
    run = prepare_container_run(cfg, run_dir=tmp_path / "r")
    rendered = yaml.safe_load(Path(run.host_config_dir, "axolotl.yaml").read_text())
    assert rendered["base_model"] == "/models/base"
    assert run.host_model_dir == str(model_dir.resolve())
    short = prepare_container_run(cfg.with_overrides(base_model="smollm2-135m-instruct"),
                                  run_dir=tmp_path / "r2")
    assert yaml.safe_load(Path(short.host_config_dir, "axolotl.yaml").read_text())[
        "base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(TrainingConfigError, match="Hugging Face id"):
        prepare_container_run(cfg.with_overrides(base_model="tinycoder-n2-missing"),
                              run_dir=tmp_path / "r3")


def test_docker_operator_carries_image_command_mounts_and_gpu_request(run):
    from airflow.providers.docker.operators.docker import DockerOperator

    kwargs = docker_trainer_kwargs(
        run.container_config_path, image=IMAGE, host_output_dir=run.host_output_dir,
        host_config_dir=run.host_config_dir, gpus=2,
        mlflow_tracking_uri="http://mlflow:5000", hf_token="hf_secret")
    op = DockerOperator(task_id="train_docker", **kwargs)
    assert op.image == IMAGE
    assert op.command == ["/config/axolotl.yaml"]
    mounts = {m["Target"]: m for m in op.mounts}
    assert mounts["/config"]["Source"] == run.host_config_dir
    assert mounts["/config"]["ReadOnly"] is True and mounts["/config"]["Type"] == "bind"
    assert mounts["/output"]["Source"] == run.host_output_dir
    assert mounts["/output"]["ReadOnly"] is False
    [request] = op.device_requests
    assert request.count == 2 and request.capabilities == [["gpu"]]
    assert op.environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert op.environment["TUNELOOP_OUTPUT_DIR"] == "/output"
    assert "hf_secret" not in json.dumps(op.environment)
    assert op._private_environment == {"HF_TOKEN": "hf_secret"}  # merged only at run time
    assert op.mount_tmp_dir is False and op.auto_remove == "success"
    assert op.shm_size == 16 * 1024**3
    assert {u["Name"]: u["Soft"] for u in op.ulimits} == {"memlock": -1, "stack": 67108864}


def test_docker_operator_mounts_a_local_base_model_read_only(run):
    from airflow.providers.docker.operators.docker import DockerOperator

    op = DockerOperator(task_id="t", **docker_trainer_kwargs(
        run.container_config_path, image=IMAGE, host_output_dir=run.host_output_dir,
        host_config_dir=run.host_config_dir, host_model_dir="/models/smollm2"))
    model_mount = next(m for m in op.mounts if m["Target"] == "/models/base")
    assert model_mount["Source"] == "/models/smollm2" and model_mount["ReadOnly"] is True
    assert op.device_requests[0].count == 1


def test_docker_kwargs_refuse_zero_gpus(run):
    with pytest.raises(TrainingConfigError, match="set gpus: 1"):
        docker_trainer_kwargs(run.container_config_path, image=IMAGE, gpus=0,
                              host_output_dir=run.host_output_dir,
                              host_config_dir=run.host_config_dir)


def test_kubernetes_pod_carries_image_command_volumes_gpu_resources_and_node_selector(run):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    kwargs = kubernetes_trainer_kwargs(
        run.container_config_path, image=IMAGE, output_pvc="tuneloop-artifacts",
        run_sub_path=run.run_sub_path, gpus=1, hf_token_secret="hf-token",
        mlflow_tracking_uri="http://mlflow.tuneloop.svc:5000")
    op = KubernetesPodOperator(task_id="train_kubernetes", **kwargs)
    pod = op.build_pod_request_obj(dry_run=True)
    [container] = pod.spec.containers
    assert container.image == IMAGE
    assert container.command == [ENTRYPOINT]
    assert container.args == ["/config/axolotl.yaml"]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert container.resources.requests["nvidia.com/gpu"] == "1"
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    [toleration] = pod.spec.tolerations
    assert (toleration.key, toleration.operator, toleration.effect) == (
        "nvidia.com/gpu", "Exists", "NoSchedule")
    mounts = {m.mount_path: m for m in container.volume_mounts}
    assert mounts["/config"].sub_path == "training/run1/config" and mounts["/config"].read_only
    assert mounts["/output"].sub_path == "training/run1/output"
    assert mounts["/dev/shm"].name == "dshm"
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["artifacts"].persistent_volume_claim.claim_name == "tuneloop-artifacts"
    assert volumes["dshm"].empty_dir.medium == "Memory"
    env = {e.name: e for e in container.env}
    assert env["MLFLOW_TRACKING_URI"].value == "http://mlflow.tuneloop.svc:5000"
    assert env["HF_TOKEN"].value_from.secret_key_ref.name == "hf-token"
    assert pod.metadata.namespace == "tuneloop"


def test_kubernetes_node_selector_and_gpu_count_are_configurable(run):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    op = KubernetesPodOperator(task_id="t", **kubernetes_trainer_kwargs(
        run.container_config_path, image=IMAGE, gpus=4,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}))
    pod = op.build_pod_request_obj(dry_run=True)
    assert pod.spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "4"


def test_lead_container_operator_builds_from_prepare_output(run, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "plugins"))
    from tuneloop_airflow.operators import ContainerTrainerOperator

    prepared = run.to_dict()
    docker = ContainerTrainerOperator(task_id="train_docker", backend="docker",
                                      prepared=prepared).build_operator(prepared)
    assert docker.command == [run.container_config_path]
    assert docker.device_requests[0].capabilities == [["gpu"]]
    pod_op = ContainerTrainerOperator(task_id="train_kubernetes", backend="kubernetes",
                                      prepared=prepared).build_operator(prepared)
    assert pod_op.arguments == [run.container_config_path]


def _fake_axolotl_run(axolotl_out: Path) -> None:
    """What `axolotl train` leaves behind: a checkpoint with HF's trainer_state.json and the
    final PEFT adapter + tokenizer in output_dir (written here with the real libraries)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState

    from tasks.core.weights import tinycoder_path

    path = str(tinycoder_path())
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(axolotl_out))
    AutoTokenizer.from_pretrained(path).save_pretrained(str(axolotl_out))
    state = TrainerState(global_step=6, max_steps=6)
    state.log_history = [
        {"epoch": 0.5, "step": 2, "loss": 2.5, "learning_rate": 1e-4},
        {"epoch": 1.0, "step": 4, "loss": 2.0, "learning_rate": 1e-4},
        {"epoch": 1.0, "step": 4, "eval_loss": 2.2},
        {"epoch": 1.5, "step": 6, "loss": 1.5, "learning_rate": 5e-5},
        {"epoch": 1.5, "step": 6, "eval_loss": 1.9},
        {"epoch": 1.5, "step": 6, "train_runtime": 12.0, "train_loss": 2.0,
         "train_tokens_per_second": 4321.0, "train_samples_per_second": 3.0},
    ]
    checkpoint = axolotl_out / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    state.save_to_json(str(checkpoint / "trainer_state.json"))


def test_collect_turns_axolotl_output_into_the_tuneloop_layout(tmp_path, snapshot):
    from tasks.train.__main__ import main
    from tasks.train.local import load_train_result

    axolotl_out = tmp_path / "output" / "axolotl"
    axolotl_out.mkdir(parents=True)
    _fake_axolotl_run(axolotl_out)
    cfg = load_training_config({"datasets": [{"path": str(snapshot)}],
                                "output_dir": str(axolotl_out), "val_set_size": 0.0,
                                "eval_steps": None})
    config_path = tmp_path / "axolotl.yaml"
    config_path.write_text(cfg.to_axolotl_yaml())

    assert main(["collect", "--config", str(config_path),
                 "--output-dir", str(tmp_path / "output")]) == 0
    result = load_train_result(tmp_path / "output")
    assert result.metrics["steps"] == 6
    assert result.metrics["train_loss"] == 1.5 and result.metrics["train_loss_first"] == 2.5
    assert result.metrics["eval_loss"] == 1.9
    assert result.metrics["tokens_per_s"] == 4321.0
    assert result.metrics["train_rows"] == 1
    assert result.loss_curve == [(2, 2.5), (4, 2.0), (6, 1.5)]
    assert result.eval_curve == [(4, 2.2), (6, 1.9)]
    assert (result.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (axolotl_out / "adapter_model.safetensors").read_bytes()
    assert "<|im_start|>" in result.chat_template
    assert result.config_yaml_path.read_text() == config_path.read_text()


def test_collect_without_trainer_state_says_what_to_check(tmp_path, snapshot):
    cfg = load_training_config({"datasets": [{"path": str(snapshot)}],
                                "output_dir": str(tmp_path / "empty")})
    config_path = tmp_path / "axolotl.yaml"
    config_path.write_text(cfg.to_axolotl_yaml())
    from tasks.train.config import TrainingError

    with pytest.raises(TrainingError, match="no trainer_state.json.*save_steps"):
        collect_axolotl_output(config_path, tmp_path / "out")


def test_no_airflow_import_under_tasks_train():
    for path in (ROOT / "tasks" / "train").glob("*.py"):
        source = path.read_text()
        assert "import airflow" not in source and "from airflow" not in source, path
    assert "tasks.train.container" in sys.modules  # imported above without Airflow


def test_host_path_is_the_path_itself_when_airflow_runs_on_the_host(tmp_path):
    from tasks.train.container import host_path

    assert host_path(tmp_path / "runs" / "r1", tmp_path, None) == str(tmp_path / "runs" / "r1")


def test_host_path_moves_data_dir_paths_under_the_host_folder(tmp_path):
    from tasks.train.container import host_path

    got = host_path(tmp_path / "runs" / "r1" / "container" / "config", tmp_path, "/srv/tuneloop")
    assert got == "/srv/tuneloop/runs/r1/container/config"


def test_host_path_refuses_a_relative_host_folder_and_paths_outside_the_data_dir(tmp_path):
    from tasks.train.container import host_path

    with pytest.raises(TrainingConfigError, match=r"TUNELOOP_HOST_DATA_DIR='./data' is not an "
                                                  r"absolute path.*\$PWD/data"):
        host_path(tmp_path / "runs", tmp_path, "./data")
    with pytest.raises(TrainingConfigError, match=r"outside TUNELOOP_DATA_DIR.*TUNELOOP_MODEL_CACHE"):
        host_path("/opt/models/smollm2", tmp_path / "data", "/srv/tuneloop")


def test_docker_operator_in_compose_mounts_host_paths_and_joins_the_network(
        tmp_path, snapshot, monkeypatch):
    """Airflow in a container: mount sources are the host's folders, the trainer joins the
    compose network and gets the http:// MLflow URI."""
    monkeypatch.syspath_prepend(str(ROOT / "plugins"))
    from tasks.core.settings import get_settings
    from tuneloop_airflow.operators import ContainerTrainerOperator

    data_dir = tmp_path / "artifacts"
    model_dir = data_dir / "models" / "base"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    cfg = load_training_config({"datasets": [{"path": str(snapshot)}],
                                "base_model": str(model_dir)})
    prepared = prepare_container_run(cfg, run_dir=data_dir / "runs" / "r1",
                                     artifacts_root=data_dir).to_dict()
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(data_dir))
    monkeypatch.setenv("TUNELOOP_HOST_DATA_DIR", "/srv/tuneloop-data")
    monkeypatch.setenv("TUNELOOP_TRAINER_NETWORK", "tuneloop")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    get_settings.cache_clear()
    try:
        docker = ContainerTrainerOperator(task_id="train_docker", backend="docker",
                                          prepared=prepared).build_operator(prepared)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    sources = {m["Target"]: m["Source"] for m in docker.mounts}
    assert sources == {"/config": "/srv/tuneloop-data/runs/r1/config",
                       "/output": "/srv/tuneloop-data/runs/r1/output",
                       "/models/base": "/srv/tuneloop-data/models/base"}
    assert docker.network_mode == "tuneloop"
    assert docker.environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
