"""Export and import: a whole tree, replayed byte-for-byte, all or nothing."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from convo import InvalidInput, Store
from convo.client import Client
from convo.models import Base
from convo.store import NewTurn


def _png(tmp_path: Path) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes([x % 256, 0, 0]) * 4 for x in range(4))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    p = tmp_path / "img.png"
    p.write_bytes(png)
    return p


def _row_counts(store: Store) -> dict[str, int]:
    with store.storage.engine.connect() as conn:
        return {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in Base.metadata.sorted_tables
        }


def _assert_refused_whole(store: Store, data: Any, message: str) -> None:
    """The import fails with one line naming the problem, and writes nothing."""
    before = _row_counts(store)
    with pytest.raises(InvalidInput) as err:
        store.import_(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert _row_counts(store) == before


def _branched(store: Store, tmp_path: Path):  # type: ignore[no-untyped-def]
    conv = store.create(model="claude-sonnet-4-5", system="Be terse.", title="t")
    first = conv.add_user("Look at this", images=[_png(tmp_path)])
    conv.add_assistant("A red gradient.")
    conv.add_user("And now?")
    conv.edit(first, "Describe nothing")
    store.storage.append(
        conv.id, conv.branch, store.storage.path(conv.id).head_id,
        [NewTurn("assistant", "reply", [{"type": "thinking", "thinking": "hm", "signature": "s1"},
                                         {"type": "text", "text": "Nothing."}], stop_reason="end_turn")],
    )
    conv.add_user("Thanks")
    return conv


def test_round_trip_replays_every_branch_identically(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url, upgrade=True)
    conv = _branched(store, tmp_path)
    data = json.loads(json.dumps(store.export(conv.id)))  # through real JSON text
    copy = store.import_(data)
    assert copy.id != conv.id
    for b in conv.branches():
        assert store.storage.path(copy.id, b.name).turns[-1].content == (
            store.storage.path(conv.id, b.name).turns[-1].content
        )
    conv.checkout("main")
    copy.checkout("main")
    assert copy.request() == conv.request()
    conv.checkout("edit-1")
    copy.checkout("edit-1")
    assert copy.request() == conv.request()
    assert {b.name for b in copy.branches()} == {b.name for b in conv.branches()}
    assert store.storage.integrity_problems() == []
    store.close()


def test_an_export_with_text_turn_ids_still_imports(db_url: str, tmp_path: Path) -> None:
    """Exports written before turn ids were integers name turns by 26-character strings: an
    import numbers them afresh either way, and the copy replays the same."""
    store = Store(db_url, upgrade=True)
    conv = _branched(store, tmp_path)
    data = json.loads(json.dumps(store.export(conv.id)))
    assert all(isinstance(t["id"], int) for t in data["turns"])
    as_text = {t["id"]: f"01old{t['id']:021d}" for t in data["turns"]}

    def old(ref: int | None) -> str | None:
        return None if ref is None else as_text[ref]

    for t in data["turns"]:
        t["id"], t["parent_id"], t["source_id"] = old(t["id"]), old(t["parent_id"]), old(t["source_id"])
    for b in data["branches"]:
        b["head_id"] = old(b["head_id"])
    for c in data["calls"]:
        c["turn_id"], c["reply_id"] = old(c["turn_id"]), old(c["reply_id"])
    copy = store.import_(data)
    for b in conv.branches():
        copy.checkout(b.name)
        conv.checkout(b.name)
        assert copy.request() == conv.request()
        assert all(isinstance(t.id, int) for t in copy.turns())
    assert store.storage.integrity_problems() == []
    store.close()


@pytest.mark.parametrize("blank", ["", "\n", "  \t"])
def test_an_export_with_a_blank_system_prompt_imports_as_none(db_url: str, blank: str) -> None:
    """Older convo stored "" or (`echo | convo new --system -`) "\n": such an export still
    imports, as no system prompt, which the API would refuse blank."""
    store = Store(db_url, upgrade=True)
    conv = store.create("claude-sonnet-4-5")
    conv.add_user("hello")
    data = json.loads(json.dumps(store.export(conv.id)))
    data["conversation"]["system"] = blank
    data["conversation"]["title"] = blank  # (a blank title too, which create now refuses)
    copy = store.import_(data)
    assert copy.info.system is None and "system" not in copy.request()
    assert copy.info.title is None
    store.close()


def test_an_import_numbers_turns_in_the_order_they_were_made(db_url: str, tmp_path: Path) -> None:
    """Turn ids follow creation order in a copy too: siblings (an original and its edits)
    keep their order, and every turn's id is above its parent's."""
    store = Store(db_url, upgrade=True)
    conv = store.create(model="claude-sonnet-4-5")
    first = conv.add_user("first")
    for text in ("edit one", "edit two", "edit three"):
        conv.checkout("main")
        conv.edit(first, text)
    copy = store.import_(json.loads(json.dumps(store.export(conv.id))))

    def roots(c: Any) -> list[str]:
        return [t.content[0]["text"] for t in store.storage.turns(c.id) if t.parent_id is None]

    assert roots(copy) == roots(conv) == ["first", "edit one", "edit two", "edit three"]
    ids = {t.id: t for t in store.storage.turns(copy.id)}
    assert all(t.parent_id is None or t.parent_id < t.id for t in ids.values())
    store.close()


def test_export_inlines_images_and_import_stores_them_once(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url, upgrade=True)
    conv = _branched(store, tmp_path)
    data = store.export(conv.id)
    image = data["turns"][0]["content"][0]
    assert image["source"]["type"] == "base64"
    assert base64.b64decode(image["source"]["data"]) == _png(tmp_path).read_bytes()
    before = _row_counts(store)
    store.import_(data)
    after = _row_counts(store)
    assert after["blobs"] == before["blobs"] == 1
    assert after["turns"] == 2 * before["turns"]
    store.close()


def test_import_keeps_the_ledger(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url, upgrade=True)
    conv = store.create(model="claude-sonnet-4-5")
    conv.add_user("hi")
    head = store.storage.path(conv.id).head_id
    call = store.storage.start_call(conv_id=conv.id, branch="main", turn_id=head,
                                    model="claude-sonnet-4-5", attempt=0, streamed=False)
    store.storage.finish_with_reply(
        call, conv.id, "main", head, NewTurn("assistant", "reply", [{"type": "text", "text": "yo"}]),
        None, {"status": "ok", "input_tokens": 10, "output_tokens": 3, "cost_usd": 0.5},
    )
    copy = store.import_(store.export(conv.id))
    assert copy.usage(by="branch").total.cost_usd == pytest.approx(0.5)
    assert copy.usage(by="branch").total.input_tokens == 10
    assert copy.calls()[0]["reply_id"] == store.storage.path(copy.id).head_id
    # What one engine kept and the other would refuse, or a send would never store: a NUL in a
    # call's text is replaced, a reply's blank text blocks are left out.
    data = store.export(conv.id)
    data["calls"][0]["error_message"] = "a\x00b"
    data["turns"][-1]["content"] = [{"type": "text", "text": "  "}, {"type": "text", "text": "yo"}]
    again = store.import_(data)
    assert again.calls()[0]["error_message"] == "a\ufffdb"
    assert again.request("next")["messages"][1]["content"] == [{"type": "text", "text": "yo"}]
    bad: list[tuple[str, Any, str]] = [
        ("duration_ms", float("nan"), "duration_ms"),
        ("cost_usd", 1e308, "cost_usd"),
        ("error_message", "\ud800", "lone surrogate"),
    ]
    for key, value, fragment in bad:
        broken = store.export(conv.id)
        broken["calls"][0][key] = value
        _assert_refused_whole(store, broken, fragment)
    blank = store.export(conv.id)
    blank["turns"][-1]["content"] = [{"type": "text", "text": " \n"}]
    _assert_refused_whole(store, blank, "only blank text")
    store.close()


def _with_a_call(store: Store, status: str = "ok") -> Any:
    """A conversation with a user turn, a reply and one call (finished as `status`)."""
    conv = store.create(model="claude-sonnet-4-5")
    conv.add_user("hi")
    head = store.storage.path(conv.id).head_id
    assert head is not None
    call = store.storage.start_call(conv_id=conv.id, branch="main", turn_id=head,
                                    model="claude-sonnet-4-5", attempt=0, streamed=True)
    if status == "ok":
        store.storage.finish_with_reply(
            call, conv.id, "main", head, NewTurn("assistant", "reply", [{"type": "text", "text": "yo"}],
                                                 stop_reason="end_turn"),
            None, {"status": "ok", "input_tokens": 10, "output_tokens": 3, "stop_reason": "end_turn"},
        )
    return conv


@pytest.mark.parametrize(
    "where",
    [("turns", 0, "created_at"), ("conversation", None, "created_at"), ("conversation", None, "updated_at"),
     ("calls", 0, "started_at"), ("calls", 0, "finished_at")],
)
@pytest.mark.parametrize("instant", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_an_instant_outside_the_years_1_to_9999_in_utc_is_refused(db_url: str, where: Any, instant: str) -> None:
    """It parsed, then failed at the insert as an untyped OverflowError (exit 1, not 2)."""
    with Store(db_url, upgrade=True) as store:
        data = store.export(_with_a_call(store).id)
        part, index, key = where
        (data[part] if index is None else data[part][index])[key] = instant
        _assert_refused_whole(store, data, "out of range once in UTC")
        # An offset inside the range is moved to UTC, as every stored instant is.
        (data[part] if index is None else data[part][index])[key] = "2024-01-01T00:30:00+01:00"
        copy = store.import_(data)
        export = store.export(copy.id)
        got = export[part] if index is None else export[part][index]
        if key != "updated_at":  # (a copy is the most recently used: its updated_at is now)
            assert got[key].startswith("2023-12-31T23:30:00")


def test_names_the_api_gave_are_stored_without_control_characters(db_url: str) -> None:
    """A stop reason or a request id with a NUL imported into SQLite but not PostgreSQL; with a
    line break or an escape it reached the terminal through `show` and `usage`."""
    with Store(db_url, upgrade=True) as store:
        data = store.export(_with_a_call(store).id)
        data["turns"][-1]["stop_reason"] = "end\x00turn\x1b[31m\n"
        data["calls"][0].update(stop_reason="end\x1b[2J", request_id="req\n1", error_type="x\x07",
                                message_id="msg\x9b1")
        copy = store.import_(data)
        assert copy.turns()[-1].stop_reason == "end\ufffdturn\ufffd[31m\ufffd"
        (call,) = copy.calls()
        assert (call["stop_reason"], call["request_id"], call["error_type"], call["message_id"]) == (
            "end\ufffd[2J", "req\ufffd1", "x\ufffd", "msg\ufffd1")
        assert store.import_(store.export(copy.id)).calls()[0]["request_id"] == "req\ufffd1"


def test_a_call_s_branch_and_model_are_kept_without_control_characters(db_url: str) -> None:
    """Usage reports print them a row each: a line break or an escape in an imported file reached
    the terminal. They are a record, never edited, so an older store's names (a branch name with
    a tab, which convo once allowed) are kept with U+FFFD in place, not refused."""
    with Store(db_url, upgrade=True) as store:
        data = store.export(_with_a_call(store).id)
        data["calls"][0].update(branch="try\t2\x1b[31m", model="claude\x1b[2J\nX")
        copy = store.import_(data)
        (call,) = copy.calls()
        assert (call["branch"], call["model"]) == ("try\ufffd2\ufffd[31m", "claude\ufffd[2J\ufffdX")
        rows = {r.key for r in copy.usage(by="branch").rows} | {r.key for r in copy.usage(by="model").rows}
        assert all(k.isprintable() for k in rows)
        for empty in ({"branch": ""}, {"model": ""}):
            broken = store.export(copy.id)
            broken["calls"][0].update(empty)
            _assert_refused_whole(store, broken, f"calls.0.{next(iter(empty))}")


def test_a_call_under_way_when_exported_is_abandoned_in_the_copy(db_url: str) -> None:
    """It never finishes there: left pending, it stayed pending for good."""
    with Store(db_url, upgrade=True) as store:
        conv = _with_a_call(store, status="pending")
        data = store.export(conv.id)
        assert [c["status"] for c in data["calls"]] == ["pending"]  # the export says what was
        (call,) = store.import_(data).calls()
        assert (call["status"], call["error_type"]) == ("abandoned", "abandoned")
        assert "exported" in call["error_message"]
        assert [c["status"] for c in conv.calls()] == ["pending"]  # the original is untouched


FIVE_MINUTES = {"type": "text", "text": "Rules.", "cache_control": {"type": "ephemeral"}}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other/1"), "format"),
        (lambda d: d["turns"][1].update(parent_id="nope"), "unknown parent"),
        (lambda d: d["turns"][0].update(content=[]), "content"),
        (lambda d: d["turns"][0].update(content=[{"type": "bogus"}]), "bogus"),
        (lambda d: d["branches"][0].update(head_id="nope"), "unknown head"),
        (lambda d: d["conversation"].update(current_branch="nope"), "current branch"),
        (lambda d: d["turns"][0].update(role="system"), "role"),
    ],
)
def test_malformed_import_is_refused_and_writes_nothing(
    db_url: str, tmp_path: Path, mutate, message: str  # type: ignore[no-untyped-def]
) -> None:
    store = Store(db_url, upgrade=True)
    conv = store.create(model="claude-sonnet-4-5")
    conv.add_user("hi")
    conv.add_assistant("hello")
    data = store.export(conv.id)
    mutate(data)
    _assert_refused_whole(store, data, message)
    store.close()


def test_import_refuses_a_branch_with_a_broken_tool_pairing(db_url: str) -> None:
    store = Store(db_url, upgrade=True)
    conv = store.create(model="claude-sonnet-4-5")
    conv.add_user("hi")
    conv.add_assistant([{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}}])
    conv.add_tool_result("toolu_1", "done")
    data = store.export(conv.id)
    data["turns"][2]["content"] = [{"type": "text", "text": "not a result"}]
    data["turns"][2]["kind"] = "user"
    before = _row_counts(store)
    with pytest.raises(InvalidInput, match="tool_use"):
        store.import_(data)
    assert _row_counts(store) == before
    store.close()


def _cli(url: str, *args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "convo", "--db", url, *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.slow
def test_cli_export_import_round_trip_and_malformed_input(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url, upgrade=True)
    conv = store.create(model="claude-sonnet-4-5")
    conv.add_user("hi")
    conv.add_assistant("hello")
    out = tmp_path / "e.json"
    done = _cli(db_url, "export", "-C", conv.id, "-o", str(out))
    assert done.returncode == 0, done.stderr
    done = _cli(db_url, "import", str(out))
    assert done.returncode == 0, done.stderr
    new_id = done.stdout.strip()
    assert store.get(new_id).request() == conv.request()
    before = _row_counts(store)
    for bad in ("not json", '{"format": "convo.conversation/1"}', "[]"):
        done = _cli(db_url, "import", "-", stdin=bad)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("convo: error:")
    assert _row_counts(store) == before
    store.close()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["conversation"]["params"].update(max_tokens="lots"), "max_tokens"),
        (lambda d: d["conversation"]["params"].update(temperature=7), "temperature"),
        (lambda d: d["conversation"]["params"].update(budget_usd=-1), "budget_usd"),
        (lambda d: d["conversation"]["params"].pop("max_tokens"), "max_tokens"),
        (lambda d: d["conversation"].update(system=[{"type": "image"}]), "system"),
        (lambda d: d["turns"][0].update(kind="reply"), "kind reply"),
        # checked as create checks them
        (lambda d: d["conversation"].update(model="   "), "model"),
        (lambda d: d["conversation"].update(title="\ud800"), "title is not valid text"),
        (lambda d: d["conversation"]["params"].update(tools=[{"name": "bad name!"}]), "tool"),
        (lambda d: d["conversation"]["params"].update(tools={"a": 1}), "tools must be a list"),
        (lambda d: d["conversation"].update(system=[FIVE_MINUTES] * 4), "cache_control markers"),
        (lambda d: d["conversation"].update(system=[FIVE_MINUTES]) or d["conversation"]["params"].update(cache="1h"),
         "1-hour cache marker"),
        # media in a reply: the store's own reference, or base64 that does not decode
        (lambda d: d["turns"][1]["content"].append(
            {"type": "image", "source": {"type": "convo_blob", "sha256": "0" * 64, "media_type": "image/png"}}
        ), "convo_blob"),
        (lambda d: d["turns"][1]["content"].append(
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "!!!"}}
        ), "bad base64"),
        (lambda d: d["turns"][1]["content"].append(
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": 5}}
        ), "bad base64"),
        (lambda d: d["turns"][1]["content"].append({"type": "image", "source": "x"}), "must be an object"),
    ],
)
def test_import_refuses_settings_or_turns_that_could_never_be_sent(
    db_url: str, mutate, message: str  # type: ignore[no-untyped-def]
) -> None:
    store = Store(db_url, upgrade=True)
    conv = store.create(model="claude-sonnet-4-5")
    conv.add_user("hi")
    conv.add_assistant("hello")
    data = store.export(conv.id)
    data["turns"][1]["kind"] = "reply"  # as the API sent it: kept, not normalized
    mutate(data)
    _assert_refused_whole(store, data, message)
    store.close()


def test_an_export_taken_while_sends_finish_is_one_moment_and_imports(db_url: str) -> None:
    """Each export reads the conversation at one moment: a send finishing meanwhile is in it
    whole or not at all, so the file always imports (its branch head and calls name only turns
    it holds)."""
    import threading

    from convo.standin import StandIn

    with StandIn() as standin, Client(api_key="k", base_url=standin.base_url) as client, Store(
        db_url, client=client
    ) as store, Store(db_url, client=client) as exporter:
        conv = store.create(model="claude-sonnet-4-5")
        conv.send("hello")
        stop = threading.Event()

        def sending() -> None:
            for i in range(25):
                conv.send(f"more {i}")
            stop.set()

        errors: list[BaseException] = []

        def guarded() -> None:
            try:
                sending()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                stop.set()

        sender = threading.Thread(target=guarded)
        sender.start()
        exports = 0
        while not stop.is_set() or exports < 3:
            data = exporter.export(conv.id)
            turns = {t["id"] for t in data["turns"]}
            assert all(b["head_id"] in turns for b in data["branches"])
            assert all(c["reply_id"] in turns for c in data["calls"] if c["reply_id"] is not None)
            exports += 1
        sender.join(60)
        assert not errors, errors
        assert exporter.import_(data).id  # the last one taken during the sends
        copy = exporter.import_(exporter.export(conv.id))
        assert copy.request("next") == conv.request("next")
