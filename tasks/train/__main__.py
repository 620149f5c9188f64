"""`python -m tasks.train`: the trainer's command line (also the container's post-train step).

    python -m tasks.train render  --dataset snap.jsonl [--set lora_r=8 ...]    print axolotl YAML
    python -m tasks.train check   --dataset snap.jsonl [--set ...]             sequence_len check
    python -m tasks.train local   --dataset snap.jsonl --output-dir out [--set ...]
    python -m tasks.train collect --config /config/axolotl.yaml --output-dir /output

`collect` is what docker/trainer/entrypoint.sh runs after `axolotl preprocess` and
`axolotl train`; it needs only pydantic and PyYAML. Output is JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.train.config import TrainingError, load_training_config


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r} (e.g. --set lora_r=8)")
        overrides[key.strip()] = yaml.safe_load(value)
    if getattr(args, "dataset", None):
        overrides["datasets"] = [{"path": str(Path(p).resolve())} for p in args.dataset]
    return overrides


def _config(args: argparse.Namespace):
    return load_training_config(_overrides(args), Path(args.config) if args.config else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("render", "check", "local"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--dataset", action="append", help="snapshot JSONL (repeatable)")
        cmd.add_argument("--config", help="defaults YAML (default include/training/lora.yaml)")
        cmd.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
        if name == "local":
            cmd.add_argument("--output-dir", required=True)
    collect = sub.add_parser("collect", help="after axolotl train, inside the container")
    collect.add_argument("--config", required=True)
    collect.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    try:
        if args.command == "render":
            print(_config(args).to_axolotl_yaml(), end="")
        elif args.command == "check":
            from transformers import AutoTokenizer

            from tasks.core.weights import resolve_base_model
            from tasks.train.data import check_sequence_len

            cfg = _config(args)
            tokenizer = AutoTokenizer.from_pretrained(str(resolve_base_model(cfg.base_model)))
            print(json.dumps([check_sequence_len(cfg, p, tokenizer) for p in cfg.dataset_paths()]))
        elif args.command == "local":
            from tasks.train.local import train_local

            result = train_local(_config(args), output_dir=Path(args.output_dir),
                                 progress=_print_progress)
            print(json.dumps(result.to_dict(), indent=2))
        else:
            from tasks.train.container import collect_axolotl_output

            print(json.dumps(collect_axolotl_output(args.config, args.output_dir), indent=2))
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_progress(event: dict) -> None:
    if "loss" in event:
        print(f"step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} "
              f"lr {event['learning_rate']:.2e} {event['tokens_per_s']:.0f} tok/s",
              file=sys.stderr)
    elif "eval_loss" in event:
        print(f"step {event['step']} eval_loss {event['eval_loss']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
