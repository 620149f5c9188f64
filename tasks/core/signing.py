"""Signed registrations: the HMAC that tells a registry version tuneloop registered from one it
did not.

MLflow has no auth here, so anyone who can reach it can register a version, point an alias at
it, edit its tags or overwrite its artifacts. `tasks.register.registry` signs each version it
creates, over the version's real source and run id and its registration tags (dataset snapshot
id and hash, gate result, is_base, and for an adapter the sha256 of its files,
`adapter_digest`), with `settings.registry_signing_key`, and stores the hex digest in the
`tuneloop.signature` tag; the router serves a version only when `verify_version` finds that tag
valid (and, for an adapter, the gate passed), and `materialize_adapter` installs an adapter only
when its downloaded files still have the signed digest. No MLflow (hashlib, hmac, json, and
file reads for `adapter_digest`), so the router and the registry share it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SIGNATURE_TAG = "tuneloop.signature"
# The version tags the signature covers (as `tasks.register.registry` writes them).
TAG_DATASET_ID = "dataset_id"
TAG_DATASET_HASH = "dataset_hash"
TAG_GATE_PASSED = "gate_passed"
TAG_IS_BASE = "is_base"
TAG_RUN_ID = "tuneloop.run_id"
# sha256 of the adapter folder's files at registration (adapter_digest); base versions have none.
TAG_ADAPTER_SHA256 = "tuneloop.adapter_sha256"
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


def adapter_digest(folder: Path | str) -> str:
    """sha256 (hex) of every file under `folder`: each file's path relative to it (sorted, "/"
    separated), its size and its bytes, so a changed, added, removed or renamed file changes
    the digest. Empty folders do not count."""
    root = Path(folder)
    files = sorted((path.relative_to(root).as_posix(), path)
                   for path in root.rglob("*") if path.is_file())
    digest = hashlib.sha256()
    for relative, path in files:
        # Name and size frame each file's bytes: no two different folders hash alike.
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def signed_payload(*, name: str, version_source: str, run_id: str | None, dataset_id: str,
                   dataset_hash: str, gate_passed: str, is_base: bool = False,
                   adapter_sha256: str = "") -> bytes:
    """The canonical JSON the signature is computed over (sorted keys, no spaces)."""
    payload: dict[str, Any] = {
        "scheme": SIGNATURE_SCHEME, "name": str(name), "source": str(version_source),
        "run_id": str(run_id or ""), "dataset_id": str(dataset_id),
        "dataset_hash": str(dataset_hash), "gate_passed": str(gate_passed),
        "is_base": bool(is_base),
    }
    # Only when there is one, so a version signed before adapter digests keeps its signature
    # (materialize_adapter refuses it until it is re-registered). Adding, removing or changing
    # the tag still breaks the signature: the payload changes.
    if adapter_sha256:
        payload["adapter_sha256"] = str(adapter_sha256)
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def sign_version(key: Any, *, name: str, version_source: str, run_id: str | None,
                 dataset_id: str, dataset_hash: str, gate_passed: str,
                 is_base: bool = False, adapter_sha256: str = "") -> str:
    """HMAC-SHA256 (hex) of a registration: model name, version source, run id, dataset snapshot
    id and hash, gate result, whether it is the base-model version and its adapter digest."""
    payload = signed_payload(name=name, version_source=version_source, run_id=run_id,
                             dataset_id=dataset_id, dataset_hash=dataset_hash,
                             gate_passed=gate_passed, is_base=is_base,
                             adapter_sha256=adapter_sha256)
    return hmac.new(_key_bytes(key), payload, hashlib.sha256).hexdigest()


def sign_tags(key: Any, tags: Mapping[str, str], *, name: str, source: str,
              run_id: str | None) -> str:
    """`sign_version` over a version's tags as MLflow stores them (absent tags read as "")."""
    return sign_version(
        key, name=name, version_source=source, run_id=run_id,
        dataset_id=tags.get(TAG_DATASET_ID, ""), dataset_hash=tags.get(TAG_DATASET_HASH, ""),
        gate_passed=tags.get(TAG_GATE_PASSED, ""), is_base=tags.get(TAG_IS_BASE) == "true",
        adapter_sha256=tags.get(TAG_ADAPTER_SHA256, ""),
    )


def verify_version(key: Any, tags: Mapping[str, str] | None, *, name: str, source: str,
                   run_id: str | None, require_gate: bool = True) -> str | None:
    """None when the version may be served; else why not, in words an operator can act on.

    Servable: a `tuneloop.signature` tag that matches the version's source, run id and
    registration tags under `key`; for an adapter (not is_base=true) also a dataset snapshot id
    and hash, a `tuneloop.run_id` tag equal to the version's run, and gate_passed=true (unless
    `require_gate=False`: the version is tuneloop's and unchanged, e.g. to evaluate it). The
    adapter digest, when signed, is checked against the files by whoever downloads them.
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
    if require_gate and not is_base and tags.get(TAG_GATE_PASSED) != "true":
        return f"gate not passed ({TAG_GATE_PASSED}={tags.get(TAG_GATE_PASSED)!r})"
    return None
