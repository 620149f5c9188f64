"""Failure callbacks: one structured log line per failed task (and an optional webhook).

The webhook's URL is TUNELOOP_ALERT_WEBHOOK, read through tasks.core.settings (`alert_webhook`).
It is a secret (whoever has the URL can post to the channel: Slack, Teams and Discord put the
credential in its path): no log line shows more of it than its scheme and host, and the callback
never raises, so neither an alert nor its failure can mask the task's own error.
"""

from __future__ import annotations

import json
import logging
import urllib.request

log = logging.getLogger("tuneloop.alerts")
# Seconds a webhook POST may take: a hung chat service must not hold up the failed task.
WEBHOOK_TIMEOUT_S = 5.0


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
    url = _webhook_url()
    if url and summary["error"]:  # a task error quoting the webhook must not leak it either
        summary["error"] = summary["error"].replace(url, _webhook_origin(url) + "/***")
    log.error("tuneloop task failed: %s", json.dumps(summary, default=str))
    if url:
        _post(url, summary)


def _webhook_url() -> str | None:
    """TUNELOOP_ALERT_WEBHOOK from the settings; None when unset, empty or unreadable."""
    try:
        from tasks.core.settings import get_settings

        webhook = get_settings().alert_webhook
    except Exception as exc:  # alerts must never mask the real failure
        # The type only: a settings error lists the problems, which the task has logged itself.
        log.warning("alert webhook not sent: the tuneloop settings did not load (%s); "
                    "`tuneloop secrets check` lists the problems", type(exc).__name__)
        return None
    url = webhook.get_secret_value().strip() if webhook else ""
    return url or None


def _post(url: str, summary: dict) -> None:
    origin = _webhook_origin(url)
    if not origin.startswith(("http://", "https://")):
        log.warning("alert webhook not sent: TUNELOOP_ALERT_WEBHOOK (%s) is not an http(s) "
                    "URL; set it to the https://... URL your chat tool gives", origin)
        return
    try:
        req = urllib.request.Request(
            url, data=json.dumps(summary, default=str).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        urllib.request.urlopen(req, timeout=WEBHOOK_TIMEOUT_S).close()
    except Exception as exc:  # alerts must never mask the real failure
        # A webhook URL's path is its credential: log the host only, and the error's type and
        # status, whose text may repeat the URL.
        log.warning("alert webhook %s failed: %s", origin, _error_summary(exc))


def _webhook_origin(url: str) -> str:
    from tasks.core.secrets import url_origin

    return url_origin(url)


def _error_summary(exc: BaseException) -> str:
    """`exc`'s type, HTTP status and reason: never its message, which may quote the URL."""
    status = getattr(exc, "code", None) or getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    detail = f" {status}" if isinstance(status, int) else ""
    if isinstance(reason, str) and "://" not in reason:
        detail += f" {reason}"
    elif isinstance(reason, BaseException):  # URLError wraps the socket's error
        detail += f" ({type(reason).__name__})"
    return f"{type(exc).__name__}{detail}"
