"""import_reactions end to end through `dag.test()` against real Postgres: the tip_scores CSV
(tests/data/import/) is imported, then build_reaction_dataset — also through `dag.test()` —
publishes a dataset whose SFT file holds the imported positive; a log with a bad row fails the
run at once (no retry) and writes nothing; a SQL source is read through an Airflow Connection
(`source_conn_id`, an `AIRFLOW_CONN_*` variable as Airflow's environment backend reads it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CSV_LOG = ROOT / "tests" / "data" / "import" / "tip_scores.csv"
POSITIVE_TIP = "<PERSON>, try a 25-minute focus block before email."


@pytest.fixture()
def import_db(dag_test_db):
    return dag_test_db("tuneloop_import")


# Every Param spelled out: the session's DAG objects keep the conf of an earlier dag.test().
IMPORT_DEFAULTS = {"mapping": "", "file": "", "format": "auto", "sql": "", "source_conn_id": "",
                   "max_bad_rows": 0, "dry_run": False}


def _run(dagbag, dag_id: str, conf: dict):
    if dag_id == "import_reactions":
        conf = {**IMPORT_DEFAULTS, **conf}
    run = dagbag.dags[dag_id].test(run_conf=conf)
    return run, {ti.task_id: ti for ti in run.get_task_instances()}


def _counts(engine) -> tuple[int, int]:
    from tasks.core.db.models import Interaction, Reaction

    with engine.connect() as conn:
        return (conn.scalar(select(func.count()).select_from(Interaction)),
                conn.scalar(select(func.count()).select_from(Reaction)))


def test_import_then_build_finds_the_imported_positive(dagbag, import_db):
    run, tis = _run(dagbag, "import_reactions", {"mapping": "tip_scores", "file": str(CSV_LOG)})
    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    summary = tis["import_log"].xcom_pull(task_ids="import_log")
    assert (summary["interactions_inserted"], summary["reactions_inserted"]) == (5, 5)
    assert _counts(import_db) == (5, 5)

    run, tis = _run(dagbag, "build_reaction_dataset", {"min_positive": 1, "min_negative": 1})
    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    assert tis["publish"].state == "success"
    built = tis["build"].xcom_pull(task_ids="build")
    assert built["built"] and built["gate_passed"]
    assert built["counts"]["positive"] == 2
    rows = [json.loads(line) for line in Path(built["train_path"]).read_text().splitlines()]
    assert {"role": "assistant", "content": POSITIVE_TIP} in [m for r in rows
                                                              for m in r["messages"]]

    run, tis = _run(dagbag, "import_reactions", {"mapping": "tip_scores", "file": str(CSV_LOG)})
    assert run.state == "success"
    assert tis["import_log"].xcom_pull(task_ids="import_log")["already_imported"] == 5
    assert _counts(import_db) == (5, 5)


def test_a_log_with_a_bad_row_fails_at_once_and_writes_nothing(dagbag, import_db, tmp_path):
    lines = CSV_LOG.read_text().splitlines()
    bad = tmp_path / "tips.csv"
    bad.write_text("\n".join([*lines, lines[1].replace(",done,30000", ",done,soon")]) + "\n")

    run, tis = _run(dagbag, "import_reactions", {"mapping": "tip_scores", "file": str(bad)})

    assert run.state == "failed"
    assert tis["import_log"].state == "failed"  # AirflowFailException: no up_for_retry
    assert _counts(import_db) == (0, 0)

    run, tis = _run(dagbag, "import_reactions", {"mapping": "tip_scores", "file": str(bad),
                                                 "max_bad_rows": 1})
    assert run.state == "success"
    summary = tis["import_log"].xcom_pull(task_ids="import_log")
    assert summary["bad"] == 1 and summary["bad_rows"][0]["line"] == 9
    assert _counts(import_db) == (5, 5)


def test_a_sql_source_is_read_through_an_airflow_connection(dagbag, import_db, make_database,
                                                            monkeypatch):
    app_url = make_database("tuneloop_tips_app")
    app = create_engine(app_url)
    with app.begin() as conn:
        conn.execute(text("CREATE TABLE tip_scores (user_id text, created_at timestamptz, "
                          "context_json jsonb, tip_content text, kind text, source text, "
                          "reaction text, dwell_ms bigint)"))
        conn.execute(text("INSERT INTO tip_scores VALUES "
                          "('u-1', '2026-03-02T08:15:00Z', '{\"goal\": \"focus\"}', "
                          "'Close the door.', 'focus', 'llm', 'done', 30000), "
                          "('u-2', '2026-03-02T08:16:00Z', '{\"goal\": \"focus\"}', "
                          "'Open every tab.', 'focus', 'llm', 'dismiss', 800)"))
    app.dispose()
    monkeypatch.setenv("AIRFLOW_CONN_TIPS_APP", "postgres://" + app_url.split("://", 1)[1])

    run, tis = _run(dagbag, "import_reactions", {
        "mapping": "tip_scores", "sql": "SELECT * FROM tip_scores ORDER BY created_at",
        "source_conn_id": "tips_app"})

    assert run.state == "success", {k: ti.state for k, ti in tis.items()}
    summary = tis["import_log"].xcom_pull(task_ids="import_log")
    assert (summary["source"], summary["interactions_inserted"]) == ("sql", 2)
    assert app_url.split("@")[0] not in json.dumps(summary)
    assert _counts(import_db) == (2, 2)
