"""A Messages API endpoint that stalls in the middle of a streamed reply (for Ctrl-C / kill tests).

The stand-in sends a whole stream at once, so an interrupt can never land between two of its
events. This server sends `message_start` (with input usage), one text delta, then waits until
`release()` (or its timeout) before sending the rest: a deterministic "mid-stream" moment.
Non-streaming requests stall before the response in the same way.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

FIRST = "[stand-in, not Claude] First chunk "
REST = ["of a reply ", "that was held ", "back."]
INPUT_TOKENS = 31


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw or b"{}")
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(
                {
                    "path": self.path,
                    "body": body,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
        n = len(owner.requests)
        message = {
            "id": f"msg_stall_{n}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "m"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1},
        }
        if not body.get("stream"):
            owner.reached.set()
            owner.gate.wait(owner.timeout)
            full = dict(
                message,
                content=[{"type": "text", "text": FIRST + "".join(REST)}],
                stop_reason="end_turn",
                usage={"input_tokens": INPUT_TOKENS, "output_tokens": 12},
            )
            payload = json.dumps(full).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except OSError:  # the client gave up (a read timeout): nothing to do
                pass
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.send_header("request-id", f"req_stall_{n}")
        self.end_headers()
        self.close_connection = True
        try:
            self._event("message_start", {"type": "message_start", "message": message})
            self._event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            self._event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": FIRST},
                },
            )
            owner.reached.set()
            owner.gate.wait(owner.timeout)
            for piece in REST:
                self._event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            self._event(
                "content_block_stop", {"type": "content_block_stop", "index": 0}
            )
            self._event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 12},
                },
            )
            self._event("message_stop", {"type": "message_stop"})
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-reply is the point of this server


class StallServer:
    """`with StallServer() as s:` -> s.base_url; s.reached is set once a reply has stalled."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.gate = threading.Event()
        self.reached = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def release(self) -> None:
        self.gate.set()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
