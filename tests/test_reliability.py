"""Nothing is lost or duplicated under faults, crashes and interrupts (both engines).

For every fault, once the dust settles:
- the user's turn is stored exactly once;
- a reply is stored at most once, and only if it completed;
- the calls ledger has one row per attempt with the right status;
- the next request replays the right history (checked on a follow-up request body);
- storage.integrity_problems() == [].

The library is driven in-process (fake sleeps, so retries never wait); the real `convo` CLI runs
in child processes against the stand-in over loopback (real, short sleeps: only what is needed,
e.g. `retry-after-ms: 1`). Crashes are real SIGKILLs; Ctrl-C is a real SIGINT.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.kit import (
    KEY,
    ROOT,
    Sleeps,
    cli_argv,
    cli_env,
    closed_port,
    error_lines,
    make_store,
    message_bodies,
    one_line_error,
    retry_streamed,
    run_cli,
    run_many,
    settled,
    user_msg,
    wait_for_lines,
)
from helpers.stall import FIRST, INPUT_TOKENS, StallServer

from convo import APIError, Conflict, InvalidInput, Store, StoreError
from convo.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    OverloadedError,
    RateLimitError,
    RequestTooLargeError,
)
from convo.standin import StandIn
from convo.types import text_of

MODEL = "claude-sonnet-4-5"


# (status, http_status, error_type) of a call row
Row = tuple[str, int | None, str | None]
OK: Row = ("ok", 200, None)


@dataclass(frozen=True)
class Fault:
    """One injected fault and what the ledger must say about the send it hit."""

    id: str
    inject: Callable[[StandIn], None]
    json_rows: list[Row]
    stream_rows: list[Row] | None = None  # when streaming differs
    error: type[Exception] | None = None  # what the send raises; None: it recovered
    sleeps: Callable[[list[float]], bool] = field(default=lambda s: s == [])
    refused: bool = False  # the base URL is a closed port
    read_timeout: float | None = None

    def rows(self, mode: str) -> list[Row]:
        return (
            self.stream_rows
            if mode == "stream" and self.stream_rows is not None
            else self.json_rows
        )


def _backoff(n: int) -> Callable[[list[float]], bool]:
    """n retries with the default backoff: 0.5 * 2**k * (1 - 0.25 * random)."""
    return lambda s: (
        len(s) == n and all(0.375 * 2**k <= d <= 0.5 * 2**k for k, d in enumerate(s))
    )


def _fail(
    status: int, headers: dict[str, str] | None = None, times: int = 1
) -> Callable[[StandIn], None]:
    return lambda s: s.fail_next(status, headers=headers, times=times)


_TYPES = {
    429: "rate_limit_error",
    529: "overloaded_error",
    500: "api_error",
    503: "api_error",
    400: "invalid_request_error",
    401: "authentication_error",
    413: "request_too_large",
}
_CLASSES: dict[int, type[Exception]] = {
    429: RateLimitError,
    529: OverloadedError,
    500: InternalServerError,
    503: InternalServerError,
    400: BadRequestError,
    401: AuthenticationError,
    413: RequestTooLargeError,
}
CONN: Row = ("error", None, "APIConnectionError")
TIMEOUT: Row = ("error", None, "APITimeoutError")


def _status_faults() -> list[Fault]:
    out = []
    for status in (429, 529, 500, 503):
        row: Row = ("error", status, _TYPES[status])
        out.append(
            Fault(
                f"http{status}-retry-after-1",
                _fail(status, {"retry-after": "1"}),
                [row, OK],
                sleeps=lambda s: s == [1.0],
            )
        )
        out.append(Fault(f"http{status}", _fail(status), [row, OK], sleeps=_backoff(1)))
    # retry-after: 0 is outside (0, 60]: the default backoff applies, as in the SDK
    out.append(
        Fault(
            "http429-retry-after-0",
            _fail(429, {"retry-after": "0"}),
            [("error", 429, "rate_limit_error"), OK],
            sleeps=_backoff(1),
        )
    )
    out.append(
        Fault(
            "http529-x-should-retry-false",
            _fail(529, {"x-should-retry": "false"}),
            [("error", 529, "overloaded_error")],
            error=OverloadedError,
        )
    )
    out.append(
        Fault(
            "http503-retries-exhausted",
            _fail(503, {"retry-after": "1"}, times=3),
            [("error", 503, "api_error")] * 3,
            error=InternalServerError,
            sleeps=lambda s: s == [1.0, 1.0],
        )
    )
    for status in (400, 401, 413):
        out.append(
            Fault(
                f"http{status}",
                _fail(status),
                [("error", status, _TYPES[status])],
                error=_CLASSES[status],
            )
        )
    return out


FAULTS = [
    *_status_faults(),
    Fault(
        "connection-refused",
        lambda s: None,
        [CONN] * 3,
        error=APIConnectionError,
        sleeps=_backoff(2),
        refused=True,
    ),
    Fault("drop", lambda s: s.drop_next(), [CONN, OK], sleeps=_backoff(1)),
    Fault(
        "cut-json",
        lambda s: s.cut_json_next(),
        [CONN, OK],
        stream_rows=[("cut", 200, "APIConnectionError"), OK],
        sleeps=_backoff(1),
    ),
    Fault(
        "cut-stream-midway",
        lambda s: s.cut_stream_next(after_events=5),
        [CONN, OK],
        stream_rows=[("cut", 200, "APIConnectionError"), OK],
        sleeps=_backoff(1),
    ),
    Fault(
        "error-event-midway",
        lambda s: s.error_event_next("overloaded_error", after_events=5),
        [("error", 529, "overloaded_error"), OK],
        stream_rows=[("cut", 200, "overloaded_error"), OK],
        sleeps=_backoff(1),
    ),
    Fault(
        "read-timeout",
        lambda s: s.delay_next(5),  # the stand-in gives up waiting when it stops
        [TIMEOUT, OK],
        sleeps=_backoff(1),
        read_timeout=1.0,  # generous: the retry must not time out on a loaded machine
    ),
]


def _send(conv: Any, text: str | None, mode: str) -> Any:
    if mode == "stream":
        if text is None:
            return retry_streamed(conv)
        rs = conv.stream(text)
        chunks = list(rs)
        assert rs.reply is not None
        assert chunks  # text arrived as it came
        return rs.reply
    return conv.retry() if text is None else conv.send(text)


def _follow_up(
    url: str, standin: StandIn, conv_id: str, text: str, mode: str, *, replied: bool
) -> None:
    """From a fresh store (as after a restart): complete the turn if needed, then go on, and
    check both request bodies replay exactly the stored history."""
    with make_store(url, standin.base_url) as good:
        conv = good.get(conv_id)
        if not replied:
            n = len(message_bodies(standin))
            _send(conv, None, mode)
            bodies = message_bodies(standin)
            assert len(bodies) == n + 1
            # the unanswered user turn goes out once, alone
            assert bodies[-1]["messages"] == [user_msg(text)]
        first = settled(good, conv_id, text, replied=True)
        reply = first["reply"]
        with pytest.raises(InvalidInput) as nothing:
            conv.retry()
        assert "nothing to retry" in str(nothing.value)
        conv.send("And a follow-up, please?")
        assert message_bodies(standin)[-1]["messages"] == [
            user_msg(text),
            {"role": "assistant", "content": reply.content},
            user_msg("And a follow-up, please?"),
        ]
        settled(good, conv_id, "And a follow-up, please?", replied=True)
        assert [t.role for t in conv.turns()] == [
            "user",
            "assistant",
            "user",
            "assistant",
        ]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault_matrix_library(db_url: str, standin: StandIn, fault: Fault) -> None:
    """Each fault hits a plain send and a streamed one (two conversations of one store)."""
    for mode in ("json", "stream"):
        standin.clear_requests()
        _one_fault(db_url, standin, fault, mode)


def _one_fault(db_url: str, standin: StandIn, fault: Fault, mode: str) -> None:
    sleeps = Sleeps()
    base = f"http://127.0.0.1:{closed_port()}" if fault.refused else standin.base_url
    text = f"Hello there, after {fault.id} ({mode})"
    with make_store(
        db_url, base, sleeps=sleeps, read_timeout=fault.read_timeout
    ) as store:
        conv = store.create(MODEL)
        fault.inject(standin)
        raised: Exception | None = None
        try:
            reply = _send(conv, text, mode)
        except APIError as e:
            raised = e
            reply = None
        if fault.error is None:
            assert raised is None, raised
            assert reply is not None and reply.turn_id is not None
        else:
            assert isinstance(raised, fault.error), raised
            assert KEY not in str(raised)
        calls = store.storage.calls(conv.id)
        rows = [(c["status"], c["http_status"], c["error_type"]) for c in calls]
        assert rows == fault.rows(mode), mode
        assert [c["attempt"] for c in calls] == list(range(len(calls)))
        assert all(c["finished_at"] is not None for c in calls), (
            "a call row was left pending"
        )
        assert all(c["streamed"] == (mode == "stream") for c in calls)
        if not fault.refused:  # one ledger row per request the server saw
            assert len(message_bodies(standin)) == len(calls)
            # every attempt sent the same body: the user turn once
            assert all(
                b["messages"] == [user_msg(text)] for b in message_bodies(standin)
            )
        for c in calls:
            if c["status"] == "cut":  # billed partial usage is kept
                assert c["input_tokens"] > 0 and c["partial_text"]
            if c["status"] == "error":
                assert c["reply_id"] is None and c["output_tokens"] == 0
        assert fault.sleeps(sleeps), sleeps
        settled(store, conv.id, text, replied=fault.error is None)
        (branch,) = conv.branches()
        assert branch.lease_owner is None  # released, whatever happened
    _follow_up(db_url, standin, conv.id, text, mode, replied=fault.error is None)


def test_stream_abandoned_midway_is_cancelled_with_partial_usage(db_url: str) -> None:
    """A consumer that stops reading mid-stream (the library's Ctrl-C): the user turn stays, the
    call row says cancelled with what was billed so far, and nothing half-written appears."""
    with StallServer() as stall, StandIn() as standin:
        with make_store(db_url, stall.base_url) as store:
            conv = store.create(MODEL)
            rs = conv.stream("Tell me a long story, please")
            it = iter(rs)
            assert next(it) == FIRST
            rs.close()
            assert rs.reply is None
            (call,) = store.storage.calls(conv.id)
            assert call["status"] == "cancelled"
            assert call["input_tokens"] == INPUT_TOKENS
            assert call["partial_text"] == FIRST
            assert call["finished_at"] is not None
            settled(store, conv.id, "Tell me a long story, please", replied=False)
            assert conv.branches()[0].lease_owner is None
        _follow_up(
            db_url,
            standin,
            conv.id,
            "Tell me a long story, please",
            "stream",
            replied=False,
        )


def test_keyboard_interrupt_inside_the_consumer_is_recorded(db_url: str) -> None:
    """KeyboardInterrupt raised while handling a chunk (what Ctrl-C does in a REPL)."""
    with StallServer() as stall, make_store(db_url, stall.base_url) as store:
        conv = store.create(MODEL)
        with pytest.raises(KeyboardInterrupt):
            for _chunk in conv.stream("Interrupt me"):
                raise KeyboardInterrupt
        (call,) = store.storage.calls(conv.id)
        assert call["status"] == "cancelled"
        assert call["input_tokens"] == INPUT_TOKENS
        settled(store, conv.id, "Interrupt me", replied=False)
        assert conv.branches()[0].lease_owner is None


# -- the real CLI in child processes -------------------------------------------------------------


@dataclass(frozen=True)
class CliFault:
    id: str
    inject: Callable[[StandIn], None] | None  # None: connection refused
    args: tuple[str, ...]
    exit: int
    rows: list[Row]


# (400 and 413 take the same way through the CLI as 401, a cut JSON body the same as a drop:
# the library matrix above has them all.)
CLI_FAULTS = [
    CliFault(
        "http529-retry-after-ms",
        _fail(529, {"retry-after-ms": "1"}),
        (),
        0,
        [("error", 529, "overloaded_error"), OK],
    ),
    CliFault(
        "http429-no-stream",
        _fail(429, {"retry-after-ms": "1"}),
        ("--no-stream",),
        0,
        [("error", 429, "rate_limit_error"), OK],
    ),
    CliFault(
        "http503-retry-after",
        _fail(503, {"retry-after": "0.01"}),
        (),
        0,
        [("error", 503, "api_error"), OK],
    ),
    CliFault(
        "http529-x-should-retry-false",
        _fail(529, {"x-should-retry": "false"}),
        (),
        1,
        [("error", 529, "overloaded_error")],
    ),
    CliFault(
        "http401",
        _fail(401),
        ("--no-stream",),
        1,
        [("error", 401, "authentication_error")],
    ),
    CliFault("connection-refused", None, (), 1, [CONN] * 3),
    CliFault("drop", lambda s: s.drop_next(), ("--no-stream",), 0, [CONN, OK]),
    CliFault(
        "cut-stream-midway",
        lambda s: s.cut_stream_next(after_events=5),
        (),
        0,
        [("cut", 200, "APIConnectionError"), OK],
    ),
    CliFault(
        "error-event-midway",
        lambda s: s.error_event_next(after_events=5),
        (),
        0,
        [("cut", 200, "overloaded_error"), OK],
    ),
]


# Every fault on SQLite; on PostgreSQL one of each kind (the engine only changes the storage).
PG_CLI_FAULTS = (
    "http529-retry-after-ms",
    "http401",
    "connection-refused",
    "cut-stream-midway",
)


@pytest.mark.slow
def test_fault_matrix_cli(db_url: str, tmp_path: Path) -> None:
    """`convo send` in a child process under each fault (all at once, one stand-in each), then
    `convo retry` for the failed ones; the follow-up request is checked from the library."""
    faults = (
        CLI_FAULTS
        if db_url.startswith("sqlite")
        else [f for f in CLI_FAULTS if f.id in PG_CLI_FAULTS]
    )
    standins = [StandIn().start() for _ in faults]
    try:
        with make_store(db_url, standins[0].base_url) as store:
            convs = [store.create(MODEL) for _ in faults]
        runs = []
        for fault, s, conv in zip(faults, standins, convs, strict=True):
            base = (
                f"http://127.0.0.1:{closed_port()}"
                if fault.inject is None
                else s.base_url
            )
            if fault.inject is not None:
                fault.inject(s)
            text = f"Hello from the CLI, after {fault.id}"
            runs.append(
                (
                    ["--db", db_url, "send", "-C", conv.id, text, *fault.args],
                    cli_env(base, tmp_path),
                )
            )
        results = run_many(runs)
        retries = []
        with make_store(db_url, standins[0].base_url) as store:
            for fault, s, conv, res in zip(
                faults, standins, convs, results, strict=True
            ):
                text = f"Hello from the CLI, after {fault.id}"
                where = f"{fault.id}: {res.stderr}"
                assert res.returncode == fault.exit, where
                assert KEY not in res.stdout + res.stderr
                assert "Traceback" not in res.stderr, where
                rows = [
                    (c["status"], c["http_status"], c["error_type"])
                    for c in store.storage.calls(conv.id)
                ]
                assert rows == fault.rows, where
                assert all(
                    c["finished_at"] is not None for c in store.storage.calls(conv.id)
                )
                if fault.inject is not None:
                    assert len(message_bodies(s)) == len(rows)
                state = settled(store, conv.id, text, replied=fault.exit == 0)
                if fault.exit == 0:
                    assert error_lines(res.stderr) == [], where
                    # what is printed last is what was stored, whole
                    assert res.stdout.rstrip("\n").splitlines()[-1] == text_of(
                        state["reply"].content
                    )
                else:
                    (line,) = error_lines(res.stderr)
                    assert "your turn is saved" in line and "convo retry" in line
                    retries.append((fault, s, conv, text))
        assert len(retries) == sum(f.exit != 0 for f in faults)
        results = run_many(
            [
                (
                    ["--db", db_url, "retry", "-C", conv.id],
                    cli_env(s.base_url, tmp_path),
                )
                for _f, s, conv, _t in retries
            ]
        )
        for (fault, s, _conv, text), res in zip(retries, results, strict=True):
            assert res.returncode == 0, f"{fault.id}: {res.stderr}"
            assert message_bodies(s)[-1]["messages"] == [user_msg(text)]
        for fault, s, conv in zip(faults, standins, convs, strict=True):
            text = f"Hello from the CLI, after {fault.id}"
            with make_store(db_url, s.base_url) as store:
                reply = settled(store, conv.id, text, replied=True)["reply"]
                store.get(conv.id).send("Next?")
                assert message_bodies(s)[-1]["messages"] == [
                    user_msg(text),
                    {"role": "assistant", "content": reply.content},
                    user_msg("Next?"),
                ]
    finally:
        for s in standins:
            s.stop()


# -- SIGKILL at each point of a send, then restart -------------------------------------------------

# The real CLI with Storage.finish_with_reply patched to die before (or right after) it commits:
# the moment between receiving the reply and storing it cannot be hit from outside.
DIE_IN_COMMIT = """
import os, signal, sys
import convo.store
when = sys.argv.pop(1)
original = convo.store.Storage.finish_with_reply
def finish_with_reply(self, *args, **kwargs):
    if when == "after":
        original(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
convo.store.Storage.finish_with_reply = finish_with_reply
from convo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _lease_holder_pid(store: Store, conv_id: str) -> int | None:
    (branch,) = store.storage.branches(conv_id)
    if branch.lease_owner is None:
        return None
    return int(branch.lease_owner.split(":")[1])


def _after_restart(
    db_url: str,
    tmp_path: Path,
    standin: StandIn,
    conv_id: str,
    text: str,
    *,
    replied: bool,
    killed_pid: int,
) -> None:
    """The state a kill left is allowed; `convo retry` completes it at once (the dead holder's
    lease does not block it) and a second `convo retry` has nothing to do (exit 2)."""
    with make_store(db_url, standin.base_url) as store:
        settled_state = settled(store, conv_id, text, replied=replied)
        holder = _lease_holder_pid(store, conv_id)
        if not replied:
            assert holder == killed_pid  # the dead process still "holds" the branch
            killed = [c for c in store.storage.calls(conv_id) if c["reply_id"] is None]
            assert killed and all(c["status"] != "ok" for c in killed)
        else:
            assert holder is None  # released in the reply's transaction
    env = cli_env(standin.base_url, tmp_path)
    if not replied:
        start = time.monotonic()
        res = run_cli(db_url, "retry", "-C", conv_id, env=env)
        assert res.returncode == 0, res.stderr
        assert (
            time.monotonic() - start < 20
        )  # not the 15-minute lease, nor the 120 s wait
        assert message_bodies(standin)[-1]["messages"] == [user_msg(text)]
    res = run_cli(db_url, "retry", "-C", conv_id, env=env)
    assert res.returncode == 2, res.stderr
    assert "nothing to retry" in one_line_error(res.stderr)
    with make_store(db_url, standin.base_url) as store:
        final = settled(store, conv_id, text, replied=True)
        if replied:
            assert final["reply"].id == settled_state["reply"].id
        assert _lease_holder_pid(store, conv_id) is None
        ok = [c for c in store.storage.calls(conv_id) if c["status"] == "ok"]
        assert len(ok) == 1


def _kill(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)  # reaped, as a shell would: the pid is gone
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


@pytest.mark.slow
def test_sigkill_while_the_request_is_in_flight(
    db_url: str, tmp_path: Path, standin: StandIn
) -> None:
    """(a) killed after the stand-in received the request, before it answered (a plain request;
    a streamed one is killed mid-stream below)."""
    with make_store(db_url, standin.base_url) as store:
        conv = store.create(MODEL)
    standin.delay_next(30)
    text = "Killed while waiting for the answer"
    args = ["send", "-C", conv.id, text, "--no-stream"]
    proc = subprocess.Popen(
        cli_argv(db_url, *args),
        env=cli_env(standin.base_url, tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not message_bodies(standin) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert message_bodies(standin), "the request never arrived"
    pid = _kill(proc)
    _after_restart(
        db_url, tmp_path, standin, conv.id, text, replied=False, killed_pid=pid
    )


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_stream(
    db_url: str, tmp_path: Path, standin: StandIn
) -> None:
    """(b) killed after the first chunk of a streamed reply is on screen."""
    with make_store(db_url, standin.base_url) as store:
        conv = store.create(MODEL)
    text = "Killed mid-stream"
    with StallServer() as stall:
        proc = subprocess.Popen(
            cli_argv(db_url, "send", "-C", conv.id, text),
            env=cli_env(stall.base_url, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        seen = wait_for_lines(proc.stdout, lambda s: FIRST in s, 30)
        assert FIRST in seen
        pid = _kill(proc)
        proc.stdout.close()
    _after_restart(
        db_url, tmp_path, standin, conv.id, text, replied=False, killed_pid=pid
    )


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_while_committing_the_reply(
    db_url: str, tmp_path: Path, standin: StandIn, when: str
) -> None:
    """(c) the reply arrived; the process dies before (or right after) committing it."""
    with make_store(db_url, standin.base_url) as store:
        conv = store.create(MODEL)
    text = f"Killed {when} the reply's commit"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            DIE_IN_COMMIT,
            when,
            "--db",
            db_url,
            "send",
            "-C",
            conv.id,
            text,
        ],
        env=cli_env(standin.base_url, tmp_path),
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(message_bodies(standin)) == 1  # the API answered (and billed) once
    _after_restart(
        db_url,
        tmp_path,
        standin,
        conv.id,
        text,
        replied=when == "after",
        killed_pid=-1 if when == "after" else _pid_of_dead_holder(db_url, conv.id),
    )


def _pid_of_dead_holder(db_url: str, conv_id: str) -> int:
    with Store(db_url) as store:
        pid = _lease_holder_pid(store, conv_id)
    assert pid is not None
    return pid


# -- Ctrl-C ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "says"),
    [
        (signal.SIGINT, 130, b"your turn is saved"),
        # `timeout 3 convo send ...`, a closed terminal: the process died at once, its call
        # pending with no tokens (later abandoned with none), though input had been billed.
        (signal.SIGTERM, 143, b"terminated by signal 15"),
        (signal.SIGHUP, 129, b"terminated by signal 1"),
    ],
)
def test_ctrl_c_or_a_termination_during_a_streamed_send(
    db_url: str, tmp_path: Path, standin: StandIn, sig: signal.Signals, code: int, says: bytes
) -> None:
    with make_store(db_url, standin.base_url) as store:
        conv = store.create(MODEL)
    text = "Interrupt this reply"
    with StallServer() as stall:
        proc = subprocess.Popen(
            cli_argv(db_url, "send", "-C", conv.id, text),
            env=cli_env(stall.base_url, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        seen = wait_for_lines(proc.stdout, lambda s: FIRST in s, 30)
        assert FIRST in seen
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert says in err and b"your turn is saved" in err and b"Traceback" not in err
    with make_store(db_url, standin.base_url) as store:
        settled(store, conv.id, text, replied=False)
        (call,) = store.storage.calls(conv.id)
        assert call["status"] == "cancelled"
        assert call["input_tokens"] == INPUT_TOKENS  # billed input so far is kept
        assert call["partial_text"] == FIRST
        assert call["finished_at"] is not None
        assert _lease_holder_pid(store, conv.id) is None
    _follow_up(db_url, standin, conv.id, text, "stream", replied=False)


@pytest.mark.slow
def test_ctrl_c_during_a_reply_in_chat_returns_to_the_prompt(
    db_url: str, tmp_path: Path
) -> None:
    with make_store(db_url, "http://unused") as store:
        conv = store.create(MODEL)
    text = "Interrupt me in chat"
    with StallServer() as stall:
        proc = subprocess.Popen(
            cli_argv(db_url, "chat", "-C", conv.id),
            env=cli_env(stall.base_url, tmp_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        assert proc.stdin and proc.stdout and proc.stderr
        proc.stdin.write(text.encode() + b"\n")
        proc.stdin.flush()
        seen = wait_for_lines(proc.stdout, lambda s: FIRST in s, 30)
        assert FIRST in seen
        proc.send_signal(signal.SIGINT)
        # back at the prompt: the process is still there and asks for the next line
        seen = wait_for_lines(proc.stdout, lambda s: "you> " in s, 15)
        assert "you> " in seen
        assert proc.poll() is None
        stall.release()  # from now on replies come through whole
        proc.stdin.write(b"/retry\n")
        proc.stdin.flush()
        seen = wait_for_lines(
            proc.stdout, lambda s: "back." in s and s.rstrip().endswith("you>"), 30
        )
        assert "held back." in seen
        _out, err = proc.communicate(timeout=30)  # closes stdin: EOF leaves
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    # In chat, what asks again is /retry, not `convo retry`.
    assert b"your turn is saved; /retry asks again" in err and b"convo retry" not in err
    with make_store(db_url, "http://unused") as store:
        settled(store, conv.id, text, replied=True)
        calls = store.storage.calls(conv.id)
        assert [c["status"] for c in calls] == ["cancelled", "ok"]
        assert (
            calls[0]["input_tokens"] == INPUT_TOKENS
            and calls[0]["partial_text"] == FIRST
        )
        # the retry sent the user turn once
        assert stall.requests[-1]["body"]["messages"] == [user_msg(text)]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, StoreError])
def test_a_send_stopped_right_after_its_turn_was_written_frees_the_branch(
    store: Store, monkeypatch: pytest.MonkeyPatch, failure: type[BaseException]
) -> None:
    """Ctrl-C, or a connection lost at COMMIT, after the user's turn and the lease were
    written: the turn stays, the branch is free at once and the call is marked as never made."""
    conv = store.create()
    conv.send("first")
    real = store.storage.begin_send

    def then_fail(*args: Any, **kw: Any) -> Any:
        real(*args, **kw)
        raise failure("stopped")

    monkeypatch.setattr(store.storage, "begin_send", then_fail)
    with pytest.raises(failure):
        conv.send("second")
    monkeypatch.undo()
    assert [b.lease_owner for b in conv.branches()] == [None]
    assert [c["status"] for c in conv.calls()] == ["ok", "abandoned"]
    reply = conv.retry()
    assert [t.kind for t in conv.turns()] == ["user", "reply", "user", "reply"]
    assert reply.turn_id == conv.turns()[-1].id


@pytest.mark.parametrize("landed", [False, True])
def test_ctrl_c_while_the_reply_is_stored_keeps_the_ledger_right(
    store: Store, standin: StandIn, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """Ctrl-C while the reply's commit waits (for another writer's lock, say): the call was
    billed, so its row is `cancelled` with the reply's usage, not left `pending` with nothing for
    good. If the commit landed first, the row stays as the commit left it."""
    conv = store.create()
    storage = store.storage
    real = storage.finish_with_reply

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if landed:
            real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "finish_with_reply", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conv.send("store me")
    monkeypatch.undo()
    (call,) = conv.calls()
    assert call["input_tokens"] > 0 and call["output_tokens"] > 0 and call["cost_usd"] > 0
    if landed:
        assert call["status"] == "ok" and call["reply_id"] == conv.turns()[-1].id
    else:
        assert (call["status"], call["error_type"], call["reply_id"]) == ("cancelled", "interrupted", None)
        assert [t.kind for t in conv.turns()] == ["user"]  # the turn kept
        assert conv.send().text  # the branch is free: the turn gets its answer
    assert store.usage().total.output_tokens >= call["output_tokens"]


def test_a_reply_not_stored_after_its_call_was_abandoned_still_records_what_it_cost(
    store: Store, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send's lease lapsed, another writer marked its call abandoned and moved the head; the
    reply then arrived and could not be stored: the call was billed, so its row says so."""
    conv = store.create()
    storage = store.storage

    def overtaken(call_id: int, *args: Any, **kwargs: Any) -> Any:
        storage.finish_call(call_id, status="abandoned", error_type="abandoned")
        raise Conflict("branch 'main' moved: another writer got there first")

    monkeypatch.setattr(storage, "finish_with_reply", overtaken)
    with pytest.raises(Conflict):
        conv.send("store me")
    monkeypatch.undo()
    (call,) = conv.calls()
    assert (call["status"], call["error_type"]) == ("error", "reply_not_stored")
    assert call["input_tokens"] > 0 and call["output_tokens"] > 0 and call["cost_usd"] > 0


@pytest.mark.slow
def test_a_send_under_nohup_outlives_its_terminal(db_url: str, tmp_path: Path, standin: StandIn) -> None:
    """SIGHUP ignored on entry (`nohup`) stays ignored: only a signal that would have killed
    convo is turned into an orderly stop."""
    with make_store(db_url, standin.base_url) as store:
        conv = store.create(MODEL)
    with StallServer() as stall:
        proc = subprocess.Popen(
            cli_argv(db_url, "send", "-C", conv.id, "keep going"),
            env=cli_env(stall.base_url, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
        )
        try:
            assert proc.stdout is not None
            assert FIRST in wait_for_lines(proc.stdout, lambda s: FIRST in s, 30)
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert proc.poll() is None
            stall.release()
        finally:
            _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    with make_store(db_url, standin.base_url) as store:
        assert [c["status"] for c in store.storage.calls(conv.id)] == ["ok"]


def test_a_send_stopped_before_its_attempt_began_leaves_no_call_pending(
    store: Store, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM after the user's turn was committed but before the attempt's own
    failure handling began: the call stayed pending for good, as this process had let go of the
    branch, so no later send found a dead holder to clean up after."""
    import convo.service

    conv = store.create()

    def stopped() -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(convo.service, "MessageAccumulator", stopped)
    with pytest.raises(KeyboardInterrupt):
        conv.send("stop me")
    monkeypatch.undo()
    (call,) = conv.calls()
    assert (call["status"], call["error_type"]) == ("abandoned", "abandoned")
    assert [t.kind for t in conv.turns()] == ["user"]
    assert conv.send().text  # the branch is free and the turn gets its answer
    assert [c["status"] for c in conv.calls()] == ["abandoned", "ok"]
