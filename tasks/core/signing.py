"""Signed registrations: the HMAC that tells a registry version tuneloop registered from one it
did not.

MLflow has no auth here, so anyone who can reach it can register a version, point an alias at
it or edit its tags. `tasks.register.registry` signs each version it creates, over the version's
real source and run id and its registration tags (dataset snapshot id and hash, gate result,
is_base), with `settings.registry_signing_key`, and stores the hex digest in the
`tuneloop.signature` tag; the router serves a version only when `verify_version` finds that tag
valid (and, for an adapter, the gate passed). Pure: hashlib, hmac and json only, so the router
and the registry share it without importing MLflow.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

SIGNATURE_TAG = "tuneloop.signature"
# The version tags the signature covers (as `tasks.register.registry` writes them).
TAG_DATASET_ID = "dataset_id"
TAG_DATASET_HASH = "dataset_hash"
TAG_GATE_PASSED = "gate_passed"
TAG_IS_BASE = "is_base"
TAG_RUN_ID = "tuneloop.run_id"
# Bumped if the signed payload ever changes shape, so old and new signatures never collide.
SIGNATURE_SCHEME = 1
# Placeholder values a registration writes when it does not know the lineage.
_UNKNOWN = frozenset({"", "unknown", "none"})


def _key_bytes(key: Any) -> bytes:
    """The key as bytes: a str, bytes, or anything with `get_secret_value()` (SecretStr)."""
    if hasattr(key, "get_secret_value"):
        key = key.get_secret_value()
    if isinstance(key, str):
        key = key.encode()
    if not key:
        raise ValueError("the registry signing key is empty; set TUNELOOP_REGISTRY_SIGNING_KEY "
                         "to a long random string")
    return bytes(key)


def signed_payload(*, name: str, version_source: str, run_id: str | None, dataset_id: str,
                   dataset_hash: str, gate_passed: str, is_base: bool = False) -> bytes:
    """The canonical JSON the signature is computed over (sorted keys, no spaces)."""
    return json.dumps({
        "scheme": SIGNATURE_SCHEME, "name": str(name), "source": str(version_source),
        "run_id": str(run_id or ""), "dataset_id": str(dataset_id),
        "dataset_hash": str(dataset_hash), "gate_passed": str(gate_passed),
        "is_base": bool(is_base),
    }, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_version(key: Any, *, name: str, version_source: str, run_id: str | None,
                 dataset_id: str, dataset_hash: str, gate_passed: str,
                 is_base: bool = False) -> str:
    """HMAC-SHA256 (hex) of a registration: model name, version source, run id, dataset snapshot
    id and hash, gate result and whether it is the base-model version."""
    payload = signed_payload(name=name, version_source=version_source, run_id=run_id,
                             dataset_id=dataset_id, dataset_hash=dataset_hash,
                             gate_passed=gate_passed, is_base=is_base)
    return hmac.new(_key_bytes(key), payload, hashlib.sha256).hexdigest()


def sign_tags(key: Any, tags: Mapping[str, str], *, name: str, source: str,
              run_id: str | None) -> str:
    """`sign_version` over a version's tags as MLflow stores them (absent tags read as "")."""
    return sign_version(
        key, name=name, version_source=source, run_id=run_id,
        dataset_id=tags.get(TAG_DATASET_ID, ""), dataset_hash=tags.get(TAG_DATASET_HASH, ""),
        gate_passed=tags.get(TAG_GATE_PASSED, ""), is_base=tags.get(TAG_IS_BASE) == "true",
    )


def verify_version(key: Any, tags: Mapping[str, str] | None, *, name: str, source: str,
                   run_id: str | None) -> str | None:
    """None when the version may be served; else why not, in words an operator can act on.

    Servable: a `tuneloop.signature` tag that matches the version's source, run id and
    registration tags under `key`; for an adapter (not is_base=true) also a dataset snapshot id
    and hash, a `tuneloop.run_id` tag equal to the version's run, and gate_passed=true.
    """
    tags = dict(tags or {})
    signature = tags.get(SIGNATURE_TAG)
    if not signature:
        return f"no {SIGNATURE_TAG} tag (not registered by tuneloop)"
    is_base = tags.get(TAG_IS_BASE) == "true"
    if not is_base:
        missing = [tag for tag in (TAG_DATASET_ID, TAG_DATASET_HASH, TAG_RUN_ID)
                   if tags.get(tag, "").strip().lower() in _UNKNOWN]
        if missing:
            return f"missing registration tags: {', '.join(missing)}"
        if tags[TAG_RUN_ID] != (run_id or ""):
            return (f"{TAG_RUN_ID} tag {tags[TAG_RUN_ID]!r} is not the version's run "
                    f"{run_id!r}")
    expected = sign_tags(key, tags, name=name, source=source, run_id=run_id)
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        return ("bad signature: its source, run or registration tags changed after "
                "registration (or it was signed with another key)")
    if not is_base and tags.get(TAG_GATE_PASSED) != "true":
        return f"gate not passed ({TAG_GATE_PASSED}={tags.get(TAG_GATE_PASSED)!r})"
    return None
