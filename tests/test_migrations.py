"""Alembic migrations on both engines: a fresh SQLite file in tmp_path and a fresh PostgreSQL
database (`fresh_pg_url`), never the shared, already migrated test databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from convo import Store, db
from convo.errors import SchemaTooNew, StoreError
from convo.models import Base
from convo.store import NewTurn

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
def database(empty_url: str) -> Iterator[db.Database]:
    d = db.Database(empty_url)
    yield d
    d.close()


@pytest.fixture
def engine(database: db.Database) -> Engine:
    return database.engine


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


def test_empty_database_upgrades_to_head_and_matches_the_models(engine: Engine, database: db.Database) -> None:
    assert db.schema_revision(database) is None
    db.upgrade_schema(engine)
    assert db.schema_revision(database) == db.HEAD
    assert set(schema(engine)) == MODEL_TABLES | {"alembic_version"}
    assert model_diff(engine) == []


def test_models_and_migrations_differ_is_detected(engine: Engine) -> None:
    """compare_metadata is not blind: drop an index and it is reported."""
    db.upgrade_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_calls_started_at"))
    diff = model_diff(engine)
    assert any(d[0] == "add_index" and d[1].name == "ix_calls_started_at" for d in diff)



def unindexed_foreign_keys(e: Engine) -> list[tuple[str, list[str]]]:
    """Foreign keys whose columns lead no index, primary key or unique constraint of their
    table: deleting a row they refer to then scans that whole table once per deleted row."""
    missing = []
    with e.connect() as conn:
        insp = inspect(conn)
        for table in insp.get_table_names():
            leads = [insp.get_pk_constraint(table)["constrained_columns"]]
            leads += [[str(c) for c in i["column_names"]] for i in insp.get_indexes(table)]
            leads += [u["column_names"] for u in insp.get_unique_constraints(table)]
            for fk in insp.get_foreign_keys(table):
                cols = fk["constrained_columns"]
                if not any(cols == lead[: len(cols)] for lead in leads):
                    missing.append((table, cols))
    return missing


def test_every_foreign_key_is_indexed(engine: Engine) -> None:
    """Deleting a conversation deletes its turns, and each deleted turn is looked for in every
    table that refers to turns: without an index that is a scan of the whole store per turn
    (it was, for branches.head_id, until migration 0004)."""
    db.upgrade_schema(engine)
    assert unindexed_foreign_keys(engine) == []
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_branches_head_id"))
    assert unindexed_foreign_keys(engine) == [("branches", ["head_id"])]

def test_every_revision_down_to_base_and_up_again(engine: Engine, database: db.Database) -> None:
    db.upgrade_schema(engine)
    head_schema = schema(engine)
    chain = list(reversed([r for r in script().walk_revisions()]))  # base first
    # Down, one revision at a time.
    for rev in reversed(chain):
        down = rev.down_revision
        assert down is None or isinstance(down, str)  # a straight line, no merges
        db.downgrade_schema(engine, down or "base")
        assert db.schema_revision(database) == down
    assert set(schema(engine)) <= {"alembic_version"}
    with pytest.raises(StoreError):
        db.ensure_schema(database, upgrade=False)
    # And up again, one at a time.
    for rev in chain:
        db.upgrade_schema(engine, rev.revision)
        assert db.schema_revision(database) == rev.revision
    assert schema(engine) == head_schema
    assert model_diff(engine) == []


def test_upgrading_twice_changes_nothing(empty_url: str, engine: Engine, database: db.Database) -> None:
    db.upgrade_schema(engine)
    with Store(empty_url, upgrade=True) as s:
        c = s.create("claude-sonnet-4-5", title="kept")
        c.add_user("hello")
    before = (schema(engine), data(engine))
    db.upgrade_schema(engine)
    db.ensure_schema(database, upgrade=True)
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
    elif how == "alembic":
        import alembic.config
        alembic.config.main(argv=["-c", sys.argv[3], "-x", "url=" + url, "upgrade", "head"])
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
            [PYTHON, "-c", RACE, url, how, str(REPO / "alembic.ini")],
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


@pytest.mark.parametrize("how", ["upgrade", "store", "alembic"])
def test_two_processes_upgrading_at_once(empty_url: str, how: str) -> None:
    spans = _race(empty_url, how)
    # They really ran at the same time (time.monotonic is system-wide on Linux).
    assert max(b for b, _ in spans) < min(e for _, e in spans)
    d = db.Database(empty_url)
    e = d.engine
    try:
        assert db.schema_revision(d) == db.HEAD
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
        d.close()


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
    d = db.Database(empty_url)
    e = d.engine
    try:
        assert db.schema_revision(d) == db.HEAD
        assert model_diff(e) == []
        current = _alembic("-x", f"url={empty_url}", "current")
        assert current.returncode == 0, current.stderr
        assert db.HEAD in current.stdout
        down = _alembic("-x", f"url={empty_url}", "downgrade", "base")
        assert down.returncode == 0, down.stderr
        assert db.schema_revision(d) is None
        assert set(schema(e)) <= {"alembic_version"}
    finally:
        d.close()


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
    d = db.Database(f"sqlite:///{target}")
    try:
        assert db.schema_revision(d) == db.HEAD
    finally:
        d.close()


# -- data carried across 0003 (integer keys) -------------------------------------------------------

# A fraction of .9998 s: a conversion that rounds would carry it into the next second (and day).
T0 = datetime(2026, 11, 20, 23, 59, 59, 999800, tzinfo=UTC)
CONV_A, CONV_B = "01aaaaaaaaaaaaaaaaaaaaaaaa", "01bbbbbbbbbbbbbbbbbbbbbbbb"
# 0002-era rows: text ids, a fork/edit (two children of one reply), a leased branch, a billed
# call, a failed call, a pending call in another conversation, a blob.
OLD_TURNS = [  # id, conversation, parent, role, kind, text, depth, source, seconds after T0
    ("01t0000000000000000000000u", CONV_A, None, "user", "user", "first", 0, None, 0),
    ("01t000000000000000000000r1", CONV_A, "01t0000000000000000000000u", "assistant", "reply", "answer", 1, None, 1),
    ("01t000000000000000000000u2", CONV_A, "01t000000000000000000000r1", "user", "user", "second", 2, None, 2),
    ("01t000000000000000000000e2", CONV_A, "01t000000000000000000000r1", "user", "user", "second, edited", 2,
     "01t000000000000000000000u2", 3),
    ("01t000000000000000000000b1", CONV_B, None, "user", "user", "other", 0, None, 4),
]


IMAGE_REF = {"type": "image", "source": {"type": "convo_blob", "media_type": "image/png", "sha256": "f" * 64, "size": 3}}


def _seed_0002(e: Engine) -> None:
    ts = sa.bindparam("ts", type_=sa.DateTime(timezone=True))
    exp = sa.bindparam("exp", type_=sa.DateTime(timezone=True))
    with e.begin() as conn:
        for cid, count in ((CONV_A, 4), (CONV_B, 1)):
            conn.execute(
                text(
                    "INSERT INTO conversations (id, title, model, system, params, current_branch, "
                    "turn_count, created_at, updated_at) VALUES (:id, :title, 'claude-sonnet-4-5', NULL, "
                    "'{\"max_tokens\": 64}', 'main', :n, :ts, :ts)"
                ).bindparams(ts),
                {"id": cid, "title": cid[:3], "n": count, "ts": T0},
            )
        for tid, cid, parent, role, kind, body, depth, source, sec in OLD_TURNS:
            conn.execute(
                text(
                    "INSERT INTO turns (id, conversation_id, parent_id, role, kind, content, depth, "
                    "source_id, stop_reason, created_at) VALUES (:id, :cid, :parent, :role, :kind, "
                    ":content, :depth, :source, NULL, :ts)"
                ).bindparams(ts),
                {"id": tid, "cid": cid, "parent": parent, "role": role, "kind": kind, "depth": depth,
                 "content": json.dumps([{"type": "text", "text": body}, *([IMAGE_REF] if cid == CONV_B else [])]),
                 "source": source, "ts": T0 + timedelta(seconds=sec)},
            )
        for cid, name, head, owner in (
            (CONV_A, "main", "01t000000000000000000000u2", None),
            (CONV_A, "edit-1", "01t000000000000000000000e2", "host:1:abc"),
            (CONV_B, "main", "01t000000000000000000000b1", None),
        ):
            conn.execute(
                text(
                    "INSERT INTO branches (conversation_id, name, head_id, lease_owner, lease_expires, "
                    "created_at) VALUES (:cid, :name, :head, :owner, :exp, :ts)"
                ).bindparams(ts, exp),
                {"cid": cid, "name": name, "head": head, "owner": owner,
                 "exp": T0 + timedelta(minutes=15) if owner else None, "ts": T0},
            )
        for call_id, cid, turn, reply, status, inp, out, cost in (
            ("01k0000000000000000000000a", CONV_A, "01t0000000000000000000000u", "01t000000000000000000000r1", "ok", 10, 5, 0.01),
            ("01k0000000000000000000000b", CONV_A, "01t000000000000000000000u2", None, "error", 0, 0, None),
            ("01k0000000000000000000000c", CONV_B, "01t000000000000000000000b1", None, "pending", 0, 0, None),
        ):
            conn.execute(
                text(
                    "INSERT INTO calls (id, conversation_id, branch, turn_id, reply_id, attempt, model, "
                    "streamed, status, input_tokens, output_tokens, cache_creation_input_tokens, "
                    "cache_read_input_tokens, cost_usd, started_at, finished_at) VALUES (:id, :cid, 'main', "
                    ":turn, :reply, 0, 'claude-sonnet-4-5', 0, :status, :inp, :out, 0, 0, :cost, :ts, :ts)"
                ).bindparams(ts),
                {"id": call_id, "cid": cid, "turn": turn, "reply": reply, "status": status, "inp": inp,
                 "out": out, "cost": cost, "ts": T0 + timedelta(seconds=1)},
            )
        conn.execute(
            text(
                "INSERT INTO blobs (sha256, media_type, size, data, created_at) "
                "VALUES (:sha, 'image/png', 3, :data, :ts)"
            ).bindparams(ts, sa.bindparam("data", type_=sa.LargeBinary)),
            {"sha": "f" * 64, "data": b"png", "ts": T0},
        )


def _check_carried_over(url: str) -> dict[str, int]:
    """Everything seeded at 0002, read through convo at head; the new id of each old turn."""
    with Store(url) as s:
        a, b = s.get(CONV_A), s.get(CONV_B)
        texts = {t.content[0]["text"]: t for t in s.storage.turns(CONV_A) + s.storage.turns(CONV_B)}
        new = {old[0]: texts[old[5]].id for old in OLD_TURNS}
        assert sorted(new.values()) == [new[o[0]] for o in OLD_TURNS]  # creation order kept
        for _tid, _cid, parent, _role, _kind, body, depth, source, sec in OLD_TURNS:
            t = texts[body]
            assert (t.parent_id, t.source_id, t.depth) == (
                new.get(parent), new.get(source), depth
            )
            assert t.created_at == T0 + timedelta(seconds=sec)
        assert [t.content[0]["text"] for t in a.turns("main")] == ["first", "answer", "second"]
        assert [t.content[0]["text"] for t in a.turns("edit-1")] == ["first", "answer", "second, edited"]
        heads = {br.name: br for br in a.branches()}
        assert heads["edit-1"].lease_owner == "host:1:abc"
        assert heads["edit-1"].lease_expires == T0 + timedelta(minutes=15)
        assert [br.head_id for br in b.branches()] == [new[OLD_TURNS[4][0]]]
        calls = a.calls()
        assert [(c["turn_id"], c["reply_id"], c["status"]) for c in calls] == [
            (new[OLD_TURNS[0][0]], new[OLD_TURNS[1][0]], "ok"),
            (new[OLD_TURNS[2][0]], None, "error"),
        ]
        assert all(c["started_at"] == T0 + timedelta(seconds=1) for c in calls)
        report = s.usage(by="conversation")
        assert {r.key: (r.calls, r.input_tokens, r.cost_usd) for r in report.rows} == {
            CONV_A: (2, 10, 0.01), CONV_B: (1, 0, 0.0)
        }
        assert s.storage.integrity_problems() == []
        # Only the conversation whose turn holds an image is marked as holding media.
        assert s.storage.conversation(CONV_B).has_media and not s.storage.conversation(CONV_A).has_media
        assert s.storage.path(CONV_B).blobs == {"f" * 64: b"png"}
        assert s.storage.path(CONV_A).blobs is None
        return new


def test_0003_carries_every_row_over_and_back(empty_url: str, engine: Engine) -> None:
    db.upgrade_schema(engine, "0002")
    _seed_0002(engine)
    db.upgrade_schema(engine)
    new = _check_carried_over(empty_url)
    # Fresh ids continue after the carried-over ones (the sequences were moved on).
    with Store(empty_url) as s:
        fresh = s.create("claude-sonnet-4-5")
        assert fresh.add_user("new") > max(new.values())
        assert fresh.id not in (CONV_A, CONV_B) and s.storage.conversation(fresh.id).key == 3
    # Down again: the integer ids come back as 26-character ids in the same order.
    db.downgrade_schema(engine, "0002")
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT t.id, t.parent_id, t.depth, t.conversation_id FROM turns t ORDER BY t.id")
        ).all()
        assert all(len(r[0]) == 26 for r in rows) and len(rows) == len(OLD_TURNS) + 1
        by_id = {r[0]: r for r in rows}
        assert all(r[1] is None or by_id[r[1]][2] == r[2] - 1 for r in rows)
        assert conn.execute(text("SELECT COUNT(*) FROM calls")).scalar() == 3
    db.upgrade_schema(engine)
    assert _check_carried_over(empty_url) == new


def test_0005_upgrade_leaves_json_turns_as_they_are_and_downgrade_writes_bare_text_back_as_json(
    empty_url: str, engine: Engine
) -> None:
    """Bare-text turns (0005) go back to the JSON an older convo reads, in batches; turns
    stored as JSON read the same after an upgrade, which rewrites nothing."""
    db.upgrade_schema(engine)
    texts = [f"turn {i}: é 🙂\n\"quoted\" \\n" for i in range(2_050)]  # past two batches of 1,000
    with Store(empty_url) as s:
        c = s.create("claude-sonnet-4-5")
        s.storage.append(
            c.id, "main", None, [NewTurn("user" if i % 2 == 0 else "assistant",
                                         "user" if i % 2 == 0 else "reply", [{"type": "text", "text": t}])
                                 for i, t in enumerate(texts)]
        )
        c.add_user([{"type": "text", "text": "[1] stays JSON"}])
        body = c.request("next")
    with engine.connect() as conn:
        stored = [r[0] for r in conn.execute(text("SELECT content FROM turns ORDER BY id")).all()]
    assert stored[:-1] == texts and stored[-1].startswith("[")

    db.downgrade_schema(engine, "0004")
    with engine.connect() as conn:
        old = [r[0] for r in conn.execute(text("SELECT content FROM turns ORDER BY id")).all()]
    assert [json.loads(v) for v in old] == [[{"type": "text", "text": t}] for t in texts] + [
        [{"type": "text", "text": "[1] stays JSON"}]
    ]
    assert all(v.startswith('[{"type":"text","text":') for v in old)

    db.upgrade_schema(engine)
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(text("SELECT content FROM turns ORDER BY id")).all()] == old
    with Store(empty_url) as s:
        assert s.get(c.id).request("next") == body
