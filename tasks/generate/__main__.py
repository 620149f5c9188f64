"""CLI: generate synthetic conversations locally (plan + all shards + finalize, progress bar).

    python -m tasks.generate --count 10 --turns 2 [--seed S] [--preview N]

`--preview N` renders the first N conversations of the batch and prints them without writing
anything (like the DAG's `preview` Param); otherwise the full batch runs against DATABASE_URL (or
the embedded Postgres), migrating the schema first, and the final summary is printed as one JSON
line on stdout. A rerun of the same command resumes where an interrupted one stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

EXAMPLES = """examples:
  {prog} --count 10 --turns 2
  {prog} --preview 3
  {prog} --count 200 --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
"""


def _parser(prog: str = "python -m tasks.generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                epilog=EXAMPLES.format(prog=prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10, help="conversations to generate (default 10)")
    p.add_argument("--turns", type=int, default=2, help="user+assistant exchanges (default 2)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--persona-set", default="default")
    p.add_argument("--preview", type=int, default=0, metavar="N",
                   help="print the first N conversations and stop (no writes)")
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None, help="conversations in flight")
    p.add_argument("--base-url", default=None, help="endpoint for both roles")
    p.add_argument("--model", default=None, help="model for both roles")
    p.add_argument("--generator-base-url", default=None)
    p.add_argument("--generator-model", default=None)
    p.add_argument("--user-sim-base-url", default=None)
    p.add_argument("--user-sim-model", default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=None)
    p.add_argument("--max-retries", type=int, default=None)
    p.add_argument("--edge-case-share", type=float, default=None)
    p.add_argument("--document-share", type=float, default=None)
    p.add_argument("--no-dedup", action="store_true", help="skip embedding-based dedup")
    p.add_argument("--no-cache", action="store_true", help="do not use the LLM response cache")
    p.add_argument("--retry-failed", action="store_true", help="regenerate items stored as failed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="WARNING")
    return p


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationConfig fields the flags set (unset flags keep the config defaults)."""
    values: dict[str, Any] = {"count": args.count, "turns": args.turns, "seed": args.seed,
                              "persona_set": args.persona_set, "preview": args.preview}
    optional = {
        "shard_size": args.shard_size, "concurrency": args.concurrency,
        "generator_base_url": args.generator_base_url or args.base_url,
        "user_sim_base_url": args.user_sim_base_url or args.base_url,
        "generator_model": args.generator_model or args.model,
        "user_sim_model": args.user_sim_model or args.model,
        "temperature": args.temperature, "max_tokens": args.max_tokens,
        "timeout_s": args.timeout_s, "max_retries": args.max_retries,
        "edge_case_share": args.edge_case_share, "document_share": args.document_share,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    if args.no_dedup:
        values["dedup"] = False
    if args.no_cache:
        values["use_cache"] = False
    if args.retry_failed:
        values["retry_failed"] = True
    return values


def main(argv: Sequence[str] | None = None, prog: str = "python -m tasks.generate") -> int:
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tasks.generate import GenerationConfig, format_preview, preview, run_generation

    try:
        cfg = GenerationConfig(**config_from_args(args))
    except ValidationError as exc:
        problems = "\n  ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        print(f"invalid generation options:\n  {problems}", file=sys.stderr)
        return 2

    if cfg.preview > 0:
        print(format_preview(preview(cfg, cfg.preview)))
        return 0

    from tqdm import tqdm

    from tasks.core.db.engine import get_engine, migrate

    migrate(get_engine())
    counts = {"ok": 0, "failed": 0}
    with tqdm(total=cfg.count, unit="conv", disable=args.no_progress, file=sys.stderr,
              desc="generating") as bar:
        def progress(event: dict[str, Any]) -> None:
            if event["event"] == "skipped":
                bar.update(event["count"])
                bar.set_postfix_str(f"resumed {event['count']}")
                return
            counts[event["status"]] = counts.get(event["status"], 0) + 1
            bar.update(1)
            bar.set_postfix(counts, refresh=False)

        summary = run_generation(cfg, progress=progress)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
