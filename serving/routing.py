"""Which model answers a request: the pure routing function (HMAC user hash, the user's fixed
bucket in [0, 1), canary/mirror/off), the `RoutingState` the router serves right now, the
`StateResolver` that refreshes it from the active deployment (PostgreSQL) and the registry
aliases (MLflow) on a worker thread — serving only signed registrations, keeping the last good
state (also on disk) when MLflow is down or a version does not verify — and the token-bucket
rate limiter guarding the routes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.router_config import VARIANTS, RouterConfig, Variant
from tasks.core.ids import hash_user as hash_user  # re-exported: the router hashes with it
from tasks.core.signing import TAG_IS_BASE, verify_version

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
    source: str = "default"  # where versions came from: registry | deployment | persisted | default
    # Per variant, why the version the registry or the deployment asks for is not served
    # (the last good one is, or the base model): "version 7: no tuneloop.signature tag ...".
    rejected: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"deployment_id": self.deployment_id, "mode": self.mode, "share": self.share,
                "versions": dict(self.versions), "backend_models": dict(self.backend_models),
                "source": self.source, "rejected": dict(self.rejected)}


@dataclass(frozen=True)
class VersionCheck:
    """What the registry says about one version: servable (`reason` None) or why not."""

    version: str
    is_base: bool = False
    reason: str | None = None


def check_version(model_version: Any, *, name: str, key: Any) -> VersionCheck:
    """Verify an MLflow ModelVersion's registration tags and signature (`tasks.core.signing`)."""
    tags = dict(model_version.tags or {})
    return VersionCheck(
        version=str(model_version.version), is_base=tags.get(TAG_IS_BASE) == "true",
        reason=verify_version(key, tags, name=name, source=model_version.source,
                              run_id=model_version.run_id),
    )


_VERSION = re.compile(r"[0-9]{1,18}")  # MLflow version numbers are integers


class StateResolver:
    """Reads the active deployment (Postgres) and the aliases (MLflow) into a RoutingState.

    With the registry on, a version is served only when it verifies (`check_version`: tuneloop's
    registration tags and a valid signature; for an adapter, a passed gate). A version that does
    not (unsigned, edited after registration, gate not passed, no such version, or not readable
    while MLflow is down) leaves the variant on its last good version, with the reason in
    `state.rejected` and one WARNING; requests never fail for it. The last good state is kept in
    a small JSON file (`config.state_path`, written atomically when it changes; None: memory
    only) and loaded here, so a router starting while MLflow is unreachable serves it (or the
    base model when there is none). Versions are verified with `config.registry_signing_key`.
    With the registry off (`use_registry=False`), versions pinned by the deployment are served
    as they are: there is nothing to verify them against.

    Both `refresh_*` methods are blocking and meant for a worker thread; `state` is a plain
    attribute read by request handlers without locking.
    """

    # Router.start waits this long for the first registry read, then serves what it has.
    start_wait_s = 2.0

    def __init__(self, config: RouterConfig, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self._lock = threading.Lock()
        self._key = config.registry_signing_key
        self._aliases: dict[str, str | None] = {"champion": None, "challenger": None}
        self._deployment: dict[str, Any] | None = None
        self._checks: dict[str, VersionCheck] = {}  # the latest read of each version wanted
        self._good: dict[str, VersionCheck | None] = {"champion": None, "challenger": None}
        self._registry_read = False  # aliases read at least once (before: persisted state)
        self._registry_tried = False  # a registry read finished, read or failed
        self._logged_rejections: dict[str, str] = {}
        self._logged_pins: set[tuple[Any, ...]] = set()
        self._client: Any = None
        self.state_path = config.state_path
        self._persisted: dict[str, Any] | None = None
        if config.use_registry:
            self._load_persisted()
        self.state = self._compute()

    # -- registry --
    def _mlflow(self) -> Any:
        if self._client is None:
            from tasks.core.mlflow_client import make_client

            self._client = make_client(self.config.tracking_uri)
        return self._client

    def _read_version(self, version: str) -> VersionCheck:
        from mlflow.exceptions import MlflowException

        try:
            model_version = self._mlflow().get_model_version(self.config.registered_model_name,
                                                             version)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                                  "INVALID_PARAMETER_VALUE"):
                return VersionCheck(version, reason="does not exist in the registry")
            raise
        return check_version(model_version, name=self.config.registered_model_name,
                             key=self._key)

    def _read_registry(self, pinned: set[str]
                       ) -> tuple[dict[str, str | None], dict[str, VersionCheck]]:
        """The champion/challenger aliases and a check of every version they or `pinned` name.

        Raises when MLflow cannot be read (the caller keeps what it serves)."""
        from mlflow.exceptions import MlflowException

        name = self.config.registered_model_name
        try:
            targets = dict(self._mlflow().get_registered_model(name).aliases or {})
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            targets = {}  # a registry without the model yet: nothing aliased
        aliases = {variant: None if targets.get(variant) is None else str(targets[variant])
                   for variant in VARIANTS}
        wanted = {version for version in aliases.values() if version} | pinned
        return aliases, {version: self._read_version(version) for version in sorted(wanted)}

    @staticmethod
    def _pinned(deployment: dict[str, Any] | None) -> set[str]:
        if deployment is None:
            return set()
        return {str(deployment[f"{variant}_version"]) for variant in VARIANTS
                if deployment[f"{variant}_version"]}

    def refresh_aliases(self) -> None:
        if not self.config.use_registry:
            return
        try:
            aliases, checks = self._read_registry(self._pinned(self._deployment))
        except Exception as exc:  # noqa: BLE001 - keep serving the last known versions
            log.warning("router: registry refresh failed, keeping %s: %s",
                        dict(self.state.versions), exc)
            with self._lock:
                self._registry_tried = True
                self._publish()  # now "not verified yet" is news worth a warning
            return
        with self._lock:
            if aliases != self._aliases:
                log.info("router: registry aliases now %s", aliases)
            self._aliases, self._checks = aliases, checks
            self._registry_read = self._registry_tried = True
            self._publish()

    def prepare(self) -> None:
        """Import MLflow and make its client: seconds of local work, no request to the server,
        done before the bounded wait on the first registry read so that the wait is about
        MLflow answering (and the client is in the heap the router freezes after start-up)."""
        if self.config.use_registry:
            self._mlflow()

    # -- deployments --
    def refresh_deployment(self, *, read_registry: bool = True) -> bool:
        """Re-read the active deployment; True when it changed (then the aliases were re-read
        too, unless `read_registry` is False: start-up reads them apart, with a bounded wait)."""
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
        registry = None
        if deployment != self._deployment and self.config.use_registry and read_registry:
            # A deployment starting or ending is when the aliases move (registration sets
            # challenger; applying a decision moves champion, then ends the deployment): read
            # them, and check the versions it pins, now rather than up to alias_ttl_s later —
            # and before publishing, so the new deployment is served in one step.
            try:
                registry = self._read_registry(self._pinned(deployment))
            except Exception as exc:  # noqa: BLE001 - its versions stay unverified for now
                log.warning("router: registry read for deployment %s failed: %s",
                            deployment and deployment["id"], exc)
                self._registry_tried = True
        with self._lock:
            changed = deployment != self._deployment
            if changed:
                log.info("router: active deployment now %s", deployment)
            self._deployment = deployment
            if registry is not None:
                if registry[0] != self._aliases:
                    log.info("router: registry aliases now %s", registry[0])
                self._aliases, self._checks = registry
                self._registry_read = self._registry_tried = True
            self._publish()
        return changed

    # -- the served state --
    def _publish(self) -> None:
        """Recompute the state (under the lock), log new rejections, persist a change."""
        self.state = self._compute()
        self._log_rejections(self.state)
        self._persist(self.state)

    def _choose(self, variant: str, version: str | None) -> tuple[VersionCheck | None,
                                                                  str | None]:
        """The version to serve for `variant` when `version` is wanted, and why not `version`."""
        good = self._good[variant]
        if version is None:
            if not self._registry_read:
                return good, None  # nothing read yet: the persisted state stands
            if variant == "champion" and good is not None:
                return good, "no champion alias in the registry"
            self._good[variant] = None  # no challenger: a later bad pin falls back to none
            return None, None
        check = self._checks.get(version)
        if check is None:  # not read (MLflow down, or a deployment newer than the last read)
            if good is not None and good.version == version:
                return good, None
            return good, f"version {version}: not verified yet (the registry could not be read)"
        if check.reason is None:
            self._good[variant] = check
            return check, None
        return good, f"version {version}: {check.reason}"

    def _compute(self) -> RoutingState:
        deployment = self._deployment
        wanted: dict[str, str | None] = dict(self._aliases)
        source = "registry" if any(wanted.values()) else "default"
        mode, share, deployment_id = "off", 0.0, None
        if deployment is not None:
            deployment_id = deployment["id"]
            mode, share = deployment["mode"], deployment["share"]
            # A version pinned by the deployment wins over the alias: the comparison of a
            # deployment must be about the versions it names.
            for variant in VARIANTS:
                pinned = deployment[f"{variant}_version"]
                if pinned:
                    clash = (deployment_id, variant, str(pinned), wanted[variant])
                    if wanted[variant] and wanted[variant] != pinned \
                            and clash not in self._logged_pins:
                        self._logged_pins.add(clash)
                        log.warning("router: deployment %s pins %s=%s, registry alias says %s",
                                    deployment_id, variant, pinned, wanted[variant])
                    wanted[variant] = str(pinned)
                    source = "deployment"
        versions: dict[str, str | None] = {}
        is_base: dict[str, bool] = {}
        rejected: dict[str, str] = {}
        for variant in VARIANTS:
            if not self.config.use_registry:
                versions[variant], is_base[variant] = wanted[variant], False
                continue
            served, reason = self._choose(variant, wanted[variant])
            versions[variant] = served.version if served else None
            is_base[variant] = bool(served and served.is_base)
            if reason:
                rejected[variant] = reason
        if self.config.use_registry and not self._registry_read and any(versions.values()):
            source = "persisted"
        if mode in ("canary", "mirror") and not versions["challenger"]:
            if ("mode", deployment_id, mode) not in self._logged_pins:
                self._logged_pins.add(("mode", deployment_id, mode))
                log.warning("router: mode %s without a challenger version; serving champion "
                            "only", mode)
            mode = "off"
        name = self.config.registered_model_name
        backend_models = {
            variant: self.config.backends[variant].model_for(versions[variant], name,
                                                             is_base=is_base[variant])
            for variant in VARIANTS
        }
        return RoutingState(deployment_id=deployment_id, mode=mode, share=share,
                            versions=versions, backend_models=backend_models, source=source,
                            rejected=rejected)

    def _log_rejections(self, state: RoutingState) -> None:
        if not self._registry_tried:
            return  # start-up, registry not asked yet: every pin is "not verified yet"
        for variant in VARIANTS:
            reason = state.rejected.get(variant)
            if reason == self._logged_rejections.get(variant):
                continue
            if reason:
                served = state.versions[variant]
                log.warning("router: not serving %s %s; serving %s", variant, reason,
                            f"version {served}" if served else "no version (the base model)")
                self._logged_rejections[variant] = reason
            else:
                self._logged_rejections.pop(variant, None)
                log.info("router: %s serves version %s", variant, state.versions[variant])

    # -- the last known good state, on disk --
    def _snapshot(self, state: RoutingState) -> dict[str, Any]:
        return {"registered_model_name": self.config.registered_model_name,
                "versions": dict(state.versions),
                # What is served is each variant's last good version (see _choose).
                "is_base": {variant: bool((good := self._good[variant]) and good.is_base)
                            for variant in VARIANTS},
                "backend_models": dict(state.backend_models)}

    def _persist(self, state: RoutingState) -> None:
        path = self.state_path
        if path is None or not self.config.use_registry or not self._registry_read:
            return  # only a state read from the registry replaces the file
        snapshot = self._snapshot(state)
        if snapshot == self._persisted:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(snapshot, indent=2, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("router: cannot save the routing state to %s: %s", path, exc)
            tmp.unlink(missing_ok=True)
            return
        self._persisted = snapshot

    def _load_persisted(self) -> None:
        path = self.state_path
        if path is None:
            return
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("router: ignoring the saved routing state %s: %s", path, exc)
            return
        if not isinstance(data, dict) or \
                data.get("registered_model_name") != self.config.registered_model_name:
            log.warning("router: ignoring the saved routing state %s: not for %s", path,
                        self.config.registered_model_name)
            return
        versions = data.get("versions") if isinstance(data.get("versions"), dict) else {}
        is_base = data.get("is_base") if isinstance(data.get("is_base"), dict) else {}
        for variant in VARIANTS:
            version = versions.get(variant)
            if isinstance(version, str) and _VERSION.fullmatch(version):
                self._good[variant] = VersionCheck(version, is_base=is_base.get(variant) is True)
        self._persisted = data
        log.info("router: loaded the last known good state from %s: %s", path,
                 {variant: check and check.version for variant, check in self._good.items()})


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
