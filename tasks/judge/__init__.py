"""The binary rubric judge: rubric loading, per-criterion or combined judging, verdict scoring and
agreement. `tasks.judge.stage.judge_shard` is what the tag_conversations DAG calls.
"""
