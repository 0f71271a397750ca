"""convo against a floor, in one process, interleaved call by call: `python -m benchmarks`.

For each engine (SQLite, and PostgreSQL unless told otherwise) and each thread length n, two
databases are built with identical contents: the measured thread of n exchanges plus 50 other
threads of 20 exchanges, written interleaved in time, every turn about 400 characters. One is
convo's, one is the floor's (benchmarks/floor.py: one table, plain sqlite3 / psycopg). Then:

- resume: a fresh `convo.Store(url)` / a fresh connection reads the thread and builds the body of
  the next request; both bodies are checked against the dataset, byte for byte (convo's
  top-level `cache_control` aside).
- append: `Conversation.send(text)` through an in-process httpx.MockTransport answering with a
  fixed reply and usage, against the floor reading the thread, building and serializing the
  body, parsing the same reply and inserting two rows in one commit. Each write is undone after
  it is timed, so every sample sees the same n.
- fork / edit / checkout at the deepest n: time, and rows written (convo: rows added, removed
  or changed by one operation, compared row by row; the floor's copy: rows added).
- audit: per-thread input/output/cost over 2,000 threads x 50 exchanges; convo's
  `Store.usage(by="conversation")` against a GROUP BY, checked equal.
- size: bytes on disk for every case; 20 turns carrying the same 1 MB PNG.
- append writes (diagnostic, no target): only the rows a send writes, through convo's storage
  layer, against the floor's two-row INSERT: whether the database part of append stays flat.
- append against a durable floor (diagnostic): the floor committing the user's turn before the
  request, POSTing it through the same in-process transport and committing the reply after,
  as a send must to lose nothing: how much of the append gap that guarantee accounts for.
- append against a floor encoding with orjson (diagnostic): the floor serializes its body with
  the standard library's json, convo with orjson; this row gives the floor orjson too, to show
  how much of convo's lead on long threads is the encoder.

Samples alternate which system goes first, the collector is run (and older objects frozen)
before each call; medians are reported with the ratio to the floor and the target. Both wall
and CPU time are recorded; `--clock cpu` reports CPU time on SQLite (steadier on a busy
machine; PostgreSQL stays wall time), `--report FILE` prints an earlier run's table again.
The exit status is 0 when every correctness check passed (timings never fail it). Raw samples
go to benchmarks/results/<stamp>.json (git-ignored), whose path is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):  # run as a file: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import data
from benchmarks.data import (
    MAX_TOKENS,
    MODEL,
    Dataset,
    api_reply,
    audit_case,
    image_block,
    png,
    thread_case,
)
from benchmarks.engines import Case, PGEngine, SQLiteEngine
from benchmarks.floor import Floor, Row, dumps
from benchmarks.subject import (
    bare_resume,
    drop_branch,
    head_state,
    mock_client,
    mock_http,
    populate,
    row_counts,
    rows_changed,
    sqlite_schema,
    table_rows,
    undo_send,
)
from convo import Store

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Targets: ratios to the floor measured in the same run.
RESUME_MAX_RATIO = 1.3
APPEND_MAX_RATIO = 1.5
APPEND_GROWTH_MAX = 1.3
BRANCH_OP_MAX_SECONDS = 0.002
# Rows added, removed or changed: an edit adds its turn and its branch and updates the
# conversation's row (its turn count and last use); a fork adds a branch and checks it out.
BRANCH_OP_MAX_ROWS = 4
AUDIT_MAX_RATIO = 1.0
SIZE_MAX_RATIO = 1.3


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    resume_runs: dict[int, int]
    append_runs: dict[int, int]
    op_runs: int
    audit_threads: int
    audit_exchanges: int
    audit_runs: int
    image_runs: int
    warmup: int


FULL = Plan(
    sizes=(10, 100, 1_000, 10_000),
    resume_runs={10: 201, 100: 101, 1_000: 31, 10_000: 15},
    append_runs={10: 101, 100: 61, 1_000: 21, 10_000: 11},
    op_runs=21,
    audit_threads=2_000,
    audit_exchanges=50,
    audit_runs=21,
    image_runs=7,
    warmup=2,
)
QUICK = Plan(
    sizes=(10, 100),
    resume_runs={10: 5, 100: 5},
    append_runs={10: 5, 100: 5},
    op_runs=3,
    audit_threads=50,
    audit_exchanges=10,
    audit_runs=3,
    image_runs=2,
    warmup=1,
)

NEXT_TEXT = data.next_question()
APPEND_TEXT = data.text_pool()[-2]
EDIT_TEXT = data.text_pool()[-3]
REPLY = api_reply(data.text_pool()[-4], 1234, 98)
REPLY_BYTES = json.dumps(REPLY).encode()


# -- results ---------------------------------------------------------------------------------


@dataclass
class Result:
    engine: str
    measure: str
    case: str
    convo: float | None  # median seconds, or bytes / rows for size and count measures
    floor: float | None
    unit: str  # "s" | "bytes" | "rows"
    target: str
    passed: bool | None  # None: informational
    ratio: float | None = None
    convo_samples: list[float] = field(default_factory=list)
    floor_samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Check:
    engine: str
    name: str
    ok: bool
    detail: str = ""


class Recorder:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.checks: list[Check] = []

    def check(self, engine: str, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(engine, name, bool(ok), detail))
        if not ok:
            log(f"  CHECK FAILED [{engine}] {name}: {detail}")
        return bool(ok)

    def add(self, r: Result) -> Result:
        self.results.append(r)
        return r


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# -- the timing loop -------------------------------------------------------------------------


@dataclass
class Timing:
    """Samples of one measure: wall-clock seconds, and this process's CPU seconds."""

    convo_wall: list[float] = field(default_factory=list)
    floor_wall: list[float] = field(default_factory=list)
    convo_cpu: list[float] = field(default_factory=list)
    floor_cpu: list[float] = field(default_factory=list)

    def pick(self, engine: str) -> tuple[list[float], list[float]]:
        """The samples the report uses: CPU time only when asked for and only on SQLite,
        where all the work happens in this process (a PostgreSQL server's work would not
        show in it)."""
        if CLOCK == "cpu" and engine == "sqlite":
            return self.convo_cpu, self.floor_cpu
        return self.convo_wall, self.floor_wall


CLOCK = "wall"
TIMINGS: dict[int, Timing] = {}


def interleave(
    runs: int,
    warmup: int,
    convo_call: Callable[[int], Any],
    floor_call: Callable[[int], Any] | None,
    convo_after: Callable[[Any, int], None] | None = None,
    floor_after: Callable[[Any, int], None] | None = None,
    *,
    engine: str = "",
) -> tuple[list[float], list[float]]:
    """Time both sides call by call, alternating which goes first; `after` hooks are untimed.

    Returns the samples the report uses (see `Timing.pick`); every sample, both clocks, is kept
    in TIMINGS under the id of the returned convo list, for the JSON."""
    timing = Timing()
    sides: list[tuple[Callable[[int], Any], Callable[[Any, int], None] | None, list[float], list[float]]] = [
        (convo_call, convo_after, timing.convo_wall, timing.convo_cpu)
    ]
    if floor_call is not None:
        sides.append((floor_call, floor_after, timing.floor_wall, timing.floor_cpu))
    # Objects alive now (datasets, earlier results) are frozen out of the collector, so the
    # collection before each call costs little and each call starts with a clean young heap.
    gc.collect()
    gc.freeze()
    try:
        _loop(runs, warmup, sides)
    finally:
        gc.unfreeze()
    convo, floor = timing.pick(engine)
    TIMINGS[id(convo)] = timing
    return convo, floor


def _loop(runs: int, warmup: int, sides: list[Any]) -> None:
    wall, cpu = time.perf_counter, time.process_time
    for i in range(warmup + runs):
        order = sides if i % 2 == 0 else sides[::-1]
        for call, after, out_wall, out_cpu in order:
            gc.collect()
            c0 = cpu()
            t0 = wall()
            result = call(i)
            dt = wall() - t0
            dc = cpu() - c0
            if after is not None:
                after(result, i)
            # Drop the result now: left alive, it would be traversed by every collection the
            # next call triggers, charging one side for the other's garbage.
            result = None
            if i >= warmup:
                out_wall.append(dt)
                out_cpu.append(dc)


# -- population ------------------------------------------------------------------------------


def populate_floor(floor: Floor, ds: Dataset) -> None:
    floor.create_schema()
    rows: list[Row] = []
    for t, a, b in ds.chunks:
        for ex in ds.threads[t][a:b]:
            rows.append((t + 1, "user", dumps(ex.user), None, None, None))
            rows.append((t + 1, "assistant", dumps(ex.reply), ex.input_tokens, ex.output_tokens, ex.cost))
    floor.insert_rows(rows)


def expected_body(ds: Dataset, thread: int, next_text: str) -> dict[str, Any]:
    """The request body the dataset says thread `thread` must produce: the ground truth."""
    messages: list[dict[str, Any]] = []
    for ex in ds.threads[thread]:
        messages.append({"role": "user", "content": ex.user})
        messages.append({"role": "assistant", "content": ex.reply})
    messages.append({"role": "user", "content": [{"type": "text", "text": next_text}]})
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": messages}


def without_cache_control(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "cache_control"}


def same_body(got: dict[str, Any], want: dict[str, Any]) -> tuple[bool, str]:
    """Equal as data and as serialized JSON (key order included)."""
    if got != want:
        gm, wm = got.get("messages", []), want.get("messages", [])
        where = next((i for i, (a, b) in enumerate(zip(gm, wm, strict=False)) if a != b), min(len(gm), len(wm)))
        return False, f"bodies differ (messages: {len(gm)} vs {len(wm)}; first difference at message {where})"
    if orjson.dumps(got) != orjson.dumps(want):
        return False, "same data, different key order"
    return True, f"{len(want['messages'])} messages"


def build_case(engine: Any, name: str, ds: Dataset, rec: Recorder) -> tuple[Case, Any]:
    case = engine.case(name)
    t0 = time.perf_counter()
    pop = populate(case.convo_url, ds)
    t1 = time.perf_counter()
    populate_floor(case.floor, ds)
    t2 = time.perf_counter()
    engine.analyze(case)
    log(f"  populated {name}: {ds.exchanges:,} exchanges (convo {t1 - t0:.1f}s, floor {t2 - t1:.1f}s)")
    return case, pop


def record_size(engine: Any, case: Case, label: str, rec: Recorder) -> Result:
    c, f = engine.convo_size(case), engine.floor_size(case)
    ratio = c / f
    return rec.add(
        Result(engine.name, "size", label, c, f, "bytes", f"<= {SIZE_MAX_RATIO}x", ratio <= SIZE_MAX_RATIO, ratio)
    )


# -- the measures ----------------------------------------------------------------------------


def thread_measures(engine: Any, n: int, plan: Plan, rec: Recorder, only: set[str]) -> None:
    ds = thread_case(n)
    case, pop = build_case(engine, f"n{n}", ds, rec)
    try:
        if "size" in only:
            record_size(engine, case, f"n={n:,}", rec)
        cid = pop.conversation_ids[0]
        if "resume" in only:
            resume(engine.name, case, cid, ds, n, plan.resume_runs[n], plan.warmup, rec)
        if "append" in only:
            append(engine.name, case, cid, ds, n, plan.append_runs[n], plan.warmup, rec)
        if "ops" in only:
            branch_ops(engine.name, case, cid, pop, n, plan.op_runs, plan.warmup, rec)
    finally:
        case.close()


def resume(engine: str, case: Case, cid: str, ds: Dataset, n: int, runs: int, warmup: int, rec: Recorder) -> None:
    want = expected_body(ds, 0, NEXT_TEXT)
    bad: list[str] = []

    def convo_call(_i: int) -> dict[str, Any]:
        store = Store(case.convo_url)
        try:
            return store.get(cid).request(NEXT_TEXT)
        finally:
            store.close()

    def floor_call(_i: int) -> dict[str, Any]:
        return case.floor.resume(1, NEXT_TEXT)

    def check(who: str) -> Callable[[Any, int], None]:
        def after(body: dict[str, Any], i: int) -> None:
            if i == 0 or i == warmup + runs - 1:
                got = without_cache_control(body) if who == "convo" else body
                ok, detail = same_body(got, want)
                if not ok:
                    bad.append(f"{who}: {detail}")
                elif who == "convo" and "cache_control" not in body:
                    bad.append("convo: no cache_control (expected with the default cache)")
        return after

    ct, ft = interleave(runs, warmup, convo_call, floor_call, check("convo"), check("floor"), engine=engine)
    rec.check(engine, f"resume n={n}: convo and floor bodies equal the dataset's", not bad, "; ".join(bad) or f"{2 * n + 1} messages")
    ratio = median(ct) / median(ft)
    rec.add(Result(engine, "resume", f"n={n:,}", median(ct), median(ft), "s", f"<= {RESUME_MAX_RATIO}x",
                   ratio <= RESUME_MAX_RATIO, ratio, ct, ft))
    resume_diagnostics(engine, case, cid, n, runs, warmup, rec, check)


def resume_diagnostics(engine: str, case: Case, cid: str, n: int, runs: int, warmup: int, rec: Recorder,
                       check: Callable[[str], Callable[[Any, int], None]]) -> None:
    """Where a fresh-store resume's time goes, in the same run (diagnostics, no targets):
    - "Store kept open": convo's own per-resume work, a Store (and so its connections)
      reused, against the floor on a connection kept open;
    - "bare SQLAlchemy": the floor's very query through a fresh SQLAlchemy engine against the
      bare driver, the toll a store that builds an engine per Store would pay before doing
      anything of its own (convo's reads build none: see `convo.db.Database`);
    - "bare driver on convo's tables": convo's two resume statements on a fresh bare-driver
      connection, the body built as the floor builds it: what the schema itself costs (on
      PostgreSQL a new connection looks up every table it touches in the catalogs);
    - "floor on a database with convo's schema" (SQLite): the floor's own resume, rows and
      query, on a copy of its file that also holds convo's empty tables and indexes: SQLite
      parses the whole schema on a new connection's first statement, whatever it reads."""
    store = Store(case.convo_url)
    fconn = case.floor.connect()
    try:
        ct, ft = interleave(runs, warmup, lambda _i: store.get(cid).request(NEXT_TEXT),
                            lambda _i: case.floor.resume_on(fconn, 1, NEXT_TEXT),
                            check("convo"), check("floor"), engine=engine)
    finally:
        fconn.close()
        store.close()
    rec.add(Result(engine, "resume, Store kept open", f"n={n:,}", median(ct), median(ft), "s", "diagnostic",
                   None, median(ct) / median(ft), ct, ft))
    ct, ft = interleave(runs, warmup, lambda _i: case.floor.resume_sqlalchemy(1, NEXT_TEXT),
                        lambda _i: case.floor.resume(1, NEXT_TEXT), check("floor"), check("floor"), engine=engine)
    rec.add(Result(engine, "resume, bare SQLAlchemy", f"n={n:,}", median(ct), median(ft), "s", "diagnostic",
                   None, median(ct) / median(ft), ct, ft))
    ct, ft = interleave(runs, warmup, lambda _i: bare_resume(case.convo_url, cid, NEXT_TEXT, MODEL, MAX_TOKENS),
                        lambda _i: case.floor.resume(1, NEXT_TEXT), check("floor"), check("floor"), engine=engine)
    rec.add(Result(engine, "resume, bare driver on convo's tables", f"n={n:,}", median(ct), median(ft), "s",
                   "diagnostic", None, median(ct) / median(ft), ct, ft))
    if engine == "sqlite":
        schema_floor = case.floor.copy_with_schema(
            case.floor.target.removesuffix(".db") + "_schema.db", sqlite_schema(case.convo_url)
        )
        try:
            ct, ft = interleave(runs, warmup, lambda _i: schema_floor.resume(1, NEXT_TEXT),
                                lambda _i: case.floor.resume(1, NEXT_TEXT), check("floor"), check("floor"),
                                engine=engine)
        finally:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(schema_floor.target + suffix):
                    os.remove(schema_floor.target + suffix)
        rec.add(Result(engine, "resume, floor on a database with convo's schema", f"n={n:,}", median(ct),
                       median(ft), "s", "diagnostic", None, median(ct) / median(ft), ct, ft))


def append(engine: str, case: Case, cid: str, ds: Dataset, n: int, runs: int, warmup: int, rec: Recorder) -> None:
    client, captured = mock_client(REPLY_BYTES)
    store = Store(case.convo_url, client=client)
    # Checks and undoing go through a second Store: the measured one only sends, as a service's
    # would (bookkeeping through it would build its SQLAlchemy engine, which its sends would
    # then borrow connections from, instead of the path a Store that only sends takes).
    books = Store(case.convo_url)
    fconn = case.floor.writer()
    try:
        conv = store.get(cid)
        state = head_state(books, cid)
        price = store.prices.lookup(MODEL)
        assert price is not None
        prices = (price.input, price.output)
        want = expected_body(ds, 0, APPEND_TEXT)
        usage = REPLY["usage"]
        want_cost = (usage["input_tokens"] * price.input + usage["output_tokens"] * price.output) / 1e6
        bad: list[str] = []
        last = warmup + runs - 1

        def convo_call(_i: int) -> Any:
            return conv.send(APPEND_TEXT)

        def convo_after(reply: Any, i: int) -> None:
            user_id = books.storage.turn(reply.turn_id).parent_id
            assert user_id is not None
            if i in (0, last):
                ok, detail = same_body(without_cache_control(json.loads(captured["body"])), want)
                if not ok:
                    bad.append(f"convo sent: {detail}")
                stored = books.storage.path(cid)
                if [t.content for t in stored.turns[-2:]] != [[{"type": "text", "text": APPEND_TEXT}], REPLY["content"]]:
                    bad.append("convo stored turns differ from the user turn and reply")
                calls = [c for c in books.get(cid).calls() if c["id"] == reply.call_id]
                if not calls or calls[0]["status"] != "ok" or calls[0]["reply_id"] != reply.turn_id:
                    bad.append("convo's call row is missing or not ok")
                elif (calls[0]["input_tokens"], calls[0]["output_tokens"]) != (usage["input_tokens"], usage["output_tokens"]) \
                        or not math.isclose(calls[0]["cost_usd"], want_cost, rel_tol=1e-12):
                    bad.append("convo's call row usage/cost differ")
            undo_send(books, cid, state, [reply.call_id], [user_id, reply.turn_id])

        def floor_call(_i: int) -> Any:
            return case.floor.append(fconn, 1, APPEND_TEXT, REPLY_BYTES, prices)

        floor_rows = _floor_append_rows(REPLY, want_cost)
        floor_after = _floor_append_checker(case, fconn, want, floor_rows, bad, last, "floor")

        ct, ft = interleave(runs, warmup, convo_call, floor_call, convo_after, floor_after, engine=engine)
        append_writes(engine, store, books, case, fconn, cid, state, n, runs, warmup, rec)
        append_durable(engine, case, fconn, n, runs, warmup, rec, convo_call, convo_after, prices, want,
                       floor_rows, bad)
        append_orjson(engine, case, fconn, n, runs, warmup, rec, convo_call, convo_after, prices, want,
                      floor_rows, bad)
        if store.storage.database.engine_built:
            bad.append("the measured Store built its SQLAlchemy engine: it did more than send")
        after = head_state(books, cid)
        if after[:3] != state[:3]:
            bad.append("undo did not restore the thread")
        rec.check(engine, f"append n={n}: sent bodies equal the dataset's; reply, usage and cost stored", not bad,
                  "; ".join(bad) or f"{2 * n + 1} messages sent")
        ratio = median(ct) / median(ft)
        rec.add(Result(engine, "append", f"n={n:,}", median(ct), median(ft), "s", f"<= {APPEND_MAX_RATIO}x",
                       ratio <= APPEND_MAX_RATIO, ratio, ct, ft))
    finally:
        fconn.close()
        books.close()
        store.close()
        client.close()


def _floor_append_rows(reply: dict[str, Any], cost: float) -> list[Row]:
    """The two rows a floor append must leave: the user turn, then the reply with its usage."""
    usage = reply["usage"]
    return [
        (1, "user", dumps([{"type": "text", "text": APPEND_TEXT}]), None, None, None),
        (1, "assistant", dumps(reply["content"]), usage["input_tokens"], usage["output_tokens"], cost),
    ]


def _same_rows(got: list[Row], want: list[Row]) -> bool:
    """Rows equal, their costs to rounding (the floor computes the cost as convo does)."""
    return len(got) == len(want) and all(
        g[:5] == w[:5] and (g[5] == w[5] or (g[5] is not None and w[5] is not None and math.isclose(g[5], w[5], rel_tol=1e-12)))
        for g, w in zip(got, want, strict=True)
    )


def _floor_append_checker(case: Case, fconn: Any, want: dict[str, Any], rows: list[Row], bad: list[str],
                          last: int, who: str, sent: Callable[[], bytes] | None = None) -> Callable[[Any, int], None]:
    """After a floor append: on the first and last sample, the body it built (and, with `sent`,
    the bytes that reached the transport) is the dataset's, and the rows it stored, read back,
    are `rows`; then the rows are deleted, so every sample sees the same n."""

    def floor_after(result: Any, i: int) -> None:
        payload, ids = result
        if i in (0, last):
            ok, detail = same_body(json.loads(payload), want)
            if not ok or (sent is not None and sent() != payload):
                bad.append(f"{who} sent: {detail}")
            if not _same_rows(case.floor.rows_by_id(fconn, ids), rows):
                bad.append(f"{who} did not store the user turn and the reply with its usage and cost")
        case.floor.delete_ids(fconn, ids)

    return floor_after


def append_durable(engine: str, case: Case, fconn: Any, n: int, runs: int, warmup: int, rec: Recorder,
                   convo_call: Callable[[int], Any], convo_after: Callable[[Any, int], None],
                   prices: tuple[float, float], want: dict[str, Any], rows: list[Row], bad: list[str]) -> None:
    """Diagnostic: convo's append against a floor that does what a send must so that a failed
    call loses nothing: the user's turn committed before the request, the body POSTed through
    the same in-process httpx transport, the reply committed after it. How much of the append
    gap is that guarantee and the HTTP client, and how much is convo."""
    http, captured = mock_http(REPLY_BYTES)
    floor_after = _floor_append_checker(case, fconn, want, rows, bad, warmup + runs - 1, "durable floor",
                                        sent=lambda: captured["body"])
    try:
        ct, ft = interleave(runs, warmup, convo_call,
                            lambda _i: case.floor.append_durable(fconn, 1, APPEND_TEXT, http, prices),
                            convo_after, floor_after, engine=engine)
    finally:
        http.close()
    rec.add(Result(engine, "append, floor with a send's two commits and HTTP request", f"n={n:,}",
                   median(ct), median(ft), "s", "diagnostic", None, median(ct) / median(ft), ct, ft))


def append_orjson(engine: str, case: Case, fconn: Any, n: int, runs: int, warmup: int, rec: Recorder,
                  convo_call: Callable[[int], Any], convo_after: Callable[[Any, int], None],
                  prices: tuple[float, float], want: dict[str, Any], rows: list[Row], bad: list[str]) -> None:
    """Diagnostic: convo's append against the floor encoding its request body with orjson, as
    convo does, instead of the standard library's json: on a long thread, json's encoding is
    about half of the floor's append, and orjson takes a thirtieth of its time. How much of
    convo's lead on long threads is that choice, and how much is its design."""
    import orjson

    floor_after = _floor_append_checker(case, fconn, want, rows, bad, warmup + runs - 1, "orjson floor")
    ct, ft = interleave(
        runs, warmup, convo_call,
        lambda _i: case.floor.append(fconn, 1, APPEND_TEXT, REPLY_BYTES, prices, encode=orjson.dumps),
        convo_after, floor_after, engine=engine,
    )
    rec.add(Result(engine, "append, floor encoding its body with orjson as convo does", f"n={n:,}",
                   median(ct), median(ft), "s", "diagnostic", None, median(ct) / median(ft), ct, ft))


def append_writes(engine: str, store: Store, books: Store, case: Case, fconn: Any, cid: str, state: Any,
                  n: int, runs: int, warmup: int, rec: Recorder) -> None:
    """Diagnostic: only the writes of a send (user turn + lease + call row, then reply + usage),
    through convo's storage layer, against the floor's INSERT of two rows + commit. No history
    is read, so this shows whether the database part of append stays flat as the thread grows."""
    from benchmarks.subject import send_writes

    usage = REPLY["usage"]
    price = store.prices.lookup(MODEL)
    assert price is not None
    cost = (usage["input_tokens"] * price.input + usage["output_tokens"] * price.output) / 1e6
    def convo_after(result: Any, _i: int) -> None:
        call_id, user_id, reply_id = result
        undo_send(books, cid, state, [call_id], [user_id, reply_id])

    depth = books.storage.turn(state[0]).depth if state[0] is not None else None

    def convo_call(_i: int) -> tuple[int, int, int]:
        return send_writes(store, cid, state[0], depth, APPEND_TEXT, REPLY, cost)

    convo_after(convo_call(0), 0)  # a dry run
    rows = (
        (1, "user", dumps([{"type": "text", "text": APPEND_TEXT}]), None, None, None),
        (1, "assistant", dumps(REPLY["content"]), usage["input_tokens"], usage["output_tokens"], cost),
    )
    ct, ft = interleave(runs, warmup, convo_call, lambda _i: case.floor.insert_two(fconn, rows), convo_after,
                        lambda ids, _i: case.floor.delete_ids(fconn, ids), engine=engine)
    rec.add(Result(engine, "append writes", f"n={n:,}", median(ct), median(ft), "s", "diagnostic", None,
                   median(ct) / median(ft), ct, ft))


def branch_ops(engine: str, case: Case, cid: str, pop: Any, n: int, runs: int, warmup: int, rec: Recorder) -> None:
    store = Store(case.convo_url)
    fconn = case.floor.writer()
    try:
        conv = store.get(cid)
        last_user, head_reply = pop.turn_ids[0][-1]
        floor_ids = case.floor.thread_ids(fconn, 1)
        floor_head, floor_last_user = floor_ids[-1], floor_ids[-2]
        spare = 10_000_000  # floor conversation ids for copies

        def rows_written(op: Callable[[], Any], undo: Callable[[Any], None], counts: Callable[[], dict[str, int]]) -> int:
            """The floor's rows written: it only inserts (a copy), so its row count's growth."""
            before = counts()
            result = op()
            after = counts()
            undo(result)
            return sum(after.values()) - sum(before.values())

        def convo_rows_written(op: Callable[[], Any], undo: Callable[[Any], None]) -> int:
            """convo's rows written: added, removed or changed (UPDATEs included)."""
            before = table_rows(store, cid)
            result = op()
            after = table_rows(store, cid)
            undo(result)
            return rows_changed(before, after)

        # fork at the head reply (depth 2n-1)
        def convo_fork(i: int) -> str:
            return conv.fork(head_reply, f"bench-fork-{i}")

        def convo_fork_undo(name: str, _i: int = 0) -> None:
            drop_branch(store, cid, name)

        def floor_fork(i: int) -> int:
            case.floor.fork(fconn, 1, floor_head, spare + i)
            return spare + i

        def floor_undo(new_id: int, _i: int = 0) -> None:
            case.floor.delete_thread(fconn, new_id)

        ok_fork = True
        name = conv.fork(head_reply, "bench-fork-check")
        ok_fork = store.storage.path(cid).turns == store.storage.path(cid, "main").turns and conv.branch == name
        drop_branch(store, cid, name)
        rec.check(engine, f"fork n={n}: the fork is checked out and replays the same path", ok_fork)
        ct, ft = interleave(runs, warmup, convo_fork, floor_fork, convo_fork_undo, floor_undo, engine=engine)
        c_rows = convo_rows_written(lambda: conv.fork(head_reply, "bench-fork-rows"), convo_fork_undo)
        f_rows = rows_written(lambda: floor_fork(runs + warmup), floor_undo, lambda: case.floor.row_counts(fconn))
        _op_result(rec, engine, "fork", n, ct, ft, c_rows, f_rows)

        # edit the last user turn (depth 2n-2)
        def convo_edit(i: int) -> tuple[str, int]:
            return f"bench-edit-{i}", conv.edit(last_user, EDIT_TEXT, name=f"bench-edit-{i}")

        def convo_edit_undo(result: tuple[str, int], _i: int = 0) -> None:
            drop_branch(store, cid, result[0], [result[1]])

        def floor_edit(i: int) -> int:
            case.floor.edit(fconn, 1, floor_last_user, "user", EDIT_TEXT, spare + i)
            return spare + i

        res = convo_edit(-1)
        edited = store.storage.path(cid).turns
        ok_edit = (
            len(edited) == 2 * n - 1
            and edited[-1].content == [{"type": "text", "text": EDIT_TEXT}]
            and [t.id for t in edited[:-1]] == [t.id for t in store.storage.path(cid, "main").turns[:-2]]
        )
        convo_edit_undo(res)
        rec.check(engine, f"edit n={n}: the edit is a sibling of the old turn on a new branch", ok_edit)
        ct, ft = interleave(runs, warmup, convo_edit, floor_edit, convo_edit_undo, floor_undo, engine=engine)
        c_rows = convo_rows_written(lambda: convo_edit(-2), convo_edit_undo)
        f_rows = rows_written(lambda: floor_edit(runs + warmup), floor_undo, lambda: case.floor.row_counts(fconn))
        _op_result(rec, engine, "edit", n, ct, ft, c_rows, f_rows)

        # checkout, alternating between main and a branch at the same head
        conv.fork(head_reply, "bench-alt", checkout=False)

        def convo_checkout(i: int) -> None:
            conv.checkout("bench-alt" if i % 2 == 0 else "main")

        ct, ft = interleave(runs, warmup, convo_checkout, lambda _i: case.floor.touch(fconn, floor_head), engine=engine)
        ok_checkout = conv.branch == ("bench-alt" if (runs + warmup - 1) % 2 == 0 else "main")
        rec.check(engine, f"checkout n={n}: the branch checked out last is current", ok_checkout)
        other = "bench-alt" if conv.branch == "main" else "main"
        c_rows = convo_rows_written(lambda: conv.checkout(other), lambda _r: None)  # a real switch
        conv.checkout("main")
        drop_branch(store, cid, "bench-alt")
        _op_result(rec, engine, "checkout", n, ct, ft, c_rows, None)
    finally:
        fconn.close()
        store.close()


def _op_result(rec: Recorder, engine: str, op: str, n: int, ct: list[float], ft: list[float],
               c_rows: int, f_rows: int | None) -> None:
    c = median(ct)
    passed = c <= BRANCH_OP_MAX_SECONDS and 0 <= c_rows <= BRANCH_OP_MAX_ROWS
    rec.add(Result(engine, op, f"depth {n:,}", c, median(ft) if ft else None, "s",
                   f"<= {BRANCH_OP_MAX_SECONDS * 1000:g} ms, O(1) rows", passed,
                   c / median(ft) if ft else None, ct, ft,
                   {"convo_rows_written": c_rows, "floor_rows_written": f_rows, "n": n}))


def audit(engine_obj: Any, plan: Plan, rec: Recorder, only: set[str]) -> None:
    engine = engine_obj.name
    ds = audit_case(plan.audit_threads, plan.audit_exchanges)
    label = f"{plan.audit_threads:,}x{plan.audit_exchanges}"
    case, pop = build_case(engine_obj, "audit", ds, rec)
    try:
        if "size" in only:
            record_size(engine_obj, case, f"audit {label}", rec)
        store = Store(case.convo_url)
        fconn = case.floor.connect()
        try:
            want = {
                t + 1: (sum(e.input_tokens for e in th), sum(e.output_tokens for e in th), math.fsum(e.cost for e in th))
                for t, th in enumerate(ds.threads)
            }
            floor_of = {cid: t + 1 for t, cid in enumerate(pop.conversation_ids)}
            bad: list[str] = []

            def close(a: tuple[int, int, float], b: tuple[int, int, float]) -> bool:
                return a[:2] == b[:2] and math.isclose(a[2], b[2], rel_tol=1e-9)

            last = plan.warmup + plan.audit_runs - 1

            def convo_after(report: Any, i: int) -> None:
                if i in (0, last):
                    got = {floor_of.get(r.key, -1): (r.input_tokens, r.output_tokens, r.cost_usd) for r in report.rows}
                    if got.keys() != want.keys() or not all(close(got[k], want[k]) for k in want):
                        bad.append("convo's per-thread totals differ from the dataset's")

            def floor_after(result: dict[int, tuple[int, int, float]], i: int) -> None:
                if i in (0, last) and (result.keys() != want.keys() or not all(close(result[k], want[k]) for k in want)):
                    bad.append("floor's per-thread totals differ from the dataset's")

            ct, ft = interleave(plan.audit_runs, plan.warmup, lambda _i: store.usage(by="conversation"),
                                lambda _i: case.floor.audit(fconn), convo_after, floor_after, engine=engine)
            rec.check(engine, f"audit {label}: per-thread input, output and cost equal on both", not bad,
                      "; ".join(bad) or f"{len(want)} threads")
            ratio = median(ct) / median(ft)
            rec.add(Result(engine, "audit", label, median(ct), median(ft), "s", f"<= {AUDIT_MAX_RATIO}x",
                           ratio <= AUDIT_MAX_RATIO, ratio, ct, ft))
        finally:
            fconn.close()
            store.close()
    finally:
        case.close()


def images(engine_obj: Any, plan: Plan, rec: Recorder) -> None:
    engine = engine_obj.name
    picture = png()
    block = image_block(picture)
    ds = thread_case(20, image=block, name="images")
    case, pop = build_case(engine_obj, "images", ds, rec)
    try:
        size = record_size(engine_obj, case, "20 x the same 1 MB PNG", rec)
        store = Store(case.convo_url)
        try:
            counts = row_counts(store)
            size.extra.update({"png_bytes": len(picture), "convo_blob_rows": counts["blobs"]})
            once = counts["blobs"] == 1
            size.passed = bool(size.passed and once)
            size.target += ", image stored once"
            rec.check(engine, "images: convo stores the 20 identical images once", once, f"{counts['blobs']} blob rows")
            cid = pop.conversation_ids[0]
            want = expected_body(ds, 0, NEXT_TEXT)

            def convo_call(_i: int) -> dict[str, Any]:
                s = Store(case.convo_url)
                try:
                    return s.get(cid).request(NEXT_TEXT)
                finally:
                    s.close()

            bodies: dict[str, Any] = {}
            ct, ft = interleave(plan.image_runs, 1, convo_call, lambda _i: case.floor.resume(1, NEXT_TEXT),
                                lambda b, _i: bodies.__setitem__("convo", b), lambda b, _i: bodies.__setitem__("floor", b),
                                engine=engine)
            ok_c, d_c = same_body(without_cache_control(bodies["convo"]), want)
            ok_f, d_f = same_body(bodies["floor"], want)
            rec.check(engine, "images: resumed bodies carry the 20 images inline, equal to the dataset's",
                      ok_c and ok_f, f"convo: {d_c}; floor: {d_f}")
            rec.add(Result(engine, "resume (20 images)", "n=20", median(ct), median(ft), "s", "info", None,
                           median(ct) / median(ft), ct, ft))
        finally:
            store.close()
    finally:
        case.close()


# -- report ----------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    if b < 1e6:
        return f"{b / 1e3:.0f} kB"
    return f"{b / 1e6:.2f} MB"


def fmt_value(r: Result, which: str) -> str:
    v = r.convo if which == "convo" else r.floor
    if r.unit == "bytes":
        return fmt_bytes(v)
    text = fmt_time(v)
    rows = r.extra.get(f"{which}_rows_written", "absent") if r.measure in ("fork", "edit", "checkout") else "absent"
    if rows != "absent":
        text += ", " + ("1-row UPDATE" if rows is None else f"{rows:,} row{'s' if rows != 1 else ''} written")
    return text


def verdict(p: bool | None) -> str:
    return "—" if p is None else ("pass" if p else "**FAIL**")


def append_growth(results: list[Result]) -> list[Result]:
    """Per engine, append at the largest n against the smallest.

    The target (the issue's "the 10,000 figure within 1.3x of the 10 figure", in its table of
    ratios to the floor) is on convo's ratio to the floor: a store whose append falls behind the
    floor as a thread grows (one that rewrites or re-reads more than it must) fails it. How
    convo's own time grows, and the floor's, are diagnostics: anything that sends the whole
    history grows with it, the floor most of all."""
    out = []
    for engine in dict.fromkeys(r.engine for r in results):
        rows = sorted((r for r in results if r.engine == engine and r.measure == "append"), key=_n_of)
        if len(rows) >= 2:
            lo, hi = rows[0], rows[-1]
            g = hi.ratio / lo.ratio  # type: ignore[operator]
            out.append(Result(engine, "append growth", f"{hi.case} vs {lo.case}", hi.ratio, lo.ratio, "x",
                              f"<= {APPEND_GROWTH_MAX}x", g <= APPEND_GROWTH_MAX, g))
        for measure, label in (("append", "append growth, own time"), ("append writes", "append writes growth")):
            rows = sorted((r for r in results if r.engine == engine and r.measure == measure), key=_n_of)
            if len(rows) < 2:
                continue
            lo, hi = rows[0], rows[-1]
            g = hi.convo / lo.convo  # type: ignore[operator]
            fg = hi.floor / lo.floor  # type: ignore[operator]
            out.append(Result(engine, label, f"{hi.case} vs {lo.case}", hi.convo, lo.convo, "s",
                              "diagnostic", None, g, extra={"floor_growth": fg}))
    return out


def _n_of(r: Result) -> int:
    """The thread length of an "n=1,000" case: growth is the largest n's against the smallest's,
    whatever order --sizes gave them in."""
    return int(r.case.removeprefix("n=").replace(",", ""))


def judge(r: Result) -> bool | None:
    """Pass/fail of a timed result from its medians (sizes and diagnostics are judged where made)."""
    if r.measure == "resume":
        return r.ratio is not None and r.ratio <= RESUME_MAX_RATIO
    if r.measure == "append":
        return r.ratio is not None and r.ratio <= APPEND_MAX_RATIO
    if r.measure == "audit":
        return r.ratio is not None and r.ratio <= AUDIT_MAX_RATIO
    if r.measure in ("fork", "edit", "checkout"):
        rows = r.extra.get("convo_rows_written")
        return r.convo is not None and r.convo <= BRANCH_OP_MAX_SECONDS and rows is not None and 0 <= rows <= BRANCH_OP_MAX_ROWS
    return r.passed


def rerender(path: Path) -> int:
    """Print the table of an earlier run again, with the clock chosen now (--clock)."""
    saved = json.loads(path.read_text())
    results = []
    for d in saved["results"]:
        if "growth" in d["measure"]:
            continue
        r = Result(**d)
        timing = r.extra.get("timing")
        if timing:
            t = Timing(**timing)
            r.convo_samples, r.floor_samples = t.pick(r.engine)
            r.convo = median(r.convo_samples)
            r.floor = median(r.floor_samples) if r.floor_samples else None
            r.ratio = r.convo / r.floor if r.floor else None
            r.passed = judge(r)
        results.append(r)
    results = ordered(results + append_growth(results))
    clock = "CPU time on SQLite, wall time on PostgreSQL" if CLOCK == "cpu" else "wall time"
    meta = saved["meta"]
    print(f"## convo vs floor ({', '.join(meta['engines'])}; Python {meta['python']}; {meta['cpus']} CPUs, "
          f"load {meta['load_average'][0]:.1f}; medians of {clock}; from {path})\n")
    print(table(results))
    return 0


def table(results: list[Result]) -> str:
    lines = [
        "| engine | measure | case | convo | floor | convo/floor | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.measure == "append growth":
            lines.append(
                f"| {r.engine} | {r.measure} (convo/floor) | {r.case} | {r.convo:.2f}x vs {r.floor:.2f}x | "
                f"— | {r.ratio:.2f}x | {r.target} | {verdict(r.passed)} |"
            )
            continue
        if r.measure in ("append growth, own time", "append writes growth"):
            lines.append(
                f"| {r.engine} | {r.measure} | {r.case} | {fmt_time(r.convo)} vs {fmt_time(r.floor)} | "
                f"floor grew {r.extra['floor_growth']:.1f}x | {r.ratio:.1f}x | {r.target} | {verdict(r.passed)} |"
            )
            continue
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            f"| {r.engine} | {r.measure} | {r.case} | {fmt_value(r, 'convo')} | {fmt_value(r, 'floor')} | "
            f"{ratio} | {r.target} | {verdict(r.passed)} |"
        )
    return "\n".join(lines)


def ordered(results: list[Result]) -> list[Result]:
    order = ["resume", "resume, Store kept open", "resume, bare SQLAlchemy", "resume, bare driver on convo's tables", "resume, floor on a database with convo's schema", "append", "append growth", "append growth, own time", "append, floor with a send's two commits and HTTP request", "append, floor encoding its body with orjson as convo does", "append writes", "append writes growth", "fork", "edit", "checkout", "audit", "size", "resume (20 images)"]
    engines = list(dict.fromkeys(r.engine for r in results))
    return sorted(results, key=lambda r: (engines.index(r.engine), order.index(r.measure)))


# -- main ------------------------------------------------------------------------------------


def convo_fingerprint() -> dict[str, str]:
    """Which convo was measured: its location and a hash of its sources (it changes often)."""
    import hashlib

    import convo

    root = Path(convo.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"path": str(root), "sources_sha256": h.hexdigest()[:16]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smallest sizes, few runs: for correctness, not timings")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sqlite", action="store_true", help="SQLite only")
    g.add_argument("--pg", action="store_true", help="PostgreSQL only ($CONVO_BENCH_POSTGRES_URL)")
    p.add_argument("--sizes", help="comma-separated thread lengths (default 10,100,1000,10000)")
    p.add_argument("--only", default="resume,append,ops,audit,size,images",
                   help="comma-separated subset of: resume,append,ops,audit,size,images")
    p.add_argument("--out", type=Path, help="where to write the JSON (default benchmarks/results/<stamp>.json)")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the table of an earlier run again (with --clock)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what the table reports on SQLite: wall time (default) or this process's CPU "
                   "time, steadier on a busy machine; PostgreSQL is always wall time. Both are in the JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global CLOCK
    args = parse_args(argv)
    CLOCK = args.clock
    if args.report:
        return rerender(args.report)
    plan = QUICK if args.quick else FULL
    if args.sizes:
        sizes = tuple(sorted({int(s) for s in args.sizes.split(",")}))
        fill = plan.resume_runs[plan.sizes[-1]]
        plan = Plan(sizes, {n: plan.resume_runs.get(n, fill) for n in sizes},
                    {n: plan.append_runs.get(n, fill) for n in sizes}, plan.op_runs, plan.audit_threads,
                    plan.audit_exchanges, plan.audit_runs, plan.image_runs, plan.warmup)
    only = set(args.only.split(","))
    engines: list[Any] = []
    if not args.pg:
        engines.append(SQLiteEngine())
    if not args.sqlite:
        engines.append(PGEngine())
    rec = Recorder()
    started = time.perf_counter()
    try:
        for engine in engines:
            log(f"[{engine.name}] {engine.version()}")
            for n in plan.sizes:
                if only & {"resume", "append", "ops", "size"}:
                    thread_measures(engine, n, plan, rec, only)
            if "audit" in only:
                audit(engine, plan, rec, only)
            if "images" in only:
                images(engine, plan, rec)
    finally:
        for engine in engines:
            engine.close()
    results = ordered(rec.results + append_growth(rec.results))
    for r in results:
        timing = TIMINGS.get(id(r.convo_samples))
        if timing is not None:
            r.extra["timing"] = asdict(timing)
    elapsed = time.perf_counter() - started
    ok = all(c.ok for c in rec.checks)

    out = args.out or RESULTS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "plan": asdict(plan),
        "engines": [e.version() for e in engines],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "clock": args.clock,
        "load_average": os.getloadavg(),
        "convo": convo_fingerprint(),
        "seconds": round(elapsed, 1),
    }
    out.write_text(json.dumps({
        "meta": meta,
        "all_checks_passed": ok,
        "checks": [asdict(c) for c in rec.checks],
        "results": [asdict(r) for r in results],
    }, indent=1, default=str))

    clock = "CPU time on SQLite, wall time on PostgreSQL" if args.clock == "cpu" else "wall time"
    print(f"## convo vs floor ({', '.join(e.version() for e in engines)}; Python {meta['python']}; "
          f"{meta['cpus']} CPUs, load {os.getloadavg()[0]:.1f}; medians of {clock}"
          f"{'; --quick: timings not meaningful' if args.quick else ''})\n")
    print(table(results))
    print(f"\nCorrectness checks: {sum(c.ok for c in rec.checks)}/{len(rec.checks)} passed"
          + ("" if ok else " — FAILED: " + "; ".join(f"[{c.engine}] {c.name}" for c in rec.checks if not c.ok)))
    print(f"Raw samples: {out}  ({elapsed:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
