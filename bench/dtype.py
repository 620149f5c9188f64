"""Benchmark: float32 vs bfloat16 for what the offline loop runs on the CPU, side by side.

`TUNELOOP_MODEL_DTYPE=auto` serves, evaluates and holds the frozen LoRA base in bfloat16 where
the CPU computes it natively (AVX512-BF16 / AMX). This measures why, on SmolLM2-135M-Instruct,
interleaving the two dtypes over `--reps` rounds so machine noise hits both alike:

- `serve`: the model server's own `ChatModel` decoding `--concurrency` different chat requests in
  one dynamic batch (prefill + `--tokens` new tokens each) → aggregate completion tokens/s;
- `train`: LoRA steps (r=16 on q/k/v/o, batch `--train-batch` x `--train-len` tokens, AdamW),
  base in float32 vs base in bfloat16 with float32 adapters → seconds per step.

Each prints `ratio=` bf16 / float32 (throughput: higher is better; step time is inverted so
that > 1 also means bf16 is faster), the CPU's bf16 support and the load average.

    .venv/bin/python bench/dtype.py [--tokens 48] [--concurrency 8] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "Write a long story about a dragon who learns to bake.",
    "Describe, step by step, how to plant a vegetable garden in spring.",
    "Tell me a long fairy tale about a clever fox.",
    "Explain in detail how a steam engine works, for a curious twelve-year-old reader.",
    "Write a travel diary of a week spent walking across the mountains of Scotland.",
    "List and describe ten kinds of clouds.",
    "Write a long letter from a lighthouse keeper to his sister.",
    "I feel stuck at work and keep procrastinating. What could I try this week?",
]


def serve_tokens_per_s(chat_model, tokens: int, concurrency: int) -> float:
    import queue

    from serving.generation import GenerationParams

    params = GenerationParams(temperature=0, max_tokens=tokens)
    prepared = [chat_model.prepare(chat_model.model_name,
                                   [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                   params) for i in range(concurrency)]
    sinks = [queue.SimpleQueue() for _ in prepared]
    old = chat_model.batching_info()
    chat_model.configure_batching(max_batch_size=concurrency, batch_window_ms=2_000)
    started = time.perf_counter()
    for request, sink in zip(prepared, sinks, strict=True):
        chat_model.submit(request, sink.put)
    produced = 0
    for sink in sinks:
        while True:
            event = sink.get()
            if isinstance(event, BaseException):
                raise event
            if event.finish_reason is not None:
                produced += event.completion_tokens
                break
    elapsed = time.perf_counter() - started
    chat_model.configure_batching(max_batch_size=old["max_batch_size"],
                                  batch_window_ms=old["batch_window_ms"])
    return produced / elapsed


def lora_step_seconds(dtype, batch: int, length: int, steps: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.core.weights import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj",
                                                             "o_proj"]))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    times = []
    for _ in range(steps + 1):  # the first step warms up kernels
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-len", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()

    from serving.generation import ChatModel
    from tasks.core.weights import SMOLLM2_NAME, cpu_has_native_bf16, smollm2_path

    print(f"cpu_native_bf16={cpu_has_native_bf16()} cpus={os.cpu_count()} "
          f"loadavg={os.getloadavg()[0]:.1f}")
    models = {dtype: ChatModel(smollm2_path(), model_name=SMOLLM2_NAME, dtype=dtype)
              for dtype in ("float32", "bfloat16")}
    serve: dict[str, list[float]] = {dtype: [] for dtype in models}
    train: dict[str, list[float]] = {dtype: [] for dtype in models}
    import torch

    for _ in range(args.reps):
        for dtype, chat_model in models.items():
            serve[dtype].append(serve_tokens_per_s(chat_model, args.tokens, args.concurrency))
            train[dtype].append(lora_step_seconds(getattr(torch, dtype), args.train_batch,
                                                  args.train_len, args.train_steps))
    for chat_model in models.values():
        chat_model.close()
    s32, s16 = statistics.median(serve["float32"]), statistics.median(serve["bfloat16"])
    t32, t16 = statistics.median(train["float32"]), statistics.median(train["bfloat16"])
    print(f"serve: {args.concurrency} requests x {args.tokens} tokens in one batch: "
          f"float32 {s32:.1f} tok/s, bfloat16 {s16:.1f} tok/s, ratio={s16 / s32:.2f}")
    print(f"train: LoRA step {args.train_batch}x{args.train_len} tokens: float32 {t32:.2f} s, "
          f"bfloat16 base {t16:.2f} s, ratio={t32 / t16:.2f}")
    print(f"loadavg_after={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
