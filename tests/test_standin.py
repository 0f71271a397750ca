"""The local stand-in of the Messages API (convo/standin.py), exercised over real HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from convo.standin import LABEL, MODEL_SUFFIX, StandIn, _rejects_prefill

HEADERS = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
MODEL = "claude-sonnet-4-5"
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "scale": {"type": "number"},
            "metric": {"type": "boolean"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "cities": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "properties": {"country": {"type": "string"}},
                      "required": ["country"]},
            "optional": {"type": "string"},
        },
        "required": ["city", "days", "scale", "metric", "unit", "cities", "where"],
    },
}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}


@pytest.fixture
def client(standin: StandIn) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=standin.base_url, headers=HEADERS, timeout=10) as c:
        yield c


def body(text: str = "Hello there, how are you today?", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 200,
            "messages": [{"role": "user", "content": text}], **extra}


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in text.split("\n\n"):
        if not chunk.strip():
            continue
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def fold(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rebuild the message from its events, the way a client must."""
    msg: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for name, data in events:
        if name == "message_start":
            msg = data["message"]
        elif name == "content_block_start":
            msg["content"].append(data["content_block"])
        elif name == "content_block_delta":
            block, d = msg["content"][data["index"]], data["delta"]
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            elif d["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + d["partial_json"]
            elif d["type"] == "thinking_delta":
                block["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                block["signature"] = d["signature"]
        elif name == "content_block_stop" and data["index"] in partial:
            msg["content"][data["index"]]["input"] = json.loads(partial[data["index"]])
        elif name == "message_delta":
            msg.update(data["delta"])
            msg["usage"].update(data["usage"])
    return msg


def stream(client: httpx.Client, payload: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/messages", json={**payload, "stream": True})


def error_of(r: httpx.Response, status: int = 400) -> str:
    assert r.status_code == status, r.text
    data = r.json()
    assert data["type"] == "error" and data["request_id"] == r.headers["request-id"]
    return str(data["error"]["message"])


# -- replies ---------------------------------------------------------------------------------
def test_json_reply_is_labelled(client: httpx.Client) -> None:
    r = client.post("/v1/messages", json=body())
    assert r.status_code == 200
    assert r.headers["x-standin"] == "true"
    assert r.headers["request-id"].startswith("req_standin_")
    msg = r.json()
    assert msg["id"].startswith("msg_standin_") and msg["type"] == "message"
    assert msg["role"] == "assistant" and msg["model"] == MODEL + MODEL_SUFFIX
    text = msg["content"][0]["text"]
    assert text.startswith(LABEL + "You said: Hello there, how are you today?")
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    usage = msg["usage"]
    assert usage["output_tokens"] == -(-len(text) // 4)
    assert usage["cache_read_input_tokens"] == usage["cache_creation_input_tokens"] == 0
    assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 0,
                                       "ephemeral_1h_input_tokens": 0}


def test_sse_sequence_folds_to_the_json_reply(client: httpx.Client) -> None:
    plain = client.post("/v1/messages", json=body()).json()
    r = stream(client, body())
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["connection"] == "close" and r.headers["request-id"]
    events = parse_sse(r.text)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and "ping" in names
    assert names[-2:] == ["message_delta", "message_stop"]
    assert [n for n in names if n != "ping"][1] == "content_block_start"
    assert names.count("content_block_delta") >= 3
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 1
    assert start["usage"]["input_tokens"] == plain["usage"]["input_tokens"]
    delta = events[-2][1]
    assert delta["usage"]["output_tokens"] == plain["usage"]["output_tokens"]
    assert set(delta["usage"]) >= {"input_tokens", "cache_read_input_tokens",
                                   "cache_creation_input_tokens"}
    msg = fold(events)
    assert msg["content"] == plain["content"]
    assert msg["stop_reason"] == "end_turn"
    assert msg["usage"]["output_tokens"] == plain["usage"]["output_tokens"]


def test_replies_are_deterministic(client: httpx.Client) -> None:
    a = client.post("/v1/messages", json=body()).json()
    b = client.post("/v1/messages", json=body()).json()
    assert a["content"] == b["content"] and a["usage"] == b["usage"]
    assert a["id"] != b["id"]
    c = client.post("/v1/messages", json=body("Something else entirely")).json()
    assert c["content"] != a["content"]


def test_max_tokens_truncates(client: httpx.Client) -> None:
    msg = client.post("/v1/messages", json=body(max_tokens=5)).json()
    assert msg["stop_reason"] == "max_tokens"
    assert msg["content"][0]["text"] == (LABEL + "You said")[:20]
    assert msg["usage"]["output_tokens"] == 5
    streamed = fold(parse_sse(stream(client, body(max_tokens=5)).text))
    assert streamed["content"] == msg["content"] and streamed["stop_reason"] == "max_tokens"


def test_stop_sequences(client: httpx.Client) -> None:
    msg = client.post("/v1/messages", json=body(stop_sequences=["zzz", "said"])).json()
    assert msg["stop_reason"] == "stop_sequence" and msg["stop_sequence"] == "said"
    assert msg["content"][0]["text"] == LABEL + "You "
    never = client.post("/v1/messages", json=body(stop_sequences=["zzz"])).json()
    assert never["stop_reason"] == "end_turn" and never["stop_sequence"] is None


# -- prefill ---------------------------------------------------------------------------------
def prefilled(prefill: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "max_tokens": 50, "messages": [
        {"role": "user", "content": "Which option, A, B or C?"},
        {"role": "assistant", "content": prefill}]}


def test_prefill_is_continued(client: httpx.Client) -> None:
    msg = client.post("/v1/messages", json=prefilled("The answer is (")).json()
    assert msg["content"] == [{"type": "text", "text": "C)"}]
    assert msg["stop_reason"] == "end_turn" and msg["model"].endswith(MODEL_SUFFIX)
    other = client.post("/v1/messages", json=prefilled("I think")).json()
    assert other["content"][0]["text"].startswith(" ...")
    obj = client.post("/v1/messages", json=prefilled("{")).json()
    assert json.loads("{" + obj["content"][0]["text"])["stand_in"] is True
    blocks = prefilled("x")
    blocks["messages"][1]["content"] = [{"type": "text", "text": "The answer is ("}]
    assert client.post("/v1/messages", json=blocks).json()["content"][0]["text"] == "C)"


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", "claude-opus-4-6", "claude-opus-4-7",
                                   "claude-opus-4-8-20261001", "claude-sonnet-5"])
def test_prefill_rejected_by_new_models(client: httpx.Client, model: str) -> None:
    r = client.post("/v1/messages", json=prefilled("The answer is (", model))
    assert error_of(r) == ("This model does not support assistant message prefill. "
                           "The conversation must end with a user message.")


@pytest.mark.parametrize("model,rejects", [
    ("claude-sonnet-4-5", False), ("claude-sonnet-4-20250514", False),
    ("claude-opus-4-1-20250805", False), ("claude-haiku-4-5", False),
    ("claude-3-5-haiku-latest", False), ("claude-sonnet-4-6", True), ("claude-opus-4-10", True),
])
def test_rejects_prefill_table(model: str, rejects: bool) -> None:
    assert _rejects_prefill(model) is rejects


def test_prefill_trailing_whitespace(client: httpx.Client) -> None:
    r = client.post("/v1/messages", json=prefilled("The answer is "))
    assert error_of(r) == "final assistant content cannot end with trailing whitespace"


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("payload,expected", [
    ({"max_tokens": 10, "messages": []}, "model: Field required"),
    ({"model": MODEL, "messages": []}, "max_tokens: Field required"),
    ({"model": MODEL, "max_tokens": 10}, "messages: Field required"),
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "assistant", "content": "hi"}]},
     'messages: first message must use the "user" role'),
    ({"model": MODEL, "max_tokens": 10, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": []},
        {"role": "user", "content": "again"}]},
     ("messages.1: all messages must have non-empty content except for the optional final "
      "assistant message")),
    # (a string tool_choice crashed the handler: the connection dropped, no answer)
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
      "tool_choice": "auto"},
     "tool_choice: Input should be an object with type auto, any, tool or none"),
])
def test_validation_errors(client: httpx.Client, payload: dict[str, Any], expected: str) -> None:
    assert error_of(client.post("/v1/messages", json=payload)) == expected


def test_same_role_messages_merge_and_empty_final_assistant_is_fine(client: httpx.Client) -> None:
    payload = {"model": MODEL, "max_tokens": 50, "messages": [
        {"role": "user", "content": "one"}, {"role": "user", "content": "Two"},
        {"role": "assistant", "content": ""}]}
    msg = client.post("/v1/messages", json=payload).json()
    assert msg["content"][0]["text"].startswith(LABEL + "You said: one Two")


def test_missing_key_is_401(standin: StandIn) -> None:
    with httpx.Client(base_url=standin.base_url) as c:
        r = c.post("/v1/messages", json=body(), headers={"anthropic-version": "2023-06-01"})
        bearer = c.post("/v1/messages", json=body(), headers={
            "anthropic-version": "2023-06-01", "authorization": "Bearer token"})
        unversioned = c.post("/v1/messages", json=body(), headers={"x-api-key": "k"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert bearer.status_code == 200
    assert error_of(unversioned) == "anthropic-version: header is required"


# -- tools -------------------------------------------------------------------------------------
def test_tool_use_single(client: httpx.Client) -> None:
    msg = client.post("/v1/messages", json=body("What's the weather in Paris?",
                                                 tools=[CLOCK, WEATHER])).json()
    assert msg["stop_reason"] == "tool_use"
    text, use = msg["content"]
    assert text["text"].startswith(LABEL)
    assert use["type"] == "tool_use" and use["name"] == "get_weather"
    assert len(use["id"]) == len("toolu_") + 24 and use["id"].startswith("toolu_")
    assert use["input"] == {"city": "Paris", "days": 1, "scale": 1.0, "metric": True,
                            "unit": "celsius", "cities": ["Paris"],
                            "where": {"country": "Paris"}}
    again = client.post("/v1/messages", json=body("What's the weather in Paris?",
                                                   tools=[CLOCK, WEATHER])).json()
    assert again["content"] == msg["content"]
    no_city = client.post("/v1/messages", json=body("weather please", tools=[WEATHER])).json()
    assert [b["input"]["city"] for b in no_city["content"][1:]] == ["example"]


def test_tool_use_parallel_and_streamed(client: httpx.Client) -> None:
    payload = body("Weather in Paris and Rome?", tools=[WEATHER])
    msg = client.post("/v1/messages", json=payload).json()
    uses = [b for b in msg["content"] if b["type"] == "tool_use"]
    assert [u["input"]["city"] for u in uses] == ["Paris", "Rome"]
    assert uses[0]["input"]["cities"] == ["Paris", "Rome"]
    assert uses[0]["id"] != uses[1]["id"]
    events = parse_sse(stream(client, payload).text)
    json_deltas = [d for n, d in events if n == "content_block_delta"
                   and d["delta"]["type"] == "input_json_delta"]
    assert len([d for d in json_deltas if d["index"] == 1]) > 2
    assert fold(events)["content"] == msg["content"]
    single = client.post("/v1/messages", json={
        **payload, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}).json()
    assert len([b for b in single["content"] if b["type"] == "tool_use"]) == 1


def test_tool_use_forced_and_none(client: httpx.Client) -> None:
    forced = client.post("/v1/messages", json=body(
        "Hello", tools=[WEATHER, CLOCK], tool_choice={"type": "tool", "name": "get_time"})).json()
    assert [b["type"] for b in forced["content"]] == ["tool_use"]
    assert forced["content"][0]["name"] == "get_time" and forced["stop_reason"] == "tool_use"
    anyone = client.post("/v1/messages", json=body(
        "Hello", tools=[WEATHER, CLOCK], tool_choice={"type": "any"})).json()
    assert anyone["content"][0]["name"] == "get_weather"
    none = client.post("/v1/messages", json=body(
        "Weather in Paris?", tools=[WEATHER], tool_choice={"type": "none"})).json()
    assert none["stop_reason"] == "end_turn" and none["content"][0]["type"] == "text"
    plain = client.post("/v1/messages", json=body("Hello", tools=[WEATHER])).json()
    assert plain["stop_reason"] == "end_turn"
    r = client.post("/v1/messages", json=body(
        "Hello", tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}))
    assert "nope" in error_of(r)


def test_tool_result_follow_up(client: httpx.Client) -> None:
    first = body("Weather in Paris and Rome?", tools=[WEATHER])
    reply = client.post("/v1/messages", json=first).json()
    ids = [b["id"] for b in reply["content"] if b["type"] == "tool_use"]
    follow = {**first, "messages": [*first["messages"],
                                    {"role": "assistant", "content": reply["content"]},
                                    {"role": "user", "content": [
                                        {"type": "tool_result", "tool_use_id": ids[0],
                                         "content": "sunny, 21C"},
                                        {"type": "tool_result", "tool_use_id": ids[1],
                                         "content": [{"type": "text", "text": "rain"}],
                                         "is_error": False}]}]}
    msg = client.post("/v1/messages", json=follow).json()
    assert msg["stop_reason"] == "end_turn"
    assert msg["content"][0]["text"] == (LABEL + "Tool results: get_weather: sunny, 21C; "
                                         "get_weather: rain")


def test_tool_pairing_violation(client: httpx.Client) -> None:
    first = body("Weather in Paris and Rome?", tools=[WEATHER])
    reply = client.post("/v1/messages", json=first).json()
    ids = [b["id"] for b in reply["content"] if b["type"] == "tool_use"]
    history = [*first["messages"], {"role": "assistant", "content": reply["content"]}]
    only_one = {**first, "messages": [*history, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": ids[0], "content": "ok"}]}]}
    message = error_of(client.post("/v1/messages", json=only_one))
    assert "tool_use ids were found without tool_result blocks immediately after: " + ids[1] \
        in message
    text_first = {**first, "messages": [*history, {"role": "user", "content": [
        {"type": "text", "text": "here"},
        *[{"type": "tool_result", "tool_use_id": i, "content": "ok"} for i in ids]]}]}
    assert "without tool_result blocks" in error_of(client.post("/v1/messages", json=text_first))
    stray = body(tools=[WEATHER])
    stray["messages"] = [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "?"}]}]
    assert "unexpected tool_use_id" in error_of(client.post("/v1/messages", json=stray))


# -- caching and counting ----------------------------------------------------------------------
def test_cache_write_then_read_in_a_growing_conversation(client: httpx.Client,
                                                          standin: StandIn) -> None:
    standin.min_cacheable_tokens = 100
    long_text = "Tell me about the history of the printing press. " * 20
    turn1: dict[str, Any] = {
        "model": MODEL, "max_tokens": 100, "cache_control": {"type": "ephemeral"},
        "system": "You are a terse assistant.",
        "messages": [{"role": "user", "content": long_text}]}
    reply = client.post("/v1/messages", json=turn1).json()
    u1 = reply["usage"]
    total1 = client.post("/v1/messages/count_tokens", json=turn1).json()["input_tokens"]
    assert total1 >= 100
    assert u1["cache_read_input_tokens"] == 0
    assert u1["cache_creation_input_tokens"] == total1
    assert u1["cache_creation"]["ephemeral_5m_input_tokens"] == total1
    assert u1["input_tokens"] == 0
    turn2 = {**turn1, "messages": [*turn1["messages"],
                                   {"role": "assistant", "content": reply["content"]},
                                   {"role": "user", "content": "And after that?"}]}
    u2 = client.post("/v1/messages", json=turn2).json()["usage"]
    total2 = client.post("/v1/messages/count_tokens", json=turn2).json()["input_tokens"]
    assert u2["cache_read_input_tokens"] == total1
    assert u2["cache_creation_input_tokens"] == total2 - total1 > 0
    assert u2["input_tokens"] + u2["cache_read_input_tokens"] + \
        u2["cache_creation_input_tokens"] == total2
    # the same request again reads everything
    u3 = client.post("/v1/messages", json=turn2).json()["usage"]
    assert u3["cache_read_input_tokens"] == total2 and u3["cache_creation_input_tokens"] == 0


def test_nothing_cached_below_the_minimum(client: httpx.Client) -> None:
    short = body("short", cache_control={"type": "ephemeral"})
    for _ in range(2):
        u = client.post("/v1/messages", json=short).json()["usage"]
        assert u["cache_read_input_tokens"] == u["cache_creation_input_tokens"] == 0
        assert u["input_tokens"] > 0


def test_cache_ttl_and_expiry(client: httpx.Client, standin: StandIn) -> None:
    now = [1000.0]
    standin.clock = lambda: now[0]
    standin.min_cacheable_tokens = 10
    system = [{"type": "text", "text": "Rules. " * 40, "cache_control": {"type": "ephemeral",
                                                                          "ttl": "1h"}}]
    payload = body("hi", system=system)
    u = client.post("/v1/messages", json=payload).json()["usage"]
    assert u["cache_creation"]["ephemeral_1h_input_tokens"] == u["cache_creation_input_tokens"] > 0
    now[0] += 1800
    assert client.post("/v1/messages", json=payload).json()["usage"]["cache_read_input_tokens"] > 0
    now[0] += 3601
    u = client.post("/v1/messages", json=payload).json()["usage"]
    assert u["cache_read_input_tokens"] == 0 and u["cache_creation_input_tokens"] > 0


def test_more_than_four_breakpoints(client: httpx.Client) -> None:
    cc = {"type": "ephemeral"}
    payload = body("x", cache_control=cc, system=[
        {"type": "text", "text": f"part {i}", "cache_control": cc} for i in range(4)])
    assert error_of(client.post("/v1/messages", json=payload)) == (
        "A maximum of 4 blocks with cache_control may be provided. Found 5.")


def test_count_tokens(client: httpx.Client) -> None:
    payload = body(tools=[WEATHER], system="Be brief.")
    counted = client.post("/v1/messages/count_tokens", json={
        k: v for k, v in payload.items() if k != "max_tokens"})
    assert counted.status_code == 200 and counted.headers["request-id"]
    usage = client.post("/v1/messages", json=payload).json()["usage"]
    assert counted.json() == {"input_tokens": usage["input_tokens"]}
    marked = client.post("/v1/messages/count_tokens", json={**payload, "cache_control": {
        "type": "ephemeral"}}).json()
    assert marked == counted.json()


# -- thinking ----------------------------------------------------------------------------------
def test_thinking_block_round_trip(client: httpx.Client) -> None:
    payload = body(thinking={"type": "enabled", "budget_tokens": 100})
    msg = client.post("/v1/messages", json=payload).json()
    assert [b["type"] for b in msg["content"]] == ["thinking", "text"]
    assert fold(parse_sse(stream(client, payload).text))["content"] == msg["content"]
    history = [*payload["messages"], {"role": "assistant", "content": msg["content"]},
               {"role": "user", "content": "more"}]
    assert client.post("/v1/messages", json={**payload, "messages": history}).status_code == 200
    tampered = json.loads(json.dumps(history))
    tampered[1]["content"][0]["thinking"] += "!"
    assert "signature" in error_of(client.post("/v1/messages",
                                               json={**payload, "messages": tampered}))


# -- faults ------------------------------------------------------------------------------------
def control(client: httpx.Client, **fault: Any) -> None:
    r = client.post("/_standin/faults", json=fault)
    assert r.status_code == 200 and r.json()["ok"] is True


@pytest.fixture(params=["python", "http"])
def inject(request: pytest.FixtureRequest, standin: StandIn, client: httpx.Client) -> Any:
    def do(kind: str, **kwargs: Any) -> None:
        if request.param == "http":
            control(client, kind=kind, **kwargs)
        else:
            method = "reset_faults" if kind == "reset" else f"{kind}_next"
            getattr(standin, method)(**kwargs)
    return do


def test_fault_fail(inject: Any, client: httpx.Client) -> None:
    inject("fail", status=529)
    inject("fail", status=429, message="slow down", headers={"retry-after": "2"}, times=2)
    r = client.post("/v1/messages", json=body())
    assert error_of(r, 529) == "Overloaded" and r.json()["error"]["type"] == "overloaded_error"
    for _ in range(2):
        r = client.post("/v1/messages", json=body())
        assert error_of(r, 429) == "slow down" and r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_error"
    assert client.post("/v1/messages", json=body()).status_code == 200


def test_fault_fail_custom_type(inject: Any, client: httpx.Client) -> None:
    inject("fail", status=400, error_type="invalid_request_error", message="prompt is too long")
    assert error_of(client.post("/v1/messages", json=body())) == "prompt is too long"


def test_fault_drop(inject: Any, client: httpx.Client) -> None:
    inject("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/messages", json=body())
    assert client.post("/v1/messages", json=body()).status_code == 200


def test_fault_cut_json(inject: Any, client: httpx.Client) -> None:
    inject("cut_json")
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/messages", json=body())
    assert client.post("/v1/messages", json=body()).status_code == 200


def test_fault_cut_stream(inject: Any, client: httpx.Client) -> None:
    inject("cut_stream", after_events=4)
    events = parse_sse(stream(client, body()).text)
    assert [n for n, _ in events] == ["message_start", "ping", "content_block_start",
                                      "content_block_delta"]
    assert parse_sse(stream(client, body()).text)[-1][0] == "message_stop"


def test_stream_faults_on_the_other_mode(inject: Any, client: httpx.Client) -> None:
    inject("cut_json")
    text = stream(client, body()).text
    assert text.startswith("event: message_start") and "message_stop" not in text
    inject("cut_stream", after_events=2)
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/messages", json=body())
    assert fold(parse_sse(stream(client, body()).text))["stop_reason"] == "end_turn"


def test_fault_error_event(inject: Any, client: httpx.Client) -> None:
    inject("error_event", error_type="overloaded_error", after_events=3)
    r = stream(client, body())
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [n for n, _ in events] == ["message_start", "ping", "content_block_start", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error",
                                                        "message": "Overloaded"}}
    inject("error_event", error_type="api_error")
    assert error_of(client.post("/v1/messages", json=body()), 500) == "Internal server error"


def test_fault_delay(inject: Any, standin: StandIn) -> None:
    inject("delay", seconds=1.0)
    with httpx.Client(base_url=standin.base_url, headers=HEADERS, timeout=0.2) as fast:
        with pytest.raises(httpx.ReadTimeout):
            fast.post("/v1/messages", json=body())
        assert fast.post("/v1/messages", json=body()).status_code == 200


def test_fault_reset_and_count_tokens_does_not_consume(inject: Any,
                                                       client: httpx.Client) -> None:
    inject("fail", status=500, times=3)
    counted = client.post("/v1/messages/count_tokens", json=body())
    assert counted.status_code == 200
    assert client.post("/v1/messages", json=body()).status_code == 500
    inject("reset")
    assert client.post("/v1/messages", json=body()).status_code == 200


def test_fault_control_rejects_unknown_kind(client: httpx.Client) -> None:
    assert client.post("/_standin/faults", json={"kind": "explode"}).status_code == 400
    assert client.post("/_standin/faults", json={"kind": "drop", "bogus": 1}).status_code == 400


# -- plumbing ----------------------------------------------------------------------------------
def test_requests_are_recorded(client: httpx.Client, standin: StandIn) -> None:
    client.post("/v1/messages", json=body(), headers={"Anthropic-Beta": "x"})
    client.post("/v1/messages/count_tokens", json=body())
    recorded = client.get("/_standin/requests").json()
    assert [r["path"] for r in recorded] == ["/v1/messages", "/v1/messages/count_tokens"]
    assert recorded[0]["headers"]["anthropic-beta"] == "x"
    assert recorded[0]["headers"]["x-api-key"] == "test-key"
    assert recorded[0]["body"] == body()
    assert standin.requests == recorded
    client.delete("/_standin/requests")
    assert standin.requests == []


def test_concurrent_clients(standin: StandIn) -> None:
    results: list[int] = []
    lock = threading.Lock()
    standin.delay_next(0.3, times=4)

    def worker(n: int) -> None:
        with httpx.Client(base_url=standin.base_url, headers=HEADERS, timeout=10) as c:
            for k in range(3):
                r = c.post("/v1/messages", json=body(f"worker {n} message {k}", stream=n % 2 == 0))
                with lock:
                    results.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 24
    assert len(standin.requests) == 24


def test_main_prints_a_banner() -> None:
    with subprocess.Popen([sys.executable, "-m", "convo.standin", "--port", "0", "--quiet"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        assert first.startswith("convo stand-in Messages API listening on http://127.0.0.1:")
        assert "NOT CLAUDE" in second
        url = first.split()[-1]
        with httpx.Client(base_url=url, headers=HEADERS) as c:
            assert c.post("/v1/messages", json=body()).status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    assert proc.returncode == 0
