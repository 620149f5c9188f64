"""The batch quality gate: a Great Expectations 1.x suite, written in Python, run by a checkpoint.

The gate sees one row per candidate training example (a pandas frame with `CURATED_COLUMNS`) and
checks what training relies on: complete fields, tagger thresholds, unique conversation hashes,
length bounds (turns, words, tokens against the training `sequence_len`), the edge-case share
against the taxonomy target, topic/persona diversity, a minimum size, and no PII in the exported
texts: the `pii` column holds, per row, the categories `tasks.datasets.deid.pii_categories`
finds in its text (known names included) — the same detector the scrubber uses.

It runs in an ephemeral GX context (nothing persisted outside the snapshot), builds Data Docs HTML
into the folder it is given, and returns a small JSON-able dict. A failed gate raises nothing by
itself: callers record it (curate() stores gate_passed=False and the DAG short-circuits).

Every expectation carries a stable gate name in its `meta` (e.g. ``no_pii``), which is what
`failed_expectations` lists. Unexpected *values* are never rendered (only conversation ids), so
Data Docs cannot leak the PII the gate just caught; a failed ``no_pii`` names each row and its
categories (``pii_findings``), never the value.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

log = logging.getLogger(__name__)

# Gate names: what `failed_expectations` reports and what the tests assert.
COMPLETE_FIELDS = "complete_fields"
REQUIRED_TAGGERS_PRESENT = "required_taggers_present"
HALLUCINATION_WITHIN_MAX = "hallucination_within_max"
EMOTION_CONFIDENCE_AT_LEAST_MIN = "emotion_confidence_at_least_min"
RUBRIC_PASSED = "rubric_passed"
SAFETY_GATES_CLEAR = "safety_gates_clear"
UNIQUE_CONVERSATION_IDS = "unique_conversation_ids"
UNIQUE_CONVERSATION_HASHES = "unique_conversation_hashes"
TURNS_WITHIN_BOUNDS = "turns_within_bounds"
WORDS_WITHIN_BOUNDS = "words_within_bounds"
TOKENS_WITHIN_SEQUENCE_LEN = "tokens_within_sequence_len"
EDGE_CASE_SHARE = "edge_case_share_within_tolerance"
TOPIC_DIVERSITY = "min_topic_diversity"
PERSONA_DIVERSITY = "min_persona_diversity"
MIN_DATASET_SIZE = "min_dataset_size"
NO_PII = "no_pii"
MIN_POSITIVE = "min_positive_signals"
MIN_NEGATIVE = "min_negative_signals"

# The frame contract for the curated-dataset gate (tasks.curate.stage builds it).
CURATED_COLUMNS = (
    "conversation_id", "content_hash", "persona_id", "topic", "is_edge_case",
    "hallucination_score", "emotion_confidence", "missing_taggers", "rubric_passed",
    "safety_failed", "turns", "words", "tokens", "text", "pii",
)
# For reaction-signal datasets (tasks.signals.stage builds it): one row per interaction used.
SIGNAL_COLUMNS = ("interaction_id", "label", "is_positive", "is_negative", "context_hash", "text",
                  "pii")

SAMPLE_IDS = 20
# Report which rows failed by id, never by value (values may be the PII that failed the gate).
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": 20,
    "exclude_unexpected_values": True,
}


class GateSpec(BaseModel):
    """Thresholds the curated gate checks (built from CurationConfig.gate_spec())."""

    max_hallucination: float | None = 0.1
    min_emotion_confidence: float | None = None
    required_taggers: list[str] = Field(default_factory=list)
    require_rubric_pass: bool = False
    max_turns: int = 20
    min_words: int = 1
    max_words: int = 4000
    sequence_len: int | None = 2048
    edge_case_target: float | None = 0.15
    edge_case_tolerance: float = 0.05
    # A dataset of n rows drawn at a 15% edge-case rate has a binomial sampling error of
    # sqrt(p(1-p)/n): ±0.069 at n=27. The check allows max(tolerance, z * that error), so a
    # small dataset is not blocked by chance; z=2.576 is a 99% interval. None: tolerance only.
    edge_case_sampling_z: float | None = Field(2.576, gt=0)
    min_rows: int = 1
    min_topic_diversity: int = 1
    min_persona_diversity: int = 1

    def edge_case_bounds(self, rows: int) -> tuple[float, float, float]:
        """(low, high, allowed deviation) for the edge-case share of a dataset of `rows`."""
        assert self.edge_case_target is not None
        target = self.edge_case_target
        allowed = self.edge_case_tolerance
        if self.edge_case_sampling_z is not None and rows > 0:
            allowed = max(allowed,
                          self.edge_case_sampling_z * math.sqrt(target * (1 - target) / rows))
        return max(0.0, target - allowed), min(1.0, target + allowed), allowed

    @model_validator(mode="after")
    def _consistent(self) -> GateSpec:
        if self.min_words > self.max_words:
            raise ValueError(
                f"min_words ({self.min_words}) > max_words ({self.max_words}); "
                "set e.g. min_words: 3, max_words: 4000"
            )
        return self


class SignalGateSpec(BaseModel):
    """Thresholds the reaction-signal gate checks (built by tasks.signals.stage)."""

    min_positive: int = 500
    min_negative: int = 500
    min_rows: int = 1


def _no_pii(suite: Any) -> None:
    """The PII expectation: every row's `pii` column (its detected categories) is empty.

    The frame builders fill `pii` with `tasks.datasets.deid.pii_categories(text, known_names)`,
    so neither the detectors nor the known names appear in the suite or in the Data Docs.
    """
    import great_expectations as gx

    E = gx.expectations
    suite.add_expectation(_named(
        E.ExpectColumnValuesToBeInSet(column="pii", value_set=[""]),
        NO_PII, "no PII in any text (tasks.datasets.deid: emails, phones, cards, IBANs, IPs, "
                "secrets, national ids, dates of birth, addresses, names)"))


def pii_column(texts: Any, names: Any = None) -> list[str]:
    """The `pii` column for gate frames: each text's PII categories, comma-joined ('' = none).

    `names` (optional) gives each row's known person names (from persona/context fields).
    """
    from tasks.datasets.deid import pii_categories

    names = names if names is not None else [()] * len(texts)
    return [",".join(pii_categories(text or "", row_names))
            for text, row_names in zip(texts, names, strict=True)]


def _pii_findings(frame: Any, id_column: str) -> list[dict[str, Any]]:
    """Rows the PII expectation refused: id and categories, never the value."""
    if "pii" not in frame.columns:
        return []
    flagged = frame[frame["pii"].astype(str) != ""]
    ids = flagged[id_column] if id_column in frame.columns else flagged.index
    return [{"row": str(row), "categories": str(categories).split(",")}
            for row, categories in zip(ids, flagged["pii"], strict=True)][:SAMPLE_IDS]


def _named(expectation: Any, name: str, description: str) -> Any:
    expectation.meta = {"gate_name": name}
    expectation.description = description
    return expectation


def build_curated_suite(spec: GateSpec, name: str = "curated_dataset",
                        rows: int = 0):  # -> ExpectationSuite
    """The curated-dataset expectation suite, built in Python from the thresholds."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    complete = ["conversation_id", "content_hash", "persona_id", "topic", "text"]
    if "hallucination" in spec.required_taggers:
        complete.append("hallucination_score")
    if "emotion" in spec.required_taggers:
        complete.append("emotion_confidence")
    for column in complete:
        suite.add_expectation(_named(E.ExpectColumnValuesToNotBeNull(column=column),
                                     COMPLETE_FIELDS, f"every row has a {column}"))
    suite.add_expectation(_named(
        E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
        COMPLETE_FIELDS, "no empty conversation text"))
    suite.add_expectation(_named(
        E.ExpectColumnValuesToBeBetween(column="missing_taggers", min_value=0, max_value=0),
        REQUIRED_TAGGERS_PRESENT,
        f"every row has results from the required taggers ({', '.join(spec.required_taggers)})"))
    if spec.max_hallucination is not None:
        suite.add_expectation(_named(
            E.ExpectColumnValuesToBeBetween(column="hallucination_score", min_value=0.0,
                                            max_value=spec.max_hallucination),
            HALLUCINATION_WITHIN_MAX,
            f"hallucination_score <= max_hallucination ({spec.max_hallucination})"))
    if spec.min_emotion_confidence is not None:
        suite.add_expectation(_named(
            E.ExpectColumnValuesToBeBetween(column="emotion_confidence",
                                            min_value=spec.min_emotion_confidence, max_value=1.0),
            EMOTION_CONFIDENCE_AT_LEAST_MIN,
            f"emotion confidence >= min_emotion_confidence ({spec.min_emotion_confidence})"))
    if spec.require_rubric_pass:
        suite.add_expectation(_named(
            E.ExpectColumnValuesToBeInSet(column="rubric_passed", value_set=[True]),
            RUBRIC_PASSED, "every row passed the rubric"))
    suite.add_expectation(_named(
        E.ExpectColumnValuesToBeInSet(column="safety_failed", value_set=[False]),
        SAFETY_GATES_CLEAR, "no row failed a rubric safety gate"))
    suite.add_expectation(_named(E.ExpectColumnValuesToBeUnique(column="conversation_id"),
                                 UNIQUE_CONVERSATION_IDS, "conversation ids are unique"))
    suite.add_expectation(_named(E.ExpectColumnValuesToBeUnique(column="content_hash"),
                                 UNIQUE_CONVERSATION_HASHES, "conversation content hashes are unique"))
    suite.add_expectation(_named(
        E.ExpectColumnValuesToBeBetween(column="turns", min_value=1, max_value=spec.max_turns),
        TURNS_WITHIN_BOUNDS, f"1 <= turns <= max_turns ({spec.max_turns})"))
    suite.add_expectation(_named(
        E.ExpectColumnValuesToBeBetween(column="words", min_value=spec.min_words,
                                        max_value=spec.max_words),
        WORDS_WITHIN_BOUNDS, f"{spec.min_words} <= words <= {spec.max_words}"))
    if spec.sequence_len is not None:
        suite.add_expectation(_named(
            E.ExpectColumnValuesToBeBetween(column="tokens", min_value=1,
                                            max_value=spec.sequence_len),
            TOKENS_WITHIN_SEQUENCE_LEN, f"tokens <= sequence_len ({spec.sequence_len})"))
    if spec.edge_case_target is not None:
        low, high, allowed = spec.edge_case_bounds(rows)
        widened = (f" (tolerance {spec.edge_case_tolerance} widened to the 99% sampling "
                   f"interval of {rows} rows)" if allowed > spec.edge_case_tolerance else "")
        suite.add_expectation(_named(
            E.ExpectColumnMeanToBeBetween(column="is_edge_case", min_value=low, max_value=high),
            EDGE_CASE_SHARE,
            f"edge-case share within {spec.edge_case_target} ± {allowed:.3f}{widened}"))
    suite.add_expectation(_named(
        E.ExpectColumnUniqueValueCountToBeBetween(column="topic",
                                                  min_value=spec.min_topic_diversity),
        TOPIC_DIVERSITY, f">= {spec.min_topic_diversity} distinct topics"))
    suite.add_expectation(_named(
        E.ExpectColumnUniqueValueCountToBeBetween(column="persona_id",
                                                  min_value=spec.min_persona_diversity),
        PERSONA_DIVERSITY, f">= {spec.min_persona_diversity} distinct personas"))
    suite.add_expectation(_named(E.ExpectTableRowCountToBeBetween(min_value=spec.min_rows),
                                 MIN_DATASET_SIZE, f">= {spec.min_rows} rows"))
    _no_pii(suite)
    return suite


def build_signal_suite(spec: SignalGateSpec, name: str = "reaction_dataset"):
    """The reaction-signal dataset suite: complete, unique, enough signals, no PII."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    for column in ("interaction_id", "label", "context_hash", "text"):
        suite.add_expectation(_named(E.ExpectColumnValuesToNotBeNull(column=column),
                                     COMPLETE_FIELDS, f"every row has a {column}"))
    suite.add_expectation(_named(
        E.ExpectColumnValuesToBeInSet(column="label", value_set=["positive", "negative"]),
        COMPLETE_FIELDS, "labels are positive or negative"))
    suite.add_expectation(_named(E.ExpectColumnValuesToBeUnique(column="interaction_id"),
                                 UNIQUE_CONVERSATION_IDS, "each interaction is used once"))
    suite.add_expectation(_named(E.ExpectColumnSumToBeBetween(column="is_positive",
                                                              min_value=spec.min_positive),
                                 MIN_POSITIVE, f">= {spec.min_positive} positive signals"))
    suite.add_expectation(_named(E.ExpectColumnSumToBeBetween(column="is_negative",
                                                              min_value=spec.min_negative),
                                 MIN_NEGATIVE, f">= {spec.min_negative} negative signals"))
    suite.add_expectation(_named(E.ExpectTableRowCountToBeBetween(min_value=spec.min_rows),
                                 MIN_DATASET_SIZE, f">= {spec.min_rows} rows"))
    _no_pii(suite)
    return suite


def _ephemeral_context(docs_dir: Path | None):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:
        context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    except Exception:  # pragma: no cover - cosmetic only (no tqdm bars in task logs)
        log.debug("could not disable GX progress bars", exc_info=True)
    if docs_dir is not None:
        context.add_data_docs_site("snapshot", {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return context


def _observed(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("observed_value", "element_count", "unexpected_count", "unexpected_percent",
            "missing_count")
    out = {k: result[k] for k in keys if k in result and result[k] is not None}
    ids = result.get("partial_unexpected_index_list")
    if ids:
        # GX gives [{"<id column>": [ids...]}] when values are excluded, else one dict per row.
        flat: list[Any] = []
        for item in ids:
            values = item.values() if isinstance(item, dict) else [item]
            for value in values:
                flat.extend(value if isinstance(value, list) else [value])
        out["sample_ids"] = flat[:SAMPLE_IDS]
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in out.items()}


def run_suite(frame: Any, build_suite: Callable[[], Any], *, docs_dir: Path | None = None,
              id_column: str = "conversation_id") -> dict[str, Any]:
    """Validate `frame` against the suite `build_suite()` makes, through a Checkpoint.

    The suite is built after the ephemeral context exists (GX binds suites to the active
    context). Data Docs are built into `docs_dir` when given.

    Returns {"success", "failed_expectations", "statistics", "data_docs", "results"} where
    failed_expectations are gate names (deduplicated, suite order) and results hold one small
    record per expectation.
    """
    import great_expectations as gx

    context = _ephemeral_context(docs_dir)
    suite = build_suite()
    asset = context.data_sources.add_pandas("tuneloop").add_dataframe_asset(suite.name)
    batch = asset.add_batch_definition_whole_dataframe("snapshot")
    suite = context.suites.add(suite)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}_validation", data=batch, suite=suite))
    actions = []
    if docs_dir is not None:
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs",
                                                          site_names=["snapshot"]))
    result_format = dict(RESULT_FORMAT)
    if id_column in frame.columns:
        result_format["unexpected_index_column_names"] = [id_column]
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"{suite.name}_checkpoint", validation_definitions=[validation], actions=actions,
        result_format=result_format))
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": frame})

    failed: list[str] = []
    records: list[dict[str, Any]] = []
    statistics: dict[str, Any] = {}
    for suite_result in checkpoint_result.run_results.values():
        statistics = {k: (float(v) if isinstance(v, float) else v)
                      for k, v in (suite_result.statistics or {}).items()}
        for item in suite_result.results:
            config = item.expectation_config
            name = (config.meta or {}).get("gate_name", config.type)
            column = config.kwargs.get("column")
            record = {"name": name, "expectation": config.type, "column": column,
                      "success": bool(item.success), **_observed(item.result or {})}
            if name == NO_PII and not item.success:
                record["pii_findings"] = _pii_findings(frame, id_column)
            records.append(record)
            if not item.success and name not in failed:
                failed.append(name)
    data_docs = None
    if docs_dir is not None and (docs_dir / "index.html").exists():
        data_docs = str(docs_dir / "index.html")
    statistics["rows"] = int(len(frame))
    return {
        "success": bool(checkpoint_result.success),
        "failed_expectations": failed,
        "statistics": statistics,
        "data_docs": data_docs,
        "results": records,
    }


def run_curated_gate(frame: Any, spec: GateSpec, *, docs_dir: Path | None = None
                     ) -> dict[str, Any]:
    """Run the curated-dataset gate on a frame with CURATED_COLUMNS."""
    missing = [c for c in CURATED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"gate frame lacks columns {missing}; build it with "
                         "tasks.curate.stage.gate_frame(rows)")
    return run_suite(frame, lambda: build_curated_suite(spec, rows=len(frame)),
                     docs_dir=docs_dir)


def run_signal_gate(frame: Any, spec: SignalGateSpec, *, docs_dir: Path | None = None
                    ) -> dict[str, Any]:
    """Run the reaction-signal gate on a frame with SIGNAL_COLUMNS."""
    missing = [c for c in SIGNAL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"signal gate frame lacks columns {missing}; build it with "
                         "tasks.signals.stage.signal_frame(...)")
    return run_suite(frame, lambda: build_signal_suite(spec), docs_dir=docs_dir,
                     id_column="interaction_id")
