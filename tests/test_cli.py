"""The `convo` CLI: pure rendering tests, then the real CLI run as a subprocess.

The subprocess tests (`@pytest.mark.slow`) run `python -m convo --db URL ...` against a StandIn
started in this process (ANTHROPIC_BASE_URL points the child at it), on SQLite and PostgreSQL.
Every run checks that the API key never reaches stdout or stderr and that errors are one line.
Database state is checked in-process through the service layer; setup that is not the subject
of a test is done in-process too, which keeps the file's runtime low (each CLI process costs
about a second of imports).
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from convo import render
from convo.cli import build_parser
from convo.client import Client
from convo.errors import BadRequestError, NotFound
from convo.service import Store
from convo.standin import StandIn
from convo.store import BranchRow, ConversationSummary, NewTurn, TurnRow, UsageReport, UsageRow, lease_owner_id
from convo.types import ToolUse

TEST_KEY = "sk-ant-test-NEVER-PRINT-0123456789"
REPO = Path(__file__).resolve().parent.parent


# -- pure rendering ----------------------------------------------------------------------------

UTC = UTC
T0 = datetime(2026, 5, 1, 12, 30, 45, tzinfo=UTC)


def turn(
    id: int, parent: int | None, role: str, kind: str, text: str, depth: int = 0
) -> TurnRow:
    return TurnRow(
        id,
        "c1",
        1,
        parent,
        role,
        kind,
        [{"type": "text", "text": text}],
        depth,
        None,
        None,
        T0,
    )


def test_formats() -> None:
    assert render.fmt_int(1234567) == "1,234,567"
    assert render.fmt_int(None) == "0"
    assert render.fmt_usd(0.00123) == "$0.0012"
    assert render.fmt_usd(None) == "$?"
    assert render.fmt_size(512) == "512 B"
    assert render.fmt_size(12_595) == "12.3 KB"
    assert render.fmt_size(3 * 1024 * 1024) == "3.0 MB"
    assert render.one_line("a\n  b\tc") == "a b c"
    assert render.one_line("x" * 50, 10) == "x" * 9 + "…"
    assert render.local_minute(T0, UTC) == "2026-05-01 12:30"
    assert render.turn_label("user", "user") == "user"
    assert render.turn_label("assistant", "reply") == "assistant/reply"


def test_ids_are_shown_whole_and_padded_to_a_column() -> None:
    assert render.id_width([7, 12345, None, 88]) == 5
    assert render.id_width([]) == 1
    assert render.short(42, 5) == "42   "
    assert render.short(None, 3) == "-  "
    assert render.short(123456, 2) == "123456"  # never cut: the whole id is what resolves


def test_block_text_renders_every_kind() -> None:
    assert render.block_text({"type": "text", "text": "hi"}) == "hi"
    use = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert render.block_text(use) == '[tool_use toolu_1] get_weather {"city": "Paris"}'
    res = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
    assert render.block_text(res) == "[tool_result for toolu_1] sunny"
    err = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "boom",
        "is_error": True,
    }
    assert render.block_text(err) == "[tool_result for toolu_1] [error] boom"
    img = {
        "type": "image",
        "source": {
            "type": "convo_blob",
            "media_type": "image/png",
            "sha256": "ab",
            "size": 12_595,
        },
    }
    assert render.block_text(img) == "[image image/png 12.3 KB]"
    assert render.block_text({"type": "server_thing"}) == "[server_thing]"
    assert render.content_text([{"type": "text", "text": "look:"}, img]) == (
        "look:\n[image image/png 12.3 KB]"
    )
    assert render.tool_use_line(ToolUse(id="toolu_1", name="f", input={"a": 1})) == (
        '[tool_use toolu_1] f({"a": 1})'
    )


def test_usage_line() -> None:
    call = {
        "input_tokens": 1234,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 1100,
        "output_tokens": 56,
        "cost_usd": 0.00123,
    }
    assert (
        render.usage_line(call)
        == "in 1,234 (+cache write 0, read 1,100) out 56 · $0.0012"
    )
    assert render.usage_line(None) == ""


def test_table_aligns_and_adds_a_footer() -> None:
    out = render.table(
        ("name", "n"), [("a", "1"), ("bbb", "22")], right=(1,), footer=("total", "23")
    )
    assert out.splitlines() == [
        "name    n",
        "a       1",
        "bbb    22",
        "-----  --",
        "total  23",
    ]


@dataclass
class _Info:
    id: str = "c1"
    title: str | None = "trip"
    model: str = "claude-sonnet-4-5"
    system: Any = "be brief"
    params: dict[str, Any] | None = None
    current_branch: str = "main"
    turn_count: int = 2
    created_at: datetime = T0
    updated_at: datetime = T0


def _path() -> list[Any]:
    from convo.history import TurnRecord

    return [
        TurnRecord("01aaaaaaaa1", "user", "user", [{"type": "text", "text": "Hello"}]),
        TurnRecord(
            "01aaaaaaaa2",
            "assistant",
            "reply",
            [{"type": "text", "text": "Hi!"}],
            "max_tokens",
        ),
    ]


CALLS = {
    "01aaaaaaaa2": {
        "input_tokens": 10,
        "output_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cost_usd": 0.0001,
    }
}


def test_transcript_text() -> None:
    out = render.transcript(_Info(), "main", _path(), CALLS)
    assert out.splitlines() == [
        'conversation c1 "trip" · claude-sonnet-4-5 · branch main',
        "system: be brief",
        "",
        "01aaaaaaaa1 user",
        "  Hello",
        "",
        "01aaaaaaaa2 assistant/reply  [stopped: max_tokens]",
        "  Hi!",
        "  in 10 (+cache write 0, read 0) out 3 · $0.0001",
    ]


def test_transcript_json_shape() -> None:
    data = render.transcript_json(_Info(params={}), "main", _path(), CALLS)
    assert set(data) == {"conversation", "branch", "turns"}
    assert data["branch"] == "main"
    assert data["conversation"]["id"] == "c1"
    assert data["conversation"]["created_at"] == T0.isoformat()
    first, second = data["turns"]
    assert set(first) == {
        "id",
        "parent_id",
        "role",
        "kind",
        "content",
        "stop_reason",
        "usage",
        "cost_usd",
    }
    assert (
        first["parent_id"] is None
        and first["usage"] is None
        and first["cost_usd"] is None
    )
    assert second["parent_id"] == "01aaaaaaaa1"
    assert second["usage"] == {
        "input_tokens": 10,
        "output_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert second["cost_usd"] == 0.0001
    json.dumps(data)  # JSON-ready as it is


def test_tree_draws_branches_and_marks_heads() -> None:
    turns = [
        turn(7, None, "user", "user", "Hello there", 0),
        turn(8, 7, "assistant", "reply", "Hi! " * 30, 1),
        turn(9, 8, "user", "user", "main question", 2),
        turn(12, 8, "user", "user", "edited question", 2),
        turn(13, 12, "assistant", "reply", "edited answer", 3),
    ]
    branches = [
        BranchRow("main", 9, T0),
        BranchRow("edit-1", 13, T0),
        BranchRow("empty", None, T0),
    ]
    lines = render.tree(turns, branches, "edit-1").splitlines()
    assert lines[0].startswith("7  user ")
    assert lines[1].startswith("8  assistant/reply  Hi! Hi!")
    assert lines[1].endswith("…")
    assert lines[2].startswith("├─ 9  user ") and lines[2].endswith("[main]")
    assert lines[3].startswith("└─ 12 user ")
    assert lines[4].startswith("   13 assistant/reply") and lines[4].endswith(
        "[*edit-1]"
    )
    assert len(lines) == 5


def test_tree_of_a_deep_thread_needs_no_recursion() -> None:
    n = 5000
    turns = [
        turn(
            i + 1,
            i if i else None,
            "user" if i % 2 == 0 else "assistant",
            "user" if i % 2 == 0 else "reply",
            f"turn {i}",
            i,
        )
        for i in range(n)
    ]
    out = render.tree(turns, [BranchRow("main", n, T0)], "main")
    assert len(out.splitlines()) == n
    assert out.splitlines()[-1].endswith("[*main]")


def test_tree_of_nothing() -> None:
    assert render.tree([], [], "main") == "(no turns yet)"


def test_branches_table() -> None:
    branches = [
        BranchRow("main", 4, T0),
        BranchRow("edit-1", 1077, T0),
    ]
    out = render.branches_table(branches, "edit-1", {4: 3, 1077: 1})
    assert out.splitlines() == [
        "   branch  head  turns",
        "   main    4         4",
        "*  edit-1  1077      2",
    ]


def _report() -> UsageReport:
    rows = [
        UsageRow("main", 2, 100, 20, 1500, 3000, 0.01, 0.02),
        UsageRow("edit-1", 1, 50, 10, 0, 1500, 0.002, 0.005),
    ]
    total = UsageRow("total", 3, 150, 30, 1500, 4500, 0.012, 0.025)
    return UsageReport("branch", rows, total, 0, [])


def test_usage_renderings() -> None:
    report = _report()
    lines = render.usage_table(report).splitlines()
    assert lines[0].split() == [
        "branch",
        "calls",
        "in",
        "cache",
        "write",
        "cache",
        "read",
        "out",
        "cost",
    ]
    assert lines[-1].split() == ["total", "3", "150", "1,500", "4,500", "30", "$0.0120"]
    assert render.cache_savings_line(report.total) == (
        "prompt cache saved $0.0130 (52% of what these calls would have cost without it)"
    )
    data = render.usage_json(report)
    assert data["total"]["calls"] == 3 and data["by"] == "branch"
    assert data["cache_saved_usd"] == pytest.approx(0.013)
    rows = list(csv.DictReader(io.StringIO(render.usage_csv(report))))
    assert [r["key"] for r in rows] == ["main", "edit-1", "total"]
    assert tuple(rows[0]) == render.USAGE_CSV_COLUMNS


def test_cache_savings_line_when_caching_cost_more() -> None:
    total = UsageRow("total", 1, 0, 1, 2000, 0, 0.0075, 0.006)
    assert render.cache_savings_line(total).startswith(
        "prompt cache cost $0.0015 more (25%"
    )
    empty = UsageRow("total", 0, 0, 0, 0, 0, 0.0, 0.0)
    assert "no priced calls" in render.cache_savings_line(empty)


def test_conversations_table_and_json() -> None:
    s = ConversationSummary(
        "01abc", None, "claude-sonnet-4-5", "main", 4, T0, T0, 2, 1234, 56, 0.5
    )
    out = render.conversations_table([s], {"01abc": "what is up"}, UTC)
    header, row = out.splitlines()
    assert header.split()[:3] == ["id", "title", "model"]
    assert row.split() == [
        "01abc",
        "what",
        "is",
        "up",
        "claude-sonnet-4-5",
        "main",
        "4",
        "1,234",
        "56",
        "$0.5000",
        "2026-05-01",
        "12:30",
    ]
    (data,) = render.conversations_json([s], {"01abc": "what is up"})
    assert data["preview"] == "what is up" and data["updated_at"] == T0.isoformat()
    assert render.conversations_table([]) == "no conversations yet: run `convo new`"


def test_set_unset_knows_every_request_setting_but_tools() -> None:
    from convo.cli import _UNSETTABLE
    from convo.history import REQUEST_PARAMS

    assert set(_UNSETTABLE) == set(REQUEST_PARAMS) - {"tools"}


def test_a_refusal_says_how_to_go_on(capsys: pytest.CaptureFixture[str]) -> None:
    from convo.cli import _print_reply_tail
    from convo.service import Reply
    from convo.types import Usage

    def reply(stop: str, turn_id: int | None) -> Reply:
        return Reply(
            turn_id=turn_id, call_id=1, model="m", content=[], text="", stop_reason=stop,
            stop_sequence=None, usage=Usage(), cost_usd=None, message_id=None, request_id=None,
        )

    _print_reply_tail(reply("refusal", None))
    out, err = capsys.readouterr()
    assert out == "[stopped: refusal]\n"
    assert "Claude declined" in err and "convo edit TURN" in err
    _print_reply_tail(reply("max_tokens", 5))
    out, err = capsys.readouterr()
    assert out == "[stopped: max_tokens]\n" and err == ""


def test_parser_knows_every_command() -> None:
    parser = build_parser()
    for argv in (
        ["new"],
        ["send", "x"],
        ["send"],
        ["retry"],
        ["add", "--role", "user", "x"],
        ["request"],
        ["show", "--json"],
        ["list"],
        ["usage", "--csv"],
        ["fork", "--at", "t"],
        ["edit", "t", "x"],
        ["regenerate"],
        ["branches"],
        ["branch", "-d", "b"],
        ["checkout", "b"],
        ["tree"],
        ["tool-result", "id", "x"],
        ["db", "current"],
        ["budget", "--usd", "off"],
        ["set", "--no-cache", "--temperature", "off"],
        ["delete", "01ab"],
        ["chat"],
        ["standin"],
        ["demo"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func)
    args = parser.parse_args(["show", "--db", "sqlite:///x.db", "-C", "01ab"])
    assert args.db == "sqlite:///x.db" and args.conversation == "01ab"
    assert parser.parse_args(["--db", "sqlite:///y.db", "show"]).db == "sqlite:///y.db"


# -- the real CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


@pytest.fixture
def api(standin: StandIn) -> StandIn:
    standin.reset_faults()
    standin.clear_requests()
    return standin


def child_env(standin: StandIn | None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ANTHROPIC_", "CONVO_"))
    }
    if standin is not None:
        env["ANTHROPIC_BASE_URL"] = standin.base_url
        env["ANTHROPIC_API_KEY"] = TEST_KEY
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()

    def json(self) -> Any:
        return json.loads(self.out)


def convo(
    db: str | None,
    *args: str,
    standin: StandIn | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    argv = [sys.executable, "-m", "convo"] + (["--db", db] if db else []) + list(args)
    p = subprocess.run(
        argv,
        input=input if input is not None else b"",
        capture_output=True,
        env=env or child_env(standin),
        cwd=REPO,
        timeout=120,
    )
    run = Run(p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8"))
    assert TEST_KEY not in run.out and TEST_KEY not in run.err
    assert "Traceback" not in run.err, run.err
    return run


def convo_many(
    db: str,
    standin: StandIn,
    commands: Sequence[Sequence[str]],
    inputs: dict[int, bytes] | None = None,
) -> list[Run]:
    """Independent commands run at the same time (each process spends most of its second
    importing); `inputs` gives the stdin of some of them, by index."""
    inputs = inputs or {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(
            pool.map(
                lambda i: convo(db, *commands[i], standin=standin, input=inputs.get(i)),
                range(len(commands)),
            )
        )


def ok(run: Run) -> Run:
    assert run.code == 0, f"exit {run.code}: {run.err}"
    return run


def one_error(run: Run, code: int, *fragments: str) -> None:
    assert run.code == code, (run.code, run.out, run.err)
    errors = [line for line in run.err_lines if line.startswith("convo: error: ")]
    assert len(errors) == 1, run.err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def store_for(standin: StandIn) -> Iterator[Any]:
    """An in-process Store on the same database, for setup and for checking what was stored."""
    opened: list[tuple[Store, Client]] = []

    def open_store(url: str) -> Store:
        client = Client(api_key=TEST_KEY, base_url=standin.base_url)
        store = Store(url, client=client)
        opened.append((store, client))
        return store

    yield open_store
    for store, client in opened:
        store.close()
        client.close()


@pytest.mark.slow
def test_new_send_show_list_request_add(
    db_url: str, api: StandIn, store_for: Any
) -> None:
    cid = ok(
        convo(
            db_url, "new", "--title", "first chat", "--max-tokens", "300", standin=api
        )
    ).out
    cid = cid.strip()
    assert len(cid) == 26 and "\n" not in cid

    sent = ok(convo(db_url, "send", "Hello there", standin=api))
    assert sent.out.startswith("[stand-in, not Claude] You said: Hello there")
    assert sent.out.endswith("\n") and sent.err == ""
    assert api.requests[-1]["body"]["stream"] is True
    assert api.requests[-1]["headers"]["x-api-key"] == TEST_KEY

    # Two more conversations for the adds, so every command below can run at once.
    store = store_for(db_url)
    other = store.create(title="adds")
    prefilled = store.create("claude-3-5-haiku-20241022", title="prefilled")
    prefilled.add_user("Pick A, B or C.")
    show, show_json, listed, request, added, synthetic = convo_many(
        db_url,
        api,
        [
            ["show", "-C", cid[:12]],
            ["show", "--json", "-C", cid],
            ["list", "--json"],
            ["request", "Next question?", "--prefill", "Sure", "-C", cid],
            ["add", "--role", "user", "-", "-C", other.id],
            ["add", "--role", "assistant", "The answer is (", "-C", prefilled.id],
        ],
        inputs={4: "From stdin ✓".encode()},
    )
    lines = ok(show).out.splitlines()
    assert lines[0].startswith(f'conversation {cid} "first chat"')
    assert any(line.endswith(" user") for line in lines)
    assert any("assistant/reply" in line for line in lines)
    assert any(
        line.strip().startswith("in ") and "out " in line and "· $" in line
        for line in lines
    )

    data = ok(show_json).json()
    assert data["conversation"]["id"] == cid and data["branch"] == "main"
    user, reply = data["turns"]
    assert user["role"] == "user" and user["content"] == [
        {"type": "text", "text": "Hello there"}
    ]
    assert reply["kind"] == "reply" and reply["parent_id"] == user["id"]
    assert reply["usage"]["output_tokens"] > 0 and reply["cost_usd"] > 0

    (row,) = [r for r in ok(listed).json() if r["id"] == cid]
    assert row["title"] == "first chat" and row["turn_count"] == 2

    body = ok(request).json()
    assert body["max_tokens"] == 300
    assert [m["role"] for m in body["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert body["messages"][-1]["content"] == [{"type": "text", "text": "Sure"}]

    (turn,) = other.turns()
    assert str(turn.id) == ok(added).out.strip()
    assert turn.content == [{"type": "text", "text": "From stdin ✓"}]
    assert str(prefilled.turns()[-1].id) == ok(synthetic).out.strip()
    assert len(api.requests) == 1  # request and add send nothing

    # No TEXT continues the branch: the synthetic assistant turn is a prefill to continue.
    cont = ok(convo(db_url, "send", "--no-stream", "-C", prefilled.id, standin=api))
    assert cont.out.startswith("The answer is (C)")
    assert (
        prefilled.turns()[-1].kind == "reply"
        and "stream" not in api.requests[-1]["body"]
    )


@pytest.mark.slow
def test_failed_send_keeps_the_turn_once_and_retry_completes(
    db_url: str, api: StandIn, store_for: Any
) -> None:
    store = store_for(db_url)
    conv = store.create(title="flaky")
    api.fail_next(500, times=3, headers={"retry-after-ms": "20"})
    failed = convo(db_url, "send", "Are you there?", standin=api)
    one_error(failed, 1, "500", "convo retry")
    assert all(
        line.startswith("[retrying after ")
        for line in failed.err_lines
        if not line.startswith("convo:")
    )
    assert sum(line.startswith("[retrying after ") for line in failed.err_lines) == 2
    turns = conv.turns()
    assert [(t.role, t.content[0]["text"]) for t in turns] == [
        ("user", "Are you there?")
    ]

    retried = ok(convo(db_url, "retry", standin=api))
    assert "You said: Are you there?" in retried.out
    turns = conv.turns()
    assert [t.role for t in turns] == ["user", "assistant"]
    assert (
        len(store.storage.turns(conv.id)) == 2
    )  # nothing duplicated anywhere in the tree
    # The replayed request carried the user turn once.
    assert [m["role"] for m in api.requests[-1]["body"]["messages"]] == ["user"]


def _on_a_terminal(argv: list[str], env: dict[str, str], typed: str | None = None) -> tuple[int, str]:
    """Runs `argv` with stdout and stderr on a pseudo-terminal (and, with `typed`, stdin too,
    `typed` typed at it): its exit status, and what the terminal received (its CR LF line ends
    as LF). A child still running after a minute of silence is killed."""
    master, slave = pty.openpty()
    stdin = slave if typed is not None else subprocess.DEVNULL
    try:
        p = subprocess.Popen(argv, stdin=stdin, stdout=slave, stderr=slave, env=env, cwd=REPO)
    finally:
        os.close(slave)
    if typed is not None:
        os.write(master, typed.encode())
    received = bytearray()
    try:
        while select.select([master], [], [], 60)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            received += data
        code = p.wait(timeout=60)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    return code, received.decode("utf-8").replace("\r\n", "\n")


# What a reply (or an imported turn) could hold to drive a terminal: retitle the window, clear
# the screen, colour text (ESC and the 8-bit CSI), overwrite the line (CR).
ESCAPES = "\x1b]0;owned\x07 \x1b[2J\x1b[31mred\x1b[0m \x9b31mcsi \rover"


@pytest.mark.slow
def test_text_that_would_drive_a_terminal_is_defused_on_one_and_kept_exactly_elsewhere(
    db_url: str, api: StandIn, store_for: Any
) -> None:
    conv = store_for(db_url).create(title="escapes")
    env = child_env(api)
    code, screen = _on_a_terminal(
        [sys.executable, "-m", "convo", "--db", db_url, "send", "-C", conv.id, f"{ESCAPES}\ttab\nnext"], env
    )
    assert code == 0, screen
    sent = f"{ESCAPES}\ttab\nnext"
    user, reply = (t.content[0]["text"] for t in conv.turns())
    assert user == sent and ESCAPES.split("\r")[0] in reply  # stored exactly
    # Streamed to the terminal, every control character but tab and LF is U+FFFD.
    defused = "\ufffd]0;owned\ufffd \ufffd[2J\ufffd[31mred\ufffd[0m \ufffd31mcsi "
    assert f"You said: {defused}" in screen
    assert not any(c in screen for c in "\x1b\x07\x9b\r"), repr(screen)
    code, screen = _on_a_terminal([sys.executable, "-m", "convo", "--db", db_url, "show", "-C", conv.id], env)
    assert code == 0 and f"{defused}\ufffdover\ttab\n  next" in screen, repr(screen)
    assert screen.count(defused) == 2 and not any(c in screen for c in "\x1b\x07\x9b\r"), repr(screen)
    # To a pipe or a file, exactly as stored.
    shown = ok(convo(db_url, "show", "-C", conv.id, standin=api)).out
    assert f"{ESCAPES}\ttab\n  next" in shown and reply in shown
    # JSON is exact on a terminal too: what json leaves raw (DEL, C1) is escaped.
    code, screen = _on_a_terminal(
        [sys.executable, "-m", "convo", "--db", db_url, "show", "--json", "-C", conv.id], env
    )
    assert code == 0 and "\\u009b" in screen and "\\u001b" in screen
    assert [t["content"][0]["text"] for t in json.loads(screen)["turns"]] == [user, reply]
    # A CR LF is a line end on a terminal, not a CR shown as U+FFFD.
    conv.add_user("one\r\ntwo\r\n")
    code, screen = _on_a_terminal([sys.executable, "-m", "convo", "--db", db_url, "show", "-C", conv.id], env)
    assert code == 0 and "  one\n  two\n" in screen, repr(screen)


@pytest.mark.slow
def test_delete_at_a_terminal_asks_first_and_a_script_or_yes_does_not(
    db_url: str, api: StandIn, store_for: Any, tmp_path: Path
) -> None:
    store = store_for(db_url)
    kept = store.create(title="keep \x1b]0;me")
    kept.add_user("Hello")
    env = child_env(api)
    delete = [sys.executable, "-m", "convo", "--db", db_url, "delete"]
    code, screen = _on_a_terminal([*delete, kept.id[:20]], env, typed="n\n")
    assert code == 1 and "nothing deleted" in screen, screen
    assert f'delete conversation {kept.id} "keep \ufffd]0;me": 1 turn, 0 calls of spend in the ledger? [y/N]' in screen
    assert store.get(kept.id).info.turn_count == 1  # nothing deleted
    code, screen = _on_a_terminal([*delete, kept.id], env, typed="\x04")  # Ctrl-D: no answer
    assert code == 1 and "[y/N] \nconvo: nothing deleted" in screen, repr(screen)
    assert store.get(kept.id).info.turn_count == 1
    # A send under way: refused before the question, not after the answer.
    branch, owner = kept.branches()[0].name, lease_owner_id()
    store.storage.append(kept.id, branch, kept.add_user("More"), [NewTurn("user", "user", [{"type": "text",
                         "text": "held"}])], owner=owner, hold=timedelta(minutes=5))
    code, screen = _on_a_terminal([*delete, kept.id], env, typed="y\n")
    assert code == 1 and "[y/N]" not in screen and f"branch '{branch}' is busy" in screen, screen
    store.storage.release(kept.id, branch, owner)
    # stdout redirected, the person still at the terminal: asked on stderr.
    out = tmp_path / "out.txt"
    code, screen = _on_a_terminal(["sh", "-c", f'exec "$0" "$@" > {out}', *delete, kept.id], env, typed="yes\n")
    assert code == 0 and "[y/N]" in screen and f"deleted conversation {kept.id}" in out.read_text(), screen
    with pytest.raises(NotFound):
        store.get(kept.id)
    # --yes, or stdin not a terminal (a script): no question.
    for args, typed in (([store.create().id, "--yes"], ""), ([store.create().id], None)):
        code, screen = _on_a_terminal([*delete, *args], env, typed=typed)
        assert code == 0 and "[y/N]" not in screen and "deleted conversation" in screen, screen


@pytest.mark.slow
def test_a_command_started_with_stderr_closed_exits_with_its_own_status(
    tmp_path: Path, api: StandIn, store_for: Any
) -> None:
    """With file descriptor 2 closed (`2>&-`, some daemons) there is no sys.stderr: what convo
    would say there is dropped, and the exit status is the command's own."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    conv = store_for(url).create()
    first = conv.add_user("Original")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "convo", "--db", url, *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, text=True, env=child_env(api), cwd=REPO, timeout=60,
            preexec_fn=lambda: os.close(2),
        )

    assert run("--bogus").returncode == 2
    assert run("show", "-C", "NOSUCH").returncode == 2
    edited = run("edit", "-C", conv.id, str(first), "Changed")  # says its new branch on stderr
    assert edited.returncode == 0 and edited.stdout.strip().isdigit()
    assert sorted(b.name for b in conv.branches()) == ["edit-1", "main"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_streamed_reply_on_a_terminal_keeps_a_cr_lf_split_across_chunks_as_a_line_end() -> None:
    from convo import cli

    screen = _Terminal()
    printer = cli._ReplyPrinter(screen)
    for chunk in ("one\r", "\ntwo\rover \x1b[2J", "three\r"):
        printer.chunk(chunk)
    printer.finish()
    assert screen.getvalue() == "one\ntwo\ufffdover \ufffd[2Jthree\n"
    piped = io.StringIO()
    printer = cli._ReplyPrinter(piped)
    for chunk in ("one\r", "\ntwo\x1b[2J"):
        printer.chunk(chunk)
    printer.finish()
    assert piped.getvalue() == "one\r\ntwo\x1b[2J\n"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_store_closes_is_handled_once_the_close_is_done(
    db_url: str, sig: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signal that landed inside a driver's close made SQLAlchemy log a traceback of the
    interrupted close: now the close finishes first, then the signal is reported as usual."""
    from convo import cli, db

    Store(db_url).close()
    closed: list[bool] = []
    close = db.Database.close

    def close_with_a_signal(self: db.Database) -> None:
        os.kill(os.getpid(), getattr(signal, sig))  # lands mid-close
        close(self)
        closed.append(True)

    monkeypatch.setattr(db.Database, "close", close_with_a_signal)
    # Another thread, as a program calling main() may have: the kernel may hand it the signal.
    done = threading.Event()
    other = threading.Thread(target=done.wait, daemon=True)
    other.start()
    try:
        code = cli.main(["--db", db_url, "list"])
    finally:
        done.set()
        other.join()
    err = capsys.readouterr().err
    assert closed == [True]
    if sig == "SIGTERM":
        assert (code, err) == (128 + signal.SIGTERM, f"convo: terminated by signal {int(signal.SIGTERM)}\n")
    else:
        assert (code, err) == (130, "convo: interrupted\n")


def test_an_ignored_signal_held_while_the_store_closes_stays_ignored_and_the_next_one_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under nohup SIGHUP is ignored: held first during the close, it must neither end convo
    nor hide a SIGTERM held after it. Every handler is as it was afterwards."""
    from convo import cli, db

    url = f"sqlite:///{tmp_path / 'i.db'}"
    Store(url).close()
    close = db.Database.close

    def close_with_signals(self: db.Database) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        close(self)

    monkeypatch.setattr(db.Database, "close", close_with_signals)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        code = cli.main(["--db", url, "list"])
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (code, capsys.readouterr().err) == (
        128 + signal.SIGTERM, f"convo: terminated by signal {int(signal.SIGTERM)}\n"
    )
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_that_escapes_the_cli_is_reported_as_that_signal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from convo import cli, entry

    def terminated(*_args: Any) -> int:
        raise cli._Terminated(signal.SIGHUP)

    monkeypatch.setattr(cli, "main", terminated)
    assert entry.main() == 128 + signal.SIGHUP
    assert capsys.readouterr().err == f"convo: terminated by signal {int(signal.SIGHUP)}\n"

    def interrupted(*_args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    assert entry.main() == 130 and capsys.readouterr().err == "convo: interrupted\n"


@pytest.mark.slow
def test_branching_commands(db_url: str, api: StandIn, store_for: Any) -> None:
    store = store_for(db_url)
    conv = store.create(title="branchy")
    conv.send("First question")
    conv.send("Second question")
    u1, r1, u2, r2 = (t.id for t in conv.turns())

    fork = ok(convo(db_url, "fork", "--at", str(r1), "--name", "alt", standin=api))
    assert fork.out.strip() == "alt" and conv.branch == "alt"
    edit = ok(
        convo(
            db_url,
            "edit",
            str(u2),
            "-",
            "--name",
            "edited",
            standin=api,
            input=b"Better question",
        )
    )
    new_turn = int(edit.out.strip())
    assert conv.branch == "edited" and conv.turns()[-1].id == new_turn
    assert conv.turn(new_turn).content == [{"type": "text", "text": "Better question"}]
    assert "You said: Better question" in conv.send().text  # answer the edited turn

    branches, tree, refused = convo_many(
        db_url, api, [["branches"], ["tree"], ["branch", "-d", "edited"]]
    )
    rows = [line.split() for line in ok(branches).out.splitlines()[1:]]
    assert [r[-3] for r in rows] == ["main", "alt", "edited"]
    assert [r[0] for r in rows if r[0] == "*"] == ["*"] and rows[2][0] == "*"
    tree_lines = ok(tree).out.splitlines()
    assert len(tree_lines) == 6
    assert tree_lines[1].endswith("[alt]")  # alt's head is the first reply
    assert any(
        line.startswith("│  ") and line.endswith("[main]") for line in tree_lines
    )
    assert tree_lines[-1].endswith("[*edited]") and "├─ " in "".join(tree_lines)
    one_error(refused, 2, "checked out")

    checkout, delete = convo_many(
        db_url, api, [["checkout", "main"], ["branch", "-d", "alt"]]
    )
    assert ok(checkout).out.strip() == "on branch main" and conv.branch == "main"
    ok(delete)
    assert [b.name for b in conv.branches()] == ["main", "edited"]
    assert len(store.storage.turns(conv.id)) == 6  # deleting a branch keeps its turns

    regenerated = ok(convo(db_url, "regenerate", "--name", "again", standin=api))
    assert "You said: Second question" in regenerated.out
    assert conv.branch == "again" and conv.turns()[-1].id != r2
    assert [t.id for t in conv.turns()[:3]] == [u1, r1, u2]


def test_options_may_come_between_a_commands_positionals(tmp_path: Path, api: StandIn, store_for: Any) -> None:
    """`edit TURN --name N TEXT`: argparse alone fills TURN and TEXT at the first run of
    positionals, and TEXT after an option was an "unrecognized argument"."""
    url = f"sqlite:///{tmp_path / 'order.db'}"
    conv = store_for(url).create(title="order")
    turn = str(conv.add_user("Original"))
    runs = [
        ["edit", turn, "--name", "named", "Named text"],
        ["edit", turn, "-C", conv.id, "Text after -C"],
        ["edit", "--name", "first", turn, "Options first"],
    ]
    for args in runs:
        res = convo(url, *args, standin=api)
        new_id = int(ok(res).out.strip())
        assert conv.turn(new_id).content == [{"type": "text", "text": args[-1]}], args
    assert {"named", "first"} <= {b.name for b in conv.branches()}
    one_error(convo(url, "edit", turn, "one", "two", standin=api), 2, "unrecognized arguments: two")
    # Text after `--` is text, even when it looks like an option.
    for text in ("-x", "--model", "-h"):
        added = int(ok(convo(url, "add", "--role", "user", "-C", conv.id, "--", text, standin=api)).out)
        assert conv.turn(added).content == [{"type": "text", "text": text}]
    # ... and fills the text after the options of a two-positional command too.
    edited = int(ok(convo(url, "edit", "-C", conv.id, turn, "--name", "dashed", "--", "-z", standin=api)).out)
    assert conv.turn(edited).content == [{"type": "text", "text": "-z"}]
    body = json.loads(ok(convo(url, "request", "-C", conv.id, "--", "-y", standin=api)).out)
    assert body["messages"][-1]["content"][-1] == {"type": "text", "text": "-y"}


@pytest.mark.slow
def test_usage_totals_match_the_calls(
    db_url: str, api: StandIn, store_for: Any
) -> None:
    store = store_for(db_url)
    system = "You are a careful assistant. " * 200  # over the 1,024-token cache minimum
    a = store.create(system=system, title="a")
    for text in ("one", "two", "three"):
        a.send(text)
    b = store.create(title="b")
    b.send("hello")
    api.fail_next(400, message="bad thing")
    with pytest.raises(BadRequestError):
        b.send("rejected")
    calls = store.storage.calls(a.id) + store.storage.calls(b.id)
    assert len(calls) == 5

    as_json, as_csv, table, bad_date = convo_many(
        db_url,
        api,
        [
            ["usage", "--json"],
            ["usage", "--csv", "--by", "model"],
            ["usage", "-C", a.id],
            ["usage", "--since", "yesterday"],
        ],
    )
    data = ok(as_json).json()
    assert data["by"] == "conversation" and len(data["rows"]) == 2
    total = data["total"]
    for key in (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ):
        assert total[key] == sum(c[key] or 0 for c in calls), key
        assert total[key] == sum(r[key] for r in data["rows"])
    assert total["calls"] == 5
    assert total["cost_usd"] == pytest.approx(sum(c["cost_usd"] or 0 for c in calls))
    assert total["cache_read_input_tokens"] > 0
    assert data["cache_saved_usd"] == pytest.approx(
        total["uncached_cost_usd"] - total["cost_usd"]
    )

    rows = list(csv.DictReader(io.StringIO(ok(as_csv).out)))
    assert [r["key"] for r in rows] == ["claude-sonnet-4-5", "total"]
    assert int(rows[-1]["calls"]) == 5
    assert int(rows[-1]["output_tokens"]) == sum(c["output_tokens"] or 0 for c in calls)

    lines = ok(table).out.splitlines()
    assert lines[0].split()[0] == "branch"
    assert lines[-2].split()[:2] == ["total", "3"]
    assert lines[-1].startswith("prompt cache saved $")
    one_error(bad_date, 2, "YYYY-MM-DD")


def _refused(
    url: str, api: StandIn, cases: Sequence[tuple[list[str], bytes, str]]
) -> None:
    """Each command exits 2 with one stderr line holding its fragment, and prints nothing."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(
            pool.map(lambda c: convo(url, *c[0], standin=api, input=c[1]), cases)
        )
    for (args, _, fragment), run in zip(cases, runs, strict=True):
        one_error(run, 2, fragment)
        assert run.out == "", args
        assert len(run.err_lines) == 1, (args, run.err)
    assert not [r for r in api.requests if r["path"] == "/v1/messages"]


@pytest.mark.slow
def test_bad_ids_and_refused_prefill_exit_2_and_write_nothing(
    db_url: str, api: StandIn, store_for: Any
) -> None:
    store = store_for(db_url)
    first = store.create(title="one")
    second = store.create(title="two")
    strict = store.create("claude-sonnet-4-6", title="strict")  # the most recent one
    prefix = os.path.commonprefix([first.id, second.id, strict.id])
    assert prefix
    _refused(
        db_url,
        api,
        [
            (["send", "hi", "-C", "zzzzzzzzzz"], b"", "no conversation"),
            (["show", "-C", prefix], b"", "ambiguous"),
            (
                ["send", "Pick A, B or C.", "--prefill", "The answer is ("],
                b"",
                "does not accept prefill",
            ),
        ],
    )
    for conv in (first, second, strict):
        assert conv.info.turn_count == 0


@pytest.mark.slow
def test_bad_text_exits_2_and_writes_nothing(
    tmp_path: Path, api: StandIn, store_for: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    conv = store_for(url).create(title="one")
    _refused(
        url,
        api,
        [
            (["send", ""], b"", "text is empty"),
            (["send", "hi", "--prefill", "Sure "], b"", "whitespace"),
            (["send", "-"], b"caf\xe9 \xff", "stdin is not valid UTF-8"),
            (["send", "hi", "--max-tokens", "lots"], b"", "--max-tokens"),
            (["frobnicate"], b"", "invalid choice"),
            (["retry"], b"", "nothing to retry"),
        ],
    )
    assert conv.info.turn_count == 0


@pytest.mark.slow
def test_no_conversation_yet_and_db_commands(db_url: str, api: StandIn) -> None:
    show, current, upgrade = convo_many(
        db_url, api, [["show"], ["db", "current"], ["db", "upgrade"]]
    )
    one_error(show, 2, "no conversation yet: run `convo new`")
    assert ok(current).out.strip().endswith("(head)")
    assert "(head)" in ok(upgrade).out


def test_usage_until_the_last_day_there_is(tmp_path: Path, api: StandIn, store_for: Any) -> None:
    """--until is inclusive, so a day is added: 9999-12-31 overflowed (unexpected OverflowError)."""
    url = f"sqlite:///{tmp_path / 'until.db'}"
    store_for(url).create().send("hello")
    out = ok(convo(url, "usage", "--until", "9999-12-31", "--json", standin=api)).out
    assert json.loads(out)["total"]["calls"] == 1


def test_db_current_says_what_brings_an_old_schema_to_head(tmp_path: Path, fresh_pg_url: str) -> None:
    """The embedded SQLite file upgrades itself; a PostgreSQL database is upgraded on purpose."""
    lite = ok(convo(f"sqlite:///{tmp_path / 'new.db'}", "db", "current")).out.strip()
    assert lite.startswith("none") and "the next command upgrades it" in lite
    pg = ok(convo(fresh_pg_url, "db", "current")).out.strip()
    refused = convo(fresh_pg_url, "list")
    assert refused.code == 1
    for said in (pg, refused.err):
        # The advice names this database: `convo db upgrade` alone upgrades the default one.
        hint = re.search(r"run `convo (.+?)`", said)
        assert hint is not None and hint.group(1) == f"--db {fresh_pg_url} db upgrade", said
    assert pg.startswith("none")
    advised = f"--db {fresh_pg_url} db upgrade".split()
    assert ok(convo(None, *advised)).out.startswith("schema at revision")
    assert ok(convo(fresh_pg_url, "db", "current")).out.strip().endswith("(head)")
    ok(convo(fresh_pg_url, "list"))
    # A schema from a newer convo: no command here brings it to this head.
    newer = tmp_path / "newer.db"
    ok(convo(f"sqlite:///{newer}", "list"))
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    out = ok(convo(f"sqlite:///{newer}", "db", "current")).out.strip()
    assert out.startswith("0099") and "upgrade convo" in out and "next command" not in out


@pytest.mark.slow
def test_ctrl_c_during_a_reply_keeps_the_turn(
    tmp_path: Path, api: StandIn, store_for: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    store = store_for(url)
    conv = store.create(title="interrupted")
    api.delay_next(30)
    child = subprocess.Popen(
        [sys.executable, "-m", "convo", "--db", url, "send", "Take your time"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(api),
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while not [r for r in api.requests if r["path"] == "/v1/messages"]:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        api.reset_faults()
    assert child.returncode == 130
    assert (
        err.decode().strip()
        == "[interrupted: your turn is saved; `convo retry` asks again]"
    )
    assert [t.role for t in conv.turns()] == ["user"]
    statuses = [c["status"] for c in store.storage.calls(conv.id)]
    assert statuses == ["cancelled"]
    # The lease was released: another send can go ahead at once.
    assert ok(convo(url, "retry", standin=api)).out.startswith("[stand-in, not Claude]")


@pytest.mark.slow
def test_chat_loop(tmp_path: Path, api: StandIn, store_for: Any) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    conv = store_for(url).create(title="chat")
    run = ok(
        convo(
            url,
            "chat",
            standin=api,
            input=b"Hello chat\n/branches\n/retry\n/nope\n/quit\n",
        )
    )
    assert "claude> [stand-in, not Claude] You said: Hello chat" in run.out
    assert re.search(r"^\*\s+main\s", run.out, re.M)  # /branches
    assert "nothing to retry" in run.err and "unknown command /nope" in run.err
    assert [t.role for t in conv.turns()] == ["user", "assistant"]

    # A send that fails: its hint is the chat's own /retry, and the chat's exit status says
    # the last message is unanswered, until a reply comes.
    api.fail_next(400)  # (not retried: no backoff to wait through)
    failed = convo(url, "chat", standin=api, input=b"Fails\n/quit\n")
    assert failed.code == 1 and "/retry asks again" in failed.err and "`convo retry`" not in failed.err
    api.fail_next(400)
    mended = ok(convo(url, "chat", standin=api, input=b"Fails again\n/retry\n"))
    assert "You said: Fails Fails again" in mended.out  # (two user turns, one message)
    no_key = convo(url, "chat", standin=api, input=b"Hello\n", env={**child_env(api), "ANTHROPIC_API_KEY": ""})
    one_error(no_key, 2, "no API key")
    assert "you>" not in no_key.out + no_key.err


def test_chat_ends_when_its_conversation_is_deleted(tmp_path: Path, api: StandIn, store_for: Any) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    store = store_for(url)
    conv = store.create(title="chat")
    proc = subprocess.Popen(
        [sys.executable, "-m", "convo", "--db", url, "chat"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(api), cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"Hello chat\n")
    proc.stdin.flush()
    while b"claude>" not in proc.stdout.readline():
        pass
    store.delete(conv.id)  # by another process, say
    out, err = proc.communicate(b"more\nand more\n", timeout=60)
    assert proc.returncode == 1
    errors = [line for line in err.decode().splitlines() if line.startswith("convo: error:")]
    assert len(errors) == 1 and "no conversation" in errors[0], err


def _check_demo_output(out: str) -> None:
    assert out.startswith(
        "convo demo — replies come from convo's LOCAL STAND-IN of the Messages API, not from Claude"
    )
    assert "does not accept prefill" in out and "the stand-in saw 0 requests" in out
    assert "cache read" in out and "prompt cache saved $" in out
    assert "[*edit-1]" in out
    assert "== 5. Resume in a new process ==" in out


@pytest.mark.slow
def test_demo_runs_without_a_key() -> None:
    run = ok(convo(None, "demo", env=child_env(None)))
    _check_demo_output(run.out)


@pytest.mark.slow
def test_demo_ignores_a_real_key(api: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    from convo import demo

    monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", api.base_url)
    out = io.StringIO()
    assert demo.run(out=out) == 0
    _check_demo_output(out.getvalue())
    assert TEST_KEY not in out.getvalue()
    # The real key's server was never contacted: the demo talks to its own stand-in only.
    assert api.requests == []


@pytest.mark.slow
def test_edit_in_the_editor(tmp_path: Path, api: StandIn, store_for: Any) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    conv = store_for(url).create(title="editor")
    first = conv.add_user("Original question")
    script = "import sys; p = sys.argv[-1]; t = open(p).read(); open(p, 'w').write({!r}.format(t))"
    rewrite = f'{sys.executable} -c "{script.format("{} (edited)")}"'
    blank = f'{sys.executable} -c "{script.format("  ")}"'
    untouched = "true"  # quits without saving anything new
    with ThreadPoolExecutor(max_workers=3) as pool:
        edited, aborted, unchanged = pool.map(
            lambda editor: convo(
                url, "edit", str(first), "--editor", env={**child_env(api), "EDITOR": editor}
            ),
            [rewrite, blank, untouched],
        )
    # $VISUAL wins over $EDITOR, as in git
    visual = convo(url, "edit", str(first), "--editor", env={**child_env(api), "VISUAL": blank, "EDITOR": rewrite})
    one_error(visual, 2, "empty text: edit aborted")
    new_id = int(ok(edited).out.strip())
    assert conv.turn(new_id).content == [
        {"type": "text", "text": "Original question (edited)"}
    ]
    one_error(aborted, 2, "empty text: edit aborted")
    one_error(unchanged, 2, "unchanged: edit aborted")
    unquoted = convo(url, "edit", str(first), "--editor", env={**child_env(api), "EDITOR": '"unclosed'})
    one_error(unquoted, 2, "cannot read the editor command")
    assert len(conv.branches()) == 2


def test_ids_printed_by_show_and_branches_are_the_turns_own_and_resolve(
    tmp_path: Path,
) -> None:
    """What `show` and `branches` print as a turn's id is what `fork --at` takes back."""
    import subprocess

    from convo import Store

    url = f"sqlite:///{tmp_path / 'ids.db'}"
    store = Store(url)
    conv = store.create(model="claude-sonnet-4-5")
    first = conv.add_user("one")
    conv.add_assistant("two")
    for i in range(6):
        conv.edit(first, f"edit {i}")
    path_ids = [t.id for t in conv.turns()]
    heads = {b.head_id for b in conv.branches()}
    store.close()
    shown = subprocess.run(
        [sys.executable, "-m", "convo", "--db", url, "show"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert [int(line.split()[0]) for line in shown.stdout.splitlines() if line[:1].isdigit()] == path_ids
    table = subprocess.run(
        [sys.executable, "-m", "convo", "--db", url, "branches"], capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0, table.stderr
    assert {int(row.split()[-2]) for row in table.stdout.splitlines()[1:]} == heads
    forked = subprocess.run(
        [sys.executable, "-m", "convo", "--db", url, "fork", "--at", str(max(heads)), "--name", "x"],
        capture_output=True, text=True, timeout=60,
    )
    assert forked.returncode == 0 and forked.stdout.strip() == "x", forked.stderr


def _ctrl_c_in_editor(tmp_path: Path, api: StandIn, url: str, turn: int, body: str) -> tuple[int, str, str]:
    """`convo edit TURN --editor` with an editor running `body` (after it writes a ready file),
    and Ctrl-C sent as a terminal sends it, to the whole foreground process group."""
    ready = tmp_path / "ready"
    editor = tmp_path / "editor.py"
    editor.write_text(
        "import pathlib, signal, sys, time\n"
        + body.split("#READY\n")[0]
        + f"pathlib.Path({str(ready)!r}).write_text('')\n"
        + body.split("#READY\n")[1]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "convo", "--db", url, "edit", str(turn), "--editor"],
        env={**child_env(api), "EDITOR": f"{sys.executable} {editor}"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_ctrl_c_in_the_editor_is_the_editor_s(tmp_path: Path, api: StandIn, store_for: Any) -> None:
    """The terminal sends Ctrl-C to convo and its editor alike: an editor that handles it (ed,
    nano) kept going, but convo stopped at once and the edit was lost (exit 130)."""
    url = f"sqlite:///{tmp_path / 'e.db'}"
    conv = store_for(url).create()
    first = conv.add_user("Original question")
    code, out, err = _ctrl_c_in_editor(
        tmp_path, api, url, first,
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda *a: got.append(1))\n"
        "#READY\n"
        "deadline = time.monotonic() + 20\n"
        "while not got and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "p = pathlib.Path(sys.argv[-1]); p.write_text(p.read_text() + ' (after Ctrl-C)')\n",
    )
    assert code == 0, err
    assert conv.turn(int(out.strip())).content == [{"type": "text", "text": "Original question (after Ctrl-C)"}]


def test_with_stdout_closed_nothing_is_done(tmp_path: Path) -> None:
    """`convo new >&-` created a conversation whose id it could not print, then failed as an
    internal error; a send lost its hint."""
    url = f"sqlite:///{tmp_path / 'closed.db'}"
    for args in (["new"], ["list"]):
        p = subprocess.run(
            [sys.executable, "-m", "convo", "--db", url, *args], env=child_env(None), capture_output=False,
            stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=lambda: os.close(1), timeout=60, check=False,
        )
        assert p.returncode == 2
        assert p.stderr.strip() == "convo: error: standard output is closed: give it somewhere to go (>/dev/null to discard it)"
    assert ok(convo(url, "list", "--json")).out.strip() in ("[]", "")


def test_control_characters_in_titles_and_turns_never_reach_the_terminal(tmp_path: Path, store_for: Any) -> None:
    """A title (or an imported one) with an escape sequence was printed raw by list and show,
    and a turn's preview by tree: the table broke and the terminal obeyed it. (A transcript
    prints its turns' text as it is.)"""
    url = f"sqlite:///{tmp_path / 'esc.db'}"
    conv = store_for(url).create(title="evil\x1b]0;pwned\x07\x1b[2Jx")
    conv.add_user("hello \x1b[31mred\x9b")
    for args in (["list"], ["show", "-C", conv.id], ["tree", "-C", conv.id], ["set", "-C", conv.id]):
        shown = ok(convo(url, *args)).out
        if args[0] == "show":
            shown = shown.splitlines()[0]
        assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown, args
    assert "evil\ufffd]0;pwned\ufffd\ufffd[2Jx" in ok(convo(url, "list")).out


def test_main_in_process_leaves_a_host_s_signal_handlers_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program that calls main() and handles SIGTERM itself keeps its handler throughout; one
    with the default gets convo's for the call only."""
    from convo import cli

    seen: list[Any] = []

    def record(argv: Any) -> int:
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0

    monkeypatch.setattr(cli, "_main", record)

    def host(signum: int, frame: Any) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, host)
    try:
        assert cli.main([]) == 0 and seen[-1] is host and signal.getsignal(signal.SIGTERM) is host
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert cli.main([]) == 0 and seen[-1] is cli._terminate
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_while_the_terminal_is_gone_or_the_parser_is_built_is_one_clean_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while argparse built the parser escaped as a traceback (exit 1); a SIGHUP from a
    closed terminal made the message itself fail (EIO), so convo exited 1, not 129."""
    from convo import cli

    def terminated(*args: Any, **kwargs: Any) -> Any:
        raise cli._Terminated(signal.SIGTERM)

    monkeypatch.setattr(cli, "build_parser", terminated)
    assert cli.main(["list"]) == 128 + signal.SIGTERM

    class Gone(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError(5, "Input/output error")

    def hung_up(*args: Any, **kwargs: Any) -> Any:
        raise cli._Terminated(signal.SIGHUP)

    monkeypatch.setattr(cli, "build_parser", hung_up)
    monkeypatch.setattr(sys, "stderr", Gone())
    assert cli.main(["chat"]) == 128 + signal.SIGHUP


# Raises KeyboardInterrupt where the import of $CTRL_C_AT starts: Ctrl-C at that instant.
_CTRL_C_AT_IMPORT = """
import os, sys

class _CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["CTRL_C_AT"]:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _CtrlC())
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python -m convo", "console script"])
@pytest.mark.parametrize("module", ["pydantic", "sqlalchemy"])
def test_ctrl_c_while_the_cli_is_still_importing_is_one_line_and_130(tmp_path: Path, how: str, module: str) -> None:
    """Ctrl-C in the first second of a command, while Python still imports SQLAlchemy, pydantic
    and httpx, printed Python's traceback: it is an interrupt like any other. pydantic comes in
    with the CLI's own modules, SQLAlchemy with the first command that opens a store."""
    (tmp_path / "sitecustomize.py").write_text(_CTRL_C_AT_IMPORT)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    launcher = (
        [sys.executable, "-m", "convo"] if how == "python -m convo" else [str(Path(sys.executable).parent / "convo")]
    )
    db = tmp_path / "never.db"
    p = subprocess.run(
        [*launcher, "--db", f"sqlite:///{db}", "list"],
        capture_output=True, text=True, env=child_env(None, PYTHONPATH=path, CTRL_C_AT=module), cwd=REPO,
        timeout=60,
    )
    assert (p.returncode, p.stdout, p.stderr) == (130, "", "convo: interrupted\n")
    assert not db.exists()


def test_ctrl_c_that_stops_the_editor_is_an_interrupt(tmp_path: Path, api: StandIn, store_for: Any) -> None:
    """An editor that leaves Ctrl-C to the default dies of it: convo says interrupted (130), as
    it did before it left Ctrl-C to the editor, not "exited with status -2"."""
    url = f"sqlite:///{tmp_path / 'e.db'}"
    conv = store_for(url).create()
    first = conv.add_user("Original question")
    code, _out, err = _ctrl_c_in_editor(
        tmp_path, api, url, first, "signal.signal(signal.SIGINT, signal.SIG_DFL)\n#READY\ntime.sleep(20)\n"
    )
    assert code == 130 and err.strip() == "convo: interrupted", err
    assert len(conv.branches()) == 1  # nothing was written
