"""convo's side of the benchmark: populating a store fast, and undoing measured writes.

Population goes through `Storage.append` in batches of turns (the path a send takes to write
turns), plus the calls ledger inserted directly as rows of `convo.models.Call`, exactly as a
successful send would leave them. Only population and clean-up use these shortcuts; every
measured operation goes through the public service layer (`convo.Store`, `Conversation`).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.engine import make_url

from benchmarks.data import MAX_TOKENS, MODEL, Dataset
from benchmarks.floor import build_body
from convo import Store, db
from convo import store as store_mod
from convo.client import Client
from convo.ids import new_id
from convo.models import ROLE_OF_KIND, Base, Branch, Call, Conversation, Turn
from convo.store import FirstCall, NewTurn, lease_owner_id

K = cast(Table, Call.__table__)
T = cast(Table, Turn.__table__)
B = cast(Table, Branch.__table__)
C = cast(Table, Conversation.__table__)
CALL_BATCH = 5000


@dataclass
class Populated:
    conversation_ids: list[str]
    # (user turn id, reply id) per exchange, per thread.
    turn_ids: list[list[tuple[int, int]]]


@contextmanager
def _no_commit_wait() -> Iterator[None]:
    """PostgreSQL sessions opened inside skip waiting for the WAL flush at commit (libpq reads
    PGOPTIONS when it connects): population only, so thousands of small appends take seconds.
    Every measured operation runs on connections opened afterwards, with the server's setting."""
    old = os.environ.get("PGOPTIONS")
    os.environ["PGOPTIONS"] = ((old or "") + " -c synchronous_commit=off").strip()
    try:
        yield
    finally:
        if old is None:
            del os.environ["PGOPTIONS"]
        else:
            os.environ["PGOPTIONS"] = old


def populate(url: str, ds: Dataset) -> Populated:
    with _no_commit_wait():
        return _populate(url, ds)


def _populate(url: str, ds: Dataset) -> Populated:
    store = Store(url, upgrade=True)
    try:
        storage = store.storage
        conv_ids = [store.create(MODEL, max_tokens=MAX_TOKENS).id for _ in ds.threads]
        keys = [storage.conversation(cid).key for cid in conv_ids]
        heads: list[int | None] = [None] * len(ds.threads)
        turn_ids: list[list[tuple[int, int]]] = [[] for _ in ds.threads]
        calls: list[dict[str, Any]] = []
        for t, a, b in ds.chunks:
            exchanges = ds.threads[t][a:b]
            turns: list[NewTurn] = []
            for ex in exchanges:
                turns.append(NewTurn("user", "user", ex.user))
                turns.append(NewTurn("assistant", "reply", ex.reply, stop_reason="end_turn"))
            ids = storage.append(conv_ids[t], "main", heads[t], turns)
            heads[t] = ids[-1]
            ts = datetime.now(UTC)
            for k, ex in enumerate(exchanges):
                user_id, reply_id = ids[2 * k], ids[2 * k + 1]
                turn_ids[t].append((user_id, reply_id))
                calls.append(call_row(keys[t], user_id, reply_id, ex.input_tokens, ex.output_tokens, ex.cost, ts))
        insert_calls(store, calls)
        return Populated(conv_ids, turn_ids)
    finally:
        store.close()


def call_row(
    conv_key: int, turn_id: int, reply_id: int, inp: int, out: int, cost: float, ts: datetime
) -> dict[str, Any]:
    """A calls row as a successful, non-streamed send leaves it."""
    return {
        "conversation_key": conv_key,
        "branch": "main",
        "turn_id": turn_id,
        "reply_id": reply_id,
        "attempt": 0,
        "model": MODEL,
        "streamed": 0,
        "status": "ok",
        "http_status": 200,
        "error_type": None,
        "error_message": None,
        "request_id": "req_" + new_id(),
        "message_id": "msg_" + new_id(),
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "partial_text": None,
        "input_tokens": inp,
        "output_tokens": out,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation_5m_input_tokens": None,
        "cache_creation_1h_input_tokens": None,
        "cost_usd": cost,
        "uncached_cost_usd": cost,
        "started_at": ts,
        "finished_at": ts,
        "duration_ms": 1500.0,
    }


def insert_calls(store: Store, rows: list[dict[str, Any]]) -> None:
    for i in range(0, len(rows), CALL_BATCH):
        with db.write(store.storage.engine) as conn:
            conn.execute(insert(K), rows[i : i + CALL_BATCH])


def mock_http(reply_bytes: bytes) -> tuple[httpx.Client, dict[str, bytes]]:
    """An httpx client whose transport answers every POST in process with `reply_bytes`.

    The last request body is kept (a reference, no parsing) so it can be checked afterwards.
    """
    captured: dict[str, bytes] = {}
    headers = {"content-type": "application/json", "request-id": "req_01BenchmarkRequest0000000"}

    def handler(request: httpx.Request) -> httpx.Response:
        captured["body"] = request.content
        return httpx.Response(200, content=reply_bytes, headers=headers)

    return httpx.Client(transport=httpx.MockTransport(handler)), captured


def mock_client(reply_bytes: bytes) -> tuple[Client, dict[str, bytes]]:
    """A convo Client over `mock_http`."""
    http, captured = mock_http(reply_bytes)
    return Client(api_key="sk-bench", base_url="https://api.invalid", http_client=http), captured


def send_writes(
    store: Store, conv_id: str, head: int | None, head_depth: int | None, user_text: str,
    reply: dict[str, Any], cost: float,
) -> tuple[int, int, int]:
    """The writes of one send, in its order and its two transactions, through convo's storage
    layer (internal API): the user turn with the branch lease and the pending call row, then
    the reply, its usage and the lease's release. Returns (call id, user turn id, reply id)."""
    storage = store.storage
    owner = lease_owner_id()
    first = FirstCall(datetime.now(UTC), MODEL, False)
    (user_id,), call_id = storage.begin_send(
        conv_id, "main", head, [NewTurn("user", "user", [{"type": "text", "text": user_text}])],
        owner=owner, hold=timedelta(minutes=15), head_depth=head_depth, first_call=first,
    )
    usage = reply["usage"]
    fields = {
        "status": "ok", "http_status": 200, "request_id": "req_bench", "message_id": reply["id"],
        "stop_reason": reply["stop_reason"], "stop_sequence": None,
        "input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
        "cost_usd": cost, "uncached_cost_usd": cost,
    }
    reply_turn = NewTurn("assistant", "reply", reply["content"], stop_reason=reply["stop_reason"])
    reply_id = storage.finish_with_reply(
        call_id, conv_id, "main", user_id, reply_turn, owner, fields,
        parent_depth=None if head_depth is None else head_depth + 1, started_at=first.started_at,
    )
    return call_id, user_id, reply_id


def bare_resume(convo_url: str, conv_id: str, next_text: str, model: str, max_tokens: int) -> dict[str, Any]:
    """convo's own resume SQL (the snapshot and the path, as `Storage.snapshot` runs them on a
    linear thread) on a fresh bare-driver connection to convo's database, the body built as the
    floor builds it: what convo's schema costs, without SQLAlchemy or the rest of convo."""
    url = make_url(convo_url)
    if url.get_backend_name() == "sqlite":
        conn: Any = sqlite3.connect(url.database or "")
        dialect = "sqlite"
    else:
        import psycopg

        conn = psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True)
        dialect = "postgresql"
    try:
        snap = conn.execute(
            db._paramstyle(store_mod._SNAPSHOT, dialect), {"conv_id": conv_id, "branch": None}
        ).fetchone()
        key, depth = snap[0], snap[13]
        rows = conn.execute(
            db._paramstyle(store_mod._LINEAR_PATH, dialect), {"conv_key": key, "depth": depth}
        ).fetchall()
    finally:
        conn.close()
    return build_body(((ROLE_OF_KIND[r[1]], r[2]) for r in rows), [{"type": "text", "text": next_text}], model, max_tokens,
                      store_mod.decode_content)


def sqlite_schema(convo_url: str) -> list[str]:
    """The CREATE statements of convo's SQLite database (tables and indexes; SQLite's own
    sqlite_sequence and statistics tables come with them), its `turns` renamed `convo_turns` so they can sit
    beside the floor's own `turns` table: what a fresh connection to convo's file parses."""
    url = make_url(convo_url)
    conn = sqlite3.connect(url.database or "")
    try:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite!_%' ESCAPE '!' "
            "ORDER BY type DESC, rowid"  # tables before the indexes on them
        ).fetchall()
    finally:
        conn.close()
    return [re.sub(r"\bturns\b", "convo_turns", r[0]) for r in rows]


def row_counts(store: Store) -> dict[str, int]:
    with db.read(store.storage.engine) as conn:
        return {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in Base.metadata.sorted_tables
        }


def table_rows(store: Store, conv_id: str) -> dict[tuple[str, Any], tuple[Any, ...]]:
    """Every row a branch operation on the conversation could write, keyed by (table, primary
    key): its turns, calls and branches, its own row, and the small shared tables. Compared
    before and after an operation, the rows it added, removed or changed (an UPDATE included,
    which a row count misses)."""
    key = _key(conv_id)
    out: dict[tuple[str, Any], tuple[Any, ...]] = {}
    with db.read(store.storage.engine) as conn:
        for table in Base.metadata.sorted_tables:
            q = select(table)
            if "conversation_key" in table.c:
                q = q.where(table.c.conversation_key == key)
            for row in conn.execute(q):
                pk = tuple(row._mapping[c.name] for c in table.primary_key.columns)
                out[(table.name, pk)] = tuple(row)
    return out


def rows_changed(before: dict[Any, Any], after: dict[Any, Any]) -> int:
    """Rows added, removed or changed between two `table_rows` readings."""
    return len(before.keys() ^ after.keys()) + sum(before[k] != after[k] for k in before.keys() & after.keys())


def _key(conv_id: str) -> Any:
    return select(C.c.key).where(C.c.id == conv_id).scalar_subquery()


def head_state(store: Store, conv_id: str) -> tuple[int | None, int, Any, str]:
    with db.read(store.storage.engine) as conn:
        head = conn.execute(
            select(B.c.head_id).where(B.c.conversation_key == _key(conv_id), B.c.name == "main")
        ).scalar_one()
        count, updated, current = conn.execute(
            select(C.c.turn_count, C.c.updated_at, C.c.current_branch).where(C.c.id == conv_id)
        ).one()
    return head, count, updated, current


def undo_send(store: Store, conv_id: str, state: tuple[Any, ...], call_ids: list[int], turn_ids: list[int]) -> None:
    """Put the thread back as it was before a measured send (not measured)."""
    head, count, updated, _ = state
    with db.write(store.storage.engine) as conn:
        conn.execute(
            update(B)
            .where(B.c.conversation_key == _key(conv_id), B.c.name == "main")
            .values(head_id=head, lease_owner=None, lease_expires=None)
        )
        conn.execute(delete(K).where(K.c.id.in_(call_ids)))
        for tid in reversed(turn_ids):  # children first: turns reference their parent
            conn.execute(delete(T).where(T.c.id == tid))
        conn.execute(update(C).where(C.c.id == conv_id).values(turn_count=count, updated_at=updated))


def drop_branch(store: Store, conv_id: str, name: str, turn_ids: Sequence[int] = ()) -> None:
    """Remove a measured fork's or edit's branch (and an edit's new turn); check out main."""
    with db.write(store.storage.engine) as conn:
        conn.execute(update(C).where(C.c.id == conv_id).values(current_branch="main"))
        conn.execute(delete(B).where(B.c.conversation_key == _key(conv_id), B.c.name == name))
        for tid in turn_ids:
            conn.execute(delete(T).where(T.c.id == tid))
        if turn_ids:
            conn.execute(update(C).where(C.c.id == conv_id).values(turn_count=C.c.turn_count - len(turn_ids)))
