"""A Messages API endpoint on loopback that answers each POST with the next scripted answer.

For replies the stand-in never gives (a pause_turn, a tool call cut by max_tokens) and for
transport faults at a chosen byte (a connection dropped after the last event): a real HTTP
server, so the whole path (httpx, SSE decoding, the accumulator, the ledger) runs as in use.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Answer:
    """One response: a JSON message, or (with `events`) an SSE stream. `short_by` declares that
    many more body bytes than are sent, then closes: the connection drops after the body."""

    message: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    short_by: int = 0


def message(*content: dict[str, Any], stop: str = "end_turn", input_tokens: int = 10,
            output_tokens: int = 5, n: int = 1) -> dict[str, Any]:
    return {
        "id": f"msg_scripted_{n}", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5", "content": list(content), "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def stream_of(msg: dict[str, Any], *, json_parts: dict[int, list[str]] | None = None) -> list[dict[str, Any]]:
    """The events a stream of `msg` would send; a tool_use block's input goes out as the
    `json_parts` given for its index (default: its JSON whole)."""
    shell = {**msg, "content": [], "stop_reason": None,
             "usage": {"input_tokens": msg["usage"]["input_tokens"], "output_tokens": 1}}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": shell}]
    for i, block in enumerate(msg["content"]):
        if block["type"] == "text":
            events.append({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
            events.append({"type": "content_block_delta", "index": i,
                           "delta": {"type": "text_delta", "text": block["text"]}})
        elif block["type"] == "tool_use":
            events.append({"type": "content_block_start", "index": i,
                           "content_block": {**block, "input": {}}})
            parts = (json_parts or {}).get(i, [json.dumps(block["input"])])
            events += [{"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": p}} for p in parts]
        else:
            events.append({"type": "content_block_start", "index": i, "content_block": block})
        events.append({"type": "content_block_stop", "index": i})
    events.append({"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                   "usage": {"output_tokens": msg["usage"]["output_tokens"]}})
    events.append({"type": "message_stop"})
    return events


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        owner: ScriptedAPI = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with owner.lock:
            owner.requests.append(json.loads(raw or b"{}"))
            answer = owner.answers.pop(0)
        if answer.events:
            body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in answer.events).encode()
            kind = "text/event-stream"
        else:
            body, kind = json.dumps(answer.message).encode(), "application/json"
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("request-id", f"req_scripted_{len(owner.requests)}")
        self.send_header("content-length", str(len(body) + answer.short_by))
        if answer.short_by:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if answer.short_by:
            self.close_connection = True


class ScriptedAPI:
    """`with ScriptedAPI(Answer(...), ...) as api:` then point a Client at `api.url`."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
