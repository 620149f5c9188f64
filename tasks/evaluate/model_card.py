"""The self-contained HTML model card: include/eval/model_card.html.jinja2 with embedded plots.

`write_model_card` renders the evaluation summary and every scenario's replies and verdicts, with
matplotlib plots (perplexity, rubric pass rates, per-criterion rates, ELO history and, when the
training run is known, its loss curve) embedded as PNG data URIs so the file travels alone.
`training_from_run` reads that loss curve and the run's params and tags from MLflow; when the run
cannot be read the card is written without its training section.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.evaluate.config import EVAL_DIR
from tasks.evaluate.judges import ScenarioResult
from tasks.evaluate.scoring import ELO_START

log = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = EVAL_DIR / "model_card.html.jinja2"


def training_from_run(run_id: str) -> dict[str, Any] | None:
    """Loss curve and summary metrics of the training run, for the card."""
    try:
        from tasks.register.registry import get_client

        client = get_client()
        run = client.get_run(run_id)
        curve = [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")]
        eval_curve = [(m.step, m.value) for m in client.get_metric_history(run_id, "eval_loss")]
    except Exception as exc:  # the card is still useful without the training section
        log.warning("could not read training run %s for the model card: %s", run_id, exc)
        return None
    return {"loss_curve": sorted(curve), "eval_curve": sorted(eval_curve),
            "params": dict(run.data.params), "tags": dict(run.data.tags)}


# ---- model card --------------------------------------------------------------------------------

def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def card_plots(summary: Mapping[str, Any], elo_history: Sequence[tuple[float, float]],
               training: Mapping[str, Any] | None = None) -> dict[str, str]:
    """PNG data URIs: perplexity, rubric pass rates, per-criterion rates, ELO, loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("#8c8c8c", "#2b7bb9")
    plots: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(4, 3))
    values = [summary["perplexity"]["base"], summary["perplexity"]["tuned"]]
    ax.bar(["base", "tuned"], values, color=colors)
    ax.set_title("Held-out perplexity (assistant tokens)")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    plots["perplexity"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4, 3))
    rates = [summary["rubric"][m]["pass_rate"] for m in ("base", "tuned")]
    ax.bar(["base", "tuned"], [r or 0.0 for r in rates], color=colors)
    ax.set_ylim(0, 1)
    ax.axhline(0.7, ls="--", c="#c0392b", lw=1)
    ax.axhline(0.5, ls=":", c="#c0392b", lw=1)
    ax.set_title("Rubric pass rate")
    for i, r in enumerate(rates):
        ax.text(i, r or 0.0, "n/a" if r is None else f"{r:.0%}", ha="center", va="bottom")
    plots["rubric"] = _png(fig)

    base_pc = summary["rubric"]["base"]["per_criterion"]
    tuned_pc = summary["rubric"]["tuned"]["per_criterion"]
    criteria = list(base_pc)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(criteria)), 3))
    xs = range(len(criteria))
    ax.bar([x - 0.2 for x in xs], [base_pc[c] or 0 for c in criteria], 0.4, label="base",
           color=colors[0])
    ax.bar([x + 0.2 for x in xs], [tuned_pc[c] or 0 for c in criteria], 0.4, label="tuned",
           color=colors[1])
    ax.set_xticks(list(xs), criteria)
    ax.set_ylim(0, 1.18)
    ax.legend(loc="upper center", ncol=2, frameon=False)
    ax.set_title("Pass rate per criterion (NA excluded)")
    plots["criteria"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([h[0] for h in elo_history], label="tuned", color=colors[1])
    ax.plot([h[1] for h in elo_history], label="base", color=colors[0])
    ax.set_xlabel("decided pair")
    ax.set_title(f"ELO (K={summary['pairwise']['k_factor']:g}, start {ELO_START:g})")
    ax.legend()
    plots["elo"] = _png(fig)

    if training and training.get("loss_curve"):
        fig, ax = plt.subplots(figsize=(4, 3))
        curve = training["loss_curve"]
        ax.plot([p[0] for p in curve], [p[1] for p in curve], label="train")
        if training.get("eval_curve"):
            ax.plot([p[0] for p in training["eval_curve"]],
                    [p[1] for p in training["eval_curve"]], "o-", label="eval")
        ax.set_xlabel("step")
        ax.set_title("Training loss")
        ax.legend()
        plots["loss"] = _png(fig)
    return plots


def write_model_card(summary: Mapping[str, Any], results: Sequence[ScenarioResult],
                     elo_history: Sequence[tuple[float, float]], out_dir: Path, *,
                     training: Mapping[str, Any] | None = None) -> Path:
    """Render include/eval/model_card.html.jinja2 with plots embedded; return the file path."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"))
    html = template.render(
        summary=summary, results=results, plots=card_plots(summary, elo_history, training),
        training=training or {}, fmt=_fmt, pct=_pct,
    )
    path = Path(out_dir) / "model_card.html"
    path.write_text(html, encoding="utf-8")
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.0%}"
