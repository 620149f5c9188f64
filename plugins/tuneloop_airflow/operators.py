"""Container training operators that cost nothing at DAG parse time.

`KubernetesPodOperator` takes ~1 s to import, which would blow the DAG-folder parse budget, and
both container operators need values only known at run time (the rendered config path, the
dataset id). `ContainerTrainerOperator` therefore builds the real provider operator inside
`execute()` from `tasks.train.container` kwargs and delegates to it. `build_operator()` is what
tests inspect: the real DockerOperator / KubernetesPodOperator with image, command, mounts and the
GPU request.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseOperator

BACKENDS = ("docker", "kubernetes")


def mlflow_login(settings: Any) -> dict[str, str]:
    """The MLflow client credentials a container needs to log to an MLflow server with auth."""
    env = {}
    if settings.mlflow_tracking_username:
        env["MLFLOW_TRACKING_USERNAME"] = settings.mlflow_tracking_username
    for name, value in (("MLFLOW_TRACKING_PASSWORD", settings.mlflow_tracking_password),
                        ("MLFLOW_TRACKING_TOKEN", settings.mlflow_tracking_token)):
        if value is not None:
            env[name] = value.get_secret_value()
    return env


class ContainerTrainerOperator(BaseOperator):
    """Run Dockerfile.trainer (axolotl) on a GPU via Docker or Kubernetes."""

    template_fields = ("prepared",)
    ui_color = "#c9e4ff"

    def __init__(self, *, backend: str, prepared: Any, **kwargs: Any) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(**kwargs)
        self.backend = backend
        # `prepared` is the prepare_config task's XCom (dict with the config/output paths).
        self.prepared = prepared

    def build_operator(self, prepared: dict) -> BaseOperator:
        from tasks.core.settings import get_settings
        from tasks.train.container import (
            docker_trainer_kwargs,
            host_path,
            kubernetes_trainer_kwargs,
        )

        settings = get_settings()
        if self.backend == "docker":
            from airflow.providers.docker.operators.docker import DockerOperator

            def on_host(path: str | None) -> str | None:
                return path and host_path(path, settings.data_dir, settings.host_data_dir)

            uri = settings.resolved_mlflow_tracking_uri
            remote_mlflow = uri.startswith(("http://", "https://"))
            kwargs = docker_trainer_kwargs(
                prepared["container_config_path"], image=settings.trainer_image,
                host_output_dir=on_host(prepared["host_output_dir"]),
                host_config_dir=on_host(prepared["host_config_dir"]),
                host_model_dir=on_host(prepared.get("host_model_dir")),
                network_mode=settings.trainer_network,
                mlflow_tracking_uri=uri if remote_mlflow else None,
                # The trainer image is unprivileged; run it as this (the Airflow) user with
                # group 0, so what it writes on the host belongs to the Airflow user.
                user=f"{os.getuid()}:0",
            )
            if remote_mlflow:  # the MLflow login: private_environment is never rendered
                kwargs["private_environment"] = {**kwargs.get("private_environment", {}),
                                                 **mlflow_login(settings)}
            return DockerOperator(task_id=f"{self.task_id}__docker", **kwargs)
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        kwargs = kubernetes_trainer_kwargs(
            prepared["container_config_path"], image=settings.trainer_image,
            output_pvc=prepared.get("output_pvc", "tuneloop-artifacts"),
            run_sub_path=prepared.get("run_sub_path"),
        )
        return KubernetesPodOperator(task_id=f"{self.task_id}__pod", **kwargs)

    def execute(self, context: Any) -> dict:
        operator = self.build_operator(self.prepared)
        operator.execute(context)
        return {"output_dir": self.prepared["host_output_dir"], "backend": self.backend}
