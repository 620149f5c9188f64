"""Failure callbacks (plugins/tuneloop_airflow/callbacks.py): the alert webhook's URL is a secret
(its path is the credential) and never reaches the log, whatever goes wrong."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))

TOKEN = "T0000/B0000/xoxb-s3cret-webhook-token"
QUERY_TOKEN = "sig-qu3ry-s3cret"
SECRETS = (TOKEN, QUERY_TOKEN, "xoxb", "/services/")


class _Hook(http.server.BaseHTTPRequestHandler):
    status = 200
    delay_s = 0.0
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        time.sleep(type(self).delay_s)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):  # keep pytest's output clean
        pass


def _set_webhook(monkeypatch, url: str) -> None:
    """TUNELOOP_ALERT_WEBHOOK=url, with the settings cache cleared (the callback reads it there)."""
    from tasks.core.settings import get_settings

    monkeypatch.setenv("TUNELOOP_ALERT_WEBHOOK", url)
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_settings():
    from tasks.core.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture()
def hook_server():
    _Hook.bodies = []
    _Hook.status = 200
    _Hook.delay_s = 0.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def webhook(monkeypatch, hook_server):
    url = f"{hook_server}/services/{TOKEN}?token={QUERY_TOKEN}"
    _set_webhook(monkeypatch, url)
    return url


def _context(exc: Exception | None = None) -> dict:
    ti = SimpleNamespace(dag_id="d", task_id="t", run_id="r", try_number=1, map_index=-1)
    return {"task_instance": ti, "exception": exc or RuntimeError("boom")}


def _assert_no_secret_logged(caplog) -> None:
    for record in caplog.records:
        shown = " ".join(filter(None, [record.getMessage(), record.exc_text or "",
                                       repr(record.args)]))
        leaked = [secret for secret in SECRETS if secret in shown]
        assert leaked == [], f"log record shows {leaked}: {shown!r}"


def _refused_port() -> int:
    """A local port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_webhook_gets_the_failure_summary(webhook, caplog):
    from tuneloop_airflow.callbacks import on_task_failure

    on_task_failure(_context())
    assert _Hook.bodies == [{"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1,
                             "map_index": -1, "error": "RuntimeError: boom"}]


def test_the_webhook_is_read_through_the_settings_so_a_dotenv_file_sets_it(
        clean_env, hook_server, tmp_path):
    from tasks.core.settings import get_settings
    from tuneloop_airflow.callbacks import on_task_failure

    # Not in os.environ at all: only the settings (which read .env) know it.
    (tmp_path / ".env").write_text(f"TUNELOOP_ALERT_WEBHOOK={hook_server}/services/{TOKEN}\n")
    get_settings.cache_clear()
    on_task_failure(_context())
    assert len(_Hook.bodies) == 1
    assert TOKEN not in repr(get_settings()) and TOKEN not in str(get_settings().alert_webhook)


def test_an_empty_webhook_as_compose_passes_it_sends_nothing_and_warns_nothing(
        monkeypatch, caplog):
    from tuneloop_airflow.callbacks import on_task_failure

    _set_webhook(monkeypatch, "")
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context())
    assert [r.levelname for r in caplog.records] == ["ERROR"]


@pytest.mark.parametrize("failure", ["http 500", "timeout", "connection refused"])
def test_a_failing_post_logs_the_origin_only(monkeypatch, caplog, hook_server, failure):
    import tuneloop_airflow.callbacks as callbacks

    origin = hook_server
    if failure == "http 500":
        _Hook.status = 500
    elif failure == "timeout":
        _Hook.delay_s = 1.0
        monkeypatch.setattr(callbacks, "WEBHOOK_TIMEOUT_S", 0.2)
    else:
        origin = f"http://127.0.0.1:{_refused_port()}"
    _set_webhook(monkeypatch, f"{origin}/services/{TOKEN}?token={QUERY_TOKEN}")
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        callbacks.on_task_failure(_context())  # never raises: the task's own error stands
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"alert webhook {origin} failed: ")
    expected = {"http 500": "HTTPError 500", "timeout": "Timeout",
                "connection refused": "ConnectionRefusedError"}[failure]
    assert expected in warnings[0]
    _assert_no_secret_logged(caplog)


@pytest.mark.parametrize("url", [
    f"hooks.slack.com/services/{TOKEN}?token={QUERY_TOKEN}",  # no scheme
    f"file:///services/{TOKEN}?token={QUERY_TOKEN}",  # not http(s): never opened
    f"https://user:{TOKEN}@[::1/services?token={QUERY_TOKEN}",  # not even parseable
])
def test_a_webhook_that_is_no_http_url_is_refused_without_showing_it(monkeypatch, caplog, url):
    from tuneloop_airflow.callbacks import on_task_failure

    _set_webhook(monkeypatch, url)
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context())
    assert "alert webhook not sent: TUNELOOP_ALERT_WEBHOOK" in caplog.text
    assert "is not an http(s) URL; set it to" in caplog.text
    _assert_no_secret_logged(caplog)


def test_a_task_error_quoting_the_webhook_shows_its_origin_only(webhook, hook_server, caplog):
    from tuneloop_airflow.callbacks import on_task_failure

    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context(RuntimeError(f"could not post to {webhook}")))
    assert _Hook.bodies[0]["error"] == f"RuntimeError: could not post to {hook_server}/***"
    _assert_no_secret_logged(caplog)


def test_settings_that_do_not_load_skip_the_webhook_without_raising(monkeypatch, caplog):
    from tuneloop_airflow.callbacks import on_task_failure

    _set_webhook(monkeypatch, f"https://hooks.slack.com/services/{TOKEN}")
    monkeypatch.setenv("TUNELOOP_ROUTER_PORT", "not-a-port")
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context())
    assert "alert webhook not sent: the tuneloop settings did not load" in caplog.text
    assert "tuneloop secrets check" in caplog.text
    _assert_no_secret_logged(caplog)


def test_passwords_in_the_task_error_are_masked(caplog, monkeypatch):
    from tuneloop_airflow.callbacks import failure_summary, on_task_failure

    _set_webhook(monkeypatch, "")
    exc = ConnectionError("could not reach postgresql://tuneloop:db-s3cret@postgres/tuneloop")
    assert failure_summary(_context(exc))["error"] == (
        "ConnectionError: could not reach postgresql://tuneloop:***@postgres/tuneloop")
    with caplog.at_level(logging.DEBUG, logger="tuneloop.alerts"):
        on_task_failure(_context(exc))
    assert "db-s3cret" not in caplog.text
