"""Measuring a detector on a labelled corpus: per-category recall and precision, false positives.

The corpus format is tests/data/pii's (see its README): PII events ``{"id", "locale", "text",
"entities": [{"category", "value"}]}`` and clean events ``{"id", "kind", "text"}``. A labelled
entity is *recalled* when every letter and digit of it lies inside some detected span (of any
category: what matters is that it does not reach the export); a detected span is *precise* when
it overlaps a labelled entity. A clean event with any detection is a false positive. bench/deid.py
prints these for tuneloop's detector and the one it replaced; tests hold the targets.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# (text) -> [(start, end, category)]
Detect = Callable[[str], Sequence[tuple[int, int, str]]]
STRUCTURED = ("CREDIT_CARD", "IBAN", "EMAIL", "PHONE", "IP_ADDRESS", "SECRET", "US_SSN",
              "UK_NINO", "IN_AADHAAR", "IN_PAN")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _entity_spans(event: dict[str, Any]) -> list[tuple[int, int, str]]:
    spans, text = [], event["text"]
    for entity in event.get("entities", []):
        start = text.find(entity["value"])
        if start < 0:
            raise ValueError(f"{event['id']}: entity value not in text; fix the corpus")
        spans.append((start, start + len(entity["value"]), entity["category"]))
    return spans


def _covered(text: str, start: int, end: int, found: Iterable[tuple[int, int, str]]) -> bool:
    inside = [False] * (end - start)
    for s, e, _ in found:
        for i in range(max(s, start), min(e, end)):
            inside[i - start] = True
    return all(flag for flag, char in zip(inside, text[start:end], strict=True)
               if char.isalnum())


def score(detect: Detect, pii_events: Sequence[dict[str, Any]],
          clean_events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"recall": {category: r}, "precision": {category: p}, "support": {...},
    "structured_recall", "clean_fp_rate", "clean_fp_ids"}."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])      # category -> [recalled, all]
    precise: dict[str, list[int]] = defaultdict(lambda: [0, 0])   # category -> [overlapping, all]
    for event in pii_events:
        text, truth = event["text"], _entity_spans(event)
        found = list(detect(text))
        for start, end, category in truth:
            hits[category][1] += 1
            hits[category][0] += _covered(text, start, end, found)
        for s, e, category in found:
            precise[category][1] += 1
            precise[category][0] += any(s < te and ts < e for ts, te, _ in truth)
    fp_ids = []
    for event in clean_events:
        found = list(detect(event["text"]))
        for _, _, category in found:
            precise[category][1] += 1
        if found:
            fp_ids.append(event["id"])
    structured = [hits[c] for c in STRUCTURED if hits[c][1]]
    return {
        "recall": {c: h[0] / h[1] for c, h in sorted(hits.items())},
        "support": {c: h[1] for c, h in sorted(hits.items())},
        "precision": {c: p[0] / p[1] for c, p in sorted(precise.items()) if p[1]},
        "structured_recall": (sum(h[0] for h in structured) / sum(h[1] for h in structured)
                              if structured else 0.0),
        "clean_fp_rate": len(fp_ids) / len(clean_events) if clean_events else 0.0,
        "clean_fp_ids": fp_ids,
    }


def tuneloop_detect(text: str) -> list[tuple[int, int, str]]:
    """tuneloop's detector in the `Detect` shape."""
    from tasks.datasets.deid.detect import find_pii

    return [(m.start, m.end, m.kind) for m in find_pii(text)]
