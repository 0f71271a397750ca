"""convo.client over httpx.MockTransport: requests sent, errors typed, retries, streaming."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import convo
from convo.client import (
    API_VERSION,
    DEFAULT_BASE_URL,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    CallInfo,
    Client,
    encode_body,
)
from convo.errors import (
    APIConflictError,
    APIConnectionError,
    APIError,
    APINotFoundError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BillingError,
    InternalServerError,
    InvalidInput,
    MissingApiKey,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
)
from convo.retry import RetryPolicy
from convo.stream import MessageAccumulator

KEY = "sk-ant-api03-SECRET-do-not-leak-0123456789"
BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Hello"}],
}
MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hi!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 3},
}

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class FakeAPI:
    """A transport handler that answers with scripted replies and records every request."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return reply(request)
        return reply

    def body(self, n: int = 0) -> dict[str, Any]:
        return json.loads(self.requests[n].content)  # type: ignore[no-any-return]


class Harness:
    def __init__(self) -> None:
        self.slept: list[float] = []
        self._clients: list[httpx.Client] = []

    def client(self, api: FakeAPI, api_key: str | None = KEY, **kwargs: Any) -> Client:
        http = httpx.Client(transport=httpx.MockTransport(api))
        self._clients.append(http)
        kwargs.setdefault("sleep", self.slept.append)
        return Client(api_key, http_client=http, **kwargs)

    def close(self) -> None:
        for http in self._clients:
            http.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def ok(body: Any = MESSAGE, **headers: str) -> httpx.Response:
    return httpx.Response(200, json=body, headers={"request-id": "req_ok", **headers})


def error(
    status: int, error_type: str = "x_error", message: str = "nope", **headers: str
) -> httpx.Response:
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": "req_body",
    }
    return httpx.Response(status, json=body, headers=headers)


def sse(*events: dict[str, Any]) -> bytes:
    return "".join(
        f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events
    ).encode()


class Chunks(httpx.SyncByteStream):
    """A response body delivered in pieces, optionally dying with ``fail`` after them."""

    def __init__(self, chunks: list[bytes], fail: Exception | None = None) -> None:
        self.chunks = chunks
        self.fail = fail
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.fail is not None:
            raise self.fail

    def close(self) -> None:
        self.closed = True


def streamed(data: bytes, *, pieces: int = 7, fail: Exception | None = None) -> httpx.Response:
    size = max(1, len(data) // pieces)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return httpx.Response(
        200,
        headers={"content-type": "text/event-stream", "request-id": "req_stream"},
        stream=Chunks(chunks, fail),
    )


EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            **MESSAGE,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "! ☕"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    },
    {"type": "message_stop"},
]
OVERLOADED_EVENT = {
    "type": "error",
    "error": {"type": "overloaded_error", "message": "Overloaded"},
}


# -- construction and requests --------------------------------------------------------------


def test_create_message_once_sends_the_documented_request(h: Harness) -> None:
    api = FakeAPI(ok())
    message, info = h.client(api).create_message_once({**BODY, "stream": True})
    assert message == MESSAGE
    assert info == CallInfo(200, "req_ok", {**info.headers})
    assert info.headers["request-id"] == "req_ok"
    request = api.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{DEFAULT_BASE_URL}/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == API_VERSION == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    assert "anthropic-beta" not in request.headers
    assert api.body() == BODY  # "stream" dropped: this call wants one JSON answer


def test_timeouts_are_the_named_defaults(h: Harness) -> None:
    api = FakeAPI(ok(), ok())
    h.client(api).create_message_once(BODY)
    assert (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT) == (5.0, 600.0)
    timeout = api.requests[0].extensions["timeout"]
    assert timeout["connect"] == 5.0 and timeout["read"] == 600.0
    h.client(api, connect_timeout=1.0, read_timeout=30.0).create_message_once(BODY)
    timeout = api.requests[1].extensions["timeout"]
    assert timeout["connect"] == 1.0 and timeout["read"] == 30.0


def test_beta_header_is_a_comma_list(h: Harness) -> None:
    api = FakeAPI(ok())
    h.client(
        api, beta=["token-efficient-tools-2025-02-19", "files-api-2025-04-14"]
    ).create_message_once(BODY)
    assert (
        api.requests[0].headers["anthropic-beta"]
        == "token-efficient-tools-2025-02-19,files-api-2025-04-14"
    )


def test_key_and_base_url_come_from_the_environment_at_construction(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://proxy.local:8080/")
    api = FakeAPI(ok())
    client = h.client(api, api_key=None)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://elsewhere")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    client.create_message_once(BODY)
    assert str(api.requests[0].url) == "http://proxy.local:8080/v1/messages"
    assert api.requests[0].headers["x-api-key"] == "sk-from-env"


def test_each_endpoint_is_requested_at_the_base_url_of_the_moment(h: Harness) -> None:
    api = FakeAPI(ok(), ok(), ok({"input_tokens": 3}))
    client = h.client(api, base_url="http://first.local")
    client.create_message_once(BODY)
    client.base_url = "http://second.local:9000"
    client.create_message_once(BODY)
    assert client.count_tokens(BODY) == 3
    assert [str(r.url) for r in api.requests] == [
        "http://first.local/v1/messages",
        "http://second.local:9000/v1/messages",
        "http://second.local:9000/v1/messages/count_tokens",
    ]


def test_explicit_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://proxy.local")
    with Client("k", "http://explicit/") as client:
        assert client.base_url == "http://explicit"
    monkeypatch.delenv("ANTHROPIC_BASE_URL")
    with Client("k") as client:
        assert client.base_url == DEFAULT_BASE_URL


def test_repr_never_shows_the_key() -> None:
    with Client(KEY) as client:
        assert KEY not in repr(client) and KEY not in str(client)
        assert "api_key=set" in repr(client)
    with Client() as client:
        assert "api_key=missing" in repr(client)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.create_message_once(BODY),
        lambda c: c.create_message(BODY),
        lambda c: c.count_tokens(BODY),
        lambda c: c.stream_message_once(BODY).__enter__(),
    ],
    ids=["create_message_once", "create_message", "count_tokens", "stream_message_once"],
)
@pytest.mark.parametrize("key", [None, ""])
def test_missing_key_raises_before_any_request(
    h: Harness, call: Callable[[Client], Any], key: str | None
) -> None:
    api = FakeAPI()
    client = h.client(api, api_key=key)  # constructing without a key is fine
    with pytest.raises(MissingApiKey):
        call(client)
    assert api.requests == []


def test_client_closes_only_what_it_created(h: Harness) -> None:
    with Client(KEY) as own:
        pass
    assert own._http.is_closed
    api = FakeAPI(ok())
    lent = h.client(api)
    lent.close()
    assert not lent._http.is_closed
    lent.create_message_once(BODY)


# -- error responses ------------------------------------------------------------------------

STATUS_CLASSES = [
    (400, "invalid_request_error", BadRequestError),
    (401, "authentication_error", AuthenticationError),
    (402, "billing_error", BillingError),
    (403, "permission_error", PermissionDeniedError),
    (404, "not_found_error", APINotFoundError),
    (409, "conflict_error", APIConflictError),
    (413, "request_too_large", RequestTooLargeError),
    (429, "rate_limit_error", RateLimitError),
    (500, "api_error", InternalServerError),
    (502, "api_error", InternalServerError),
    (504, "timeout_error", InternalServerError),
    (529, "overloaded_error", OverloadedError),
    (418, "teapot_error", APIStatusError),
]


@pytest.mark.parametrize(("status", "error_type", "cls"), STATUS_CLASSES)
def test_every_status_maps_to_its_class(
    h: Harness, status: int, error_type: str, cls: type[APIStatusError]
) -> None:
    api = FakeAPI(error(status, error_type, "Something went wrong", **{"request-id": "req_hdr"}))
    with pytest.raises(cls) as info:
        h.client(api).create_message_once(BODY)
    err = info.value
    assert type(err) is cls
    assert err.status_code == status
    assert err.error_type == error_type
    assert err.message == "Something went wrong"
    assert err.request_id == "req_hdr"
    assert err.headers["request-id"] == "req_hdr"
    assert err.body["error"]["type"] == error_type
    assert f"HTTP {status}" in str(err) and "req_hdr" in str(err)


def test_request_id_falls_back_to_the_body(h: Harness) -> None:
    with pytest.raises(BadRequestError) as info:
        h.client(FakeAPI(error(400))).create_message_once(BODY)
    assert info.value.request_id == "req_body"


def test_non_json_error_body_maps_by_status_with_a_short_message(h: Harness) -> None:
    page = "<html>\n<body>\n<h1>502 Bad Gateway</h1>\n" + "x" * 5000 + "</body></html>"
    api = FakeAPI(httpx.Response(502, text=page, headers={"content-type": "text/html"}))
    with pytest.raises(InternalServerError) as info:
        h.client(api).create_message_once(BODY)
    err = info.value
    assert err.status_code == 502 and err.body is None and err.request_id is None
    assert err.message.startswith("Bad Gateway: <html> <body> <h1>502 Bad Gateway</h1>")
    assert "\n" not in str(err) and len(err.message) < 300


def test_empty_error_body(h: Harness) -> None:
    with pytest.raises(OverloadedError) as info:
        h.client(FakeAPI(httpx.Response(529))).create_message_once(BODY)
    assert info.value.error_type == "overloaded_error"


def test_the_key_never_appears_in_error_text(h: Harness) -> None:
    echo = error(401, "authentication_error", f"invalid x-api-key: {KEY}")
    api = FakeAPI(echo, httpx.ConnectError(f"proxy refused {KEY}"))
    client = h.client(api)
    with pytest.raises(AuthenticationError) as auth:
        client.create_message_once(BODY)
    with pytest.raises(APIConnectionError) as conn:
        client.create_message_once(BODY)
    for err in (auth.value, conn.value):
        assert KEY not in str(err) and KEY not in repr(err)
    assert "[api key]" in str(auth.value)


def test_invalid_json_success_body_is_a_connection_error(h: Harness) -> None:
    cut = httpx.Response(200, content=b'{"id": "msg_01", "content": [{"type": "te')
    with pytest.raises(APIConnectionError, match="not a JSON object"):
        h.client(FakeAPI(cut)).create_message_once(BODY)
    with pytest.raises(APIConnectionError):
        h.client(FakeAPI(httpx.Response(200, json=[1, 2]))).create_message_once(BODY)


def test_body_cut_while_reading_is_a_connection_error(h: Harness) -> None:
    broken = httpx.Response(200, stream=Chunks([b'{"id":'], httpx.ReadError("reset by peer")))
    with pytest.raises(APIConnectionError, match="reset by peer"):
        h.client(FakeAPI(broken)).create_message_once(BODY)


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ConnectTimeout("connect timed out"), APITimeoutError),
        (httpx.ReadTimeout("read timed out"), APITimeoutError),
        (httpx.ConnectError("connection refused"), APIConnectionError),
        (httpx.RemoteProtocolError("server disconnected"), APIConnectionError),
        (httpx.ReadError("reset"), APIConnectionError),
    ],
)
def test_transport_errors_are_translated(h: Harness, exc: Exception, cls: type[APIError]) -> None:
    with pytest.raises(cls) as info:
        h.client(FakeAPI(exc)).create_message_once(BODY)
    assert type(info.value) is cls
    assert info.value.__cause__ is exc


# -- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        error(429, "rate_limit_error"),
        error(529, "overloaded_error"),
        error(500, "api_error"),
        error(408, "timeout_error"),
        error(409, "conflict_error"),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.Response(200, content=b'{"id": "msg'),
    ],
    ids=["429", "529", "500", "408", "409", "connect", "timeout", "cut-json"],
)
def test_create_message_retries_transient_failures(h: Harness, failure: Reply) -> None:
    api = FakeAPI(failure, ok())
    assert h.client(api).create_message(BODY) == MESSAGE
    assert len(api.requests) == 2
    assert len(h.slept) == 1 and 0.375 <= h.slept[0] <= 0.5


@pytest.mark.parametrize(
    ("status", "error_type", "cls"),
    [
        (400, "invalid_request_error", BadRequestError),
        (401, "authentication_error", AuthenticationError),
        (413, "request_too_large", RequestTooLargeError),
    ],
)
def test_client_errors_are_not_retried(
    h: Harness, status: int, error_type: str, cls: type[APIStatusError]
) -> None:
    api = FakeAPI(error(status, error_type), ok())
    with pytest.raises(cls):
        h.client(api).create_message(BODY)
    assert len(api.requests) == 1 and h.slept == []


def test_x_should_retry_true_retries_a_400(h: Harness) -> None:
    api = FakeAPI(error(400, "invalid_request_error", **{"x-should-retry": "true"}), ok())
    assert h.client(api).create_message(BODY) == MESSAGE
    assert len(api.requests) == 2


def test_x_should_retry_false_stops_a_529(h: Harness) -> None:
    api = FakeAPI(error(529, "overloaded_error", **{"x-should-retry": "false"}), ok())
    with pytest.raises(OverloadedError):
        h.client(api).create_message(BODY)
    assert len(api.requests) == 1


def test_retry_after_ms_and_retry_after_are_honoured(h: Harness) -> None:
    api = FakeAPI(
        error(429, "rate_limit_error", **{"retry-after-ms": "1250", "retry-after": "2"}),
        error(429, "rate_limit_error", **{"retry-after": "3"}),
        ok(),
    )
    assert h.client(api).create_message(BODY) == MESSAGE
    assert h.slept == [1.25, 3.0]


def test_retry_after_beyond_60_seconds_falls_back_to_backoff(h: Harness) -> None:
    api = FakeAPI(error(429, "rate_limit_error", **{"retry-after": "120"}), ok())
    h.client(api).create_message(BODY)
    assert 0.375 <= h.slept[0] <= 0.5


def test_exhaustion_reraises_the_last_error(h: Harness) -> None:
    api = FakeAPI(
        error(529, "overloaded_error"),
        error(500, "api_error"),
        error(529, "overloaded_error", "last one", **{"request-id": "req_last"}),
        ok(),
    )
    with pytest.raises(OverloadedError) as info:
        h.client(api).create_message(BODY)
    assert info.value.request_id == "req_last" and info.value.message == "last one"
    assert len(api.requests) == 3 and len(h.slept) == 2
    assert 0.375 <= h.slept[0] <= 0.5 and 0.75 <= h.slept[1] <= 1.0


def test_policy_is_configurable(h: Harness) -> None:
    api = FakeAPI(error(529), error(529), error(529), error(529), ok())
    client = h.client(api, policy=RetryPolicy(max_retries=4, initial_delay=0.1, max_delay=0.2))
    assert client.create_message(BODY) == MESSAGE
    assert len(h.slept) == 4 and all(s <= 0.2 for s in h.slept)


# -- count_tokens ---------------------------------------------------------------------------


def test_count_tokens_sends_only_the_accepted_keys(h: Harness) -> None:
    api = FakeAPI(error(529), httpx.Response(200, json={"input_tokens": 2095}))
    body = {
        **BODY,
        "system": "Be brief.",
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "temperature": 0.2,
        "stream": True,
        "metadata": {"user_id": "u"},
    }
    assert h.client(api).count_tokens(body) == 2095
    assert str(api.requests[1].url) == f"{DEFAULT_BASE_URL}/v1/messages/count_tokens"
    sent = api.body(1)
    assert set(sent) == {"model", "messages", "system", "tools", "tool_choice", "thinking"}
    assert api.requests[1].headers["x-api-key"] == KEY
    assert len(h.slept) == 1


def test_count_tokens_without_a_count_is_an_api_error(h: Harness) -> None:
    with pytest.raises(APIError, match="input_tokens"):
        h.client(FakeAPI(httpx.Response(200, json={}))).count_tokens(BODY)


# -- streaming ------------------------------------------------------------------------------


def test_stream_happy_path(h: Harness) -> None:
    api = FakeAPI(streamed(sse(*EVENTS), pieces=13))
    with h.client(api).stream_message_once(BODY) as stream:
        assert stream.info.status_code == 200 and stream.info.request_id == "req_stream"
        events = list(stream)
    assert events == EVENTS
    assert api.body() == {**BODY, "stream": True}
    acc = MessageAccumulator()
    printed = [t for t in map(acc.feed, events) if t]
    assert printed == ["Hi", "! ☕"]
    assert acc.complete
    assert acc.message == {**MESSAGE, "content": [{"type": "text", "text": "Hi! ☕"}]}


def test_stream_one_byte_chunks(h: Harness) -> None:
    data = sse(*EVENTS).replace(b"\n", b"\r\n")
    api = FakeAPI(streamed(data, pieces=len(data)))
    with h.client(api).stream_message_once(BODY) as stream:
        assert list(stream) == EVENTS


def test_stream_http_error_is_raised_on_entering(h: Harness) -> None:
    api = FakeAPI(error(529, "overloaded_error", **{"request-id": "req_529"}))
    with pytest.raises(OverloadedError) as info, h.client(api).stream_message_once(BODY):
        pytest.fail("the block must not run")
    assert info.value.status_code == 529 and info.value.request_id == "req_529"


def test_stream_connect_error_is_raised_on_entering(h: Harness) -> None:
    with (
        pytest.raises(APIConnectionError),
        h.client(FakeAPI(httpx.ConnectError("refused"))).stream_message_once(BODY),
    ):
        pytest.fail("the block must not run")


def test_mid_stream_error_event_raises_the_typed_error(h: Harness) -> None:
    api = FakeAPI(streamed(sse(*EVENTS[:4], OVERLOADED_EVENT)))
    seen: list[dict[str, Any]] = []
    with pytest.raises(OverloadedError) as info, h.client(api).stream_message_once(BODY) as stream:
        for event in stream:
            seen.append(event)
    assert seen == EVENTS[:4]
    err = info.value
    assert err.status_code is None and err.error_type == "overloaded_error"
    assert err.request_id == "req_stream"
    assert "stream overloaded_error: Overloaded" in str(err)


def test_cut_stream_raises_a_connection_error(h: Harness) -> None:
    data = sse(*EVENTS)
    cut = streamed(
        data[: len(data) // 2], fail=httpx.RemoteProtocolError("incomplete chunked read")
    )
    seen: list[dict[str, Any]] = []
    client = h.client(FakeAPI(cut))
    with (
        pytest.raises(APIConnectionError, match="incomplete chunked read"),
        client.stream_message_once(BODY) as stream,
    ):
        seen.extend(stream)
    assert 0 < len(seen) < len(EVENTS)


def test_stream_ending_before_message_stop_is_a_connection_error(h: Harness) -> None:
    api = FakeAPI(streamed(sse(*EVENTS[:-1])))
    with (
        pytest.raises(APIConnectionError, match="message_stop"),
        h.client(api).stream_message_once(BODY) as stream,
    ):
        list(stream)


def test_undecodable_stream_event_is_a_connection_error(h: Harness) -> None:
    api = FakeAPI(streamed(b"event: message_start\ndata: {not json\n\n"))
    with (
        pytest.raises(APIConnectionError, match="undecodable message_start"),
        h.client(api).stream_message_once(BODY) as stream,
    ):
        list(stream)


def test_ping_and_unknown_events_are_passed_on_unread(h: Harness) -> None:
    """The API asks clients to ignore event types they do not know; convo parsed their data
    first, so one that was not JSON (or an empty ping) failed the stream, and was retried."""
    data = sse(*EVENTS[:2]) + b"event: ping\ndata:\n\nevent: future_thing\ndata: not json\n\n" + sse(*EVENTS[2:])
    with h.client(FakeAPI(streamed(data))).stream_message_once(BODY) as stream:
        seen = list(stream)
    assert seen == [*EVENTS[:2], {"type": "ping"}, {"type": "future_thing"}, *EVENTS[2:]]


def test_an_error_event_whose_data_is_not_json_is_still_a_typed_error(h: Harness) -> None:
    api = FakeAPI(streamed(sse(*EVENTS[:2]) + b"event: error\ndata: upstream went away\n\n"))
    with (
        pytest.raises(APIStatusError, match="upstream went away") as info,
        h.client(api).stream_message_once(BODY) as stream,
    ):
        list(stream)
    assert info.value.error_type == "api_error" and info.value.status_code is None


def test_stream_is_closed_on_exit_even_when_abandoned(h: Harness) -> None:
    response = streamed(sse(*EVENTS))
    body = response.stream
    assert isinstance(body, Chunks)
    with h.client(FakeAPI(response)).stream_message_once(BODY) as stream:
        next(iter(stream))
    assert body.closed


# -- the httpx boundary ---------------------------------------------------------------------


def test_only_the_client_module_imports_httpx() -> None:
    package = pathlib.Path(convo.__file__).parent
    importers = sorted(
        path.name
        for path in package.rglob("*.py")
        if "import httpx" in path.read_text(encoding="utf-8")
        or "from httpx" in path.read_text(encoding="utf-8")
    )
    assert importers == ["client.py"]


def test_a_body_is_encoded_as_the_json_it_was_with_its_settings_held_to_strict_json() -> None:
    history = [
        {"role": "user", "content": [{"type": "text", "text": "café ☕ \u2028 \"quoted\" \\ \u0000"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"n": 1.5, "big": 2**62}}]},
    ]
    body = {"model": "m", "max_tokens": 8, "temperature": 0.25, "messages": history}
    sent = encode_body(body)
    assert json.loads(sent) == body
    assert "café ☕".encode() in sent  # UTF-8, not \u escapes
    for bad in (float("nan"), float("inf"), {1, 2}):
        with pytest.raises(InvalidInput, match="not valid JSON"):
            encode_body({**body, "metadata": {"user_id": bad}})


def test_a_key_echoed_across_the_snippet_cut_is_scrubbed_whole(h: Harness) -> None:
    """A proxy's HTML error page echoing the key where the message is cut to 200 characters:
    the key is taken out before the cut, or the cut piece would no longer match it."""
    body = "y" * 174 + " x-api-key: " + KEY + " and more"
    api = FakeAPI(httpx.Response(400, text=body, headers={"content-type": "text/html"}))
    with pytest.raises(APIStatusError) as info:
        h.client(api).create_message_once(BODY)
    text = str(info.value)
    assert KEY[:10] not in text and "[api key]" in text
