"""The reaction-log import's configuration: the mapping file (`ReactionMapping`, YAML under
`include/mappings/` or any path) and the run's parameters (`ImportConfig`: the DAG's Params, the
CLI's flags).

A mapping names which source column holds each field of a reaction event — user, prompt,
response, action, dwell, timestamp — plus the dwell unit, the timestamp format, action aliases
("completed" → done), the natural key that makes a row's id, extra context columns and row
filters. Every error names the file, the key and a fix: `mapping file include/mappings/x.yaml:
columns.dwell: missing; name the source column holding it, e.g. dwell: dwell_ms`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.core.configs import at_least
from tasks.core.paths import INCLUDE_DIR

MAPPINGS_DIR = INCLUDE_DIR / "mappings"
# The reactions the router's API takes (serving/reactions.py REACTIONS; a test holds them equal).
REACTIONS = ("done", "dismiss", "thumbs_up", "thumbs_down", "copy", "regenerate")
FIELDS = ("user", "prompt", "response", "action", "dwell", "timestamp")
NAMED_FORMATS = ("iso8601", "unix_s", "unix_ms")
# The source name becomes the client id "import:<name>" (64 characters at most).
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,56}")
FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}

# What to write when a key is missing or has the wrong type.
_HINTS = {
    "name": "e.g. name: tip_scores (letters, digits, '_', '.', '-'; the client id becomes "
            "import:<name>)",
    "columns": "e.g. columns: {user: user_id, prompt: context_json, response: tip_content, "
               "action: reaction, dwell: dwell_ms, timestamp: created_at}",
    "columns.user": "name the source column holding it, e.g. user: user_id",
    "columns.prompt": "name the source column holding it, e.g. prompt: context_json",
    "columns.response": "name the source column holding it, e.g. response: tip_content",
    "columns.action": "name the source column holding it, e.g. action: reaction",
    "columns.dwell": "name the source column holding it, e.g. dwell: dwell_ms",
    "columns.timestamp": "name the source column holding it, e.g. timestamp: created_at",
    "dwell_unit": "e.g. dwell_unit: ms (or s)",
    "timestamp_format": "e.g. timestamp_format: iso8601 (or unix_s, unix_ms, '%Y-%m-%d %H:%M:%S')",
    "timezone": "e.g. timezone: UTC",
    "actions": "e.g. actions: {completed: done, dismissed: dismiss}",
    "key": "e.g. key: [user, timestamp, prompt]",
    "context_columns": "e.g. context_columns: [kind]",
    "where": "e.g. where: {source: [llm]}",
    "model_name": "e.g. model_name: tip-generator",
}


class ImportMappingError(ValueError):
    """A mapping file that cannot be used; the message names the file, the key and the fix."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"mapping file {path}: {message}")


class ImportConfigError(ValueError):
    """The import's parameters are invalid; the message names the field and the fix."""


class ColumnMap(BaseModel):
    """Source column (CSV header, JSONL key — dotted for nested objects —, SQL result column)
    of each field."""

    model_config = ConfigDict(extra="forbid")

    user: str
    prompt: str
    response: str
    action: str
    dwell: str
    timestamp: str

    @field_validator(*FIELDS)
    @classmethod
    def _named(cls, value: str, info: Any) -> str:
        if not value.strip():
            raise ValueError(f"is empty; {_HINTS['columns.' + info.field_name]}")
        return value.strip()


class ReactionMapping(BaseModel):
    """How one log's columns become interactions + reactions (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    columns: ColumnMap
    dwell_unit: Literal["s", "ms"] = "ms"
    timestamp_format: str = "iso8601"
    # Naive timestamps are read in this zone; aware ones keep theirs.
    timezone: str = "UTC"
    # Source action value (case-insensitive) → a reaction; values already named as a reaction
    # need no entry.
    actions: dict[str, str] = Field(default_factory=dict)
    # The natural key: the fields whose values identify one event (its id is their hash).
    key: list[Literal["user", "prompt", "response", "action", "dwell", "timestamp"]] = Field(
        default_factory=lambda: ["user", "timestamp", "prompt"])
    # Extra source columns kept (scrubbed) in the interaction's context under "fields".
    context_columns: list[str] = Field(default_factory=list)
    # Only rows whose column holds one of the listed values are imported (others are counted
    # as filtered, not bad).
    where: dict[str, list[str]] = Field(default_factory=dict)
    model_name: str = "imported"
    # Set by load_mapping: where the mapping came from and its content hash.
    path: str = ""
    content_hash: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SOURCE_NAME.fullmatch(value):
            raise ValueError(f"{value[:80]!r} is not 1-57 letters, digits, '_', '.' or '-' "
                             f"starting with a letter or digit; {_HINTS['name']}")
        return value

    @field_validator("timestamp_format")
    @classmethod
    def _timestamp_format(cls, value: str) -> str:
        if value in NAMED_FORMATS:
            return value
        probe = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        try:
            ok = "%" in value and datetime.strptime(probe.strftime(value), value) is not None
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{value[:80]!r} is neither iso8601, unix_s, unix_ms nor a "
                             f"strptime pattern; {_HINTS['timestamp_format']}")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value[:80]!r}; {_HINTS['timezone']} or "
                             "timezone: Europe/Berlin") from None
        return value

    @field_validator("actions")
    @classmethod
    def _actions(cls, value: dict[str, str]) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for alias, reaction in value.items():
            target = str(reaction).strip().lower()
            if target not in REACTIONS:
                raise ValueError(f"{alias}: {reaction!r} is not a reaction; map it to one of "
                                 f"{', '.join(REACTIONS)}, e.g. {alias}: done")
            aliases[str(alias).strip().lower()] = target
        return aliases

    @field_validator("key")
    @classmethod
    def _key(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"must name distinct fields (got {value}); {_HINTS['key']}")
        return value

    @field_validator("where")
    @classmethod
    def _where(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for column, allowed in value.items():
            if not allowed:
                raise ValueError(f"{column}: lists no value, so no row would be imported; "
                                 f"{_HINTS['where']}")
        return {column: [str(v) for v in allowed] for column, allowed in value.items()}

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not value.strip() or len(value) > 300:
            raise ValueError(f"must be 1-300 characters; {_HINTS['model_name']}")
        return value.strip()

    @property
    def client_id(self) -> str:
        return f"import:{self.name}"

    def required_columns(self) -> list[str]:
        """The columns every row must have (the mapped fields and the `where` columns)."""
        columns = [getattr(self.columns, f) for f in FIELDS] + list(self.where)
        return list(dict.fromkeys(columns))

    def reaction_of(self, value: str) -> str | None:
        """The reaction a source action value names (aliases first), or None."""
        action = value.strip().lower()
        action = self.actions.get(action, action)
        return action if action in REACTIONS else None


def _problem(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "?"
    kind, message = error["type"], str(error["msg"]).removeprefix("Value error, ")
    top = str(error["loc"][0]) if error["loc"] else ""
    hint = _HINTS.get(loc) or _HINTS.get(top, "see include/mappings/tip_scores.yaml")
    if kind == "missing":
        return f"{loc}: missing; {hint}"
    if kind == "extra_forbidden":
        where = ReactionMapping if len(error["loc"]) == 1 else ColumnMap
        keys = [k for k in where.model_fields if k not in ("path", "content_hash")]
        return f"{loc}: unknown key; the keys here are {', '.join(keys)}"
    if kind == "value_error":
        return f"{loc}: {message}"
    return f"{loc}: {message} (got {error.get('input')!r:.80}); {hint}"


def mapping_path(value: str) -> Path:
    """A shipped mapping's name (`tip_scores` → include/mappings/tip_scores.yaml) or a path."""
    path = Path(value).expanduser()
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    return MAPPINGS_DIR / f"{value}.yaml"


def shipped_mappings() -> list[str]:
    return sorted(p.stem for p in MAPPINGS_DIR.glob("*.yaml"))


def load_mapping(value: str | Path) -> ReactionMapping:
    """Read and validate a mapping file; ImportMappingError names the file, key and fix."""
    import yaml

    from tasks.core.ids import content_hash

    path = mapping_path(str(value))
    if not path.is_file():
        raise ImportMappingError(path, "does not exist; use a shipped mapping ("
                                 f"{', '.join(shipped_mappings()) or 'none'}) or the path of a "
                                 "YAML mapping file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportMappingError(path, f"is not valid YAML ({first}); check the indentation "
                                 "and quoting") from None
    if not isinstance(raw, dict):
        raise ImportMappingError(path, "must be a YAML mapping with name: and columns:; see "
                                 "include/mappings/tip_scores.yaml")
    raw.pop("path", None)
    raw.pop("content_hash", None)
    try:
        mapping = ReactionMapping(**raw)
    except ValidationError as exc:
        raise ImportMappingError(path, "; ".join(_problem(e) for e in exc.errors())) from None
    return mapping.model_copy(update={"path": str(path), "content_hash": content_hash(raw)})


class ImportConfig(BaseModel):
    """One import run: the mapping, the source (a CSV/JSONL file or a SQL query) and the bad-row
    allowance. The import_reactions DAG's Params (its `source_conn_id` becomes `source_url`)."""

    model_config = ConfigDict(extra="forbid")

    mapping: str = ""
    file: str = ""
    format: Literal["auto", "csv", "jsonl"] = "auto"
    sql: str = ""
    # The PostgreSQL database the query runs on; empty = tuneloop's own (DATABASE_URL).
    source_url: SecretStr = SecretStr("")
    # Up to this many bad rows are skipped and reported; one more fails the run, writing nothing.
    max_bad_rows: int = 0
    # Parse, de-identify and count what would be inserted, then roll back.
    dry_run: bool = False

    _mapping: ReactionMapping | None = PrivateAttr(default=None)

    @field_validator("mapping")
    @classmethod
    def _mapping_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("mapping is empty; name a mapping file, e.g. mapping: tip_scores "
                             "(include/mappings/tip_scores.yaml) or a path to a YAML mapping")
        load_mapping(value.strip())  # its errors name the file, the key and the fix
        return value.strip()

    @field_validator("sql")
    @classmethod
    def _read_only(cls, value: str) -> str:
        query = value.strip().rstrip(";").strip()
        if query and not re.match(r"(?is)^\s*(select|with|values|table)\b", query):
            first = query.split(None, 1)[0][:20]
            raise ValueError(f"sql must be one read-only query starting with SELECT or WITH "
                             f"(got {first!r} ...); e.g. sql: SELECT * FROM tip_scores")
        return query

    @field_validator("source_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value().strip()
        if url and not re.match(r"^(postgres|postgresql(\+\w+)?)://", url):
            # Never echo the URL: it may hold a password.
            raise ValueError("source_url must be a PostgreSQL URL like "
                             "postgresql://reader@db.internal:5432/app (put the password in "
                             "PGPASSWORD or ~/.pgpass, not in the URL)")
        return SecretStr(url)

    @field_validator("max_bad_rows")
    @classmethod
    def _allowance(cls, value: int) -> int:
        return at_least(value, 0, "max_bad_rows", 10)

    @model_validator(mode="after")
    def _one_source(self) -> ImportConfig:
        if bool(self.file.strip()) == bool(self.sql):
            state = "both are set" if self.sql else "neither is set"
            raise ValueError(f"give exactly one log to import ({state}): file: path/to/log.csv "
                             "(CSV or JSONL) or sql: SELECT ... (a query)")
        if self.sql and self.format != "auto":
            raise ValueError("format applies to a file; leave it at auto with sql")
        if self.file and self.source_url.get_secret_value():
            raise ValueError("source_url is where sql runs; clear it when importing a file")
        if self.file:
            path = Path(self.file).expanduser()
            if not path.is_file():
                raise ValueError(f"file {self.file[:200]!r} does not exist; pass the path of a "
                                 "CSV or JSONL log")
            if self.format == "auto" and path.suffix.lower() not in FILE_FORMATS:
                raise ValueError(f"format of file {path.name!r} unknown from its suffix; set "
                                 "format: csv or format: jsonl")
        self._mapping = load_mapping(self.mapping)
        return self

    @property
    def source_format(self) -> Literal["csv", "jsonl", "sql"]:
        if self.sql:
            return "sql"
        if self.format != "auto":
            return self.format
        return FILE_FORMATS[Path(self.file).suffix.lower()]  # type: ignore[return-value]

    def reaction_mapping(self) -> ReactionMapping:
        if self._mapping is None:  # pragma: no cover - set by the validator
            self._mapping = load_mapping(self.mapping)
        return self._mapping

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> ImportConfig:
        from tasks.core.configs import config_from_params

        return config_from_params(cls, params, ImportConfigError, "import")
