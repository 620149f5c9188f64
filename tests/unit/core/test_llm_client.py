"""LLMClient against the fake OpenAI server: faults, Retry-After, fallback, cache, structured output."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict

import pytest
from pydantic import BaseModel

from tasks.core.llm import (
    InMemoryResponseCache,
    LLMClient,
    LLMConfigError,
    PostgresResponseCache,
    client_for_role,
    run_sync,
)
from tasks.core.settings import Endpoint, Settings
from tests.fakes.fake_openai import FakeOpenAIServer

MODEL = "fake-model"


def _endpoint(server: FakeOpenAIServer, model: str = MODEL) -> Endpoint:
    return Endpoint(base_url=server.base_url, model=model)


def _fast_client(*endpoints: Endpoint, **kwargs) -> LLMClient:
    options = {"max_concurrency": 32, "max_retries": 5, "backoff_base_s": 0.005,
               "backoff_max_s": 0.02, "timeout_s": 2.0}
    options.update(kwargs)
    return LLMClient(list(endpoints), **options)


def _prompts(n: int, tag: str = "q") -> list[list[dict]]:
    return [[{"role": "user", "content": f"{tag} number {i} please"}] for i in range(n)]


class Verdict(BaseModel):
    verdict: str
    score: float


def test_under_20_percent_faults_every_request_ends_once_and_none_is_answered_twice() -> None:
    with FakeOpenAIServer(fault_rate=0.2, hang_s=3.0, retry_after_s=0.01, seed=7) as server:
        client = _fast_client(_endpoint(server), timeout_s=1.0)
        results = run_sync(client.chat_many(_prompts(150), max_tokens=200))
        log = list(server.log)
        stats = server.stats()

    assert len(results) == 150
    assert all(r.ok or r.error for r in results)
    assert all(stats[kind] > 0 for kind in ("429", "500", "hang", "malformed", "truncated"))

    by_request = defaultdict(list)
    for entry in log:
        by_request[entry["request_id"]].append(entry["outcome"])
    assert set(by_request) == {r.request_id for r in results}  # no stray or lost requests
    for result in results:
        outcomes = by_request[result.request_id]
        assert len(result.attempt_errors) == result.attempts - 1
        # an attempt that timed out before the server read it never reaches the log
        assert 1 <= len(outcomes) <= result.attempts
        # An answer the client received is never asked for again. The server may only have
        # answered an extra time where the client had already given up on that attempt
        # (a timeout on a loaded machine) -- never because the client retried a success.
        client_timeouts = sum("timeout" in e for e in result.attempt_errors)
        assert outcomes[:-1].count("ok") <= client_timeouts
        if result.ok:
            assert outcomes[-1] == "ok"
            assert result.text and result.text.startswith("Fake reply")
        else:  # only a truncated reply ends as a failure here: retries absorb the rest
            assert outcomes[-1] == "truncated" and "truncated" in result.error
    assert stats["total"] == len(log) <= sum(r.attempts for r in results)
    timeouts = sum("timeout" in e for r in results for e in r.attempt_errors)
    assert sum(r.ok for r in results) <= stats["ok"] <= sum(r.ok for r in results) + timeouts


def test_retry_after_is_waited_before_the_next_attempt() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("429",), retry_after_s=0.25) as server:
        client = _fast_client(_endpoint(server), max_retries=2)
        result = run_sync(client.chat(_prompts(1)[0]))
        times = [entry["received_at"] for entry in server.log]

    assert not result.ok and result.attempts == 3
    assert "HTTP 429" in result.error
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) == 2
    # backoff alone would wait <= 0.02 s; Retry-After says 0.25 s
    assert all(gap >= 0.25 for gap in gaps), gaps


def test_fallback_endpoint_answers_when_primary_always_fails() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("500",)) as broken, \
            FakeOpenAIServer(model_ids=("backup-model",)) as backup:
        client = _fast_client(_endpoint(broken), _endpoint(backup, "backup-model"),
                              max_retries=2)
        results = run_sync(client.chat_many(_prompts(5)))
        broken_total, backup_total = broken.stats()["total"], backup.stats()["total"]
        backup_label = f"{backup.base_url}#backup-model"

    assert all(r.ok for r in results)
    assert {r.endpoint for r in results} == {backup_label}
    assert all(r.model == "backup-model" and r.attempts == 4 for r in results)
    assert broken_total == 5 * 3 and backup_total == 5
    summary = client.usage_summary()["endpoints"]
    assert summary[backup_label]["succeeded"] == 5


def test_non_retryable_error_moves_to_fallback_without_retrying() -> None:
    with FakeOpenAIServer() as primary, FakeOpenAIServer() as backup:
        client = _fast_client(_endpoint(primary, "no-such-model"), _endpoint(backup))
        result = run_sync(client.chat(_prompts(1)[0]))
        backup_total = backup.stats()["total"]

    assert result.ok and result.attempts == 2  # one 404, no retries, then the fallback
    assert result.endpoint == client.labels[1]
    assert backup_total == 1


def test_all_endpoints_failing_is_a_recorded_failure_naming_each() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("500",)) as first, \
            FakeOpenAIServer(fault_rate=1.0, faults=("malformed",)) as second:
        client = _fast_client(_endpoint(first), _endpoint(second), max_retries=1)
        result = run_sync(client.chat(_prompts(1)[0]))

    assert not result.ok and result.text is None and result.attempts == 4
    assert f"{client.labels[0]}: HTTP 500" in result.error
    assert f"{client.labels[1]}: malformed response" in result.error
    assert client.usage_summary()["total"]["failed"] == 1


def test_truncated_reply_fails_unless_allowed() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("truncated",)) as server:
        client = _fast_client(_endpoint(server))
        refused = run_sync(client.chat(_prompts(1)[0]))
        allowed = run_sync(client.chat(_prompts(1)[0], allow_truncated=True))

    assert not refused.ok and refused.finish_reason == "length"
    assert "raise max_tokens or pass allow_truncated=True" in refused.error
    assert refused.text  # the cut-off text is kept for the record
    assert allowed.ok and allowed.finish_reason == "length" and allowed.error is None


def test_params_and_request_id_reach_the_server() -> None:
    with FakeOpenAIServer() as server:
        client = _fast_client(_endpoint(server))
        result = run_sync(client.chat(_prompts(1)[0], temperature=0.2, max_tokens=64, seed=11,
                                      stop=["\n\n"], top_p=0.9, request_id="req-abc",
                                      response_format={"type": "json_object"}))
        body, entry = server.requests[0], server.log[0]

    assert result.ok and result.request_id == "req-abc"
    assert entry["request_id"] == "req-abc" and entry["attempt"] == "1"
    assert body["model"] == MODEL and body["messages"] == _prompts(1)[0]
    assert {k: body[k] for k in ("temperature", "max_tokens", "seed", "stop", "top_p")} == {
        "temperature": 0.2, "max_tokens": 64, "seed": 11, "stop": ["\n\n"], "top_p": 0.9}
    assert body["response_format"] == {"type": "json_object"}
    assert "stream" not in body


def test_concurrency_is_bounded_by_max_concurrency() -> None:
    with FakeOpenAIServer(latency_s=0.05) as server:
        client = _fast_client(_endpoint(server), max_concurrency=4)
        results = run_sync(client.chat_many(_prompts(24)))
        peak = server.stats()["max_in_flight"]

    assert all(r.ok for r in results)
    assert 2 <= peak <= 4


def test_usage_is_accounted_per_endpoint() -> None:
    with FakeOpenAIServer() as server:
        client = _fast_client(_endpoint(server))
        results = run_sync(client.chat_many(_prompts(6)))

    summary = client.usage_summary()
    entry = summary["endpoints"][client.labels[0]]
    assert entry["requests"] == entry["succeeded"] == 6 and entry["model"] == MODEL
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert entry[key] == sum(r.usage[key] for r in results) > 0
    assert entry["prompt_tokens"] == 6 * 4  # "q number <i> please" is 4 words
    assert summary["total"]["total_tokens"] == entry["total_tokens"]


def test_postgres_cache_answers_a_rerun_without_server_requests(engine) -> None:
    cache = PostgresResponseCache(engine)
    rows_before = cache.count()
    prompts = _prompts(20, "cached")
    with FakeOpenAIServer() as server:
        first = run_sync(_fast_client(_endpoint(server), cache=cache).chat_many(prompts))
        after_first = server.stats()["total"]
        rerun_client = _fast_client(_endpoint(server), cache=cache)
        rerun = run_sync(rerun_client.chat_many(prompts))
        after_rerun = server.stats()["total"]

    assert all(r.ok and not r.cached for r in first)
    assert after_first == 20 and after_rerun == 20  # the rerun paid nothing
    assert all(r.cached and r.attempts == 0 for r in rerun)
    assert [r.text for r in rerun] == [r.text for r in first]
    assert [r.usage for r in rerun] == [r.usage for r in first]
    assert cache.count() - rows_before == 20
    total = rerun_client.usage_summary()["total"]
    assert total["cached"] == 20 and total["total_tokens"] == 0  # cached hits cost nothing


def test_cache_key_covers_params(engine) -> None:
    cache = PostgresResponseCache(engine)
    with FakeOpenAIServer() as server:
        client = _fast_client(_endpoint(server), cache=cache)
        run_sync(client.chat(_prompts(1, "params")[0], temperature=0.0))
        same = run_sync(client.chat(_prompts(1, "params")[0], temperature=0.0))
        other = run_sync(client.chat(_prompts(1, "params")[0], temperature=1.0))
        total = server.stats()["total"]

    assert same.cached and not other.cached and total == 2


def test_failed_and_truncated_replies_are_not_cached(engine) -> None:
    cache = PostgresResponseCache(engine)
    rows_before = cache.count()
    with FakeOpenAIServer(fault_rate=1.0, faults=("truncated",)) as server:
        client = _fast_client(_endpoint(server), cache=cache)
        first = run_sync(client.chat(_prompts(1)[0]))
        second = run_sync(client.chat(_prompts(1)[0]))
        total = server.stats()["total"]

    assert not first.ok and not second.ok and not second.cached
    assert total == 2 and cache.count() == rows_before


def test_fallback_answer_is_found_in_cache_on_rerun() -> None:
    cache = InMemoryResponseCache()
    with FakeOpenAIServer(fault_rate=1.0, faults=("500",)) as broken, \
            FakeOpenAIServer() as backup:
        client = _fast_client(_endpoint(broken), _endpoint(backup), max_retries=0, cache=cache)
        first = run_sync(client.chat(_prompts(1)[0]))
        rerun = run_sync(client.chat(_prompts(1)[0]))
        broken_total = broken.stats()["total"]

    assert first.ok and rerun.ok and rerun.cached
    assert rerun.endpoint == client.labels[1]
    assert broken_total == 1  # the rerun did not knock on the broken primary again


def _json_after_correction(request: dict) -> str:
    last = request["messages"][-1]["content"]
    if "could not be used" in last:
        return '{"verdict": "YES", "score": 0.8}'
    return 'Sure, here it is: ```json\n{"verdict": "YES", "score": "very high"}\n```'


def test_structured_sends_one_corrective_follow_up_quoting_the_error() -> None:
    with FakeOpenAIServer(responder=_json_after_correction) as server:
        client = _fast_client(_endpoint(server))
        result = run_sync(client.structured(_prompts(1)[0], Verdict))
        bodies = list(server.requests)

    assert result.ok and result.value == Verdict(verdict="YES", score=0.8)
    assert result.chat_calls == 2 and result.attempts == 2 and len(bodies) == 2
    follow_up = bodies[1]["messages"]
    assert follow_up[:-2] == bodies[0]["messages"]
    assert follow_up[-2]["role"] == "assistant" and "very high" in follow_up[-2]["content"]
    assert follow_up[-1]["role"] == "user"
    assert "field 'score'" in follow_up[-1]["content"]
    assert json.dumps(Verdict.model_json_schema(), separators=(",", ":")) in \
        follow_up[-1]["content"]
    assert bodies[0]["temperature"] == 0.0
    assert result.usage["total_tokens"] > 0


def test_structured_failure_is_recorded_with_raw_text_not_raised() -> None:
    with FakeOpenAIServer(responder=lambda request: "I would rather not answer in JSON.") as srv:
        client = _fast_client(_endpoint(srv))
        result = run_sync(client.structured(_prompts(1)[0], Verdict, corrective_retries=1))
        total = srv.stats()["total"]

    assert not result.ok and result.value is None
    assert result.raw == "I would rather not answer in JSON."
    assert "no JSON object" in result.error
    assert result.chat_calls == 2 and total == 2
    assert result.to_dict()["value"] is None


def test_structured_transport_failure_is_recorded() -> None:
    with FakeOpenAIServer(fault_rate=1.0, faults=("500",)) as server:
        client = _fast_client(_endpoint(server), max_retries=1)
        result = run_sync(client.structured(_prompts(1)[0], Verdict))

    assert not result.ok and "HTTP 500" in result.error and result.chat_calls == 1


def test_run_sync_works_inside_a_running_event_loop() -> None:
    with FakeOpenAIServer() as server:
        client = _fast_client(_endpoint(server))

        async def caller_with_a_loop() -> str | None:
            return run_sync(client.chat(_prompts(1)[0])).text

        text = asyncio.run(caller_with_a_loop())
        # the same client keeps working on yet another loop afterwards
        again = run_sync(client.chat(_prompts(1, "again")[0]))

    assert text and text.startswith("Fake reply") and again.ok


def test_client_for_role_builds_primary_then_fallbacks(database_url) -> None:
    settings = Settings(tagger_base_url="http://primary.test/v1", tagger_model="tag-model",
                        llm_fallback_base_urls=["http://backup-a.test/v1",
                                                "http://backup-b.test/v1"],
                        llm_max_concurrency=7, DATABASE_URL=database_url)
    client = client_for_role("tagger", settings)
    uncached = client_for_role("tagger", settings, use_cache=False)

    assert client.labels == ["http://primary.test/v1#tag-model",
                             "http://backup-a.test/v1#tag-model",
                             "http://backup-b.test/v1#tag-model"]
    assert client.max_concurrency == 7
    assert isinstance(client.cache, PostgresResponseCache) and uncached.cache is None


def test_bad_client_options_say_the_fix() -> None:
    with pytest.raises(LLMConfigError, match="at least one endpoint"):
        LLMClient([])
    endpoint = Endpoint(base_url="http://127.0.0.1:1/v1", model=MODEL)
    with pytest.raises(LLMConfigError, match="max_concurrency must be >= 1"):
        LLMClient([endpoint], max_concurrency=0)
    with pytest.raises(LLMConfigError, match="backoff_base_s <= backoff_max_s"):
        LLMClient([endpoint], backoff_base_s=5, backoff_max_s=1)


def test_unreachable_endpoint_is_a_connection_failure_not_an_exception() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    client = _fast_client(Endpoint(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL),
                          max_retries=1)
    result = run_sync(client.chat(_prompts(1)[0]))
    assert not result.ok and result.attempts == 2 and "connection error" in result.error


def test_fault_mix_is_reproducible_for_a_seed() -> None:
    outcomes = []
    for _ in range(2):
        with FakeOpenAIServer(fault_rate=0.5, faults=("429", "500"), seed=3,
                              retry_after_s=0.0) as server:
            client = _fast_client(_endpoint(server), max_concurrency=1, max_retries=0)
            run_sync(client.chat_many(_prompts(12)))
            outcomes.append(Counter(e["outcome"] for e in server.log))
    assert outcomes[0] == outcomes[1] and outcomes[0]["ok"] < 12


def test_unreachable_cache_database_degrades_to_misses(caplog) -> None:
    from sqlalchemy import create_engine

    broken = create_engine("postgresql://postgres@127.0.0.1:1/nowhere",
                           connect_args={"connect_timeout": 2})
    with FakeOpenAIServer() as server:
        client = _fast_client(_endpoint(server), cache=PostgresResponseCache(broken))
        with caplog.at_level("WARNING", logger="tasks.core.llm.cache"):
            results = run_sync(client.chat_many(_prompts(3)))
        total = server.stats()["total"]

    assert all(r.ok and not r.cached for r in results) and total == 3
    warnings = [r for r in caplog.records
                if r.name == "tasks.core.llm.cache" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "treating as a miss" in warnings[0].getMessage()
