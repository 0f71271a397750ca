"""Shared fixtures.

- Every test starts with no ANTHROPIC_* or CONVO_* variables set (but the test database URL).
- `db_url` runs a test on SQLite and on PostgreSQL. Both schemas are built by the Alembic
  migrations, never by `create_all`. PostgreSQL comes from CONVO_TEST_POSTGRES_URL, default the
  local server; when it cannot be reached the PostgreSQL tests fail, they never skip.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from convo import Store, db
from convo.client import Client
from convo.retry import RetryPolicy
from convo.standin import StandIn

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TABLES = ("calls", "branches", "turns", "blobs", "conversations", "settings")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "CONVO_")) and name != "CONVO_TEST_POSTGRES_URL":
            monkeypatch.delenv(name, raising=False)


def pg_admin_url() -> str:
    return os.environ.get("CONVO_TEST_POSTGRES_URL", PG_DEFAULT)


def make_pg_database(name: str) -> str:
    """A new, empty PostgreSQL database; returns its URL."""
    admin = make_url(pg_admin_url())
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_pg_database(name: str) -> None:
    engine = create_engine(make_url(pg_admin_url()), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "convo.db"
    engine = db.create_engine_for(f"sqlite:///{path}")
    db.upgrade_schema(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def _pg_session_url() -> Iterator[str]:
    name = f"convo_test_{os.getpid()}"
    url = make_pg_database(name)
    engine = db.create_engine_for(url)
    db.upgrade_schema(engine)
    engine.dispose()
    yield url
    drop_pg_database(name)


def _truncate(url: str) -> None:
    engine = db.create_engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database on each engine."""
    if request.param == "sqlite":
        path = tmp_path / "convo.db"
        shutil.copy(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("_pg_session_url")
    _truncate(url)
    return url


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty PostgreSQL database with no schema at all (for migration tests)."""
    name = f"convo_mig_{uuid.uuid4().hex[:10]}"
    yield make_pg_database(name)
    drop_pg_database(name)


# -- the stand-in, and a store that talks to it without ever really sleeping ----------------

STANDIN_KEY = "sk-test-standin-key"


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """convo's local stand-in of the Messages API, on a free loopback port."""
    with StandIn() as s:
        yield s


@pytest.fixture
def sleeps() -> list[float]:
    """Every delay convo asked to sleep for; nothing really waits."""
    return []


@pytest.fixture
def client(standin: StandIn, sleeps: list[float]) -> Iterator[Client]:
    with Client(
        STANDIN_KEY, standin.base_url, policy=RetryPolicy(max_retries=2), sleep=sleeps.append
    ) as c:
        yield c


@pytest.fixture
def store(db_url: str, client: Client, sleeps: list[float]) -> Iterator[Store]:
    s = Store(db_url, client=client, sleep=sleeps.append)
    yield s
    s.close()
