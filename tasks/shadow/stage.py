"""The shadow stage's entry points, the functions its DAG tasks call. `deploy_challenger` writes
the active `deployments` row (deterministic id from versions, mode and share) and ends the
previous one; the router picks it up within its deployment TTL; `deploy_registered` is the
`train_and_register` DAG's step (base model as champion on a new registry, then deploy);
`end_deployment` ends one.
`compare_and_report` compares champion and challenger (`tasks.shadow.compare`) and writes the
HTML/MLflow report (`tasks.shadow.report`). `apply_decision` moves the MLflow aliases (promote:
champion ← challenger version, challenger alias removed; rollback: challenger alias removed) and
ends the deployment; it refuses a stale report (the champion alias moved since) and is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.settings import get_settings
from tasks.shadow.compare import compare_variants
from tasks.shadow.config import (
    CHALLENGER,
    CHAMPION,
    DECISIONS,
    MODES,
    ShadowError,
    SignalWindows,
    share_problem,
)
from tasks.shadow.deployments import deployment_id_for, generation_id, shadow_engine
from tasks.shadow.report import mlflow_client, write_report_files

log = logging.getLogger(__name__)


def _alias_version(client: Any, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def deploy_challenger(
    challenger_version: str,
    *,
    champion_version: str | None = None,
    mode: str = "canary",
    share: float = 0.05,
    model_name: str | None = None,
    materialize: bool = False,
    engine: Any = None,
) -> dict[str, Any]:
    """Make (challenger, champion, mode, share) the active deployment of `model_name`.

    `champion_version=None` means "whatever the champion alias points at while serving".
    `share`: canary — the fraction of users served by the challenger; mirror — the fraction of
    users whose requests are copied to the challenger. Earlier active deployments of the model
    are ended. With `materialize`, the adapters are downloaded from the registry first (into
    `<data_dir>/adapters/`, where the local model server finds them). Rerunning is a no-op.
    Returns {"deployment_id", "model_name", "mode", "share", "champion_version",
    "challenger_version", "ended": [ids], "adapters": {variant: path|None}}.
    """
    from sqlalchemy import select, update

    from tasks.core.db.engine import session_scope, upsert
    from tasks.core.db.models import Deployment

    if mode not in MODES:
        raise ShadowError(f"mode {mode!r} is not one of {', '.join(MODES)}; e.g. mode='canary'")
    if (problem := share_problem(mode, share)) is not None:
        raise ShadowError(problem)
    challenger_version = str(challenger_version).strip()
    if not challenger_version:
        raise ShadowError("challenger_version is empty; pass the registered version, e.g. '3'")
    champion_version = str(champion_version) if champion_version is not None else None
    if champion_version == challenger_version:
        raise ShadowError(
            f"champion and challenger are both version {challenger_version}; deploy a different "
            "challenger", version=challenger_version)
    name = model_name or get_settings().registered_model_name
    base_id = deployment_id_for(name, champion_version, challenger_version, mode, share)

    adapters: dict[str, str | None] = {}
    if materialize:
        from tasks.register.registry import get_alias_version, materialize_adapter

        versions = {CHALLENGER: challenger_version,
                    CHAMPION: champion_version or get_alias_version(name, CHAMPION)}
        for variant, version in versions.items():
            if version is None:
                continue
            path = materialize_adapter(version, model_name=name)
            adapters[variant] = str(path) if path is not None else None

    with session_scope(shadow_engine(engine)) as session:
        deployment_id = generation_id(session, base_id)
        ended = list(session.execute(
            select(Deployment.id).where(Deployment.model_name == name,
                                        Deployment.active.is_(True),
                                        Deployment.id != deployment_id)
        ).scalars())
        if ended:
            session.execute(update(Deployment).where(Deployment.id.in_(ended))
                            .values(active=False, ended_at=datetime.now(UTC)))
        upsert(session, Deployment, [{
            "id": deployment_id, "model_name": name, "champion_version": champion_version,
            "challenger_version": challenger_version, "mode": mode, "share": share,
            "active": True, "ended_at": None,
        }], update=["active", "ended_at"])
    log.info("deployment %s: %s v%s vs champion %s, mode=%s share=%.3f (ended %d)",
             deployment_id, name, challenger_version, champion_version or "@champion", mode,
             share, len(ended))
    return {"deployment_id": deployment_id, "model_name": name, "mode": mode, "share": share,
            "champion_version": champion_version, "challenger_version": challenger_version,
            "ended": ended, "adapters": adapters}


def deploy_registered(registered: Mapping[str, Any], *, mode: str = "canary",
                      share: float = 0.05) -> dict[str, Any]:
    """Deploy a version `tasks.register.stage.register_training` registered as the challenger;
    on a brand-new registry the base model becomes the champion first."""
    from tasks.register.registry import ensure_champion

    champion = ensure_champion(registered["model_name"], base_model=registered["base_model"])
    return deploy_challenger(
        registered["version"], champion_version=None, mode=mode, share=share,
        model_name=registered["model_name"], materialize=True,
    ) | {"champion": champion}


def end_deployment(deployment_id: str, *, engine: Any = None) -> bool:
    """Mark a deployment inactive (the router falls back to champion only); True if it was."""
    from sqlalchemy import update

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import Deployment

    with session_scope(shadow_engine(engine)) as session:
        result = session.execute(
            update(Deployment).where(Deployment.id == deployment_id, Deployment.active.is_(True))
            .values(active=False, ended_at=datetime.now(UTC))
        )
        return bool(result.rowcount)


def compare_and_report(
    deployment_id: str | None = None,
    *,
    min_samples: int = 100,
    alpha: float = 0.05,
    windows: SignalWindows | dict[str, Any] | None = None,
    judge: bool = True,
    out_dir: Path | str | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """`compare_variants` + `write_report`: the Airflow task's entry point.

    Returns the report (per-pair judge details left out, they are in report.json) plus
    "report_path", "report_uri" and "mlflow_run_id". Without any deployment: a
    keep_collecting stub with empty report_uri (a scheduled run must not fail for that).
    """
    try:
        report = compare_variants(deployment_id, min_samples=min_samples, alpha=alpha,
                                  windows=windows, judge=judge, engine=engine)
    except ShadowError:
        if deployment_id:
            raise
        log.info("no active deployment: nothing to compare")
        return {"deployment_id": None, "decision": "keep_collecting",
                "reasons": ["no active deployment"], "report_uri": "", "report_path": "",
                "mlflow_run_id": None}
    folder = Path(out_dir) if out_dir else get_settings().data_dir / "reports" / "shadow"
    written = write_report_files(report, folder, log_to_mlflow=log_to_mlflow,
                                 tracking_uri=tracking_uri, engine=engine)
    if report.get("pairwise"):
        report["pairwise"] = {k: v for k, v in report["pairwise"].items() if k != "details"}
    report.update(report_path=str(written["path"]), report_uri=written["report_uri"],
                  mlflow_run_id=written["mlflow_run_id"])
    return report


def apply_decision(report: dict[str, Any], enabled: bool, *, tracking_uri: str | None = None,
                   engine: Any = None) -> dict[str, Any]:
    """Act on a report: promote/rollback move the MLflow aliases and end the deployment.

    Disabled or keep_collecting → nothing changes. Refuses (ShadowError) when the champion alias
    no longer points at the report's champion (someone moved it since). Safe to rerun.
    Returns {"applied", "decision", "deployment_id", "champion_version", "challenger_version",
    "reason"}.
    """
    decision = report.get("decision")
    if decision not in DECISIONS:
        raise ShadowError(f"report decision {decision!r} is not one of {', '.join(DECISIONS)}",
                          deployment_id=report.get("deployment_id"))
    deployment_id = report.get("deployment_id")
    out: dict[str, Any] = {"applied": False, "decision": decision,
                           "deployment_id": deployment_id,
                           "champion_version": report.get("champion_version"),
                           "challenger_version": report.get("challenger_version"),
                           "reason": ""}
    if not enabled:
        out["reason"] = "automatic decisions are disabled"
        return out
    if decision == "keep_collecting" or not deployment_id:
        out["reason"] = "nothing to apply: keep collecting"
        return out
    name = report["model_name"]
    challenger = str(report["challenger_version"])
    client = mlflow_client(tracking_uri)
    current_champion = _alias_version(client, name, CHAMPION)
    expected = report.get("champion_version")
    already_promoted = decision == "promote" and current_champion == challenger
    if expected and current_champion not in (str(expected), None) and not already_promoted:
        raise ShadowError(
            f"the champion alias of {name} points at version {current_champion}, but the report "
            f"compared against version {expected}; rerun the comparison before applying",
            deployment_id=deployment_id, version=current_champion)
    if decision == "promote":
        client.set_registered_model_alias(name, CHAMPION, challenger)
        out["champion_version"] = challenger
        out["previous_champion_version"] = current_champion
    if _alias_version(client, name, CHALLENGER) == challenger:
        client.delete_registered_model_alias(name, CHALLENGER)
    end_deployment(deployment_id, engine=engine)
    _mark_applied(report.get("report_id"), engine)
    out["applied"] = True
    out["reason"] = "; ".join(report.get("reasons") or [])
    log.info("applied %s for deployment %s: champion=%s", decision, deployment_id,
             out["champion_version"])
    return out


def _mark_applied(report_id: str | None, engine: Any) -> None:
    if not report_id:
        return
    from sqlalchemy import update

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import ComparisonReport

    with session_scope(shadow_engine(engine)) as session:
        session.execute(update(ComparisonReport).where(ComparisonReport.id == report_id)
                        .values(applied=True))
