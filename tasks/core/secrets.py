"""Secret handling shared by settings, services, the CLI and the Airflow plugins: tuneloop's
development-default keys and the other publicly known defaults production refuses, the minimum
lengths and the one-line fixes an error quotes (`MAKE_A_SECRET`), how a router client key is
stored and named (`key_digest`, `CLIENT_DIGEST`, `normalized_digest`, `CLIENT_NAME`), why a value is not a production secret
(`secret_problem`), and how URLs are shown in logs and errors without their credentials
(`redact_url`, `redact_urls_in`, `url_origin`). Pure functions and constants: this module reads
no environment (tasks.core.settings does, and applies these checks to what it reads).
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit, urlunsplit

DEV_USER_HASH_SALT = "tuneloop-dev-salt-change-me"
DEV_ROUTER_API_KEY = "tuneloop-dev-key"
DEV_ROUTER_ADMIN_KEY = "tuneloop-dev-admin-key"
DEV_MODEL_SERVER_API_KEY = "tuneloop-local"
DEV_MODEL_SERVER_ADMIN_KEY = "tuneloop-local-admin"
DEV_REGISTRY_SIGNING_KEY = "tuneloop-dev-registry-key"
MAKE_A_SECRET = "python -c 'import secrets; print(secrets.token_hex(32))'"
MAKE_A_FERNET_KEY = ("python -c 'from cryptography.fernet import Fernet; "
                     "print(Fernet.generate_key().decode())'")
# Shortest accepted secret key / password in production (MLflow's own password minimum is 12).
MIN_SECRET_CHARS = 16
MIN_PASSWORD_CHARS = 12
# tuneloop's development keys: public (they are in its source), refused in production.
_DEV_SECRETS = frozenset({DEV_USER_HASH_SALT, DEV_ROUTER_API_KEY, DEV_ROUTER_ADMIN_KEY,
                          DEV_MODEL_SERVER_API_KEY, DEV_MODEL_SERVER_ADMIN_KEY,
                          DEV_REGISTRY_SIGNING_KEY})
# Publicly known values no production deployment may run with: tuneloop's development keys, the
# placeholder of the compose file tuneloop grew from, Airflow's and MLflow's defaults.
KNOWN_DEFAULT_SECRETS = _DEV_SECRETS | {
    "tuneloop-dev-salt", "change-me-in-production",
    "{JWT_SECRET_KEY}", "{FERNET_KEY}",  # Airflow config templates
    "admin", "airflow", "password", "password1234", "changeme", "secret",  # Airflow, MLflow
    "tuneloop", "postgres",  # the database passwords compose used to default to
}
# A router client's stored key: "sha256:" + the hex SHA-256 of the key (key_digest()).
CLIENT_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A router client's name: what interactions and reactions store as client_id (64 characters at
# most); CLIENT_NAME_RULE says it in words for errors.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CLIENT_NAME_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
# The fix a refused secret's error ends with.
FRESH_SECRET = (f"set a fresh one: `tuneloop secrets init` writes all of them into .env, or "
                f"{MAKE_A_SECRET}")
FRESH_PASSWORD = (f"set a fresh one of {MIN_PASSWORD_CHARS}+ characters: `tuneloop secrets "
                  f"init` writes all of them into .env, or {MAKE_A_SECRET}")


def key_digest(key: str) -> str:
    """How a router client key is stored (TUNELOOP_ROUTER_CLIENTS): "sha256:<hex>"."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def normalized_digest(value: object, what: str) -> str:
    """A stored key digest as the router compares it: `value` stripped and lower-cased, which
    must then be "sha256:" + 64 hex digits (`CLIENT_DIGEST`). Else ValueError naming `what`
    (e.g. "client 'web'") but not the value: a mistaken digest is often the raw key itself."""
    normalized = str(value).strip().lower()
    if not CLIENT_DIGEST.fullmatch(normalized):
        raise ValueError(f"{what} is not stored as sha256:<64 hex digits> of its key (never the "
                         "key itself)")
    return normalized


def secret_problem(value: str | None, *, min_chars: int = MIN_SECRET_CHARS) -> str | None:
    """Why `value` is not a production secret (None: it is one)."""
    if not value:
        return "is unset"
    if value in _DEV_SECRETS:
        return "is the development default (public: it is in tuneloop's source)"
    if value in KNOWN_DEFAULT_SECRETS:
        return "is a publicly known default"
    if len(value) < min_chars:
        return f"is shorter than {min_chars} characters"
    return None


def redact_url(url: str) -> str:
    """`url` with its password (and any query string, which may carry tokens) masked, for logs
    and errors: postgresql://user:***@host/db. Not a URL: returned as it is."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


# scheme://user:password@host: the password may hold "/" and "@", so the userinfo runs to the
# last "@" (followed by a host) of the URL's whitespace-free run. An "@" later in the URL (a
# query's e-mail address) masks more than the password, never less.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/?#@\s]*):\S*@(?=[^@/?#\s])")


def redact_urls_in(text: str) -> str:
    """`text` (an error message, a log line) with the password of every URL in it masked."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def url_origin(url: str) -> str:
    """Only scheme://host[:port] of `url`: for URLs whose path is itself a secret (a Slack or
    Teams webhook)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "<unparsable URL>"
    if not parts.scheme or not host:
        return "<not a URL>"
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")
