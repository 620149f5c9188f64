"""Salted user ids: the same user maps to the same opaque id; the raw id is not recoverable.

Every user id that leaves tuneloop is ``HMAC-SHA256(salt, id)``. Ids that already look hashed
(64 hex characters, such as the router's stored ``user_hash``) are hashed again like any other
value, never passed through: a client could otherwise send a 64-hex "user id" of its choosing and
have it exported verbatim. The salt is `TUNELOOP_USER_HASH_SALT`; with `TUNELOOP_ENV=production`
settings refuse a missing or development-default salt (tasks.core.settings).
"""

from __future__ import annotations

import hashlib
import hmac

from tasks.core.secrets import DEV_USER_HASH_SALT, MAKE_A_SECRET
from tasks.core.settings import SettingsError, get_settings

# Fields whose values identify a user: replaced by the salted hash.
USER_ID_FIELDS = frozenset({"user_id", "userid", "user", "user_hash", "account_id", "customer_id"})


def hash_user_id(user_id: str, salt: str | None = None) -> str:
    """HMAC-SHA256(salt, user_id) as hex: stable per user, not reversible without the salt."""
    settings = get_settings()
    key = salt if salt is not None else settings.user_hash_salt.get_secret_value()
    if settings.env != "dev" and key in ("", DEV_USER_HASH_SALT):
        raise SettingsError(
            "TUNELOOP_USER_HASH_SALT is unset or the development default outside dev mode; "
            f"set it to a fresh secret, e.g. the output of {MAKE_A_SECRET}")
    return hmac.new(key.encode(), str(user_id).encode(), hashlib.sha256).hexdigest()
