"""Deployment rows: the deterministic deployment id (from model, versions, mode and share), the
generation rule that gives a redeployment of an ended configuration a fresh id, and the lookup of
a deployment by id or of a model's active one. The entry points that write the rows
(`deploy_challenger`, `end_deployment`) live in `tasks.shadow.stage`; `shadow_engine` (the given
engine or the configured one) is shared by the modules of this package.
"""

from __future__ import annotations

from typing import Any

from tasks.core.ids import stable_id
from tasks.core.settings import get_settings
from tasks.shadow.config import ShadowError


def shadow_engine(engine: Any = None) -> Any:
    if engine is not None:
        return engine
    from tasks.core.db.engine import get_engine

    return get_engine()


def deployment_id_for(model_name: str, champion_version: str | None, challenger_version: str,
                      mode: str, share: float) -> str:
    return stable_id("deployment", model_name, champion_version or "@champion",
                     challenger_version, mode, f"{share:.6f}")


def generation_id(session: Any, base_id: str) -> str:
    """The id this deployment gets: `base_id` the first time and while it is active (a rerun is
    a no-op); once that one has ended, a fresh id per redeployment, so the new period's
    comparison starts empty instead of mixing in the ended period's traffic."""
    from tasks.core.db.models import Deployment

    generation, candidate = 0, base_id
    while True:
        row = session.get(Deployment, candidate)
        if row is None or row.active:
            return candidate
        generation += 1
        candidate = stable_id(base_id, "redeployed", generation)


def load_deployment(session: Any, deployment_id: str | None, model_name: str | None) -> Any:
    from sqlalchemy import select

    from tasks.core.db.models import Deployment

    if deployment_id:
        row = session.get(Deployment, deployment_id)
        if row is None:
            raise ShadowError(f"no deployment with id {deployment_id!r}; list them with "
                              "SELECT id, mode, active FROM deployments",
                              deployment_id=deployment_id)
        return row
    name = model_name or get_settings().registered_model_name
    return session.execute(
        select(Deployment).where(Deployment.model_name == name, Deployment.active.is_(True))
        .order_by(Deployment.started_at.desc(), Deployment.id).limit(1)
    ).scalar_one_or_none()
