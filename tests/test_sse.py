"""convo.sse: the SSE spec's line and field rules, whatever the chunk boundaries."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convo.sse import ServerSentEvent, SSEDecoder, iter_events

# A Messages API stream as the API sends it (text with non-ASCII characters, a ping, a tool
# call in several JSON fragments, cumulative usage), so splits fall inside UTF-8 sequences too.
REAL_STREAM = (
    "event: message_start\n"
    'data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL",'
    '"type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5",'
    '"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,'
    '"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":2}}}\n'
    "\n"
    "event: content_block_start\n"
    'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n'
    "\n"
    "event: ping\n"
    'data: {"type": "ping"}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    '"text":"Café ☕ in 東京"}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    '"text":", let me check 🌦"}}\n'
    "\n"
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":0}\n'
    "\n"
    "event: content_block_start\n"
    'data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use",'
    '"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    '"partial_json":""}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    '"partial_json":"{\\"location\\": \\"Tōkyō"}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    '"partial_json":"\\"}"}}\n'
    "\n"
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":1}\n'
    "\n"
    "event: message_delta\n"
    'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    '"usage":{"output_tokens":89}}\n'
    "\n"
    "event: message_stop\n"
    'data: {"type":"message_stop"}\n'
    "\n"
).encode()

EXPECTED_NAMES = [
    "message_start",
    "content_block_start",
    "ping",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "content_block_start",
    "content_block_delta",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    return list(iter_events(chunks))


def with_line_ends(raw: bytes, end: bytes) -> bytes:
    return raw.replace(b"\n", end)


BASELINE = decode(REAL_STREAM)
VARIANTS = {
    "LF": REAL_STREAM,
    "CRLF": with_line_ends(REAL_STREAM, b"\r\n"),
    "CR": with_line_ends(REAL_STREAM, b"\r"),
}


def test_real_stream_decodes_to_the_api_events() -> None:
    assert [e.event for e in BASELINE] == EXPECTED_NAMES
    for event in BASELINE:
        assert json.loads(event.data)["type"] == event.event
        assert event.id is None and event.retry is None
    assert json.loads(BASELINE[3].data)["delta"]["text"] == "Café ☕ in 東京"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_split_point_gives_the_same_events(name: str) -> None:
    raw = VARIANTS[name]
    for i in range(len(raw) + 1):
        assert decode(raw[:i], raw[i:]) == BASELINE, f"split at {i}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_one_byte_at_a_time_gives_the_same_events(name: str) -> None:
    raw = VARIANTS[name]
    assert decode(*(raw[i : i + 1] for i in range(len(raw)))) == BASELINE


@given(st.lists(st.integers(min_value=0, max_value=len(VARIANTS["CRLF"])), max_size=40))
def test_any_set_of_split_points_gives_the_same_events(cuts: list[int]) -> None:
    raw = VARIANTS["CRLF"]
    points = [0, *sorted(cuts), len(raw)]
    chunks = [raw[a:b] for a, b in itertools.pairwise(points)]
    assert decode(*chunks) == BASELINE


def test_feed_returns_events_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: ping\ndata: {}\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent("ping", "{}")]
    # A trailing \r ends the line at once; it does not wait for a possible \n.
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\r") == [ServerSentEvent(None, "x")]
    assert decoder.flush() == []


def test_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    # Were the \r and \n counted twice, the blank line would dispatch "a" alone.
    assert decode(b"data: a\r", b"\ndata: b\r\n\r\n") == [ServerSentEvent(None, "a\nb")]


def test_mixed_line_ends() -> None:
    assert decode(b"data: a\rdata: b\ndata: c\r\n\r\n") == [ServerSentEvent(None, "a\nb\nc")]
    assert decode(b"data: a\n\r\n\rdata: b\r\r") == [
        ServerSentEvent(None, "a"),
        ServerSentEvent(None, "b"),
    ]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert decode(b"data: one\ndata:two\ndata:  three\n\n") == [
        ServerSentEvent(None, "one\ntwo\n three")
    ]


def test_comments_are_ignored() -> None:
    raw = b": keep-alive\n:\ndata: x\n: inside\ndata: y\n\n: trailing\n\n"
    assert decode(raw) == [ServerSentEvent(None, "x\ny")]


def test_ping_event() -> None:
    assert decode(b'event: ping\ndata: {"type": "ping"}\n\n') == [
        ServerSentEvent("ping", '{"type": "ping"}')
    ]


def test_field_without_colon_has_empty_value() -> None:
    assert decode(b"data\n\n") == [ServerSentEvent(None, "")]
    assert decode(b"data\ndata\n\n") == [ServerSentEvent(None, "\n")]
    assert decode(b"event\ndata: x\n\n") == [ServerSentEvent(None, "x")]


def test_only_one_leading_space_is_stripped() -> None:
    assert decode(b"data:x\n\ndata: x\n\ndata:  x \n\n") == [
        ServerSentEvent(None, "x"),
        ServerSentEvent(None, "x"),
        ServerSentEvent(None, " x "),
    ]


def test_colon_in_value_is_kept() -> None:
    assert decode(b'data: {"a": "b:c"}\n\n') == [ServerSentEvent(None, '{"a": "b:c"}')]


def test_event_without_data_is_not_dispatched() -> None:
    assert decode(b"event: lonely\n\ndata: x\n\n") == [ServerSentEvent(None, "x")]


def test_blank_lines_alone_dispatch_nothing() -> None:
    assert decode(b"\n\n\r\n\r") == []


def test_unknown_fields_are_ignored() -> None:
    assert decode(b"foo: bar\ndata: x\nDATA: y\n\n") == [ServerSentEvent(None, "x")]


def test_id_persists_and_rejects_nul() -> None:
    events = decode(b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x00\ndata: c\n\nid\ndata: d\n\n")
    assert [(e.data, e.id) for e in events] == [("a", "1"), ("b", "1"), ("c", "1"), ("d", "")]


def test_retry_must_be_digits_and_belongs_to_its_event() -> None:
    events = decode(
        b"retry: 1500\ndata: a\n\ndata: b\n\nretry: 1.5\ndata: c\n\nretry: x\ndata: d\n\n"
    )
    assert [(e.data, e.retry) for e in events] == [
        ("a", 1500),
        ("b", None),
        ("c", None),
        ("d", None),
    ]


def test_unfinished_event_at_end_of_stream_is_discarded() -> None:
    assert decode(b"data: a\n\ndata: half") == [ServerSentEvent(None, "a")]
    assert decode(b"data: a\n\ndata: b\n") == [ServerSentEvent(None, "a")]


def test_flush_resets_the_decoder() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"event: x\ndata: partial")
    assert decoder.flush() == []
    assert decoder.feed(b"data: fresh\n\n") == [ServerSentEvent(None, "fresh")]


def test_utf8_split_across_chunks() -> None:
    raw = "data: 日本🌦\n\n".encode()
    for i in range(len(raw) + 1):
        assert decode(raw[:i], raw[i:]) == [ServerSentEvent(None, "日本🌦")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert decode(b"data: a\xffb\n\n") == [ServerSentEvent(None, "a\ufffdb")]


def test_leading_byte_order_mark_is_stripped_even_when_split() -> None:
    raw = b"\xef\xbb\xbfdata: x\n\n"
    for i in range(len(raw) + 1):
        assert decode(raw[:i], raw[i:]) == [ServerSentEvent(None, "x")]
    # Only at the start of the stream.
    assert decode(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [ServerSentEvent(None, "a")]


def test_empty_chunks_are_harmless() -> None:
    assert decode(b"", b"data: x\r", b"", b"\n\n", b"") == [ServerSentEvent(None, "x")]


def test_event_is_frozen() -> None:
    event = ServerSentEvent("ping", "{}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "changed"  # type: ignore[misc]
