"""Shared tools for the reliability, concurrency, bad-input and security tests.

Nothing here is a test: it builds stores that talk to a stand-in with a recognisable fake key,
runs the real `convo` CLI in a child process, counts rows and checks the invariants every fault
test asserts once the dust settles.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, text

from convo import Store
from convo.client import Client
from convo.standin import LABEL
from convo.types import text_of

KEY = "sk-ant-test-SECRET-1234567890"
ROOT = Path(__file__).resolve().parents[2]


class Sleeps(list[float]):
    """A fake `sleep` that records what it was asked to wait."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


_HTTP: list[Any] = []


def shared_http() -> Any:
    """One httpx.Client for every in-process store: building one (its TLS context) costs more
    than a whole send to the loopback stand-in."""
    import httpx

    if not _HTTP:
        _HTTP.append(httpx.Client())
    return _HTTP[0]


def make_store(
    url: str,
    base_url: str,
    *,
    sleeps: Sleeps | None = None,
    read_timeout: float | None = None,
    key: str = KEY,
) -> Store:
    sleep = sleeps if sleeps is not None else Sleeps()
    kw: dict[str, Any] = {"sleep": sleep, "http_client": shared_http()}
    if read_timeout is not None:
        kw["read_timeout"] = read_timeout
    client = Client(api_key=key, base_url=base_url, **kw)
    store = Store(url, client=client, sleep=sleep)
    store._owns_client = True  # close the client with the store
    return store


def retry_streamed(conv: Any) -> Any:
    """`retry(stream=True)` read to the end: the stored Reply (whether the library hands back a
    ReplyStream to iterate or the finished Reply)."""
    result = conv.retry(stream=True)
    return result.until_done() if hasattr(result, "until_done") else result


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine(url: str) -> Any:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def row_counts(url: str) -> dict[str, int]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            return {
                t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in sorted(names)
            }
    finally:
        engine.dispose()


def dump_rows(url: str) -> str:
    """Every row of every table (alembic_version included) as text."""
    engine = _engine(url)
    out: list[str] = []
    try:
        with engine.connect() as conn:
            for t in sorted(inspect(conn).get_table_names()):
                for row in conn.execute(text(f"SELECT * FROM {t}")):
                    out.append(f"{t}: {tuple(row)!r}")
    finally:
        engine.dispose()
    return "\n".join(out)


def posts(standin: Any) -> list[dict[str, Any]]:
    """The POST /v1/messages requests the stand-in received (count_tokens excluded)."""
    return [r for r in standin.requests if r["method"] == "POST" and r["path"] == "/v1/messages"]


def message_bodies(standin: Any) -> list[dict[str, Any]]:
    """Bodies of the POST /v1/messages requests the stand-in received, in order."""
    return [r["body"] for r in posts(standin)]


def user_msg(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def settled(
    store: Store, conv_id: str, user_text: str, *, replied: bool
) -> dict[str, Any]:
    """Assert what every fault test promises; return the user turn and reply (if any).

    - the user's turn is stored exactly once;
    - a reply is stored at most once, only if it completed, as the user turn's child;
    - no call row is left pending by a process that is still alive, the branch is not leased;
    - storage.integrity_problems() == [].
    """
    turns = store.storage.turns(conv_id)
    users = [t for t in turns if t.role == "user" and text_of(t.content) == user_text]
    assert len(users) == 1, f"user turn stored {len(users)} times"
    user = users[0]
    replies = [t for t in turns if t.parent_id == user.id and t.role == "assistant"]
    assert len(replies) == (1 if replied else 0), [r.content for r in replies]
    reply = replies[0] if replies else None
    if reply is not None:
        assert reply.kind == "reply"
        assert reply.stop_reason in (
            "end_turn",
            "max_tokens",
            "stop_sequence",
            "tool_use",
        )
        assert text_of(reply.content).startswith(LABEL)
        ok = [c for c in store.storage.calls(conv_id) if c["reply_id"] == reply.id]
        assert len(ok) == 1 and ok[0]["status"] == "ok"
    assert store.storage.integrity_problems() == []
    return {"user": user, "reply": reply}


def cli_env(base_url: str | None, home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ANTHROPIC_", "CONVO_")) and k not in ("PYTHONWARNINGS",)
    }
    env["HOME"] = str(home)
    env["XDG_DATA_HOME"] = str(home / "data")
    env["ANTHROPIC_API_KEY"] = KEY
    if base_url is not None:
        env["ANTHROPIC_BASE_URL"] = base_url
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "120"
    env.update(extra)
    return env


def cli_argv(url: str | None, *args: str) -> list[str]:
    argv = [sys.executable, "-m", "convo"]
    if url is not None:
        argv += ["--db", url]
    return argv + list(args)


def run_cli(
    url: str | None,
    *args: str,
    env: Mapping[str, str],
    input: str | bytes | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        cli_argv(url, *args),
        env=dict(env),
        input=data,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def one_line_error(stderr: str) -> str:
    """The CLI's error: exactly one non-empty line on stderr, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def wait_for_lines(stream: Any, pred: Any, timeout: float) -> str:
    """Read `stream` until pred(text so far) or the timeout; returns what was read."""
    import select
    import time

    fd = stream if isinstance(stream, int) else stream.fileno()
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        if pred(buf.decode("utf-8", "replace")):
            break
    return buf.decode("utf-8", "replace")


def run_many(
    runs: Sequence[tuple[Sequence[str], Mapping[str, str]]],
    timeout: float = 90,
    stdin: Sequence[bytes | None] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run CLI invocations ((args incl. --db, env) pairs) at once; results in the same order."""
    inputs = list(stdin) if stdin is not None else [None] * len(runs)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "convo", *args],
            env=dict(env),
            stdin=subprocess.DEVNULL if data is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        for (args, env), data in zip(runs, inputs, strict=True)
    ]
    out = []
    for p, data in zip(procs, inputs, strict=True):
        so, se = p.communicate(input=data, timeout=timeout)
        out.append(
            subprocess.CompletedProcess(
                p.args,
                p.returncode,
                so.decode("utf-8", "replace"),
                se.decode("utf-8", "replace"),
            )
        )
    return out


def error_lines(stderr: str) -> list[str]:
    """The CLI's `convo: error:` lines (retry notices are not errors)."""
    return [line for line in stderr.splitlines() if line.startswith("convo: error:")]
