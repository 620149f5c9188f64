"""Failure callbacks (plugins/tuneloop_airflow/callbacks.py): the alert webhook's URL is a secret
(its path is the credential) and never reaches the log, whatever goes wrong."""

from __future__ import annotations

import http.server
import json
import logging
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))

TOKEN = "T0000/B0000/xoxb-s3cret-webhook-token"


class _Hook(http.server.BaseHTTPRequestHandler):
    status = 200
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture()
def webhook(monkeypatch):
    _Hook.bodies = []
    _Hook.status = 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/services/{TOKEN}"
    monkeypatch.setenv("TUNELOOP_ALERT_WEBHOOK", url)
    yield url
    server.shutdown()


def _context(exc: Exception | None = None) -> dict:
    ti = SimpleNamespace(dag_id="d", task_id="t", run_id="r", try_number=1, map_index=-1)
    return {"task_instance": ti, "exception": exc or RuntimeError("boom")}


def test_the_webhook_gets_the_failure_summary(webhook, caplog):
    from tuneloop_airflow.callbacks import on_task_failure

    on_task_failure(_context())
    assert _Hook.bodies == [{"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1,
                             "map_index": -1, "error": "RuntimeError: boom"}]


def test_a_failing_webhook_logs_its_host_but_never_its_url(webhook, caplog):
    from tuneloop_airflow.callbacks import on_task_failure

    _Hook.status = 500
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context())
    assert "alert webhook http://127.0.0.1:" in caplog.text
    assert "HTTPError 500" in caplog.text
    assert TOKEN not in caplog.text and "/services/" not in caplog.text


@pytest.mark.parametrize("url", [
    f"hooks.slack.com/services/{TOKEN}",  # no scheme: urllib's error repeats the URL
    f"http://127.0.0.1:9/services/{TOKEN}",  # nothing listens: connection refused
    f"https://user:{TOKEN}@[::1/services",  # not even parseable
])
def test_no_webhook_error_shows_the_secret(monkeypatch, caplog, url):
    from tuneloop_airflow.callbacks import on_task_failure

    monkeypatch.setenv("TUNELOOP_ALERT_WEBHOOK", url)
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context())
    assert "alert webhook" in caplog.text
    assert TOKEN not in caplog.text


def test_passwords_in_the_task_error_are_masked(caplog, monkeypatch):
    from tuneloop_airflow.callbacks import failure_summary, on_task_failure

    monkeypatch.delenv("TUNELOOP_ALERT_WEBHOOK", raising=False)
    exc = ConnectionError("could not reach postgresql://tuneloop:db-s3cret@postgres/tuneloop")
    assert failure_summary(_context(exc))["error"] == (
        "ConnectionError: could not reach postgresql://tuneloop:***@postgres/tuneloop")
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context(exc))
    assert "db-s3cret" not in caplog.text
