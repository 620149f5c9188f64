"""Evaluation of a trained adapter against its base model, and the HTML model card.

Three measurements, all base vs base+adapter on the same model load (PEFT's `disable_adapter`):

1. Held-out perplexity on the validation JSONL, over assistant tokens only (the tokens the
   trainer learns), so a system prompt or long user turns do not dilute the number.
2. Rubric pass rate on a fixed scenario set (include/eval/scenarios.yaml, seed 001's 10-20
   scenarios covering the taxonomy): both models answer each scenario greedily; a judge grades
   each reply against the rubric (tasks.judge.stage: `load_rubric` + `score_verdicts`). The base pass
   rate is also seed 001's go/no-go gate (>70% / 50-70% / <50%).
3. Pairwise preference: the judge compares the two replies to each scenario twice, once in each
   order. Same winner both times → that model wins; any disagreement (incl. one "tie") → tie,
   which cancels position bias. Outcomes give a win rate and ELO ratings (seed 002: start 1000,
   K-factor 32, scenarios in file order).

The judge is an LLM role (default "judge") through the shared client (`tasks.core.llm`): rubric
grading reuses the curation judge (`tasks.judge.stage.judge_conversation`, all criteria with their
calibration examples in one request), pairwise comparison is the shared both-orders judge
(`tasks.judge.pairwise`, rendering include/prompts/judge/pairwise.jinja2). A judge call that fails
(transport error, no parseable JSON, missing criteria after retries) is recorded with its reason
and excluded from the rates (a pair with a failed order is undecided: outcome None);
counts of failures are reported, never raised — a 135M judge fails often. Results are logged to
the training's MLflow run and written as a self-contained HTML model card (plots embedded as PNG
data URIs) next to a JSON with every reply and verdict.

Layout: this module holds the entry points (`evaluate_adapter`, `evaluate_version`,
`evaluate_registered` for the `train_and_register` DAG) and the flat
`eval.*` metric names; beside it `config.py` (the scenario set), `models.py` (model loading,
perplexity, generation), `judges.py` (rubric grading, and the scenarios' pairwise prompts through
`tasks.judge.pairwise`, whose `combine_orders` is the both-orders rule), `scoring.py` (win rate,
ELO, base gate) and `model_card.py` (the HTML card).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tasks.core.ids import content_hash
from tasks.core.settings import get_settings
from tasks.datasets import deid
from tasks.evaluate.config import (
    DEFAULT_SCENARIOS_PATH,
    EvaluationError,
    ScenarioSet,
    load_scenarios,
    subset_scenarios,
)
from tasks.evaluate.judges import (
    EvalJudge,
    LlmEvalJudge,
    ScenarioResult,
    judge_scenarios,
    summarise_rubric,
)
from tasks.evaluate.model_card import training_from_run, write_model_card
from tasks.evaluate.models import generate_replies, load_model, perplexity, read_conversations
from tasks.evaluate.scoring import ELO_K_FACTOR, base_model_gate, elo_ratings, win_rate

log = logging.getLogger(__name__)


def evaluate_adapter(
    adapter_dir: Path | str,
    base_model: str,
    *,
    val_path: Path | str,
    scenarios_path: Path | str | None = None,
    judge_role: str = "judge",
    judge: EvalJudge | None = None,
    judge_cache: bool = True,
    max_new_tokens: int = 128,
    max_val_rows: int = 200,
    max_length: int = 2048,
    k_factor: float = ELO_K_FACTOR,
    run_id: str | None = None,
    out_dir: Path | str | None = None,
    training: Mapping[str, Any] | None = None,
    rubric_path: Path | str | None = None,
    max_scenarios: int | None = None,
) -> dict[str, Any]:
    """Evaluate base vs base+adapter; log to `run_id` when given; write the model card.

    `max_scenarios` evaluates an evenly spread subset of the scenario set (for a quick look on
    a CPU, where each scenario costs two rubric gradings and two pairwise judgments); the
    summary's `scenario_set` records how many of how many were used.

    Returns a JSON-able summary: perplexity, rubric pass rates, pairwise win rate and ELO,
    judge failure counts, the base-model gate, and the card/details paths.
    """
    from tasks.judge.stage import load_rubric

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise EvaluationError(f"{adapter_dir} is not a PEFT adapter folder (no "
                              "adapter_config.json); pass TrainResult.adapter_dir",
                              path=str(adapter_dir))
    scenarios = load_scenarios(scenarios_path)
    available = len(scenarios.scenarios)
    scenarios = subset_scenarios(scenarios, max_scenarios)
    rubric = load_rubric(Path(rubric_path) if rubric_path else None)
    conversations = read_conversations(val_path, limit=max_val_rows)
    if judge is None:
        judge = LlmEvalJudge.for_role(judge_role, use_cache=judge_cache)

    base_ppl, tuned_ppl, base_replies, tuned_replies = _measure_models(
        adapter_dir, base_model, conversations, scenarios, max_length=max_length,
        max_new_tokens=max_new_tokens)
    results = judge_scenarios(judge, rubric, scenarios, base_replies, tuned_replies)
    scores = _score_results(results, rubric, k_factor=k_factor)

    summary: dict[str, Any] = {
        "adapter_dir": str(adapter_dir), "base_model": base_model,
        "scenario_set": {"path": str(scenarios_path or DEFAULT_SCENARIOS_PATH),
                         "digest": scenarios.digest, "count": len(scenarios.scenarios),
                         "available": available},
        "rubric_version": rubric.version, "judge": getattr(judge, "label", "custom"),
        "perplexity": {"base": base_ppl["perplexity"], "tuned": tuned_ppl["perplexity"],
                       "tokens": tuned_ppl["tokens"], "rows": tuned_ppl["rows"]},
        "rubric": {"base": scores["base_rubric"], "tuned": scores["tuned_rubric"]},
        "pairwise": {**scores["pairwise"], "elo_tuned": scores["elo"]["tuned"],
                     "elo_base": scores["elo"]["base"], "k_factor": k_factor,
                     "judgment_failures": scores["pair_judgment_failures"]},
        "judge_failures": scores["judge_failures"],
        "gate": scores["gate"],
        "run_id": run_id,
    }
    metrics = eval_metrics(summary)
    summary["metrics"] = metrics

    card_path, details_path = _write_outputs(summary, results, scores["elo"]["history"],
                                             adapter_dir, run_id=run_id, out_dir=out_dir,
                                             training=training)
    summary["card_path"] = str(card_path)
    summary["details_path"] = str(details_path)
    if run_id:
        _log_to_run(run_id, metrics, card_path, details_path)
    log.info("evaluated %s: ppl %.3f→%.3f, pass %s→%s, win rate %s, %d judge failures",
             adapter_dir, base_ppl["perplexity"], tuned_ppl["perplexity"],
             scores["base_rubric"]["pass_rate"], scores["tuned_rubric"]["pass_rate"],
             scores["pairwise"]["win_rate"], scores["judge_failures"])
    return summary


def _measure_models(adapter_dir: Path, base_model: str, conversations: list[list[dict]],
                    scenarios: ScenarioSet, *, max_length: int, max_new_tokens: int
                    ) -> tuple[dict[str, float], dict[str, float], list[str], list[str]]:
    """Perplexity and greedy scenario replies, base (adapter disabled) then tuned, on one load.

    The model is dropped on return, before any judging starts.
    """
    model, tokenizer = load_model(adapter_dir, base_model)
    with model.disable_adapter():
        base_ppl = perplexity(model, tokenizer, conversations, max_length=max_length)
    tuned_ppl = perplexity(model, tokenizer, conversations, max_length=max_length)
    chats = [scenarios.messages_for(s) for s in scenarios.scenarios]
    with model.disable_adapter():
        base_replies = generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens)
    tuned_replies = generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens)
    del model
    return base_ppl, tuned_ppl, base_replies, tuned_replies


def _score_results(results: list[ScenarioResult], rubric, *, k_factor: float) -> dict[str, Any]:
    """Rubric summaries per model, pairwise win rate and ELO, failure counts, the base gate."""
    base_rubric = summarise_rubric(results, "base", rubric)
    tuned_rubric = summarise_rubric(results, "tuned", rubric)
    outcomes = [r.pairwise["outcome"] for r in results]
    pair_judgment_failures = sum(
        int(not r.pairwise[o]["ok"]) for r in results for o in ("tuned_first", "base_first"))
    return {
        "base_rubric": base_rubric, "tuned_rubric": tuned_rubric,
        "pairwise": win_rate(outcomes),
        "elo": elo_ratings(outcomes, k_factor=k_factor),
        "pair_judgment_failures": pair_judgment_failures,
        "judge_failures": (base_rubric["failures"] + tuned_rubric["failures"]
                           + pair_judgment_failures),
        "gate": base_model_gate(base_rubric["pass_rate"]),
    }


def _write_outputs(summary: dict[str, Any], results: list[ScenarioResult],
                   elo_history: list[tuple[float, float]], adapter_dir: Path, *,
                   run_id: str | None, out_dir: Path | str | None,
                   training: Mapping[str, Any] | None) -> tuple[Path, Path]:
    """evaluation.json (summary, ELO history, every reply and verdict) and model_card.html.

    The folder is `out_dir`, else <data_dir>/eval/<run id or adapter hash>; without `training`
    the card reads the loss curve from `run_id`'s MLflow run. Returns (card, details) paths.

    Both files are de-identified (`tasks.datasets.deid.scrub_value`) before they are written:
    the replies are model-written, and an adapter tuned on production reactions can repeat a
    user's email or phone; judge failures keep the judge's raw text; the training params come
    from a run that may predate de-identified logging. Both files also become MLflow artifacts.
    """
    summary = deid.scrub_value(dict(summary))
    results = [ScenarioResult(**deid.scrub_value(asdict(r))) for r in results]
    out = Path(out_dir) if out_dir else (
        get_settings().data_dir / "eval" / (run_id or content_hash(str(adapter_dir))[:16]))
    out.mkdir(parents=True, exist_ok=True)
    details_path = out / "evaluation.json"
    details_path.write_text(json.dumps(
        {**summary, "elo_history": elo_history,
         "scenarios": [asdict(r) for r in results]}, indent=2, default=str))
    if training is None and run_id:
        training = training_from_run(run_id)
    training = deid.scrub_value(dict(training)) if training else training
    card_path = write_model_card(summary, results, elo_history, out, training=training)
    return card_path, details_path


def _log_to_run(run_id: str, metrics: Mapping[str, float], card_path: Path,
                details_path: Path) -> None:
    """The `eval.*` metrics and both files (artifact folder "evaluation") on the MLflow run."""
    from tasks.register.registry import log_run_artifact, log_run_metrics

    log_run_metrics(run_id, metrics)
    log_run_artifact(run_id, card_path, "evaluation")
    log_run_artifact(run_id, details_path, "evaluation")


def evaluate_version(version: str | int, *, val_path: Path | str, model_name: str | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """DAG-facing: evaluate a registered version (its adapter vs its base) and log to its run.

    Materialises the adapter, reads the base model from the version's tags, runs
    `evaluate_adapter` with `run_id` = the version's training run, and returns a small XCom-sized
    dict: {"model_name", "version", "run_id", "metrics", "gate", "judge_failures", "card_path"}.
    """
    from tasks.register.registry import get_version_info, materialize_adapter

    info = get_version_info(version, model_name=model_name)
    if info["is_base"]:
        raise EvaluationError(
            f"version {info['version']} of {info['model_name']} is the base model (no adapter); "
            "evaluate a trained version, e.g. the challenger")
    adapter = materialize_adapter(info["version"], model_name=info["model_name"])
    base_model = info["tags"].get("base_model")
    if not base_model or base_model == "unknown" or adapter is None:
        raise EvaluationError(
            f"version {info['version']} has no base_model tag; re-register it from a run logged "
            "by log_training_run")
    summary = evaluate_adapter(adapter, base_model, val_path=val_path, run_id=info["run_id"],
                               **kwargs)
    return {"model_name": info["model_name"], "version": info["version"],
            "run_id": info["run_id"], "metrics": summary["metrics"], "gate": summary["gate"],
            "judge_failures": summary["judge_failures"], "card_path": summary["card_path"]}


def evaluate_registered(registered: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Evaluate what `tasks.register.stage.register_training` registered: base vs tuned, logged
    to the training run, with the HTML model card under <data>/reports/model-cards/."""
    out_dir = get_settings().data_dir / "reports" / "model-cards" / \
        f"{registered['model_name']}-v{registered['version']}"
    summary = evaluate_adapter(
        registered["adapter_dir"], registered["base_model"], val_path=registered["val_path"],
        run_id=registered["run_id"], out_dir=out_dir, **kwargs,
    )
    return json.loads(json.dumps(summary, default=str))


def eval_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The flat `eval.*` metric names logged to MLflow (and read by the registry view)."""
    rubric, pairwise = summary["rubric"], summary["pairwise"]
    candidates = {
        "eval.perplexity_base": summary["perplexity"]["base"],
        "eval.perplexity_tuned": summary["perplexity"]["tuned"],
        "eval.rubric_pass_rate_base": rubric["base"]["pass_rate"],
        "eval.rubric_pass_rate_tuned": rubric["tuned"]["pass_rate"],
        "eval.rubric_score_base": rubric["base"]["mean_score"],
        "eval.rubric_score_tuned": rubric["tuned"]["mean_score"],
        "eval.win_rate": pairwise["win_rate"],
        "eval.wins": pairwise["wins"], "eval.losses": pairwise["losses"],
        "eval.ties": pairwise["ties"],
        "eval.elo_tuned": pairwise["elo_tuned"], "eval.elo_base": pairwise["elo_base"],
        "eval.judge_failures": summary["judge_failures"],
    }
    return {k: float(v) for k, v in candidates.items() if v is not None}
