"""Kill a generation subprocess with SIGKILL mid-run, rerun it: no conversation lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tasks.core.db.engine import session_scope
from tasks.core.db.models import Conversation
from tasks.core.settings import load_settings
from tasks.generate import GenerationConfig
from tasks.generate.conversation import BatchPlan
from tests.fakes.fake_openai import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[2]
COUNT = 30
KILL_AFTER = 8


def _stored(engine) -> dict[str, str]:
    with session_scope(engine) as session:
        return dict(session.execute(select(Conversation.id, Conversation.content_hash)).tuples().all())


def _count(engine) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(Conversation))


@pytest.mark.e2e
def test_sigkill_mid_run_then_rerun_gives_exact_counts(fresh_engine):
    env = {**os.environ, "DATABASE_URL": fresh_engine.url.render_as_string(hide_password=False),
           "PYTHONPATH": str(ROOT)}
    with FakeOpenAIServer(responder="tests.fakes.generation_replies:reply",
                          latency_s=0.25) as server:
        command = [sys.executable, "-m", "tasks.generate", "--count", str(COUNT), "--turns", "2",
                   "--seed", "5", "--concurrency", "4", "--shard-size", "10",
                   "--base-url", server.base_url, "--model", "fake-model", "--no-dedup",
                   "--no-progress"]
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while _count(fresh_engine) < KILL_AFTER:
            if first.poll() is not None:
                pytest.fail(f"generation ended before it could be killed: {first.stderr.read()}")
            assert time.monotonic() < deadline, "no progress within 180 s"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        first.stdout.close()
        first.stderr.close()
        assert first.returncode == -signal.SIGKILL
        before = _stored(fresh_engine)
        requests_before = server.stats()["total"]
        assert KILL_AFTER <= len(before) < COUNT

        rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        requests_rerun = server.stats()["total"] - requests_before
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])

    after = _stored(fresh_engine)
    cfg = GenerationConfig(count=COUNT, turns=2, seed=5, generator_model="fake-model",
                           user_sim_model="fake-model", dedup=False)
    plan = BatchPlan(cfg, settings=load_settings())
    assert set(after) == {plan.item(i).id for i in range(COUNT)}  # every id, each exactly once
    assert {k: after[k] for k in before} == before  # completed conversations were not redone
    assert summary["skipped"] == len(before) and summary["generated"] == COUNT - len(before)
    assert (summary["status"], summary["ok"], summary["missing"]) == ("done", COUNT, 0)
    # only the missing items went back to the model (4 calls each at most; cached calls fewer)
    assert requests_rerun <= 4 * (COUNT - len(before))
    with session_scope(fresh_engine) as session:
        indexes = sorted(session.scalars(select(Conversation.item_index)))
    assert indexes == list(range(COUNT))
