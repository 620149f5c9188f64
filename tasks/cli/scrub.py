"""`tuneloop scrub`: de-identify text lines or JSONL from stdin to stdout, the pipeline's way."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from tasks.cli.common import EXIT_OK, CommandError, add_command


def _scrub(args: argparse.Namespace) -> int:
    from tasks.datasets.deid.stream import StreamError, scrub_lines

    counts: Counter[str] = Counter()
    lines = 0
    try:
        for line in scrub_lines(sys.stdin, jsonl=args.jsonl, fields=args.field,
                                pseudonymize=args.pseudonyms, counts=counts):
            sys.stdout.write(line + "\n")
            lines += 1
    except StreamError as exc:
        raise CommandError(str(exc)) from None
    finally:
        sys.stdout.flush()
        if args.report:  # counts per category, never the values
            print(json.dumps({"lines": lines, "replaced": sum(counts.values()),
                              "categories": dict(sorted(counts.items()))}), file=sys.stderr)
    return EXIT_OK


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    scrub = add_command(
        sub, "scrub", _scrub, parents=parents,
        summary="de-identify text lines or JSONL read on stdin and write them to stdout (the "
                "same scrubber as every dataset export)",
        examples=["tuneloop scrub < notes.txt > notes.clean.txt",
                  "tuneloop scrub --field messages.content --field context --report "
                  "< interactions.jsonl > shareable.jsonl",
                  "tuneloop scrub --jsonl --pseudonyms < chats.jsonl"])
    scrub.epilog += (
        "\n\nPlain lines are scrubbed as text. With --field (repeatable; dotted paths go through "
        "objects and lists) each line is a JSON record and only those values are scrubbed; "
        "with --jsonl every string value is, and user-id fields are hashed with "
        "TUNELOOP_USER_HASH_SALT. --report prints counts per category to stderr, never the "
        "values.")
    scrub.add_argument("--field", action="append", default=[], metavar="NAME",
                       help="a JSON field to scrub (repeatable); implies --jsonl")
    scrub.add_argument("--jsonl", action="store_true",
                       help="read JSON records; without --field every string value is scrubbed")
    scrub.add_argument("--pseudonyms", action="store_true",
                       help="numbered placeholders, consistent within a line (<PERSON_1> ...)")
    scrub.add_argument("--report", action="store_true",
                       help="print counts per category (never the values) to stderr")
