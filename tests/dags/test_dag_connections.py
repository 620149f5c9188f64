"""Every task of every DAG maps the tuneloop Airflow Connections onto settings before it runs.

The `pre_execute` hook in DEFAULT_ARGS does it (the task runner calls `task._pre_execute_hook`
right before `execute()`). A task that drops it, by passing its own `pre_execute` or through
`@task.run_if` / `@task.skip_if` (which set one), or a DAG that does not use DEFAULT_ARGS, would
silently read the environment's database and MLflow instead of the connections': it fails here.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag


def runtime_pre_execute(task):
    """The `pre_execute` hook the worker runs for `task` (a mapped task: once unmapped)."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    if isinstance(task, MappedOperator):
        expand = getattr(task, "op_kwargs_expand_input", None)  # @task ... .expand(...)
        if expand is None or not isinstance(expand.value, dict):
            return task.partial_kwargs.get("pre_execute")
        task = task.unmap({"op_kwargs": dict.fromkeys(expand.value)})
    return task._pre_execute_hook


def test_every_task_applies_the_connections_before_it_runs(dagbag):
    from tuneloop_airflow.connections import apply_connections_hook

    assert len(dagbag.dags) >= 7
    missing = [f"{dag_id}.{task.task_id}" for dag_id, dag in sorted(dagbag.dags.items())
               for task in dag.tasks if runtime_pre_execute(task) is not apply_connections_hook]
    assert not missing, (f"tasks without the connections hook: {missing}; use DEFAULT_ARGS and "
                         "do not pass pre_execute= or use @task.run_if/skip_if on these tasks")


def test_the_check_catches_a_task_that_replaces_the_hook():
    """The integrity test above is not vacuous: an own pre_execute or run_if drops the hook."""
    from airflow.sdk import dag, task

    from tuneloop_airflow.common import DEFAULT_ARGS
    from tuneloop_airflow.connections import apply_connections_hook

    @dag(dag_id="hook_probe", schedule=None, start_date=datetime(2026, 1, 1),
         default_args=DEFAULT_ARGS)
    def hook_probe():
        @task
        def plain() -> None: ...

        @task(pre_execute=lambda context: None)
        def own_hook() -> None: ...

        @task.run_if(lambda context: True)
        @task
        def conditional() -> None: ...

        @task
        def mapped(item: int) -> None: ...

        plain()
        own_hook()
        conditional()
        mapped.expand(item=[1, 2])

    probe = hook_probe()
    hooked = {t.task_id for t in probe.tasks if runtime_pre_execute(t) is apply_connections_hook}
    assert hooked == {"plain", "mapped"}
