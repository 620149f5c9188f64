"""No detector backtracks catastrophically: adversarial 10 KB and 100 KB inputs scrub in bounded,
~linear time (100 KB / 10 KB <= 15). Bounds are generous (CI machines vary); a quadratic pattern
misses them by orders of magnitude (Presidio's URL regex: `"a." * 2500` alone takes ~6 s)."""

from __future__ import annotations

import time

import pytest

from tasks.datasets.deid import scrub_text

ADVERSARIAL = {
    "repeated scheme prefixes": lambda n: ("http://" * (n // 7 + 1))[:n],
    "long local part": lambda n: "a" * (n - 1) + "@",
    "dotted local part": lambda n: ("a." * n)[:n - 2] + "@b",
    "long digit run": lambda n: "1" * n,
    "spaced digit groups": lambda n: ("12 " * n)[:n],
    "nested brackets": lambda n: "(" * (n // 2) + ")" * (n // 2),
    "square brackets and at": lambda n: ("[at] " * n)[:n],
    "dotted labels": lambda n: ("a." * n)[:n],
    "repeated names": lambda n: ("Hi Jane, " * n)[:n],
    "unclosed key blocks": lambda n: ("-----BEGIN " "PRIVATE KEY-----" * n)[:n],
    "key= runs": lambda n: ("password=" * n)[:n],
    "many emails": lambda n: ("a@b.co " * n)[:n],
    "full-width runs": lambda n: ("ｊａｎｅ＠ " * n)[:n],
    "plus signs": lambda n: ("+1 " * n)[:n],
    "one long line of ids": lambda n: ("ABCDE1234F" + "x" * 20 + "_" * 10 + "1234 ") * (n // 45),
    "json lines": lambda n: ('{"dwell_ms":[16940],"id":"a3f5c0ffee0123456789"}' * n)[:n],
}
BOUND_S = {10_000: 3.0, 100_000: 30.0}


def _seconds(text: str) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        scrub_text(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_input_scrubs_in_bounded_linear_time(name):
    scrub_text("warm up: jane@example.com")
    make = ADVERSARIAL[name]
    small, large = _seconds(make(10_000)), _seconds(make(100_000))
    assert small < BOUND_S[10_000], f"{name}: 10 KB took {small:.2f}s"
    assert large < BOUND_S[100_000], f"{name}: 100 KB took {large:.2f}s"
    # below 20 ms the ratio is noise; a quadratic pattern is far above it at 10 KB already
    assert large / max(small, 0.02) <= 15, f"{name}: 100 KB/10 KB = {large / small:.1f}"
