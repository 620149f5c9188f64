"""House layout rules that ruff and import-linter do not check: small modules, one package per
stage with its DAG entry module, tests mirroring the packages."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 600
STAGES = ("generate", "tag", "judge", "curate", "signals", "train", "register", "evaluate",
          "shadow")
PRODUCT_MODULES = sorted(
    p for package in ("tasks", "serving") for p in (ROOT / package).rglob("*.py")
    if "migrations" not in p.parts
)


@pytest.mark.parametrize("path", PRODUCT_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_the_line_limit(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, (
        f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_MODULE_LINES}): split it by "
        "concern into modules beside it in the same package")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_a_package_with_its_dag_entry_module_and_mirrored_tests(stage):
    package = ROOT / "tasks" / stage
    assert (package / "__init__.py").is_file(), f"tasks/{stage}/ is not a package"
    entry = "stage.py"
    assert (package / entry).is_file(), f"tasks/{stage}/{entry} (what its DAG tasks call) is missing"
    assert any((ROOT / "tests" / "unit" / stage).glob("test_*.py")), (
        f"tests/unit/{stage}/ has no tests: tests mirror the packages")


def test_no_flat_stage_module_is_left_beside_the_packages():
    flat = sorted(p.name for p in (ROOT / "tasks").glob("*.py")
                  if p.stem not in {"__init__", "cli", "demo"})
    assert flat == [], f"modules left at tasks/ top level (move them into a package): {flat}"


def test_no_import_cycles_between_modules():
    """No module imports (even inside a function) one that imports it back; `if TYPE_CHECKING`
    imports are annotations only and do not count. import-linter checks the package layers."""
    import grimp

    graph = grimp.build_graph("tasks", "serving", exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if module < imported and graph.chain_exists(imported=module, importer=imported):
                cycles.append((module, imported,
                               graph.find_shortest_chain(importer=imported, imported=module)))
    assert cycles == [], "import cycles (move the shared piece down a layer): " + "; ".join(
        f"{a} -> {b} -> ... -> {a} via {chain}" for a, b, chain in cycles)
