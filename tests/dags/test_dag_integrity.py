"""DAG integrity: every file in dags/ imports cleanly, follows house rules, parses fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = ROOT / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
EXPECTED_DAGS = {
    "generate_conversations", "tag_conversations", "curate_dataset", "build_reaction_dataset",
    "train_and_register", "shadow_compare", "nightly_refresh", "import_reactions",
}
HEAVY_MODULES = ("torch", "transformers", "sentence_transformers", "great_expectations",
                 "mlflow", "pandas", "peft", "sqlalchemy")


@pytest.fixture(scope="module")
def dagbag():
    sys.path.insert(0, str(ROOT / "plugins"))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS_DIR))


def test_every_dag_file_imports_without_error(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == EXPECTED_DAGS


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_dag_has_tags_owner_retries_and_docs(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert "tuneloop" in dag.tags
    assert dag.doc_md and len(dag.doc_md) > 100
    for t in dag.tasks:
        assert t.retries >= 2, f"{dag_id}.{t.task_id} retries={t.retries}"
        assert t.owner == "tuneloop"
        assert t.on_failure_callback, f"{dag_id}.{t.task_id} has no failure callback"


def test_assets_chain_the_loop(dagbag):
    from tuneloop_airflow.common import (
        CONVERSATIONS_ASSET,
        DATASET_ASSET,
        MODEL_ASSET,
        TAGS_ASSET,
    )

    def outlets(dag_id):
        return {o.uri for t in dagbag.dags[dag_id].tasks for o in (t.outlets or [])}

    def schedule_assets(dag_id):
        def walk(node):
            if hasattr(node, "objects"):
                return set().union(*(walk(o) for o in node.objects))
            return {node.uri}

        return walk(dagbag.dags[dag_id].timetable.asset_condition)

    assert CONVERSATIONS_ASSET.uri in outlets("generate_conversations")
    assert schedule_assets("tag_conversations") == {CONVERSATIONS_ASSET.uri}
    assert TAGS_ASSET.uri in outlets("tag_conversations")
    assert schedule_assets("curate_dataset") == {TAGS_ASSET.uri}
    assert DATASET_ASSET.uri in outlets("curate_dataset")
    assert DATASET_ASSET.uri in outlets("build_reaction_dataset")
    assert DATASET_ASSET.uri in outlets("nightly_refresh")
    assert schedule_assets("train_and_register") == {DATASET_ASSET.uri}
    assert MODEL_ASSET.uri in outlets("train_and_register")
    assert MODEL_ASSET.uri in schedule_assets("shadow_compare")


def test_dataset_asset_is_emitted_only_behind_the_gate(dagbag):
    dag = dagbag.dags["curate_dataset"]
    publish = dag.get_task("publish")
    assert "gate_passed" in publish.upstream_task_ids
    assert dag.get_task("gate_passed").__class__.__name__.startswith("_ShortCircuit")


def test_the_nightly_retention_purge_runs_before_signals_are_counted_or_built(dagbag):
    nightly = dagbag.dags["nightly_refresh"]
    assert "purge_expired_text" in nightly.get_task("count_signals").upstream_task_ids
    assert "purge_expired_text" in nightly.get_task("build").get_flat_relative_ids(
        upstream=True)


def test_schedules(dagbag):
    nightly = dagbag.dags["nightly_refresh"]
    assert nightly.timetable.expression == "0 2 * * *"
    assert dagbag.dags["shadow_compare"].timetable.timetable.expression == "30 * * * *"
    for dag_id in ("generate_conversations", "build_reaction_dataset", "import_reactions"):
        assert type(dagbag.dags[dag_id].timetable).__name__ == "NullTimetable"


def test_training_backends_are_branches(dagbag):
    dag = dagbag.dags["train_and_register"]
    branch = dag.get_task("choose_backend")
    assert branch.downstream_task_ids == {"train_local", "train_docker", "train_kubernetes"}
    assert dag.get_task("register").trigger_rule == "none_failed_min_one_success"
    for tid in ("train_local", "train_docker", "train_kubernetes"):
        assert dag.get_task(tid).pool == "tuneloop_gpu"


# Every task that calls an LLM endpoint (generation, taggers, judges, evaluation, the mirror-mode
# pairwise judge) queues in the LLM pool; nothing else does.
LLM_TASKS = {
    "generate_conversations": {"generate_shard"},
    "tag_conversations": {"tag_shard", "judge_shard"},
    "train_and_register": {"evaluate"},
    "shadow_compare": {"compare"},
    "nightly_refresh": {"refresh_comparison"},
}


def test_llm_calling_tasks_share_the_llm_pool(dagbag):
    for dag_id, dag in dagbag.dags.items():
        in_pool = {t.task_id for t in dag.tasks if t.pool == "tuneloop_llm"}
        assert in_pool == LLM_TASKS.get(dag_id, set()), dag_id


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_files_only_wire(path):
    """No heavy import at module level and no Airflow 2 API in DAG files."""
    source = path.read_text()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names]
            for name in names:
                assert not name.startswith(HEAVY_MODULES), f"{path.name} imports {name} at top"
                assert not name.startswith("tasks"), f"{path.name}: import tasks.* inside tasks"
    for banned in ("airflow.decorators", "schedule_interval", "airflow.datasets"):
        assert banned not in source


def test_dag_folder_parses_in_under_a_second():
    """Fresh interpreter (Airflow already imported, as in the dag-processor): parse dags/."""
    code = (
        "import sys, time; sys.path.insert(0, {!r});"
        "from airflow.dag_processing.dagbag import DagBag;"
        "t = time.perf_counter(); b = DagBag({!r}); dt = time.perf_counter() - t;"
        "assert not b.import_errors, b.import_errors; print(dt)"
    ).format(str(ROOT / "plugins"), str(DAGS_DIR))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0
