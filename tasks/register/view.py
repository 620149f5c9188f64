"""Adapter registry view (seed 003): every version of the registered model side by side.

One row per model version from an MLflow registry query: aliases (champion/challenger), the
training run, its dataset and base model, and the evaluation metrics that `tasks.evaluate.stage` logged
to that run (perplexity, rubric pass rate, win rate, ELO). `tuneloop adapters` (or
`python -m tasks.register.view`) prints the table; `--json` prints the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

# Column → (header, metric or field); metrics are the `eval.*` names tasks.evaluate.stage logs.
EVAL_METRICS = {
    "perplexity": "eval.perplexity_tuned",
    "perplexity_base": "eval.perplexity_base",
    "rubric_pass_rate": "eval.rubric_pass_rate_tuned",
    "rubric_pass_rate_base": "eval.rubric_pass_rate_base",
    "win_rate": "eval.win_rate",
    "elo": "eval.elo_tuned",
    "judge_failures": "eval.judge_failures",
}
TRAINING_METRICS = {"eval_loss": "eval_loss", "train_loss": "train_loss",
                    "tokens_per_second": "tokens_per_second"}


def list_adapters(model_name: str | None = None) -> list[dict[str, Any]]:
    """All versions of `model_name` (default: settings.registered_model_name), newest first."""
    from mlflow.exceptions import MlflowException

    from tasks.register.tracking import TAG_IS_BASE, get_client, registered_model_name

    client = get_client()
    name = registered_model_name(model_name)
    try:
        versions = list(client.search_model_versions(f"name = '{name}'"))
        # Search results carry no aliases; the registered model has the alias → version map.
        alias_map = dict(client.get_registered_model(name).aliases or {})
    except MlflowException:
        return []
    aliases_of: dict[str, list[str]] = {}
    for alias, version in alias_map.items():
        aliases_of.setdefault(str(version), []).append(alias)
    rows: list[dict[str, Any]] = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        metrics: Mapping[str, float] = {}
        if mv.run_id:
            try:
                metrics = client.get_run(mv.run_id).data.metrics
            except MlflowException:
                metrics = {}
        tags = dict(mv.tags or {})
        created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, tz=UTC)
        row: dict[str, Any] = {
            "model_name": name,
            "version": str(mv.version),
            "aliases": sorted(aliases_of.get(str(mv.version), [])),
            "is_base": tags.get(TAG_IS_BASE) == "true",
            "run_id": mv.run_id,
            "dataset_id": tags.get("dataset_id"),
            "gate_passed": tags.get("gate_passed"),
            "base_model": tags.get("base_model"),
            "git_sha": tags.get("git_sha"),
            "created": created.isoformat(timespec="seconds"),
        }
        for column, key in {**EVAL_METRICS, **TRAINING_METRICS}.items():
            row[column] = metrics.get(key)
        rows.append(row)
    return rows


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{float(value):.0%}"
    if kind == "float":
        return f"{float(value):.3g}" if abs(float(value)) < 1e4 else f"{float(value):.3e}"
    if kind == "int":
        return f"{float(value):.0f}"
    return str(value)


COLUMNS: Sequence[tuple[str, str, str]] = (
    ("version", "version", "str"),
    ("aliases", "aliases", "str"),
    ("base_model", "base model", "str"),
    ("dataset_id", "dataset", "str"),
    ("perplexity_base", "ppl base", "float"),
    ("perplexity", "ppl tuned", "float"),
    ("rubric_pass_rate_base", "pass base", "pct"),
    ("rubric_pass_rate", "pass tuned", "pct"),
    ("win_rate", "win rate", "pct"),
    ("elo", "ELO", "int"),
    ("eval_loss", "eval loss", "float"),
    ("run_id", "run", "str"),
    ("created", "created", "str"),
)


def format_adapter_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of `list_adapters` rows for the CLI."""
    if not rows:
        return "no registered adapter versions"
    table: list[list[str]] = [[header for _, header, _ in COLUMNS]]
    for row in rows:
        cells = []
        for key, _, kind in COLUMNS:
            value = row.get(key)
            if key == "aliases":
                value = ",".join(value or []) or "-"
            elif key == "dataset_id" and row.get("is_base"):
                value = "(base model)"
            elif key == "run_id" and value:
                value = str(value)[:8]
            elif key == "dataset_id" and value:
                value = str(value)[:16]
            cells.append(_cell(value, kind))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)
                       ).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.register.view",
                                     description="List registered adapter versions side by side.")
    parser.add_argument("--model-name", default=None,
                        help="registered model (default: TUNELOOP_REGISTERED_MODEL_NAME)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    args = parser.parse_args(argv)
    rows = list_adapters(args.model_name)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_adapter_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
