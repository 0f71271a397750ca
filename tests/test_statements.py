"""How many SQL statements convo's hot paths run, on both engines.

The benchmark (benchmarks/) measures time; these tests pin the design the time rests on: a resume
reads a thread in a fixed handful of statements, fork and edit write a fixed handful whatever the
depth, and a send's statements do not grow with the thread. A change that adds a query per turn,
or one more round trip to every resume, fails here before it shows up as a slower benchmark.
Statements are counted as SQLAlchemy sends them and as `db.Reader` and `db.Writer` (a resume's
reads and a send's writes, straight on the driver) send them; transaction control (BEGIN,
COMMIT) and the connection's own PRAGMAs are not statements about data and are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event

from convo import Store
from convo.db import Reader, Writer
from convo.errors import NotFound
from convo.store import FirstCall, NewTurn

DATA = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")


@contextmanager
def counted() -> Iterator[list[str]]:
    """Every data statement any engine runs inside the block (engines made inside included)."""
    seen: list[str] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(DATA):
            seen.append(" ".join(statement.split()))

    def reading(method: Any) -> Any:
        def run(self: Reader, sql: str, params: Any, **kw: Any) -> Any:
            hook(None, None, sql)
            return method(self, sql, params, **kw)

        return run

    plain = Reader._run
    event.listen(Engine, "before_cursor_execute", hook)
    Reader._run = reading(Reader._run)  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        Reader._run = plain  # type: ignore[method-assign]
        event.remove(Engine, "before_cursor_execute", hook)


def thread(store: Store, exchanges: int) -> Any:
    conv = store.create(model="claude-sonnet-4-5", max_tokens=64)
    for i in range(exchanges):
        conv.add_user(f"question {i}")
        conv.add_assistant(f"answer {i}")
    return conv


def test_a_resume_is_four_statements_whatever_the_length(db_url: str) -> None:
    setup = Store(db_url)
    try:
        short, long = thread(setup, 3), thread(setup, 60)
    finally:
        setup.close()
    counts = []
    for conv_id in (short.id, long.id):
        with counted() as seen:
            store = Store(db_url)
            try:
                body = store.get(conv_id[:10]).request("next")
            finally:
                store.close()
        assert body["messages"][-1] == {"role": "user", "content": [{"type": "text", "text": "next"}]}
        counts.append(len(seen))
    # the schema revision, the id prefix, the conversation with its branch head, the path
    assert counts == [4, 4], counts


def test_fork_and_edit_run_the_same_statements_at_depth_3_and_60(db_url: str) -> None:
    store = Store(db_url)
    try:
        forks, edits = [], []
        for exchanges in (3, 60):
            conv = thread(store, exchanges)
            path = store.storage.path(conv.id).turns
            last_user, last_reply = path[-2].id, path[-1].id
            with counted() as seen:
                conv.fork(str(last_reply), name=f"f{exchanges}")
            forks.append(seen)
            with counted() as seen:
                conv.edit(last_user, "question, edited", name=f"e{exchanges}")
            edits.append(seen)
        # Identical statement texts, not just counts: nothing walks or reads the path.
        assert forks[0] == forks[1]
        assert edits[0] == edits[1]
        pg = db_url.startswith("postgresql")
        # fork at a reply: the turn read with the name check, the branch row, the checkout
        # (on PostgreSQL the branch row and the checkout are one statement)
        assert len(forks[0]) == (2 if pg else 3), forks[0]
        # edit of a user turn: the turn read with its parent (the tool-pairing check needs
        # it) and the name check, the new turn, the branch row, the conversation (on
        # PostgreSQL the last three are one statement)
        assert len(edits[0]) == (2 if pg else 4), edits[0]
    finally:
        store.close()


def test_a_postgresql_fork_or_edit_runs_no_transaction_around_its_statements(fresh_pg_url: str) -> None:
    """Its write is one statement, so a fork or an edit on PostgreSQL runs in autocommit: no
    BEGIN and COMMIT round trips. The connection goes back to the pool as it came."""
    store = Store(fresh_pg_url, upgrade=True)
    try:
        conv = thread(store, 3)
        path = store.storage.path(conv.id).turns
        modes: list[bool] = []
        used: list[Any] = []

        def hook(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().upper().startswith(DATA):
                used.append(conn.connection.driver_connection)
                modes.append(used[-1].autocommit)

        event.listen(Engine, "before_cursor_execute", hook)
        try:
            conv.fork(path[-1].id, name="f")
            conv.edit(path[-2].id, "question, edited", name="e")
        finally:
            event.remove(Engine, "before_cursor_execute", hook)
        assert len(modes) == 4 and all(modes), modes
        assert sorted(b.name for b in conv.branches()) == ["e", "f", "main"]
        assert [c.autocommit for c in used] == [False] * 4  # back in the pool as they came
    finally:
        store.close()


def test_a_send_runs_the_same_statements_at_every_length(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    transactions: list[Writer] = []
    begin = Writer._begin

    def beginning(self: Writer) -> None:
        transactions.append(self)
        begin(self)

    monkeypatch.setattr(Writer, "_begin", beginning)
    counts = []
    for exchanges in (2, 40):
        conv = thread(store, exchanges)
        transactions.clear()
        with counted() as seen:
            reply = conv.send("one more")
        assert reply.text
        counts.append(sorted(seen))
    assert counts[0] == counts[1]
    # Reading: the snapshot and the path. Before the call: the branch locked, the user turn,
    # the head and lease, the count, the ledger row; after it: the branch locked, the reply,
    # the head and release, the count, the ledger row completed. On PostgreSQL, where each
    # statement is a round trip, each of the two is one statement that is its own
    # transaction: no BEGIN and COMMIT around it.
    if store.storage.dialect == "postgresql":
        assert len(counts[0]) == 2 + 1 + 1, counts[0]
        assert sum(s.startswith("WITH locked AS") for s in counts[0]) == 2, counts[0]
        assert transactions == []
    else:
        assert len(counts[0]) == 2 + 5 + 5, counts[0]
        assert len(transactions) == 2


def test_a_checkout_is_one_statement_and_an_unknown_branch_writes_nothing(store: Store) -> None:
    conv = thread(store, 3)
    conv.fork(conv.turns()[-1].id, "side", checkout=False)
    with counted() as seen:
        conv.checkout("side")
    assert len(seen) == 1 and seen[0].startswith("UPDATE conversations"), seen
    assert conv.branch == "side"
    before = conv.info.updated_at
    with pytest.raises(NotFound):
        conv.checkout("nowhere")
    assert conv.branch == "side" and conv.info.updated_at == before


@pytest.mark.parametrize("depth_known", [False, True], ids=["depth-looked-up", "depth-given"])
def test_a_send_writes_the_same_ledger_row_on_both_engines_whatever_the_path(
    db_url: str, depth_known: bool
) -> None:
    """PostgreSQL writes a send's turn, head, count and ledger row in one statement (raw SQL
    text; with the parent's depth given, one that also locks the branch, in autocommit);
    SQLite in several. All must leave the same rows: every column of the call, naive
    datetimes read as UTC (not the session's zone), fields given to finish a call overriding
    its end, and the reply id always the stored reply's."""
    url = db_url
    if db_url.startswith("postgresql"):
        url += "?options=-c%20timezone%3DAmerica/New_York"  # a session zone that is not UTC
    with Store(url) as store:
        conv = store.create(model="claude-sonnet-4-5", max_tokens=64)
        storage = store.storage
        started = datetime(2026, 1, 1, 12, 0, 0, 250_000)  # naive: UTC by convo's rule
        ended = datetime(2026, 1, 1, 12, 0, 3, tzinfo=UTC)
        (user_id,), call_id = storage.begin_send(
            conv.id, "main", None, [NewTurn("user", "user", [{"type": "text", "text": "hi"}])],
            owner="me", hold=timedelta(minutes=5), head_depth=None,
            first_call=FirstCall(started, "claude-sonnet-4-5", True),
        )
        pending = storage.calls(conv.id)[0]
        assert pending["started_at"] == started.replace(tzinfo=UTC)
        assert (pending["status"], pending["streamed"], pending["attempt"]) == ("pending", 1, 0)
        assert (pending["input_tokens"], pending["output_tokens"], pending["turn_id"]) == (0, 0, user_id)
        assert storage.branch(conv.id, "main").lease_owner == "me"
        reply = NewTurn("assistant", "reply", [{"type": "text", "text": "hello"}], stop_reason="end_turn")
        fields = {"status": "ok", "input_tokens": 7, "output_tokens": 3, "cost_usd": 0.5,
                  "finished_at": ended, "reply_id": 10**9}
        reply_id = storage.finish_with_reply(
            call_id, conv.id, "main", user_id, reply, "me", fields, started_at=started,
            parent_depth=0 if depth_known else None,
        )
        done = storage.calls(conv.id)[0]
        assert done["reply_id"] == reply_id != 10**9
        assert done["finished_at"] == ended
        assert (done["status"], done["input_tokens"], done["output_tokens"], done["cost_usd"]) == ("ok", 7, 3, 0.5)
        assert done["duration_ms"] == pytest.approx(
            (datetime.now(UTC) - started.replace(tzinfo=UTC)).total_seconds() * 1000, abs=60_000
        )
        branch = storage.branch(conv.id, "main")
        assert (branch.head_id, branch.lease_owner, branch.lease_expires) == (reply_id, None, None)
        info = storage.conversation(conv.id)
        assert info.turn_count == 2 and not info.has_media
        assert [t.id for t in storage.path(conv.id).turns] == [user_id, reply_id]
