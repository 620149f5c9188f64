"""With DATABASE_URL unset, tuneloop starts an embedded PostgreSQL and migrates it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_migrate_without_database_url_creates_and_migrates_embedded_postgres(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["TUNELOOP_DATA_DIR"] = str(tmp_path)
    code = (
        "from sqlalchemy import inspect;"
        "from tasks.core.db.engine import get_engine, migrate;"
        "e = get_engine(); migrate(e); migrate(e);"
        "print(e.url.render_as_string(hide_password=True));"
        "print(sorted(inspect(e).get_table_names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(tmp_path / "pgdata") in out.stdout.replace("%2F", "/")
    assert "'conversations'" in out.stdout and "'reactions'" in out.stdout
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()
    # A second process reuses the same data directory (no re-init, rows survive).
    again = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    _stop(tmp_path / "pgdata")


def _stop(pgdata: Path) -> None:
    """The embedded server outlives its creator by design; stop the test's instance."""
    import signal

    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
