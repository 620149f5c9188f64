"""What every `tuneloop` subcommand shares: exit codes, the two user-facing errors, the help
layout ("examples:" epilog), flag values → stage config with one-line errors, and the JSON
summary line.

Only the standard library is imported here: `tuneloop --help` must stay fast, so each command
imports its stage inside the function that runs it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3
EXIT_STATUS_HELP = ("exit status: 0 done, 1 the stage refused or failed (the message says why), "
                    "2 bad flags, 3 skipped (nothing to do yet)")

T = TypeVar("T")


class UsageError(Exception):
    """A flag value the stage's config rejects; the message names the flag and the fix (exit 2)."""


class CommandError(Exception):
    """The stage refused to run or failed in a way its message explains (exit 1)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written, and each flag's default shown (unless it is None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


def verbose_parent() -> argparse.ArgumentParser:
    """`-v/--verbose` for every subcommand; SUPPRESS keeps `tuneloop -v cmd` working too."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging (on stderr) and tracebacks for errors")
    return parent


def add_command(sub: Any, name: str, fn: Callable[[argparse.Namespace], int], *, summary: str,
                examples: Sequence[str], mirrors: str | None = None,
                parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """A subcommand with a one-line description and an "examples:" epilog."""
    description = summary + (f"\n\nMirrors {mirrors}." if mirrors else "")
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser = sub.add_parser(name, help=summary, description=description, epilog=epilog,
                            formatter_class=HelpFormatter, parents=list(parents))
    parser.set_defaults(fn=fn, flags={})
    return parser


def flag(parser: argparse.ArgumentParser, option: str, field: str | None = None,
         **kwargs: Any) -> None:
    """`parser.add_argument(option, ...)` and remember which config field it sets, so an error
    about `field` can name `option`."""
    dest = field or option.lstrip("-").replace("-", "_")
    if not kwargs.get("help") and kwargs.get("default") not in (None, ""):
        kwargs["help"] = "default: %(default)s"
    parser.add_argument(option, dest=dest, **kwargs)
    parser.get_default("flags")[dest] = option


def csv_list(value: str) -> list[str]:
    """`a,b,c` → [a, b, c]; "" or "none" → [] (argparse type)."""
    if value.strip().lower() in ("", "none"):
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


def positive_int(value: str) -> int:
    """An integer >= 1 (argparse type; the error names the flag)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {number})")
    return number


def params_of(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command's flags set ({field: value}), as the DAG Params would."""
    return {dest: getattr(args, dest) for dest in args.flags if hasattr(args, dest)}


def _problem(item: str, flags: Mapping[str, str]) -> str:
    field, sep, message = item.partition(": ")
    if not sep:
        return item.removeprefix("Value error, ")
    message = message.removeprefix("Value error, ")
    if field in ("?", ""):  # a model-level rule: name the flags of the fields it mentions
        named = [option for name, option in flags.items() if re.search(rf"\b{name}\b", message)]
        return f"{', '.join(named)}: {message}" if named else message
    option = flags.get(field.split(".")[0].split("[")[0])
    if option is None:
        return f"{field}: {message}"
    return f"{option}: {message}" if field in message else f"{option} ({field}): {message}"


def one_line(message: str, flags: Mapping[str, str] | None = None) -> str:
    """A config error ("invalid X config:\\n  field: msg\\n  ...") as one line, each bad field
    named by its flag."""
    flags = flags or {}
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return message
    if len(lines) == 1:
        return _problem(lines[0], flags)
    return lines[0] + " " + "; ".join(_problem(item, flags) for item in lines[1:])


def build_config(factory: Callable[[dict[str, Any]], T], params: dict[str, Any],
                 flags: Mapping[str, str], label: str) -> T:
    """`factory(params)` (the stage's `from_params`, as its DAG calls it); a rejected value is a
    UsageError naming the flag, the field and the fix."""
    from pydantic import ValidationError

    from tasks.core.configs import validation_lines

    try:
        return factory(params)
    except ValidationError as exc:
        message = f"invalid {label} config:\n" + "\n".join(validation_lines(exc))
        raise UsageError(one_line(message, flags)) from None
    except ValueError as exc:
        raise UsageError(one_line(str(exc), flags)) from None


@contextmanager
def refusals(*errors: type[BaseException]) -> Iterator[None]:
    """Turn the stage's own "cannot proceed" errors (their messages say the fix) into a
    CommandError: one line on stderr, exit 1, no traceback (unless --verbose)."""
    try:
        yield
    except errors as exc:
        raise CommandError(one_line(str(exc))) from exc


def emit(result: Mapping[str, Any]) -> None:
    """The command's summary: one JSON line on stdout (logs go to stderr)."""
    print(json.dumps(result, sort_keys=True, default=str), flush=True)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_UNDEFINED_TABLE = re.compile(r"UndefinedTable|no such table|relation .* does not exist")


def missing_schema(exc: BaseException) -> bool:
    """True when `exc` (a SQLAlchemy error) says the tuneloop tables do not exist yet."""
    orig = getattr(exc, "orig", None)
    return orig is not None and bool(_UNDEFINED_TABLE.search(f"{type(orig).__name__} {orig}"))


def resolve_version(version: str | None, model_name: str | None, alias: str) -> tuple[str, str]:
    """(version, registered model name): `version`, else the version `alias` points at."""
    from tasks.register.registry import get_alias_version, registered_model_name

    name = registered_model_name(model_name)
    resolved = version or get_alias_version(name, alias)
    if not resolved:
        raise CommandError(f"{name} has no {alias} alias yet; train and register a version first "
                           "(tuneloop train) or pass --version N")
    return str(resolved), name
