"""e2e fixtures: a failed test's report carries the logs of every running real-Airflow stack."""

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
