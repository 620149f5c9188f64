"""`tuneloop train | evaluate | register`: the train_and_register DAG's steps by hand — resolve
the dataset, prepare, train, collect and register (`train`), evaluate a registered version
(`evaluate`), and register (or re-register and so re-sign) one training run's adapter
(`register`)."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from typing import Any

from tasks.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SKIPPED,
    CommandError,
    UsageError,
    add_command,
    emit,
    flag,
    one_line,
    params_of,
    positive_int,
    refusals,
    resolve_version,
    say,
)

log = logging.getLogger(__name__)

# tasks.train.stage.BACKENDS, spelled here so `--help` imports no stage (a test holds them equal).
BACKENDS = ("local", "docker", "kubernetes")
# Params of dags/train_and_register.py that shape the Axolotl config (the rest pick the dataset
# and the backend); tests/unit/test_cli.py holds the defaults equal to the DAG's.
TRAINING_FLAGS = ("base_model", "num_epochs", "max_steps", "learning_rate", "lora_r")
# What `tuneloop register --alias` may point at the version ("" = move no alias); the names are
# tasks.register.registry's CHALLENGER and CHAMPION (a test holds them equal).
REGISTER_ALIASES = ("challenger", "champion", "")
# An MLflow run id as MLflow itself validates one (mlflow.utils.validation).
RUN_ID = re.compile(r"[a-zA-Z0-9][\w-]{0,255}")


def check_training_flags(params: Mapping[str, Any], flags: Mapping[str, str]) -> None:
    """Validate the training flags with the trainer's own config validation before any database
    or dataset work, so a bad value fails at once (exit 2) naming the flag and the fix."""
    from tasks.train.config import TrainingConfigError, load_training_config

    overrides = {k: params[k] for k in TRAINING_FLAGS if params.get(k) is not None}
    if overrides.get("max_steps") == 0:  # 0 = no cap, as in the DAG
        overrides.pop("max_steps")
    try:
        load_training_config({**overrides, "datasets": [{"path": "dataset.jsonl"}]})
    except TrainingConfigError as exc:
        raise UsageError(one_line(str(exc), flags)) from None


def _log_progress(event: dict) -> None:
    if "loss" in event:
        log.info("step %s/%s loss %.4f lr %.2e", event["step"], event["total_steps"],
                 event["loss"], event["learning_rate"])
    elif "eval_loss" in event:
        log.info("step %s eval_loss %.4f", event["step"], event["eval_loss"])


def _container_next_step(prepared: Mapping[str, Any]) -> str:
    """How to run the trainer container this prepared run waits for."""
    if prepared["backend"] == "kubernetes":
        return (f"run the trainer pod on the run folder {prepared['run_dir']} (the "
                "train_and_register DAG with backend=kubernetes does), then rerun this command "
                "to collect and register")
    from tasks.core.settings import get_settings

    model = (f" -v {prepared['host_model_dir']}:/models/base:ro"
             if prepared.get("host_model_dir") else "")
    return (f"docker run --rm --gpus all --shm-size 16g -v {prepared['host_config_dir']}:/config:ro"
            f" -v {prepared['host_output_dir']}:/output{model} {get_settings().trainer_image} "
            f"{prepared['container_config_path']}   # then rerun this command to collect and "
            "register")


def _train(args: argparse.Namespace) -> int:
    params = params_of(args)
    check_training_flags(params, args.flags)
    from tasks.register.registry import RegistryError
    from tasks.register.stage import register_training
    from tasks.train.config import TrainingError
    from tasks.train.stage import (
        DatasetNotTrainable,
        collect_training,
        prepare_training,
        resolve_dataset,
        run_local_training,
    )

    with refusals(DatasetNotTrainable, TrainingError, RegistryError):
        prepared = prepare_training(resolve_dataset(params["dataset_id"] or None), params)
        if prepared["backend"] == "local":
            run_local_training(prepared, progress=_log_progress)
        try:
            trained = collect_training(prepared)
        except TrainingError as exc:
            if prepared["backend"] == "local":
                raise
            say(f"the {prepared['backend']} trainer has not produced output yet ({exc}); "
                f"next: {_container_next_step(prepared)}")
            emit({"status": "prepared", "backend": prepared["backend"],
                  "run_dir": prepared["run_dir"], "dataset_id": prepared["dataset"]["dataset_id"],
                  "next": _container_next_step(prepared)})
            return EXIT_SKIPPED
        registered = None if args.no_register else register_training(prepared, trained)
    emit({"status": "registered" if registered else "trained",
          "dataset_id": prepared["dataset"]["dataset_id"], "backend": prepared["backend"],
          "run_key": prepared["run_key"], "run_dir": prepared["run_dir"],
          "adapter_dir": trained["adapter_dir"], "metrics": trained["metrics"],
          "registered": registered})
    return EXIT_OK


def _val_path(version: str, model_name: str) -> str:
    """The validation split of the dataset `version` was trained on (its dataset_id tag)."""
    from tasks.register.registry import get_version_info
    from tasks.train.stage import resolve_dataset

    dataset_id = get_version_info(version, model_name=model_name)["tags"].get("dataset_id")
    if not dataset_id or dataset_id in ("unknown", "none"):
        raise CommandError(f"version {version} of {model_name} records no dataset_id; pass "
                           "--val-path <validation.jsonl>")
    return resolve_dataset(dataset_id)["val_path"]


def _evaluate(args: argparse.Namespace) -> int:
    from tasks.core.settings import get_settings
    from tasks.evaluate.config import EvaluationError
    from tasks.evaluate.stage import evaluate_version
    from tasks.register.registry import RegistryError
    from tasks.train.stage import DatasetNotTrainable

    with refusals(EvaluationError, RegistryError, DatasetNotTrainable):
        version, name = resolve_version(args.version, args.model_name, "challenger")
        val_path = args.val_path or _val_path(version, name)
        limits = {k: getattr(args, k) for k in ("max_scenarios", "max_val_rows", "max_new_tokens")
                  if getattr(args, k) is not None}
        out_dir = get_settings().data_dir / "reports" / "model-cards" / f"{name}-v{version}"
        result = evaluate_version(version, val_path=val_path, model_name=name, out_dir=out_dir,
                                  **limits)
    emit(result)
    return EXIT_OK


def _register(args: argparse.Namespace) -> int:
    if not RUN_ID.fullmatch(args.run_id):
        raise UsageError(f"RUN_ID {args.run_id!r} is not an MLflow run id; pass the full run id "
                         "`tuneloop adapters --json` lists (run_id) or the MLflow UI shows")
    from tasks.core.settings import get_settings
    from tasks.core.signing import verify_version
    from tasks.register.registry import RegistryError, get_version_info, register_version

    with refusals(RegistryError):
        registered = register_version(args.run_id, model_name=args.model_name, alias=args.alias)
        info = get_version_info(registered["version"], model_name=registered["model_name"])
    # As `tuneloop adapters` and materialize_adapter check it: the gate is the router's to add.
    problem = verify_version(get_settings().registry_signing_key, info["tags"],
                             name=info["model_name"], source=info["source"],
                             run_id=info["run_id"], require_gate=False)
    emit({**registered, "signed": problem is None, "signature_problem": problem,
          "gate_passed": info["tags"].get("gate_passed")})
    if problem:  # signed, but over lineage tuneloop cannot vouch for: never served
        log.error("version %s of %s is registered but does not verify: %s; the run lacks the "
                  "dataset lineage tuneloop signs, so train it again from a gated dataset "
                  "(`tuneloop train`)", info["version"], info["model_name"], problem)
        return EXIT_FAILED
    return EXIT_OK


def _train_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    train = add_command(
        sub, "train", _train, parents=parents,
        mirrors="the train_and_register DAG's prepare, train and register tasks",
        summary="train a LoRA adapter on a gated dataset and register it in MLflow (alias "
                "challenger)",
        examples=["tuneloop train",
                  "tuneloop train --dataset-id ds-1a2b3c --max-steps 20 --lora-r 8",
                  "tuneloop train --backend docker   # prepares the run; prints the docker run"])
    train.epilog += (
        "\n\nTrains and registers by default (--no-register stops after training); then "
        "`tuneloop evaluate` and `tuneloop shadow-deploy` take the new version (the challenger "
        "alias).\nA rerun with the same dataset and flags reuses the finished run folder. With "
        "--backend docker or kubernetes the command prepares the run folder and exits 3 until "
        "the trainer container has run; rerun it then to collect and register.")
    flag(train, "--dataset-id", default="", help="empty = the newest dataset whose gate passed")
    flag(train, "--base-model", default="smollm2-135m-instruct")
    flag(train, "--num-epochs", type=int, default=1)
    flag(train, "--max-steps", type=int, default=0, help="0 = no cap")
    flag(train, "--learning-rate", type=float, default=2e-4)
    flag(train, "--lora-r", type=int, default=16)
    flag(train, "--backend", choices=BACKENDS, default=None,
         help="where to train (default: TUNELOOP_TRAINER_BACKEND, local)")
    train.add_argument("--no-register", action="store_true",
                       help="train only; do not log the run to MLflow or register a version")


def _evaluate_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    evaluate = add_command(
        sub, "evaluate", _evaluate, parents=parents,
        mirrors="the train_and_register DAG's evaluate task",
        summary="evaluate a registered adapter against its base model and write the model card",
        examples=["tuneloop evaluate", "tuneloop evaluate --version 3 --max-scenarios 2",
                  "tuneloop evaluate --version 3 --val-path data/validation.jsonl"])
    evaluate.add_argument("--version", default=None,
                          help="registered version (default: the challenger alias)")
    evaluate.add_argument("--model-name", default=None,
                          help="registered model (default: TUNELOOP_REGISTERED_MODEL_NAME)")
    evaluate.add_argument("--val-path", default=None,
                          help="validation JSONL (default: the version's dataset's split)")
    evaluate.add_argument("--max-scenarios", type=positive_int, default=None,
                          help="evaluate an evenly spread subset of the scenarios")
    evaluate.add_argument("--max-val-rows", type=positive_int, default=None,
                          help="validation rows for perplexity (default 200)")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=None,
                          help="reply length per scenario (default 128)")


def _register_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    reg = add_command(
        sub, "register", _register, parents=parents,
        summary="register a training run's adapter as a signed model version (re-registering "
                "re-signs it)",
        examples=["tuneloop register 0a1b2c3d4e5f60718293a4b5c6d7e8f9",
                  'tuneloop register 0a1b2c3d4e5f60718293a4b5c6d7e8f9 --alias ""   # re-sign, '
                  "move no alias",
                  "tuneloop register 0a1b2c3d4e5f60718293a4b5c6d7e8f9 --model-name my-assistant"])
    reg.epilog += (
        "\n\nIdempotent: a run already registered keeps its version, whose registration tags "
        "are re-asserted from the run and signed again. That is how a version registered before "
        "signing (or one `tuneloop adapters` shows as not signed) becomes servable. `tuneloop "
        "train` registers by itself; the run ids are in `tuneloop adapters --json`.")
    reg.add_argument("run_id", metavar="RUN_ID", help="the MLflow run whose adapter/ to register")
    reg.add_argument("--alias", choices=REGISTER_ALIASES, default="challenger",
                     metavar="{challenger,champion,\"\"}",
                     help='alias to point at the version; "" moves none (champion promotes it '
                          "without a shadow comparison)")
    reg.add_argument("--model-name", default=None,
                     help="registered model (default: TUNELOOP_REGISTERED_MODEL_NAME)")


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    _train_parser(sub, parents)
    _evaluate_parser(sub, parents)
    _register_parser(sub, parents)
