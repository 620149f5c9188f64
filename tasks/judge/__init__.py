"""The binary rubric judge: the rubric model (`rubric`), per-criterion or combined judging
(`stage`) and verdict scoring and agreement (`scoring`). The tag_conversations DAG judges shards
through `tasks.tag.stage.judge_shard`, which calls `tasks.judge.stage.judge_conversation`.
"""
