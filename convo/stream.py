"""Fold Messages API stream events into the message a non-streaming call would have returned.

Pure (no I/O): the client decodes SSE and JSON, this module only folds dicts, so the same code
serves the sync client, a future async one, and tests that replay recorded streams.

The rules, from the API documentation and the official SDK's ``accumulate_event``:

- ``message_start`` carries the message shell and the input usage;
- blocks are addressed by ``index``: ``content_block_start`` gives the block as it begins,
  ``content_block_delta`` extends it, ``content_block_stop`` closes it;
- ``input_json_delta`` fragments are concatenated and parsed once, at block stop (a fragment
  alone is not JSON); an empty input is ``{}``; one that does not parse is judged when the
  stream is over (``check_tool_inputs``): a reply that reached ``max_tokens`` inside a tool call
  ends its input mid-JSON, and its final usage and stop reason are still to come;
- ``message_delta`` usage is cumulative: its fields overwrite, they are never added;
- ``ping`` and unknown event types are ignored; unknown block types are kept exactly as given
  (they must be replayed untouched), unknown delta types are recorded, never guessed at;
- an ``error`` event after the HTTP 200 is raised as the same typed error an HTTP error would be.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from convo.errors import APIError, APIStatusError, api_error_for
from convo.types import Block, Usage, text_of

__all__ = ["MessageAccumulator", "error_from_event"]


def error_from_event(event: dict[str, Any], request_id: str | None = None) -> APIStatusError:
    """The typed exception for an SSE ``error`` event (status None: it came after a 200)."""
    error = event.get("error")
    if not isinstance(error, dict):
        error = {}
    return api_error_for(
        None,
        error.get("type"),
        str(error.get("message") or "error event in the stream"),
        request_id=event.get("request_id") or request_id,
        body=event,
    )


def _index_of(event: dict[str, Any]) -> int:
    index = event.get("index")
    if not isinstance(index, int):
        raise APIError(f"malformed {event.get('type')} event in the stream: no block index")
    return index


class MessageAccumulator:
    """Feed it every event of one stream, in order; read the message at any point."""

    def __init__(self) -> None:
        self._shell: dict[str, Any] = {}
        self._usage: dict[str, Any] = {}
        self._blocks: dict[int, Block] = {}
        self._partial_json: dict[int, str] = {}
        self._stopped: set[int] = set()
        # Tool inputs that were not JSON at their block's stop: index -> the text received.
        self.unparsed_inputs: dict[int, str] = {}
        self.unknown_deltas: list[tuple[int, dict[str, Any]]] = []
        self.complete = False
        # Whether a message_delta brought the cumulative output count: until then the usage
        # holds message_start's placeholder (output_tokens 1, say).
        self.final_usage = False

    def feed(self, event: dict[str, Any]) -> str | None:
        """Apply one event. Returns the text it added, if any, so callers can print as it comes."""
        kind = event.get("type")
        if kind == "message_start":
            message = dict(event.get("message") or {})
            self._usage = dict(message.pop("usage", None) or {})
            message.pop("content", None)
            self._shell = message
        elif kind == "content_block_start":
            block = copy.deepcopy(event.get("content_block") or {})
            self._blocks[_index_of(event)] = block
        elif kind == "content_block_delta":
            return self._apply_delta(_index_of(event), event.get("delta") or {})
        elif kind == "content_block_stop":
            self._stop_block(_index_of(event))
        elif kind == "message_delta":
            self.final_usage = True
            self._shell.update(event.get("delta") or {})
            for key, value in (event.get("usage") or {}).items():
                if value is not None:
                    self._usage[key] = value
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            raise error_from_event(event)
        return None

    def _apply_delta(self, index: int, delta: dict[str, Any]) -> str | None:
        block = self._blocks.get(index)
        if block is None:
            # No content_block_start for this index: a conforming server never does this.
            self.unknown_deltas.append((index, delta))
            return None
        kind = delta.get("type")
        if kind == "text_delta":
            text = str(delta.get("text", ""))
            block["text"] = block.get("text", "") + text
            return text
        if kind == "input_json_delta":
            self._partial_json[index] = self._partial_json.get(index, "") + delta.get(
                "partial_json", ""
            )
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
        elif kind == "signature_delta":
            # The signature arrives whole, once, just before the block stops (as in the SDK).
            block["signature"] = delta.get("signature", "")
        elif kind == "citations_delta":
            # (A text block may start with "citations": null, as recorded streams show.)
            block["citations"] = [*(block.get("citations") or []), delta.get("citation")]
        else:
            self.unknown_deltas.append((index, delta))
        return None

    def _stop_block(self, index: int) -> None:
        self._stopped.add(index)
        if index not in self._partial_json or index not in self._blocks:
            return
        raw = self._partial_json.pop(index)
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except ValueError:
            self.unparsed_inputs[index] = raw
            return
        self._blocks[index]["input"] = parsed

    def check_tool_inputs(self) -> None:
        """APIError for a tool call whose streamed input was not JSON, once the stream is over
        (its stop reason known): such a reply cannot be stored, as its call cannot be replayed."""
        if not self.unparsed_inputs:
            return
        index = min(self.unparsed_inputs)
        if self.stop_reason == "max_tokens":
            raise APIError(
                f"the reply reached max_tokens inside a tool call (content block {index}), so "
                "the call's input is cut short and the reply was not stored: raise max_tokens "
                "and retry"
            )
        raise APIError(f"content block {index}: the streamed tool input is not JSON")

    def _is_finished(self, index: int) -> bool:
        """Whether a block may appear in partial content: tool input must be whole JSON."""
        if index in self.unparsed_inputs:
            return False
        if index in self._stopped:
            return True
        return index not in self._partial_json and "input" not in self._blocks[index]

    @property
    def content(self) -> list[Block]:
        """The blocks so far, in index order; a tool call whose input is unfinished is left out."""
        return [
            copy.deepcopy(self._blocks[index])
            for index in sorted(self._blocks)
            if self._is_finished(index)
        ]

    @property
    def message(self) -> dict[str, Any]:
        """The message in the shape of a non-streaming response."""
        message: dict[str, Any] = {
            "id": None,
            "type": "message",
            "role": "assistant",
            "model": None,
            "stop_reason": None,
            "stop_sequence": None,
        }
        message.update(copy.deepcopy(self._shell))
        message["content"] = self.content
        message["usage"] = copy.deepcopy(self._usage)
        return message

    @property
    def text(self) -> str:
        return text_of([self._blocks[index] for index in sorted(self._blocks)])

    @property
    def usage(self) -> Usage:
        return Usage.from_api(self._usage)

    @property
    def generated(self) -> str:
        """Everything generated so far as text: text, thinking and tool input (finished or
        not), for estimating what a stream cut before its final usage was billed for."""
        parts = []
        for index in sorted(self._blocks):
            block = self._blocks[index]
            parts += [str(block.get(k) or "") for k in ("text", "thinking")]
            raw = self._partial_json.get(index, self.unparsed_inputs.get(index))
            if raw is not None:
                parts.append(raw)
            elif block.get("type") in ("tool_use", "server_tool_use") and block.get("input"):
                parts.append(json.dumps(block["input"], ensure_ascii=False))
        return "".join(parts)

    @property
    def stop_reason(self) -> str | None:
        return self._shell.get("stop_reason")
