"""Synthetic conversation generation: persona × taxonomy × multi-turn, with dedup, resume, preview.

Entry points (plain functions returning small JSON-able dicts; the Airflow DAG
`generate_conversations` maps `generate_shard` over the shards of `plan_batch`):

    plan_batch(cfg) -> {"batch_id", "shards": [{"batch_id", "start", "stop"}, ...]}
    generate_shard(shard, cfg=None) -> {"batch_id", "start", "stop", "generated", "skipped",
                                        "ok", "failed", "duplicate"}
    finalize_batch(batch_id, cfg=None) -> {"batch_id", "status", "requested", "ok", "failed",
                                           "duplicate", "missing", "max_coverage_gap"}
    preview(cfg, n) -> [conversation dicts]   # no writes;  format_preview(items) -> str
    run_generation(cfg, progress=None) -> finalize summary + {"generated", "skipped", "shards"}

CLI: `python -m tasks.generate --count 10 --turns 2 [--preview N] [--seed S]`.
"""

from __future__ import annotations

from tasks.generate.config import GenerationConfig, GenerationError, coerce_config
from tasks.generate.personas import PersonaError
from tasks.generate.prompts import PromptError
from tasks.generate.stage import (
    dedup_range,
    finalize_batch,
    format_preview,
    generate_shard,
    plan_batch,
    preview,
    run_generation,
)
from tasks.generate.taxonomy import TaxonomyError

__all__ = [
    "GenerationConfig",
    "GenerationError",
    "PersonaError",
    "PromptError",
    "TaxonomyError",
    "coerce_config",
    "dedup_range",
    "finalize_batch",
    "format_preview",
    "generate_shard",
    "plan_batch",
    "preview",
    "run_generation",
]
