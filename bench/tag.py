"""Benchmark: tagging throughput end to end, and tokens for combined vs separate tagger prompts.

1. Throughput. N conversations (default 1000) × the five LLM taggers go through `run_tagging`'s
   engine (plan → shards → worker pool → LLMClient with the Postgres response cache → fake
   OpenAI server in a subprocess at 1 s latency → parse → batched upserts of tag_results) with 64
   requests in flight. ideal = requests × latency / in-flight; the line prints
   `ratio=<ideal/achieved>` (target >= 0.90). A bare `AsyncOpenAI` loop sending as many requests
   against the same server in the same run gives the practical ceiling on this machine
   (`bare ... ratio=`); `tagging vs bare` is the share of that ceiling the pipeline keeps.
2. Tokens per conversation, counted with the SmolLM2 tokenizer over the chat-templated prompt
   (what the local model server would see): one combined request doing all five taggers vs five
   separate requests; and for the rubric judge, all criteria in one request vs one request per
   criterion. Completion tokens are counted on the fake server's (schema-shaped) replies.

    .venv/bin/python bench/tag.py [--conversations 1000] [--concurrency 64] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fakes.fake_openai import FakeOpenAIServer  # noqa: E402

ADMIN_URL = os.environ.get("TUNELOOP_TEST_ADMIN_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
RESPONDER = "tests.fakes.tag_responders:tagging_responder"
TAGGERS = ("emotion", "topic", "temporal", "belief", "hallucination")

_OPENERS = [
    "I'm worried about my job interview tomorrow and I think I will freeze.",
    "My sister keeps cancelling our plans and honestly I'm fed up with it.",
    "I want to start running but I always give up after a week.",
    "How do I make a budget when my income changes every month?",
    "I believe family comes first, but my boss wants me to work every weekend.",
    "Last year I failed my driving test and I'm scared to try again.",
    "I can't focus on my thesis, I keep checking my phone.",
    "I'm so happy, I finally got the apartment I wanted!",
]
_REPLIES = [
    "That sounds stressful. It might help to write down three things you want to say.",
    "It makes sense to feel that way. Could you tell her how the cancellations affect you?",
    "A study shows 73% of beginners quit in the first month, so start with ten minutes.",
    "Try a baseline budget from your lowest month and treat anything above it as savings.",
    "It sounds like two things you value are pulling in different directions.",
    "Many people pass on the second try. What felt hardest last time?",
    "Putting the phone in another room for 25-minute blocks often helps.",
    "Congratulations! Moving in is a big milestone.",
]


def make_conversations(n: int, batch: str) -> list[dict]:
    rng = random.Random(42)
    rows = []
    for i in range(n):
        turns = []
        for _ in range(2):
            turns.append({"role": "user", "content": f"{rng.choice(_OPENERS)} (#{i})"})
            turns.append({"role": "assistant", "content": rng.choice(_REPLIES)})
        rows.append({"id": f"{batch}-{i:05d}", "batch_id": batch, "item_index": i,
                     "messages": turns, "system_prompt": "You are a warm everyday coach."})
    return rows


def create_database() -> tuple[str, str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"tuneloop_bench_tag_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


async def bare_ceiling(base_url: str, n: int, concurrency: int) -> float:
    """Seconds for n plain AsyncOpenAI calls with `concurrency` in flight (tagger prompts)."""
    import openai

    from tasks.tag.backends import get_tagger
    from tasks.tag.taggers import ConversationInput

    tagger = get_tagger("emotion", "llm", "fake-model")
    conv = ConversationInput("bare", [{"role": "user", "content": _OPENERS[0]}])
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            await client.chat.completions.create(
                model="fake-model", messages=tagger.format_input(conv), temperature=0.0,
                max_tokens=512)

    await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm the pool
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed


def throughput(args: argparse.Namespace) -> None:
    name, url = create_database()
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("TUNELOOP_DATA_DIR", str(Path("/tmp") / f"tuneloop-bench-{name}"))
    from tasks.core.settings import get_settings

    get_settings.cache_clear()
    from tasks.core.db.engine import get_engine, migrate, session_scope, upsert
    from tasks.core.db.models import Conversation, GenerationBatch, TagResult
    from tasks.core.llm.client import run_sync
    from tasks.tag.config import TaggingConfig
    from tasks.tag.stage import _run, plan_tagging

    try:
        migrate(get_engine())
        batch = "bench-tag"
        with session_scope() as s:
            upsert(s, GenerationBatch, [{"id": batch, "seed": 42,
                                         "requested": args.conversations}])
            rows = make_conversations(args.conversations, batch)
            for start in range(0, len(rows), 1000):
                upsert(s, Conversation, rows[start:start + 1000])
        with FakeOpenAIServer(latency_s=args.latency, responder=RESPONDER,
                              subprocess=True) as server:
            cfg = TaggingConfig(
                taggers=list(TAGGERS), backends=dict.fromkeys(TAGGERS, "llm"),
                tagger_base_url=server.base_url, tagger_model="fake-model", judges=[],
                max_in_flight=args.concurrency, batch_ids=[batch], retries=3)
            bare_n = args.bare_requests or args.conversations * len(TAGGERS)
            bare_s = asyncio.run(bare_ceiling(server.base_url, bare_n, args.concurrency))
            bare_ideal = bare_n * args.latency / args.concurrency
            server.reset()
            started = time.perf_counter()
            shards = plan_tagging(cfg)
            counts = run_sync(_run(cfg, shards, do_tags=True, do_judge=False))
            elapsed = time.perf_counter() - started
            served = server.stats()["total"]
        with session_scope() as s:
            from sqlalchemy import func, select

            stored = s.scalar(select(func.count()).select_from(TagResult))
        requests = args.conversations * len(TAGGERS)
        ideal = requests * args.latency / args.concurrency
        print(f"tagging: {args.conversations} conversations x {len(TAGGERS)} taggers = "
              f"{requests} requests ({served} served), {args.concurrency} in flight, "
              f"{args.latency:g}s latency, {len(shards)} shards, {stored} tag_results stored, "
              f"response cache + batched upserts on")
        print(f"tagging: elapsed={elapsed:.1f}s ideal={ideal:.1f}s ratio={ideal / elapsed:.3f}")
        print(f"bare AsyncOpenAI ({bare_n} requests, same server): elapsed={bare_s:.1f}s "
              f"ideal={bare_ideal:.1f}s ratio={bare_ideal / bare_s:.3f}")
        print(f"tagging vs bare: {(ideal / elapsed) / (bare_ideal / bare_s):.3f}")
        if counts["failed"] or stored != requests:
            print(f"WARNING: failed={counts['failed']} stored={stored}")
    finally:
        from tasks.core.db.engine import engine_for

        engine_for(url).dispose()
        drop_database(name)


def _tokenizer():
    from transformers import AutoTokenizer

    from tasks.core.weights import SMOLLM2_NAME, smollm2_gguf

    cache = Path(os.environ.get("TUNELOOP_MODEL_CACHE",
                                Path.home() / ".cache" / "tuneloop-models")) / SMOLLM2_NAME
    if (cache / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cache))
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def tokens(args: argparse.Namespace) -> None:
    from tasks.judge.rubric import load_rubric
    from tasks.judge.stage import combined_messages as judge_combined
    from tasks.judge.stage import criterion_messages
    from tasks.tag.backends import get_tagger
    from tasks.tag.taggers import ConversationInput, combined_messages
    from tests.fakes.tag_responders import tagging_responder

    tokenizer = _tokenizer()

    def prompt_tokens(messages: list[dict]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def reply_tokens(messages: list[dict]) -> int:
        reply = tagging_responder({"model": "fake-model", "messages": messages})
        return len(tokenizer(reply)["input_ids"])

    taggers = [get_tagger(n, "llm", "fake-model") for n in TAGGERS]
    rubric = load_rubric()
    sample = make_conversations(args.token_sample, "tok")
    sep_prompt, sep_reply, comb_prompt, comb_reply = [], [], [], []
    judge_per, judge_comb = [], []
    for row in sample:
        conv = ConversationInput(row["id"], row["messages"], row["system_prompt"])
        separate = [t.format_input(conv) for t in taggers]
        combined = combined_messages(taggers, conv)
        sep_prompt.append(sum(prompt_tokens(m) for m in separate))
        sep_reply.append(sum(reply_tokens(m) for m in separate))
        comb_prompt.append(prompt_tokens(combined))
        comb_reply.append(reply_tokens(combined))
        judge_per.append(sum(prompt_tokens(criterion_messages(rubric, c, row["messages"]))
                             for c in rubric.criterion_ids()))
        judge_comb.append(prompt_tokens(judge_combined(rubric, row["messages"])))
    mean = statistics.fmean
    print(f"tokens per conversation (SmolLM2 tokenizer, chat template, mean of "
          f"{len(sample)} conversations):")
    print(f"taggers separate (5 requests): prompt={mean(sep_prompt):.0f} "
          f"completion={mean(sep_reply):.0f} total={mean(sep_prompt) + mean(sep_reply):.0f}")
    print(f"taggers combined (1 request):  prompt={mean(comb_prompt):.0f} "
          f"completion={mean(comb_reply):.0f} total={mean(comb_prompt) + mean(comb_reply):.0f}")
    print(f"taggers combined/separate prompt ratio={mean(comb_prompt) / mean(sep_prompt):.3f} "
          f"total ratio={(mean(comb_prompt) + mean(comb_reply)) / (mean(sep_prompt) + mean(sep_reply)):.3f}")
    n_criteria = len(rubric.criterion_ids())
    print(f"judge per criterion ({n_criteria} requests): prompt={mean(judge_per):.0f}; "
          f"judge combined (1 request): prompt={mean(judge_comb):.0f}; "
          f"combined/per-criterion ratio={mean(judge_comb) / mean(judge_per):.3f}; "
          f"largest single judge prompt: per-criterion="
          f"{max(prompt_tokens(criterion_messages(rubric, c, sample[0]['messages'])) for c in rubric.criterion_ids())} "
          f"combined={max(judge_comb)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--token-sample", type=int, default=50)
    parser.add_argument("--bare-requests", type=int, default=None,
                        help="requests for the bare AsyncOpenAI ceiling (default: as many as "
                             "the tagging run sends)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-tokens", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_tokens:
        tokens(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
