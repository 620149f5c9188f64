"""Container training operators that cost nothing at DAG parse time.

`KubernetesPodOperator` takes ~1 s to import, which would blow the DAG-folder parse budget, and
both container operators need values only known at run time (the rendered config path, the
dataset id). `ContainerTrainerOperator` therefore builds the real provider operator inside
`execute()` from `tasks.train.container` kwargs and delegates to it. `build_operator()` is what
tests inspect: the real DockerOperator / KubernetesPodOperator with image, command, mounts and the
GPU request.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

BACKENDS = ("docker", "kubernetes")


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
            kwargs = docker_trainer_kwargs(
                prepared["container_config_path"], image=settings.trainer_image,
                host_output_dir=on_host(prepared["host_output_dir"]),
                host_config_dir=on_host(prepared["host_config_dir"]),
                host_model_dir=on_host(prepared.get("host_model_dir")),
                network_mode=settings.trainer_network,
                mlflow_tracking_uri=uri if uri.startswith(("http://", "https://")) else None,
            )
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
