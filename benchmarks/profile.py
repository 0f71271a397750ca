"""Profile one convo operation from the benchmark under pyinstrument (not part of the timed run).

    python -m benchmarks.profile resume --n 10000 --engine sqlite
    python -m benchmarks.profile append --n 10 --engine pg --runs 200
    python -m benchmarks.profile fork|edit|checkout|audit|sizes ...

Builds the same databases as the benchmark, runs the operation `--runs` times inside one
profiler session, prints the call tree (and writes an HTML copy under benchmarks/results/).
`sizes` prints bytes per table and index instead of a profile.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Any

from sqlalchemy.engine import make_url

from benchmarks.data import audit_case, thread_case
from benchmarks.engines import PGEngine, SQLiteEngine, _libpq
from benchmarks.run import (
    APPEND_TEXT,
    EDIT_TEXT,
    NEXT_TEXT,
    REPLY_BYTES,
    RESULTS_DIR,
    populate_floor,
)
from benchmarks.subject import drop_branch, head_state, mock_client, populate, undo_send
from convo import Store


def table_sizes(engine: Any, case: Any) -> None:
    if engine.name == "sqlite":
        for label, path in (("convo", make_url(case.convo_url).database or ""), ("floor", case.floor.target)):
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            try:
                rows = conn.execute(
                    "SELECT name, sum(pgsize), sum(payload), count(*) FROM dbstat GROUP BY name ORDER BY 2 DESC"
                ).fetchall()
            except sqlite3.OperationalError:
                print(f"{label}: this SQLite has no dbstat")
                continue
            finally:
                conn.close()
            print(f"\n{label} ({path}):")
            for name, size, payload, pages in rows:
                print(f"  {name:40s} {size:>12,} bytes  payload {payload:>12,}  pages {pages}")
    else:
        import psycopg

        for label, conninfo in (("convo", _libpq(case.convo_url)), ("floor", case.floor.target)):
            with psycopg.connect(conninfo) as pg:
                rows = pg.execute(
                    "SELECT c.relname, c.relkind, pg_relation_size(c.oid), "
                    "pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind IN ('r','i') "
                    "ORDER BY 4 DESC"
                ).fetchall()
            print(f"\n{label}:")
            for name, kind, main, total in rows:
                print(f"  {name:40s} {'table' if kind == 'r' else 'index'} main {main:>12,}  total {total:>12,}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    p.add_argument("measure", choices=["resume", "append", "fork", "edit", "checkout", "audit", "sizes"])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--engine", choices=["sqlite", "pg"], default="sqlite")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.0002)
    args = p.parse_args(argv)

    from pyinstrument import Profiler

    engine: Any = SQLiteEngine() if args.engine == "sqlite" else PGEngine()
    try:
        ds = audit_case(2_000, 50) if args.measure == "audit" else thread_case(args.n)
        case = engine.case(args.measure)
        pop = populate(case.convo_url, ds)
        populate_floor(case.floor, ds)
        engine.analyze(case)
        cid = pop.conversation_ids[0]
        if args.measure == "sizes":
            table_sizes(engine, case)
            return 0
        client, _ = mock_client(REPLY_BYTES)
        store = Store(case.convo_url, client=client)
        books = Store(case.convo_url)  # bookkeeping, so that `store` does only what is profiled
        conv = store.get(cid)
        last_user, head_reply = pop.turn_ids[0][-1]
        state = head_state(books, cid)
        books.get(cid).fork(head_reply, "alt", checkout=False)

        def once(i: int) -> None:
            if args.measure == "resume":
                s = Store(case.convo_url)
                s.get(cid).request(NEXT_TEXT)
                s.close()
            elif args.measure == "append":
                r = conv.send(APPEND_TEXT)
                user_id = books.storage.turn(r.turn_id).parent_id  # type: ignore[arg-type]
                undo_send(books, cid, state, [r.call_id], [user_id, r.turn_id])  # type: ignore[list-item]
            elif args.measure == "fork":
                conv.fork(head_reply, f"f{i}")
                drop_branch(books, cid, f"f{i}")
            elif args.measure == "edit":
                tid = conv.edit(last_user, EDIT_TEXT, name=f"e{i}")
                drop_branch(books, cid, f"e{i}", [tid])
            elif args.measure == "checkout":
                conv.checkout("alt" if i % 2 == 0 else "main")
            elif args.measure == "audit":
                store.usage(by="conversation")

        once(-1)
        profiler = Profiler(interval=args.interval)
        profiler.start()
        for i in range(args.runs):
            once(i)
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False))
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        html = RESULTS_DIR / f"profile-{args.measure}-{args.engine}-n{args.n}.html"
        html.write_text(profiler.output_html())
        print(f"HTML: {html}", file=sys.stderr)
        books.close()
        store.close()
        client.close()
        case.close()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
