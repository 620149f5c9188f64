"""`tuneloop shadow-deploy | shadow-compare`: put a registered challenger behind the router, and
compare it with the champion on live reactions (optionally acting on the decision)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tasks.cli.common import (
    EXIT_OK,
    add_command,
    build_config,
    emit,
    flag,
    params_of,
    refusals,
    resolve_version,
    say,
)

log = logging.getLogger(__name__)

REPORT_KEYS = ("deployment_id", "model_name", "mode", "decision", "reasons", "champion_version",
               "challenger_version", "report_path", "report_uri", "mlflow_run_id")


def _shadow_deploy(args: argparse.Namespace) -> int:
    from tasks.cli.params import ShadowDeployParams

    cfg = build_config(ShadowDeployParams.from_params, params_of(args), args.flags,
                       "shadow deployment")
    from tasks.register.registry import RegistryError, ensure_champion, get_version_info
    from tasks.shadow.config import ShadowError
    from tasks.shadow.stage import deploy_challenger

    with refusals(RegistryError, ShadowError):
        version, name = resolve_version(args.version, args.model_name, "challenger")
        champion = None
        if args.champion_version is None:  # as the DAG: a brand-new registry gets a base champion
            base_model = get_version_info(version, model_name=name)["tags"].get("base_model")
            champion = ensure_champion(name, base_model=base_model)
        deployment = deploy_challenger(version, champion_version=args.champion_version,
                                       mode=cfg.mode, share=cfg.share, model_name=name,
                                       materialize=not args.no_materialize)
    emit({**deployment, "champion": champion})
    return EXIT_OK


def _shadow_compare(args: argparse.Namespace) -> int:
    from tasks.cli.params import ShadowCompareParams

    cfg = build_config(ShadowCompareParams.from_params, params_of(args), args.flags,
                       "shadow comparison")
    from tasks.shadow.config import ShadowError
    from tasks.shadow.stage import apply_decision, compare_and_report

    with refusals(ShadowError):
        report = compare_and_report(deployment_id=cfg.deployment_id or None,
                                    min_samples=cfg.min_samples, alpha=cfg.alpha,
                                    judge=not args.no_judge)
        if report.get("report_uri"):
            say(f"shadow comparison report: {report['report_uri']}")
        applied = apply_decision(report, enabled=cfg.apply_decision)
    emit({**{k: report.get(k) for k in REPORT_KEYS}, "applied": applied})
    return EXIT_OK


def _deploy_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    deploy = add_command(
        sub, "shadow-deploy", _shadow_deploy, parents=parents,
        mirrors="the train_and_register DAG's shadow_deploy task",
        summary="make a registered version the active challenger behind the router",
        examples=["tuneloop shadow-deploy",
                  "tuneloop shadow-deploy --version 3 --share 0.1",
                  "tuneloop shadow-deploy --version 3 --mode mirror --share 1.0"])
    deploy.epilog += ("\n\nThe previous active deployment of the model ends; the router picks "
                      "the new one up within its deployment TTL. Rerunning is a no-op.")
    deploy.add_argument("--version", default=None,
                        help="challenger version (default: the challenger alias)")
    deploy.add_argument("--champion-version", default=None,
                        help="pin the champion (default: whatever the champion alias points at "
                             "while serving; a brand-new registry gets the base model)")
    flag(deploy, "--mode", choices=("canary", "mirror"), default="canary",
         help="canary: a share of users is served by the challenger; mirror: their requests "
              "are copied to it")
    flag(deploy, "--share", type=float, default=0.05, help="share of users")
    deploy.add_argument("--model-name", default=None,
                        help="registered model (default: TUNELOOP_REGISTERED_MODEL_NAME)")
    deploy.add_argument("--no-materialize", action="store_true",
                        help="do not download the adapters into <data_dir>/adapters first")


def _compare_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    compare = add_command(
        sub, "shadow-compare", _shadow_compare, parents=parents,
        mirrors="the shadow_compare DAG",
        summary="compare champion and challenger on live reactions and write the HTML report",
        examples=["tuneloop shadow-compare",
                  "tuneloop shadow-compare --min-samples 50 --alpha 0.1",
                  "tuneloop shadow-compare --apply   # promote / roll back when the rule says so"])
    compare.epilog += ("\n\nThe decision is promote, keep_collecting or rollback; only --apply "
                       "moves the MLflow champion alias and ends the deployment.")
    flag(compare, "--deployment-id", default="", help="empty = the active deployment")
    flag(compare, "--min-samples", type=int, default=100,
         help="per-variant minimum before any decision")
    flag(compare, "--alpha", type=float, default=0.05, help="significance level")
    flag(compare, "--apply", "apply_decision", action="store_true",
         help="act on the decision: move the champion alias (promote) or drop the challenger "
              "(rollback)")
    compare.add_argument("--no-judge", action="store_true",
                         help="skip the pairwise judge on mirrored answers")


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    _deploy_parser(sub, parents)
    _compare_parser(sub, parents)
