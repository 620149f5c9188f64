"""Benchmark: de-identification quality and speed, Presidio-based scrubber vs the regex one it
replaced (`tasks/datasets/deid.py` at commit 41843ec, loaded from git history), side by side on
the labelled corpus in tests/data/pii (see its README).

Prints, for both scrubbers: per-category recall (every letter and digit of a labelled entity
inside a detected span) and precision (detected spans that overlap a labelled entity), recall on
the structured categories, the false-positive rate on the clean corpus, and events/s of the full
`scrub_text` path over both corpora (best of --repeats). Then `ratio=` new events/s ÷ old
events/s. Targets (issue #16): structured recall >= 0.98, clean false positives <= 2%, >= 300
events/s on 2 cores; `--check` exits 1 when one is missed.

    .venv/bin/python bench/deid.py [--repeats 3] [--check]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.datasets.deid import scrub_text  # noqa: E402
from tasks.datasets.deid.quality import corpus, score, tuneloop_detect  # noqa: E402

CORPUS = ROOT / "tests" / "data" / "pii"
BEFORE = "41843ec"  # the last commit with the hand-written regex scrubber


def _scrubber_before() -> types.ModuleType:
    """The previous scrubber, compiled from git history (it is not kept in the tree twice)."""
    source = subprocess.run(["git", "show", f"{BEFORE}:tasks/datasets/deid.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("deid_before")
    sys.modules["deid_before"] = module  # its dataclasses look their module up
    exec(compile(source, f"{BEFORE}:tasks/datasets/deid.py", "exec"), module.__dict__)
    return module


deid_before = _scrubber_before()
OLD_NAMES = {"url": "URL", "secret": "SECRET", "email": "EMAIL", "phone": "PHONE",
             "name": "PERSON"}


def old_detect(text: str) -> list[tuple[int, int, str]]:
    return [(m.start, m.end, OLD_NAMES[m.kind]) for m in deid_before.find_pii(text)]


def events_per_s(scrub, texts: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            scrub(text)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    pii, clean = corpus(CORPUS)
    texts = [e["text"] for e in pii + clean]
    scrub_text(texts[0])  # load Presidio and the lexicon before the clock starts

    new, old = score(tuneloop_detect, pii, clean), score(old_detect, pii, clean)
    new_rate = events_per_s(scrub_text, texts, args.repeats)
    old_rate = events_per_s(deid_before.scrub_text, texts, args.repeats)

    print(f"corpus: {len(pii)} PII events, {sum(new['support'].values())} entities, "
          f"{len(clean)} clean events")
    print(f"{'category':14s} {'n':>4s} {'recall':>7s} {'(old)':>7s} {'precision':>9s} {'(old)':>7s}")
    for category in sorted(set(new["support"]) | set(new["precision"])):
        print(f"{category:14s} {new['support'].get(category, 0):4d} "
              f"{new['recall'].get(category, float('nan')):7.3f} "
              f"{old['recall'].get(category, float('nan')):7.3f} "
              f"{new['precision'].get(category, float('nan')):9.3f} "
              f"{old['precision'].get(category, float('nan')):7.3f}")
    print(f"structured recall: {new['structured_recall']:.3f} (old {old['structured_recall']:.3f})")
    print(f"names in free text (PERSON) recall: {new['recall'].get('PERSON', 0):.3f} "
          f"(old {old['recall'].get('PERSON', 0):.3f})")
    print(f"clean false positives: {new['clean_fp_rate']:.2%} (old {old['clean_fp_rate']:.2%})"
          + (f" ids={new['clean_fp_ids'][:10]}" if new["clean_fp_ids"] else ""))
    print(f"events/s: new {new_rate:.0f}, old {old_rate:.0f} (scrub_text, {len(texts)} events, "
          f"best of {args.repeats})")
    print(f"ratio={new_rate / old_rate:.3f}")
    missed = [name for name, ok in (
        ("structured recall >= 0.98", new["structured_recall"] >= 0.98),
        ("clean false positives <= 2%", new["clean_fp_rate"] <= 0.02),
        (">= 300 events/s", new_rate >= 300)) if not ok]
    print("targets: " + ("all met" if not missed else "MISSED " + "; ".join(missed)))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
