"""The store through `convo.Store` and `Conversation`, on SQLite and PostgreSQL (`db_url`).

No request is ever sent here: `Conversation.request()` gives the exact body a send would POST,
which is what has to survive a round trip through the database.
"""

from __future__ import annotations

import base64
import os
import stat
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import create_engine, func, inspect, select, text

import convo.store as store_mod
from convo import AmbiguousId, ContentError, NotFound, Store, StoreError, db
from convo.client import Client
from convo.errors import ConfigError, DatabaseUnavailable, InvalidInput
from convo.history import TurnRecord
from convo.ids import ALPHABET, LENGTH
from convo.models import Blob, Turn
from convo.service import Conversation
from convo.standin import StandIn
from convo.store import NewTurn, Storage

MODEL = "claude-sonnet-4-5"


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store(db_url) as s:
        yield s


def count(store: Store, table: Any) -> int:
    with store.storage.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def make_png(width: int, height: int, seed: int = 0) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    raw = b"".join(
        b"\x00" + b"".join(bytes([seed % 256, x % 256, y % 256]) for x in range(width))
        for y in range(height)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def text_block(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


# -- the issue's example -----------------------------------------------------------------------


def test_issue_example_round_trips_through_a_new_store(db_url: str) -> None:
    with Store(db_url) as s:
        c = s.create(MODEL, system="You are terse.", max_tokens=300, temperature=0.2)
        u1 = c.add_user("What is the capital of France?")
        a1 = c.add_assistant("Paris.")
        u2 = c.add_user("And of Italy?")
        body = c.request()
        cid = c.id
    assert body["model"] == MODEL
    assert body["max_tokens"] == 300
    assert body["system"] == "You are terse."
    assert body["temperature"] == 0.2
    assert body["cache_control"] == {"type": "ephemeral"}  # the default 5-minute cache
    assert body["messages"] == [
        {"role": "user", "content": [text_block("What is the capital of France?")]},
        {"role": "assistant", "content": [text_block("Paris.")]},
        {"role": "user", "content": [text_block("And of Italy?")]},
    ]
    assert len({u1, a1, u2}) == 3
    with Store(db_url) as again:
        same = again.get(cid[:8])
        assert same.id == cid
        assert same.request() == body
        assert [t.id for t in same.turns()] == [u1, a1, u2]


def test_request_with_new_content_writes_nothing(store: Store) -> None:
    c = store.create(MODEL)
    c.add_user("Hi")
    c.add_assistant("Hello")
    body = c.request("One more thing")
    assert body["messages"][-1] == {"role": "user", "content": [text_block("One more thing")]}
    assert c.info.turn_count == 2
    assert count(store, Turn.__table__) == 2
    assert len(c.request()["messages"]) == 2


# -- ids -----------------------------------------------------------------------------------------


def test_conversation_ids_are_26_char_crockford_base32(store: Store) -> None:
    c = store.create(MODEL)
    assert len(c.id) == LENGTH == 26
    assert set(c.id) <= set(ALPHABET)
    assert not set(c.id) & set("ilou")


def test_turn_ids_are_integers_that_grow_and_are_never_reused(store: Store) -> None:
    """A deleted conversation's turn ids are not handed out again (AUTOINCREMENT / a sequence),
    so an id someone noted down never comes to name a different turn."""
    a = store.create(MODEL)
    first = a.add_user("Hi")
    second = a.add_assistant("Hello")
    assert isinstance(first, int) and isinstance(second, int) and second > first
    assert a.turn(second).parent_id == first
    b = store.create(MODEL)
    later = b.add_user("Hi")
    assert later > second
    store.storage.delete_conversation(b.id)
    again = store.create(MODEL).add_user("Hi")
    assert again > later


@pytest.mark.parametrize("ref", ["abc", "-1", "1.5", "", "   ", "١٢", "9" * 19, "#"])
def test_a_turn_ref_that_is_not_a_number_is_not_found(store: Store, ref: str) -> None:
    c = store.create(MODEL)
    c.add_user("Hi")
    with pytest.raises(NotFound):
        c.turn(ref)


def test_get_by_full_id_and_unique_prefix(store: Store) -> None:
    a = store.create(MODEL, title="a")
    b = store.create(MODEL, title="b")
    assert store.get(a.id).id == a.id
    assert store.get(b.id).info.title == "b"
    # The shortest prefix that tells them apart, and every longer one.
    n = next(i for i in range(1, LENGTH + 1) if a.id[:i] != b.id[:i])
    for k in range(n, LENGTH + 1):
        assert store.get(a.id[:k]).id == a.id
        assert store.get(b.id[:k]).id == b.id
    # Upper case and Crockford look-alikes (O for 0, I and L for 1) name the same id.
    fuzzy = b.id.upper().replace("0", "O").replace("1", "L")
    assert store.get(fuzzy).id == b.id
    assert store.get(f"  {b.id}  ").id == b.id


def test_ambiguous_prefix_lists_the_candidates(store: Store) -> None:
    made: list[Conversation] = []
    pair: tuple[str, str] | None = None
    while pair is None:
        made.append(store.create(MODEL))
        assert len(made) < 200, "200 ids without two sharing a first character"
        by_first: dict[str, str] = {}
        for c in made:
            if c.id[0] in by_first:
                pair = (by_first[c.id[0]], c.id)
                break
            by_first[c.id[0]] = c.id
    first, second = pair
    prefix = os.path.commonprefix([first, second])
    with pytest.raises(AmbiguousId) as exc:
        store.get(prefix)
    assert {first, second} <= set(exc.value.candidates)
    assert all(cand.startswith(prefix) for cand in exc.value.candidates)
    assert first in str(exc.value) and second in str(exc.value)
    with pytest.raises(AmbiguousId):
        store.get(first[0])


@pytest.mark.parametrize("ref", ["zzzzzzzzzz", "7" * 26, "not-an-id!", "", "   ", "x" * 27])
def test_unknown_id_is_not_found(store: Store, ref: str) -> None:
    store.create(MODEL)
    with pytest.raises(NotFound):
        store.get(ref)


def test_turn_lookup_is_scoped_to_its_conversation(store: Store) -> None:
    a = store.create(MODEL)
    b = store.create(MODEL)
    ta = a.add_user("in a")
    b.add_user("in b")
    assert a.turn(ta).id == ta
    # As typed on a command line: the digits, with or without the '#' shown beside them.
    assert a.turn(str(ta)).content == [text_block("in a")]
    assert a.turn(f" #{ta} ").id == ta
    with pytest.raises(NotFound, match="another conversation"):
        b.turn(ta)
    with pytest.raises(NotFound):
        b.turn(str(ta))
    with pytest.raises(NotFound):
        b.fork(ta, "stolen")
    with pytest.raises(NotFound):
        b.edit(ta, "hijack")
    assert {br.name for br in b.branches()} == {"main"}


# -- refusals write nothing ------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "   ", "\n\t", []])
def test_empty_text_refused_and_nothing_written(store: Store, content: Any) -> None:
    c = store.create(MODEL)
    c.add_user("first")
    before = (c.info.turn_count, count(store, Turn.__table__), c.turns())
    with pytest.raises(ContentError):
        c.add_user(content)
    with pytest.raises(ContentError):
        c.add_assistant(content)
    with pytest.raises(ContentError):
        c.request(content)
    assert (c.info.turn_count, count(store, Turn.__table__), c.turns()) == before


# -- blobs -----------------------------------------------------------------------------------------


def test_a_conversation_is_marked_as_holding_media_by_every_way_a_turn_can_carry_one(
    store: Store, tmp_path: Path
) -> None:
    """`has_media` lets a path skip looking for blob references; every write that stores an
    image must set it (append, edit, a tool result, import), or its image would be lost."""
    png = tmp_path / "p.png"
    png.write_bytes(make_png(3, 3, seed=1))
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png.read_bytes()).decode()}}

    def media(c: Any) -> bool:
        return store.storage.conversation(c.id).has_media

    plain = store.create(MODEL)
    plain.add_user("words only")
    plain.add_assistant("still words")
    assert not media(plain) and store.storage.path(plain.id).blobs is None

    appended = store.create(MODEL)
    appended.add_user("look", images=[png])
    assert media(appended) and store.storage.path(appended.id).blobs

    edited = store.create(MODEL)
    first = edited.add_user("no picture yet")
    edited.edit(first, [text_block("now with one"), block])
    assert media(edited) and store.storage.path(edited.id).blobs
    edited.checkout("main")
    assert store.storage.path(edited.id).blobs is None  # this branch's path has none

    tool = store.create(MODEL)
    tool.add_user("use the tool")
    store.storage.append(tool.id, "main", store.storage.path(tool.id).head_id, [
        NewTurn("assistant", "reply", [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]),
    ])
    tool.add_tool_result("toolu_1", [block])
    assert media(tool) and store.storage.path(tool.id).blobs

    copy = store.import_(store.export(appended.id))
    assert media(copy) and copy.request()["messages"][0]["content"][0]["type"] == "image"
    assert not media(store.import_(store.export(plain.id)))


def test_twenty_turns_with_the_same_image_store_one_blob(store: Store, tmp_path: Path) -> None:
    png = make_png(6, 4, seed=7)
    encoded = base64.b64encode(png).decode()
    path = tmp_path / "chart.png"
    path.write_bytes(png)
    c = store.create(MODEL)
    for i in range(20):
        if i % 2:
            block = {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": encoded},
            }
            c.add_user([text_block(f"picture {i}"), block])
        else:
            c.add_user(f"picture {i}", images=[path])
        c.add_assistant(f"Seen {i}.")
    assert count(store, Blob.__table__) == 1
    with store.storage.engine.connect() as conn:
        row = conn.execute(select(Blob.__table__)).one()
    assert bytes(row.data) == png
    assert row.size == len(png) and row.media_type == "image/png"
    # What is stored in the turns is a reference, not the bytes.
    with store.storage.engine.connect() as conn:
        contents = conn.execute(select(Turn.__table__.c.content)).scalars().all()
    assert not any(encoded in content for content in contents)

    body = c.request("Which one was brightest?")
    images = [b for m in body["messages"] for b in m["content"] if b["type"] == "image"]
    assert len(images) == 20
    assert all(
        b["source"] == {"type": "base64", "media_type": "image/png", "data": encoded}
        for b in images
    )
    # A different image is a second row; the same one again is not.
    c.add_user("another", images=[path])
    other = tmp_path / "other.png"
    other.write_bytes(make_png(6, 4, seed=8))
    c.add_user("and this", images=[other])
    assert count(store, Blob.__table__) == 2


def test_image_in_a_tool_result_round_trips(store: Store) -> None:
    png = make_png(3, 3, seed=1)
    encoded = base64.b64encode(png).decode()
    c = store.create(MODEL)
    c.add_user("Take a screenshot")
    tool_use = {"type": "tool_use", "id": "toolu_01", "name": "screenshot", "input": {}}
    # A reply as the API returned it is stored through the storage layer, as a send would.
    path = store.storage.path(c.id)
    store.storage.append(
        c.id,
        "main",
        path.head_id,
        [store_mod.NewTurn("assistant", "reply", [tool_use], stop_reason="tool_use")],
    )
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": encoded},
    }
    c.add_tool_result("toolu_01", [text_block("here"), image])
    assert count(store, Blob.__table__) == 1
    body = c.request()
    result = body["messages"][2]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_01"
    assert result["content"] == [text_block("here"), image]


# -- reading a path: range scan and recursive CTE ----------------------------------------------------


def _linear(store: Store, exchanges: int) -> tuple[Conversation, list[int]]:
    conv = store.create(model="claude-sonnet-4-5", max_tokens=64)
    ids: list[int] = []
    for i in range(exchanges):
        ids += [conv.add_user(f"question {i}"), conv.add_assistant(f"answer {i}")]
    return conv, ids


def _between_the_reads(monkeypatch: pytest.MonkeyPatch, db_url: str, write: Any) -> None:
    """Run `write(other)` once, `other` being a second Store on the same database (as another
    process would write), after a resume has read the conversation and its head and before it
    reads the path: each is its own statement."""
    real = Storage._chain
    done: list[bool] = []

    def chain(self: Storage, *args: Any) -> list[Any]:
        if not done:
            done.append(True)
            with Store(db_url) as other:
                write(other)
        return real(self, *args)

    monkeypatch.setattr(Storage, "_chain", chain)


def test_a_branch_made_between_the_two_reads_of_a_resume_is_not_read_into_the_path(
    db_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv, ids = _linear(store, 3)
    want = [t.id for t in conv.turns()]

    def edit_and_append(other: Store) -> None:
        other.get(conv.id).edit(ids[2], "an edit made meanwhile")  # a sibling at depth 2
        other.get(conv.id).add_user("and a turn on the new branch")

    _between_the_reads(monkeypatch, db_url, edit_and_append)
    info, path = store.storage.snapshot(conv.id)
    assert info.current_branch == "main" and path.branch == "main"
    assert [t.id for t in path.turns] == want == ids
    # The writes happened: the next read sees the edit's branch checked out.
    assert store.storage.snapshot(conv.id)[1].branch != "main"


def test_turns_appended_between_the_two_reads_of_a_resume_wait_for_the_next_one(
    db_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv, ids = _linear(store, 2)

    _between_the_reads(monkeypatch, db_url, lambda other: other.get(conv.id).add_user("meanwhile"))
    assert [t.id for t in store.storage.path(conv.id).turns] == ids
    assert len(store.storage.path(conv.id).turns) == len(ids) + 1


def test_a_conversation_deleted_between_the_two_reads_of_a_resume_is_not_found(
    db_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv, _ = _linear(store, 2)

    _between_the_reads(monkeypatch, db_url, lambda other: other.storage.delete_conversation(conv.id))
    with pytest.raises(NotFound, match="deleted while it was being read"):
        conv.request("next")


def _branched_conversation(store: Store, tmp_path: Path) -> Conversation:
    img = tmp_path / "dot.png"
    img.write_bytes(make_png(2, 2, seed=3))
    c = store.create(MODEL)
    ids = []
    for i in range(6):
        ids.append(c.add_user(f"question {i}", images=[img] if i == 2 else ()))
        ids.append(c.add_assistant(f"answer {i}"))
    c.fork(ids[3], "alt")  # after "answer 1"
    for i in range(4):
        c.add_user(f"alt question {i}")
        c.add_assistant(f"alt answer {i}")
    c.checkout("main")
    c.edit(ids[6], "question 3, edited", name="edited")
    c.add_assistant("edited answer")
    c.fork(ids[1], "short")
    c.checkout("main")
    return c


def _expected_path(rows: dict[str, Any], head: str) -> list[str]:
    chain = []
    cur: str | None = head
    while cur is not None:
        chain.append(cur)
        cur = rows[cur].parent_id
    return chain[::-1]


def _read_everything(store: Store, c: Conversation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in c.branches():
        p = store.storage.path(c.id, b.name)
        out[f"branch:{b.name}"] = (p.head_id, p.turns, p.blobs)
    for t in store.storage.turns(c.id):
        p = store.storage.path(c.id, head_id=t.id)
        out[f"turn:{t.id}"] = (p.head_id, p.turns, p.blobs)
    out["request"] = c.request("and now?")
    return out


def test_range_scan_and_recursive_cte_read_the_same_paths(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _branched_conversation(store, tmp_path)
    cte_calls: list[str] = []
    real_walk = Storage._walk_cte

    def spy(self: Storage, conn: Any, head_id: str) -> list[Any]:
        cte_calls.append(head_id)
        return real_walk(self, conn, head_id)

    monkeypatch.setattr(Storage, "_walk_cte", spy)

    monkeypatch.setattr(store_mod, "SCAN_RATIO", 2)
    monkeypatch.setattr(store_mod, "SCAN_SLACK", 10**9)
    by_scan = _read_everything(store, c)
    assert cte_calls == []

    monkeypatch.setattr(store_mod, "SCAN_RATIO", 0)
    monkeypatch.setattr(store_mod, "SCAN_SLACK", -1)
    by_cte = _read_everything(store, c)
    assert len(cte_calls) >= len(by_cte) - 1

    assert by_scan == by_cte

    # And both are right: each path is the chain of parent links from its head.
    rows = {t.id: t for t in store.storage.turns(c.id)}
    for key, value in by_cte.items():
        if key == "request":
            continue
        head, turns, blobs = value
        assert [t.id for t in turns] == _expected_path(rows, head)
        assert all(isinstance(t, TurnRecord) for t in turns)
        assert turns == [
            TurnRecord(r.id, r.role, r.kind, r.content, r.stop_reason)
            for r in (rows[i] for i in _expected_path(rows, head))
        ]
        has_image = any(b.get("type") == "image" for t in turns for b in t.content)
        assert (blobs is not None) == has_image
    main_texts = [t.content[-1]["text"] for t in by_cte["branch:main"][1]]
    assert main_texts == [s for i in range(6) for s in (f"question {i}", f"answer {i}")]
    alt_texts = [t.content[-1]["text"] for t in by_cte["branch:alt"][1]]
    assert alt_texts[:4] == ["question 0", "answer 0", "question 1", "answer 1"]
    assert alt_texts[4:] == [s for i in range(4) for s in (f"alt question {i}", f"alt answer {i}")]
    assert len(by_cte["branch:short"][1]) == 2


# -- listing -----------------------------------------------------------------------------------------


def test_list_gives_summaries_with_turn_counts(store: Store) -> None:
    assert store.list() == []
    counts = {}
    for n in (0, 1, 3):
        c = store.create(MODEL, title=f"{n} turns")
        for i in range(n):
            (c.add_user if i % 2 == 0 else c.add_assistant)(f"turn {i}")
        counts[c.id] = n
    first = next(cid for cid, n in counts.items() if n == 0)
    store.get(first).add_user("now the most recent")
    counts[first] = 1
    summaries = store.list()
    assert {s.id: s.turn_count for s in summaries} == counts
    assert {s.id: s.title for s in summaries} == {
        cid: f"{n if cid != first else 0} turns" for cid, n in counts.items()
    }
    assert summaries[0].id == first
    assert all(s.model == MODEL and s.current_branch == "main" and s.calls == 0 for s in summaries)
    assert [s.id for s in store.list(limit=2)] == [s.id for s in summaries[:2]]


# -- where the database is -----------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_database_is_private_under_xdg_data_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    old_umask = os.umask(0)  # even a permissive umask must not make the store readable
    try:
        with Store() as s:
            c = s.create(MODEL)
            c.add_user("secret thoughts")
            c.add_assistant("noted")
            assert c.request()["messages"][0]["content"][0]["text"] == "secret thoughts"
            db_file = xdg / "convo" / "convo.db"
            assert db_file.is_file()
            assert s.url == f"sqlite:///{db_file}"
            assert _mode(db_file) == 0o600
            assert _mode(db_file.parent) == 0o700
            for side in ("convo.db-wal", "convo.db-shm", "convo.db-journal"):
                if (db_file.parent / side).exists():
                    assert _mode(db_file.parent / side) == 0o600, side
    finally:
        os.umask(old_umask)
    assert not (tmp_path / "home").exists()
    with Store() as again:
        assert [x.turn_count for x in again.list()] == [2]


def test_convo_database_url_overrides_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    other = tmp_path / "elsewhere" / "mine.db"
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    monkeypatch.setenv("CONVO_DATABASE_URL", f"sqlite:///{other}")
    with Store() as s:
        s.create(MODEL).add_user("hi")
        assert s.url == f"sqlite:///{other}"
    assert other.is_file()
    assert not (xdg / "convo" / "convo.db").exists()
    # An explicit URL beats the variable.
    explicit = tmp_path / "explicit.db"
    with Store(f"sqlite:///{explicit}") as s:
        assert s.list() == []
    assert explicit.is_file()


def test_tilde_in_a_sqlite_url_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with Store("sqlite:///~/data/convo.db") as s:
        s.create(MODEL).add_user("hi")
    assert (home / "data" / "convo.db").is_file()
    assert not (tmp_path / "~").exists()
    with Store("sqlite:///~/data/convo.db") as s:
        assert len(s.list()) == 1


def test_a_plain_sqlite_url_opens_the_file_sqlalchemy_would_with_the_same_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # convo reads `sqlite:///path` itself (see db.Database); any other spelling goes through
    # SQLAlchemy's URL and dialect. Both must open the same file the same way.
    monkeypatch.chdir(tmp_path)
    plain, spelled = db.Database("sqlite:///rel/convo.db"), db.Database("sqlite+pysqlite:///rel/convo.db")
    try:
        assert (plain._cargs, plain._cparams) == (spelled._cargs, spelled._cparams)
        assert plain._cargs == [str(tmp_path / "rel" / "convo.db")]
        assert plain.url.database == spelled.url.database
    finally:
        plain.close()
        spelled.close()
    with Store("sqlite:///rel/convo.db") as s:
        conv_id = s.create(MODEL).id
        s.get(conv_id).add_user("written through the plain URL")
    with Store(f"sqlite+pysqlite:///{tmp_path / 'rel' / 'convo.db'}") as s:
        assert _texts(s.get(conv_id)) == ["written through the plain URL"]


def test_unreachable_postgresql_is_database_unavailable_without_the_password() -> None:
    secret = "pa55w0rd-Secret"
    for url in (
        f"postgresql+psycopg://convo_user:{secret}@127.0.0.1:1/convo",
        f"postgresql://convo_user:{secret}@127.0.0.1:1/convo",
    ):
        for upgrade in (None, True, False):
            with pytest.raises(DatabaseUnavailable) as exc:
                Store(url, upgrade=upgrade)
            message = str(exc.value)
            assert "\n" not in message and message.strip() == message
            assert secret not in message
            assert secret not in repr(exc.value.args)
            assert "127.0.0.1" in message


@pytest.mark.parametrize(
    "url, error",
    [
        # A URL that is wrong is bad input (exit 2); one that is right but unusable is not.
        ("not a url", ConfigError),
        ("definitely://nothing", ConfigError),
        ("mysql://user:pw@localhost/db", ConfigError),
        ("postgresql://user:pw@localhost:notaport/db", ConfigError),
        ("postgresql+nosuchdriver://user:pw@localhost/db", ConfigError),
        ("postgresql+pg8000://user:pw@localhost/db", ConfigError),  # known, not installed
        ("sqlite:////proc/no/such/dir/convo.db", DatabaseUnavailable),
    ],
)
def test_invalid_url_is_refused_in_one_line(url: str, error: type[Exception]) -> None:
    with pytest.raises(error) as exc:
        Store(url)
    assert "\n" not in str(exc.value)
    assert ":pw@" not in str(exc.value)


def test_a_file_that_is_not_a_database_is_database_unavailable(tmp_path: Path) -> None:
    junk = tmp_path / "notes.db"
    junk.write_bytes(b"this is a text file, not SQLite " * 100)
    with pytest.raises(DatabaseUnavailable) as exc:
        Store(f"sqlite:///{junk}")
    assert "\n" not in str(exc.value)
    assert junk.read_bytes() == b"this is a text file, not SQLite " * 100


def test_postgresql_at_an_empty_schema_asks_for_an_upgrade(fresh_pg_url: str) -> None:
    with pytest.raises(StoreError) as exc:
        Store(fresh_pg_url)
    assert type(exc.value) is StoreError
    assert f"run `convo --db {fresh_pg_url} db upgrade`" in str(exc.value)
    engine = create_engine(fresh_pg_url)
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
    finally:
        engine.dispose()
    with Store(fresh_pg_url, upgrade=True) as s:
        s.create(MODEL).add_user("hi")
    with Store(fresh_pg_url) as s:
        assert [x.turn_count for x in s.list()] == [1]


def test_resume_sql_is_written_once_in_sqlite_style_and_run_by_psycopg_in_its_own() -> None:
    sql = "SELECT a FROM t WHERE b = :b AND c LIKE 'x%' AND d = :d_2 AND e = f::text"
    assert db._paramstyle(sql, "sqlite") == sql
    assert db._paramstyle(sql, "postgresql") == (
        "SELECT a FROM t WHERE b = %(b)s AND c LIKE 'x%%' AND d = %(d_2)s AND e = f::text"
    )


def _backend_pid(store: Store) -> int:
    with db.read(store.storage.engine) as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    finally:
        engine.dispose()


def test_a_failed_sends_lease_is_released_over_a_new_connection_when_the_pool_was_dropped(
    fresh_pg_url: str, standin: StandIn, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server drops its connections right after a failed call is recorded: the lease's
    release finds its connection lost and runs on a new one, so the branch is free at once,
    for this process and for any other."""
    from convo.errors import BadRequestError

    with Store(fresh_pg_url, upgrade=True, client=client, wait_for_branch=0.2) as s:
        conv = s.create(MODEL)
        conv.send("hello")
        standin.fail_next(400)
        record = s.storage.finish_call

        def record_then_drop(*args: Any, **kw: Any) -> None:
            record(*args, **kw)
            _drop_pooled(s, fresh_pg_url, 1)

        monkeypatch.setattr(s.storage, "finish_call", record_then_drop)
        with pytest.raises(BadRequestError):
            conv.send("second")
        monkeypatch.undo()
        assert [b.lease_owner for b in conv.branches()] == [None]
        assert conv.retry().text


def _drop_pooled(store: Store, url: str, n: int) -> list[int]:
    """Put `n` connections in the engine's pool, then have the server drop them all (as a
    restart or a failover does); their backend pids."""
    engine = store.storage.engine
    raws = [engine.raw_connection() for _ in range(n)]
    pids = [r.driver_connection.info.backend_pid for r in raws]  # type: ignore[union-attr]
    for r in raws:
        r.close()
    for pid in pids:
        _terminate(url, pid)
    return pids


def test_a_postgresql_connection_that_died_idle_in_the_pool_is_replaced_before_use(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("before the server dropped the connection")
        first = _backend_pid(store)
        _terminate(fresh_pg_url, first)
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)  # it has been idle "long enough"
        time.sleep(0.01)
        assert [t.content[0]["text"] for t in conv.turns()] == ["before the server dropped the connection"]
        conv.add_assistant("and after")
        assert len(store.get(conv.id).turns()) == 2
        assert _backend_pid(store) != first


def test_a_postgresql_connection_back_in_the_pool_a_moment_ago_is_not_pinged(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        dialect = store.storage.engine.dialect
        pings: list[object] = []
        real_ping = dialect.do_ping
        monkeypatch.setattr(dialect, "do_ping", lambda c: pings.append(c) or real_ping(c))
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)
        store.get(conv.id).request("next")
        conv.add_assistant("reply")
        assert pings == []
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
        time.sleep(0.01)
        store.get(conv.id).request("next")
        assert len(pings) == 2  # the lookup by id and the resume each checked a connection out
        assert [t.content[0]["text"] for t in conv.turns()] == ["hello", "reply"]


def test_resumes_survive_a_postgresql_restart_that_drops_every_pooled_connection(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        # Four connections in the pool, all back a moment ago (so none is pinged), then all
        # dropped by the server, as a restart or a failover does.
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)
        pids = _drop_pooled(store, fresh_pg_url, 4)
        for _ in range(5):
            assert [t.content[0]["text"] for t in store.get(conv.id).turns()] == ["hello"]
        body = store.get(conv.id).request("again")
        assert body["messages"][0]["content"][-1]["text"] == "again"
        assert _backend_pid(store) not in pids


def test_a_connection_error_with_no_sqlstate_counts_as_a_lost_connection(fresh_pg_url: str) -> None:
    import psycopg

    database = db.Database(fresh_pg_url)
    conn = database.connect()
    try:
        # psycopg raises this when it finds the socket gone before libpq marks the connection
        # closed or broken (the flags SQLAlchemy's own check reads).
        assert not conn.closed and not conn.broken
        assert database.lost(psycopg.OperationalError("connection socket closed"), conn, None)
        # A server's own errors carry a SQLSTATE: the connection is fine.
        assert not database.lost(psycopg.errors.QueryCanceled("canceling statement"), conn, None)
        assert not database.lost(psycopg.ProgrammingError("syntax error"), conn, None)
    finally:
        conn.close()
        database.close()


def test_a_dropped_connection_leaves_the_pool_counting_right_for_connections_held_elsewhere(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)
        engine = store.storage.engine
        held = [engine.raw_connection() for _ in range(3)]  # in use by other threads
        _drop_pooled(store, fresh_pg_url, 1)
        assert _texts(store.get(conv.id)) == ["hello"]  # found it dropped: ran again
        for r in held:
            r.close()
        assert store.storage.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_write_on_a_connection_the_server_dropped_fails_once_and_writes_nothing(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        conv.add_assistant("hi")
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)  # back a moment ago: no ping
        _terminate(fresh_pg_url, _backend_pid(store))
        # A write that runs first (most start with a read, which reconnects and clears the pool).
        with pytest.raises(StoreError) as exc:
            store.storage.update_conversation(conv.id, title="written on a dropped connection")
        assert "\n" not in str(exc.value)
        assert conv.info.title is None
        store.storage.update_conversation(conv.id, title="again")
        assert conv.info.title == "again"
        # An append reads the branch first: that read reconnects, and the append goes through.
        _terminate(fresh_pg_url, _backend_pid(store))
        conv.add_user("appended after the drop")
        assert [t.content[0]["text"] for t in conv.turns()] == ["hello", "hi", "appended after the drop"]


def _texts(conv: Conversation) -> list[str]:
    return [t.content[0]["text"] for t in conv.turns()]


def test_reads_and_one_turn_appends_build_no_engine_and_other_writes_take_their_connection_over(
    db_url: str,
) -> None:
    with Store(db_url) as setup:
        conv = setup.create(MODEL)
        conv.add_user("hello")
        conv.add_assistant("hi")
    store = Store(db_url)
    try:
        database = store.storage.database
        body = store.get(conv.id).request("next")
        assert [m["content"][-1]["text"] for m in body["messages"]] == ["hello", "hi", "next"]
        assert not database.engine_built
        [(_since, reads_connection)] = database._idle  # one connection served every read
        store.get(conv.id).add_user("a write")  # one turn: written on the driver too
        assert not database.engine_built
        assert [c for _, c in database._idle] == [reads_connection]
        store.storage.update_conversation(conv.id, title="through SQLAlchemy")
        assert database.engine_built
        assert database._idle == []
        with store.storage.engine.connect() as c:
            # The engine took the reads' connection over, set up as every convo connection is.
            assert c.connection.driver_connection is reads_connection
            if database.name == "sqlite":
                assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
                assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
            else:
                assert reads_connection.autocommit is False  # the Reader put it back
        assert _texts(store.get(conv.id)) == ["hello", "hi", "a write"]
        assert store.get(conv.id).info.title == "through SQLAlchemy"
        store.storage.delete_conversation(conv.id)  # the cascade needs SQLite's foreign keys on
        with store.storage.engine.connect() as c:
            assert c.execute(select(func.count()).select_from(Turn)).scalar() == 0
    finally:
        store.close()
    assert database._idle == []


def test_a_send_from_a_fresh_store_builds_no_engine(db_url: str, client: Client) -> None:
    with Store(db_url) as setup:
        conv_id = setup.create(MODEL).id
    with Store(db_url, client=client) as store:
        reply = store.get(conv_id).send("hello")  # the stand-in answers on loopback
        assert not store.storage.database.engine_built
        [call] = store.get(conv_id).calls()
        assert (call["status"], call["reply_id"]) == ("ok", reply.turn_id)
        assert [t.role for t in store.get(conv_id).turns()] == ["user", "assistant"]


def _resume_from_threads(store: Store, conv_id: str, threads: int, rounds: int) -> list[list[str]]:
    import threading

    got: list[list[str]] = []
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        try:
            for _ in range(rounds):
                body = store.get(conv_id).request("next")
                got.append([m["content"][-1]["text"] for m in body["messages"]])
        except BaseException as e:  # reported below, with the thread's own error
            failures.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert failures == []
    return got


def test_reads_from_many_threads_on_one_store_each_run_on_a_connection_of_their_own(db_url: str) -> None:
    with Store(db_url) as setup:
        conv = setup.create(MODEL)
        for i in range(3):
            conv.add_user(f"q{i}")
            conv.add_assistant(f"a{i}")
    want = [f"{r}{i}" for i in range(3) for r in "qa"] + ["next"]
    with Store(db_url) as store:
        database = store.storage.database
        # Up to POOL_SIZE at once: connections the Store opens and keeps itself.
        assert _resume_from_threads(store, conv.id, db.POOL_SIZE, 15) == [want] * db.POOL_SIZE * 15
        assert not database.engine_built
        assert 1 <= len(database._idle) <= db.POOL_SIZE
        # Past POOL_SIZE the engine's pool takes over, and caps and queues the rest.
        held = [db.Reader(database) for _ in range(db.POOL_SIZE)]
        try:
            assert not database.engine_built
            body = store.get(conv.id).request("next")
            assert [m["content"][-1]["text"] for m in body["messages"]] == want
            assert database.engine_built
        finally:
            for r in held:
                r.close()
        assert database._lent == 0
        assert database._idle == []  # handed back after the engine existed: closed
        assert _resume_from_threads(store, conv.id, 3 * db.POOL_SIZE, 5) == [want] * 3 * db.POOL_SIZE * 5
        assert store.storage.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_read_only_store_survives_its_postgresql_connection_being_dropped(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(fresh_pg_url, upgrade=True) as setup:
        conv = setup.create(MODEL)
        conv.add_user("hello")
    with Store(fresh_pg_url) as store:
        database = store.storage.database
        assert _texts(store.get(conv.id)) == ["hello"]
        first = database._idle[0][1].info.backend_pid
        _terminate(fresh_pg_url, first)
        # A read finds it dropped and runs again on a new connection.
        assert _texts(store.get(conv.id)) == ["hello"]
        assert not database.engine_built
        second = database._idle[0][1].info.backend_pid
        assert second != first
        # The first write builds the engine, which pings the idle connection it takes over
        # (idle "long enough") and replaces it: the write goes through.
        _terminate(fresh_pg_url, second)
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
        time.sleep(0.01)
        store.storage.update_conversation(conv.id, title="written after the drop")
        assert database.engine_built
        assert store.get(conv.id).info.title == "written after the drop"
        assert _backend_pid(store) not in (first, second)


def _state(store: Store, conv_id: str) -> tuple[Any, ...]:
    """Everything a one-turn write touches: turns, head and lease, count, ledger rows."""
    with store.storage.engine.connect() as c:
        turns = c.execute(text("SELECT count(*) FROM turns")).scalar()
        branch = c.execute(text("SELECT head_id, lease_owner, lease_expires FROM branches")).all()
        conv = c.execute(text("SELECT turn_count, updated_at FROM conversations")).all()
        calls = c.execute(text("SELECT id, status FROM calls")).all()
    return turns, branch, conv, calls


def test_a_one_turn_write_that_fails_part_way_leaves_nothing_written(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(db_url) as setup:
        conv_id = setup.create(MODEL).id
        setup.get(conv_id).add_user("hello")
        before = _state(setup, conv_id)
    # A fresh Store: the write runs on a connection of its own, not the engine pool's (which
    # would roll back whatever a connection brings back).
    store = Store(db_url)
    conv = store.get(conv_id)
    failure = store.storage.database.dialect.loaded_dbapi.OperationalError("injected: disk full")
    real_run = db.Writer._run
    seen: list[str] = []

    pg = db_url.startswith("postgresql")
    fail_at = 3 if pg else 4  # the lock, the head's depth, then (SQLite: the turn written) this

    def failing(self: db.Writer, sql: str, params: Any, **kw: Any) -> Any:
        seen.append(sql)
        if len(seen) == fail_at:
            raise failure
        return real_run(self, sql, params, **kw)

    monkeypatch.setattr(db.Writer, "_run", failing)
    head = int(conv.turns()[-1].id)
    with pytest.raises(StoreError) as exc:
        # The head's depth not given: a transaction on both engines (see the next test).
        store.storage.append(conv.id, "main", head, [NewTurn("assistant", "synthetic", [{"type": "text", "text": "never stored"}])])
    assert str(exc.value) == "database error: injected: disk full"
    assert len(seen) == fail_at
    monkeypatch.setattr(db.Writer, "_run", real_run)
    try:
        assert _texts(store.get(conv.id)) == ["hello"]
        conv.add_assistant("stored")  # on the connection that failed: no transaction left open
        assert not store.storage.database.engine_built
    finally:
        store.close()
    with Store(db_url) as other:
        assert _texts(other.get(conv_id)) == ["hello", "stored"]
        turns, _branch, [(count, _updated)], calls = _state(other, conv_id)
        assert (turns, count, calls) == (before[0] + 1, before[2][0][0] + 1, [])


def test_a_postgresql_write_cut_off_on_the_client_side_while_the_server_still_runs_it_is_stored_once(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network or proxy failure can cut the client off while the server goes on running the
    statement, here waiting on the branch lock: run again at once, it would queue behind its
    own orphan, which would then write the turn and leave the rerun calling the branch moved.
    The orphan is ended and waited for first, so the rerun is the only write."""
    import os
    import socket
    import threading
    from datetime import UTC, datetime, timedelta

    import psycopg

    from convo.store import FirstCall

    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        conv.add_assistant("hi")
        head = int(store.get(conv.id).turns()[-1].id)
        libpq = fresh_pg_url.replace("postgresql+psycopg://", "postgresql://")
        holder = psycopg.connect(libpq)  # another writer, holding the branch's row lock
        holder.execute(
            "SELECT b.head_id FROM branches b JOIN conversations c ON c.key = b.conversation_key "
            "WHERE c.id = %s FOR UPDATE OF b", (conv.id,),
        )
        watcher = psycopg.connect(libpq, autocommit=True)
        writers: list[Any] = []
        real_pid = db._backend_pid

        def recording(conn: Any) -> int:
            writers.append(conn)
            return real_pid(conn)

        monkeypatch.setattr(db, "_backend_pid", recording)
        out: list[Any] = []

        def send() -> None:
            try:
                out.append(store.storage.begin_send(
                    conv.id, "main", head, [NewTurn("user", "user", [{"type": "text", "text": "cut off"}])],
                    owner="me:1:cut", hold=timedelta(minutes=5), head_depth=1,
                    first_call=FirstCall(datetime.now(UTC), MODEL, False),
                ))
            except BaseException as e:  # checked below
                out.append(e)

        thread = threading.Thread(target=send)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while True:  # the write is waiting for the lock, on the server
                assert time.monotonic() < deadline, "the write never waited on the lock"
                waiting = watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'WITH locked%'"
                ).fetchall()
                if waiting:
                    break
                time.sleep(0.01)
            [orphan] = [c for c in writers if c.info.backend_pid == waiting[0][0]]
            with socket.socket(fileno=os.dup(orphan.fileno())) as cut:
                cut.shutdown(socket.SHUT_RDWR)  # the client's side of the connection only
            time.sleep(0.3)  # the client finds out, and looks on a new connection
        finally:
            holder.commit()  # the other writer is done: the branch is free
            thread.join(30)
            holder.close()
            watcher.close()
        [result] = out
        assert not isinstance(result, BaseException), result
        (user_id,), call_id = result
        turns = store.get(conv.id).turns()
        assert [t.content[0]["text"] for t in turns] == ["hello", "hi", "cut off"]
        assert turns[-1].id == user_id
        calls = conv.calls()
        assert [(c["id"], c["turn_id"], c["status"]) for c in calls] == [(call_id, user_id, "pending")]
        assert store.storage.conversation(conv.id).turn_count == 3


def test_a_postgresql_one_statement_write_the_server_refuses_leaves_nothing_and_its_connection_usable(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        before = _state(store, conv.id)
        real_run = db.Reader._run
        seen: list[str] = []

        def refusing(self: db.Reader, sql: str, params: Any, **kw: Any) -> Any:
            if sql.startswith("WITH locked"):
                seen.append(sql)
                raise psycopg.errors.DiskFull("could not extend file: injected")
            return real_run(self, sql, params, **kw)

        monkeypatch.setattr(db.Reader, "_run", refusing)
        with pytest.raises(StoreError) as exc:
            conv.add_assistant("never stored")
        assert str(exc.value) == "database error: could not extend file: injected"
        assert len(seen) == 1  # a server's error: not a lost connection, not run again
        monkeypatch.setattr(db.Reader, "_run", real_run)
        assert _state(store, conv.id) == before
        conv.add_assistant("stored")
        assert _texts(store.get(conv.id)) == ["hello", "stored"]


def test_a_value_postgresql_refuses_in_a_one_turn_write_is_one_line_without_the_statement(
    fresh_pg_url: str,
) -> None:
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        head = conv.turns()[-1].id
        too_long = NewTurn("assistant", "reply", [{"type": "text", "text": "secret words"}], stop_reason="x" * 41)
        with pytest.raises(StoreError) as exc:
            store.storage.append(conv.id, "main", head, [too_long])
        assert str(exc.value).startswith("the database refused a value: ")
        assert "\n" not in str(exc.value) and "secret words" not in str(exc.value)
        # Nor in a traceback: the driver's error, which quotes the statement, is not attached.
        assert exc.value.__cause__ is None and exc.value.__suppress_context__
        assert _texts(conv) == ["hello"]


@pytest.mark.parametrize("depth_known", [False, True], ids=["transaction", "one-statement"])
def test_a_one_turn_write_whose_postgresql_connection_dropped_runs_again_on_a_new_one(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch, depth_known: bool
) -> None:
    """Without the head's depth the write is a transaction, whose first statement (the branch
    lock) found the connection gone; with it, one statement in autocommit, which runs again
    once a look on a new connection finds none of it written."""
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 60.0)  # back a moment ago: no ping
        head = int(store.get(conv.id).turns()[-1].id)
        pids = _drop_pooled(store, fresh_pg_url, 3)  # all of them: the write cannot miss one
        # (Storage directly: the service reads first, and that read would clear the pool.)
        turn = NewTurn("assistant", "synthetic", [{"type": "text", "text": "after the drop"}])
        transactions: list[db.Writer] = []
        begin = db.Writer._begin

        def beginning(self: db.Writer) -> None:
            transactions.append(self)
            begin(self)

        monkeypatch.setattr(db.Writer, "_begin", beginning)
        store.storage.append(conv.id, "main", head, [turn], head_depth=0 if depth_known else None)
        assert len(transactions) == (0 if depth_known else 2)  # the first lost its connection
        assert _texts(store.get(conv.id)) == ["hello", "after the drop"]
        assert _backend_pid(store) not in pids


def test_a_one_turn_write_whose_postgresql_connection_drops_after_it_began_writes_nothing(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        before = _state(store, conv.id)
        head = int(store.get(conv.id).turns()[-1].id)
        real_run = db.Writer._run
        calls: list[str] = []

        def dropping(self: db.Writer, sql: str, params: Any, **kw: Any) -> Any:
            calls.append(sql)
            if len(calls) == 2:  # the branch is locked: the server goes away now
                _terminate(fresh_pg_url, self._conn.info.backend_pid)
            return real_run(self, sql, params, **kw)

        monkeypatch.setattr(db.Writer, "_run", dropping)
        turn = NewTurn("assistant", "synthetic", [{"type": "text", "text": "lost with the connection"}])
        with pytest.raises(StoreError) as exc:
            # The head's depth unknown: a transaction (the lock, the depth, the write).
            store.storage.append(conv.id, "main", head, [turn])
        assert "\n" not in str(exc.value)
        assert len(calls) == 2  # not run again: the transaction had begun
        monkeypatch.setattr(db.Writer, "_run", real_run)
        assert _state(store, conv.id) == before
        conv.add_assistant("after")
        assert _texts(store.get(conv.id)) == ["hello", "after"]


def test_a_postgresql_send_whose_writes_committed_but_lost_their_answers_writes_each_once(
    fresh_pg_url: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of a send's writes is one statement in autocommit on PostgreSQL. If the connection
    drops after the server committed it, before its answer arrived, running it again would
    write the turn twice (or call the branch moved): a look on a new connection finds the turn
    and the call row it wrote, and the send goes on with those."""
    import psycopg

    with Store(fresh_pg_url, upgrade=True, client=client) as store:
        conv = store.create(MODEL)
        conv.add_user("hello")
        conv.add_assistant("hi")
        real_run = db.Reader._run
        lost: list[int] = []

        def answer_lost(self: db.Reader, sql: str, params: Any, **kw: Any) -> Any:
            result = real_run(self, sql, params, **kw)
            if sql.startswith("WITH locked"):  # committed: now the answer never arrives
                lost.append(self._conn.info.backend_pid)
                _terminate(fresh_pg_url, lost[-1])
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return result

        monkeypatch.setattr(db.Reader, "_run", answer_lost)
        reply = conv.send("are you there?")
        monkeypatch.setattr(db.Reader, "_run", real_run)
        assert len(lost) == 2  # the user's turn, then the reply
        path = store.get(conv.id).turns()
        assert [t.role for t in path] == ["user", "assistant", "user", "assistant"]
        assert path[-1].id == reply.turn_id and _texts(conv)[2] == "are you there?"
        [call] = conv.calls()
        assert (call["status"], call["turn_id"], call["reply_id"]) == ("ok", path[-2].id, reply.turn_id)
        assert call["id"] == reply.call_id
        with store.storage.engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM turns")).scalar() == 4
            assert c.execute(text("SELECT turn_count FROM conversations")).scalar() == 4
            assert c.execute(text("SELECT lease_owner FROM branches")).scalar() is None


# -- integrity and hostile text ------------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE turns; --",
    "Robert'); DROP TABLE conversations;--",
    '" OR 1=1 --',
    "$(rm -rf /)",
    "`rm -rf ~`",
    "&& shutdown -h now ; | cat /etc/passwd > /dev/null",
    "%s %d %(name)s {0} {{}} :param ? $1",
    "back\\slash \\n not a newline \\\\",
    "quotes ' \" ` ´ ‘ ’ “ ” « »",
    "emoji 😀🎉👍🏽 and a family 👩‍👩‍👧‍👦",
    "日本語 · Ελληνικά · עברית · العربية · 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "right-to-left \u202e override and zero\u200bwidth",
    "line\r\nbreaks\rand\u2028separators\u2029end",
    "<script>alert('x')</script> <!-- -->",
    "\x01\x02\x1b[31mescape\x1b[0m",
    '{"type": "image", "source": {"type": "convo_blob"}}',
]


def test_hostile_text_is_stored_and_replayed_unchanged(db_url: str) -> None:
    with Store(db_url) as s:
        c = s.create(MODEL, title=HOSTILE[0], system=HOSTILE[1])
        for i, t in enumerate(HOSTILE):
            c.add_user(t)
            c.add_assistant(f"echo {i}: {t}".rstrip())
        body = c.request(HOSTILE[-1])
        cid = c.id
        assert s.storage.integrity_problems() == []
    with Store(db_url) as s:
        c = s.get(cid)
        assert c.info.title == HOSTILE[0]
        assert c.request(HOSTILE[-1]) == body
        users = [m["content"][0]["text"] for m in body["messages"] if m["role"] == "user"]
        assert users == HOSTILE + [HOSTILE[-1]]
        assert body["system"] == HOSTILE[1]
        assert count(s, Turn.__table__) == 2 * len(HOSTILE)
        stored = [t.content for t in c.turns()]
        assert stored[0::2] == [[text_block(t)] for t in HOSTILE]


# Content shapes, and what a turn's `content` column holds for each: its bare text, or (None)
# the JSON of its blocks.
STORED_FORMS: list[tuple[list[dict[str, Any]], str | None]] = [
    ([text_block("Hello")], "Hello"),
    ([text_block(" a leading space\n\tand é 🙂 \\n")], " a leading space\n\tand é 🙂 \\n"),
    ([text_block('{"looks": "like JSON"}')], '{"looks": "like JSON"}'),
    # Text that starts as JSON does would read back as JSON.
    ([text_block('[{"type": "text", "text": "x"}]')], None),
    ([text_block("[1] a footnote")], None),
    ([text_block("a NUL \x00 inside")], None),  # PostgreSQL's text refuses a NUL
    ([{"type": "text", "text": "cited", "citations": [{"type": "char_location", "cited_text": "c"}]}], None),
    ([{"text": "keys the other way round", "type": "text"}], None),
    ([text_block("two"), text_block("blocks")], None),
]


def test_a_lone_plain_text_block_is_stored_as_bare_text_and_any_other_content_as_json(db_url: str) -> None:
    with Store(db_url) as s:
        c = s.create(MODEL)
        ids = s.storage.append(c.id, "main", None, [NewTurn("user", "user", b) for b, _ in STORED_FORMS])
        with s.storage.engine.connect() as conn:
            raw = dict(conn.execute(select(Turn.__table__.c.id, Turn.__table__.c.content)).all())
        for tid, (blocks, bare) in zip(ids, STORED_FORMS, strict=True):
            if bare is not None:
                assert raw[tid] == bare
            else:
                assert raw[tid] == orjson.dumps(blocks).decode()
        # Every way of reading a turn gives the blocks back, keys in their order.
        as_json = [orjson.dumps(b) for b, _ in STORED_FORMS]
        assert [orjson.dumps(t.content) for t in s.storage.path(c.id).turns] == as_json
        assert [orjson.dumps(s.storage.turn(t).content) for t in ids] == as_json
        assert [orjson.dumps(t.content) for t in s.storage.turns(c.id)] == as_json
        body = c.request("next")
        assert orjson.dumps(body["messages"][0]["content"]) == orjson.dumps(
            [block for b, _ in STORED_FORMS for block in b] + [text_block("next")]
        )
        assert [x.preview for x in s.list()] == ["Hello"]
        # An edit reads the turns above it (`tail`), and an export and its import carry every form.
        edited = c.edit(ids[-1], "edited", name="e")
        assert [orjson.dumps(t.content) for t in s.storage.path(c.id, "e").turns[:-1]] == as_json[:-1]
        assert s.storage.turn(edited).content == [text_block("edited")]
        copy = s.import_(s.export(c.id))
        assert [orjson.dumps(t.content) for t in s.storage.path(copy.id, "main").turns] == as_json
        assert s.storage.integrity_problems() == []


def test_integrity_after_branching_and_deleting(store: Store, tmp_path: Path) -> None:
    c = _branched_conversation(store, tmp_path)
    other = store.create(MODEL)
    other.add_user("keep me")
    assert store.storage.integrity_problems() == []
    c.delete_branch("alt")
    assert store.storage.integrity_problems() == []
    store.storage.delete_conversation(c.id)
    assert store.storage.integrity_problems() == []
    assert [x.id for x in store.list()] == [other.id]
    with pytest.raises(NotFound):
        store.get(c.id)


def test_integrity_problems_are_found(store: Store) -> None:
    """integrity_problems can fail: a turn whose depth is wrong is reported."""
    c = store.create(MODEL)
    c.add_user("one")
    c.add_assistant("two")
    with store.storage.engine.begin() as conn:
        conn.execute(text("UPDATE turns SET depth = 5 WHERE depth = 1"))
    problems = store.storage.integrity_problems()
    assert problems and any("depth" in p for p in problems)


def test_unknown_request_setting_refused_at_create(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.create(MODEL, temprature=0.5)
    assert store.list() == []
