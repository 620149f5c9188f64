"""Benchmark: filter + gate + export of 100k curated rows, Postgres lineage writes included.

Builds 100k synthetic candidate rows in memory (three-turn conversations, tags, rubric outcomes,
384-d embeddings with planted near duplicates, planted PII, ~15% edge cases), then runs the real
curation pipeline (`tasks.curate.stage.curate_rows`): length measurement with the SmolLM2 tokenizer,
row filters, LSH near-duplicate pruning, de-identification, the Great Expectations gate with Data
Docs, the snapshot files (3 formats × train/validation × training/provenance, stats PNG+JSON)
and the datasets / dataset_items / dataset_exclusions rows in a throwaway Postgres database.

Prints rows/s and `gate_share=<gate time / total>` (target <= 0.20). The tokenizer load and the
conversation rows the lineage foreign keys point at are set up before the clock starts; the
cold `import great_expectations` is timed separately and printed with both shares.

    .venv/bin/python bench/curate.py [--rows 100000] [--no-db]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_TMP = Path(tempfile.mkdtemp(prefix="tuneloop-bench-curate-"))
os.environ["TUNELOOP_DATA_DIR"] = str(_TMP / "data")
os.environ.setdefault("TUNELOOP_MODEL_CACHE", str(Path.home() / ".cache" / "tuneloop-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

WORDS = ("I keep feeling stuck with my manager and the deadlines at work while trying to sleep "
         "better save money for a trip call my friend more often and keep a morning routine that "
         "actually works maybe a short walk after lunch would help or writing three tasks down "
         "before bed so the next day feels lighter and less rushed").split()
TOPICS = ["work_career", "study_learning", "relationships", "health_wellbeing", "money_planning",
          "stress_emotions", "productivity_habits"]


def build_rows(n: int, seed: int = 7):
    from tasks.curate.rows import CandidateRow

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    near = rng.choice(n, size=n // 100, replace=False)  # 1% near duplicates of row i - 1
    for i in near[near > 0]:
        v = vectors[i - 1] + 0.1 * rng.standard_normal(384).astype(np.float32) / np.sqrt(384)
        vectors[i] = v / np.linalg.norm(v)
    hallucination = np.clip(rng.beta(1.2, 20, n), 0, 1)  # ~9% above 0.1
    confidence = rng.uniform(0.3, 1.0, n)
    lengths = rng.integers(12, 70, size=(n, 4))
    lengths[rng.random(n) < 0.05, 3] = 350  # 5% long replies: over the byte bound, tokenized
    lengths[rng.random(n) < 0.01, 3] = 2500  # 1% far too long for sequence_len 2048
    rows = []
    for i in range(n):
        def text(k: int, i=i) -> str:
            start = (i * 7 + k * 13) % len(WORDS)
            words = [WORDS[(start + j) % len(WORDS)] for j in range(int(lengths[i, k]))]
            return f"({i}) " + " ".join(words) + "."

        messages = [{"role": "user", "content": text(0)},
                    {"role": "assistant", "content": text(1)},
                    {"role": "user", "content": text(2)},
                    {"role": "assistant", "content": text(3)}]
        if i % 100 == 1:
            messages[0]["content"] += f" Mail me at person{i}@example.com."
        if i % 200 == 3:
            messages = rows[-1].messages  # exact duplicate content
        tags = {"emotion": {"tones": ["hopeful", "anxious"][i % 2:i % 2 + 1],
                            "confidence": float(confidence[i])},
                "topic": {"topics": [TOPICS[i % 7]], "subtopics": [], "confidence": 0.8},
                "temporal": {"focus": ["past", "present", "future"][i % 3], "confidence": 0.9},
                "hallucination": {"hallucination_score": float(hallucination[i]), "claims": []}}
        if i % 100 == 5:
            del tags["temporal"]
        rubric = {"score": 0.9, "passed": i % 50 != 7, "safety_failed": i % 200 == 11,
                  "failed_criteria": [], "judges": ["judge"], "rubric_version": "bench"}
        rows.append(CandidateRow(
            conversation_id=f"bench-{i:06d}", messages=messages,
            system_prompt="You are a warm, concise coach.", batch_id="bench",
            persona_id=f"persona-{i % 40}", persona={"name": f"Persona{i % 40}", "attributes": {}},
            taxonomy_cell={"topic": TOPICS[i % 7]}, is_edge_case=rng.random() < 0.15,
            embedding=vectors[i], template_hashes={"assistant": "bench"}, model="bench",
            tags=tags, rubric=rubric))
    return rows


def make_database() -> tuple[object, str, str]:
    from sqlalchemy import create_engine, text

    from tasks.core.db.engine import migrate

    admin = os.environ.get("TUNELOOP_TEST_ADMIN_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_curate_{uuid.uuid4().hex[:8]}"
    eng = create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    url = admin.rsplit("/", 1)[0] + "/" + name
    engine = create_engine(url)
    migrate(engine)
    return engine, admin, name


def drop_database(engine, admin: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine.dispose()
    eng = create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


def insert_conversations(engine, rows) -> None:
    """The conversations the dataset_items lineage points at (setup, not timed)."""
    from sqlalchemy import insert

    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import Conversation, GenerationBatch

    with session_scope(engine) as s:
        s.execute(insert(GenerationBatch), [{"id": "bench", "seed": 7, "params": {},
                                             "requested": len(rows)}])
        for start in range(0, len(rows), 10000):
            s.execute(insert(Conversation), [
                {"id": r.conversation_id, "batch_id": "bench", "item_index": i + start,
                 "messages": [], "taxonomy_cell": {}, "params": {}, "template_hashes": {},
                 "token_usage": {}, "timings": {}}
                for i, r in enumerate(rows[start:start + 10000])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--no-db", action="store_true", help="skip the Postgres lineage writes")
    args = parser.parse_args()

    from tasks.curate.config import CurationConfig
    from tasks.curate.stage import curate_rows
    from tasks.curate.tokens import TokenCounter

    t = time.perf_counter()
    rows = build_rows(args.rows)
    print(f"built {len(rows)} rows in memory in {time.perf_counter() - t:.1f}s (not timed)")
    counter = TokenCounter.load("smollm2-135m-instruct")
    engine = admin = name = None
    if not args.no_db:
        engine, admin, name = make_database()
        t = time.perf_counter()
        insert_conversations(engine, rows)
        print(f"inserted {len(rows)} conversation rows for lineage FKs in "
              f"{time.perf_counter() - t:.1f}s (not timed)")
    t = time.perf_counter()
    import great_expectations  # noqa: F401

    ge_import = time.perf_counter() - t

    cfg = CurationConfig(min_emotion_confidence=0.4, min_rows=1000, min_topic_diversity=7,
                         min_persona_diversity=40, edge_case_target=0.15,
                         edge_case_tolerance=0.05, sequence_len=2048, val_fraction=0.05)
    try:
        start = time.perf_counter()
        result = curate_rows(rows, cfg, engine=engine, counter=counter, edge_case_target=0.15,
                             record=not args.no_db)
        total = time.perf_counter() - start
    finally:
        if engine is not None:
            drop_database(engine, admin, name)
    timings = result["timings"]
    snapshot = Path(result["artifact_uri"].removeprefix("file://"))
    size_mb = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file()) / 1e6
    shutil.rmtree(_TMP, ignore_errors=True)

    counts = result["counts"]
    print(f"rows={counts['candidates']} kept={counts['kept']} excluded={counts['excluded']} "
          f"gate_passed={result['gate_passed']} snapshot_mb={size_mb:.0f} "
          f"db_lineage={'yes' if not args.no_db else 'no'}")
    print("dropped_by_reason=" + ",".join(f"{k}:{v}" for k, v in
                                          counts["dropped_by_reason"].items()))
    print("stage_seconds=" + " ".join(f"{k}:{v:.2f}" for k, v in timings.items()))
    print(f"total_s={total:.2f} rows_per_s={counts['candidates'] / total:.0f}")
    print(f"gate_s={timings['gate']:.2f} gate_share={timings['gate'] / total:.3f} "
          f"(target <= 0.20; GX already imported)")
    print(f"ge_import_s={ge_import:.2f} gate_share_cold="
          f"{(timings['gate'] + ge_import) / (total + ge_import):.3f} (cold process)")


if __name__ == "__main__":
    main()
