"""Connections, engines, transactions and schema upgrades for SQLite and PostgreSQL.

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
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Dialect, make_url

from convo.errors import ConfigError, DatabaseUnavailable, NotFound, SchemaTooNew, StoreError
from convo.models import to_micros

# The newest revision this convo knows; a database at another unknown revision is newer.
HEAD = "0005"
KNOWN_REVISIONS = ("0001", "0002", "0003", "0004", "0005")
SQLITE_BUSY_TIMEOUT_MS = 30_000
# A pooled PostgreSQL connection idle longer than this is pinged before use (see _install_pg_hooks).
PING_AFTER_IDLE_SECONDS = 1.0
# Connections a Database opens before it has an engine (SQLAlchemy's default pool size).
POOL_SIZE = 5
# How long a write whose connection was lost waits for the server to end the statement it may
# still be running (see `write_once`) before giving up on telling whether it was written.
ORPHAN_WAIT_SECONDS = 10.0
_WRITE = "convo_write"


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def _prepare_sqlite_file(path: str) -> None:
    """Create the database file (and its directory) readable by the owner only."""
    if path in ("", ":memory:") or path.startswith("file:") or os.path.exists(path):
        return
    p = Path(path).expanduser()
    if not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    if not p.exists():
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def _sqlite_file(path: str, url: str) -> None:
    try:
        _prepare_sqlite_file(path)
    except OSError as e:
        raise DatabaseUnavailable(f"cannot create database {_redact(url)}: {e.strerror or e}") from None


def _plain_sqlite_path(url: str) -> str | None:
    """The file of a `sqlite:///path` URL with nothing in it for SQLAlchemy to decode (no
    query, fragment or %-escape), `~` expanded; None for any other URL (make_url's)."""
    if not url.startswith("sqlite:///") or any(c in url for c in "?#%"):
        return None
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:":
        return None  # refused by _parse, with its message
    return os.path.expanduser(path) if path.startswith("~") else path


def _parse(url: str) -> URL:
    """A convo database URL, checked: `sqlite:///path` or `postgresql[+psycopg|+psycopg2]://...`
    (a SQLite file is created, owner-only, if missing)."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):  # ValueError: a non-numeric port
        raise ConfigError(f"not a database URL: {_redact(url)}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:":
            # An in-memory database is private to one connection (convo uses several: each
            # would see an empty one) and is lost on exit.
            raise ConfigError("a sqlite URL needs a file path: sqlite:///path/to/convo.db")
        if database.startswith("~"):
            # Expand here, so the file prepared below is the very one SQLite opens.
            parsed = parsed.set(database=os.path.expanduser(database))
        _sqlite_file(parsed.database or "", url)
        return parsed
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
        return parsed
    raise ConfigError(f"unsupported database {backend!r}: use sqlite or postgresql")


class Database:
    """One convo database: how to open a driver connection to it, and the SQLAlchemy engine
    over those same connections, built the first time something needs one.

    A Store that resumes a thread or sends a turn never builds the engine: building one and
    its first connect (on PostgreSQL six round trips of dialect set-up, on SQLite more time
    than reading a short thread) were the largest part of a fresh Store's resume. `Reader` and
    `Writer` run on up to POOL_SIZE driver connections kept here; past that, or once other
    code needs SQLAlchemy, the engine's pool takes over, starting with those connections."""

    def __init__(self, url: str) -> None:
        self._engine_args: dict[str, Any] = {}
        path = _plain_sqlite_path(url)
        if path is not None:
            # The embedded default: no SQLAlchemy URL or dialect until an engine is needed
            # (after the collector has run, building them costs a fresh Store more than its
            # first read does). The connect arguments are the pysqlite dialect's own.
            self.name = "sqlite"
            self._text = url
            self._url: URL | None = None
            self._path = path
            _sqlite_file(path, url)
            self.dbapi: Any = sqlite3
            self._cargs: list[Any] = [os.path.abspath(path)]
            self._cparams: dict[str, Any] = {"check_same_thread": False}
        else:
            self._url = _parse(url)
            self.name = self._url.get_backend_name()
            try:
                self.dbapi = self._url.get_dialect().import_dbapi()
            except ImportError as e:  # a dialect SQLAlchemy knows whose driver is not installed
                raise ConfigError(
                    f"{_redact(url)}: its driver is not installed ({_first_line(e)})"
                ) from None
            if self.name == "postgresql":
                # No hstore: convo never uses it, and looking its type up costs every new
                # engine a query (a third of a CLI command's connect time).
                self._engine_args["use_native_hstore"] = False
            cargs, cparams = self.dialect.create_connect_args(self._url)
            self._cargs, self._cparams = list(cargs), dict(cparams)
        if self.name == "sqlite":
            self._cparams["timeout"] = SQLITE_BUSY_TIMEOUT_MS / 1000
        self.Error: Any = self.dbapi.Error  # the driver's base exception class
        self._engine: Engine | None = None
        self._idle: list[tuple[float, Any]] = []  # (since, driver connection), not in use
        self._lent = 0  # connections of `_idle`'s kind in use
        self._lock = threading.Lock()
        self._closed = False  # connections given back from now on are closed, not kept

    @property
    def url(self) -> URL:
        if self._url is None:  # as _parse has it: `~` expanded
            self._url = make_url(self._text).set(database=self._path)
        return self._url

    @cached_property
    def dialect(self) -> Dialect:
        """A dialect of the engine's kind (the engine builds its own): it opens the connections
        made before the engine and knows the driver's lost-connection errors."""
        cls: Any = self.url.get_dialect()
        dialect: Dialect = cls(dbapi=self.dbapi, **self._engine_args)
        return dialect

    @property
    def engine_built(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = self._build_engine()
        return self._engine

    def _build_engine(self) -> Engine:
        engine = create_engine(self.url, creator=self._pool_connection, **self._engine_args)
        if self.name == "sqlite":
            _install_sqlite_hooks(engine)
        else:
            _install_pg_hooks(engine)
        return engine

    def connect(self) -> Any:
        """A new driver connection, set up as convo uses every one (raises the driver's error)."""
        conn = self.dbapi.connect(*self._cargs, **self._cparams)
        if self.name == "sqlite":
            try:
                _set_up_sqlite(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _pool_connection(self) -> Any:
        """The engine pool's creator: a connection the reads left idle, else a new one."""
        while True:
            with self._lock:
                if not self._idle:
                    break
                since, conn = self._idle.pop()
            if self.name == "sqlite" or time.monotonic() - since <= PING_AFTER_IDLE_SECONDS:
                return conn
            try:
                self.dialect.do_ping(conn)
                return conn
            except self.Error:
                _close_quietly(conn)
        return self.connect()

    def lend(self) -> tuple[Any, Any]:
        """(the pool's wrapper or None, a driver connection) for one Reader or Writer: before
        the engine exists, one kept here, as long as fewer than POOL_SIZE are out; past that
        (or once the engine exists) the engine's pool's, which caps and queues the rest."""
        if self._engine is None:
            with self._lock:
                if self._idle:
                    self._lent += 1
                    return None, self._idle.pop()[1]
                fresh = self._lent < POOL_SIZE
                if fresh:
                    self._lent += 1
            if fresh:
                try:
                    return None, self.connect()
                except BaseException:
                    with self._lock:
                        self._lent -= 1
                    raise
        proxy = self.engine.raw_connection()
        return proxy, proxy.driver_connection

    def give_back(self, proxy: Any, conn: Any, error: BaseException | None = None) -> None:
        """Return what `lend` gave; with `error` (the connection is lost), throw it away and
        the idle ones with it: a restarted server drops them all."""
        if proxy is not None:
            if self._closed and error is None:
                proxy.invalidate()  # (the pool was disposed: nothing would close it later)
            if error is not None:
                # Every connection the pool opened before now is replaced at its next checkout
                # (what SQLAlchemy's own Connection does on a disconnect), the pool's counts
                # of connections other threads hold left as they are.
                self.engine.pool._invalidate(proxy, error)
            proxy.close()
        else:
            with self._lock:
                self._lent -= 1
                keep = error is None and self._engine is None and not self._closed
                if keep:
                    self._idle.append((time.monotonic(), conn))
            if not keep:  # lost, or the engine's pool keeps the connections from now on
                _close_quietly(conn)
        if error is not None:
            self._drop_idle()

    def lost(self, e: Any, conn: Any, cur: Any) -> bool:
        """Whether `e` says the connection is gone. SQLAlchemy's psycopg check reads the
        connection's closed/broken flags, which psycopg may not have set yet when it finds the
        socket already closed: an OperationalError without a SQLSTATE never came from the
        server, so it is the connection itself that failed."""
        if self.dialect.is_disconnect(e, conn, cur):
            return True
        if self.name != "postgresql" or not isinstance(e, self.dbapi.OperationalError):
            return False
        return not (getattr(e, "sqlstate", None) or getattr(e, "pgcode", None))

    def close(self) -> None:
        """Close every connection not in use (the engine's pooled ones too), and each one in
        use when it is given back (a send finishing in another thread)."""
        self._closed = True
        self._drop_idle()
        if self._engine is not None:
            # Engine.dispose would also build a new, empty pool that nothing may use.
            self._engine.pool.dispose()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _since, conn in idle:
            _close_quietly(conn)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # already gone: nothing left to release
        pass


def create_engine_for(url: str) -> Engine:
    """An engine for a convo database URL (for callers that need no more than one)."""
    return Database(url).engine


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


def _set_up_sqlite(conn: Any) -> None:
    # Let convo, not the driver, decide when a transaction starts (see the `begin` hook).
    conn.isolation_level = None
    cur = conn.cursor()
    # (The busy timeout is the driver's `timeout` argument: see Database.)
    cur.execute("PRAGMA foreign_keys = ON")
    _enable_wal(cur)
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get(_WRITE) else "BEGIN")


@contextmanager
def write(engine: Engine, *, autocommit: bool = False) -> Iterator[Connection]:
    """One write transaction: committed on success, rolled back on any error. `autocommit`:
    none, each statement its own (for work whose only write is one statement)."""
    with _connect(engine) as conn:
        if autocommit:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn
            return
        conn.info[_WRITE] = True
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info.pop(_WRITE, None)


@contextmanager
def read(engine: Engine, *, repeatable: bool = False) -> Iterator[Connection]:
    """One read-only transaction. On SQLite (WAL) it sees one snapshot whatever it reads; on
    PostgreSQL each statement sees its own moment unless `repeatable` asks for one snapshot
    for the whole transaction (REPEATABLE READ, which a read-only transaction never fails)."""
    with _connect(engine) as conn:
        if repeatable and engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
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
        raise _refused(e.orig or e) from None
    finally:
        conn.close()


class Reader:
    """Single-statement reads on a driver connection, in autocommit.

    For the few fixed statements a resume runs (the schema check, the conversation lookup, the
    snapshot and the path). A fresh Store would otherwise pay for a SQLAlchemy Connection, a
    transaction begun and ended, a statement compiled into its new engine's empty cache and a
    Result per statement: on a 10-exchange thread that cost more than reading it. Each
    statement is its own consistent read, so callers that read twice must tolerate a writer in
    between (the store's path reads check what they got). A read that finds its connection
    lost (a restarted server) is run again, once, on a new one."""

    _autocommit = True

    def __init__(self, database: Database) -> None:
        self._db = database
        self._proxy: Any = None  # the pool's wrapper, when the engine lent the connection
        self._conn: Any = None
        self._cur: Any = None
        self._checkout()

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        return self._run(sql, params, many=True)  # type: ignore[no-any-return]

    def first(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._run(sql, params, many=False)

    def _run(self, sql: str, params: Mapping[str, Any] | None, *, many: bool | None) -> Any:
        """The statement's rows (`many`), first row, or (`many` None) the rows it changed."""
        sql = _paramstyle(sql, self._db.name)
        for retry in (False, True):
            try:
                self._cur.execute(sql, params or {})
                if many is None:
                    return self._cur.rowcount
                return self._cur.fetchall() if many else self._cur.fetchone()
            except self._db.Error as e:
                if retry or not self._may_retry() or not self._db.lost(e, self._conn, self._cur):
                    raise
                self._lost(e)
        raise AssertionError("unreachable")

    def _lost(self, e: Exception) -> None:
        """Throw the lost connection away (with the idle ones) and take a new one."""
        self._discard(e)
        self._checkout()

    def _discard(self, e: Exception) -> None:
        proxy, conn = self._proxy, self._conn
        self._proxy = self._conn = self._cur = None
        self._db.give_back(proxy, conn, error=e)

    def _may_retry(self) -> bool:
        return True

    def _checkout(self) -> None:
        try:
            self._proxy, self._conn = self._db.lend()
        except (sa_exc.DBAPIError, self._db.Error) as e:
            # The pool passes on the driver's own error (SQLAlchemy's, if it wrapped one).
            raise DatabaseUnavailable(
                f"cannot open database {_redact(str(self._db.url))}: "
                f"{_first_line(getattr(e, 'orig', e))}"
            ) from None
        try:
            if self._db.name == "postgresql" and self._autocommit:
                # No BEGIN and ROLLBACK round trips around a single statement (a local
                # setting of the connection, put back by `close`).
                self._conn.autocommit = True
            self._cur = self._conn.cursor()
            self._begin()
        except BaseException:
            self.close()
            raise

    def _begin(self) -> None:
        pass

    def close(self) -> None:
        proxy, conn, cur = self._proxy, self._conn, self._cur
        self._proxy = self._conn = self._cur = None
        if conn is None:
            return
        if proxy is not None and not proxy.is_valid:
            proxy.close()  # invalidated: the pool has already let it go
            return
        try:
            if cur is not None:
                cur.close()
            if self._db.name == "postgresql":
                conn.autocommit = False
        except self._db.Error as e:  # lost meanwhile
            self._db.give_back(proxy, conn, error=e)
            return
        self._db.give_back(proxy, conn)


class Writer(Reader):
    """One write transaction of SQL text on a driver connection, for a send's two writes.

    SQLAlchemy's work around each statement (finding the compiled form, an execution context,
    a Result) costs SQLite four times what running the statement does, and a send writes ten.
    BEGIN IMMEDIATE on SQLite (see the module's docstring); on PostgreSQL the driver begins
    before the first statement. A first statement that finds its connection lost (nothing is
    written yet) runs again, once, on a new one."""

    _autocommit = False

    def __init__(self, database: Database) -> None:
        self._done = False  # a statement ran: the transaction holds work (no retry past it)
        self._open = False
        super().__init__(database)

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Run a statement; the number of rows it changed."""
        return int(self._run(sql, params, many=None))

    def _run(self, sql: str, params: Mapping[str, Any] | None, *, many: bool | None) -> Any:
        if params:
            params = bind(params, self._db.name)
        result = super()._run(sql, params, many=many)
        self._done = True
        return result

    def _may_retry(self) -> bool:
        return not self._done

    def _begin(self) -> None:
        if self._db.name == "sqlite":
            self._cur.execute("BEGIN IMMEDIATE")
        self._open = True

    def commit(self) -> None:
        if self._db.name == "sqlite":
            self._cur.execute("COMMIT")
        else:
            self._conn.commit()
        self._open = False

    def close(self) -> None:
        if self._open and self._conn is not None:
            self._open = False
            try:
                if self._db.name == "sqlite":
                    self._cur.execute("ROLLBACK")
                else:
                    self._conn.rollback()
            except self._db.Error as e:  # lost: the server has rolled it back
                self._discard(e)
                return
        super().close()


class _Once(Reader):
    """A Reader whose statement is not run again by itself: see `write_once`."""

    def _may_retry(self) -> bool:
        return False


def write_once(
    database: Database,
    sql: str,
    params: Mapping[str, Any],
    landed: Callable[[Reader, Mapping[str, Any]], Any],
) -> Any:
    """One write statement in autocommit on PostgreSQL, its first row: the statement is its own
    transaction, with no BEGIN or COMMIT round trips around it.

    A statement whose connection is lost may or may not have committed, so it is not simply
    run again. When only the client's side was cut (a network or a proxy failing), the server
    may still be running it, waiting on a lock, and commit later: so on a new connection its
    server process is ended first and waited for, then `landed(reader, bound parameters)` looks
    for what the statement would have written (as its first row, or None), and the statement
    runs again only if that finds nothing."""
    bound = bind(params, database.name)
    w = _Once(database)
    try:
        pid = _backend_pid(w._conn)
        try:
            return w.first(sql, bound)
        except database.Error as e:
            if not database.lost(e, w._conn, w._cur):
                raise
            w._lost(e)
            _end_orphan(w, pid, sql)
            found = landed(w, bound)
            return found if found is not None else w.first(sql, bound)
    except database.Error as e:
        raise _store_error(database, e) from _cause(database, e)
    finally:
        w.close()


def _backend_pid(conn: Any) -> int:
    """The PostgreSQL server process behind a psycopg or psycopg2 connection (no round trip)."""
    info = getattr(conn, "info", None)
    pid = getattr(info, "backend_pid", None)
    return int(pid if pid is not None else conn.get_backend_pid())


def _end_orphan(r: Reader, pid: int, sql: str) -> None:
    """End server process `pid` if it is still running `sql` for a client that is gone, and
    wait until it has ended: then what it wrote, or did not, is final. (Only a process whose
    current statement begins as `sql` does is ended, whatever became of the pid.)"""
    prefix = sql.split(":", 1)[0][:60]
    r.first(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE pid = :pid AND left(query, :n) = :prefix",
        {"pid": pid, "n": len(prefix), "prefix": prefix},
    )
    deadline = time.monotonic() + ORPHAN_WAIT_SECONDS
    while r.first("SELECT 1 FROM pg_stat_activity WHERE pid = :pid", {"pid": pid}) is not None:
        if time.monotonic() > deadline:
            raise StoreError(
                "the database connection was lost during a write, and the server is still "
                "running it: whether it was stored is not known yet; reload and check"
            )
        time.sleep(0.01)


class OnConnection:
    """A SQLAlchemy Connection with a Writer's three methods, so that a helper written once in
    SQL text runs inside a `Writer` transaction or inside one of `write` (off the hot path)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._dialect = conn.dialect.name

    def first(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._execute(sql, params).first()

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        return list(self._execute(sql, params).all())

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._execute(sql, params)

    def _execute(self, sql: str, params: Mapping[str, Any] | None) -> Any:
        d = self._dialect
        return self._conn.exec_driver_sql(
            _paramstyle(sql, d), bind(params or {}, d)
        )


class Bound(dict[str, Any]):
    """Parameters `bind` has converted already: the statements of one write share them."""


def bind(params: Mapping[str, Any], dialect: str) -> Bound:
    """Parameters as the Timestamp column type binds them: instants in UTC, as integer
    microseconds on SQLite (a naive datetime is UTC). Everything else as it is."""
    if isinstance(params, Bound):
        return params
    return Bound({k: _instant(v, dialect) if isinstance(v, datetime) else v for k, v in params.items()})


def _instant(value: datetime, dialect: str) -> Any:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return to_micros(value) if dialect == "sqlite" else value


@lru_cache(maxsize=64)
def _paramstyle(sql: str, dialect: str) -> str:
    """`:name` parameters (sqlite3's named style) as `%(name)s` for psycopg and psycopg2."""
    if dialect == "sqlite":
        return sql
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql.replace("%", "%%"))


@contextmanager
def reader(database: Database) -> Iterator[Reader]:
    """A `Reader` on one of the database's connections, returned after."""
    r = Reader(database)
    try:
        yield r
    except database.Error as e:
        raise StoreError(f"database error: {_first_line(e)}") from e
    finally:
        r.close()


@contextmanager
def writer(database: Database) -> Iterator[Writer]:
    """One `Writer` transaction: committed on success, rolled back on any error."""
    try:
        w = Writer(database)
    except database.Error as e:  # BEGIN IMMEDIATE found the database locked past the timeout
        raise _store_error(database, e) from _cause(database, e)
    try:
        yield w
        w.commit()
    except database.Error as e:
        raise _store_error(database, e) from _cause(database, e)
    finally:
        w.close()


def _store_error(database: Database, e: Exception) -> StoreError | NotFound:
    """A driver's error as the one line convo reports (never the SQL itself)."""
    if _cause(database, e) is None:
        return _refused(e)
    return StoreError(f"database error: {_first_line(e)}")


def _refused(e: Exception) -> StoreError | NotFound:
    """A value the database refused. A row written for a conversation that a delete removed
    meanwhile (the writer waited for the delete, on PostgreSQL) is NotFound, as it would have
    been a moment later."""
    name = getattr(getattr(e, "diag", None), "constraint_name", None) or ""
    if name.startswith("fk_") and name.endswith("_conversation_key_conversations"):
        return NotFound("the conversation was deleted while this was being written; nothing was written")
    return StoreError(f"the database refused a value: {_first_line(e)}")


def _cause(database: Database, e: Exception) -> Exception | None:
    """What a StoreError keeps as its cause: not a refused value's error, whose text can
    quote the statement with the values bound (as `_connect` does for SQLAlchemy's)."""
    dbapi = database.dbapi
    return None if isinstance(e, dbapi.IntegrityError | dbapi.DataError) else e


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


def schema_revision(database: Database) -> str | None:
    """The Alembic revision, in one statement on the driver (every Store opens with this)."""
    with reader(database) as r:
        try:
            row = r.first("SELECT version_num FROM alembic_version")
        except database.Error as e:
            # No such table: a database convo never touched (autocommit: nothing to undo).
            # SQLSTATE 42P01 is psycopg's e.sqlstate, psycopg2's e.pgcode.
            code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
            if code == "42P01" or "no such table" in str(e):
                return None
            raise
    return row[0] if row else None


def ensure_schema(database: Database, *, upgrade: bool) -> None:
    """Refuse a newer schema; bring an older or empty one to head when `upgrade` is set."""
    rev = schema_revision(database)
    if rev == HEAD:  # (the URL is built for a message only: a fresh Store needs none)
        return
    _check_known(rev, str(database.url))
    if not upgrade:
        raise StoreError(
            f"database {_redact(str(database.url))} is at schema revision {rev or 'none'}, "
            f"not {HEAD}: {upgrade_hint(str(database.url))}"
        )
    upgrade_schema(database.engine)


def upgrade_hint(url: str) -> str:
    """How to upgrade this very database: `convo db upgrade` alone would open the default one."""
    return f"run `convo --db {_redact(url)} db upgrade` (or open it with Store(url, upgrade=True))"


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


def hold_migration_lock(conn: Connection) -> None:
    """Until the transaction ends, be the only one migrating this database: two processes
    upgrading at once, the second waits here, then finds head. (On SQLite, convo's
    BEGIN IMMEDIATE already holds the write lock.)"""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(7219004137)"))


def _run_alembic(engine: Engine, verb: str, revision: str) -> None:
    from alembic import command

    with write(engine) as conn:
        hold_migration_lock(conn)
        rev = current_revision(conn)
        _check_known(rev, str(engine.url))
        if verb == "upgrade" and revision == "head" and rev == HEAD:
            return
        getattr(command, verb)(alembic_config(conn), revision)
