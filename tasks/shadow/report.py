"""The comparison report: `write_report` renders a self-contained HTML page with charts (PNG
files, matplotlib Agg: rates with Wilson intervals, dwell histograms, pairwise outcomes) and the
report as JSON, logs them to an MLflow run in the experiment "shadow-reports" (one run per report
id, reused on a rerun) and stores a `comparison_reports` row with the report's URI. It also
holds `mlflow_client`, the tracking/registry client the stage's alias moves share.

The page and the JSON are rendered from the report passed through `tasks.datasets.deid`. Today
it holds ids, counts, rates and verdicts but no text sample; a field with user- or judge-written
text added later (a verdict's reason) leaves scrubbed with the rest.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

from tasks.core.settings import get_settings
from tasks.datasets import deid
from tasks.shadow.config import CHALLENGER, CHAMPION, DWELL_BIN_LABELS
from tasks.shadow.deployments import shadow_engine

log = logging.getLogger(__name__)

REPORT_EXPERIMENT = "shadow-reports"


def mlflow_client(tracking_uri: str | None = None) -> Any:
    from tasks.core.mlflow_client import make_client

    return make_client(tracking_uri)  # with the MLflow HTTP timeouts and retries set


def _charts(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """PNG charts: rates with Wilson intervals, dwell histograms, pairwise outcomes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [CHAMPION, CHALLENGER]
    colours = {CHAMPION: "#4c72b0", CHALLENGER: "#dd8452"}
    charts: dict[str, Path] = {}

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, title in ((axes[0], "magic_done", "magic-zone done rate"),
                              (axes[1], "quick_dismiss", "quick-dismiss rate")):
        rates = [variants[v][f"{metric}_rate"] or 0.0 for v in names]
        lows = [rates[i] - variants[v][f"{metric}_ci"][0] for i, v in enumerate(names)]
        highs = [variants[v][f"{metric}_ci"][1] - rates[i] for i, v in enumerate(names)]
        ax.bar(names, rates, yerr=[lows, highs], capsize=6,
               color=[colours[v] for v in names])
        ax.set_ylim(0, 1)
        ax.set_title(f"{title} (95% Wilson CI)")
        for i, v in enumerate(names):
            ax.text(i, min(0.95, rates[i] + 0.03), f"n={variants[v]['reacted']}",
                    ha="center", fontsize=8)
    fig.tight_layout()
    charts["rates"] = out_dir / "rates.png"
    fig.savefig(charts["rates"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.2))
    width = 0.4
    for offset, v in ((-width / 2, CHAMPION), (width / 2, CHALLENGER)):
        hist = variants[v]["dwell_histogram"]
        total = sum(hist.values()) or 1
        ax.bar([i + offset for i in range(len(DWELL_BIN_LABELS))],
               [hist[label] / total for label in DWELL_BIN_LABELS], width,
               label=v, color=colours[v])
    ax.set_xticks(range(len(DWELL_BIN_LABELS)), DWELL_BIN_LABELS)
    ax.set_ylabel("share of reactions")
    ax.set_title("dwell time of the terminal reaction")
    ax.legend()
    fig.tight_layout()
    charts["dwell"] = out_dir / "dwell.png"
    fig.savefig(charts["dwell"], dpi=110)
    plt.close(fig)

    pairwise = report.get("pairwise")
    if pairwise:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        labels = ["challenger wins", "ties", "champion wins"]
        values = [pairwise["challenger_wins"], pairwise["ties"], pairwise["champion_wins"]]
        ax.barh(labels, values, color=[colours[CHALLENGER], "#999999", colours[CHAMPION]])
        ax.set_title(f"pairwise judge, both orders (sign test p={pairwise['sign_test_p']:.4f})")
        fig.tight_layout()
        charts["pairwise"] = out_dir / "pairwise.png"
        fig.savefig(charts["pairwise"], dpi=110)
        plt.close(fig)
    return charts


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def render_html(report: dict[str, Any], charts: dict[str, Path]) -> str:
    """A self-contained HTML page (charts embedded as data URIs)."""
    v = report["variants"]
    rows = []
    for label, key, digits in (
        ("requests", "requests", 0), ("backend errors", "errors", 0),
        ("reacted interactions", "reacted", 0),
        ("magic-zone done", "magic_done", 0), ("magic-zone done rate", "magic_done_rate", 3),
        ("quick dismiss", "quick_dismiss", 0), ("quick-dismiss rate", "quick_dismiss_rate", 3),
        ("mean dwell (ms)", "mean_dwell_ms", 0), ("model version", "model_version", 0),
    ):
        cells = "".join(f"<td>{_fmt(v[name][key], digits)}</td>" for name in (CHAMPION,
                                                                              CHALLENGER))
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    for label, key in (("magic-zone 95% CI", "magic_done_ci"),
                       ("quick-dismiss 95% CI", "quick_dismiss_ci")):
        cells = "".join(f"<td>[{v[n][key][0]:.3f}, {v[n][key][1]:.3f}]</td>"
                        for n in (CHAMPION, CHALLENGER))
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    tests_html = "<p>Tests not run: below the minimum sample size.</p>"
    if report.get("tests"):
        items = []
        for name, test in report["tests"].items():
            items.append(f"<li>{name}: diff={test['diff']:+.4f}, z={test['z']:.3f}, "
                         f"p={test['p_value']:.4g}</li>")
        tests_html = "<ul>" + "".join(items) + "</ul>"
    if report.get("error_test"):
        e = report["error_test"]
        tests_html += (f"<p>backend error rate: {e['p1']:.4f} vs {e['p2']:.4f}, "
                       f"p={e['p_value']:.4g}</p>")
    pairwise_html = ""
    if report.get("pairwise"):
        p = report["pairwise"]
        pairwise_html = (
            f"<h2>Pairwise judge (mirror)</h2><p>{p['judged']} judged pairs "
            f"({p['errors']} judge failures): challenger {p['challenger_wins']} wins, "
            f"champion {p['champion_wins']} wins, {p['ties']} ties; sign test "
            f"p={p['sign_test_p']:.4g}.</p>")
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"/></figure>'
        for name, path in charts.items())
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report.get("reasons", []))
    w = report["windows"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Shadow comparison {_fmt(report['deployment_id'])}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{text-align:left}}.decision{{font-size:1.4em;font-weight:bold}}</style></head><body>
<h1>Shadow comparison: {_fmt(report['model_name'])}</h1>
<p>Deployment <code>{_fmt(report['deployment_id'])}</code>, mode <b>{_fmt(report['mode'])}</b>,
share {report['share']:.3f}; champion v{_fmt(report['champion_version'])} vs challenger
v{_fmt(report['challenger_version'])}. Report <code>{_fmt(report.get('report_id'))}</code>.</p>
<p class="decision">Decision: {_fmt(report['decision'])}</p><ul>{reasons}</ul>
<p>Positive: <code>done</code> with {w['done_min_ms']} ms &le; dwell &le; {w['done_max_ms']} ms;
negative: <code>dismiss</code> with dwell &lt; {w['dismiss_max_ms']} ms. Rates are over reacted
interactions; tests need {report['min_samples']} per variant; alpha={report['alpha']}.</p>
<table><tr><th></th><th>champion</th><th>challenger</th></tr>{''.join(rows)}</table>
<h2>Tests (challenger vs champion)</h2>{tests_html}{pairwise_html}
<h2>Charts</h2>{images}
</body></html>
"""


def _experiment_id(client: Any, tracking_uri: str) -> str:
    existing = client.get_experiment_by_name(REPORT_EXPERIMENT)
    if existing is not None:
        return existing.experiment_id
    location = None
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        root = get_settings().mlflow_artifact_root / REPORT_EXPERIMENT
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return client.create_experiment(REPORT_EXPERIMENT, artifact_location=location)
    except Exception:  # noqa: BLE001 - a concurrent creator won
        return client.get_experiment_by_name(REPORT_EXPERIMENT).experiment_id


def _log_to_mlflow(report: dict[str, Any], files: list[Path],
                   tracking_uri: str | None) -> tuple[str, str]:
    """Log the report to a run (reused for the same report id); return (run_id, html uri)."""
    from mlflow.entities import Metric, Param, RunTag

    uri = tracking_uri or get_settings().resolved_mlflow_tracking_uri
    client = mlflow_client(uri)
    experiment_id = _experiment_id(client, uri)
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.report_id = '{report['report_id']}'",
                               max_results=1)
    if found:
        run = found[0]
    else:
        run = client.create_run(experiment_id,
                                run_name=f"shadow-{report['deployment_id'][:12]}",
                                tags={"report_id": report["report_id"],
                                      "deployment_id": report["deployment_id"],
                                      "decision": report["decision"]})
    run_id = run.info.run_id
    if not found:
        params = {"deployment_id": report["deployment_id"], "mode": report["mode"],
                  "share": report["share"], "champion_version": report["champion_version"],
                  "challenger_version": report["challenger_version"],
                  "min_samples": report["min_samples"], "alpha": report["alpha"]}
        metrics = []
        for variant, values in report["variants"].items():
            for key in ("requests", "errors", "reacted", "magic_done_rate",
                        "quick_dismiss_rate", "mean_dwell_ms"):
                if values.get(key) is not None:
                    metrics.append(Metric(f"{variant}.{key}", float(values[key]), 0, 0))
        for name, test in (report.get("tests") or {}).items():
            metrics.append(Metric(f"test.{name}.p_value", float(test["p_value"]), 0, 0))
            metrics.append(Metric(f"test.{name}.diff", float(test["diff"]), 0, 0))
        if report.get("pairwise"):
            metrics.append(Metric("pairwise.sign_test_p",
                                  float(report["pairwise"]["sign_test_p"]), 0, 0))
        client.log_batch(run_id, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("decision", report["decision"])])
    for path in files:
        client.log_artifact(run_id, str(path))
    if not found:
        client.set_terminated(run_id, status="FINISHED")
    return run_id, f"{run.info.artifact_uri.rstrip('/')}/report.html"


def write_report_files(report: dict[str, Any], out_dir: Path | str, *,
                       log_to_mlflow: bool = True, tracking_uri: str | None = None,
                       engine: Any = None) -> dict[str, Any]:
    """Render, log and store a report; return {"path", "report_uri", "mlflow_run_id"}."""
    from tasks.core.db.engine import session_scope, upsert
    from tasks.core.db.models import ComparisonReport

    folder = Path(out_dir) / report["report_id"]
    folder.mkdir(parents=True, exist_ok=True)
    shown = deid.scrub_value(report)  # what leaves as files and MLflow artifacts
    charts = _charts(shown, folder)
    page = folder / "report.html"
    page.write_text(render_html(shown, charts), encoding="utf-8")
    data = folder / "report.json"
    data.write_text(json.dumps(shown, indent=2, default=str), encoding="utf-8")
    run_id, report_uri = None, page.resolve().as_uri()
    if log_to_mlflow:
        run_id, report_uri = _log_to_mlflow(report, [page, data, *charts.values()],
                                            tracking_uri)
    with session_scope(shadow_engine(engine)) as session:
        upsert(session, ComparisonReport, [{
            "id": report["report_id"], "deployment_id": report["deployment_id"],
            "metrics": json.loads(json.dumps(report, default=str)),
            "decision": report["decision"], "report_uri": report_uri, "mlflow_run_id": run_id,
        }], update=["metrics", "decision", "report_uri", "mlflow_run_id"])
    log.info("shadow report %s: %s (%s)", report["report_id"], page, report_uri)
    return {"path": page, "report_uri": report_uri, "mlflow_run_id": run_id}


def write_report(report: dict[str, Any], out_dir: Path | str, *, log_to_mlflow: bool = True,
                 tracking_uri: str | None = None, engine: Any = None) -> Path:
    """Render the HTML (+ PNG) report, log it to MLflow ("shadow-reports"), store a
    `comparison_reports` row with its URI; return the local HTML path."""
    return write_report_files(report, out_dir, log_to_mlflow=log_to_mlflow,
                              tracking_uri=tracking_uri, engine=engine)["path"]
