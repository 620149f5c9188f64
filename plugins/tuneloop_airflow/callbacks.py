"""Failure callbacks: one structured log line per failed task (and an optional webhook).

TUNELOOP_ALERT_WEBHOOK is a secret (whoever has the URL can post to the channel): it is never
logged, only its scheme and host.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request

log = logging.getLogger("tuneloop.alerts")


def failure_summary(context: dict) -> dict:
    ti = context.get("task_instance") or context.get("ti")
    exc = context.get("exception")
    return {
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(ti, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "map_index": getattr(ti, "map_index", None),
        "error": _redact(f"{type(exc).__name__}: {exc}") if exc else None,
    }


def _redact(text: str) -> str:
    from tasks.core.secrets import redact_urls_in

    return redact_urls_in(text)


def on_task_failure(context: dict) -> None:
    """Log the failure; POST it as JSON to TUNELOOP_ALERT_WEBHOOK when that is set."""
    summary = failure_summary(context)
    log.error("tuneloop task failed: %s", json.dumps(summary, default=str))
    url = os.environ.get("TUNELOOP_ALERT_WEBHOOK")
    if not url:
        return
    try:
        req = urllib.request.Request(
            url, data=json.dumps(summary, default=str).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        urllib.request.urlopen(req, timeout=5).close()
    except Exception as exc:  # alerts must never mask the real failure
        # A webhook URL's path is its credential (Slack, Teams, Discord): log the host only,
        # and the error's type and status, whose text may repeat the URL.
        log.warning("alert webhook %s failed: %s", _webhook_origin(url), _error_summary(exc))


def _webhook_origin(url: str) -> str:
    from tasks.core.secrets import url_origin

    return url_origin(url)


def _error_summary(exc: Exception) -> str:
    status = getattr(exc, "code", None) or getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    detail = f" {status}" if isinstance(status, int) else ""
    if isinstance(reason, str) and "://" not in reason:
        detail += f" {reason}"
    return f"{type(exc).__name__}{detail}"
