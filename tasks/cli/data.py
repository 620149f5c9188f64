"""`tuneloop tag | curate | import-reactions | build-reaction-dataset` (and `scrub`,
tasks.cli.scrub): the data stages, with their DAGs' Params as flags (same names, same defaults)
and the same config classes (`from_params`) the DAGs build;
`tuneloop forget | retention`: erasure of one end user and the retention purge
(tasks.signals.erasure; the nightly_refresh DAG runs the purge when TUNELOOP_RETENTION_DAYS is
set)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tasks.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SKIPPED,
    CommandError,
    UsageError,
    add_command,
    build_config,
    csv_list,
    emit,
    flag,
    one_line,
    params_of,
    positive_int,
    refusals,
    say,
)

log = logging.getLogger(__name__)

# The Params of dags/tag_conversations.py, dags/curate_dataset.py and
# dags/build_reaction_dataset.py with their defaults (tests/unit/test_cli.py holds them equal).
TAGGERS = ["emotion", "topic", "temporal", "belief", "hallucination"]
JUDGES = ["judge", "judge2"]
# TaggingConfig.from_params maps these Param names onto its fields; errors name the fields.
TAG_FIELD_FLAGS = {"backends": "--classifier-backend", "policy": "--judge-policy",
                   "batch_ids": "--batch-id"}


def _tag(args: argparse.Namespace) -> int:
    from tasks.tag.config import TaggingConfig

    cfg = build_config(TaggingConfig.from_params, params_of(args),
                       {**args.flags, **TAG_FIELD_FLAGS}, "tagging")
    from tqdm import tqdm

    from tasks.core.settings import get_settings
    from tasks.tag.stage import run_tagging

    out_dir = get_settings().data_dir / "reports" / "tagging"  # where the DAG's stats task writes
    with tqdm(desc="tag + judge", unit="task", disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = run_tagging(cfg, progress=progress, out_dir=out_dir)
    emit(result)
    return EXIT_OK


def _curate(args: argparse.Namespace) -> int:
    from tasks.curate.config import CurationConfig, CurationError

    cfg = build_config(CurationConfig.from_params, params_of(args), args.flags, "curation")
    from tasks.curate.stage import curate

    with refusals(CurationError):
        result = curate(cfg)
    emit(result)
    if not result["gate_passed"]:  # the DAG's gate_passed short-circuit: training does not run
        log.error("gate failed for dataset %s: %s (Data Docs: %s)", result["dataset_id"],
                  ", ".join(result["failed_expectations"]), result.get("data_docs"))
        return EXIT_FAILED
    return EXIT_OK


def _build_reaction_dataset(args: argparse.Namespace) -> int:
    from tasks.signals.stage import SignalConfig, build_reaction_dataset_or_skip

    cfg = build_config(SignalConfig.from_params, params_of(args), args.flags, "signal")
    result = build_reaction_dataset_or_skip(cfg)
    emit(result)
    if not result.get("built"):  # too few signals (the stage logged the counts): a skip, as
        return EXIT_SKIPPED       # the DAG's enough_signals short-circuit
    if not result.get("gate_passed", True):
        log.error("gate failed for dataset %s: %s", result.get("dataset_id"),
                  ", ".join(result.get("failed_expectations") or []))
        return EXIT_FAILED
    return EXIT_OK


def _import_reactions(args: argparse.Namespace) -> int:
    from tasks.signals.import_config import ImportConfig

    cfg = build_config(ImportConfig.from_params, params_of(args), args.flags, "import")
    from tqdm import tqdm

    from tasks.signals.importing import ImportRejected, ImportSourceError, import_reactions

    with tqdm(desc="import", unit="row", disable=None) as bar:
        def progress(rows: int) -> None:
            bar.n = rows
            bar.refresh()

        try:
            result = import_reactions(cfg, progress=progress)
        except ImportRejected as exc:  # the report (bad rows by line/key) still goes to stdout
            emit(exc.summary)
            raise CommandError(one_line(str(exc))) from exc
        except ImportSourceError as exc:
            raise CommandError(one_line(str(exc))) from exc
    emit(result)
    return EXIT_OK


def _forget(args: argparse.Namespace) -> int:
    from tasks.signals.erasure import ErasureError, forget_user, forget_user_hash

    try:
        if args.user_hash is not None:
            result = forget_user_hash(args.user_hash)
        else:
            result = forget_user(args.user)
    except ErasureError as exc:  # a bad --user / --user-hash value
        raise UsageError(str(exc)) from None
    snapshots = result["snapshots"]
    say(f"user {result['user_hash'][:12]}…: {result['reactions_deleted']} reactions deleted, "
        f"{result['interactions_erased']} interactions wiped; their interactions are in "
        f"{len(snapshots)} existing dataset snapshot(s)"
        + (" (retire or rebuild them):" if snapshots else ""))
    for snapshot in snapshots:
        say(f"  {snapshot['dataset_id']}  {snapshot['name']} ({snapshot['kind']}, "
            f"{snapshot['items']} items of theirs)  {snapshot['artifact_uri']}")
    emit(result)
    return EXIT_OK


def _retention(args: argparse.Namespace) -> int:
    from tasks.core.settings import get_settings
    from tasks.signals.erasure import ErasureError, purge_expired_text

    days = args.days if args.days is not None else get_settings().retention_days
    if days is None:
        raise UsageError("no retention period: pass --days N (e.g. --days 90) or set "
                         "TUNELOOP_RETENTION_DAYS")
    try:
        result = purge_expired_text(days)
    except ErasureError as exc:  # TUNELOOP_RETENTION_DAYS below 1
        raise UsageError(str(exc)) from None
    emit(result)
    return EXIT_OK


def _tag_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    tag = add_command(
        sub, "tag", _tag, parents=parents, mirrors="the tag_conversations DAG",
        summary="run the taggers and the rubric judge over conversations missing a result",
        examples=["tuneloop tag",
                  "tuneloop tag --batch-id b-1a2b3c --taggers emotion,topic --judges judge",
                  "tuneloop tag --classifier-backend llm --retries 20 --judges none"])
    flag(tag, "--taggers", type=csv_list, default=TAGGERS, metavar="A,B",
         help="comma-separated taggers to run")
    flag(tag, "--classifier-backend", choices=("embedding", "llm"), default="embedding",
         help="backend for emotion/topic/temporal")
    flag(tag, "--retries", type=int, default=3,
         help="LLM attempts per tagger before recording a failure")
    flag(tag, "--judges", type=csv_list, default=JUDGES, metavar="A,B",
         help="comma-separated judge slots; 'none' skips judging")
    flag(tag, "--judge-policy", choices=("both", "either"), default="both")
    flag(tag, "--batch-id", default="", help="limit to one generation batch (empty = all)")
    flag(tag, "--shard-size", type=int, default=50)


def _curate_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    curate = add_command(
        sub, "curate", _curate, parents=parents, mirrors="the curate_dataset DAG",
        summary="filter tagged conversations, run the Great Expectations gate and write a "
                "dataset snapshot",
        examples=["tuneloop curate",
                  "tuneloop curate --batch-id b-1a2b3c --min-rows 5",
                  "tuneloop curate --require-rubric-pass --max-hallucination 0.05 "
                  "--val-fraction 0.2"])
    flag(curate, "--max-hallucination", type=float, default=0.1)
    flag(curate, "--min-emotion-confidence", type=float, default=0.0)
    flag(curate, "--require-rubric-pass", action=argparse.BooleanOptionalAction, default=False,
         help="drop rows whose rubric score is below the pass threshold (safety-gate failures "
              "always drop)")
    flag(curate, "--min-rows", type=int, default=10)
    flag(curate, "--batch-id", default="", help="limit to one generation batch (empty = all)")
    flag(curate, "--seed", type=int, default=13)
    flag(curate, "--val-fraction", type=float, default=None,
         help="validation share in [0, 0.5) (default: the config's 0.1)")
    flag(curate, "--pseudonymize", action=argparse.BooleanOptionalAction, default=False,
         help="numbered placeholders consistent within a conversation (<PERSON_1>) instead of "
              "typed ones (<PERSON>)")


def _import_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    imp = add_command(
        sub, "import-reactions", _import_reactions, parents=parents,
        mirrors="the import_reactions DAG",
        summary="import a reaction log (CSV, JSONL or a SQL query) through a mapping file as "
                "de-identified interactions + reactions the reaction dataset uses",
        examples=["tuneloop import-reactions --mapping tip_scores --file tip_scores.csv",
                  "tuneloop import-reactions --mapping tip_scores --file tips.jsonl "
                  "--allow-bad 10",
                  "tuneloop import-reactions --mapping my_mapping.yaml --sql \"SELECT * FROM "
                  "tip_scores\" --source-url postgresql://reader@app-db:5432/app",
                  "tuneloop import-reactions --mapping tip_scores --file tips.csv --dry-run"])
    imp.epilog += (
        "\n\nThe mapping (include/mappings/<name>.yaml or a path) names the source columns of "
        "user, prompt, response, action, dwell and timestamp. User ids are hashed with "
        "TUNELOOP_USER_HASH_SALT (so `tuneloop forget --user ID` covers them) and texts are "
        "scrubbed before they are stored. Importing the same log again adds nothing. Any bad "
        "row fails the run and writes nothing, unless --allow-bad N lets up to N be skipped; "
        "the summary lists them by line (files) or row and key (SQL). Put a database password "
        "in PGPASSWORD or ~/.pgpass rather than in --source-url.")
    flag(imp, "--mapping", default="",
         help="a shipped mapping's name (tip_scores) or a mapping YAML file")
    flag(imp, "--file", default="", help="the CSV or JSONL log to import")
    flag(imp, "--format", choices=("auto", "csv", "jsonl"), default="auto",
         help="the file's format (auto: from its suffix)")
    flag(imp, "--sql", default="", help="a read-only query whose rows are the log")
    flag(imp, "--source-url", default="", metavar="URL",
         help="the PostgreSQL database --sql runs on (default: tuneloop's own, DATABASE_URL)")
    flag(imp, "--allow-bad", "max_bad_rows", type=int, default=0, metavar="N",
         help="skip and report up to N bad rows instead of failing")
    flag(imp, "--dry-run", action=argparse.BooleanOptionalAction, default=False,
         help="parse, de-identify and count, then roll back")


def _signals_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    build = add_command(
        sub, "build-reaction-dataset", _build_reaction_dataset, parents=parents,
        mirrors="the build_reaction_dataset DAG",
        summary="turn served interactions and their reactions into an SFT + DPO dataset",
        examples=["tuneloop build-reaction-dataset",
                  "tuneloop build-reaction-dataset --min-positive 50 --min-negative 50",
                  "tuneloop build-reaction-dataset --done-min-ms 10000 --dismiss-max-ms 3000"])
    build.epilog += ("\n\nBelow the minimum signal counts nothing is built: the summary says "
                     "\"built\": false with the counts, and the exit status is 3 (skipped).")
    flag(build, "--min-positive", type=int, default=500)
    flag(build, "--min-negative", type=int, default=500)
    flag(build, "--done-min-ms", type=int, default=15000,
         help="a `done` counts as positive from this dwell ...")
    flag(build, "--done-max-ms", type=int, default=120000, help="... up to this dwell")
    flag(build, "--dismiss-max-ms", type=int, default=5000,
         help="a `dismiss` under this dwell counts as negative")
    flag(build, "--pseudonymize", action=argparse.BooleanOptionalAction, default=False,
         help="numbered placeholders consistent within a conversation (<PERSON_1>) instead of "
              "typed ones (<PERSON>)")
    flag(build, "--max-examples-per-user", type=int, default=50,
         help="at most this many examples from one (hashed) user; 0 = no cap")


def _erasure_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    forget = add_command(
        sub, "forget", _forget, parents=parents,
        summary="erase one end user: delete their reactions, wipe their interactions' text and "
                "list the existing dataset snapshots that hold them",
        examples=["tuneloop forget --user alice@example.com",
                  "tuneloop forget --user-hash 3f2a...c9e1  # 64 hex characters"])
    forget.epilog += (
        "\n\nThe id is hashed with TUNELOOP_USER_HASH_SALT, as the router does. The rows stay "
        "(existing snapshots keep their references); future reaction datasets leave the user "
        "out. Running it again is harmless: it reports 0 new rows and the same snapshots.")
    who = forget.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="ID", help="the user id the client sent the router")
    who.add_argument("--user-hash", metavar="HEX",
                     help="the router's hash of the user id (interactions.user_hash)")
    retention = add_command(
        sub, "retention", _retention, parents=parents,
        mirrors="the nightly_refresh DAG's purge_expired_text task",
        summary="wipe the text (prompts, answers, context) of interactions older than N days",
        examples=["tuneloop retention", "tuneloop retention --days 90"])
    retention.add_argument("--days", type=positive_int, default=None,
                           help="keep this many days of text (default: TUNELOOP_RETENTION_DAYS)")


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from tasks.cli import scrub

    _tag_parser(sub, parents)
    _curate_parser(sub, parents)
    _import_parser(sub, parents)
    _signals_parser(sub, parents)
    _erasure_parser(sub, parents)
    scrub.register(sub, parents)
