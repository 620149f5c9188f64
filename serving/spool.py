"""The interaction log's disk spool: while PostgreSQL is down, `InteractionLog` appends each
batch (`Batch`: interaction rows, then reaction rows) to bounded, fsync'd JSONL segments
(`Spool`) and replays them in order when the database is back; `batch_json` encodes rows as one
JSON document PostgreSQL accepts (cleaning NUL characters and lone surrogates).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("serving.router")  # the router's one log

_MAX_SLOTS = 64  # writers sharing one spool_dir (processes, or routers in one test process)


@dataclass
class Batch:
    """What one drain writes: interaction rows, then reaction rows (which may reference them)."""

    interactions: list[dict[str, Any]] = field(default_factory=list)
    reactions: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.interactions) + len(self.reactions)

    def line(self) -> bytes:
        """The batch as one spool line (JSONL); TypeError for a value JSON cannot hold."""
        return ('{"interactions":' + batch_json(self.interactions) + ',"reactions":'
                + batch_json(self.reactions) + "}\n").encode("utf-8")


# ---- the spool ---------------------------------------------------------------------------------


@dataclass
class _Segment:
    path: Path
    size: int  # bytes on disk
    rows: int  # rows not yet replayed
    offset: int = 0  # bytes already replayed by this process
    # The interaction ids of its lines as `hash()` keys, so that the reactions API can tell a
    # spooled interaction from an unknown one: a set while the segment is written to, a sorted
    # array of 8 bytes an id once sealed (a full spool holds on the order of a million ids).
    keys: set[int] | array = field(default_factory=set)
    replayed_keys: set[int] = field(default_factory=set)  # of its lines already committed

    def seal(self) -> None:
        if isinstance(self.keys, set):
            self.keys = array("q", sorted(self.keys))

    def holds(self, key: int) -> bool:
        keys = self.keys  # one read: the writer thread may seal it meanwhile
        if isinstance(keys, set):
            found = key in keys
        else:
            index = bisect_left(keys, key)
            found = index < len(keys) and keys[index] == key
        return found and key not in self.replayed_keys


class Spool:
    """Batches kept on local disk while the database is down: append-only JSONL segments (one
    line per batch, fsync'd before `append` returns), bounded by `max_bytes` in all.

    Each writer claims a slot under `root` (`writer-<k>/`, held with an flock on
    `writer-<k>.lock` for its lifetime), so processes or routers sharing a spool_dir never
    interleave. `open` loads what a previous owner of the slot left behind and adopts the
    segments of free slots, so nothing a crashed process spooled is left unreplayed. Only the
    writer thread calls it; `holds`, `rows` and `bytes` may be read from any thread. The ids it
    holds cost 8 bytes each (sorted per sealed segment) and go as their lines are replayed.
    """

    def __init__(self, root: Path, max_bytes: int, segment_bytes: int = 4 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.dir: Path | None = None
        self.segments: list[_Segment] = []
        self.rows = 0
        self.bytes = 0
        self._lock_fd: int | None = None
        self._active_fd: int | None = None
        self._next_seq = 0

    # -- lifecycle --
    def open(self) -> Spool:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # user text: owner only
        slot = self._claim_slot()
        self.dir = self.root / f"writer-{slot}"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._adopt_free_slots(slot)
        for path in sorted(self.dir.glob("*.jsonl")):
            self._load(path)
        self._next_seq = 1 + max((int(s.path.stem) for s in self.segments), default=-1)
        if self.segments:
            log.warning("interaction log: %d rows spooled by an earlier process in %s; "
                        "replaying them", self.rows, self.dir)
        return self

    def close(self) -> None:
        self._close_active()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the slot
            self._lock_fd = None

    def _claim_slot(self) -> int:
        for slot in range(_MAX_SLOTS):
            fd = self._try_lock(slot)
            if fd is not None:
                self._lock_fd = fd
                return slot
        raise OSError(f"all {_MAX_SLOTS} spool slots under {self.root} are held by live writers")

    def _try_lock(self, slot: int) -> int | None:
        fd = os.open(self.root / f"writer-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _adopt_free_slots(self, own: int) -> None:
        """Move the segments of slots no live writer holds into ours (after our own)."""
        assert self.dir is not None
        own_seqs = [int(p.stem) for p in self.dir.glob("*.jsonl")]
        seq = 1 + max(own_seqs, default=-1)
        for other in sorted(self.root.glob("writer-*/")):
            slot = other.name.removeprefix("writer-")
            if not slot.isdigit() or int(slot) == own or not any(other.glob("*.jsonl")):
                continue
            fd = self._try_lock(int(slot))
            if fd is None:
                continue  # a live writer: its spool is its own
            try:
                for path in sorted(other.glob("*.jsonl")):
                    path.rename(self.dir / f"{seq:012d}.jsonl")
                    seq += 1
                _fsync_dir(self.dir)
                _fsync_dir(other)
            finally:
                os.close(fd)

    def _load(self, path: Path) -> None:
        data = path.read_bytes()
        rows = 0
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("interaction log: %s ends in %d bytes of a batch cut short by a crash; "
                        "skipping them", path, len(data) - end)
        segment = _Segment(path=path, size=len(data), rows=0)
        for line in data[:end].splitlines():
            batch = _decode(line, path)
            if batch is not None:
                rows += len(batch)
                segment.keys.update(hash(row["id"]) for row in batch.interactions)
        segment.rows = rows
        segment.seal()  # never appended to: `append` starts a segment of its own
        self.segments.append(segment)
        self.rows += rows
        self.bytes += len(data)

    # -- writing --
    def holds(self, interaction_id: str) -> bool:
        """Whether an interaction is spooled and not yet replayed (a 64-bit hash of its id: a
        false positive is a chance of about n / 2**64)."""
        key = hash(interaction_id)
        return any(segment.holds(key) for segment in tuple(self.segments))

    def append(self, batch: Batch) -> bool:
        """Add one batch (a line) durably; False when it would exceed `max_bytes`. Raises
        OSError when the disk refuses it (the segment is left as it was), TypeError when a row
        holds a value JSON cannot."""
        encoded = batch.line()
        if self.bytes + len(encoded) > self.max_bytes:
            return False
        active = self.segments[-1] if self.segments and self._active_fd is not None else None
        if active is None or active.size >= self.segment_bytes:
            active = self._new_segment()
        assert self._active_fd is not None
        start = active.size
        try:
            view = memoryview(encoded)
            while view:
                view = view[os.write(self._active_fd, view):]
            os.fsync(self._active_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._active_fd, start)  # never leave half a line behind
            raise
        active.size += len(encoded)
        active.rows += len(batch)
        self.rows += len(batch)
        self.bytes += len(encoded)
        assert isinstance(active.keys, set)
        active.keys.update(hash(row["id"]) for row in batch.interactions)
        return True

    def _new_segment(self) -> _Segment:
        assert self.dir is not None
        self._close_active()
        if self.segments:
            self.segments[-1].seal()  # no line is added to it any more
        path = self.dir / f"{self._next_seq:012d}.jsonl"
        self._next_seq += 1
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.dir)  # the new name survives a crash too
        segment = _Segment(path=path, size=0, rows=0)
        self.segments.append(segment)
        return segment

    def _close_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None

    # -- replaying --
    def read(self, segment: _Segment) -> Iterator[tuple[int, Batch | None]]:
        """(end offset, batch) for each whole line not yet replayed; None for a corrupt line."""
        with segment.path.open("rb") as handle:
            handle.seek(segment.offset)
            data = handle.read()
        position = segment.offset
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # cut short by a crash (skipped, see _load)
            position += len(line)
            yield position, _decode(line, segment.path)

    def replayed(self, segment: _Segment, end: int, batch: Batch | None) -> None:
        """The line ending at `end` is committed: forget its rows."""
        segment.offset = end
        if batch is not None:
            segment.rows -= len(batch)
            self.rows -= len(batch)
            segment.replayed_keys.update(hash(row["id"]) for row in batch.interactions)

    def remove(self, segment: _Segment) -> None:
        """Delete a segment whose every line is committed."""
        if self.segments and segment is self.segments[-1]:
            self._close_active()
        segment.path.unlink(missing_ok=True)
        self.segments.remove(segment)
        self.rows -= segment.rows  # 0 unless lines were corrupt
        self.bytes -= segment.size


def _decode(line: bytes, path: Path) -> Batch | None:
    try:
        record = json.loads(line)
        return Batch(interactions=record["interactions"], reactions=record["reactions"])
    except (ValueError, KeyError, TypeError):
        log.error("interaction log: skipping a corrupt spool line in %s", path)
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- encoding rows for PostgreSQL (and the spool) ----------------------------------------------


def _clean_text(value: str) -> str:
    """Text PostgreSQL can store: no NUL characters, no lone UTF-16 surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} in an interaction row")


def batch_json(rows: list[dict[str, Any]]) -> str:
    """The rows as one JSON array PostgreSQL can store: client text may carry NUL characters
    or lone surrogates, which PostgreSQL rejects; those (rare) batches are cleaned first."""
    encoded = json.dumps(rows, default=_json_default, ensure_ascii=False)
    try:
        encoded.encode("utf-8")
        clean = "\\u0000" not in encoded
    except UnicodeEncodeError:
        clean = False
    if not clean:
        encoded = json.dumps(_clean(rows), default=_json_default, ensure_ascii=False)
    return encoded
