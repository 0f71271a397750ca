"""convo.stream: folding Messages API stream events into the non-streaming message shape."""

from __future__ import annotations

from typing import Any

import pytest

from convo.errors import (
    APIError,
    APIStatusError,
    InternalServerError,
    OverloadedError,
    RateLimitError,
)
from convo.stream import MessageAccumulator, error_from_event
from convo.types import Usage


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": fields}


def stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


MESSAGE_START = {
    "type": "message_start",
    "message": {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 25,
            "cache_creation_input_tokens": 1200,
            "cache_read_input_tokens": 3000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 1,
            "service_tier": "standard",
        },
    },
}

# Extended thinking, then text, then a tool call whose input arrives in fragments.
THINK_TEXT_TOOL = [
    MESSAGE_START,
    block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
    delta(0, type="thinking_delta", thinking="The user wants "),
    {"type": "ping"},
    delta(0, type="thinking_delta", thinking="the weather."),
    delta(0, type="signature_delta", signature="EqQBCgIYAhIM1gbcDa9GJwZA2b3h"),
    stop(0),
    block_start(1, {"type": "text", "text": ""}),
    delta(1, type="text_delta", text="Let me "),
    delta(1, type="text_delta", text="check."),
    stop(1),
    block_start(2, {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}),
    delta(2, type="input_json_delta", partial_json=""),
    delta(2, type="input_json_delta", partial_json='{"location": "San Fra'),
    delta(2, type="input_json_delta", partial_json='ncisco, CA", "unit": "celsius"}'),
    stop(2),
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 91},
    },
    {"type": "message_stop"},
]

EXPECTED_MESSAGE = {
    "id": "msg_01ABC",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {
            "type": "thinking",
            "thinking": "The user wants the weather.",
            "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h",
        },
        {"type": "text", "text": "Let me check."},
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA", "unit": "celsius"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 25,
        "cache_creation_input_tokens": 1200,
        "cache_read_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 91,
        "service_tier": "standard",
    },
}


def fold(events: list[dict[str, Any]]) -> MessageAccumulator:
    acc = MessageAccumulator()
    for event in events:
        acc.feed(event)
    return acc


def test_thinking_text_and_tool_use_fold_into_the_final_message() -> None:
    acc = fold(THINK_TEXT_TOOL)
    assert acc.complete
    assert acc.message == EXPECTED_MESSAGE
    assert acc.stop_reason == "tool_use"
    assert acc.text == "Let me check."
    assert acc.usage == Usage(
        input_tokens=25,
        output_tokens=91,
        cache_creation_input_tokens=1200,
        cache_read_input_tokens=3000,
        cache_creation_5m_input_tokens=1200,
        cache_creation_1h_input_tokens=0,
    )


def test_feed_returns_only_text_deltas() -> None:
    acc = MessageAccumulator()
    returned = [acc.feed(event) for event in THINK_TEXT_TOOL]
    assert [r for r in returned if r is not None] == ["Let me ", "check."]


def test_before_any_event() -> None:
    acc = MessageAccumulator()
    assert not acc.complete
    assert acc.content == [] and acc.text == "" and acc.stop_reason is None
    assert acc.usage == Usage()
    assert acc.message["content"] == [] and acc.message["type"] == "message"


def test_partial_content_leaves_out_an_unfinished_tool_call() -> None:
    cut = THINK_TEXT_TOOL.index(stop(2))
    acc = fold(THINK_TEXT_TOOL[:cut])
    assert not acc.complete
    assert [b["type"] for b in acc.content] == ["thinking", "text"]
    assert acc.message["stop_reason"] is None
    # Before any fragment, the tool call is unfinished too.
    acc = fold(THINK_TEXT_TOOL[: THINK_TEXT_TOOL.index(stop(1)) + 2])
    assert [b["type"] for b in acc.content] == ["thinking", "text"]


def test_partial_text_is_visible_while_streaming() -> None:
    acc = fold(THINK_TEXT_TOOL[:9])
    assert acc.text == "Let me "
    assert acc.content[1] == {"type": "text", "text": "Let me "}
    assert acc.usage.output_tokens == 1


def test_message_delta_usage_overwrites_and_keeps_the_rest() -> None:
    acc = fold(
        [
            MESSAGE_START,
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                # Cumulative: 30 is the total, not 30 more; a null is no news.
                "usage": {"output_tokens": 30, "input_tokens": 26, "cache_read_input_tokens": None},
            },
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 42},
            },
        ]
    )
    assert acc.usage.output_tokens == 42
    assert acc.usage.input_tokens == 26
    assert acc.usage.cache_read_input_tokens == 3000
    assert acc.usage.cache_creation_input_tokens == 1200


def test_stop_sequence_and_extra_message_fields() -> None:
    acc = fold(
        [
            MESSAGE_START,
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": "stop_sequence",
                    "stop_sequence": "END",
                    "container": None,
                },
                "usage": {"output_tokens": 3},
            },
            {"type": "message_stop"},
        ]
    )
    assert acc.message["stop_sequence"] == "END"
    assert acc.message["stop_reason"] == "stop_sequence"
    assert "container" in acc.message


def test_empty_tool_input_is_an_empty_object() -> None:
    tool = {"type": "tool_use", "id": "toolu_02", "name": "now", "input": {}}
    acc = fold(
        [
            MESSAGE_START,
            block_start(0, tool),
            delta(0, type="input_json_delta", partial_json=""),
            stop(0),
        ]
    )
    assert acc.content == [tool]
    # No fragment at all: the input given at start stands.
    acc = fold([MESSAGE_START, block_start(0, tool), stop(0)])
    assert acc.content == [tool]


@pytest.mark.parametrize(
    ("stop_reason", "says"), [("tool_use", "not JSON"), ("max_tokens", "reached max_tokens inside a tool call")]
)
def test_invalid_tool_json_is_an_api_error_once_the_stream_is_over(stop_reason: str, says: str) -> None:
    """At its block's stop the input may be cut by max_tokens, whose stop reason and final usage
    come after: the stream is read to the end, then the reply is refused, saying why."""
    tool = {"type": "tool_use", "id": "toolu_03", "name": "f", "input": {}}
    acc = fold(
        [
            MESSAGE_START,
            block_start(0, {"type": "text", "text": ""}),
            delta(0, type="text_delta", text="Calling f"),
            stop(0),
            block_start(1, tool),
            delta(1, type="input_json_delta", partial_json='{"a":'),
            stop(1),
            {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 30}},
            {"type": "message_stop"},
        ]
    )
    assert acc.complete and acc.final_usage and acc.usage.output_tokens == 30
    assert acc.content == [{"type": "text", "text": "Calling f"}]  # the cut call is left out
    assert acc.generated == 'Calling f{"a":'
    with pytest.raises(APIError, match=says):
        acc.check_tool_inputs()


def test_server_tool_use_input_is_accumulated_too() -> None:
    block = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
    acc = fold(
        [
            MESSAGE_START,
            block_start(0, block),
            delta(0, type="input_json_delta", partial_json='{"query": "weather"}'),
            stop(0),
        ]
    )
    assert acc.content[0]["input"] == {"query": "weather"}


def test_citations_delta_appends_to_the_block() -> None:
    first = {"type": "char_location", "cited_text": "The sky is blue.", "document_index": 0}
    second = {"type": "char_location", "cited_text": "Grass is green.", "document_index": 0}
    acc = fold(
        [
            MESSAGE_START,
            block_start(0, {"type": "text", "text": ""}),
            delta(0, type="citations_delta", citation=first),
            delta(0, type="text_delta", text="the sky is blue"),
            delta(0, type="citations_delta", citation=second),
            stop(0),
        ]
    )
    assert acc.content == [
        {"type": "text", "text": "the sky is blue", "citations": [first, second]}
    ]


def test_citations_delta_on_a_block_that_starts_with_null_citations() -> None:
    """Recorded API streams start text blocks with "citations": null; setdefault kept the
    None and the first citation raised AttributeError, losing the reply."""
    cite = {"type": "char_location", "cited_text": "The sky is blue.", "document_index": 0}
    acc = fold(
        [
            MESSAGE_START,
            block_start(0, {"type": "text", "text": "", "citations": None}),
            delta(0, type="citations_delta", citation=cite),
            delta(0, type="text_delta", text="blue"),
            stop(0),
        ]
    )
    assert acc.content == [{"type": "text", "text": "blue", "citations": [cite]}]


def test_generated_text_counts_text_thinking_and_tool_input_so_far() -> None:
    """What a stream cut before its final usage had produced, for estimating its billing."""
    acc = fold(
        [
            MESSAGE_START,
            block_start(0, {"type": "thinking", "thinking": ""}),
            delta(0, type="thinking_delta", thinking="hmm"),
            stop(0),
            block_start(1, {"type": "text", "text": ""}),
            delta(1, type="text_delta", text="Hi"),
            stop(1),
            block_start(2, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
            delta(2, type="input_json_delta", partial_json='{"a": 1'),
        ]
    )
    assert acc.generated == 'hmmHi{"a": 1' and not acc.final_usage


def test_unknown_block_is_kept_as_given_and_unknown_delta_recorded() -> None:
    odd = {"type": "hologram", "payload": {"x": [1, 2]}, "text": "not really text"}
    acc = fold(
        [
            MESSAGE_START,
            block_start(0, odd),
            delta(0, type="hologram_delta", bits="0101"),
            stop(0),
            block_start(1, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}),
            stop(1),
            {"type": "message_stop"},
        ]
    )
    assert acc.content == [odd, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}]
    assert acc.text == ""
    assert acc.unknown_deltas == [(0, {"type": "hologram_delta", "bits": "0101"})]


def test_ping_and_unknown_events_are_ignored() -> None:
    events = list(THINK_TEXT_TOOL)
    events.insert(3, {"type": "future_event", "index": 0, "whatever": True})
    events.insert(1, {"type": "ping"})
    assert fold(events).message == EXPECTED_MESSAGE


def test_blocks_are_ordered_by_index_not_arrival() -> None:
    acc = fold(
        [
            MESSAGE_START,
            block_start(1, {"type": "text", "text": "b"}),
            block_start(0, {"type": "text", "text": "a"}),
            stop(0),
            stop(1),
        ]
    )
    assert acc.text == "ab"


def test_content_is_a_copy() -> None:
    acc = fold(THINK_TEXT_TOOL)
    acc.content[2]["input"]["location"] = "changed"
    acc.message["usage"]["output_tokens"] = 0
    assert acc.message == EXPECTED_MESSAGE


def test_input_events_are_not_mutated() -> None:
    start = block_start(0, {"type": "text", "text": ""})
    fold([MESSAGE_START, start, delta(0, type="text_delta", text="hi"), stop(0)])
    assert start["content_block"] == {"type": "text", "text": ""}
    assert MESSAGE_START["message"]["content"] == []  # type: ignore[index]


@pytest.mark.parametrize(
    ("error_type", "cls"),
    [
        ("overloaded_error", OverloadedError),
        ("rate_limit_error", RateLimitError),
        ("api_error", InternalServerError),
        ("timeout_error", InternalServerError),
        ("brand_new_error", APIStatusError),
    ],
)
def test_error_event_raises_the_typed_error(error_type: str, cls: type[APIStatusError]) -> None:
    acc = fold(THINK_TEXT_TOOL[:5])
    event = {
        "type": "error",
        "error": {"type": error_type, "message": "Overloaded"},
        "request_id": "req_011",
    }
    with pytest.raises(cls) as info:
        acc.feed(event)
    err = info.value
    assert type(err) is cls
    assert err.status_code is None
    assert err.error_type == error_type
    assert err.request_id == "req_011"
    assert err.body == event
    assert "stream" in str(err) and "Overloaded" in str(err)
    # What arrived before the error is still readable.
    assert acc.content[0]["thinking"] == "The user wants the weather."


def test_error_from_event_tolerates_a_bare_event() -> None:
    err = error_from_event({"type": "error"}, request_id="req_from_header")
    assert err.request_id == "req_from_header"
    assert err.status_code is None


def test_block_event_without_index_is_an_api_error() -> None:
    with pytest.raises(APIError, match="no block index"):
        MessageAccumulator().feed({"type": "content_block_start", "content_block": {}})
