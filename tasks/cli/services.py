"""`tuneloop migrate | demo | serve-model | serve-router | generate | adapters`: the schema, the
offline demo, the two long-running services, conversation generation and the registry view (with
whether each version's signature verifies, and how to re-sign one that does not)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.cli.common import add_command, flag, params_of


def _migrate(_: argparse.Namespace) -> int:
    from tasks.core.db.engine import get_engine, migrate

    engine = get_engine()
    migrate(engine)
    print(f"tuneloop schema is up to date on {engine.url.render_as_string(hide_password=True)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tasks.demo import DemoConfig, run_demo

    params = params_of(args)
    run_demo(DemoConfig(conversations=params["conversations"], turns=params["turns"],
                        train_steps=params["train_steps"],
                        simulated_requests=params["simulated_requests"]))
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    from serving.model_server import main as serve

    # The keys travel in the environment (TUNELOOP_MODEL_SERVER_API_KEY / _ADMIN_KEY), never
    # on a command line that `ps` shows.
    roots = [arg for root in args.adapter_root for arg in ("--adapter-root", str(root))]
    return serve(["--host", args.host, "--port", str(args.port), *roots]) or 0


def _serve_router(args: argparse.Namespace) -> int:
    from serving.router import main as serve

    return serve(["--host", args.host, "--port", str(args.port)]) or 0


def _generate(args: argparse.Namespace) -> int:
    from tasks.generate.__main__ import main as generate

    rest = list(args.rest)
    if getattr(args, "verbose", False) and "--log-level" not in rest:
        rest += ["--log-level", "DEBUG"]
    return generate(rest, prog="tuneloop generate") or 0


def with_signatures(rows: Sequence[Mapping[str, Any]], model_name: str | None
                    ) -> list[dict[str, Any]]:
    """`rows` (tasks.register.view.list_adapters) each with `signed` (its tuneloop.signature
    verifies, gate aside: `materialize_adapter`'s check) and `signature_problem` (why not)."""
    if not rows:
        return []
    from tasks.core.settings import get_settings
    from tasks.core.signing import verify_version
    from tasks.register.tracking import get_client, registered_model_name

    name = registered_model_name(model_name)
    versions = {str(mv.version): mv
                for mv in get_client().search_model_versions(f"name = '{name}'")}
    key = get_settings().registry_signing_key
    annotated = []
    for row in rows:
        mv = versions.get(str(row["version"]))
        problem = ("deleted while listing" if mv is None else
                   verify_version(key, dict(mv.tags or {}), name=name, source=mv.source,
                                  run_id=mv.run_id, require_gate=False))
        annotated.append({**row, "signed": problem is None, "signature_problem": problem})
    return annotated


def _resign_hint(row: Mapping[str, Any]) -> str:
    if row.get("is_base"):
        return ("a base version cannot be re-registered; point the alias at a base version "
                "tuneloop signed")
    if not row.get("run_id"):
        return "it has no MLflow run, so it cannot be re-registered"
    return f'if it is yours, re-sign it: tuneloop register {row["run_id"]} --alias ""'


def signed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The registry table with a `signed` column, then why each unsigned version is not signed
    and the command that re-signs it."""
    from tasks.register.view import format_adapter_table

    table = format_adapter_table(rows)
    if not rows:
        return table
    lines = table.splitlines()  # header, dashes, one line per row
    width = max(len(line) for line in lines)
    cells = ["signed", "------", *("yes" if row["signed"] else "NO" for row in rows)]
    out = [f"{line.ljust(width)}  {cell}" for line, cell in zip(lines, cells, strict=True)]
    unsigned = [row for row in rows if not row["signed"]]
    if unsigned:  # the router serves none of these
        out += ["", f"{len(unsigned)} version(s) not signed; the router serves none of them:"]
        out += [f"  version {row['version']}: {row['signature_problem']}; {_resign_hint(row)}"
                for row in unsigned]
    return "\n".join(out)


def _adapters(args: argparse.Namespace) -> int:
    from tasks.register.view import list_adapters

    rows = with_signatures(list_adapters(args.model_name), args.model_name)
    print(json.dumps(rows, indent=2) if args.json else signed_table(rows))
    return 0


def register_first(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """migrate and generate: what a pipeline run starts with."""
    add_command(sub, "migrate", _migrate, parents=parents,
                summary="apply the Postgres schema (Alembic) to DATABASE_URL or the embedded DB",
                examples=["tuneloop migrate",
                          "DATABASE_URL=postgresql://u:pw@db:5432/tuneloop tuneloop migrate"])
    # Its flags are tasks.generate's own (`tuneloop generate --help` prints them): main() hands
    # everything after `generate` over unparsed.
    gen = sub.add_parser("generate", add_help=False, parents=parents,
                         help="generate synthetic conversations (mirrors generate_conversations; "
                              "`tuneloop generate --help` lists its flags)")
    gen.set_defaults(fn=_generate, flags={}, rest=[])


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """adapters, the two services and the demo."""
    from tasks.core.settings import DEFAULT_MODEL_SERVER_PORT, DEFAULT_ROUTER_PORT

    adapters = add_command(sub, "adapters", _adapters, parents=parents,
                           summary="list registered adapter versions side by side, and "
                                   "whether each one's signature verifies",
                           examples=["tuneloop adapters", "tuneloop adapters --json"])
    adapters.epilog += ('\n\nA version that is not signed is never served; `tuneloop register '
                        '<run_id> --alias ""` re-signs a version of yours.')
    adapters.add_argument("--model-name", default=None,
                          help="registered model (default: TUNELOOP_REGISTERED_MODEL_NAME)")
    adapters.add_argument("--json", action="store_true", help="print rows as JSON")

    model_keys = ("TUNELOOP_MODEL_SERVER_API_KEY=$(cat api.key) "
                  "TUNELOOP_MODEL_SERVER_ADMIN_KEY=$(cat admin.key) tuneloop serve-model "
                  "--host 0.0.0.0")
    servers = {}
    for name, fn, port, what, more in (
        ("serve-model", _serve_model, DEFAULT_MODEL_SERVER_PORT,
         "local OpenAI-compatible SmolLM2 server (+ LoRA adapters), behind bearer keys",
         [model_keys]),
        ("serve-router", _serve_router, DEFAULT_ROUTER_PORT,
         "champion/challenger router + reactions API", []),
    ):
        server = add_command(sub, name, fn, parents=parents, summary=what,
                             examples=[f"tuneloop {name}",
                                       f"tuneloop {name} --host 0.0.0.0 --port {port}", *more])
        server.add_argument("--host", default="127.0.0.1")
        server.add_argument("--port", type=int, default=port)
        servers[name] = server
    servers["serve-model"].add_argument(
        "--adapter-root", type=Path, action="append", default=[],
        help="extra folder whose sub-folders are adapters (repeatable); <data_dir>/adapters is "
             "always one. POST /v1/adapters only accepts folders inside these roots")

    demo = add_command(sub, "demo", _demo, parents=parents,
                       summary="run the whole loop offline on embedded defaults",
                       examples=["tuneloop demo", "tuneloop demo --conversations 20 "
                                 "--train-steps 4 --requests 120"])
    flag(demo, "--conversations", type=int, default=50, help="conversations to generate")
    flag(demo, "--turns", type=int, default=1, help="user+assistant exchanges")
    flag(demo, "--train-steps", type=int, default=10, help="LoRA steps")
    flag(demo, "--requests", "simulated_requests", type=int, default=240,
         help="simulated router requests")
