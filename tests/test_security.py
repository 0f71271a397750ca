"""Secrets stay secret and text stays text.

- The API key (a recognisable fake) never reaches the database (the raw bytes of the SQLite file
  and its -wal/-shm, every PostgreSQL row as text), the logs (everything at DEBUG, SQL and HTTP
  included), the JSON outputs, error messages or tracebacks, even when a server echoes it back.
- The default SQLite database and its directory are created 0600 / 0700, whatever the umask.
- Every SQL statement binds its values: text full of SQL and shell metacharacters is stored and
  replayed byte for byte on both engines.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import traceback
from pathlib import Path
from typing import Any

import pytest
from helpers.kit import (
    KEY,
    cli_env,
    closed_port,
    dump_rows,
    make_store,
    message_bodies,
    retry_streamed,
    run_many,
    user_msg,
)
from helpers.stall import StallServer

from convo import APIError, Store
from convo.errors import AuthenticationError, ConfigError, NotFound
from convo.standin import StandIn
from convo.types import text_of

KEY_PART = "SECRET-1234567890"  # what must not appear, even cut or re-encoded around it


def _no_key(text: str, where: str) -> None:
    assert KEY not in text and KEY_PART not in text, f"the API key leaked into {where}"


def _raw_sqlite_bytes(url: str) -> bytes:
    path = Path(url.removeprefix("sqlite:///"))
    return b"".join(
        p.read_bytes()
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        if p.exists()
    )


def _assert_db_has_no_key(url: str) -> None:
    if url.startswith("sqlite"):
        raw = _raw_sqlite_bytes(url)
        assert KEY_PART.encode() not in raw and KEY_PART.encode("utf-16-le") not in raw
    _no_key(dump_rows(url), "the database rows")


def _every_failure(store: Store, standin: StandIn, caught: list[BaseException]) -> str:
    """Drive sends through every kind of failure, a server echoing the key included."""
    conv = store.create("claude-sonnet-4-5", title="secrets")
    conv.send("A plain send")
    for _ in conv.stream("A streamed send"):
        pass
    # A proxy that echoes the key in its error message (and so in the body). (Response headers
    # are not echoed: httpcore's own DEBUG trace prints response headers verbatim, which is
    # outside convo's hands.)
    standin.fail_next(401, message=f"invalid x-api-key: {KEY}")
    standin.fail_next(
        529, message=f"overloaded for key {KEY}", headers={"x-should-retry": "false"}
    )
    for attempt in (lambda: conv.send("Echo 1"), lambda: retry_streamed(conv)):
        with pytest.raises(APIError) as info:
            attempt()
        caught.append(info.value)
    with make_store(store.url, f"http://127.0.0.1:{closed_port()}") as refused:
        with pytest.raises(APIError) as info:
            refused.get(conv.id).retry()
        caught.append(info.value)
    with (
        StallServer(timeout=5) as stall,
        make_store(store.url, stall.base_url, read_timeout=0.3) as slow,
    ):
        with pytest.raises(APIError) as info:
            slow.get(conv.id).retry()
        caught.append(info.value)
    conv.retry()
    return conv.id


def _leaks(
    url: str, caplog: pytest.LogCaptureFixture, caught: list[BaseException]
) -> list[str]:
    """Everywhere the key turned up (all of them, not just the first)."""
    found = []
    if url.startswith("sqlite"):
        raw = _raw_sqlite_bytes(url)
        if KEY_PART.encode() in raw or KEY_PART.encode("utf-16-le") in raw:
            found.append("the raw SQLite file")
    rows = [line[:160] for line in dump_rows(url).splitlines() if KEY_PART in line]
    found += [f"database row {r}" for r in rows]
    if KEY_PART in caplog.text:
        found.append("the logs")
    for e in caught:
        for what, text in (
            ("message", str(e)),
            ("repr", repr(e)),
            ("traceback", "".join(traceback.format_exception(e))),
        ):
            if KEY_PART in text:
                found.append(f"the {what} of {type(e).__name__}: {str(e)[:120]}")
    return found


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in (
        "sqlalchemy.engine",
        "sqlalchemy.pool",
        "httpx",
        "httpcore",
        "alembic",
        "convo",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_api_key_never_reaches_the_database_the_logs_or_errors(
    db_url: str, standin: StandIn, debug_logs: pytest.LogCaptureFixture
) -> None:
    caught: list[BaseException] = []
    with make_store(db_url, standin.base_url) as store:
        conv_id = _every_failure(store, standin, caught)
        assert isinstance(caught[0], AuthenticationError)
        assert "[api key]" in str(caught[0])  # scrubbed, not just absent
        calls = store.storage.calls(conv_id)
        assert any("[api key]" in (c["error_message"] or "") for c in calls)
        _no_key(repr(store.client), "repr(client)")
        # While the store is open the WAL may still hold the latest pages: read them too.
        open_leaks = _leaks(db_url, debug_logs, caught)
    assert debug_logs.records, "nothing was logged at DEBUG: the capture is not working"
    assert any("sqlalchemy" in r.name for r in debug_logs.records)
    assert any(r.name.startswith("httpcore") for r in debug_logs.records)
    assert open_leaks == [] and _leaks(db_url, debug_logs, caught) == []
    # the key really was sent: the check above is not vacuous
    assert all(r["headers"].get("x-api-key") == KEY for r in standin.requests)


def test_api_key_echoed_in_a_stream_error_event_is_scrubbed(
    db_url: str, standin: StandIn, debug_logs: pytest.LogCaptureFixture
) -> None:
    """An `event: error` after the HTTP 200 whose message echoes the key (as a proxy or a
    gateway may do) must be scrubbed like an HTTP error's message is."""
    caught: list[BaseException] = []
    with make_store(db_url, standin.base_url) as store:
        conv = store.create("claude-sonnet-4-5")
        standin.error_event_next(
            "invalid_request_error", after_events=4, message=f"bad key {KEY}"
        )
        with pytest.raises(APIError) as info:
            for _ in conv.stream("Hello"):
                pass
        caught.append(info.value)
        standin.error_event_next(
            "invalid_request_error", after_events=4, message=f"bad key {KEY}"
        )
        with pytest.raises(APIError) as info:
            retry_streamed(conv)
        caught.append(info.value)
        assert [c["status"] for c in conv.calls()] == ["cut", "cut"]
    assert _leaks(db_url, debug_logs, caught) == []


@pytest.mark.slow
def test_api_key_never_printed_by_the_cli(tmp_path: Path, standin: StandIn) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    with make_store(url, standin.base_url) as store:
        conv = store.create(title="cli secrets")
        conv.send("Hello")
        pending = store.create(title="unanswered")
        pending.add_user("Still waiting for an answer")
    env = cli_env(standin.base_url, tmp_path)
    standin.fail_next(401, message=f"invalid x-api-key: {KEY}")
    refused_env = cli_env(f"http://127.0.0.1:{closed_port()}", tmp_path)
    runs = [
        (["--db", url, "send", "-C", conv.id, "Echo my key"], env),
        (["--db", url, "retry", "-C", pending.id, "--no-stream"], refused_env),
        (["--db", url, "show", "-C", conv.id, "--json"], env),
        (["--db", url, "list", "--json"], env),
        (["--db", url, "usage", "--json"], env),
        (["--db", url, "request", "-C", conv.id, "next?"], env),
    ]
    results = run_many(runs)
    send, retry, show, lst, usage, request = results
    assert (
        send.returncode == 1
        and "authentication_error" in send.stderr
        and "[api key]" in send.stderr
    )
    assert retry.returncode == 1 and "Connection refused" in retry.stderr
    for res in (show, lst, usage, request):
        assert res.returncode == 0, res.stderr
        json.loads(res.stdout)
    for (args, _), res in zip(runs, results, strict=True):
        _no_key(res.stdout + res.stderr, f"`convo {' '.join(args[2:4])}`")
        assert "Traceback" not in res.stderr
    _assert_db_has_no_key(url)


def test_a_key_read_with_its_line_ending_is_sent_without_it(db_url: str, standin: StandIn) -> None:
    """A key read from a file keeps the file's CR LF; a header cannot carry it (h11 refuses it
    and repeats the value, key included, in its message), and no key has whitespace at its ends."""
    with make_store(db_url, standin.base_url + "\n", key=f"  {KEY}\r\n") as store:  # (and the URL's)
        store.create("claude-sonnet-4-5").send("Hello")
    assert [r["headers"].get("x-api-key") for r in standin.requests] == [KEY]


@pytest.mark.parametrize(
    "key, base_url",
    [
        (f"{KEY}\r\nX-Other: 1", None),  # a control character inside
        (f"{KEY[:8]} {KEY[8:]}", None),  # a space inside
        (f"{KEY}\u00e9", None),  # not ASCII
        ("  \t ", None),  # only whitespace: no key at all
        (KEY, "not a url"),
        (KEY, "ftp://127.0.0.1:9"),
        (KEY, "http://"),
    ],
    ids=["control", "space", "non-ascii", "blank", "no-scheme", "ftp", "no-host"],
)
def test_a_key_or_endpoint_no_request_could_use_is_refused_before_anything_is_written(
    db_url: str, standin: StandIn, key: str, base_url: str | None
) -> None:
    """Each of these failed as a connection error after the user's turn was written, was
    retried as if the network could mend it, and (with a control character) put the key in
    the error and the ledger. Now: ConfigError at once, one line, no key, nothing written."""
    with make_store(db_url, base_url or standin.base_url, key=key) as store:
        conv = store.create("claude-sonnet-4-5")
        with pytest.raises(ConfigError) as info:
            conv.send("Hello")
        with pytest.raises(ConfigError):
            for _ in conv.stream("Hello"):
                pass
        message = str(info.value)
        assert "\n" not in message
        _no_key(message, "the error")
        assert key.strip() == "" or key.strip() not in message
        assert conv.turns() == [] and conv.calls() == []
    assert standin.requests == []
    _assert_db_has_no_key(db_url)


# -- file modes -----------------------------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _check_modes(data_home: Path) -> None:
    folder = data_home / "convo"
    assert _mode(folder) == 0o700, oct(_mode(folder))
    db = folder / "convo.db"
    assert _mode(db) == 0o600, oct(_mode(db))
    for extra in (folder / "convo.db-wal", folder / "convo.db-shm"):
        if extra.exists():
            assert _mode(extra) == 0o600, f"{extra.name}: {oct(_mode(extra))}"


def test_default_sqlite_file_and_folder_are_private(
    tmp_path: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", standin.base_url)
    old = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        with Store() as store:
            assert store.url == f"sqlite:///{tmp_path / 'xdg' / 'convo' / 'convo.db'}"
            store.create().send("Private?")
            _check_modes(tmp_path / "xdg")
    finally:
        os.umask(old)
    _check_modes(tmp_path / "xdg")


@pytest.mark.slow
def test_default_sqlite_file_from_the_cli_is_private(
    tmp_path: Path, standin: StandIn
) -> None:
    import subprocess
    import sys

    env = cli_env(standin.base_url, tmp_path)
    out = subprocess.run(
        [
            "sh",
            "-c",
            'umask 000 && exec "$0" -m convo new --title private',
            sys.executable,
        ],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    _check_modes(Path(env["XDG_DATA_HOME"]))


@pytest.mark.slow
def test_an_export_file_is_private_and_a_full_disk_is_a_runtime_error(
    tmp_path: Path, standin: StandIn
) -> None:
    """An export holds every turn: it is created 0600 like the database, whatever the umask.
    A full disk is exit 1 with one line (it was exit 2 for an export, a Python error for
    `show`); a path that cannot be written stays bad input, exit 2."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'e.db'}"
    with make_store(url, standin.base_url) as store:
        conv = store.create(title="private")
        conv.add_user("Private words")
    env = cli_env(standin.base_url, tmp_path)
    out = tmp_path / "export.json"

    def run(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", 'umask 000 && exec "$0" -m convo "$@"', sys.executable, "--db", url, *args],
            env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )

    assert run("export", "-C", conv.id, "-o", str(out)).returncode == 0
    assert _mode(out) == 0o600 and "Private words" in out.read_text()
    # An existing file, readable by all, is made private before it holds the export.
    shared = tmp_path / "shared.json"
    shared.write_text("old, longer than nothing at all " * 100)
    shared.chmod(0o644)
    assert run("export", "-C", conv.id, "-o", str(shared)).returncode == 0
    assert _mode(shared) == 0o600 and shared.read_text() == out.read_text()
    results = [
        (run("export", "-C", conv.id, "-o", "/dev/full"), 1, "No space left"),
        (run("export", "-C", conv.id, "-o", str(tmp_path / "no" / "such.json")), 2, "No such file"),
    ]
    with open("/dev/full", "w") as full:
        results.append((run("show", "-C", conv.id, stdout=full), 1, "No space left"))
    for res, code, fragment in results:
        assert res.returncode == code, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convo: error: ") and fragment in lines[0], res.stderr


# -- SQL and shell metacharacters -----------------------------------------------------------------

EVIL = [
    "'; DROP TABLE turns; --",
    "\" OR 1=1; DELETE FROM calls WHERE ''='",
    "Robert'); DROP TABLE conversations;--",
    "$(rm -rf /tmp/never) `id` && echo pwned | cat > /tmp/never; ${HOME} %s %(x)s :name ?",
    "\\x27 \\' \\\\ \\0 %% _ [a-z]* \x1b[31mred\x1b[0m \u202e\u2066 NUL-free \U0001f600",
    "/* comment */ UNION SELECT version_num FROM alembic_version --\r\n\tnext line",
]


def test_sql_and_shell_metacharacters_are_stored_and_replayed_unchanged(
    db_url: str, standin: StandIn
) -> None:
    with make_store(db_url, standin.base_url) as store:
        conv = store.create("claude-sonnet-4-5", title=EVIL[0], system=EVIL[1])
        for text in EVIL:
            conv.send(text)
        name = conv.fork(conv.turns()[0].id, name=EVIL[2])
        assert name == EVIL[2]
        conv.checkout("main")
        for ref in EVIL:
            with pytest.raises(NotFound):
                store.get(ref)
        turns = conv.turns()
        assert [text_of(t.content) for t in turns if t.role == "user"] == EVIL
        body = conv.request("last one")
        assert [
            m["content"][0]["text"] for m in body["messages"] if m["role"] == "user"
        ] == [*EVIL, "last one"]
        assert body["system"] == EVIL[1]
        assert conv.info.title == EVIL[0]
        assert {b.name for b in conv.branches()} == {"main", EVIL[2]}
        # what went over the wire is what was typed
        sent = message_bodies(standin)[-1]["messages"]
        assert [m["content"][0]["text"] for m in sent if m["role"] == "user"] == EVIL
        assert store.storage.integrity_problems() == []
        assert len(store.list()) == 1 and len(conv.calls()) == len(EVIL)


@pytest.mark.slow
def test_metacharacters_through_the_cli(
    db_url: str, tmp_path: Path, standin: StandIn
) -> None:
    with make_store(db_url, standin.base_url) as store:
        conv = store.create("claude-sonnet-4-5")
    env = cli_env(standin.base_url, tmp_path)
    evil = " ".join(EVIL)
    (res,) = run_many([(["--db", db_url, "send", "-C", conv.id, evil], env)])
    assert res.returncode == 0, res.stderr
    assert not Path("/tmp/never").exists()
    with make_store(db_url, standin.base_url) as store:
        turns = store.get(conv.id).turns()
        assert text_of(turns[0].content) == evil
        assert message_bodies(standin)[-1]["messages"] == [user_msg(evil)]
        assert store.storage.integrity_problems() == []


def test_an_error_type_or_request_id_echoing_the_key_is_scrubbed_and_one_line(db_url: str, standin: StandIn) -> None:
    """A proxy or server that echoes the key into an error's type or request id: neither the
    exception nor the ledger holds it, and the message stays one line."""
    with make_store(db_url, standin.base_url) as store:
        conv = store.create()
        standin.fail_next(400, error_type=f"bad\nkey {KEY}", headers={"request-id": f"req {KEY}"})
        with pytest.raises(APIError) as info:
            conv.send("hello")
        text = str(info.value)
        assert KEY_PART not in text and "\n" not in text
        (call,) = conv.calls()
        assert all(KEY_PART not in str(v) for v in call.values())
        assert "\n" not in (call["error_type"] or "")
        assert KEY_PART not in dump_rows(db_url)
