"""Alembic migrations on both engines: a fresh SQLite file in tmp_path and a fresh PostgreSQL
database (`fresh_pg_url`), never the shared, already migrated test databases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from convo import Store, db
from convo.errors import SchemaTooNew, StoreError
from convo.models import Base

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The `alembic` script installed next to the interpreter running the suite (whatever venv CI made).
ALEMBIC = str(Path(sys.executable).parent / "alembic")
MODEL_TABLES = set(Base.metadata.tables)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with nothing in it, on each engine."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("fresh_pg_url")


@pytest.fixture
def engine(empty_url: str) -> Iterator[Engine]:
    e = db.create_engine_for(empty_url)
    yield e
    e.dispose()


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(db.alembic_config())


def schema(e: Engine) -> dict[str, Any]:
    """Everything the migrations define, as comparable data."""
    out: dict[str, Any] = {}
    with e.connect() as conn:
        insp = inspect(conn)
        for table in sorted(insp.get_table_names()):
            out[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                    for c in insp.get_columns(table)
                ],
                "pk": insp.get_pk_constraint(table),
                "fks": sorted(insp.get_foreign_keys(table), key=lambda f: str(f["name"])),
                "indexes": sorted(insp.get_indexes(table), key=lambda i: str(i["name"])),
                "uniques": sorted(insp.get_unique_constraints(table), key=lambda u: str(u["name"])),
            }
    return out


def data(e: Engine) -> dict[str, list[Any]]:
    with e.connect() as conn:
        tables = inspect(conn).get_table_names()
        return {
            t: sorted(map(tuple, conn.execute(text(f'SELECT * FROM "{t}"')).all()), key=repr)
            for t in sorted(tables)
        }


def model_diff(e: Engine) -> list[Any]:
    with e.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return compare_metadata(ctx, Base.metadata)


# -- the revision graph --------------------------------------------------------------------------


def test_single_head_and_it_is_the_head_convo_knows() -> None:
    s = script()
    assert s.get_heads() == [db.HEAD]
    assert len(s.get_bases()) == 1
    revisions = [r.revision for r in s.walk_revisions()]
    assert sorted(revisions) == sorted(db.KNOWN_REVISIONS)
    assert len(set(revisions)) == len(revisions)


# -- upgrading -----------------------------------------------------------------------------------


def test_empty_database_upgrades_to_head_and_matches_the_models(engine: Engine) -> None:
    assert db.schema_revision(engine) is None
    db.upgrade_schema(engine)
    assert db.schema_revision(engine) == db.HEAD
    assert set(schema(engine)) == MODEL_TABLES | {"alembic_version"}
    assert model_diff(engine) == []


def test_models_and_migrations_differ_is_detected(engine: Engine) -> None:
    """compare_metadata is not blind: drop an index and it is reported."""
    db.upgrade_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_calls_reply_id"))
    diff = model_diff(engine)
    assert any(d[0] == "add_index" and d[1].name == "ix_calls_reply_id" for d in diff)


def test_every_revision_down_to_base_and_up_again(engine: Engine) -> None:
    db.upgrade_schema(engine)
    head_schema = schema(engine)
    chain = list(reversed([r for r in script().walk_revisions()]))  # base first
    # Down, one revision at a time.
    for rev in reversed(chain):
        down = rev.down_revision
        assert down is None or isinstance(down, str)  # a straight line, no merges
        db.downgrade_schema(engine, down or "base")
        assert db.schema_revision(engine) == down
    assert set(schema(engine)) <= {"alembic_version"}
    with pytest.raises(StoreError):
        db.ensure_schema(engine, upgrade=False)
    # And up again, one at a time.
    for rev in chain:
        db.upgrade_schema(engine, rev.revision)
        assert db.schema_revision(engine) == rev.revision
    assert schema(engine) == head_schema
    assert model_diff(engine) == []


def test_upgrading_twice_changes_nothing(empty_url: str, engine: Engine) -> None:
    db.upgrade_schema(engine)
    with Store(empty_url, upgrade=True) as s:
        c = s.create("claude-sonnet-4-5", title="kept")
        c.add_user("hello")
    before = (schema(engine), data(engine))
    db.upgrade_schema(engine)
    db.ensure_schema(engine, upgrade=True)
    with Store(empty_url, upgrade=True) as s:
        assert [x.title for x in s.list()] == ["kept"]
    assert (schema(engine), data(engine)) == before
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
            db.HEAD
        ]


def test_unknown_revision_is_schema_too_new_and_nothing_is_altered(
    empty_url: str, engine: Engine
) -> None:
    db.upgrade_schema(engine)
    with Store(empty_url, upgrade=True) as s:
        s.create("claude-sonnet-4-5").add_user("from the future's point of view, old data")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    before = (schema(engine), data(engine))
    for upgrade in (None, True, False):
        with pytest.raises(SchemaTooNew) as exc:
            Store(empty_url, upgrade=upgrade)
        assert "9999" in str(exc.value)
        assert "\n" not in str(exc.value)
    with pytest.raises(SchemaTooNew):
        db.upgrade_schema(engine)
    with pytest.raises(SchemaTooNew):
        db.downgrade_schema(engine, "base")
    assert (schema(engine), data(engine)) == before


# -- two processes at once -------------------------------------------------------------------------

RACE = textwrap.dedent(
    """
    import sys, time
    import alembic.command  # imported before the start signal, so both start at once
    from convo import db
    from convo.service import Store
    url, how = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    sys.stdin.readline()
    began = time.monotonic()
    if how == "store":
        with Store(url, upgrade=True) as s:
            s.create("claude-sonnet-4-5").add_user("hi")
    else:
        engine = db.create_engine_for(url)
        db.upgrade_schema(engine)
        engine.dispose()
    print("done", began, time.monotonic(), flush=True)
    """
)


def _race(url: str, how: str, n: int = 2) -> list[tuple[float, float]]:
    """Run `n` processes that start together; return each one's (start, end) times."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", RACE, url, how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", p.stderr.read() if p.stderr else line
        for p in procs:  # release them together
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    spans = []
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        word, began, ended = out.split()
        assert word == "done"
        spans.append((float(began), float(ended)))
    return spans


@pytest.mark.parametrize("how", ["upgrade", "store"])
def test_two_processes_upgrading_at_once(empty_url: str, how: str) -> None:
    spans = _race(empty_url, how)
    # They really ran at the same time (time.monotonic is system-wide on Linux).
    assert max(b for b, _ in spans) < min(e for _, e in spans)
    e = db.create_engine_for(empty_url)
    try:
        assert db.schema_revision(e) == db.HEAD
        with e.connect() as conn:
            assert conn.execute(
                text("SELECT version_num FROM alembic_version")
            ).scalars().all() == [db.HEAD]
        assert set(schema(e)) == MODEL_TABLES | {"alembic_version"}
        assert model_diff(e) == []
        if how == "store":
            with e.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM conversations")).scalar_one() == 2
                assert conn.execute(text("SELECT count(*) FROM turns")).scalar_one() == 2
    finally:
        e.dispose()


# -- the alembic command line ------------------------------------------------------------------------


def _alembic(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ALEMBIC, *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def test_alembic_command_line_from_the_repo_root(empty_url: str) -> None:
    up = _alembic("-x", f"url={empty_url}", "upgrade", "head")
    assert up.returncode == 0, up.stderr
    e = db.create_engine_for(empty_url)
    try:
        assert db.schema_revision(e) == db.HEAD
        assert model_diff(e) == []
        current = _alembic("-x", f"url={empty_url}", "current")
        assert current.returncode == 0, current.stderr
        assert db.HEAD in current.stdout
        down = _alembic("-x", f"url={empty_url}", "downgrade", "base")
        assert down.returncode == 0, down.stderr
        assert db.schema_revision(e) is None
        assert set(schema(e)) <= {"alembic_version"}
    finally:
        e.dispose()


def test_alembic_command_line_uses_convo_database_url(tmp_path: Path) -> None:
    target = tmp_path / "from-env.db"
    env = {**os.environ, "CONVO_DATABASE_URL": f"sqlite:///{target}"}
    done = subprocess.run(
        [ALEMBIC, "upgrade", "head"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    e = db.create_engine_for(f"sqlite:///{target}")
    try:
        assert db.schema_revision(e) == db.HEAD
    finally:
        e.dispose()
