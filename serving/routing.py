"""Which model answers a request: the pure routing function (HMAC user hash, the user's fixed
bucket in [0, 1), canary/mirror/off), the `RoutingState` the router serves right now, the
`StateResolver` that refreshes it from the active deployment (PostgreSQL) and the registry
aliases (MLflow) on a worker thread, and the token-bucket rate limiter guarding the routes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.router_config import VARIANTS, RouterConfig, Variant
from tasks.core.ids import hash_user as hash_user  # re-exported: the router hashes with it
from tasks.core.settings import get_settings

log = logging.getLogger("serving.router")  # the router's one log, as before the split


# ---- routing (pure) ----------------------------------------------------------------------------


def user_bucket(user_hash: str) -> float:
    """A user's fixed position in [0, 1): the first 64 bits of the hash over 2**64."""
    return int(user_hash[:16], 16) / 2.0**64


def choose_variant(user_hash: str, mode: str, share: float) -> Variant:
    """Canary: the challenger serves users whose bucket is below `share`; otherwise champion.

    Deterministic per user (sticky) and monotone in share: a user served by the challenger at
    5% is still served by it at 10%. Mirror and off always answer with the champion.
    """
    if mode == "canary" and user_bucket(user_hash) < share:
        return "challenger"
    return "champion"


@dataclass(frozen=True)
class RoutingState:
    """What the router serves right now; replaced atomically on every refresh."""

    deployment_id: str | None = None
    mode: str = "off"
    share: float = 0.0
    versions: Mapping[str, str | None] = field(
        default_factory=lambda: {"champion": None, "challenger": None})
    backend_models: Mapping[str, str] = field(default_factory=dict)
    source: str = "default"  # where versions came from: registry | deployment | default

    def as_dict(self) -> dict[str, Any]:
        return {"deployment_id": self.deployment_id, "mode": self.mode, "share": self.share,
                "versions": dict(self.versions), "backend_models": dict(self.backend_models),
                "source": self.source}


class StateResolver:
    """Reads the active deployment (Postgres) and the aliases (MLflow) into a RoutingState.

    Both `refresh_*` methods are blocking and meant for a worker thread; `state` is a plain
    attribute read by request handlers without locking.
    """

    def __init__(self, config: RouterConfig, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self._lock = threading.Lock()
        self._aliases: dict[str, str | None] = {"champion": None, "challenger": None}
        self._deployment: dict[str, Any] | None = None
        self._is_base: dict[str, bool] = {}
        self._client: Any = None
        self.state = self._compute()

    # -- registry --
    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            uri = self.config.tracking_uri or get_settings().resolved_mlflow_tracking_uri
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def _lookup_alias(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self._mlflow().get_model_version_by_alias(self.config.registered_model_name,
                                                           alias)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                                  "INVALID_PARAMETER_VALUE"):
                return None
            raise
        self._is_base[str(mv.version)] = (mv.tags or {}).get("is_base") == "true"
        return str(mv.version)

    def _lookup_is_base(self, version: str) -> None:
        if version in self._is_base or not self.config.use_registry:
            return
        try:
            mv = self._mlflow().get_model_version(self.config.registered_model_name, version)
            self._is_base[version] = (mv.tags or {}).get("is_base") == "true"
        except Exception as exc:  # noqa: BLE001 - an unknown version is served as an adapter
            log.warning("router: cannot read version %s from the registry: %s", version, exc)

    def refresh_aliases(self) -> None:
        if not self.config.use_registry:
            return
        try:
            aliases = {variant: self._lookup_alias(variant) for variant in VARIANTS}
        except Exception as exc:  # noqa: BLE001 - keep serving the last known versions
            log.warning("router: registry refresh failed, keeping %s: %s", self._aliases, exc)
            return
        with self._lock:
            if aliases != self._aliases:
                log.info("router: registry aliases now %s", aliases)
            self._aliases = aliases
            self.state = self._compute()

    # -- deployments --
    def refresh_deployment(self) -> bool:
        """Re-read the active deployment; True when it changed (the aliases were re-read too)."""
        from sqlalchemy import select

        from tasks.core.db.engine import session_scope
        from tasks.core.db.models import Deployment

        try:
            with session_scope(self.engine) as session:
                row = session.execute(
                    select(Deployment)
                    .where(Deployment.active.is_(True),
                           Deployment.model_name == self.config.registered_model_name)
                    .order_by(Deployment.started_at.desc(), Deployment.id)
                    .limit(1)
                ).scalar_one_or_none()
                deployment = None if row is None else {
                    "id": row.id, "mode": row.mode, "share": float(row.share),
                    "champion_version": row.champion_version,
                    "challenger_version": row.challenger_version,
                }
        except Exception as exc:  # noqa: BLE001 - keep serving the last known deployment
            log.warning("router: deployment refresh failed, keeping the last one: %s", exc)
            return False
        for key in ("champion_version", "challenger_version"):
            if deployment and deployment[key]:
                self._lookup_is_base(str(deployment[key]))
        with self._lock:
            changed = deployment != self._deployment
            if changed:
                log.info("router: active deployment now %s", deployment)
            self._deployment = deployment
            self.state = self._compute()
        if changed:
            # A deployment starting or ending is when the aliases move (registration sets
            # challenger; applying a decision moves champion, then ends the deployment): read
            # them now rather than up to alias_ttl_s later.
            self.refresh_aliases()
        return changed

    def _compute(self) -> RoutingState:
        deployment = self._deployment
        versions: dict[str, str | None] = dict(self._aliases)
        source = "registry" if any(versions.values()) else "default"
        mode, share, deployment_id = "off", 0.0, None
        if deployment is not None:
            deployment_id = deployment["id"]
            mode, share = deployment["mode"], deployment["share"]
            # A version pinned by the deployment wins over the alias: the comparison of a
            # deployment must be about the versions it names.
            for variant in VARIANTS:
                pinned = deployment[f"{variant}_version"]
                if pinned:
                    if versions[variant] and versions[variant] != pinned:
                        log.warning("router: deployment %s pins %s=%s, registry alias says %s",
                                    deployment_id, variant, pinned, versions[variant])
                    versions[variant] = str(pinned)
                    source = "deployment"
        if mode in ("canary", "mirror") and not versions["challenger"]:
            log.warning("router: mode %s without a challenger version; serving champion only",
                        mode)
            mode = "off"
        name = self.config.registered_model_name
        backend_models = {
            variant: self.config.backends[variant].model_for(
                versions[variant], name, is_base=self._is_base.get(versions[variant] or "", False)
            )
            for variant in VARIANTS
        }
        return RoutingState(deployment_id=deployment_id, mode=mode, share=share,
                            versions=versions, backend_models=backend_models, source=source)


# ---- rate limiting -----------------------------------------------------------------------------


class TokenBucketLimiter:
    """Token buckets keyed by string: `rate` tokens/s refill up to `burst`; LRU-bounded keys."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, key: str, now: float | None = None) -> float:
        """Take one token: 0.0 when allowed, else the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
