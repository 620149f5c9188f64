"""Deterministic ids and content hashes: the same inputs always give the same id."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(value: Any) -> str:
    """sha256 hex of a value (str/bytes hashed as-is, anything else as canonical JSON)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = canonical_json(value).encode()
    return hashlib.sha256(data).hexdigest()


def stable_id(*parts: Any, length: int = 32) -> str:
    """A short deterministic id from parts, e.g. stable_id(batch_id, cell_key, index)."""
    return content_hash([str(p) for p in parts])[:length]


def hash_user(user_id: str, salt: str) -> str:
    """HMAC-SHA256 of a user id (hex, 64 chars): what the router stores as `user_hash` and routes
    on, and what `tuneloop forget --user` looks a user up by (the same salt)."""
    return hmac.new(salt.encode(), user_id.encode("utf-8", "surrogatepass"),
                    hashlib.sha256).hexdigest()
