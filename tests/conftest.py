"""Shared fixtures: a throwaway PostgreSQL database per test session, settings, fake LLM server.

The database comes from TUNELOOP_TEST_ADMIN_URL (default: the machine's PostgreSQL on
127.0.0.1:5432, as in CI); when that is unreachable, an embedded pgserver instance is used.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Isolate every run from the developer's ~/.tuneloop and ~/airflow before anything imports them.
_RUN_DIR = Path(tempfile.mkdtemp(prefix="tuneloop-test-"))
os.environ.setdefault("TUNELOOP_DATA_DIR", str(_RUN_DIR / "data"))
os.environ.setdefault("AIRFLOW_HOME", str(_RUN_DIR / "airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared model cache (converted SmolLM2 etc.) survives across runs to keep the suite fast.
os.environ.setdefault("TUNELOOP_MODEL_CACHE", str(Path.home() / ".cache" / "tuneloop-models"))

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# Airflow's metadata DB for dag.test(): a throwaway Postgres database, created (and migrated) only
# by the `airflow_db` fixture. The variable must be set before anything imports airflow.
_AIRFLOW_DB_NAME = f"airflow_test_{uuid.uuid4().hex[:10]}"
_ADMIN_FOR_AIRFLOW = os.environ.get("TUNELOOP_TEST_ADMIN_URL", DEFAULT_ADMIN_URL)
os.environ.setdefault(
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    _ADMIN_FOR_AIRFLOW.rsplit("/", 1)[0] + "/" + _AIRFLOW_DB_NAME,
)
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")


def _admin_url() -> str:
    from sqlalchemy import create_engine, text

    url = os.environ.get("TUNELOOP_TEST_ADMIN_URL", DEFAULT_ADMIN_URL)
    try:
        eng = create_engine(url, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
        return url
    except Exception:
        import pgserver

        server = pgserver.get_server(str(_RUN_DIR / "pg"), cleanup_mode="stop")
        return server.get_uri()


def _create_database(admin_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return _admin_url()


@pytest.fixture(scope="session")
def make_database(pg_admin_url: str) -> Iterator:
    """Factory: create a fresh, empty database; all are dropped at session end."""
    created: list[str] = []

    def factory(prefix: str = "tuneloop_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        created.append(name)
        return _create_database(pg_admin_url, name)

    yield factory
    for name in created:
        try:
            _drop_database(pg_admin_url, name)
        except Exception:  # pragma: no cover - best effort cleanup
            pass


@pytest.fixture(scope="session")
def database_url(make_database) -> Iterator[str]:
    """A migrated throwaway database shared by the session; DATABASE_URL points at it."""
    from tasks.core.db.engine import engine_for, migrate
    from tasks.core.settings import get_settings

    url = make_database()
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    migrate(engine_for(url))
    yield url


@pytest.fixture()
def engine(database_url: str):
    from tasks.core.db.engine import engine_for

    return engine_for(database_url)


@pytest.fixture(scope="session")
def make_engine(make_database):
    """Factory: an engine on a brand-new migrated database named after `prefix`."""
    from tasks.core.db.engine import engine_for, migrate

    def factory(prefix: str = "tuneloop_test"):
        eng = engine_for(make_database(prefix))
        migrate(eng)
        return eng

    return factory


@pytest.fixture()
def fresh_engine(make_engine):
    """An engine on a brand-new migrated database (for tests that count rows exactly)."""
    return make_engine()


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """TUNELOOP_DATA_DIR -> a temp folder for one test (settings cache cleared around it)."""
    from tasks.core.settings import get_settings

    monkeypatch.setenv("TUNELOOP_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    """No tuneloop/Airflow/MLflow variable (the suite sets AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)
    and no .env in the working directory."""
    from tests.production_env import PRODUCTION_PREFIXES

    for name in list(os.environ):
        if name.startswith(PRODUCTION_PREFIXES) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


@pytest.fixture()
def production(clean_env):
    """A complete, valid production environment (tests/production_env.py): a test breaks one
    variable of it to show that variable alone is refused."""
    from tests.production_env import production_env

    for name, value in production_env().items():
        clean_env.setenv(name, value)
    return clean_env


@pytest.fixture()
def fake_llm():
    """A running fake OpenAI-compatible server (see tests/fakes/fake_openai.py)."""
    from tests.fakes.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="session")
def airflow_db(database_url: str) -> Iterator[str]:
    """Create and migrate Airflow's metadata database (once per session) for dag.test()."""
    from sqlalchemy import create_engine, text

    from tests.e2e.airflow_harness import migrate_metadata

    conn_url = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    name = conn_url.rsplit("/", 1)[1]
    admin = create_engine(_ADMIN_FOR_AIRFLOW, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname=:n"), {"n": name})
        if not exists.scalar():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    migrate_metadata(os.environ)
    yield conn_url
    try:
        _drop_database(_ADMIN_FOR_AIRFLOW, name)
    except Exception:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    """The project's DAGs, parsed the way the dag-processor parses them."""
    plugins = str(ROOT / "plugins")
    if plugins not in sys.path:
        sys.path.insert(0, plugins)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag
