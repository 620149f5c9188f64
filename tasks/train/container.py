"""Launch specs for the GPU trainer container (Dockerfile.trainer: axolotl) and its result reader.

Pure functions, no Airflow import: `docker_trainer_kwargs()` returns the keyword arguments for
`airflow.providers.docker...DockerOperator`, `kubernetes_trainer_kwargs()` those for
`airflow.providers.cncf.kubernetes...KubernetesPodOperator`; the DAG builds the operator from
them. Both run the image's entrypoint with one argument, the config path inside the container,
and see the same layout:

    /config/axolotl.yaml        rendered AxolotlConfig (read-only)
    /config/data/<name>.jsonl   the dataset snapshot(s)
    /models/base                optional: a local base model folder (offline clusters)
    /output/axolotl             axolotl's output_dir (checkpoints, final adapter)
    /output/prepared            axolotl preprocess cache
    /output/adapter, /output/metrics.json, /output/trainer_state.json ...   (collect step)

`prepare_container_run()` writes that config folder on the host; `collect_axolotl_output()` runs
in the container after `axolotl train` (docker/trainer/entrypoint.sh) and writes the same output
files as the local trainer, so `tasks.train.local.load_train_result()` reads either.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.core.weights import LOCAL_TO_HUB_MODEL
from tasks.train.config import (
    AxolotlConfig,
    TrainingConfigError,
    TrainingError,
)

log = logging.getLogger(__name__)

CONTAINER_CONFIG_DIR = "/config"
CONTAINER_OUTPUT_DIR = "/output"
CONTAINER_MODEL_DIR = "/models/base"
CONTAINER_CONFIG_PATH = f"{CONTAINER_CONFIG_DIR}/axolotl.yaml"
ENTRYPOINT = "/opt/tuneloop/entrypoint.sh"
DEFAULT_SHM_BYTES = 16 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class ContainerRun:
    """Host-side paths of one container training run (all JSON-able for XCom)."""

    run_dir: str
    host_config_dir: str
    host_output_dir: str
    container_config_path: str
    host_model_dir: str | None
    run_sub_path: str | None
    config_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _container_base_model(base_model: str) -> tuple[str, Path | None]:
    """(base_model as the container sees it, host folder to mount or None)."""
    if base_model in LOCAL_TO_HUB_MODEL:
        return LOCAL_TO_HUB_MODEL[base_model], None
    folder = Path(base_model).expanduser()
    if (folder / "config.json").exists():
        return CONTAINER_MODEL_DIR, folder.resolve()
    if "/" in base_model and not base_model.startswith(("/", ".", "~")):
        return base_model, None  # a Hugging Face id: axolotl downloads it
    raise TrainingConfigError(
        f"base_model {base_model!r} cannot be loaded inside the trainer container",
        fix="use a Hugging Face id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or a local model "
            "folder with config.json (mounted read-only at /models/base)")


def prepare_container_run(
    cfg: AxolotlConfig,
    *,
    run_dir: Path,
    artifacts_root: Path | None = None,
    mlflow_tracking_uri: str | None = None,
) -> ContainerRun:
    """Write `<run_dir>/config/` (axolotl.yaml with container paths + dataset copies) and
    create `<run_dir>/output/`. `artifacts_root` (the folder a Kubernetes PVC holds) gives
    `run_sub_path` for `kubernetes_trainer_kwargs`. Idempotent for the same inputs.

    `mlflow_tracking_uri` is written only when it is http(s): a sqlite/file store on this host
    is not reachable from the container (register from the host after `collect` instead).
    """
    run_dir = Path(run_dir).resolve()
    config_dir = run_dir / "config"
    output_dir = run_dir / "output"
    data_dir = config_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)

    datasets = []
    for index, spec in enumerate(cfg.datasets):
        source = Path(spec.path)
        if not source.exists():
            raise TrainingConfigError(f"dataset {source} does not exist",
                                      fix="export the snapshot before preparing the run")
        target = data_dir / f"{index:02d}-{source.name}"
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)
        datasets.append({**spec.model_dump(), "path": f"{CONTAINER_CONFIG_DIR}/data/{target.name}"})

    base_model, host_model_dir = _container_base_model(cfg.base_model)
    uri = mlflow_tracking_uri or cfg.mlflow_tracking_uri
    if uri and not uri.startswith(("http://", "https://")):
        log.info("not passing MLflow URI %s to the container (not reachable from it)", uri)
        uri = None
    container_cfg = cfg.with_overrides(
        base_model=base_model,
        datasets=datasets,
        output_dir=f"{CONTAINER_OUTPUT_DIR}/axolotl",
        dataset_prepared_path=f"{CONTAINER_OUTPUT_DIR}/prepared",
        mlflow_tracking_uri=uri,
        use_mlflow=True if uri else None,
        hf_mlflow_log_artifacts=cfg.hf_mlflow_log_artifacts and bool(uri),
    )
    (config_dir / "axolotl.yaml").write_text(container_cfg.to_axolotl_yaml())
    sub_path = None
    if artifacts_root is not None:
        try:
            sub_path = str(run_dir.relative_to(Path(artifacts_root).resolve()))
        except ValueError:
            raise TrainingConfigError(
                f"run_dir {run_dir} is not under artifacts_root {artifacts_root}",
                fix="create the run folder inside the folder the Kubernetes PVC holds") from None
    return ContainerRun(
        run_dir=str(run_dir), host_config_dir=str(config_dir), host_output_dir=str(output_dir),
        container_config_path=CONTAINER_CONFIG_PATH,
        host_model_dir=str(host_model_dir) if host_model_dir else None,
        run_sub_path=sub_path, config_hash=container_cfg.config_hash(),
    )


def host_path(path: str | Path, data_dir: Path, host_data_dir: str | None) -> str:
    """The path the Docker daemon must bind-mount for `path`.

    Without `host_data_dir` (Airflow runs on the host) it is `path` itself. When Airflow runs in
    a container whose TUNELOOP_DATA_DIR is a bind mount of the host folder `host_data_dir`, the
    daemon resolves mount sources on the host, so a path under `data_dir` moves under it.
    """
    if not host_data_dir:
        return str(path)
    if not PurePosixPath(host_data_dir).is_absolute():
        raise TrainingConfigError(
            f"TUNELOOP_HOST_DATA_DIR={host_data_dir!r} is not an absolute path",
            fix="set it to the host folder mounted at TUNELOOP_DATA_DIR, e.g. "
                "TUNELOOP_HOST_DATA_DIR=$PWD/data in .env next to docker-compose.yaml")
    try:
        relative = Path(path).resolve().relative_to(Path(data_dir).resolve())
    except ValueError:
        raise TrainingConfigError(
            f"{path} is outside TUNELOOP_DATA_DIR ({data_dir}), so the Docker daemon cannot "
            "mount it from the host",
            fix="keep run folders and local base models under TUNELOOP_DATA_DIR (e.g. "
                "TUNELOOP_MODEL_CACHE=$TUNELOOP_DATA_DIR/models), or use a Hugging Face id "
                "as base_model") from None
    return str(PurePosixPath(host_data_dir, *relative.parts))


def _trainer_env(mlflow_tracking_uri: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = {
        "TUNELOOP_OUTPUT_DIR": CONTAINER_OUTPUT_DIR,
        "HF_HOME": f"{CONTAINER_OUTPUT_DIR}/hf-cache",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    env.update(extra or {})
    return env


def docker_trainer_kwargs(
    cfg_path_in_container: str,
    *,
    image: str,
    host_output_dir: str,
    host_config_dir: str,
    gpus: int = 1,
    host_model_dir: str | None = None,
    host_hf_cache_dir: str | None = None,
    mlflow_tracking_uri: str | None = None,
    hf_token: str | None = None,
    environment: dict[str, str] | None = None,
    docker_url: str | None = None,
    network_mode: str | None = None,
    shm_size: int = DEFAULT_SHM_BYTES,
    mem_limit: str | None = None,
    user: str | None = None,
    force_pull: bool = False,
    auto_remove: str = "success",
    timeout: int = 24 * 3600,
) -> dict[str, Any]:
    """Keyword arguments for DockerOperator(task_id=..., **kwargs): GPU device request, bind
    mounts for config (read-only) and output, NCCL-friendly ulimits and shared memory.

    `gpus=-1` requests every GPU on the host. `hf_token` goes to `private_environment` (never
    rendered in the Airflow UI).
    """
    from docker.types import DeviceRequest, Mount, Ulimit

    if gpus == 0 or gpus < -1:
        raise TrainingConfigError(f"gpus={gpus} gives the trainer no GPU",
                                  fix="set gpus: 1 (or -1 for all GPUs on the host)")
    mounts = [
        Mount(target=CONTAINER_CONFIG_DIR, source=str(host_config_dir), type="bind",
              read_only=True),
        Mount(target=CONTAINER_OUTPUT_DIR, source=str(host_output_dir), type="bind"),
    ]
    if host_model_dir:
        mounts.append(Mount(target=CONTAINER_MODEL_DIR, source=str(host_model_dir),
                            type="bind", read_only=True))
    extra_env = dict(environment or {})
    if host_hf_cache_dir:
        mounts.append(Mount(target="/root/.cache/huggingface", source=str(host_hf_cache_dir),
                            type="bind"))
        extra_env.setdefault("HF_HOME", "/root/.cache/huggingface")
    kwargs: dict[str, Any] = {
        "image": image,
        "command": [cfg_path_in_container],
        "mounts": mounts,
        "device_requests": [DeviceRequest(count=gpus, capabilities=[["gpu"]])],
        "environment": _trainer_env(mlflow_tracking_uri, extra_env),
        "private_environment": {"HF_TOKEN": hf_token} if hf_token else {},
        "auto_remove": auto_remove,
        "mount_tmp_dir": False,
        "shm_size": shm_size,
        "ulimits": [Ulimit(name="memlock", soft=-1, hard=-1),
                    Ulimit(name="stack", soft=67108864, hard=67108864)],
        "force_pull": force_pull,
        "tty": True,  # stream axolotl's progress into the task log line by line
        "timeout": timeout,
    }
    if docker_url:
        kwargs["docker_url"] = docker_url
    if network_mode:
        kwargs["network_mode"] = network_mode
    if mem_limit:
        kwargs["mem_limit"] = mem_limit
    if user:
        kwargs["user"] = user
    return kwargs


def kubernetes_trainer_kwargs(
    cfg_path_in_container: str,
    *,
    image: str,
    output_pvc: str = "tuneloop-artifacts",
    run_sub_path: str | None = None,
    model_sub_path: str | None = None,
    namespace: str = "tuneloop",
    name: str = "tuneloop-trainer",
    gpus: int = 1,
    gpu_resource: str = "nvidia.com/gpu",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, str]] | None = None,
    cpu: str = "8",
    memory: str = "64Gi",
    shm_size: str = "16Gi",
    mlflow_tracking_uri: str | None = None,
    hf_token_secret: str | None = None,
    env: dict[str, str] | None = None,
    service_account_name: str | None = None,
    startup_timeout_seconds: int = 1800,
) -> dict[str, Any]:
    """Keyword arguments for KubernetesPodOperator(task_id=..., **kwargs): a GPU pod on a GPU node.

    The PVC `output_pvc` holds the run folder written by `prepare_container_run` (its
    `run_sub_path`): `<run_sub_path>/config` is mounted read-only at /config and
    `<run_sub_path>/output` at /output, so the same axolotl.yaml works as with Docker.
    `hf_token_secret` names a Kubernetes Secret with key `token` (exposed as HF_TOKEN).
    """
    from kubernetes.client import models as k8s

    if gpus < 1:
        raise TrainingConfigError(f"gpus={gpus} gives the trainer no GPU", fix="set gpus: 1")
    prefix = f"{run_sub_path.strip('/')}/" if run_sub_path else ""
    volumes = [
        k8s.V1Volume(name="artifacts", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=output_pvc)),
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                         size_limit=shm_size)),
    ]
    volume_mounts = [
        k8s.V1VolumeMount(name="artifacts", mount_path=CONTAINER_CONFIG_DIR,
                          sub_path=f"{prefix}config", read_only=True),
        k8s.V1VolumeMount(name="artifacts", mount_path=CONTAINER_OUTPUT_DIR,
                          sub_path=f"{prefix}output"),
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
    ]
    if model_sub_path:
        volume_mounts.append(k8s.V1VolumeMount(name="artifacts", mount_path=CONTAINER_MODEL_DIR,
                                               sub_path=model_sub_path.strip("/"),
                                               read_only=True))
    env_vars = [k8s.V1EnvVar(name=k, value=v)
                for k, v in _trainer_env(mlflow_tracking_uri, env).items()]
    if hf_token_secret:
        env_vars.append(k8s.V1EnvVar(name="HF_TOKEN", value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=hf_token_secret, key="token"))))
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": cpu, "memory": memory, gpu_resource: str(gpus)},
        limits={"memory": memory, gpu_resource: str(gpus)},
    )
    toleration_specs = tolerations if tolerations is not None else [
        {"key": gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    kwargs: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "image": image,
        "cmds": [ENTRYPOINT],
        "arguments": [cfg_path_in_container],
        "volumes": volumes,
        "volume_mounts": volume_mounts,
        "env_vars": env_vars,
        "container_resources": resources,
        "node_selector": node_selector if node_selector is not None
        else {"nvidia.com/gpu.present": "true"},
        "tolerations": [k8s.V1Toleration(**spec) for spec in toleration_specs],
        "labels": {"app.kubernetes.io/name": "tuneloop-trainer",
                   "app.kubernetes.io/part-of": "tuneloop"},
        "image_pull_policy": "IfNotPresent",
        "get_logs": True,
        "on_finish_action": "delete_succeeded_pod",
        "startup_timeout_seconds": startup_timeout_seconds,
    }
    if service_account_name:
        kwargs["service_account_name"] = service_account_name
    return kwargs


# ---- after `axolotl train` (runs inside the container) ----------------------------------------
def summarize_trainer_state(state: dict[str, Any]) -> tuple[dict[str, float],
                                                            list[tuple[int, float]],
                                                            list[tuple[int, float]]]:
    """(metrics, loss curve, eval curve) from a HF/axolotl trainer_state.json."""
    history = state.get("log_history") or []
    loss_curve = [(int(e["step"]), float(e["loss"])) for e in history if "loss" in e]
    eval_curve = [(int(e["step"]), float(e["eval_loss"])) for e in history if "eval_loss" in e]
    final = next((e for e in reversed(history) if "train_runtime" in e), {})
    metrics: dict[str, float] = {"steps": int(state.get("global_step") or 0)}
    if loss_curve:
        metrics["train_loss"] = loss_curve[-1][1]
        metrics["train_loss_first"] = loss_curve[0][1]
    if "train_loss" in final:
        metrics["train_loss_mean"] = float(final["train_loss"])
    if "train_runtime" in final:
        metrics["train_runtime_s"] = float(final["train_runtime"])
    for key in ("train_tokens_per_second", "tokens_per_second"):
        if key in final:
            metrics["tokens_per_s"] = float(final[key])
            break
    if eval_curve:
        metrics["eval_loss"] = eval_curve[-1][1]
        metrics["eval_perplexity"] = math.exp(min(eval_curve[-1][1], 50.0))
    return metrics, loss_curve, eval_curve


def _latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = [p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.rsplit("-", 1)[1])) if checkpoints else None


def collect_axolotl_output(config_path: Path | str, output_dir: Path | str) -> dict[str, Any]:
    """Turn axolotl's output_dir into the tuneloop output layout; return the metrics summary.

    Reads trainer_state.json (axolotl's output_dir, else its latest checkpoint), copies the final
    PEFT adapter (+ tokenizer and chat template) to `<output_dir>/adapter`, writes metrics.json,
    trainer_state.json, chat_template.jinja and axolotl.yaml next to it.
    """
    config_path, out = Path(config_path), Path(output_dir)
    cfg = AxolotlConfig.from_yaml(config_path.read_text())
    axolotl_out = Path(cfg.output_dir)
    checkpoint = _latest_checkpoint(axolotl_out)
    state_path = next((p for p in (axolotl_out / "trainer_state.json",
                                   checkpoint / "trainer_state.json" if checkpoint else None)
                       if p is not None and p.exists()), None)
    if state_path is None:
        raise TrainingError(f"no trainer_state.json under {axolotl_out}",
                            fix="check the axolotl train log above; set save_steps so a final "
                                "checkpoint is written", output_dir=str(axolotl_out))
    adapter_src = next((p for p in (axolotl_out, checkpoint)
                        if p is not None and (p / "adapter_model.safetensors").exists()), None)
    if adapter_src is None:
        raise TrainingError(f"no adapter_model.safetensors under {axolotl_out}",
                            fix="axolotl must train with adapter: lora/qlora; check its log",
                            output_dir=str(axolotl_out))
    state = json.loads(state_path.read_text())
    metrics, _, _ = summarize_trainer_state(state)

    adapter_dir = out / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES):
        for folder in (adapter_src, axolotl_out):
            if (folder / name).exists():
                shutil.copyfile(folder / name, adapter_dir / name)
                break
    template = _chat_template_from(adapter_dir)
    if template:
        (out / "chat_template.jinja").write_text(template)
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2))
    (out / "axolotl.yaml").write_text(config_path.read_text())

    rows = sum(_count_rows(Path(d.path)) for d in cfg.datasets)
    val_rows = math.ceil(rows * cfg.val_set_size) if cfg.val_set_size else 0
    metrics.update({"train_rows": rows - val_rows, "val_rows": val_rows})
    info = {"backend": "container", "base_model": cfg.base_model, "config_hash":
            cfg.config_hash(), "trainer_state": str(state_path),
            "tokens_per_s_source": "axolotl train_tokens_per_second"
            if "tokens_per_s" in metrics else "not logged"}
    (out / "metrics.json").write_text(json.dumps({**metrics, "info": info}, indent=2))
    return {"output_dir": str(out), "adapter_dir": str(adapter_dir), "metrics": metrics,
            "info": info}


def _chat_template_from(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())
