"""Salted user ids: the same user maps to the same opaque id; the raw id is not recoverable.

Every user id that leaves tuneloop is ``HMAC-SHA256(salt, id)`` (`tasks.core.ids.hash_user`, the
same hash the router stores as ``user_hash``). Ids that already look hashed (64 hex characters,
such as the router's stored ``user_hash``) are hashed again like any other value, never passed
through: a client could otherwise send a 64-hex "user id" of its choosing and have it exported
verbatim. The salt is `TUNELOOP_USER_HASH_SALT`; with `TUNELOOP_ENV=production` settings refuse a
missing or development-default salt (tasks.core.settings), and a salt passed in here is held to
the same rule (`tasks.core.secrets.secret_problem`).
"""

from __future__ import annotations

from tasks.core.ids import hash_user
from tasks.core.secrets import FRESH_SECRET, secret_problem
from tasks.core.settings import SettingsError, get_settings

# Fields whose values identify a user: replaced by the salted hash.
USER_ID_FIELDS = frozenset({"user_id", "userid", "user", "user_hash", "account_id", "customer_id"})


def hash_user_id(user_id: str, salt: str | None = None) -> str:
    """HMAC-SHA256(salt, user_id) as hex: stable per user, not reversible without the salt."""
    settings = get_settings()
    key = salt if salt is not None else settings.user_hash_salt.get_secret_value()
    if settings.env != "dev" and (problem := secret_problem(key)):
        raise SettingsError(
            f"TUNELOOP_USER_HASH_SALT {problem}, and TUNELOOP_ENV={settings.env}; {FRESH_SECRET}")
    return hash_user(str(user_id), key)
