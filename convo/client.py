"""The HTTP edge: the only convo module that imports httpx.

Everything that decides something lives in pure modules (``sse``, ``stream``, ``retry``,
``errors``); this one only sends bytes and translates what comes back:

- httpx exceptions become ``APITimeoutError`` / ``APIConnectionError`` in one place,
  :meth:`Client._transport_errors`, so nothing above ever sees an httpx type;
- error responses become the typed ``APIStatusError`` subclass via ``errors.api_error_for``;
- a body cut mid-JSON, or a stream that ends before ``message_stop``, is a connection error
  (retryable), never a half message.

The transport is injectable (``http_client=httpx.Client(transport=httpx.MockTransport(...))``),
so tests swap it instead of patching internals. The API key is read when the client is built,
kept private, masked in ``repr`` and scrubbed from every error message convo builds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson

from convo.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    InvalidInput,
    MissingApiKey,
    api_error_for,
)
from convo.retry import RetryPolicy, run_with_retries
from convo.sse import ServerSentEvent, SSEDecoder
from convo.stream import error_from_event

__all__ = [
    "API_VERSION",
    "COUNT_TOKENS_KEYS",
    "DEFAULT_BASE_URL",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POLICY",
    "DEFAULT_READ_TIMEOUT",
    "CallInfo",
    "Client",
    "MessageStream",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
DEFAULT_CONNECT_TIMEOUT = 5.0
# Long generations can take minutes before the last byte (or between stream events).
DEFAULT_READ_TIMEOUT = 600.0
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
# count_tokens rejects the sampling parameters (max_tokens, temperature, ...): send only these.
COUNT_TOKENS_KEYS = ("model", "messages", "system", "tools", "tool_choice", "thinking")
DEFAULT_POLICY = RetryPolicy()
# How much of a non-JSON error body (an HTML page from a proxy, say) goes into the message.
_SNIPPET_CHARS = 200


@dataclass(frozen=True)
class CallInfo:
    """What the HTTP response said about the call, apart from its body."""

    status_code: int
    request_id: str | None
    headers: dict[str, str]


def _info(response: httpx.Response) -> CallInfo:
    headers = dict(response.headers)
    return CallInfo(response.status_code, headers.get("request-id"), headers)


class MessageStream:
    """An open streaming response: ``.info``, then iterate for the decoded event dicts.

    Iteration raises the typed error for an ``error`` event, and ``APIConnectionError`` when
    the connection drops or the stream ends without ``message_stop``.
    """

    def __init__(self, client: Client, response: httpx.Response) -> None:
        self._client = client
        self._response = response
        self.info = _info(response)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        decoder = SSEDecoder()
        chunks = self._response.iter_bytes()
        with self._client._transport_errors():
            for chunk in chunks:
                for sse in decoder.feed(chunk):
                    event = self._decode(sse)
                    yield event
                    if event.get("type") == "message_stop":
                        self._drain(chunks)
                        return
        decoder.flush()
        raise APIConnectionError("the stream ended before message_stop")

    @staticmethod
    def _drain(chunks: Iterator[bytes]) -> None:
        """After message_stop the message is whole: read what is left, so the connection can be
        reused, but a connection that drops now (the body shorter than it said) changes nothing,
        and must not make a finished, billed reply a failed one."""
        try:
            for _ in chunks:
                pass
        except (httpx.HTTPError, httpx.StreamError):
            pass

    def _decode(self, sse: ServerSentEvent) -> dict[str, Any]:
        if sse.event and sse.event not in STREAM_EVENTS:
            # ping, and event types newer than convo: ignored, as the API asks, unread (their
            # data need not even be JSON).
            return {"type": sse.event}
        try:
            event = json.loads(sse.data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            if sse.event == "error":  # (the data is the message: an error all the same)
                event = {"type": "error", "error": {"type": "api_error", "message": sse.data[:500]}}
            else:
                raise APIConnectionError(f"undecodable {sse.event or 'message'} event in the stream")
        if sse.event == "error" or event.get("type") == "error":
            err = error_from_event(event, request_id=self.info.request_id)
            err.message = self._client._scrub(err.message)
            err.args = (self._client._scrub(str(err)),)
            err.body = None  # it may echo what was sent, key included
            raise err
        return event


# The stream events convo reads; any other (ping, or one newer than convo) is passed on unread.
STREAM_EVENTS = frozenset((
    "message_start", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "error",
))


def encode_body(payload: dict[str, Any]) -> bytes:
    """A request body as strict JSON bytes.

    orjson encodes a long history some fifty times faster than json (0.6 ms for 100 exchanges),
    but writes NaN and the infinities as null where json refuses them. Messages cannot hold
    either: content is checked for them before a turn is written. The rest is checked here."""
    check_settings_json(payload)
    return orjson.dumps(payload)


def check_settings_json(payload: Mapping[str, Any]) -> None:
    """Refuse a body whose settings, tools or system are not strict JSON (NaN, an infinity, a
    value JSON has no form for): InvalidInput, before anything is written or sent."""
    settings = {k: v for k, v in payload.items() if k != "messages"}
    try:
        # json refuses NaN and the infinities, orjson what it cannot encode (an integer past
        # 64 bits): the body is sent by orjson, after the user's turn is written.
        orjson.dumps(settings)  # (first: it stops at 255 levels, json at Python's limit)
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise InvalidInput(f"the request is not valid JSON: {detail}") from None


class Client:
    """A synchronous Messages API client: one attempt, or attempts with the retry policy."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        http_client: httpx.Client | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        policy: RetryPolicy = DEFAULT_POLICY,
        sleep: Callable[[float], object] = time.sleep,
        beta: list[str] | None = None,
    ) -> None:
        # A missing key is reported by the first request, not here, so that commands that never
        # call the API (listing, exporting) work without one.
        key = api_key if api_key is not None else os.environ.get("ANTHROPIC_API_KEY")
        # A key read from a file often ends in a newline (or a CR, from Windows): no key has
        # whitespace at either end, and a header carrying it would be refused, echoing it.
        self._api_key = key.strip() if key else key
        self.base_url = (
            (base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
        )
        try:
            url: httpx.URL | None = httpx.URL(self.base_url)
        except httpx.InvalidURL:
            url = None
        self._base_url_ok = url is not None and url.scheme in ("http", "https") and bool(url.host)
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.policy = policy
        self.sleep = sleep
        self.beta = list(beta or [])
        # Endpoint URLs parsed once: httpx parses a string URL on every request (a third of
        # building one). Keyed by the full text, so a base_url changed later is parsed anew.
        self._urls: dict[str, httpx.URL] = {}
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self.timeout)

    def __repr__(self) -> str:
        key = "set" if self._api_key else "missing"
        return f"Client(base_url={self.base_url!r}, api_key={key})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool if this client created it; a passed-in one is the caller's."""
        if self._owns_http:
            self._http.close()

    # -- public calls ---------------------------------------------------------------------

    def create_message_once(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], CallInfo]:
        """One POST /v1/messages attempt, no retry. Returns the message and the call's info."""
        payload = {k: v for k, v in body.items() if k != "stream"}
        with self._send(MESSAGES_PATH, payload, stream=False) as response:
            return self._json_body(response), _info(response)

    @contextmanager
    def stream_message_once(self, body: Mapping[str, Any]) -> Iterator[MessageStream]:
        """One streaming attempt, no retry. HTTP errors raise on entering; stream errors while
        iterating. The response is closed on exit, whether or not it was read to the end."""
        with self._send(MESSAGES_PATH, {**body, "stream": True}, stream=True) as response:
            yield MessageStream(self, response)

    def create_message(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST /v1/messages with retries (``self.policy``); returns the message."""
        return run_with_retries(
            lambda _attempt: self.create_message_once(body)[0], self.policy, sleep=self.sleep
        )

    def count_tokens(self, body: Mapping[str, Any]) -> int:
        """The API's input-token estimate for ``body`` (only the keys count_tokens accepts)."""
        payload = {k: body[k] for k in COUNT_TOKENS_KEYS if k in body}

        def attempt(_attempt: int) -> int:
            with self._send(COUNT_TOKENS_PATH, payload, stream=False) as response:
                result = self._json_body(response)
            tokens = result.get("input_tokens")
            if not isinstance(tokens, int):
                raise APIError("count_tokens answered without input_tokens")
            return tokens

        return run_with_retries(attempt, self.policy, sleep=self.sleep)

    # -- one request ----------------------------------------------------------------------

    def require_key(self) -> None:
        """Raise MissingApiKey (or ConfigError for a key or endpoint no request could use) now,
        so a caller can refuse before writing anything: retrying would never mend either."""
        if not self._api_key:
            raise MissingApiKey()
        if not all("!" <= c <= "~" for c in self._api_key):
            # Never the key itself, nor where in it: an error message may be logged.
            raise ConfigError(
                "ANTHROPIC_API_KEY holds a character no HTTP header can carry (a space, a "
                "control character or a non-ASCII letter): check how it was set"
            )
        if not self._base_url_ok:
            raise ConfigError(
                "the API base URL (ANTHROPIC_BASE_URL, or base_url=) is not an http:// or "
                "https:// URL with a host"
            )

    def _headers(self, api_key: str) -> dict[str, str]:
        headers = {
            "x-api-key": api_key,
            "anthropic-version": API_VERSION,
            "content-type": "application/json",
            "accept": "application/json",
        }
        if self.beta:
            headers["anthropic-beta"] = ",".join(self.beta)
        return headers

    @contextmanager
    def _send(
        self, path: str, payload: dict[str, Any], *, stream: bool
    ) -> Iterator[httpx.Response]:
        """Send one request; yield the successful response, raise the typed error otherwise."""
        self.require_key()
        assert self._api_key is not None  # (require_key has checked it)
        text = self.base_url + path
        url = self._urls.get(text)
        if url is None:
            url = self._urls[text] = httpx.URL(text)
        request = self._http.build_request(
            "POST",
            url,
            content=encode_body(payload),
            headers=self._headers(self._api_key),
            timeout=self.timeout,
        )
        with self._transport_errors():
            response = self._http.send(request, stream=stream)
        try:
            if not response.is_success:
                with self._transport_errors():
                    response.read()
                raise self._status_error(response)
            yield response
        finally:
            response.close()

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        """The one place where httpx exceptions become convo's."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise APITimeoutError(self._scrub(f"request timed out: {exc}")) from exc
        except httpx.RequestError as exc:  # connect, read, protocol, decoding errors
            detail = str(exc) or type(exc).__name__
            raise APIConnectionError(self._scrub(f"connection error: {detail}")) from exc
        except httpx.StreamError as exc:  # a response read twice or after close: a caller bug
            raise APIError(f"response stream unusable: {type(exc).__name__}") from exc

    def _json_body(self, response: httpx.Response) -> dict[str, Any]:
        """The parsed body of a 2xx response; a cut or garbled body is a connection error."""
        try:
            parsed = json.loads(response.content)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise APIConnectionError(
                f"HTTP {response.status_code} with a body that is not a JSON object"
                " (connection cut?)"
            )
        return parsed

    def _status_error(self, response: httpx.Response) -> APIStatusError:
        try:
            body: Any = json.loads(response.content)
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        error_type: str | None = None
        message: str | None = None
        if isinstance(error, dict):
            error_type = error.get("type") if isinstance(error.get("type"), str) else None
            message = str(error["message"]) if error.get("message") is not None else None
        if message is None:
            # (The key out before the cut: a cut key is no longer found.)
            snippet = self._scrub(" ".join(response.text.split()))[:_SNIPPET_CHARS]
            message = response.reason_phrase or "error"
            if snippet:
                message = f"{message}: {snippet}"
        headers = dict(response.headers)
        request_id = headers.get("request-id")
        if request_id is None and isinstance(body, dict):
            request_id = body.get("request_id")
        # Each on one line and without the key: they go into the message and the ledger.
        clean = self._one_clean_line
        return api_error_for(
            response.status_code,
            clean(error_type) if error_type is not None else None,
            clean(message),
            request_id=clean(str(request_id)) if request_id is not None else None,
            headers=headers,
            body=body,
        )

    def _one_clean_line(self, text: str) -> str:
        return self._scrub(" ".join(text.split()))

    def _scrub(self, text: str) -> str:
        """Remove the API key from text bound for an error message (proxies echo headers)."""
        if self._api_key:
            text = text.replace(self._api_key, "[api key]")
        return text
