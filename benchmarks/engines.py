"""Where each case's two databases live, and how big they are on disk.

SQLite: two files per case in a scratch directory, removed after the case. PostgreSQL: two
databases (convo_bench_<pid>, floor_bench_<pid>) created through the admin URL
($CONVO_BENCH_POSTGRES_URL), emptied between cases and dropped at the end of the run.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url

from benchmarks.data import MAX_TOKENS, MODEL
from benchmarks.floor import Floor

PG_ADMIN_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_ENV = "CONVO_BENCH_POSTGRES_URL"


def pg_admin_url() -> str:
    return os.environ.get(PG_ENV) or PG_ADMIN_DEFAULT


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as a libpq conninfo URL for plain psycopg."""
    u = make_url(url).set(drivername="postgresql")
    return u.render_as_string(hide_password=False)


@dataclass
class Case:
    engine: str
    name: str
    convo_url: str
    floor: Floor
    _cleanup: Any

    def close(self) -> None:
        self._cleanup()


class SQLiteEngine:
    name = "sqlite"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="convo-bench-")

    def version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}"

    def case(self, name: str) -> Case:
        slug = re.sub(r"\W+", "_", name)
        convo_path = os.path.join(self.dir, f"convo_{slug}.db")
        floor_path = os.path.join(self.dir, f"floor_{slug}.db")
        for p in (convo_path, floor_path):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(p + suffix):
                    os.remove(p + suffix)
        floor = Floor("sqlite", floor_path, model=MODEL, max_tokens=MAX_TOKENS)

        def cleanup() -> None:
            for p in (convo_path, floor_path):
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(p + suffix):
                        os.remove(p + suffix)

        return Case(self.name, name, f"sqlite:///{convo_path}", floor, cleanup)

    def convo_size(self, case: Case) -> int:
        path = make_url(case.convo_url).database or ""
        return _sqlite_size(path)

    def floor_size(self, case: Case) -> int:
        return _sqlite_size(case.floor.target)

    def analyze(self, case: Case) -> None:
        for path in (make_url(case.convo_url).database or "", case.floor.target):
            conn = sqlite3.connect(path)
            try:
                conn.execute("ANALYZE")
                conn.commit()
            finally:
                conn.close()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _sqlite_size(path: str) -> int:
    """File bytes after a full WAL checkpoint (the WAL is then empty)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    size = os.path.getsize(path)
    if os.path.exists(path + "-wal"):
        size += os.path.getsize(path + "-wal")
    return size


class PGEngine:
    name = "postgresql"

    def __init__(self) -> None:
        import psycopg

        self.admin_url = pg_admin_url()
        self.admin = _libpq(self.admin_url)
        self._psycopg = psycopg
        with psycopg.connect(self.admin, autocommit=True) as conn:
            self._version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        self._dbs: tuple[str, str, str, str] | None = None

    def version(self) -> str:
        return f"PostgreSQL {self._version}"

    def _create(self, db: str) -> str:
        with self._psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db}"')
        return make_url(self.admin_url).set(database=db).render_as_string(hide_password=False)

    def _drop(self, db: str) -> None:
        with self._psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    def case(self, name: str) -> Case:
        """The two databases, emptied: created once per run (CREATE/DROP DATABASE take seconds
        each), their tables truncated (convo) or dropped (floor) between cases."""
        if self._dbs is None:
            convo_db, floor_db = f"convo_bench_{os.getpid()}", f"floor_bench_{os.getpid()}"
            self._dbs = (convo_db, self._create(convo_db), floor_db, self._create(floor_db))
        convo_db, convo_url, floor_db, floor_url = self._dbs
        with self._psycopg.connect(_libpq(convo_url), autocommit=True) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )]
            if tables:
                conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        with self._psycopg.connect(_libpq(floor_url), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS turns")
        floor = Floor("pg", _libpq(floor_url), model=MODEL, max_tokens=MAX_TOKENS)
        return Case(self.name, name, convo_url, floor, lambda: None)

    def _size(self, conninfo: str) -> int:
        """Bytes of every table in `public` with its indexes and TOAST (catalogs excluded)."""
        with self._psycopg.connect(conninfo) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r'"
            ).fetchone()
        return int(row[0]) if row else 0

    def convo_size(self, case: Case) -> int:
        return self._size(_libpq(case.convo_url))

    def floor_size(self, case: Case) -> int:
        return self._size(case.floor.target)

    def analyze(self, case: Case) -> None:
        for conninfo in (_libpq(case.convo_url), case.floor.target):
            with self._psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")

    def close(self) -> None:
        if self._dbs is not None:
            self._drop(self._dbs[0])
            self._drop(self._dbs[2])
            self._dbs = None
