"""The floor: the simplest correct store a person would write by hand, timed beside convo.

One `turns` table (integer id, conversation_id, role, content as JSON text, input/output tokens,
cost) with an index on (conversation_id, id); plain `sqlite3` or plain psycopg, no ORM. Reading a
thread is one SELECT and a `json.loads` per row; the request body is the messages (consecutive
same-role turns merged) plus model and max_tokens. It has no branches, no ledger and no blobs: a
fork copies the rows, an image is stored inline in every turn that carries it.

On SQLite the floor runs with the durability convo uses (WAL, synchronous=NORMAL), so commits
cost the same on both sides.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

SQLITE_SCHEMA = (
    (
        "CREATE TABLE turns (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL, "
        "role TEXT NOT NULL, content TEXT NOT NULL, input_tokens INTEGER, output_tokens INTEGER, "
        "cost REAL)"
    ),
    "CREATE INDEX turns_conversation ON turns (conversation_id, id)",
)
PG_SCHEMA = (
    (
        "CREATE TABLE turns (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "conversation_id integer NOT NULL, role text NOT NULL, content text NOT NULL, "
        "input_tokens integer, output_tokens integer, cost double precision)"
    ),
    "CREATE INDEX turns_conversation ON turns (conversation_id, id)",
)
COLUMNS = "conversation_id, role, content, input_tokens, output_tokens, cost"

Row = tuple[int, str, str, int | None, int | None, float | None]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def build_body(
    rows: Iterable[tuple[str, str]],
    next_blocks: list[dict[str, Any]],
    model: str,
    max_tokens: int,
    loads: Callable[[str], Any] = json.loads,
) -> dict[str, Any]:
    """[{role, content}] with consecutive same-role turns merged, the next user turn last
    (`loads`: what makes a stored content value blocks)."""
    messages: list[dict[str, Any]] = []
    last = None
    for role, content in rows:
        if role == last:
            messages[-1]["content"].extend(loads(content))
        else:
            messages.append({"role": role, "content": loads(content)})
            last = role
    if last == "user":
        messages[-1]["content"].extend(next_blocks)
    else:
        messages.append({"role": "user", "content": list(next_blocks)})
    return {"model": model, "max_tokens": max_tokens, "messages": messages}


class Floor:
    """One floor database: `kind` is "sqlite" (target: a file path) or "pg" (target: conninfo)."""

    def __init__(self, kind: str, target: str, *, model: str, max_tokens: int) -> None:
        self.kind = kind
        self.target = target
        self.model = model
        self.max_tokens = max_tokens

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.kind == "pg" else text

    def connect(self) -> Any:
        if self.kind == "sqlite":
            return sqlite3.connect(self.target)
        import psycopg

        return psycopg.connect(self.target)

    def writer(self) -> Any:
        """A connection for writes, with convo's durability setting on SQLite."""
        conn = self.connect()
        if self.kind == "sqlite":
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    # -- setup -------------------------------------------------------------------------------

    def copy_with_schema(self, path: str, statements: Sequence[str]) -> Floor:
        """A copy of this SQLite floor, same rows, whose file also holds the (empty) tables and
        indexes `statements` create: SQLite parses a database's whole schema on a connection's
        first statement, so the copy's fresh-connection resume costs what the floor's own would
        if its database had a larger schema (a diagnostic, never a target)."""
        if self.kind != "sqlite":
            raise ValueError("copy_with_schema is for SQLite floors")
        src, dst = sqlite3.connect(self.target), sqlite3.connect(path)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = WAL")
            for stmt in statements:
                dst.execute(stmt)
            dst.commit()
            dst.execute("ANALYZE")
            dst.commit()
        finally:
            src.close()
            dst.close()
        return Floor("sqlite", path, model=self.model, max_tokens=self.max_tokens)

    def create_schema(self) -> None:
        conn = self.connect()
        try:
            if self.kind == "sqlite":
                conn.execute("PRAGMA journal_mode = WAL")
            for stmt in SQLITE_SCHEMA if self.kind == "sqlite" else PG_SCHEMA:
                conn.execute(stmt)
            conn.commit()
        finally:
            conn.close()

    def insert_rows(self, rows: Sequence[Row]) -> None:
        """Bulk load in one transaction, ids in the order given (population, not measured)."""
        conn = self.writer()
        try:
            if self.kind == "pg":
                with conn.cursor() as cur, cur.copy(f"COPY turns ({COLUMNS}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            else:
                conn.executemany(f"INSERT INTO turns ({COLUMNS}) VALUES (?,?,?,?,?,?)", rows)
            conn.commit()
        finally:
            conn.close()

    # -- the measured operations -------------------------------------------------------------

    def _rows(self, conn: Any, conversation_id: int) -> list[tuple[str, str]]:
        cur = conn.execute(
            self.sql("SELECT role, content FROM turns WHERE conversation_id = ? ORDER BY id"),
            (conversation_id,),
        )
        return cur.fetchall()

    def resume(self, conversation_id: int, next_text: str) -> dict[str, Any]:
        """Fresh connection, read the thread, build the next request body."""
        conn = self.connect()
        try:
            rows = self._rows(conn, conversation_id)
        finally:
            conn.close()
        return build_body(rows, [{"type": "text", "text": next_text}], self.model, self.max_tokens)

    def resume_on(self, conn: Any, conversation_id: int, next_text: str) -> dict[str, Any]:
        """`resume` on a connection kept open (what a long-running service does)."""
        rows = self._rows(conn, conversation_id)
        conn.rollback()  # end the read transaction, as a fresh connection's close would
        return build_body(rows, [{"type": "text", "text": next_text}], self.model, self.max_tokens)

    def resume_sqlalchemy(self, conversation_id: int, next_text: str) -> dict[str, Any]:
        """`resume` through a fresh SQLAlchemy engine instead of the bare driver: the same SQL
        and rows, plus what building an engine, checking a connection out and disposing of it
        costs. This is the least any SQLAlchemy-based store pays per fresh store."""
        from sqlalchemy import create_engine

        if self.kind == "sqlite":
            engine = create_engine(f"sqlite:///{self.target}")
        else:
            import psycopg

            target = self.target
            engine = create_engine(
                "postgresql+psycopg://", creator=lambda: psycopg.connect(target), use_native_hstore=False
            )
        try:
            with engine.connect() as conn:
                sql = "SELECT role, content FROM turns WHERE conversation_id = ? ORDER BY id"
                result = conn.exec_driver_sql(self.sql(sql), (conversation_id,))
                rows = result.cursor.fetchall()  # the driver's tuples, as convo reads a path
                result.close()
        finally:
            engine.dispose()
        return build_body(rows, [{"type": "text", "text": next_text}], self.model, self.max_tokens)

    def append(
        self, conn: Any, conversation_id: int, user_text: str, reply_bytes: bytes, price: tuple[float, float],
        encode: Callable[[Any], bytes] | None = None,
    ) -> tuple[bytes, list[int]]:
        """A real append: read the thread, build and serialize the body that would be POSTed
        (with the standard library's json, or `encode`), parse the reply, insert the user turn
        and the reply with its usage and cost, commit."""
        user_blocks = [{"type": "text", "text": user_text}]
        body = build_body(self._rows(conn, conversation_id), user_blocks, self.model, self.max_tokens)
        payload = encode(body) if encode else json.dumps(body, ensure_ascii=False).encode("utf-8")
        reply = json.loads(reply_bytes)
        usage = reply["usage"]
        inp, out = usage["input_tokens"], usage["output_tokens"]
        cost = (inp * price[0] + out * price[1]) / 1_000_000
        cur = conn.execute(
            self.sql(
                f"INSERT INTO turns ({COLUMNS}) VALUES (?,?,?,NULL,NULL,NULL),(?,?,?,?,?,?) RETURNING id"
            ),
            (conversation_id, "user", dumps(user_blocks),
             conversation_id, "assistant", dumps(reply["content"]), inp, out, cost),
        )
        ids = [r[0] for r in cur.fetchall()]
        conn.commit()
        return payload, ids

    def append_durable(
        self, conn: Any, conversation_id: int, user_text: str, http: Any, price: tuple[float, float]
    ) -> tuple[bytes, list[int]]:
        """`append` doing what a send must so that a failed call loses nothing (for the
        durable-append diagnostic): the user's turn committed before the request, the body
        POSTed through `http` (an httpx client), the reply and its usage committed after it.
        Still one table, no ledger, no lease and no checks."""
        user_blocks = [{"type": "text", "text": user_text}]
        body = build_body(self._rows(conn, conversation_id), user_blocks, self.model, self.max_tokens)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        insert = self.sql(f"INSERT INTO turns ({COLUMNS}) VALUES (?,?,?,?,?,?) RETURNING id")
        ids = [conn.execute(insert, (conversation_id, "user", dumps(user_blocks), None, None, None)).fetchone()[0]]
        conn.commit()
        response = http.post(
            "https://api.invalid/v1/messages", content=payload, headers={"content-type": "application/json"}
        )
        reply = json.loads(response.content)
        usage = reply["usage"]
        inp, out = usage["input_tokens"], usage["output_tokens"]
        cost = (inp * price[0] + out * price[1]) / 1_000_000
        row = (conversation_id, "assistant", dumps(reply["content"]), inp, out, cost)
        ids.append(conn.execute(insert, row).fetchone()[0])
        conn.commit()
        return payload, ids

    def insert_two(self, conn: Any, rows: Sequence[Row]) -> list[int]:
        """Only the writes of an append: two rows, one commit (for the writes diagnostic)."""
        cur = conn.execute(
            self.sql(f"INSERT INTO turns ({COLUMNS}) VALUES (?,?,?,?,?,?),(?,?,?,?,?,?) RETURNING id"),
            (*rows[0], *rows[1]),
        )
        ids = [r[0] for r in cur.fetchall()]
        conn.commit()
        return ids

    def fork(self, conn: Any, conversation_id: int, at_id: int, new_id: int) -> None:
        """The floor has no tree: a fork copies the thread up to `at_id` into a new thread."""
        conn.execute(
            self.sql(
                f"INSERT INTO turns ({COLUMNS}) SELECT ?, role, content, input_tokens, "
                "output_tokens, cost FROM turns WHERE conversation_id = ? AND id <= ? ORDER BY id"
            ),
            (new_id, conversation_id, at_id),
        )
        conn.commit()

    def edit(self, conn: Any, conversation_id: int, turn_id: int, role: str, text: str, new_id: int) -> None:
        """Copy the thread before `turn_id` into a new thread and add the edited turn."""
        conn.execute(
            self.sql(
                f"INSERT INTO turns ({COLUMNS}) SELECT ?, role, content, input_tokens, "
                "output_tokens, cost FROM turns WHERE conversation_id = ? AND id < ? ORDER BY id"
            ),
            (new_id, conversation_id, turn_id),
        )
        conn.execute(
            self.sql(f"INSERT INTO turns ({COLUMNS}) VALUES (?,?,?,NULL,NULL,NULL)"),
            (new_id, role, dumps([{"type": "text", "text": text}])),
        )
        conn.commit()

    def touch(self, conn: Any, turn_id: int) -> None:
        """The smallest durable write: one row updated, committed (what any checkout costs)."""
        conn.execute(self.sql("UPDATE turns SET cost = cost WHERE id = ?"), (turn_id,))
        conn.commit()

    def audit(self, conn: Any) -> dict[int, tuple[int, int, float]]:
        cur = conn.execute(
            "SELECT conversation_id, sum(input_tokens), sum(output_tokens), sum(cost) "
            "FROM turns GROUP BY conversation_id"
        )
        result = {r[0]: (int(r[1] or 0), int(r[2] or 0), float(r[3] or 0.0)) for r in cur.fetchall()}
        conn.commit()
        return result

    # -- bookkeeping (not measured) ------------------------------------------------------------

    def delete_ids(self, conn: Any, ids: Sequence[int]) -> None:
        for i in ids:
            conn.execute(self.sql("DELETE FROM turns WHERE id = ?"), (i,))
        conn.commit()

    def delete_thread(self, conn: Any, conversation_id: int) -> None:
        conn.execute(self.sql("DELETE FROM turns WHERE conversation_id = ?"), (conversation_id,))
        conn.commit()

    def thread_ids(self, conn: Any, conversation_id: int) -> list[int]:
        cur = conn.execute(
            self.sql("SELECT id FROM turns WHERE conversation_id = ? ORDER BY id"), (conversation_id,)
        )
        ids = [r[0] for r in cur.fetchall()]
        conn.commit()
        return ids

    def rows_by_id(self, conn: Any, ids: Sequence[int]) -> list[Row]:
        """The rows with these ids, in id order, as stored (for checking an append)."""
        marks = ",".join("?" * len(ids))
        cur = conn.execute(self.sql(f"SELECT {COLUMNS} FROM turns WHERE id IN ({marks}) ORDER BY id"), tuple(ids))
        rows = [tuple(r) for r in cur.fetchall()]
        conn.commit()
        return rows  # type: ignore[return-value]

    def row_counts(self, conn: Any) -> dict[str, int]:
        n = conn.execute("SELECT count(*) FROM turns").fetchone()[0]
        conn.commit()
        return {"turns": int(n)}

    def checkpoint(self) -> None:
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.target)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
