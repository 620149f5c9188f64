"""The one way tuneloop makes an MLflow client: HTTP timeouts and retries first, then the client.

MLflow's REST client reads its per-request timeout, retry count and backoff from the
`MLFLOW_HTTP_REQUEST_*` environment variables on every call (defaults: 120 s, 7 retries,
backoff factor 2 — minutes before an unreachable tracking server gives up). `apply_http_settings`
sets them from `settings.mlflow_http_timeout_s` and `settings.mlflow_http_max_retries` before a
client is made, so the registry stage and the router fail within seconds instead. MLflow is
imported inside the functions (nothing happens at import time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.settings import Settings, get_settings

# urllib3 sleeps backoff_factor * 2**(retry - 1) between retries: 1 s, 2 s, ... (plus MLflow's
# jitter). Small, so that `mlflow_http_max_retries` retries stay a few seconds in all.
HTTP_BACKOFF_FACTOR = 1


def apply_http_settings(settings: Settings | None = None) -> None:
    """Point MLflow's HTTP client at the configured timeout, retries and backoff (process-wide)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    settings = settings or get_settings()
    MLFLOW_HTTP_REQUEST_TIMEOUT.set(max(1, int(settings.mlflow_http_timeout_s)))
    MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(max(0, int(settings.mlflow_http_max_retries)))
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.set(HTTP_BACKOFF_FACTOR)


def make_client(tracking_uri: str | None = None, *, settings: Settings | None = None) -> Any:
    """An `mlflow.MlflowClient` for tracking and registry on `tracking_uri` (default: the
    configured store), with the HTTP settings applied; a local sqlite store's folder is made."""
    settings = settings or get_settings()
    apply_http_settings(settings)
    from mlflow import MlflowClient

    uri = tracking_uri or settings.resolved_mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
