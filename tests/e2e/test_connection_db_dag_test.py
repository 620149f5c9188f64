"""A `tuneloop_db` Connection reaches every task through the DEFAULT_ARGS `pre_execute` hook.

DATABASE_URL names one throwaway database and the Connection (`AIRFLOW_CONN_TUNELOOP_DB`, read the
way Airflow reads connections) another, which alone holds a shadow deployment and its reactions.
nightly_refresh runs through `dag.test()` with a single task executing, so no other task in this
one process can have applied the connection first. `build` never called `apply_connections()`
(it read the environment's database: 0 signals); `refresh_comparison` did, and now relies on the
hook alone. The report row must land in the Connection's database and none in DATABASE_URL's.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEPLOYMENT_ID = "deployment-in-connection-db"
POSITIVE_DWELL_MS = (20_000, 30_000, 40_000)  # `done` inside the 15 s–2 min window
NEGATIVE_DWELL_MS = (1_000, 2_000)  # `dismiss` under 5 s


def _seed_deployment_with_reactions(engine) -> None:
    from tasks.core.db.engine import session_scope
    from tasks.core.db.models import Deployment, Interaction, Reaction

    reactions = [("done", ms) for ms in POSITIVE_DWELL_MS] + [
        ("dismiss", ms) for ms in NEGATIVE_DWELL_MS]
    with session_scope(engine) as session:
        session.add(Deployment(id=DEPLOYMENT_ID, model_name="tuneloop-assistant",
                               champion_version="1", challenger_version="2", mode="canary",
                               share=0.5, active=True))
        session.flush()
        for i, (reaction, dwell_ms) in enumerate(reactions):
            session.add(Interaction(id=f"interaction-{i}", user_hash=f"user-{i}",
                                    deployment_id=DEPLOYMENT_ID,
                                    variant="challenger" if i % 2 else "champion",
                                    model_name="tuneloop-assistant", model_version="1",
                                    request_messages=[{"role": "user", "content": f"q{i}"}],
                                    response=f"a{i}"))
            session.flush()
            session.add(Reaction(id=f"reaction-{i}", interaction_id=f"interaction-{i}",
                                 reaction=reaction, dwell_ms=dwell_ms))


@pytest.fixture()
def two_databases(airflow_db, make_database, monkeypatch, tmp_path):
    """(env engine, connection engine): DATABASE_URL → the first, AIRFLOW_CONN_TUNELOOP_DB → the
    second (seeded). The environment is restored afterwards (the task rewrote DATABASE_URL)."""
    from tasks.core.db.engine import engine_for, migrate
    from tasks.core.settings import get_settings

    env_url, conn_url = make_database("tuneloop_env"), make_database("tuneloop_conn")
    engines = engine_for(env_url), engine_for(conn_url)
    for engine in engines:
        migrate(engine)
    _seed_deployment_with_reactions(engines[1])

    monkeypatch.setenv("DATABASE_URL", env_url)
    # The Airflow connection type is "postgres"; apply_connections maps it back to postgresql://.
    monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_DB", "postgres://" + conn_url.split("://", 1)[1])
    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    get_settings.cache_clear()
    yield engines
    monkeypatch.undo()
    get_settings.cache_clear()


def _run_only(dagbag, task_id: str) -> dict:
    """Run nightly_refresh with `task_id` alone executing (the others are marked success), so no
    other task of this in-process run can have applied the connection first; its XCom."""
    run = dagbag.dags["nightly_refresh"].test(mark_success_pattern=f"(?!{task_id}$).*")
    ti = next(ti for ti in run.get_task_instances() if ti.task_id == task_id)
    assert ti.state == "success", {t.task_id: t.state for t in run.get_task_instances()}
    return ti.xcom_pull(task_ids=task_id)


def _report_deployments(engine) -> list[str]:
    from tasks.core.db.models import ComparisonReport

    with engine.connect() as conn:
        return list(conn.scalars(select(ComparisonReport.deployment_id)))


def test_refresh_comparison_writes_to_the_connection_database(dagbag, two_databases):
    env_engine, conn_engine = two_databases
    report = _run_only(dagbag, "refresh_comparison")
    assert report["deployment_id"] == DEPLOYMENT_ID
    assert _report_deployments(conn_engine) == [DEPLOYMENT_ID]
    assert _report_deployments(env_engine) == []


def test_build_reads_the_connection_database(dagbag, two_databases):
    built = _run_only(dagbag, "build")
    assert not built["built"]  # 3 / 2 signals are below the default minimums of 500
    assert (built["positive"], built["negative"]) == (len(POSITIVE_DWELL_MS),
                                                      len(NEGATIVE_DWELL_MS))
