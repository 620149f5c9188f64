"""`tuneloop <command>` (also `python -m tasks.cli`): one command line, a subcommand per stage and
service, each calling the same stage functions its DAG calls with the same config.

    data       migrate, generate, tag, curate, import-reactions, build-reaction-dataset,
               forget, retention, scrub
    model      train (+ register), evaluate, register, shadow-deploy, shadow-compare, adapters
    services   serve-model, serve-router, demo
    security   secrets (init a production .env, add/revoke router clients, check)

Each command prints a one-line JSON summary on stdout and logs on stderr; `tuneloop <command>
--help` shows its flags (the DAG's Params) and examples. A bad flag value fails before any work
with one line naming the flag and the fix (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tasks.cli import data, model, secrets, services, shadow
from tasks.cli.common import (
    EXIT_FAILED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    CommandError,
    HelpFormatter,
    UsageError,
    missing_schema,
    verbose_parent,
)

__all__ = ["build_parser", "main"]

EXAMPLES = """examples:
  tuneloop migrate
  tuneloop generate --count 20 && tuneloop tag && tuneloop curate && tuneloop train
  tuneloop shadow-deploy && tuneloop shadow-compare --apply

""" + EXIT_STATUS_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneloop", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging (on stderr) and tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    parents = [verbose_parent()]
    services.register_first(sub, parents)  # in pipeline order: migrate, generate, ...
    data.register(sub, parents)
    model.register(sub, parents)
    shadow.register(sub, parents)
    services.register(sub, parents)  # ..., adapters, serve-model, serve-router, demo
    secrets.register(sub, parents)
    parser.set_defaults(commands=sub.choices)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """`generate` hands everything after its name to tasks.generate's own parser."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "generate":
        args.rest = rest
    elif rest:  # exits 2 with the subcommand's usage
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # one INFO line per HTTP request / migration step drowns the progress
        for noisy in ("httpx", "httpx2", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    _configure_logging(args.verbose)
    from tasks.core.settings import SettingsError

    prefix = f"tuneloop {args.command}: error:"
    try:
        return int(args.fn(args) or 0)
    except (UsageError, SettingsError) as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        if args.verbose:
            raise
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if args.verbose or not missing_schema(exc):
            raise
        print(f"{prefix} the tuneloop tables do not exist on this database; run "
              "`tuneloop migrate` first", file=sys.stderr)
        return EXIT_FAILED
