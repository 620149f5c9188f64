"""e2e fixtures: a fresh migrated tuneloop database for dag.test() runs (`dag_test_db`); a failed
test's report carries the logs of every running real-Airflow stack."""

from __future__ import annotations

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.when in ("setup", "call"):
        from tests.e2e.airflow_harness import AirflowStack

        for stack in AirflowStack.running:
            report.sections.append((f"airflow processes ({stack.home})", stack.diagnostics()))
    return report


@pytest.fixture()
def dag_test_db(airflow_db, make_database, monkeypatch, tmp_path):
    """Factory: a fresh, migrated tuneloop database (named after `prefix`) that this process's
    settings point at (DATABASE_URL, a data dir and an sqlite MLflow under tmp_path) → its
    engine. The environment and the cached settings are restored afterwards."""
    from tasks.core.db.engine import engine_for, migrate
    from tasks.core.settings import get_settings

    def make(prefix: str):
        url = make_database(prefix)
        engine = engine_for(url)
        migrate(engine)
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
        get_settings.cache_clear()
        return engine

    yield make
    monkeypatch.undo()
    get_settings.cache_clear()
