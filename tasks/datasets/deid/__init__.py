"""De-identification: the one path every user text takes before it leaves tuneloop.

Reaction datasets, curated snapshots, DPO pairs, requests to a (possibly hosted) mirror judge,
reports, MLflow params and artifacts, and `tuneloop scrub` all go through this package:

- `find_pii` / `has_pii` / `pii_categories` (`detect`): Microsoft Presidio's checksummed
  recognizers plus tuneloop's (emails incl. obfuscated ones, secrets, secret URLs, dates of birth,
  addresses, names), over an NFKC-folded view of the text, in linear time.
- `scrub_text` / `scrub_value` / `scrub_messages` (`scrub`): typed placeholders (``<EMAIL>``),
  optionally consistent pseudonyms per conversation (``<PERSON_1>``); closed and idempotent.
- `hash_user_id` (`users`): salted HMAC user ids.
- `scan_files` / `assert_no_pii` (`files`): the check on written files; findings name the file,
  line and category, never the value.

Presidio (and spaCy) load on the first detection, not on import: DAG files and the CLI stay fast.
"""

from __future__ import annotations

from tasks.datasets.deid.detect import CATEGORIES, PiiMatch, find_pii, has_pii, pii_categories
from tasks.datasets.deid.files import SCANNED_SUFFIXES, PiiFound, assert_no_pii, scan_files
from tasks.datasets.deid.lexicon import known_name_spans
from tasks.datasets.deid.scrub import (
    NAME_FIELDS,
    REDACTED,
    Pseudonyms,
    names_in,
    placeholder,
    scrub_messages,
    scrub_text,
    scrub_value,
)
from tasks.datasets.deid.users import USER_ID_FIELDS, hash_user_id

__all__ = [
    "CATEGORIES", "NAME_FIELDS", "REDACTED", "SCANNED_SUFFIXES", "USER_ID_FIELDS", "PiiFound",
    "PiiMatch", "Pseudonyms", "assert_no_pii", "find_pii", "has_pii", "hash_user_id",
    "known_name_spans", "names_in", "pii_categories", "placeholder", "scan_files",
    "scrub_messages", "scrub_text", "scrub_value",
]
