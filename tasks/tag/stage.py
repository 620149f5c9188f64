"""Tagging and judging stage: the functions the `tag_conversations` DAG maps over shards.

`plan_tagging(cfg)` → id-range shards (`{"shard", "first_id", "last_id", "count"}`, XCom-small);
`tag_shard(shard, cfg)` → `{"tagged", "failed", ...}`; `judge_shard(shard, cfg)` →
`{"judged", "judge_errors", ...}`; `tagging_stats(cfg, out_dir)` → counts, histograms (PNG),
frequency tables and judge agreement; `run_tagging(cfg)` does all of it in one process (CLI, demo,
benchmark). Five taggers (emotion, topic, temporal, belief, hallucination; `tasks.tag.taggers`)
write `tag_results` (one row per conversation, tagger and tagger version) and `tag_failures` (one
row per failed attempt, with the raw output); the rubric judge (`tasks.judge.stage`) writes one
`judgments` row per conversation, criterion and judge slot. A run only does what is missing for
the *current* versions, so a rerun resumes and a changed template re-tags while older versions'
rows stay queryable; a shard re-reads what is still missing when it runs. `TaggingConfig` lives
in `tasks.tag.config`. `TagResult.score` convention: emotion → confidence in [0, 1];
hallucination → hallucination_score in [0, 1]; topic/temporal → confidence; belief → confidence
or null.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from tasks.core.db.models import Conversation, Judgment, TagFailure, TaggerVersion, TagResult
from tasks.core.settings import Endpoint, get_settings
from tasks.judge.rubric import Rubric, store_rubric
from tasks.judge.stage import JudgeTarget, judge_conversation
from tasks.tag.backends import get_tagger
from tasks.tag.config import TaggingConfig, conversation_scope
from tasks.tag.taggers import (
    BACKENDS,
    TAGGERS,
    BaseTagger,
    ConversationInput,
    TaggerOutputInvalid,
    UnknownTagger,
)

if TYPE_CHECKING:
    from tasks.tag.runner import WorkerPool

log = logging.getLogger(__name__)

__all__ = [
    "TaggerOutputInvalid",
    "UnknownTagger",
    "current_tagger_versions",
    "in_judge_sample",
    "judge_shard",
    "latest_tags",
    "plan_tagging",
    "run_tagging",
    "tag_shard",
    "tagging_stats",
]


# ---- queries -------------------------------------------------------------------------------------
def _engine():
    from tasks.core.db.engine import get_engine

    return get_engine()


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _missing_tag_pairs(session: Session, ids: Sequence[str],
                       taggers: Sequence[BaseTagger]) -> dict[str, list[BaseTagger]]:
    """{conversation_id: [taggers without a result for their current version]}."""
    versions = [t.version for t in taggers]
    have: set[tuple[str, str]] = set()
    for chunk in _chunks(list(ids), 5000):
        have.update(session.execute(
            select(TagResult.conversation_id, TagResult.tagger_version).where(
                TagResult.conversation_id.in_(chunk), TagResult.tagger_version.in_(versions))
        ).tuples())
    return {cid: missing for cid in ids
            if (missing := [t for t in taggers if (cid, t.version) not in have])}


def _next_attempts(session: Session, ids: Sequence[str],
                   taggers: Sequence[BaseTagger]) -> dict[tuple[str, str], int]:
    versions = [t.version for t in taggers]
    out: dict[tuple[str, str], int] = {}
    for chunk in _chunks(list(ids), 5000):
        rows = session.execute(
            select(TagFailure.conversation_id, TagFailure.tagger_version,
                   func.max(TagFailure.attempt))
            .where(TagFailure.conversation_id.in_(chunk),
                   TagFailure.tagger_version.in_(versions))
            .group_by(TagFailure.conversation_id, TagFailure.tagger_version)
        ).tuples()
        out.update({(cid, version): int(n) + 1 for cid, version, n in rows})
    return out


def in_judge_sample(conversation_id: str, rate: float) -> bool:
    """Whether a conversation is in the judge's sample at `rate` (stable: a hash of the id)."""
    if rate >= 1.0:
        return True
    digest = hashlib.sha256(f"judge-sample:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _missing_judgments(session: Session, ids: Sequence[str], rubric: Rubric,
                       slots: Sequence[str]) -> dict[tuple[str, str], list[str]]:
    """{(conversation_id, slot): [criteria without a non-ERROR verdict]}."""
    have: set[tuple[str, str, str]] = set()
    for chunk in _chunks(list(ids), 5000):
        have.update(session.execute(
            select(Judgment.conversation_id, Judgment.judge, Judgment.criterion).where(
                Judgment.conversation_id.in_(chunk), Judgment.rubric_version == rubric.version,
                Judgment.verdict != "ERROR", Judgment.judge.in_(list(slots)))
        ).tuples())
    criteria = rubric.criterion_ids()
    out: dict[tuple[str, str], list[str]] = {}
    for cid in ids:
        for slot in slots:
            missing = [c for c in criteria if (cid, slot, c) not in have]
            if missing:
                out[(cid, slot)] = missing
    return out


def _conversations(session: Session, ids: Sequence[str]) -> dict[str, ConversationInput]:
    out: dict[str, ConversationInput] = {}
    for chunk in _chunks(list(ids), 5000):
        for row in session.scalars(select(Conversation).where(Conversation.id.in_(chunk))):
            out[row.id] = ConversationInput.from_row(row)
    return out


def _shard_ids(session: Session, shard: dict[str, Any], cfg: TaggingConfig) -> list[str]:
    if "ids" in shard:
        conditions = [*conversation_scope(cfg), Conversation.id.in_(list(shard["ids"]))]
    else:
        conditions = [*conversation_scope(cfg), Conversation.id >= shard["first_id"],
                      Conversation.id <= shard["last_id"]]
    return list(session.scalars(select(Conversation.id).where(and_(*conditions))
                                .order_by(Conversation.id)))


def _register_versions(session: Session, taggers: Sequence[BaseTagger]) -> None:
    from tasks.core.db.engine import upsert

    upsert(session, TaggerVersion, [t.version_row() for t in taggers], update=[])


# ---- entry points --------------------------------------------------------------------------------
def plan_tagging(cfg: TaggingConfig) -> list[dict[str, Any]]:
    """Id-range shards covering conversations that lack a current tag result or judgment.

    Each shard is `{"shard": i, "first_id", "last_id", "count"}` — a few hundred bytes however
    large the shard, so the list fits XCom and maps over workers.
    """
    from tasks.core.db.engine import session_scope

    taggers = cfg.build_taggers()
    rubric = cfg.rubric() if cfg.judges else None
    with session_scope(_engine()) as session:
        ids = list(session.scalars(select(Conversation.id).where(and_(*conversation_scope(cfg)))
                                   .order_by(Conversation.id)))
        needs_tags = set(_missing_tag_pairs(session, ids, taggers)) if taggers else set()
        needs_judging: set[str] = set()
        if rubric is not None:
            needs_judging = {cid for cid, _ in _missing_judgments(session, ids, rubric,
                                                                  cfg.judges)}
    todo = [cid for cid in ids if cid in needs_tags or cid in needs_judging]
    shards = [{"shard": i, "first_id": chunk[0], "last_id": chunk[-1], "count": len(chunk)}
              for i, chunk in enumerate(_chunks(todo, cfg.shard_size))]
    log.info("plan_tagging: %d conversations in scope, %d need tags, %d need judging → %d shards",
             len(ids), len(needs_tags), len(needs_judging), len(shards))
    return shards


def _llm_client(cfg: TaggingConfig, role: str):
    from tasks.core.llm.client import LLMClient

    cache = None
    if cfg.use_cache:
        from tasks.core.llm.cache import PostgresResponseCache

        cache = PostgresResponseCache(_engine())
    endpoint = cfg.endpoint(role)
    settings = get_settings()
    fallbacks = [Endpoint(base_url=url, model=endpoint.model, api_key=endpoint.api_key,
                          timeout_s=endpoint.timeout_s)
                 for url in settings.llm_fallback_base_urls] if role == "tagger" else []
    return LLMClient([endpoint, *fallbacks], max_concurrency=cfg.max_in_flight,
                     timeout_s=cfg.timeout_s, cache=cache)


def _judge_targets(cfg: TaggingConfig) -> list[JudgeTarget]:
    """One `JudgeTarget` per enabled judge slot; warns when every slot hits the same model."""
    targets: list[JudgeTarget] = []
    for slot in cfg.judges:
        endpoint = cfg.endpoint(slot)
        targets.append(JudgeTarget(slot, _llm_client(cfg, slot), endpoint.label()))
    labels = {t.label for t in targets}
    if len(targets) > 1 and len(labels) == 1:
        log.warning("both judge slots use %s; agreement will be trivially high — point "
                    "judge2 at another endpoint/model (TUNELOOP_JUDGE2_BASE_URL/MODEL)",
                    next(iter(labels)))
    return targets


def _embedding_rows(taggers: Sequence[BaseTagger], conversations: dict[str, ConversationInput],
                    missing: dict[str, list[BaseTagger]]) -> list[dict[str, Any]]:
    """Embedding taggers' result rows (one embed call for the shard)."""
    from tasks.tag.embedding import EmbeddingTagger, embed_conversations
    from tasks.tag.runner import result_row

    rows: list[dict[str, Any]] = []
    embedding = [t for t in taggers if isinstance(t, EmbeddingTagger)]
    need = [cid for cid in missing if any(isinstance(t, EmbeddingTagger)
                                          for t in missing[cid])]
    if embedding and need:
        embedded = dict(zip(need, embed_conversations([conversations[c] for c in need]),
                            strict=True))
        for cid in need:
            for tagger in missing[cid]:
                if isinstance(tagger, EmbeddingTagger):
                    rows.append(result_row(cid, tagger, tagger.tag_embedded(embedded[cid]),
                                           attempts=1))
    return rows


def _local_backends(taggers: Sequence[BaseTagger], conversations: dict[str, ConversationInput],
                    missing: dict[str, list[BaseTagger]]) -> list[dict[str, Any]]:
    """Embedding and heuristic taggers: CPU work, run on a thread (one embed call/shard)."""
    from tasks.tag.heuristic import HeuristicTagger
    from tasks.tag.runner import result_row

    rows = _embedding_rows(taggers, conversations, missing)
    for cid, pending in missing.items():
        for tagger in pending:
            if isinstance(tagger, HeuristicTagger):
                rows.append(result_row(cid, tagger, tagger.tag(conversations[cid]),
                                       attempts=1))
    return rows


class _Run:
    """One tag/judge run: its taggers, judge targets, writer, counters and progress."""

    def __init__(self, cfg: TaggingConfig, *, do_tags: bool, do_judge: bool,
                 progress: Callable[[int, int], None] | None) -> None:
        # Imported up front (not on first use) so a missing dependency fails before any write.
        import tasks.tag.embedding  # noqa: F401
        import tasks.tag.heuristic  # noqa: F401
        from tasks.tag.runner import BatchWriter, RunCounts

        self.cfg = cfg
        self.progress = progress
        self.started = time.perf_counter()
        self.engine = _engine()
        self.taggers = cfg.build_taggers() if do_tags else []
        self.llm_taggers = [t for t in self.taggers if t.backend == "llm"]
        self.rubric = cfg.rubric() if do_judge and cfg.judges else None
        self.counts = RunCounts()
        self.writer = BatchWriter(self.engine)
        self.tag_client = _llm_client(cfg, "tagger") if self.llm_taggers else None
        self.targets = _judge_targets(cfg) if self.rubric is not None else []
        self.total_jobs = 0
        self.done_jobs = 0
        self.judge_usage: dict[str, int] = {}

    def register(self) -> None:
        """Register the tagger versions and store the rubric before any result is written."""
        from tasks.core.db.engine import session_scope

        with session_scope(self.engine) as session:
            if self.taggers:
                _register_versions(session, self.taggers)
            if self.rubric is not None:
                store_rubric(session, self.rubric)

    def tick(self) -> None:
        self.done_jobs += 1
        if self.progress is not None:
            self.progress(self.done_jobs, self.total_jobs)

    def load(self, shard: dict[str, Any]) -> tuple[dict[str, ConversationInput],
                                                   dict[str, list[BaseTagger]],
                                                   dict[tuple[str, str], int],
                                                   dict[tuple[str, str], list[str]]]:
        from tasks.core.db.engine import session_scope

        cfg, taggers, llm_taggers, rubric = self.cfg, self.taggers, self.llm_taggers, self.rubric
        with session_scope(self.engine) as session:
            ids = _shard_ids(session, shard, cfg)
            missing = _missing_tag_pairs(session, ids, taggers) if taggers else {}
            attempts = _next_attempts(session, list(missing), llm_taggers) if llm_taggers else {}
            judging = (_missing_judgments(
                session, [i for i in ids if in_judge_sample(i, cfg.judge_sample_rate)], rubric,
                cfg.judges) if rubric is not None else {})
            wanted = set(missing) | {cid for cid, _ in judging}
            conversations = _conversations(session, [i for i in ids if i in wanted])
        return conversations, missing, attempts, judging

    async def judge_job(self, target: JudgeTarget, conversation: ConversationInput,
                        criteria: list[str]) -> None:
        cfg, counts = self.cfg, self.counts
        rows, used = await judge_conversation(
            target, self.rubric, conversation.id, conversation.messages, criteria,
            mode=cfg.judge_mode, retries=cfg.judge_retries, max_tokens=cfg.max_tokens,
            system_prompt=conversation.system_prompt)
        for row in rows:
            self.writer.add("judgments", row)
            if row["verdict"] == "ERROR":
                counts.judge_errors[target.slot] += 1
            else:
                counts.judged[target.slot] += 1
        counts.judge_failed_attempts[target.slot] += used["failed_attempts"]
        for key in ("prompt_tokens", "completion_tokens"):
            self.judge_usage[key] = self.judge_usage.get(key, 0) + used[key]
        self.tick()

    async def tag_job(self, tagger: BaseTagger, conversation: ConversationInput,
                      first: int) -> None:
        from tasks.tag.runner import tag_with_llm

        await tag_with_llm(self.tag_client, tagger, conversation, self.writer, self.counts,
                           retries=self.cfg.retries, first_attempt=first,
                           max_tokens=self.cfg.max_tokens)
        self.tick()

    async def run_shard(self, pool: WorkerPool, shard: dict[str, Any]) -> None:
        """Load one shard, write its local-backend rows and queue its LLM and judge jobs."""
        conversations, missing, attempts, judging = await asyncio.to_thread(self.load, shard)
        self.total_jobs += (sum(1 for pending in missing.values() for t in pending
                                if t.backend == "llm") + len(judging))
        local_rows = await asyncio.to_thread(_local_backends, self.taggers, conversations,
                                             missing)
        for row in local_rows:
            self.writer.add("tag_results", row)
            self.counts.tagged[row["tagger"]] += 1
        for cid, pending in missing.items():
            for tagger in pending:
                if tagger.backend == "llm":
                    first = attempts.get((cid, tagger.version), 1)
                    await pool.submit(lambda t=tagger, c=conversations[cid], f=first:
                                      self.tag_job(t, c, f))
        by_slot = {t.slot: t for t in self.targets}
        for (cid, slot), criteria in judging.items():
            await pool.submit(lambda t=by_slot[slot], c=conversations[cid], k=criteria:
                              self.judge_job(t, c, k))

    async def execute(self, shards: Sequence[dict[str, Any]]) -> None:
        """All shards through one worker pool; closes the writer and the LLM caches."""
        from tasks.tag.runner import WorkerPool

        await self.writer.start()
        try:
            async with WorkerPool(self.cfg.max_in_flight) as pool:
                for shard in shards:
                    await self.run_shard(pool, shard)
        finally:
            await self.writer.close()
            for client in [self.tag_client, *(t.client for t in self.targets)]:
                if client is not None and client.cache is not None:
                    client.cache.close()

    def summary(self) -> dict[str, Any]:
        out = self.counts.as_dict()
        out["judge_usage"] = self.judge_usage
        out["jobs"] = self.total_jobs
        out["rows_written"] = dict(self.writer.rows_written)
        out["seconds"] = round(time.perf_counter() - self.started, 3)
        out["tagger_versions"] = {t.name: t.version for t in self.taggers}
        if self.rubric is not None:
            out["rubric_version"] = self.rubric.version
        if self.tag_client is not None:
            out["llm_usage"] = self.tag_client.usage_summary().get("total", {})
        return out


async def _run(
    cfg: TaggingConfig,
    shards: Sequence[dict[str, Any]],
    *,
    do_tags: bool,
    do_judge: bool,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Tag and/or judge the given shards with one worker pool (no tail between shards)."""
    run = _Run(cfg, do_tags=do_tags, do_judge=do_judge, progress=progress)
    run.register()
    await run.execute(shards)
    return run.summary()


def tag_shard(shard: dict[str, Any], cfg: TaggingConfig) -> dict[str, Any]:
    """Run every configured tagger on the shard's conversations that still lack a result."""
    from tasks.core.llm.client import run_sync

    counts = run_sync(_run(cfg, [shard], do_tags=True, do_judge=False))
    log.info("tag_shard %s: tagged %s, failed %s, failed attempts %s", shard.get("shard"),
             counts["tagged"], counts["failed"], counts["failed_attempts"])
    return {"shard": shard.get("shard"), **counts}


def judge_shard(shard: dict[str, Any], cfg: TaggingConfig) -> dict[str, Any]:
    """Judge the shard's conversations with every enabled judge slot (missing criteria only)."""
    from tasks.core.llm.client import run_sync

    if not cfg.judges:
        return {"shard": shard.get("shard"), "judged": {}, "skipped": "no judges enabled"}
    counts = run_sync(_run(cfg, [shard], do_tags=False, do_judge=True))
    log.info("judge_shard %s: judged %s, errors %s", shard.get("shard"), counts["judged"],
             counts["judge_errors"])
    return {"shard": shard.get("shard"), **counts}


def run_tagging(cfg: TaggingConfig, progress: Callable[[int, int], None] | None = None,
                out_dir: Path | None = None) -> dict[str, Any]:
    """Plan, tag and judge everything missing in one process, then write statistics.

    `progress(done, total)` is called after every LLM job (the total grows as shards load).
    """
    from tasks.core.llm.client import run_sync

    shards = plan_tagging(cfg)
    counts = run_sync(_run(cfg, shards, do_tags=True, do_judge=bool(cfg.judges),
                           progress=progress))
    out_dir = out_dir or get_settings().data_dir / "tagging" / _scope_name(cfg)
    stats = tagging_stats(cfg, out_dir)
    return {"shards": len(shards), "run": counts, "stats": stats}


def _scope_name(cfg: TaggingConfig) -> str:
    from tasks.core.ids import stable_id

    return "all" if not cfg.batch_ids else stable_id(*sorted(cfg.batch_ids), length=16)


# ---- reading results -----------------------------------------------------------------------------
def current_tagger_versions(cfg: TaggingConfig | None = None) -> dict[str, str]:
    """{tagger: version} that a run with `cfg` (default config) writes."""
    return {t.name: t.version for t in (cfg or TaggingConfig()).build_taggers()}


def _current_definitions() -> dict[str, set[str]]:
    """Definition hashes (template + schema / labels, any model) of the code as it is now."""
    out: dict[str, set[str]] = {}
    for name, cls in TAGGERS.items():
        out[name] = {get_tagger(name, backend).definition_hash
                     for backend in cls.backends if backend in BACKENDS}
    return out


def latest_tags(
    session: Session,
    conversation_ids: list[str],
    versions: dict[str, str] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{conversation_id: {tagger: output}} from the current tagger versions.

    With `versions` ({tagger: version}) exactly those versions are read. Otherwise, per
    conversation and tagger, the newest result whose version's template/schema (or label set)
    matches the current files is used, whichever backend or model wrote it; versions registered
    with an outdated definition are ignored; results whose version was never registered in
    `tagger_versions` (written by other tools) are used only when no current one exists.
    Conversations without any usable result are absent.
    """
    ids = list(dict.fromkeys(conversation_ids))
    if not ids:
        return {}
    definitions: dict[str, str] = {}
    rows: list[tuple[str, str, str, dict[str, Any], Any]] = []
    for chunk in _chunks(ids, 5000):
        stmt = select(TagResult.conversation_id, TagResult.tagger, TagResult.tagger_version,
                      TagResult.output, TagResult.created_at).where(
            TagResult.conversation_id.in_(chunk))
        if versions:
            stmt = stmt.where(TagResult.tagger_version.in_(list(versions.values())))
        rows.extend(session.execute(stmt).tuples())
    seen_versions = sorted({r[2] for r in rows})
    for chunk in _chunks(seen_versions, 5000):
        definitions.update(session.execute(
            select(TaggerVersion.version, TaggerVersion.definition_hash)
            .where(TaggerVersion.version.in_(chunk))).tuples().all())
    current = _current_definitions() if versions is None else {}
    best: dict[tuple[str, str], tuple[tuple[int, Any], dict[str, Any]]] = {}
    for cid, tagger, version, output, created in rows:
        if versions is not None:
            if versions.get(tagger) != version:
                continue
            rank = 2
        elif version in definitions:
            if definitions[version] not in current.get(tagger, set()):
                continue  # a registered, outdated version
            rank = 2
        else:
            rank = 1
        key = (rank, created)
        if (cid, tagger) not in best or key > best[(cid, tagger)][0]:
            best[(cid, tagger)] = (key, output)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (cid, tagger), (_, output) in best.items():
        out.setdefault(cid, {})[tagger] = output
    return out


def tagging_stats(cfg: TaggingConfig, out_dir: Path) -> dict[str, Any]:
    """Per-batch statistics (see `tasks.tag.stats`), written as JSON + PNG under out_dir."""
    from tasks.tag.stats import compute_stats

    return compute_stats(cfg, Path(out_dir))
