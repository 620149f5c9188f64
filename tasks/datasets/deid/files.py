"""Scanning written files for PII: the last check before a snapshot or artifact is published.

Findings name the file, the line and the category, never the matched value, so the error that
refuses a snapshot cannot itself leak what it caught.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.datasets.deid.detect import find_pii

SCANNED_SUFFIXES = frozenset({".json", ".jsonl", ".html", ".txt", ".csv", ".yaml", ".md"})


class PiiFound(ValueError):
    """PII was found where none may be (an exported file or artifact)."""

    def __init__(self, findings: list[dict[str, Any]]):
        self.findings = findings
        where = ", ".join(sorted({f"{f['path']}:{f['line']}" for f in findings})[:10])
        kinds = ", ".join(sorted({f["kind"] for f in findings}))
        super().__init__(
            f"{len(findings)} PII finding(s) of category {kinds} at {where}; "
            "export through tasks.datasets.deid.scrub_text / scrub_value before writing"
        )


def scan_files(paths: Iterable[Path], names: Iterable[str] = (),
               extra_literals: Iterable[str] = ()) -> list[dict[str, Any]]:
    """PII findings in data files: [{"path", "line", "kind"}] (never the values).

    Text formats we write (SCANNED_SUFFIXES) are scanned line by line; images and the Data Docs
    site's static assets (GX's own CSS, fonts, images) are not. `extra_literals` are exact
    strings that must not appear (e.g. raw user ids); they are reported as kind "literal".
    """
    names = frozenset(names)
    literals = [lit for lit in extra_literals if lit]
    findings: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if path.suffix.lower() not in SCANNED_SUFFIXES or "static" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for string in _strings(line, whole_json=path.suffix.lower() == ".jsonl"):
                findings.extend({"path": str(path), "line": number, "kind": match.kind}
                                for match in find_pii(string, names))
                findings.extend({"path": str(path), "line": number, "kind": "literal"}
                                for literal in literals if literal in string)
    return findings


def _strings(line: str, *, whole_json: bool) -> list[str]:
    """The texts of one line: a JSONL record's string values (unescaped, so ``\\u00fc`` and
    ``\\n`` read as the user wrote them), else the line itself."""
    if whole_json and line.strip():
        try:
            record = json.loads(line)
        except ValueError:
            return [line]
        found: list[str] = []
        _walk(record, found)
        return found
    return [line]


def _walk(value: Any, found: list[str]) -> None:
    if isinstance(value, str):
        found.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            found.append(str(key))
            _walk(item, found)
    elif isinstance(value, list):
        for item in value:
            _walk(item, found)


def assert_no_pii(paths: Iterable[Path], names: Iterable[str] = (),
                  extra_literals: Iterable[str] = ()) -> None:
    """Raise PiiFound when any text file under `paths` contains PII."""
    findings = scan_files(paths, names, extra_literals)
    if findings:
        raise PiiFound(findings)
