"""The router's routing state in an interaction's context is not exported: its `bucket` is a
function of the user hash (it would link one user's examples, and its digits read as a phone
number to the PII gate), so two users' identical prompts are the same context for DPO pairs."""

from __future__ import annotations

from tasks.signals.stage import build_reaction_dataset
from tests.unit.signals.served import CFG, exported_rows, interaction, store, user, user_says


def test_the_routing_bucket_is_dropped_and_identical_prompts_pair(fresh_engine, data_dir):
    rows = []
    for name, bucket in (("ann", 0.802265), ("ben", 0.472245)):
        row = interaction(f"ctx-{name}", user(name), [user_says("a tip for focus")],
                          f"answer for {name}", minute=0)
        row["context"] = {"mode": "off", "share": 0.0, "bucket": bucket, "params": {}}
        rows.append(row)
    store(fresh_engine, rows, {"ctx-ann": ("done", 30_000), "ctx-ben": ("dismiss", 800)})

    result = build_reaction_dataset(CFG, engine=fresh_engine)

    assert result["gate_passed"], result["failed_expectations"]
    assert result["counts"]["dpo_pairs_same_context"] == 1
    provenance = [row for row in exported_rows(result) if "metadata" in row]
    assert provenance and all("bucket" not in str(row["metadata"]) for row in provenance)
