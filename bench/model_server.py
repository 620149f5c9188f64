"""Benchmark: what the local model server costs on top of the bare model, measured side by side.

One SmolLM2 load; the same greedy request (same prompt, `--tokens` new tokens) runs, interleaved
over `--reps` rounds so machine noise hits every variant alike, as:

- `hf_generate`: `model.generate(do_sample=False)` in process (transformers' own loop);
- `direct`: `ChatModel.generate` in process (our token loop: sampling, stop handling, decoding);
- `http`: the official `openai` client against the server (background thread, real HTTP);
- `http_stream`: the same with `stream=True` (SSE), plus time to first token.

Each line prints tokens/s and `ratio=` against `direct` (and `direct` against `hf_generate`), so
1.0 means "no overhead". `ttft_ratio` = time to first streamed token / full streamed latency.

Then dynamic batching: `--concurrency` (8) different greedy requests sent at once over HTTP, on
the same server and model, with batching (`max_batch_size=8`) and without (`max_batch_size=1`),
interleaved over the reps. Aggregate tokens/s = all completion tokens / wall time of the burst;
`batching_ratio` = batched / unbatched; `vs_single_http` = batched aggregate / the single-request
`http` rate; `outputs_identical` says whether every batched greedy reply equals its unbatched one;
`rows_per_step` = mean requests sharing a forward pass. The machine's load average is printed
with the numbers, since on a shared machine they move with it.

    .venv/bin/python bench/model_server.py [--tokens 32] [--reps 3] [--threads 1]
                                           [--concurrency 8] [--skip-single]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MESSAGES = [{"role": "user", "content": "Write a long story about a dragon who learns to bake."}]
BURST_PROMPTS = [  # different lengths and topics: rows of a batch are padded differently
    "Write a long story about a dragon who learns to bake.",
    "Write a detailed essay about the history of the sea and the ships that sailed it.",
    "Describe, step by step, how to plant a vegetable garden in spring.",
    "Tell me a long fairy tale about a clever fox.",
    "Explain in detail how a steam engine works, for a curious twelve-year-old reader.",
    "Write a travel diary of a week spent walking across the mountains of Scotland.",
    "List and describe ten kinds of clouds.",
    "Write a long letter from a lighthouse keeper to his sister.",
]


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests sent at once in the batching comparison")
    parser.add_argument("--skip-single", action="store_true",
                        help="only run the batching comparison")
    args = parser.parse_args()
    load_before = _load()

    import torch
    from openai import OpenAI

    from serving.generation import ChatModel, GenerationParams
    from serving.model_server import running_model_server
    from tasks.core.settings import get_settings
    from tasks.core.weights import SMOLLM2_NAME, smollm2_path

    chat_model = ChatModel(smollm2_path(), model_name=SMOLLM2_NAME, num_threads=args.threads)
    params = GenerationParams(temperature=0, max_tokens=args.tokens)
    prepared = chat_model.prepare(SMOLLM2_NAME, MESSAGES, params)
    prompt = torch.tensor([prepared.prompt_ids])

    def hf_generate() -> tuple[float, int, float | None]:
        started = time.perf_counter()
        with torch.inference_mode():
            out = chat_model.model.generate(prompt, max_new_tokens=args.tokens, do_sample=False,
                                            attention_mask=torch.ones_like(prompt))
        return time.perf_counter() - started, out.shape[1] - prompt.shape[1], None

    def direct() -> tuple[float, int, float | None]:
        started = time.perf_counter()
        completion = chat_model.generate(prepared)
        return time.perf_counter() - started, completion.completion_tokens, None

    # The server takes TUNELOOP_MODEL_SERVER_API_KEY (settings), so the client sends that.
    api_key = get_settings().model_server_api_key.get_secret_value()
    with running_model_server(chat_model=chat_model) as base_url, \
            OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600) as client:

        def http() -> tuple[float, int, float | None]:
            started = time.perf_counter()
            response = client.chat.completions.create(
                model=SMOLLM2_NAME, messages=MESSAGES, temperature=0, max_tokens=args.tokens)
            return time.perf_counter() - started, response.usage.completion_tokens, None

        def http_stream() -> tuple[float, int, float | None]:
            started = time.perf_counter()
            first: float | None = None
            tokens = 0
            for chunk in client.chat.completions.create(
                    model=SMOLLM2_NAME, messages=MESSAGES, temperature=0, max_tokens=args.tokens,
                    stream=True, stream_options={"include_usage": True}):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return time.perf_counter() - started, tokens, first

        prompts = [BURST_PROMPTS[i % len(BURST_PROMPTS)] for i in range(args.concurrency)]

        def burst(max_batch_size: int) -> tuple[float, int, list[str], float]:
            """All prompts at once over HTTP: (wall s, completion tokens, texts, rows/step)."""
            chat_model.configure_batching(max_batch_size=max_batch_size)
            steps, rows = chat_model.stats["decode_steps"], chat_model.stats["decode_rows"]

            def one(prompt: str) -> tuple[int, str]:
                response = client.chat.completions.create(
                    model=SMOLLM2_NAME, messages=[{"role": "user", "content": prompt}],
                    temperature=0, max_tokens=args.tokens)
                return response.usage.completion_tokens, response.choices[0].message.content

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
                results = list(pool.map(one, prompts))
            elapsed = time.perf_counter() - started
            steps = chat_model.stats["decode_steps"] - steps
            rows = chat_model.stats["decode_rows"] - rows
            return (elapsed, sum(t for t, _ in results), [text for _, text in results],
                    rows / max(steps, 1))

        variants = {} if args.skip_single else {
            "hf_generate": hf_generate, "direct": direct, "http": http, "http_stream": http_stream}
        for fn in variants.values():  # warm-up: first-call allocations, connection pool
            fn()
        burst(args.concurrency)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        ttft: list[float] = []
        burst_rates: dict[str, list[float]] = {"batched": [], "unbatched": []}
        occupancy: dict[str, list[float]] = {"batched": [], "unbatched": []}
        identical = True
        for _ in range(args.reps):
            for name, fn in variants.items():
                elapsed, tokens, first = fn()
                rates[name].append(tokens / elapsed)
                if first is not None:
                    ttft.append(first / elapsed)
            texts: dict[str, list[str]] = {}
            for name, size in (("unbatched", 1), ("batched", args.concurrency)):
                elapsed, tokens, texts[name], rows_per_step = burst(size)
                burst_rates[name].append(tokens / elapsed)
                occupancy[name].append(rows_per_step)
            identical = identical and texts["batched"] == texts["unbatched"]

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"model_server bench: {args.tokens} greedy tokens, {args.reps} interleaved reps, "
          f"torch threads={torch.get_num_threads()}, load average {load_before} -> {_load()} "
          f"on {os.cpu_count()} cores")
    if variants:
        print(f"hf_generate  tokens/s={median['hf_generate']:.1f}")
        print(f"direct       tokens/s={median['direct']:.1f}  "
              f"ratio={median['direct'] / median['hf_generate']:.2f} (vs hf_generate)")
        for name in ("http", "http_stream"):
            print(f"{name:<12} tokens/s={median[name]:.1f}  "
                  f"ratio={median[name] / median['direct']:.2f} (vs direct)")
        print(f"http_stream  ttft_ratio={statistics.median(ttft):.3f} "
              "(time to first token / full latency)")
    batched = statistics.median(burst_rates["batched"])
    unbatched = statistics.median(burst_rates["unbatched"])
    n = args.concurrency
    print(f"http_x{n}_unbatched aggregate tokens/s={unbatched:.1f}  (max_batch_size=1, "
          f"rows_per_step={statistics.median(occupancy['unbatched']):.2f})")
    print(f"http_x{n}_batched   aggregate tokens/s={batched:.1f}  (max_batch_size={n}, "
          f"rows_per_step={statistics.median(occupancy['batched']):.2f})")
    single = f"  vs_single_http={batched / median['http']:.2f}" if variants else ""
    print(f"batching_ratio={batched / unbatched:.2f}{single}  outputs_identical={identical}")


if __name__ == "__main__":
    main()
