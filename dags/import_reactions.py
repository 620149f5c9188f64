"""
### Import a reaction log

Reads an operator's log of shown answers and reactions — a CSV or JSONL file on the worker, or a
SQL query against a PostgreSQL Connection — through a mapping file (`include/mappings/<name>.yaml`,
e.g. `tip_scores`: which column holds user, prompt, response, action, dwell, timestamp) and stores
it as `interactions` + `reactions` rows that **build_reaction_dataset** and **nightly_refresh**
use like the router's own.

* **De-identified on the way in**: user ids hashed with the router's salt (so `tuneloop forget`
  covers them), prompts, answers and context columns scrubbed as every export is.
* **Idempotent**: each row's id is a hash of its natural key (mapping `key`); importing the same
  log again inserts nothing.
* **All or nothing**: a bad row (missing column, unparseable dwell or timestamp, unknown action)
  fails the run and writes nothing, naming its line (files) or row and key (SQL); `max_bad_rows`
  lets up to N be skipped and reported. A rejected import is not retried.
* Imported rows are marked (variant `imported`, context source `import`, client
  `import:<name>`): only rows so marked count as shown answers besides the router's.

Logic: `tasks/signals/importing.py`, `tasks/signals/import_config.py`, `tasks/signals/import_rows.py`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, task

from tuneloop_airflow.common import DEFAULT_ARGS, TAGS, dag_params

DAG_ID = "import_reactions"


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=[*TAGS, "signals", "import"],
    doc_md=__doc__,
    params=dag_params(DAG_ID, {
        "mapping": Param("", type="string",
                         description="a shipped mapping's name (tip_scores) or the path of a "
                                     "mapping YAML file on the worker"),
        "file": Param("", type="string",
                      description="the CSV or JSONL log on the worker (or use sql)"),
        "format": Param("auto", type="string", enum=["auto", "csv", "jsonl"],
                        description="the file's format (auto: from its suffix)"),
        "sql": Param("", type="string",
                     description="a read-only query whose rows are the log (or use file)"),
        "source_conn_id": Param("", type="string",
                                description="the PostgreSQL Connection sql runs on (empty: "
                                            "tuneloop's own database)"),
        "max_bad_rows": Param(0, type="integer", minimum=0,
                              description="skip and report up to this many bad rows instead "
                                          "of failing"),
        "dry_run": Param(False, type="boolean",
                         description="parse, de-identify and count, then roll back"),
    }),
)
def import_reactions():
    @task
    def import_log(params: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from tasks.signals.importing import (
            ImportConfig,
            ImportRejected,
            ImportSourceError,
            import_reactions,
        )
        from tuneloop_airflow.connections import postgres_url

        values = dict(params or {})
        try:  # bad Params (ValueError), rows or source: a retry would fail the same way
            if conn_id := values.pop("source_conn_id", ""):
                values["source_url"] = postgres_url(conn_id)
            return import_reactions(ImportConfig.from_params(values))
        except (ValueError, ImportRejected, ImportSourceError) as exc:
            raise AirflowFailException(str(exc)) from None

    import_log()


import_reactions()
