"""Async LLM access for every stage: `LLMClient` (retries, fallback chain, Postgres response cache,
token accounting), structured output parsing, and `client_for_role` to build one from settings.

    from tasks.core.llm import client_for_role, run_sync
    client = client_for_role("tagger")
    results = run_sync(client.chat_many([[{"role": "user", "content": "hi"}]]))
"""

from __future__ import annotations

from tasks.core.llm.cache import (
    InMemoryResponseCache,
    PostgresResponseCache,
    ResponseCache,
    cache_key,
)
from tasks.core.llm.client import (
    ChatResult,
    LLMClient,
    LLMConfigError,
    StructuredResult,
    client_for_role,
    corrective_prompt,
    run_sync,
)
from tasks.core.llm.structured import StructuredOutputError, extract_json, parse_structured
from tasks.core.llm.usage import UsageTracker

__all__ = [
    "ChatResult",
    "InMemoryResponseCache",
    "LLMClient",
    "LLMConfigError",
    "PostgresResponseCache",
    "ResponseCache",
    "StructuredOutputError",
    "StructuredResult",
    "UsageTracker",
    "cache_key",
    "client_for_role",
    "corrective_prompt",
    "extract_json",
    "parse_structured",
    "run_sync",
]
