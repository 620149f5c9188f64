"""`python -m tasks.cli <command>`: the local entry points (the same functions the DAGs call).

Commands: migrate, demo, serve-model, serve-router, generate, adapters.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _migrate(_: argparse.Namespace) -> int:
    from tasks.core.db.engine import get_engine, migrate

    engine = get_engine()
    migrate(engine)
    print(f"tuneloop schema is up to date on {engine.url.render_as_string(hide_password=True)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tasks.demo import DemoConfig, run_demo

    run_demo(DemoConfig(conversations=args.conversations, turns=args.turns,
                        train_steps=args.train_steps, simulated_requests=args.requests))
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    from serving.model_server import main as serve

    return serve(["--host", args.host, "--port", str(args.port)]) or 0


def _serve_router(args: argparse.Namespace) -> int:
    from serving.router import main as serve

    return serve(["--host", args.host, "--port", str(args.port)]) or 0


def _generate(args: argparse.Namespace) -> int:
    from tasks.generate.__main__ import main as generate

    return generate(args.rest) or 0


def _adapters(_: argparse.Namespace) -> int:
    from tasks.register.view import main as view

    return view([]) or 0


def build_parser() -> argparse.ArgumentParser:
    from tasks.core.settings import DEFAULT_MODEL_SERVER_PORT, DEFAULT_ROUTER_PORT

    parser = argparse.ArgumentParser(prog="tuneloop", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the Postgres schema").set_defaults(fn=_migrate)

    demo = sub.add_parser("demo", help="run the whole loop offline on embedded defaults")
    demo.add_argument("--conversations", type=int, default=50)
    demo.add_argument("--turns", type=int, default=1)
    demo.add_argument("--train-steps", type=int, default=10)
    demo.add_argument("--requests", type=int, default=240)
    demo.set_defaults(fn=_demo)

    model = sub.add_parser("serve-model", help="local OpenAI-compatible SmolLM2 server")
    model.add_argument("--host", default="127.0.0.1")
    model.add_argument("--port", type=int, default=DEFAULT_MODEL_SERVER_PORT)
    model.set_defaults(fn=_serve_model)

    router = sub.add_parser("serve-router", help="champion/challenger router + reactions API")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=DEFAULT_ROUTER_PORT)
    router.set_defaults(fn=_serve_router)

    gen = sub.add_parser("generate", help="generate conversations (see --help)")
    gen.add_argument("rest", nargs=argparse.REMAINDER)
    gen.set_defaults(fn=_generate)

    sub.add_parser("adapters", help="list registered adapters side by side").set_defaults(
        fn=_adapters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one INFO line per HTTP request / migration step drowns the progress
        for noisy in ("httpx", "httpx2", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from tasks.core.settings import SettingsError

    try:
        return int(args.fn(args) or 0)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
