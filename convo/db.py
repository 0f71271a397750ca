"""Engines, transactions and schema upgrades for SQLite and PostgreSQL.

SQLite runs in WAL mode with a busy timeout, and every write transaction starts with
BEGIN IMMEDIATE: a deferred transaction that later tries to write can fail at once with
"database is locked" when another process writes, whatever the timeout. Reads stay deferred,
so readers never wait for writers.

Alembic is imported only when the schema must change: opening an up-to-date store costs one
SELECT of the version, not the import of a migration framework.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from convo.errors import ConfigError, DatabaseUnavailable, SchemaTooNew, StoreError

# The newest revision this convo knows; a database at another unknown revision is newer.
HEAD = "0003"
KNOWN_REVISIONS = ("0001", "0002", "0003")
SQLITE_BUSY_TIMEOUT_MS = 30_000
# A pooled PostgreSQL connection idle longer than this is pinged before use (see _install_pg_hooks).
PING_AFTER_IDLE_SECONDS = 1.0
_WRITE = "convo_write"


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def _prepare_sqlite_file(path: str) -> None:
    """Create the database file (and its directory) readable by the owner only."""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    p = Path(path).expanduser()
    if not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    if not p.exists():
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def create_engine_for(url: str) -> Engine:
    """An engine for a convo database URL; `sqlite:///path` or `postgresql+psycopg://...`."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):  # ValueError: a non-numeric port
        raise ConfigError(f"not a database URL: {_redact(url)}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if not database:
            # SQLAlchemy would open a private in-memory database and lose everything on exit.
            raise ConfigError("a sqlite URL needs a file path: sqlite:///path/to/convo.db")
        if database.startswith("~"):
            # Expand here, so the file prepared below is the very one SQLite opens.
            parsed = parsed.set(database=str(Path(database).expanduser()))
        try:
            _prepare_sqlite_file(parsed.database or "")
        except OSError as e:
            raise DatabaseUnavailable(
                f"cannot create database {_redact(str(parsed))}: {e.strerror or e}"
            ) from None
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _install_sqlite_hooks(engine)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        driver = parsed.get_driver_name()
        if driver not in ("psycopg", "psycopg2"):
            # convo's hot reads run SQL on the driver in its parameter style (see Reader).
            raise ConfigError(
                f"{_redact(str(parsed))}: convo talks to PostgreSQL through psycopg "
                f"(postgresql+psycopg://, or postgresql+psycopg2://), not {driver}"
            )
        # No hstore: convo never uses it, and looking its type up costs every new engine a
        # query (a third of a CLI command's connect time). Only the psycopg dialects take it.
        try:
            engine = create_engine(parsed, use_native_hstore=False)
        except sa_exc.ArgumentError as e:  # an unknown driver (NoSuchModuleError)
            raise ConfigError(f"{_redact(str(parsed))}: {_first_line(e)}") from None
        except ImportError as e:  # a dialect SQLAlchemy knows whose driver is not installed
            raise ConfigError(
                f"{_redact(str(parsed))}: its driver is not installed ({_first_line(e)})"
            ) from None
        _install_pg_hooks(engine)
        return engine
    raise ConfigError(f"unsupported database {backend!r}: use sqlite or postgresql")


def _enable_wal(cur: Any) -> None:
    """WAL mode (persistent in the file). Switching needs an exclusive lock, and SQLite may
    answer "database is locked" at once instead of waiting, so a racing opener retries."""
    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _install_pg_hooks(engine: Engine) -> None:
    """Ping a pooled connection before use only if it sat idle in the pool.

    A connection can die while pooled (a server restart, an idle timeout, a dropped route), and
    SQLAlchemy's pool_pre_ping would catch that with a round trip at every checkout: a resume
    checks a connection out three times in a row, a send four, each a round trip spent asking
    whether a connection returned microseconds ago is still there. A failed ping makes the pool
    replace the connection and try again (the pessimistic-disconnect recipe of its docs)."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= PING_AFTER_IDLE_SECONDS:
            return  # new, or back in the pool a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as e:
            raise sa_exc.DisconnectionError(_first_line(e)) from e


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let convo, not the driver, decide when a transaction starts (see the `begin` hook).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        _enable_wal(cur)
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get(_WRITE) else "BEGIN")


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """One write transaction: committed on success, rolled back on any error."""
    with _connect(engine) as conn:
        conn.info[_WRITE] = True
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info.pop(_WRITE, None)


@contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    """One read-only transaction (a consistent snapshot)."""
    with _connect(engine) as conn, conn.begin():
        yield conn


@contextmanager
def _connect(engine: Engine) -> Iterator[Connection]:
    try:
        conn = engine.connect()
    except sa_exc.DBAPIError as e:  # OperationalError, or DatabaseError for "not a database"
        raise DatabaseUnavailable(
            f"cannot open database {_redact(str(engine.url))}: {_first_line(e.orig)}"
        ) from None
    try:
        yield conn
    except sa_exc.OperationalError as e:
        raise StoreError(f"database error: {_first_line(e.orig)}") from e
    except (sa_exc.IntegrityError, sa_exc.DataError) as e:
        # A value the schema refuses (too long, duplicate): one line, never the SQL itself.
        raise StoreError(f"the database refused a value: {_first_line(e.orig)}") from None
    finally:
        conn.close()


class Reader:
    """Single-statement reads on a pooled driver connection, in autocommit.

    For the few fixed statements a resume runs (the schema check, the conversation lookup, the
    snapshot and the path). A fresh Store would otherwise pay for a SQLAlchemy Connection, a
    transaction begun and ended, a statement compiled into its new engine's empty cache and a
    Result per statement: on a 10-exchange thread that cost more than reading it. Each
    statement is its own consistent read, so callers that read twice must tolerate a writer in
    between (the store's path reads check what they got). A read that finds its connection
    lost (a restarted server) is run again, once, on a new one."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._raw: Any = None
        self._cur: Any = None
        self._checkout()

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        return self._run(sql, params, many=True)  # type: ignore[no-any-return]

    def first(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._run(sql, params, many=False)

    def _run(self, sql: str, params: Mapping[str, Any] | None, *, many: bool) -> Any:
        sql = _paramstyle(sql, self._dialect)
        for retry in (False, True):
            try:
                self._cur.execute(sql, params or {})
                return self._cur.fetchall() if many else self._cur.fetchone()
            except self._engine.dialect.loaded_dbapi.Error as e:
                if retry or not self._engine.dialect.is_disconnect(e, self._raw.driver_connection, self._cur):
                    raise
                # Its pool-mates most likely went with it (a restart drops them all): close the
                # idle ones too, so no later checkout inherits a dead connection.
                self._raw.invalidate(e)
                self._raw.close()
                self._raw = None
                self._engine.pool.dispose()
                self._checkout()
        raise AssertionError("unreachable")

    def _checkout(self) -> None:
        try:
            raw = self._engine.raw_connection()
        except (sa_exc.DBAPIError, self._engine.dialect.loaded_dbapi.Error) as e:
            # The pool passes on the driver's own error (SQLAlchemy's, if it wrapped one).
            raise DatabaseUnavailable(
                f"cannot open database {_redact(str(self._engine.url))}: "
                f"{_first_line(getattr(e, 'orig', e))}"
            ) from None
        self._raw = raw
        try:
            if self._dialect == "postgresql":
                # No BEGIN and ROLLBACK round trips around a single statement (a local
                # setting of the connection, put back by `close`).
                driver: Any = raw.driver_connection
                driver.autocommit = True
            self._cur = raw.cursor()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is None:
            return
        if raw.is_valid:
            if self._cur is not None:
                self._cur.close()
            if self._dialect == "postgresql" and not raw.driver_connection.closed:
                raw.driver_connection.autocommit = False
        raw.close()


@lru_cache(maxsize=64)
def _paramstyle(sql: str, dialect: str) -> str:
    """`:name` parameters (sqlite3's named style) as `%(name)s` for psycopg and psycopg2."""
    if dialect == "sqlite":
        return sql
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql.replace("%", "%%"))


@contextmanager
def reader(engine: Engine) -> Iterator[Reader]:
    """A `Reader` on a connection checked out of the engine's pool, returned after."""
    r = Reader(engine)
    try:
        yield r
    except engine.dialect.loaded_dbapi.Error as e:
        raise StoreError(f"database error: {_first_line(e)}") from e
    finally:
        r.close()


def _first_line(err: object) -> str:
    return (str(err).strip().splitlines() or ["unknown error"])[0]


def current_revision(conn: Connection) -> str | None:
    """The Alembic revision, None for a database convo never touched, read inside a migration's
    own transaction (see `schema_revision` for the one every Store opens with)."""
    if conn.dialect.name == "sqlite":
        # A statement SQLite cannot prepare leaves the transaction as it was.
        try:
            row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
        except sa_exc.OperationalError:
            return None
    else:
        # A failed statement would abort a PostgreSQL transaction: ask the catalog first.
        if conn.exec_driver_sql("SELECT to_regclass('alembic_version')").scalar() is None:
            return None
        row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
    return row[0] if row else None


def _check_known(rev: str | None, url: str) -> None:
    if rev is not None and rev not in KNOWN_REVISIONS:
        raise SchemaTooNew(
            f"database {_redact(url)} has schema revision {rev}, newer than this convo "
            f"knows (head {HEAD}): upgrade convo"
        )


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision, in one statement on the driver (every Store opens with this)."""
    with reader(engine) as r:
        try:
            row = r.first("SELECT version_num FROM alembic_version")
        except engine.dialect.loaded_dbapi.Error as e:
            # No such table: a database convo never touched (autocommit: nothing to undo).
            # SQLSTATE 42P01 is psycopg's e.sqlstate, psycopg2's e.pgcode.
            code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
            if code == "42P01" or "no such table" in str(e):
                return None
            raise
    return row[0] if row else None


def ensure_schema(engine: Engine, *, upgrade: bool) -> None:
    """Refuse a newer schema; bring an older or empty one to head when `upgrade` is set."""
    rev = schema_revision(engine)
    _check_known(rev, str(engine.url))
    if rev == HEAD:
        return
    if not upgrade:
        raise StoreError(
            f"database {_redact(str(engine.url))} is at schema revision {rev or 'none'}, "
            f"not {HEAD}: run `convo db upgrade`"
        )
    upgrade_schema(engine)


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Run the migrations on convo's own connection, serialized against other processes."""
    _run_alembic(engine, "upgrade", revision)


def downgrade_schema(engine: Engine, revision: str) -> None:
    _run_alembic(engine, "downgrade", revision)


def migrations_dir() -> Path:
    """Alembic's tree: shipped as convo.migrations, or migrations/ beside a source checkout."""
    try:
        return Path(str(resources.files("convo.migrations")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _run_alembic(engine: Engine, verb: str, revision: str) -> None:
    from alembic import command

    with write(engine) as conn:
        if conn.dialect.name == "postgresql":
            # Two processes upgrading at once: the second waits here, then finds head.
            conn.execute(text("SELECT pg_advisory_xact_lock(7219004137)"))
        # (On SQLite, BEGIN IMMEDIATE already holds the write lock.)
        rev = current_revision(conn)
        _check_known(rev, str(engine.url))
        if verb == "upgrade" and revision == "head" and rev == HEAD:
            return
        getattr(command, verb)(alembic_config(conn), revision)
