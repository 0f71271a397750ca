"""Server-sent events: bytes in, events out, with no I/O (sans-I/O, like h11).

The Messages API streams its answer as SSE. Network reads cut the byte stream anywhere: inside a
line, between the ``\\r`` and ``\\n`` of one line end, or inside a multi-byte UTF-8 character.
The decoder therefore keeps the unfinished line as bytes and decodes only whole lines (line ends
are ASCII, so they never fall inside a UTF-8 sequence). The rules are the WHATWG ones
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

- a line ends with ``\\r\\n``, ``\\n`` or ``\\r``;
- a blank line dispatches the event, but only when it has at least one ``data`` line;
- ``:`` starts a comment; a line without ``:`` is a field with an empty value;
- one space after the colon is stripped; ``data`` lines are joined with ``\\n``;
- ``id`` persists across events (unless it contains NUL); ``retry`` must be ASCII digits;
- at the end of the stream an unfinished event is discarded, never dispatched half-read.

Keeping this pure lets a future async client reuse it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent", "iter_events"]

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event. ``event`` is None when the stream gave no ``event:`` field."""

    event: str | None
    data: str
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: feed it chunks as they arrive, get back the events they complete."""

    def __init__(self) -> None:
        self._line = bytearray()  # the current, unterminated line
        self._after_cr = False  # the last chunk ended with \r: swallow one leading \n
        self._first_line = True  # a UTF-8 byte order mark may start the stream
        self._event: str | None = None
        self._data: list[str] = []
        self._retry: int | None = None
        self.last_event_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume ``chunk`` and return the events whose closing blank line it contained."""
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        events: list[ServerSentEvent] = []
        start = 0
        for match in _LINE_END.finditer(chunk):
            self._line += chunk[start : match.start()]
            event = self._process_line(bytes(self._line))
            self._line.clear()
            if event is not None:
                events.append(event)
            start = match.end()
        self._line += chunk[start:]
        # A trailing \r already ended its line; if the next chunk opens with \n, that \n is
        # the second half of the same \r\n and must not count as a blank line.
        self._after_cr = chunk.endswith(b"\r")
        return events

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: drop any unfinished line and event (per the spec), reset the state.

        Returns a list for symmetry with :meth:`feed`; it is always empty, because an event is
        only complete once its blank line has been fed.
        """
        self._line.clear()
        self._after_cr = False
        self._reset_event()
        return []

    def _process_line(self, raw: bytes) -> ServerSentEvent | None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._reset_event()
            return None
        event = ServerSentEvent(
            event=self._event or None,
            data="\n".join(self._data),
            id=self.last_event_id,
            retry=self._retry,
        )
        self._reset_event()
        return event

    def _reset_event(self) -> None:
        self._event = None
        self._data = []
        self._retry = None


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Decode a whole byte stream (e.g. ``response.iter_bytes()``) into events, lazily."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()
