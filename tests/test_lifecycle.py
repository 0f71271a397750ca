"""A conversation's life after `create`: its settings changed for later requests, and its
deletion, all or nothing, on both engines; and the `convo set` and `convo delete` commands."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.kit import dump_rows, row_counts
from sqlalchemy import select
from test_content import make_png

from convo import Store
from convo.errors import AmbiguousId, Conflict, InvalidInput, NotFound
from convo.models import Blob
from convo.store import FirstCall, NewTurn

SYSTEM_5M = [{"type": "text", "text": "Rules.", "cache_control": {"type": "ephemeral"}}]
TOOL = {"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}


def exchange(conv: Any, n: int = 1) -> None:
    for i in range(n):
        conv.add_user(f"question {i}")
        conv.add_assistant(f"answer {i}")


# -- configure ---------------------------------------------------------------------------------


def test_configure_changes_later_requests_and_leaves_the_turns(store: Store) -> None:
    conv = store.create(model="claude-sonnet-4-5", system="Be terse.", title="t", temperature=0.5)
    exchange(conv, 2)
    turns = [(t.id, t.content) for t in conv.turns()]
    conv.configure(model="claude-opus-4-5", system="Be kind.", title="new", max_tokens=77, top_k=5)
    body = conv.request("next")
    assert (body["model"], body["system"], body["max_tokens"], body["top_k"]) == (
        "claude-opus-4-5", "Be kind.", 77, 5
    )
    assert body["temperature"] == 0.5  # untouched settings stay
    assert conv.info.title == "new"
    assert [(t.id, t.content) for t in conv.turns()] == turns
    # None removes a setting (the API's default again); temperature 0 is a value, not a removal.
    conv.configure(temperature=None, system=None, title=None)
    body = conv.request("next")
    assert "temperature" not in body and "system" not in body and conv.info.title is None
    conv.configure(temperature=0)
    assert conv.request("next")["temperature"] == 0
    # Another handle (another process) sees the change.
    with Store(store.url) as other:
        assert other.get(conv.id).request("next") == conv.request("next")


def test_configure_cache_and_tools(store: Store) -> None:
    conv = store.create(model="claude-sonnet-4-5")
    assert conv.request("x")["cache_control"] == {"type": "ephemeral"}
    conv.configure(cache="off", tools=[TOOL])
    body = conv.request("x")
    assert "cache_control" not in body and body["tools"] == [TOOL]
    conv.configure(cache="1h", tools=None)
    body = conv.request("x")
    assert body["cache_control"] == {"type": "ephemeral", "ttl": "1h"} and "tools" not in body


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"max_tokens": None}, "max_tokens cannot be removed"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"temperature": 3}, "temperature must be a number from 0 to 1"),
        ({"model": "  "}, "model must be a non-empty string"),
        ({"system": "   "}, "system prompt is empty"),
        ({"budget_usd": 5}, "use set_limits"),
        ({"stream": True}, "unknown request setting 'stream'"),
        ({"title": 5}, "title must be a non-blank string"),
        ({"title": "  "}, "title must be a non-blank string"),
        ({"title": "\ud800"}, "title is not valid text"),
        ({"model": "claude\udcff"}, "model is not valid text"),
        # stored by orjson, these would come back as null
        ({"metadata": {"user_id": float("nan")}}, "not valid JSON"),
        ({"thinking": {"type": "enabled", "budget_tokens": float("inf")}}, "not valid JSON"),
        ({"tools": [{"name": "bad name!"}]}, "tool"),
        # the API reads tools, system, then messages, and refuses a 1h marker after a 5m one
        ({"system": SYSTEM_5M, "cache": "1h"}, "1-hour cache marker comes after a 5-minute one"),
    ],
)
def test_configure_refuses_bad_settings_and_writes_nothing(
    store: Store, changes: dict[str, Any], fragment: str
) -> None:
    conv = store.create(model="claude-sonnet-4-5", system="Be terse.", title="t")
    before = dump_rows(store.url)
    with pytest.raises(InvalidInput, match=fragment):
        conv.configure(**changes)
    assert dump_rows(store.url) == before


def test_create_refuses_what_configure_refuses(store: Store) -> None:
    """What a request would be refused for is refused when the settings are given, not at
    every send after (settings the builder checks: tools with tool_choice, thinking budgets)."""
    before = dump_rows(store.url)
    cases: list[dict[str, Any]] = [
        {"title": "\ud800"}, {"model": "x\udcff"}, {"metadata": {"user_id": float("nan")}},
        {"tools": [TOOL, TOOL]},
        {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"}},
        {"max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 1000}},
        {"max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 4096}},
    ]
    conv = store.create(model="claude-sonnet-4-5")
    before = dump_rows(store.url)
    for kwargs in cases:
        with pytest.raises(InvalidInput):
            store.create(**{"model": "claude-sonnet-4-5", **kwargs})
        with pytest.raises(InvalidInput):
            conv.configure(**kwargs)
    assert dump_rows(store.url) == before


def test_a_1h_cache_after_5m_markers_is_refused_at_create_and_per_request(store: Store) -> None:
    with pytest.raises(InvalidInput, match="1-hour cache marker"):
        store.create(model="claude-sonnet-4-5", system=SYSTEM_5M, cache="1h")
    conv = store.create(model="claude-sonnet-4-5", system=SYSTEM_5M)
    before = dump_rows(store.url)
    with pytest.raises(InvalidInput, match="1-hour cache marker"):
        conv.send("hi", cache="1h")
    assert dump_rows(store.url) == before
    # 1h first, then 5m, is the order the API takes.
    long_first = [{**SYSTEM_5M[0], "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    body = store.create(model="claude-sonnet-4-5", system=long_first).request("hi")
    assert body["cache_control"] == {"type": "ephemeral"}


def test_limits_and_settings_changed_one_after_another_keep_each_other(store: Store) -> None:
    conv = store.create(model="claude-sonnet-4-5", budget_usd=2.0)
    conv.configure(temperature=0.1)
    conv.set_limits(max_input_tokens=5000)
    conv.configure(max_tokens=10)
    assert conv.limits == {"budget_usd": 2.0, "max_input_tokens": 5000}
    assert conv.settings()["temperature"] == 0.1 and conv.settings()["max_tokens"] == 10
    conv.set_limits(budget_usd=None)
    assert conv.limits == {"budget_usd": None, "max_input_tokens": 5000}


# -- delete ------------------------------------------------------------------------------------


def _image_turn(conv: Any, tmp_path: Path, name: str, side: int) -> str:
    path = tmp_path / name
    path.write_bytes(make_png(side, side))
    conv.add_user("look", images=[path])
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _blob_shas(store: Store) -> set[str]:
    with store.storage.engine.connect() as conn:
        return set(conn.execute(select(Blob.__table__.c.sha256)).scalars())


def test_delete_removes_the_whole_conversation_and_nothing_else(store: Store, tmp_path: Path) -> None:
    keep = store.create(model="claude-sonnet-4-5")
    keep.send("hello")
    shared = _image_turn(keep, tmp_path, "shared.png", 3)
    kept_body = keep.request("next")
    gone = store.create(model="claude-sonnet-4-5")
    gone.send("one")
    gone.send("two")
    gone.fork(gone.turns()[1].id, "side")
    _image_turn(gone, tmp_path, "shared.png", 3)
    own = _image_turn(gone, tmp_path, "own.png", 5)
    spent = store.usage().total
    mine = gone.usage().total
    before = row_counts(store.url)

    result = store.delete(gone.id[:10])

    assert (result.id, result.turns, result.branches, result.calls, result.blobs) == (gone.id, 6, 2, 2, 1)
    after = row_counts(store.url)
    assert before["turns"] - after["turns"] == 6 and before["calls"] - after["calls"] == 2
    assert before["conversations"] - after["conversations"] == 1
    assert before["branches"] - after["branches"] == 2
    # An image another conversation holds stays; the deleted one's own is gone.
    assert shared in _blob_shas(store) and own not in _blob_shas(store)
    assert keep.request("next") == kept_body
    assert store.usage().total.calls == spent.calls - mine.calls
    with pytest.raises(NotFound):
        store.get(gone.id)
    assert [c.id for c in store.list()] == [keep.id]


def test_delete_refuses_unknown_ambiguous_and_busy_and_writes_nothing(store: Store) -> None:
    conv = store.create(model="claude-sonnet-4-5")
    exchange(conv)
    before = dump_rows(store.url)
    with pytest.raises(NotFound):
        store.delete("zzzzzzzz")
    with pytest.raises(AmbiguousId):
        store.create(model="claude-sonnet-4-5")
        store.delete("0")
    before = dump_rows(store.url)
    # A send in flight on one of its branches holds a lease: its reply would have nowhere to go.
    storage = store.storage
    head = int(conv.turns()[-1].id)
    storage.begin_send(
        conv.id, "main", head, [NewTurn("user", "user", [{"type": "text", "text": "q"}])],
        owner="another-host:1:x", hold=timedelta(minutes=5), head_depth=None,
        first_call=FirstCall(datetime.now(UTC), "claude-sonnet-4-5", False),
    )
    during = dump_rows(store.url)
    assert during != before
    with pytest.raises(Conflict, match="busy"):
        store.delete(conv.id)
    assert dump_rows(store.url) == during


def test_delete_after_an_abandoned_send_goes_ahead(store: Store) -> None:
    conv = store.create(model="claude-sonnet-4-5")
    exchange(conv)
    store.storage.begin_send(
        conv.id, "main", int(conv.turns()[-1].id), [NewTurn("user", "user", [{"type": "text", "text": "q"}])],
        owner="another-host:1:x", hold=timedelta(seconds=-1), head_depth=None,
        first_call=FirstCall(datetime.now(UTC), "claude-sonnet-4-5", False),
    )
    assert store.delete(conv.id).calls == 1
    assert row_counts(store.url)["conversations"] == 0


def test_cli_set_and_delete(tmp_path: Path) -> None:
    from test_cli import child_env, convo, ok, one_error

    db = f"sqlite:///{tmp_path / 'c.db'}"
    env = child_env(None)
    cid = ok(convo(db, "new", "--title", "first", env=env)).out.strip()
    shown = ok(convo(db, "set", "--model", "claude-opus-4-5", "--temperature", "0", "--no-cache", env=env)).out
    assert "model:       claude-opus-4-5" in shown and "cache:       off" in shown
    assert "temperature: 0.0" in shown and "title:       first" in shown
    body = ok(convo(db, "request", "hi", env=env)).json()
    assert body["model"] == "claude-opus-4-5" and body["temperature"] == 0 and "cache_control" not in body
    one_error(convo(db, "set", "--temperature", "2", env=env), 2, "--temperature")
    one_error(convo(db, "set", "--title", " ", env=env), 2, "title")
    one_error(convo(db, "delete", "nope", env=env), 2, "no conversation")
    deleted = ok(convo(db, "delete", cid[:8], env=env)).out
    assert deleted.strip() == f"deleted conversation {cid}: 0 turns, 1 branch, 0 calls in the ledger"
    assert ok(convo(db, "list", "--json", env=env)).json() == []


def test_an_image_turn_is_stored_once_across_conversations(store: Store, tmp_path: Path) -> None:
    """The premise of the blob checks above: the same bytes are one row, whoever wrote them."""
    a, b = store.create(model="claude-sonnet-4-5"), store.create(model="claude-sonnet-4-5")
    sha = _image_turn(a, tmp_path, "p.png", 4)
    assert _image_turn(b, tmp_path, "p.png", 4) == sha
    assert _blob_shas(store) == {sha}
    store.delete(a.id)
    assert _blob_shas(store) == {sha}
    assert base64.b64decode(b.request()["messages"][0]["content"][0]["source"]["data"]) == make_png(4, 4)
    store.delete(b.id)
    assert _blob_shas(store) == set()


def test_postgresql_delete_waits_for_a_writer_that_may_still_refer_to_an_image(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    """A writer stores an image as a blob row written once, by content (a writer that finds it
    there writes nothing), then its turn, in one transaction. A delete that dropped the blob
    in between, because the turn was not yet committed, would leave that turn without its
    bytes: the delete waits for such writers first."""
    import threading

    import psycopg

    with Store(fresh_pg_url, upgrade=True) as store:
        gone, other = store.create(model="claude-sonnet-4-5"), store.create(model="claude-sonnet-4-5")
        sha = _image_turn(gone, tmp_path, "p.png", 4)
        image_turn = gone.turns()[-1]
        dsn = fresh_pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as writer:
            # The other writer, mid-transaction: the blob "stored" (it was there already)...
            writer.execute(
                "INSERT INTO blobs (sha256, media_type, size, data, created_at) "
                "SELECT sha256, media_type, size, data, created_at FROM blobs WHERE sha256 = %s "
                "ON CONFLICT (sha256) DO NOTHING",
                (sha,),
            )
            done: list[Any] = []
            deleting = threading.Thread(target=lambda: done.append(store.delete(gone.id)))
            deleting.start()
            deleting.join(0.5)
            assert deleting.is_alive() and not done  # waiting for the writer
            # ...then its turn, which refers to the blob, and commit.
            writer.execute(
                "UPDATE conversations SET has_media = true, turn_count = 1 WHERE id = %s", (other.id,)
            )
            writer.execute(
                "INSERT INTO turns (conversation_key, parent_id, created_at, depth, role, kind, content) "
                "SELECT key, NULL, now(), 0, 'user', 'user', t.content FROM conversations, turns t "
                "WHERE conversations.id = %s AND t.id = %s",
                (other.id, image_turn.id),
            )
            writer.execute(
                "UPDATE branches SET head_id = currval(pg_get_serial_sequence('turns', 'id')) "
                "WHERE conversation_key = (SELECT key FROM conversations WHERE id = %s)",
                (other.id,),
            )
            writer.commit()
        deleting.join(10)
        assert done and done[0].blobs == 0
        assert _blob_shas(store) == {sha}
        body = other.request()
        assert base64.b64decode(body["messages"][0]["content"][0]["source"]["data"]) == make_png(4, 4)


@pytest.mark.parametrize("action", ["fork", "edit", "send"])
def test_postgresql_writers_that_come_during_a_delete_wait_for_it_then_find_nothing(
    fresh_pg_url: str, client: Any, action: str
) -> None:
    """A fork, an edit or a send that reaches the conversation while it is being deleted waits
    for the delete, then finds no conversation: nothing is written into what was deleted, and
    no deadlock is left for the database to break."""
    import threading

    from sqlalchemy import event

    with Store(fresh_pg_url, upgrade=True, client=client) as store, Store(fresh_pg_url, client=client) as other:
        conv = store.create(model="claude-sonnet-4-5")
        exchange(conv, 2)
        turn = conv.turns()[1].id
        held, go = threading.Event(), threading.Event()

        def pause(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.startswith("DELETE FROM calls"):
                held.set()
                go.wait(10)

        event.listen(store.storage.engine, "before_cursor_execute", pause)
        done: list[Any] = []
        deleting = threading.Thread(target=lambda: done.append(store.delete(conv.id)))
        deleting.start()
        assert held.wait(10)  # the delete holds its locks

        failed: list[BaseException] = []

        def write() -> None:
            c = other.get(conv.id)
            try:
                {"fork": lambda: c.fork(turn, "late"), "edit": lambda: c.edit(turn, "late"),
                 "send": lambda: c.send("late")}[action]()
            except BaseException as e:  # noqa: BLE001 - the test looks at what it was
                failed.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()  # waiting for the delete
        go.set()
        deleting.join(10)
        writer.join(10)
        assert done and done[0].turns == 4
        assert len(failed) == 1 and isinstance(failed[0], NotFound), failed
        assert row_counts(store.url)["turns"] == 0 and row_counts(store.url)["branches"] == 0


def test_settings_and_limits_changed_at_once_from_two_stores_keep_both(db_url: str) -> None:
    """Each change reads and writes the conversation in one transaction that holds its row: a
    change made from a stale read would put the other one's value back."""
    import threading

    with Store(db_url) as setup:
        conv_id = setup.create(model="claude-sonnet-4-5").id
    rounds = 40

    def settings() -> None:
        with Store(db_url) as s:
            for i in range(rounds):
                s.get(conv_id).configure(top_k=i + 1)

    def limits() -> None:
        with Store(db_url) as s:
            for i in range(rounds):
                s.get(conv_id).set_limits(max_input_tokens=1000 + i)

    threads = [threading.Thread(target=settings), threading.Thread(target=limits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with Store(db_url) as s:
        conv = s.get(conv_id)
        assert conv.settings()["top_k"] == rounds
        assert conv.limits["max_input_tokens"] == 1000 + rounds - 1


def test_a_tool_choice_for_requests_that_bring_their_tools_is_kept(store: Store) -> None:
    """run() and send(tools=...) bring tools per request: a conversation may hold a
    tool_choice without tools of its own, and its export imports."""
    import convo

    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    conv = store.create(model="claude-sonnet-4-5", tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert conv.run("What's the weather in Paris?", tools=[get_weather]).stop_reason == "end_turn"
    copy = store.import_(store.export(conv.id))
    assert copy.settings()["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    with pytest.raises(InvalidInput, match="needs tools"):
        copy.send("hello")  # a request with no tools at all is still refused, before writing


def test_settings_stored_before_a_check_existed_can_be_retitled_and_repaired(store: Store, tmp_path: Path) -> None:
    from sqlalchemy import update
    from test_cli import child_env, ok
    from test_cli import convo as run_cli

    from convo.models import Conversation as Row

    conv = store.create(model="claude-sonnet-4-5", max_tokens=4096)
    bad = {**conv.info.params, "thinking": {"type": "enabled", "budget_tokens": 1000}}
    with store.storage.engine.begin() as c:  # as an older convo could have stored it
        c.execute(update(Row).where(Row.id == conv.id).values(params=json.dumps(bad)))
    conv.configure(title="still works")  # a title sends nothing
    with pytest.raises(InvalidInput, match="budget_tokens"):
        conv.configure(max_tokens=8000)  # a change to what is sent must leave a sendable request
    if store.storage.dialect == "sqlite":
        db = store.url
        ok(run_cli(db, "set", "-C", conv.id, "--unset", "thinking", env=child_env(None)))
        assert "thinking" not in conv.settings()
        assert conv.request("hi")["max_tokens"] == 4096


def test_postgresql_delete_while_another_writer_holds_a_branch_is_a_conflict_at_once(fresh_pg_url: str) -> None:
    import time

    import psycopg

    with Store(fresh_pg_url, upgrade=True) as store:
        conv = store.create(model="claude-sonnet-4-5")
        exchange(conv)
        with psycopg.connect(fresh_pg_url.replace("postgresql+psycopg://", "postgresql://")) as other:
            other.execute("SELECT 1 FROM branches FOR UPDATE")  # a send in its transaction, say
            began = time.monotonic()
            with pytest.raises(Conflict, match="busy"):
                store.delete(conv.id)
            assert time.monotonic() - began < 5  # without waiting for the other writer
        assert store.delete(conv.id).turns == 2


def test_loose_values_a_review_found_are_refused(store: Store) -> None:
    conv = store.create(model="claude-sonnet-4-5")
    before = dump_rows(store.url)
    for action in (
        lambda: conv.configure(cache=0),  # (0 == False, which means off)
        lambda: conv.configure(cache=1),
        lambda: conv.set_limits(max_input_tokens=1.5),
        lambda: store.create(model="claude-sonnet-4-5", max_input_tokens=2.5),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput):
            action()
    assert dump_rows(store.url) == before
    conv.set_limits(max_input_tokens=1000.0)  # a whole number, as JSON may hold it
    assert conv.limits["max_input_tokens"] == 1000


def test_what_older_convo_stored_still_works(store: Store, tmp_path: Path) -> None:
    """Branch names from before the naming rules, a negative call duration (a clock stepped
    back), a title past today's limit: found, exported and imported as they were (cut)."""
    from sqlalchemy import insert, update

    from convo.models import Branch, Call
    from convo.models import Conversation as Row

    conv = store.create(model="claude-sonnet-4-5")
    conv.send("hello")
    head = conv.turns()[-1].id
    key = store.storage.conversation(conv.id).key
    old_names = ["old\tname", "trailing ", "a\u202eb"]
    with store.storage.engine.begin() as c:
        for name in old_names:
            c.execute(insert(Branch).values(conversation_key=key, name=name, head_id=head,
                                            created_at=datetime.now(UTC)))
        c.execute(update(Call).values(duration_ms=-2000.0))
        c.execute(update(Row).where(Row.id == conv.id).values(title="T" * 1500))
    for name in old_names:
        assert [t.id for t in conv.turns(name)] == [t.id for t in conv.turns()]
        assert store.usage(branch=name).total.calls == 0  # (no call was made on it)
    conv.checkout(old_names[0])
    conv.checkout("main")
    for name in old_names:  # (an import holds names to today's rules)
        conv.delete_branch(name)
    data = store.export(conv.id)
    assert data["calls"][0]["duration_ms"] == 0
    copy = store.import_(data)
    assert copy.info.title == "T" * 1000


def test_a_send_under_way_when_its_store_is_closed_still_stores_its_reply(
    db_url: str, standin: Any, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() from another thread while a send waits for its reply: the reply is stored and
    its call completed (a paid-for reply was lost, and the branch held for 15 minutes); a send
    started after close() is refused before it writes anything."""
    import threading

    from convo.errors import StoreError

    store = Store(db_url, client=client)
    conv = store.create(model="claude-sonnet-4-5")
    waiting, go = threading.Event(), threading.Event()
    real = client.create_message_once

    def slow(body: Any) -> Any:
        waiting.set()
        go.wait(10)
        return real(body)

    monkeypatch.setattr(client, "create_message_once", slow)
    done: list[Any] = []
    sender = threading.Thread(target=lambda: done.append(conv.send("hello")))
    sender.start()
    assert waiting.wait(10)
    store.close()
    go.set()
    sender.join(10)
    assert done and done[0].text
    with Store(db_url, client=client) as other:
        again = other.get(conv.id)
        assert [c["status"] for c in again.calls()] == ["ok"]
        assert [t.kind for t in again.turns()] == ["user", "reply"]
        before = row_counts(db_url)
        with pytest.raises(StoreError, match="closed"):
            conv.send("after close")
        assert row_counts(db_url) == before


def test_a_database_path_with_a_no_break_space_or_joiner_is_a_path(tmp_path: Path) -> None:
    for name in ("d\u00a0x", "d\u202fx", "d\u200cx"):
        with Store(f"sqlite:///{tmp_path / name / 'c.db'}") as s:
            assert s.create().id
