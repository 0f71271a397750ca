"""Bad input is refused with one clear line, and nothing is written.

Every refusal is checked the same way: the error is a `convo.errors.ConvoError` on one line
(in the CLI: one `convo: error:` line on stderr, exit code 2, nothing on stdout), the row counts
of every table are the same before and after, and no request reached the stand-in.

The library cases run on both engines; the CLI cases run all at once in child processes on
SQLite (the engine changes nothing in argument handling), apart from the database URL cases.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers.kit import (
    KEY,
    cli_env,
    dump_rows,
    make_store,
    message_bodies,
    row_counts,
    run_many,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from convo import Store
from convo.content import MAX_IMAGE_BYTES, normalize
from convo.db import HEAD
from convo.errors import (
    AmbiguousId,
    ConfigError,
    ContentError,
    ConvoError,
    HistoryError,
    InvalidInput,
    NotFound,
    PrefillNotSupported,
    StoreError,
)
from convo.history import TurnRecord, build_request
from convo.standin import StandIn

HAIKU_35 = "claude-3-5-haiku-20241022"  # accepts prefill
SONNET_46 = "claude-sonnet-4-6"  # refuses prefill
TEN_MB = 10 * 1024 * 1024


# -- images ------------------------------------------------------------------------------------


def png(width: int = 4, height: int = 4, pad: int = 0) -> bytes:
    ihdr = struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00" * pad
    )


def jpeg(width: int = 4, height: int = 4) -> bytes:
    sof = b"\x08" + struct.pack(">HH", height, width) + b"\x03" + b"\x01\x11\x00" * 3
    return (
        b"\xff\xd8\xff\xe0"
        + struct.pack(">H", 16)
        + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        + b"\xff\xc0"
        + struct.pack(">H", len(sof) + 2)
        + sof
        + b"\x00" * 16
        + b"\xff\xd9"
    )


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    files = {
        "jpeg_named_png": jpeg(),
        "text_named_png": b"just some text, not an image\n",
        "too_big": png(pad=MAX_IMAGE_BYTES + 1),
        "too_wide": png(9000, 10),
        # a signature and nothing an image's size can be read from
        "png_garbage": b"\x89PNG\r\n\x1a\ngarbage" + b"x" * 40,
        "png_cut": png()[:20],
        "jpeg_garbage": b"\xff\xd8\xff garbage",
        "gif_cut": b"GIF89a",
    }
    out = {}
    for name, data in files.items():
        p = tmp_path / f"{name}.png"
        p.write_bytes(data)
        out[name] = p
    return out


# -- the check every refusal goes through ---------------------------------------------------------


def refused(
    url: str,
    standin: StandIn,
    action: Callable[[], Any],
    error: type[ConvoError],
    fragment: str,
) -> ConvoError:
    before = row_counts(url)
    sent = len(message_bodies(standin))
    with pytest.raises(ConvoError) as info:
        action()
    e = info.value
    assert isinstance(e, error), f"{type(e).__name__}: {e}"
    assert fragment in str(e)
    assert "\n" not in str(e) and str(e).strip()
    assert row_counts(url) == before, "bad input was written"
    assert len(message_bodies(standin)) == sent, "bad input reached the API"
    return e


@pytest.fixture
def store(db_url: str, standin: StandIn) -> Iterator[Store]:
    with make_store(db_url, standin.base_url) as s:
        yield s


# -- library: text and prefill ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["", "   ", " \n\t \r\n", "\u3000\u2003"],
    ids=["empty", "spaces", "mixed", "unicode-spaces"],
)
def test_empty_or_whitespace_text(
    db_url: str, standin: StandIn, store: Store, bad: str
) -> None:
    conv = store.create()
    refused(db_url, standin, lambda: conv.send(bad), ContentError, "empty")
    refused(
        db_url, standin, lambda: conv.stream(bad).until_done(), ContentError, "empty"
    )
    refused(db_url, standin, lambda: conv.add_user(bad), ContentError, "empty")
    refused(
        db_url,
        standin,
        lambda: conv.send([{"type": "text", "text": bad}]),
        ContentError,
        "empty",
    )


def test_trailing_whitespace_prefill(
    db_url: str, standin: StandIn, store: Store
) -> None:
    conv = store.create(HAIKU_35)
    for prefill in ("The answer is ", "Sure\n", "x\t"):
        refused(
            db_url,
            standin,
            partial(conv.send, "Pick one", prefill=prefill),
            HistoryError,
            "whitespace",
        )
    strict = store.create(SONNET_46)
    refused(
        db_url,
        standin,
        lambda: strict.send("Pick one", prefill="The answer is ("),
        PrefillNotSupported,
        "prefill",
    )


def test_ten_megabyte_message(db_url: str, standin: StandIn, store: Store) -> None:
    conv = store.create()
    refused(db_url, standin, lambda: conv.send("x" * TEN_MB), ContentError, "limit")


# -- library: ids ---------------------------------------------------------------------------------


def test_unknown_and_ambiguous_ids(db_url: str, standin: StandIn, store: Store) -> None:
    a, b, c = (store.create(title=t) for t in "abc")
    a.send("First question?")
    a.send("Second question?")
    common = os.path.commonprefix([a.id, b.id, c.id])
    assert common  # ids start with their creation time: a shared prefix
    for ref in ("zzzzzzzzzz", "!!", "0" * 27, "u"):  # 'u' is not in the id alphabet
        refused(db_url, standin, partial(store.get, ref), NotFound, "no conversation")  # type: ignore[arg-type]
    refused(db_url, standin, lambda: store.get(common), AmbiguousId, "ambiguous")
    # Turn ids are whole numbers: no prefixes, so nothing is ambiguous, and text that is not a
    # number names no turn.
    last = max(int(t.id) for t in a.turns())
    for tref in ("zzzzzzzz", "1e3", "-1", "", str(last + 10_000), last + 10_000):
        refused(db_url, standin, lambda tref=tref: a.edit(tref, "x"), NotFound, "no turn")
        refused(db_url, standin, lambda tref=tref: a.fork(at=tref), NotFound, "no turn")


def test_turn_id_from_another_conversation(
    db_url: str, standin: StandIn, store: Store
) -> None:
    mine, theirs = store.create(title="mine"), store.create(title="theirs")
    mine.send("Mine?")
    theirs.send("Theirs?")
    foreign = theirs.turns()[0].id
    for action in (
        lambda: mine.turn(foreign),
        lambda: mine.fork(at=foreign),
        lambda: mine.edit(foreign, "rewritten"),
        lambda: mine.regenerate(foreign),
    ):
        refused(db_url, standin, action, NotFound, "another conversation")


# -- library: blocks ------------------------------------------------------------------------------


def test_unknown_block_type(db_url: str, standin: StandIn, store: Store) -> None:
    conv = store.create()
    bad_blocks: list[Any] = [
        [{"type": "bogus"}],
        [{"no": "type"}],
        ["text"],
        [{"type": "tool_use", "id": "t", "name": "n", "input": {}}],
    ]
    for blocks in bad_blocks:
        refused(db_url, standin, partial(conv.add_user, blocks), ContentError, "block")
        refused(db_url, standin, partial(conv.send, blocks), ContentError, "block")
    refused(db_url, standin, lambda: conv.add_user([]), ContentError, "non-empty")


def test_tool_result_without_its_tool_use(
    db_url: str, standin: StandIn, store: Store
) -> None:
    conv = store.create()
    stray = [{"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "42"}]
    refused(db_url, standin, lambda: conv.send(stray), HistoryError, "toolu_nowhere")
    refused(
        db_url,
        standin,
        lambda: conv.add_tool_result("toolu_nowhere", "42"),
        HistoryError,
        "toolu_nowhere",
    )
    conv.send("Hello?")
    refused(db_url, standin, lambda: conv.send(stray), HistoryError, "toolu_nowhere")
    refused(
        db_url,
        standin,
        lambda: conv.add_tool_result("toolu_nowhere", "42"),
        HistoryError,
        "toolu_nowhere",
    )
    # Appending without sending must refuse it too: a stored stray tool_result makes every later
    # request of the branch fail.
    refused(
        db_url, standin, lambda: conv.add_user(stray), HistoryError, "toolu_nowhere"
    )


def test_a_turn_no_request_could_ever_start_with(
    db_url: str, standin: StandIn, store: Store
) -> None:
    """The API needs the first message to be the user's: an assistant turn as the very first
    turn of a branch can never be sent, so it is refused when appended."""
    conv = store.create(HAIKU_35)
    refused(
        db_url,
        standin,
        lambda: conv.add_assistant("I speak first"),
        HistoryError,
        "first",
    )


def test_values_that_are_not_json(db_url: str, standin: StandIn, store: Store) -> None:
    """Block values JSON cannot carry (or that would be stored differently from what is sent:
    NaN goes out as `NaN` but is stored as null) are content errors, not crashes, and nothing
    is written. Every case is tried; the failures are listed together."""
    conv = store.create()
    cases: dict[str, Any] = {
        repr(v): [{"type": "text", "text": "hi", "extra": v}]
        for v in ({1, 2}, b"bytes", float("nan"), float("inf"), 2**70, object())
    }
    cases["int key"] = [{"type": "text", "text": "hi", 1: "int key"}]
    cases["lone surrogate"] = "lone surrogate \ud800"
    wrong = {}
    for name, content in cases.items():
        before = row_counts(db_url)
        sent = len(message_bodies(standin))
        try:
            conv.send(content)
            outcome = "accepted"
        except ContentError as e:
            outcome = "ok" if "\n" not in str(e) else f"multi-line: {e}"
        except Exception as e:  # noqa: BLE001 - anything else is the bug being looked for
            outcome = f"{type(e).__module__}.{type(e).__name__}: {e}"
        if row_counts(db_url) != before:
            outcome += " (rows written)"
        if len(message_bodies(standin)) != sent:
            outcome += " (request sent)"
        if outcome != "ok":
            wrong[name] = outcome
    assert not wrong, "not refused as content errors:\n" + "\n".join(
        f"  {k}: {v}" for k, v in wrong.items()
    )
    assert store.storage.integrity_problems() == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"temperature": float("nan")},
        {"metadata": {"user_id": float("inf")}},
        {"metadata": {"user_id": b"bytes"}},
        {"stop_sequences": ["ok", float("-inf")]},
        {"max_tokens": 2**70},  # json writes it; orjson, which sends the body, cannot
        {"metadata": {"user_id": -(2**64)}},
    ],
    ids=["nan-temperature", "inf-metadata", "bytes-metadata", "inf-stop-sequence", "huge-max-tokens", "huge-metadata"],
)
def test_settings_that_are_not_json_refuse_the_send(
    db_url: str, standin: StandIn, store: Store, overrides: dict[str, Any]
) -> None:
    """The history is sent as orjson writes it (fast, but NaN becomes null): the settings
    around it are held to json's strictness, before anything is written or sent."""
    conv = store.create()
    conv.add_user("hello")
    # (A NaN temperature or a stop sequence that is not a string is refused for its type
    # first, by the check every per-request setting now goes through.)
    why = "must be" if {"temperature", "stop_sequences"} & set(overrides) else "not valid JSON"
    refused(db_url, standin, lambda: conv.send("again", **overrides), InvalidInput, why)
    with pytest.raises(InvalidInput, match=why):
        conv.request("again", **overrides)
    assert conv.send("again").text  # the same send with valid settings goes through


def test_settings_stored_with_a_conversation_that_are_not_json(
    db_url: str, standin: StandIn, store: Store
) -> None:
    """A conversation's settings are stored as JSON: what JSON cannot hold is refused with
    nothing written (it was a bare TypeError)."""
    refused(db_url, standin, lambda: store.create(max_tokens=2**70), InvalidInput, "not valid JSON")
    conv = store.create()
    refused(db_url, standin, lambda: conv.set_limits(max_input_tokens=2**70), InvalidInput, "not valid JSON")


def _deep_tool(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": {}}
    inner = schema
    for _ in range(levels):
        inner["properties"]["a"] = {"type": "object", "properties": {}}
        inner = inner["properties"]["a"]
    return {"name": "deep", "description": "d", "input_schema": schema}


def test_values_nested_deeper_than_can_be_sent(db_url: str, standin: StandIn, store: Store) -> None:
    """orjson, which sends every body, stops at 255 levels; json and copying went on until
    Python's recursion limit, a RecursionError instead of a clear refusal."""
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    conv = store.create()
    block = {"type": "text", "text": "a", "citations": deep}
    refused(db_url, standin, lambda: conv.add_user([block]), ContentError, "Recursion limit")
    refused(db_url, standin, lambda: conv.send("x", metadata={"user_id": deep}), InvalidInput, "Recursion limit")
    refused(db_url, standin, lambda: store.create(tools=[_deep_tool(300)]), InvalidInput, "Recursion limit")
    assert store.create(tools=[_deep_tool(20)]).send("fine").text


@pytest.mark.parametrize(
    "name",
    ["", "  ", " lead", "trail ", "x" * 201, "two\nlines", "tab\there", "\x1b[31mred", "nul\x00",
     "line\u2028separator", "lone\udcffsurrogate", "spoof\u202etxt.exe"],
    ids=["empty", "blank", "lead", "trail", "long", "newline", "tab", "escape", "nul", "line-separator",
         "surrogate", "bidi-override"],
)
def test_branch_names_that_cannot_be_shown_on_one_line(
    db_url: str, standin: StandIn, store: Store, name: str
) -> None:
    conv = store.create()
    conv.send("hello")
    reply = conv.turns()[-1].id
    refused(db_url, standin, lambda: conv.fork(reply, name), InvalidInput, "invalid branch name")
    refused(db_url, standin, lambda: conv.edit(conv.turns()[0].id, "again", name=name), InvalidInput, "invalid branch name")
    # Every script's names stay valid: joiners, marks and non-ASCII spaces are not control
    # characters (str.isprintable() refused these).
    for good in ("with spaces inside, and ünïcode", "می\u200cخواهم", "क्\u200dष",
                 "family-\U0001f468\u200d\U0001f469\u200d\U0001f467", "a\u00a0b", "\U0001fae8"):
        assert conv.fork(reply, good, checkout=False) == good


def test_a_turn_id_of_the_wrong_type_and_a_window_that_ends_before_it_starts(
    db_url: str, standin: StandIn, store: Store
) -> None:
    conv = store.create()
    conv.send("hello")
    for ref in (42.0, None, [1]):
        refused(db_url, standin, partial(conv.fork, ref), InvalidInput, "a turn id is an int")  # type: ignore[arg-type]
    start = datetime(2026, 1, 2, tzinfo=UTC)
    refused(db_url, standin, lambda: store.usage(since=start, until=start - timedelta(seconds=1)),
            InvalidInput, "is after until")
    assert store.usage(since=start, until=start).rows == []  # an empty window is not an error


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": 5},
        {"model": " "},
        {"system": 5},
        {"max_tokens": True},
        {"temperature": 5},
        {"top_k": -1},
        {"stop_sequences": "END"},
        {"tool_choice": "auto"},
        {"metadata": "x"},
        {"thinking": "on"},
    ],
    ids=lambda o: next(iter(o)) + "=" + repr(next(iter(o.values()))),
)
def test_per_request_settings_are_checked_as_a_conversations_are(
    db_url: str, standin: StandIn, store: Store, overrides: dict[str, Any]
) -> None:
    """They reached the API unchecked, after the user's turn was written (a 400, or worse)."""
    conv = store.create()
    refused(db_url, standin, lambda: conv.send("hello", **overrides), InvalidInput, "")
    with pytest.raises(InvalidInput):
        conv.request("hello", **overrides)


def test_cache_markers_count_the_automatic_one(db_url: str, standin: StandIn, store: Store) -> None:
    """The API takes four cache_control markers in all; with cache on, convo adds one."""
    marked = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}} for i in range(5)]
    refused(db_url, standin, lambda: store.create(system=marked[:4]), InvalidInput, "automatic")
    conv = store.create(system=marked[:4], cache=None)  # four, and no automatic marker: fine
    assert "cache_control" not in conv.request("hi")
    refused(db_url, standin, lambda: conv.send("hi", system=marked), InvalidInput, "at most 4")
    refused(db_url, standin, lambda: conv.send("hi", cache="5m"), InvalidInput, "at most 4")
    assert conv.send("hi").text


@pytest.mark.parametrize("system", ["", "\n", "   ", [{"type": "text", "text": " "}], []])
def test_a_blank_system_prompt_is_refused(db_url: str, standin: StandIn, store: Store, system: Any) -> None:
    """`echo | convo new --system -` stored "\n", and the API refuses a blank text block."""
    refused(db_url, standin, lambda: store.create(system=system), InvalidInput, "system prompt is empty")
    conv = store.create()
    refused(db_url, standin, lambda: conv.send("hi", system=system), InvalidInput, "system prompt is empty")


def test_limits_must_be_finite(db_url: str, standin: StandIn, store: Store) -> None:
    """An infinite or NaN budget was stored as JSON null: no limit at all, or (the store's)
    a TypeError at every later send."""
    conv = store.create()
    for bad in (float("inf"), float("nan")):
        refused(db_url, standin, partial(store.set_budget, bad), InvalidInput, "finite")
        refused(db_url, standin, partial(store.create, budget_usd=bad), InvalidInput, "finite")
        refused(db_url, standin, partial(conv.set_limits, max_input_tokens=bad), InvalidInput, "finite")
    assert store.budget is None and conv.send("still fine").text


def test_run_takes_plain_functions_and_refuses_what_it_cannot_call(
    db_url: str, standin: StandIn, store: Store
) -> None:
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    conv = store.create()
    reply = conv.run("Weather in Paris?", tools=[get_weather])  # it was an AttributeError
    assert "get_weather: 18 C" in reply.text
    definition = {"name": "w", "input_schema": {"type": "object", "properties": {}}}
    refused(db_url, standin, lambda: conv.run("x", tools=[definition]), InvalidInput, "no function")
    refused(db_url, standin, lambda: conv.run("x", tools=5), InvalidInput, "list of Tool")  # type: ignore[arg-type]


def test_library_misuse_is_a_typed_error(db_url: str, standin: StandIn, store: Store, tmp_path: Path) -> None:
    """Each of these was a bare AttributeError, OverflowError, TypeError or SQLAlchemy error."""

    conv = store.create()
    conv.send("hello")
    reply = conv.turns()[-1].id
    for url in ("sqlite:///:memory:", 5):  # an in-memory database is one connection's own
        with pytest.raises(ConfigError):
            Store(url)  # type: ignore[arg-type]
    refs: tuple[Any, ...] = (5, None, [[[]]] * 3)
    for ref in refs:
        refused(db_url, standin, partial(store.get, ref), InvalidInput, "conversation id is a string")  # type: ignore[arg-type]
    refused(db_url, standin, lambda: conv.fork(reply, name=5), InvalidInput, "branch name is a string")  # type: ignore[arg-type]
    for ref in (2**63, -1):
        refused(db_url, standin, partial(conv.fork, ref), NotFound, "no turn")
    refused(db_url, standin, lambda: store.usage(since="2024-01-01"), InvalidInput, "datetime")  # type: ignore[arg-type]
    naive, aware = datetime(2020, 1, 1), datetime(2100, 1, 1, tzinfo=UTC)
    assert store.usage(since=naive, until=aware).total.calls == 1  # naive is UTC
    assert conv.usage(since=naive).total.calls == 1


# -- library: images --------------------------------------------------------------------------------


def test_images(
    db_url: str, standin: StandIn, store: Store, images: dict[str, Path]
) -> None:
    conv = store.create()
    refused(
        db_url,
        standin,
        lambda: conv.send("What is this?", images=[images["text_named_png"]]),
        ContentError,
        "not an image",
    )
    refused(
        db_url,
        standin,
        lambda: conv.send("What is this?", images=[images["too_big"]]),
        ContentError,
        "limit",
    )
    refused(
        db_url,
        standin,
        lambda: conv.send("What is this?", images=[images["too_wide"]]),
        ContentError,
        "9000x10",
    )
    refused(
        db_url,
        standin,
        lambda: conv.add_user(
            "What?",
            images=[
                images["missing"] if "missing" in images else Path("/nonexistent/x.png")
            ],
        ),
        ContentError,
        "cannot read",
    )
    data = base64.b64encode(images["jpeg_named_png"].read_bytes()).decode()
    lying = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": data},
        }
    ]
    refused(db_url, standin, lambda: conv.send(lying), ContentError, "claims image/png")
    refused(
        db_url,
        standin,
        lambda: conv.send(
            [
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/png",
                        "data": "@@not base64@@",
                    },
                }
            ]
        ),
        ContentError,
        "base64",
    )
    # A .png file holding JPEG bytes is sent as what the bytes are.
    conv.send("What is this?", images=[images["jpeg_named_png"]])
    sent = message_bodies(standin)[-1]["messages"][0]["content"][0]
    assert sent["source"]["media_type"] == "image/jpeg"
    assert sent["source"]["data"] == data
    assert store.storage.integrity_problems() == []


# -- library: importing a malformed export ---------------------------------------------------------
# (The CLI has no import command yet: these run through Store.import_, which it would call.)


def _export(store: Store) -> dict[str, Any]:
    conv = store.create(title="source")
    conv.send("Hello?")
    conv.send("Again?")
    return store.export(conv.id)


def _mutated(
    good: dict[str, Any], change: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    data = copy.deepcopy(good)
    change(data)
    return data


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def test_malformed_import_is_refused_whole(
    db_url: str, standin: StandIn, store: Store
) -> None:
    good = _export(store)
    t0, t1 = good["turns"][0]["id"], good["turns"][1]["id"]
    stray = [{"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "x"}]
    cases: dict[str, Any] = {
        "a list": [good],
        "a string": json.dumps(good),
        "no format": _mutated(good, lambda d: d.pop("format")),
        "another format": _mutated(good, _set(("format",), "convo.conversation/99")),
        "no branches": _mutated(good, _set(("branches",), [])),
        "unknown parent": _mutated(good, _set(("turns", 1, "parent_id"), "nope")),
        "unknown head": _mutated(good, _set(("branches", 0, "head_id"), "nope")),
        "unknown current branch": _mutated(
            good, _set(("conversation", "current_branch"), "x")
        ),
        "duplicate turn ids": _mutated(good, _set(("turns", 1, "id"), t0)),
        "a cycle": _mutated(good, _set(("turns", 0, "parent_id"), t1)),
        "bad role": _mutated(good, _set(("turns", 0, "role"), "system")),
        "bogus block": _mutated(
            good, _set(("turns", 0, "content"), [{"type": "bogus"}])
        ),
        "stray tool_result": _mutated(good, _set(("turns", 2, "content"), stray)),
        "bad date": _mutated(good, _set(("turns", 0, "created_at"), "yesterday")),
        "extra key": _mutated(good, _set(("conversation", "api_key"), KEY)),
        "duplicate branch names": _mutated(
            good, lambda d: d["branches"].append(dict(d["branches"][0]))
        ),
        "a call's unknown turn": _mutated(good, _set(("calls", 0, "turn_id"), "nope")),
        "a negative cost": _mutated(good, _set(("calls", 0, "cost_usd"), -5.0)),  # lowered budgets
        "an unknown call status": _mutated(good, _set(("calls", 0, "status"), "made-up")),
        "a call's unknown reply": _mutated(good, _set(("calls", 0, "reply_id"), 999_999)),
        "an edit of an unknown turn": _mutated(good, _set(("turns", 0, "source_id"), "nope")),
        "a branch name on two lines": _mutated(
            _mutated(good, _set(("branches", 0, "name"), "two\nlines")),
            _set(("conversation", "current_branch"), "two\nlines"),
        ),
        # turns no root leads to would be silently left out: not "whole or not at all"
        "unreachable cycle": _mutated(
            good,
            lambda d: d["turns"].extend(
                [
                    dict(d["turns"][0], id="x1", parent_id="x2"),
                    dict(d["turns"][0], id="x2", parent_id="x1"),
                ]
            ),
        ),
        "NaN in a reply": _mutated(
            good, _set(("turns", 1, "content", 0, "n"), float("nan"))
        ),
    }
    wrong = {}
    for name, data in cases.items():
        before = row_counts(db_url)
        try:
            store.import_(data)
            outcome = "accepted"
        except ConvoError as e:
            outcome = "ok" if str(e) and "\n" not in str(e) else f"unclear: {e!r}"
        except Exception as e:  # noqa: BLE001 - anything else is the bug being looked for
            outcome = (
                f"{type(e).__module__}.{type(e).__name__}: {str(e).splitlines()[0]}"
            )
        if row_counts(db_url) != before:
            outcome += " (rows written)"
        if outcome != "ok":
            wrong[name] = outcome
    assert not wrong, "malformed exports not refused cleanly:\n" + "\n".join(
        f"  {k}: {v}" for k, v in wrong.items()
    )
    # the good one still imports, twice, and replays exactly
    for _ in range(2):
        copy_ = store.import_(good)
        assert (
            copy_.request("Next?")["messages"][:-1]
            == store.get(good["conversation"]["id"]).request("Next?")["messages"][:-1]
        )
    assert store.storage.integrity_problems() == []


def test_values_beyond_the_columns_are_clear_errors_on_every_engine(
    db_url: str, standin: StandIn, store: Store
) -> None:
    """Text longer than a column or numbers beyond its range: accepted as is, or a ConvoError
    (never a raw database exception, which PostgreSQL raises where SQLite lets it pass)."""
    good = _export(store)
    attempts: dict[str, Callable[[], Any]] = {
        "a 300-character model id": partial(store.create, "m" * 300),
        "import: call status of 50 characters": partial(
            store.import_, _mutated(good, _set(("calls", 0, "status"), "s" * 50))
        ),
        "import: stop_reason of 60 characters": partial(
            store.import_, _mutated(good, _set(("turns", 1, "stop_reason"), "r" * 60))
        ),
        "import: model of 300 characters": partial(
            store.import_, _mutated(good, _set(("conversation", "model"), "m" * 300))
        ),
        "import: 2**40 input tokens": partial(
            store.import_, _mutated(good, _set(("calls", 0, "input_tokens"), 2**40))
        ),
    }
    wrong = {}
    for name, attempt in attempts.items():
        before = row_counts(db_url)
        try:
            attempt()
        except ConvoError:
            if row_counts(db_url) != before:
                wrong[name] = "refused but rows written"
        except Exception as e:  # noqa: BLE001
            wrong[name] = (
                f"{type(e).__module__}.{type(e).__name__}: {str(e).splitlines()[0]}"
            )
    assert not wrong, "raw database errors:\n" + "\n".join(
        f"  {k}: {v}" for k, v in wrong.items()
    )


# -- fuzz: any nested value as blocks ---------------------------------------------------------------

_any_text = st.text(
    st.characters(codec=None, categories=None), max_size=12
)  # surrogates too
_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | _any_text
_junk = st.recursive(
    _json_leaf | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3)
    ),
    max_leaves=12,
)
_TYPES = [
    "text",
    "image",
    "document",
    "tool_result",
    "tool_use",
    "search_result",
    "thinking",
    "bogus",
    "",
]
_source: st.SearchStrategy[Any] = st.fixed_dictionaries(
    {"type": st.sampled_from(["base64", "url", "text", "content", "nope"])},
    optional={
        "media_type": st.sampled_from(
            ["image/png", "image/jpeg", "application/pdf", "x"]
        ),
        "data": st.sampled_from(
            [
                base64.b64encode(png()).decode(),
                base64.b64encode(jpeg()).decode(),
                "!!",
                "",
                base64.b64encode(b"%PDF-1.4 x").decode(),
            ]
        )
        | _junk,
        "url": st.sampled_from(["https://example.com/a.png", "ftp://x", ""]) | _junk,
    },
)
_block: st.SearchStrategy[Any] = st.fixed_dictionaries(
    {"type": st.sampled_from(_TYPES) | _junk},
    optional={  # type: ignore[dict-item]
        "text": st.text(max_size=10) | _junk,
        "source": _source | _junk,
        "tool_use_id": st.sampled_from(["toolu_1", ""]) | _junk,
        "content": st.text(max_size=5)
        | st.lists(st.deferred(lambda: _block), max_size=2)
        | _junk,
        "is_error": st.booleans() | _junk,
        "id": st.sampled_from(["toolu_1"]) | _junk,
        "name": st.text(max_size=5),
        "input": _junk,
        "cache_control": _junk,
        "extra": _junk,
    },
)
# A valid text block with odd extra keys: gets past the type checks, so the values matter.
_near_valid = st.builds(
    lambda t, extra: {"type": "text", "text": t, **extra},
    _any_text.filter(str.strip),
    st.dictionaries(st.text(max_size=5) | st.integers(), _junk, max_size=2),
)
_content = (
    _any_text
    | _block
    | _near_valid
    | st.lists(_block | _near_valid | _junk, max_size=4)
    | _junk
)

ASKED = [
    TurnRecord("t0", "user", "user", [{"type": "text", "text": "Call the tool."}]),
    TurnRecord(
        "t1",
        "assistant",
        "reply",
        [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
        stop_reason="tool_use",
    ),
]


def _is_valid_body(body: Any) -> None:
    """What the client will POST and the store will keep: strict JSON, identical both ways."""
    assert isinstance(body, dict) and body["messages"]
    sent = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    stored = orjson.dumps(body)
    assert json.loads(sent) == json.loads(stored) == body


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=_content, after_tool_use=st.booleans())
def test_fuzz_blocks_through_normalize_and_build_request(
    content: Any, after_tool_use: bool
) -> None:
    settings_ = {"model": "claude-sonnet-4-5", "max_tokens": 64}
    try:
        blocks = normalize(content, "user")
        path = [
            *(ASKED if after_tool_use else []),
            TurnRecord("new", "user", "user", blocks),
        ]
        media = any(
            isinstance(b, dict) and b.get("type") in ("image", "document")
            for b in blocks
        )
        body = build_request(path, settings_, blobs={} if media else None)
    except ConvoError as e:
        assert str(e) and "\n" not in str(e)
        return
    _is_valid_body(body)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(reply=st.lists(_block, min_size=1, max_size=3))
def test_fuzz_stored_reply_blocks_replay_or_refuse(reply: list[Any]) -> None:
    """Replies are stored as the API sent them (never normalized): whatever they hold, building
    the next request gives a body or a ConvoError."""
    path = [
        ASKED[0],
        TurnRecord("r", "assistant", "reply", reply, stop_reason="end_turn"),
        TurnRecord("u", "user", "user", [{"type": "text", "text": "And?"}]),
    ]
    try:
        body = build_request(path, {"model": "claude-sonnet-4-5", "max_tokens": 64})
    except ConvoError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert body["messages"][1]["content"] == reply


# -- the CLI ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_refuses_bad_input_with_exit_2_and_writes_nothing(
    tmp_path: Path, standin: StandIn, images: dict[str, Path]
) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    with make_store(url, standin.base_url) as store:
        a = store.create(HAIKU_35, title="a")
        b = store.create(HAIKU_35, title="b")
        a.send("First?")
        b.send("Other?")
        foreign = str(b.turns()[0].id)
        ambiguous = os.path.commonprefix([a.id, b.id])
        assert ambiguous
        export = json.dumps(store.export(a.id)).encode()
    # `convo import` inputs (tests/test_transfer.py covers "not json", "[]" and a bare format)
    files = {
        "truncated": export[: len(export) // 2],
        "not_utf8": export.replace(b'"First?"', b'"First\xff?"'),
        "duplicate_branches": json.dumps(
            _mutated(
                json.loads(export),
                lambda d: d["branches"].append(dict(d["branches"][0])),
            )
        ).encode(),
    }
    files["deep"] = b"[" * 100_000  # json.loads recursed past Python's limit
    files["deep_tools"] = json.dumps([_deep_tool(300)]).encode()  # and so did copying it
    for name, data in files.items():
        (tmp_path / f"{name}.json").write_bytes(data)
    env = cli_env(standin.base_url, tmp_path)
    sent = len(message_bodies(standin))
    before = row_counts(url)
    # (tests/test_cli.py covers "", a whitespace prefill, stdin that is not UTF-8, unknown and
    # ambiguous conversation ids; these are the rest, with every table's row count compared.)
    cases: list[tuple[list[str], bytes | None, str]] = [
        (["send", "-C", a.id, "  \n\t "], None, "empty"),
        (["show", "-C", ambiguous], None, "ambiguous"),
        (["fork", "-C", a.id, "--at", foreign], None, "another conversation"),
        (["edit", "-C", a.id, foreign, "rewritten"], None, "another conversation"),
        (["tool-result", "-C", a.id, "toolu_nowhere", "42"], None, "toolu_nowhere"),
        (
            ["send", "-C", a.id, "Look", "--image", str(images["text_named_png"])],
            None,
            "not an image",
        ),
        (
            ["send", "-C", a.id, "Look", "--image", str(images["too_big"])],
            None,
            "limit",
        ),
        (
            ["send", "-C", a.id, "Look", "--image", str(images["too_wide"])],
            None,
            "9000x10",
        ),
        (["send", "-C", a.id, "-"], b"y" * TEN_MB, "limit"),
        (["add", "-C", a.id, "--role", "user", "-"], b"\xc3\x28", "not valid UTF-8"),
        (["import", str(tmp_path / "truncated.json")], None, "not JSON"),
        (["import", str(tmp_path / "not_utf8.json")], None, "cannot read"),
        (["import", str(tmp_path / "missing.json")], None, "cannot read"),
        (["import", "-"], export[:-1], "not JSON"),
        (["import", str(tmp_path / "duplicate_branches.json")], None, "branch"),
        (["new", "--max-tokens", "99999999999999999999"], None, "too large"),
        (["usage", "--since", "2020-01-01", "--until", "2019-12-31"], None, "is after --until"),
        (["send", "-C", "", "hello"], None, "empty conversation id"),  # not "the latest"
        (["new", "--model", " "], None, "empty model id"),  # not "the default"
        (["import", str(tmp_path / "deep.json")], None, "nested too deeply"),
        (["new", "--tools", str(tmp_path / "deep.json")], None, "nested too deeply"),
        (["new", "--tools", str(tmp_path / "deep_tools.json")], None, "Recursion limit"),
        (["send", "-C", a.id, "--max-tokens", str(2**64), "big"], None, "too large"),
        *(
            (["send", "-C", a.id, "Look", "--image", str(images[name])], None, "header cannot be read")
            for name in ("png_garbage", "png_cut", "jpeg_garbage", "gif_cut")
        ),
        (["standin", "--port", "99999"], None, "a port is 0 to 65535"),
        (["branch", "-C", a.id, "-d", ""], None, "empty branch name"),
        (["export", "-C", a.id, "-o", ""], None, "empty file name"),
        (["--db", "", "list"], None, "database URL is empty"),
    ]
    argv_bytes = [
        "send",
        "-C",
        a.id,
        "caf\udce9",
    ]  # an invalid UTF-8 byte in argv (surrogateescape)
    runs = [(["--db", url, *args], env) for args, _, _ in cases] + [
        (["--db", url, *argv_bytes], env)
    ]
    results = run_many(runs, stdin=[data for _, data, _ in cases] + [None])
    wrong = []
    for (args, _, fragment), res in zip(
        [*cases, (argv_bytes, None, "not valid UTF-8")], results, strict=True
    ):
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        if not (
            res.returncode == 2
            and res.stdout == ""
            and len(lines) == 1
            and lines[0].startswith("convo: error: ")
            and fragment in lines[0]
        ):
            wrong.append(f"  {args[:2]}: exit {res.returncode}: {res.stderr[:240]!r}")
    assert row_counts(url) == before
    assert len(message_bodies(standin)) == sent
    # A .png holding JPEG bytes goes out as JPEG.
    argv = [
        "--db",
        url,
        "send",
        "-C",
        a.id,
        "Look",
        "--image",
        str(images["jpeg_named_png"]),
    ]
    (ok,) = run_many([(argv, env)])
    assert ok.returncode == 0, ok.stderr
    image = message_bodies(standin)[-1]["messages"][-1]["content"][0]
    assert image["source"]["media_type"] == "image/jpeg"
    assert not wrong, "not a one-line exit-2 refusal:\n" + "\n".join(wrong)


@pytest.mark.slow
def test_cli_database_urls_that_cannot_be_used(
    tmp_path: Path, standin: StandIn
) -> None:
    """A malformed or unsupported URL is bad usage (exit 2); a server that cannot be reached is a
    runtime failure (exit 1). Either way one line, no password, no traceback, no file created."""
    env = cli_env(standin.base_url, tmp_path)
    secret = "pw-SECRET-42"
    bad_usage = ["not a url", "mysql://user@localhost/db"]
    unreachable = [f"postgresql://convo:{secret}@127.0.0.1:1/convo"]
    results = run_many([(["--db", u, "list"], env) for u in bad_usage + unreachable])
    for url, res in zip(bad_usage + unreachable, results, strict=True):
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("convo: error: "), res.stderr
        assert secret not in res.stderr + res.stdout
        assert res.returncode == (2 if url in bad_usage else 1), (
            f"{url}: {res.returncode} {res.stderr}"
        )
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_cli_refuses_a_database_from_a_newer_convo(
    db_url: str, tmp_path: Path, standin: StandIn
) -> None:
    with make_store(db_url, standin.base_url) as store:
        store.create(title="kept").send("Still here?")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    try:
        before = dump_rows(db_url)
        env = cli_env(standin.base_url, tmp_path)
        results = run_many(
            [
                (["--db", db_url, *args], env)
                for args in (["send", "hi"], ["db", "upgrade"])
            ]
        )
        for res in results:
            lines = [line for line in res.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and "9999" in lines[0], res.stderr
            assert "upgrade convo" in lines[0]
            assert (
                res.returncode == 1
            )  # a StoreError: the database, not the input, is at fault
            assert res.stdout == ""
        assert dump_rows(db_url) == before
    finally:  # the PostgreSQL test database is shared by the session: put the revision back
        engine = create_engine(db_url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text("UPDATE alembic_version SET version_num = :v"), {"v": HEAD}
                )
        finally:
            engine.dispose()


def test_more_library_misuse_is_a_typed_error_and_writes_nothing(db_url: str, standin: StandIn, store: Store) -> None:
    """Arguments of the wrong type or out of range, as a review passed them: each a typed
    error on one line, nothing written, nothing sent."""
    from datetime import timezone

    conv = store.create()
    conv.send("hello")
    for url in ("", "   ", "sqlite:///x\x00.db", "sqlite:///x\ud800.db"):
        with pytest.raises(ConfigError):
            Store(url)
    cases: list[tuple[Callable[[], Any], type[ConvoError], str]] = [
        (partial(store.create, model="claude-sonnet-4-5\n"), InvalidInput, "control character"),
        (partial(store.create, model=" claude-sonnet-4-5"), InvalidInput, "surrounding spaces"),
        (partial(store.create, title="a\x00b"), InvalidInput, "no NUL"),
        (partial(store.create, title="t" * 1001), InvalidInput, "at most 1000"),
        (partial(store.create, tools=5), InvalidInput, "tools must be a list"),  # type: ignore[arg-type]
        (partial(store.create, system=[{"type": "text", "text": "x", "n": float("nan")}]), InvalidInput, "JSON"),
        (partial(conv.send, "x", images=None), InvalidInput, "images must be a list"),  # type: ignore[arg-type]
        (partial(conv.send, "x", images="p.png"), InvalidInput, "images must be a list"),
        (partial(conv.add_user, None), InvalidInput, "needs text"),  # type: ignore[arg-type]
        (partial(store.list, "x"), InvalidInput, "limit"),  # type: ignore[arg-type]
        (partial(store.list, 2**70), InvalidInput, "limit"),
        (partial(conv.checkout, 5), InvalidInput, "branch name is a string"),  # type: ignore[arg-type]
        (partial(conv.delete_branch, {}), InvalidInput, "branch name is a string"),  # type: ignore[arg-type]
        (partial(conv.turns, "a\ud800"), InvalidInput, "branch name"),
        (partial(store.usage, branch=5), InvalidInput, "branch name is a string"),  # type: ignore[arg-type]
        (partial(store.usage, conversation=""), InvalidInput, "conversation"),
        (partial(store.usage, by=[[[]]] * 3), InvalidInput, "grouped by"),  # type: ignore[arg-type]
        (partial(store.usage, since=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))), InvalidInput,
         "out of range"),
    ]
    for action, error, fragment in cases:
        refused(db_url, standin, action, error, fragment)
    gone = store.create()
    store.delete(gone.id)
    refused(db_url, standin, partial(gone.delete_branch, "x"), NotFound, "no conversation")
    with make_store(db_url, standin.base_url) as closed:
        again = closed.get(conv.id)
    refused(db_url, standin, partial(again.send, "after close"), StoreError, "store is closed")
