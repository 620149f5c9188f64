"""Token usage accounting: cumulative tokens and request outcomes per endpoint and model.

The client records every logical request once (with the usage the provider reported, summed over
attempts that returned a body) so a stage can log what a batch cost and where it went. Cache hits
are counted separately and add no tokens: a rerun does not pay twice.
"""

from __future__ import annotations

import threading
from typing import Any

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def empty_usage() -> dict[str, int]:
    return dict.fromkeys(USAGE_KEYS, 0)


def normalise_usage(usage: Any) -> dict[str, int]:
    """Provider usage (dict, pydantic object or None) → {prompt, completion, total}_tokens ints."""
    if usage is None:
        return empty_usage()
    if not isinstance(usage, dict):
        usage = {k: getattr(usage, k, 0) for k in USAGE_KEYS}
    out = {k: int(usage.get(k) or 0) for k in USAGE_KEYS}
    if not out["total_tokens"]:
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def add_usage(into: dict[str, int], usage: dict[str, int]) -> dict[str, int]:
    for key in USAGE_KEYS:
        into[key] = into.get(key, 0) + int(usage.get(key, 0))
    return into


class UsageTracker:
    """Thread-safe counters keyed by endpoint label (`<base_url>#<model>`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_endpoint: dict[str, dict[str, Any]] = {}

    def record(self, endpoint: str, model: str, usage: dict[str, int], *, ok: bool,
               cached: bool = False, attempts: int = 0) -> None:
        with self._lock:
            entry = self._by_endpoint.get(endpoint)
            if entry is None:
                entry = {"model": model, "requests": 0, "succeeded": 0, "failed": 0,
                         "cached": 0, "attempts": 0, **empty_usage()}
                self._by_endpoint[endpoint] = entry
            entry["requests"] += 1
            entry["attempts"] += attempts
            entry["succeeded" if ok else "failed"] += 1
            if cached:
                entry["cached"] += 1
            else:
                add_usage(entry, usage)

    def summary(self) -> dict[str, Any]:
        """{"endpoints": {label: {model, requests, succeeded, failed, cached, attempts, *_tokens}},
        "total": {requests, succeeded, failed, cached, attempts, *_tokens}}."""
        with self._lock:
            endpoints = {label: dict(entry) for label, entry in self._by_endpoint.items()}
        total: dict[str, int] = {"requests": 0, "succeeded": 0, "failed": 0, "cached": 0,
                                 "attempts": 0, **empty_usage()}
        for entry in endpoints.values():
            for key in total:
                total[key] += entry[key]
        return {"endpoints": endpoints, "total": total}

    def reset(self) -> None:
        with self._lock:
            self._by_endpoint.clear()
