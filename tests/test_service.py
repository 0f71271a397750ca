"""convo.service: send, stream and retry against the stand-in over real HTTP, on both engines.

Every test talks to a real loopback `StandIn` and checks three things independently: what was
sent (`standin.requests`), what was stored (turns, branch heads) and what the calls ledger says.
Retries never really wait: the store and the client share a fake sleep that records delays.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest
from helpers.kit import posts

from convo import (
    APIConnectionError,
    APIStatusError,
    HistoryError,
    InvalidInput,
    MissingApiKey,
    PrefillNotSupported,
    Reply,
    Store,
)
from convo.client import Client
from convo.errors import (
    BadRequestError,
    InternalServerError,
    OverloadedError,
)
from convo.pricing import PriceTable
from convo.service import RetryNotice
from convo.standin import LABEL, MODEL_SUFFIX, StandIn
from convo.types import Usage

KEY = "sk-test-standin-key"
HAIKU_35 = "claude-3-5-haiku-20241022"
SONNET_46 = "claude-sonnet-4-6"


# -- fixtures ------------------------------------------------------------------------------


def last_body(standin: StandIn) -> dict[str, Any]:
    return posts(standin)[-1]["body"]


def _id(reply: Reply) -> str:
    assert reply.turn_id is not None
    return reply.turn_id


def texts(blocks: list[dict[str, Any]]) -> list[str]:
    return [b["text"] for b in blocks if b.get("type") == "text"]


# -- send ----------------------------------------------------------------------------------


def test_send_stores_reply_as_child_of_user_turn_and_moves_head(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    reply = conv.send("Hello there, how are you?")

    turns = conv.turns()
    assert [(t.role, t.kind) for t in turns] == [("user", "user"), ("assistant", "reply")]
    user, answer = turns
    assert user.content == [{"type": "text", "text": "Hello there, how are you?"}]
    assert answer.id == reply.turn_id
    assert store.storage.turn(_id(reply)).parent_id == user.id
    assert store.storage.branch(conv.id, "main").head_id == reply.turn_id
    assert conv.info.turn_count == 2

    body = last_body(standin)
    assert body["model"] == "claude-sonnet-4-5"
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello there, how are you?"}]}
    ]
    assert len(posts(standin)) == 1


def test_send_reply_fields_and_ledger_row(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5", system="You are terse. " * 400)
    reply = conv.send("Hello there")

    assert isinstance(reply, Reply)
    assert reply.model == "claude-sonnet-4-5" + MODEL_SUFFIX
    assert reply.text.startswith(LABEL + "You said: Hello there")
    assert reply.text == "".join(texts(reply.content))
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert reply.message_id and reply.message_id.startswith("msg_standin_")
    assert reply.request_id and reply.request_id.startswith("req_standin_")
    # a ~1,500-token system prompt is above the cache minimum: the whole prompt is written.
    u = reply.usage
    assert u.cache_creation_input_tokens > 1024
    assert u.cache_creation_5m_input_tokens == u.cache_creation_input_tokens
    assert u.cache_read_input_tokens == 0
    assert u.output_tokens == -(-len(reply.text) // 4)

    (call,) = conv.calls()
    assert call["id"] == reply.call_id
    assert call["status"] == "ok"
    assert call["http_status"] == 200
    assert call["attempt"] == 0 and call["streamed"] == 0
    assert call["request_id"] == reply.request_id
    assert call["message_id"] == reply.message_id
    assert call["stop_reason"] == "end_turn"
    assert call["reply_id"] == reply.turn_id
    assert call["turn_id"] == conv.turns()[0].id
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens", "cache_creation_5m_input_tokens",
                "cache_creation_1h_input_tokens"):
        assert call[key] == getattr(u, key), key
    expected = PriceTable.default().cost("claude-sonnet-4-5", u)
    assert expected is not None and expected > 0
    assert call["cost_usd"] == pytest.approx(expected)
    assert reply.cost_usd == pytest.approx(expected)
    assert call["duration_ms"] is not None and call["duration_ms"] >= 0


def test_next_request_replays_the_whole_history(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5", system="Be brief.")
    first = conv.send("First question")
    second = conv.send("Second question")
    conv.send("Third question")

    body = last_body(standin)
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "First question"}]},
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "text", "text": "Second question"}]},
        {"role": "assistant", "content": second.content},
        {"role": "user", "content": [{"type": "text", "text": "Third question"}]},
    ]
    # replay is byte-stable: the earlier requests are prefixes of the later ones
    bodies = [r["body"] for r in posts(standin)]
    assert bodies[1]["messages"][:1] == bodies[0]["messages"]
    assert bodies[2]["messages"][:3] == bodies[1]["messages"]
    assert conv.info.turn_count == 6


def test_user_turn_is_committed_before_the_request(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(400, message="stand-in says no")
    with pytest.raises(BadRequestError):
        conv.send("Kept even though the call failed")
    turns = conv.turns()
    assert [(t.role, t.kind) for t in turns] == [("user", "user")]
    assert turns[0].content == [{"type": "text", "text": "Kept even though the call failed"}]
    assert store.storage.branch(conv.id, "main").head_id == turns[0].id
    # the request that failed did carry that turn
    assert last_body(standin)["messages"][-1]["content"][0]["text"] == "Kept even though the call failed"
    (call,) = conv.calls()
    assert call["status"] == "error" and call["http_status"] == 400
    assert call["turn_id"] == turns[0].id and call["reply_id"] is None
    assert call["request_id"] and call["request_id"].startswith("req_standin_")


# -- prefill -------------------------------------------------------------------------------


def test_prefill_is_continued_stored_and_replayed_as_one_text_block(store: Store, standin: StandIn) -> None:
    conv = store.create(HAIKU_35)
    reply = conv.send("Pick A, B or C.", prefill="The answer is (", max_tokens=5)

    assert reply.text == "The answer is (C)"
    assert texts(reply.content) == ["C)"]
    body = last_body(standin)
    assert body["max_tokens"] == 5
    assert body["messages"][-1] == {
        "role": "assistant", "content": [{"type": "text", "text": "The answer is ("}]
    }
    turns = conv.turns()
    assert [(t.role, t.kind) for t in turns] == [
        ("user", "user"), ("assistant", "prefill"), ("assistant", "reply")
    ]
    assert store.storage.turn(_id(reply)).parent_id == turns[1].id

    conv.send("Why C?")
    messages = last_body(standin)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [{"type": "text", "text": "The answer is (C)"}]


def test_failed_prefill_send_is_completed_by_retry(store: Store, standin: StandIn) -> None:
    conv = store.create(HAIKU_35)
    standin.fail_next(400)
    with pytest.raises(BadRequestError):
        conv.send("Pick A, B or C.", prefill="The answer is (", max_tokens=5)
    assert [t.kind for t in conv.turns()] == ["user", "prefill"]
    failed = last_body(standin)
    reply = conv.retry(max_tokens=5)
    assert last_body(standin) == failed
    assert reply.text == "The answer is (C)"
    assert [t.kind for t in conv.turns()] == ["user", "prefill", "reply"]


def test_prefill_refused_before_any_request_on_models_that_reject_it(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET_46)
    conv.send("Hello")
    before_requests = len(standin.requests)
    before_turns = conv.info.turn_count
    before_calls = len(conv.calls())
    with pytest.raises(PrefillNotSupported):
        conv.send("Pick A, B or C.", prefill="The answer is (")
    assert len(standin.requests) == before_requests
    assert conv.info.turn_count == before_turns
    assert len(conv.calls()) == before_calls
    # the branch is still usable
    conv.send("Pick A, B or C.")
    assert last_body(standin)["messages"][-1]["role"] == "user"


def test_trailing_whitespace_prefill_refused_before_any_request(store: Store, standin: StandIn) -> None:
    conv = store.create(HAIKU_35)
    with pytest.raises(HistoryError, match="whitespace"):
        conv.send("Pick A, B or C.", prefill="The answer is ( ")
    assert standin.requests == []
    assert conv.info.turn_count == 0
    assert conv.turns() == []
    assert conv.calls() == []


# -- stream --------------------------------------------------------------------------------


def test_stream_chunks_join_to_stored_reply(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    rs = conv.stream("Tell me something, please")
    chunks: list[str] = []
    for chunk in rs:
        # nothing is stored until the stream has ended
        if not chunks:
            assert [t.role for t in conv.turns()] == ["user"]
        chunks.append(chunk)
    reply = rs.reply
    assert reply is not None
    assert len(chunks) > 1
    assert "".join(chunks) == reply.text
    assert reply.text.startswith(LABEL)
    assert last_body(standin)["stream"] is True

    turns = conv.turns()
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[-1].id == reply.turn_id
    assert turns[-1].content == reply.content
    (call,) = conv.calls()
    assert call["status"] == "ok" and call["streamed"] == 1 and call["http_status"] == 200
    assert call["request_id"] == reply.request_id and call["message_id"] == reply.message_id


def test_stream_usage_and_max_tokens_stop_reason(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5", system="Long system prompt. " * 300)
    reply = conv.stream("Tell me a long story", max_tokens=3).until_done()
    # 3 tokens -> at most 12 characters
    assert reply.text == LABEL[:12]
    assert reply.stop_reason == "max_tokens"
    # message_start carries the input usage (with the 5m/1h split), message_delta the output
    u = reply.usage
    assert u.output_tokens == 3
    assert u.cache_creation_input_tokens > 1024
    assert u.cache_creation_5m_input_tokens == u.cache_creation_input_tokens
    assert u.cache_creation_1h_input_tokens == 0
    (call,) = conv.calls()
    assert call["stop_reason"] == "max_tokens"
    assert call["output_tokens"] == 3
    assert call["cache_creation_input_tokens"] == u.cache_creation_input_tokens
    assert conv.turns()[-1].stop_reason == "max_tokens"
    # the same request without streaming reports the same usage, apart from the cache state
    again = conv.send("And another", max_tokens=3)
    assert again.stop_reason == "max_tokens"
    assert again.usage.cache_read_input_tokens >= u.cache_creation_input_tokens


def test_abandoned_stream_is_recorded_and_releases_the_branch(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    rs = conv.stream("Tell me something, please")
    it = iter(rs)
    next(it)
    rs.close()
    assert rs.reply is None
    assert [t.role for t in conv.turns()] == ["user"]
    (call,) = conv.calls()
    assert call["status"] == "cancelled"
    assert call["partial_text"]
    # the lease is released: a retry on the same branch goes through at once
    reply = conv.retry()
    assert [t.role for t in conv.turns()] == ["user", "assistant"]
    assert conv.turns()[-1].id == reply.turn_id


# -- failures and retries ------------------------------------------------------------------


def test_retries_exhausted_then_retry_completes_without_duplicates(
    store: Store, standin: StandIn, sleeps: list[float]
) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(500, times=3)
    with pytest.raises(APIStatusError) as info:
        conv.send("Will this work?")
    assert isinstance(info.value, InternalServerError)
    assert info.value.status_code == 500

    calls = conv.calls()
    assert [c["attempt"] for c in calls] == [0, 1, 2]
    assert [c["status"] for c in calls] == ["error"] * 3
    assert [c["http_status"] for c in calls] == [500] * 3
    assert all(c["request_id"] and c["request_id"].startswith("req_standin_") for c in calls)
    assert len({c["request_id"] for c in calls}) == 3
    assert all(c["reply_id"] is None for c in calls)
    assert len(sleeps) == 2
    turns = conv.turns()
    assert [(t.role, t.kind) for t in turns] == [("user", "user")]
    assert conv.info.turn_count == 1
    failed_bodies = [r["body"] for r in posts(standin)]
    assert len(failed_bodies) == 3
    assert failed_bodies[0] == failed_bodies[1] == failed_bodies[2]

    reply = conv.retry()
    turns = conv.turns()
    assert [(t.role, t.kind) for t in turns] == [("user", "user"), ("assistant", "reply")]
    assert turns[0].content == [{"type": "text", "text": "Will this work?"}]
    assert turns[1].id == reply.turn_id
    assert conv.info.turn_count == 2
    assert last_body(standin) == failed_bodies[0]
    calls = conv.calls()
    assert len(calls) == 4
    assert calls[-1]["status"] == "ok" and calls[-1]["attempt"] == 0
    assert calls[-1]["turn_id"] == turns[0].id


def test_retry_when_head_already_answered_is_invalid(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    conv.send("Hello")
    n = len(standin.requests)
    with pytest.raises(InvalidInput):
        conv.retry()
    assert len(standin.requests) == n
    assert conv.info.turn_count == 2
    assert len(conv.calls()) == 1


def test_retry_on_empty_conversation_is_invalid(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    with pytest.raises(InvalidInput):
        conv.retry()
    assert standin.requests == []


def test_send_on_unanswered_head_sends_both_user_turns_as_one_message(
    store: Store, standin: StandIn
) -> None:
    """Decision (service.py docstring): after a failed send, `send(text)` keeps the unanswered
    turn and sends both user turns together; the API would merge them anyway."""
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(400)
    with pytest.raises(BadRequestError):
        conv.send("First attempt")
    reply = conv.send("Second thought")

    body = last_body(standin)
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "First attempt"},
            {"type": "text", "text": "Second thought"},
        ]}
    ]
    turns = conv.turns()
    assert [(t.role, t.kind) for t in turns] == [
        ("user", "user"), ("user", "user"), ("assistant", "reply")
    ]
    assert store.storage.turn(_id(reply)).parent_id == turns[1].id


def test_400_is_not_retried(store: Store, standin: StandIn, sleeps: list[float]) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(400, times=3)
    with pytest.raises(BadRequestError):
        conv.send("Hello")
    assert len(posts(standin)) == 1
    (call,) = conv.calls()
    assert call["status"] == "error" and call["http_status"] == 400
    assert call["error_type"] == "invalid_request_error"
    assert sleeps == []
    standin.reset_faults()


def test_429_retry_after_is_honoured(store: Store, standin: StandIn, sleeps: list[float]) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(429, headers={"retry-after": "2"})
    reply = conv.send("Hello")
    assert sleeps == [2.0]
    assert len(posts(standin)) == 2
    calls = conv.calls()
    assert [(c["attempt"], c["status"], c["http_status"]) for c in calls] == [
        (0, "error", 429), (1, "ok", 200)
    ]
    assert calls[0]["error_type"] == "rate_limit_error"
    assert calls[1]["reply_id"] == reply.turn_id
    assert [t.role for t in conv.turns()] == ["user", "assistant"]


def test_retry_after_ms_wins(store: Store, standin: StandIn, sleeps: list[float]) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(529, headers={"retry-after-ms": "1500", "retry-after": "9"})
    conv.send("Hello")
    assert sleeps == [1.5]


def test_x_should_retry_false_stops_retries(store: Store, standin: StandIn, sleeps: list[float]) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(529, times=3, headers={"x-should-retry": "false"})
    with pytest.raises(OverloadedError):
        conv.send("Hello")
    assert len(posts(standin)) == 1
    assert len(conv.calls()) == 1
    assert sleeps == []
    standin.reset_faults()


def test_x_should_retry_true_retries_a_400(store: Store, standin: StandIn, sleeps: list[float]) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(400, headers={"x-should-retry": "true"})
    conv.send("Hello")
    assert [c["status"] for c in conv.calls()] == ["error", "ok"]
    assert len(sleeps) == 1


def test_dropped_connection_is_retried(store: Store, standin: StandIn, sleeps: list[float]) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.drop_next()
    reply = conv.send("Hello")
    calls = conv.calls()
    assert [(c["attempt"], c["status"]) for c in calls] == [(0, "error"), (1, "ok")]
    assert calls[0]["http_status"] is None
    assert calls[0]["error_type"] == "APIConnectionError"
    assert calls[0]["input_tokens"] == 0 and calls[0]["output_tokens"] == 0
    assert len(sleeps) == 1
    assert [t.role for t in conv.turns()] == ["user", "assistant"]
    assert conv.turns()[-1].id == reply.turn_id


def test_dropped_connection_exhausts_retries(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.drop_next(times=3)
    with pytest.raises(APIConnectionError):
        conv.send("Hello")
    assert len(conv.calls()) == 3
    assert [t.role for t in conv.turns()] == ["user"]


def test_cut_json_body_is_retried(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.cut_json_next()
    conv.send("Hello")
    calls = conv.calls()
    assert [c["status"] for c in calls] == ["error", "ok"]
    assert calls[0]["http_status"] == 200 or calls[0]["http_status"] is None
    assert len(conv.turns()) == 2


def test_cut_stream_is_retried_and_stored_once(store: Store, standin: StandIn, sleeps: list[float]) -> None:
    conv = store.create("claude-sonnet-4-5", system="Long system prompt. " * 300)
    # message_start, ping, content_block_start, two text deltas, then the connection closes
    standin.cut_stream_next(after_events=5)
    notices: list[RetryNotice] = []
    rs = conv.stream("Tell me something, please", on_retry=notices.append)
    chunks = list(rs)
    reply = rs.reply
    assert reply is not None
    assert len(notices) == 1 and notices[0].attempt == 1
    assert isinstance(notices[0].error, APIConnectionError)
    # the cut attempt's chunks came first; after them, the whole reply again
    assert "".join(chunks).endswith(reply.text)
    assert "".join(chunks) == reply.text[:24] + reply.text

    turns = conv.turns()
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[-1].id == reply.turn_id
    cut, ok = conv.calls()
    assert cut["status"] == "cut" and cut["attempt"] == 0 and cut["streamed"] == 1
    assert cut["http_status"] == 200
    assert cut["partial_text"] == reply.text[:24]
    assert cut["reply_id"] is None
    # the cut attempt was billed its input (and the output it started)
    total_in = (cut["input_tokens"] + cut["cache_creation_input_tokens"]
                + cut["cache_read_input_tokens"])
    assert total_in > 1024
    assert cut["output_tokens"] >= 1
    assert cut["cost_usd"] is not None and cut["cost_usd"] > 0
    assert ok["status"] == "ok" and ok["attempt"] == 1 and ok["reply_id"] == reply.turn_id
    assert len(sleeps) == 1


def test_error_event_mid_stream_is_retried_like_529(
    store: Store, standin: StandIn, sleeps: list[float]
) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.error_event_next("overloaded_error", after_events=4)
    reply = conv.stream("Tell me something, please").until_done()
    first, second = conv.calls()
    assert first["status"] == "cut"
    assert first["error_type"] == "overloaded_error"
    assert first["partial_text"] == reply.text[:12]
    assert second["status"] == "ok" and second["reply_id"] == reply.turn_id
    assert len(sleeps) == 1
    assert [t.role for t in conv.turns()] == ["user", "assistant"]


def test_cut_stream_with_retries_exhausted_appends_nothing(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.cut_stream_next(after_events=5, times=3)
    rs = conv.stream("Tell me something, please")
    with pytest.raises(APIConnectionError):
        list(rs)
    assert rs.reply is None
    assert [t.role for t in conv.turns()] == ["user"]
    calls = conv.calls()
    assert [c["status"] for c in calls] == ["cut"] * 3
    assert [c["attempt"] for c in calls] == [0, 1, 2]
    for c in calls:
        assert c["partial_text"]
        assert c["input_tokens"] + c["cache_creation_input_tokens"] + c["cache_read_input_tokens"] > 0
        assert c["output_tokens"] >= 1
        assert c["reply_id"] is None
    # the branch is free again, and retry(stream=True) completes it
    reply = conv.retry(stream=True).until_done()
    assert [t.role for t in conv.turns()] == ["user", "assistant"]
    assert conv.calls()[-1]["reply_id"] == reply.turn_id


def test_streamed_400_raises_on_first_iteration(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(400)
    rs = conv.stream("Hello")
    with pytest.raises(BadRequestError):
        list(rs)
    (call,) = conv.calls()
    assert call["status"] == "error" and call["http_status"] == 400 and call["streamed"] == 1


# -- configuration -------------------------------------------------------------------------


def test_missing_api_key_writes_nothing(db_url: str, standin: StandIn) -> None:
    """errors.py: MissingApiKey is an InvalidInput ("bad input; nothing was written") and
    service.py step 1: "a refused request writes nothing". A send without a key is refused
    before any request: no user turn, no call row."""
    with Client(base_url=standin.base_url, sleep=lambda s: None) as client, \
            Store(db_url, client=client, sleep=lambda s: None) as store:
        conv = store.create("claude-sonnet-4-5")
        with pytest.raises(MissingApiKey):
            conv.send("Hello")
        assert standin.requests == []
        assert conv.info.turn_count == 0
        assert conv.turns() == []
        assert conv.calls() == []


def test_missing_api_key_is_not_retried(db_url: str, standin: StandIn) -> None:
    slept: list[float] = []
    with Client(base_url=standin.base_url, sleep=slept.append) as client, \
            Store(db_url, client=client, sleep=slept.append) as store:
        conv = store.create("claude-sonnet-4-5")
        with pytest.raises(MissingApiKey):
            conv.send("Hello")
        assert slept == []
        assert standin.requests == []


def test_base_url_and_key_from_environment(
    db_url: str, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", standin.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    with Store(db_url, sleep=lambda s: None) as store:
        conv = store.create("claude-sonnet-4-5")
        reply = conv.send("Hello via the environment")
        assert store.client.base_url == standin.base_url
    (req,) = posts(standin)
    assert req["headers"]["x-api-key"] == "sk-from-env"
    assert req["headers"]["anthropic-version"] == "2023-06-01"
    assert reply.text.startswith(LABEL)


def test_empty_reply_appends_no_turn_but_records_the_call(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    # every stand-in reply starts with LABEL: stopping on it leaves no content at all
    reply = conv.send("Hello", stop_sequences=["[stand-in"])
    assert reply.content == [] and reply.text == ""
    assert reply.turn_id is None
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "[stand-in"
    turns = conv.turns()
    assert [t.role for t in turns] == ["user"]
    assert store.storage.branch(conv.id, "main").head_id == turns[0].id
    (call,) = conv.calls()
    assert call["status"] == "ok" and call["reply_id"] is None
    assert call["stop_reason"] == "stop_sequence" and call["stop_sequence"] == "[stand-in"
    assert call["output_tokens"] == reply.usage.output_tokens
    # the branch was released and can be retried; without the stop sequence a reply comes
    again = conv.retry()
    assert again.turn_id is not None
    assert [t.role for t in conv.turns()] == ["user", "assistant"]


def test_overrides_apply_to_one_request_only(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5", max_tokens=300, temperature=0.5)
    conv.send("One", max_tokens=7, temperature=None)
    body = last_body(standin)
    assert body["max_tokens"] == 7 and "temperature" not in body
    conv.send("Two")
    body = last_body(standin)
    assert body["max_tokens"] == 300 and body["temperature"] == 0.5
    # an override of the model is recorded in the ledger under the model actually used
    conv.send("Three", model="claude-haiku-4-5")
    assert last_body(standin)["model"] == "claude-haiku-4-5"
    assert [c["model"] for c in conv.calls()] == [
        "claude-sonnet-4-5", "claude-sonnet-4-5", "claude-haiku-4-5"
    ]


def test_request_preview_matches_what_send_posts(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5", system="Be brief.")
    conv.send("Hello")
    preview = conv.request("And then?")
    assert conv.info.turn_count == 2  # request() writes nothing
    conv.send("And then?")
    assert last_body(standin) == preview


def test_usage_type_from_reply_roundtrip(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-sonnet-4-5")
    reply = conv.send("Hello")
    assert isinstance(reply.usage, Usage)
    assert reply.usage.total_input_tokens == (
        reply.usage.input_tokens + reply.usage.cache_creation_input_tokens
        + reply.usage.cache_read_input_tokens
    )


def test_a_reply_the_database_cannot_store_keeps_its_usage_and_frees_the_branch(
    store: Store, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convo.errors import StoreError
    from convo.store import Storage

    conv = store.create("claude-sonnet-4-5")

    def fail(*_a: Any, **_k: Any) -> str:
        raise StoreError("database is locked")

    monkeypatch.setattr(Storage, "finish_with_reply", fail)
    with pytest.raises(StoreError):
        conv.send("Hello")
    (call,) = conv.calls()
    assert call["status"] == "error" and call["error_type"] == "reply_not_stored"
    assert call["output_tokens"] > 0 and call["input_tokens"] + call["cache_creation_input_tokens"] > 0
    assert call["partial_text"]
    monkeypatch.undo()
    assert all(b.lease_owner is None for b in conv.branches())
    reply = conv.retry()  # the branch is free at once, and the turn is answered
    assert [t.role for t in conv.turns()] == ["user", "assistant"]
    assert reply.turn_id == conv.turns()[-1].id


def test_regenerate_refused_before_the_request_leaves_no_branch(
    db_url: str, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convo import BudgetExceeded, MissingApiKey

    with Client(KEY, standin.base_url) as good:
        s = Store(db_url, client=good)
        conv = s.create("claude-sonnet-4-5")
        conv.send("Hello")
        s.close()
    with Client(None, standin.base_url) as keyless:
        s = Store(db_url, client=keyless)
        conv = s.get(conv.id)
        before = [b.name for b in conv.branches()]
        with pytest.raises(MissingApiKey):
            conv.regenerate()
        assert [b.name for b in conv.branches()] == before and conv.branch == "main"
        s.close()
    with Client(KEY, standin.base_url) as good:
        s = Store(db_url, client=good)
        conv = s.get(conv.id)
        conv.set_limits(max_input_tokens=1)
        with pytest.raises(BudgetExceeded):
            conv.regenerate()
        assert [b.name for b in conv.branches()] == before and conv.branch == "main"
        s.close()


def test_a_lease_is_renewed_by_its_holder_only(store: Store) -> None:
    from datetime import datetime, timedelta

    conv = store.create("claude-sonnet-4-5")
    storage = store.storage
    storage.append(conv.id, "main", None, [], owner="me", hold=timedelta(seconds=1))
    storage.renew_lease(conv.id, "main", "someone else", timedelta(hours=1))
    (b,) = conv.branches()
    assert b.lease_expires is not None
    assert b.lease_expires < datetime.now(UTC) + timedelta(minutes=1)
    storage.renew_lease(conv.id, "main", "me", timedelta(hours=1))
    (b,) = conv.branches()
    assert b.lease_expires > datetime.now(UTC) + timedelta(minutes=59)


def test_a_plain_send_reports_its_automatic_retries(
    store: Store, standin: StandIn, sleeps: list[float]
) -> None:
    conv = store.create("claude-sonnet-4-5")
    standin.fail_next(529, times=2)
    notices: list[RetryNotice] = []
    reply = conv.send("Hello", on_retry=notices.append)
    assert [n.attempt for n in notices] == [1, 2]
    assert all(n.error.status_code == 529 for n in notices)
    assert [n.delay for n in notices] == sleeps
    assert reply.turn_id == conv.turns()[-1].id
