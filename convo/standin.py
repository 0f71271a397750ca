"""A local stand-in for Anthropic's Messages API. It is NOT Claude: no model runs here.

A real HTTP server on loopback (stdlib only: ``http.server.ThreadingHTTPServer`` + threads), used
by ``convo demo`` (no real key needed: any ``x-api-key`` value passes) and by end-to-end tests
that run the real ``convo`` CLI with ``ANTHROPIC_BASE_URL`` pointed at it. Every response
carries an ``x-standin: true`` header, the response ``model`` is the requested id + ``-standin``,
and text replies start with ``[stand-in, not Claude] ``.

Endpoints: ``POST /v1/messages`` (JSON, or SSE when ``"stream": true``),
``POST /v1/messages/count_tokens``, and for tests in another process ``POST /_standin/faults``
(``{"kind": "fail"|"drop"|"cut_json"|"cut_stream"|"error_event"|"delay"|"reset", ...}`` with the
keyword arguments of the matching ``*_next`` method), ``GET``/``DELETE /_standin/requests``.
Control requests are not recorded in ``requests``.

Deterministic rules (same body, ignoring ``stream``, and same ``seed`` -> same reply and usage,
cache reads and writes aside, which depend on what earlier requests stored):

* Validation like the API (400 ``invalid_request_error``): missing model / max_tokens / messages,
  first message not ``user``, empty content (except a final assistant message), unanswered
  ``tool_use`` ids or stray ``tool_result`` ids, trailing whitespace in a prefill, any prefill to a
  Claude 4.6+ model (``claude-opus-4-6``, ``claude-sonnet-4-6``, ``-5``...), more than 4
  ``cache_control`` breakpoints, a thinking ``signature`` this server did not issue. No
  ``x-api-key`` (any value will do; ``authorization: Bearer`` is accepted too, as the API
  does for OAuth tokens) -> 401; no ``anthropic-version`` header -> 400.
  Consecutive same-role messages are merged, as the API does.
* Tokens: the prompt is a list of *items*: each tool, each system block (a string system is one
  text block), each content block of each message (string content is one text block). An item's
  text is the canonical JSON (sorted keys, no spaces, UTF-8) of ``[kind, block]`` with kind
  ``tool`` / ``system`` / the role and the block's ``cache_control`` removed. The tokens of a
  prefix are ``ceil(total characters of its items / 4)``; ``input_tokens`` of the whole request is
  that of all items (what count_tokens returns). Output tokens are
  ``max(1, ceil(characters produced / 4))`` where a tool_use costs ``len(name) + len(JSON input)``.
* Caching: breakpoints are items with ``cache_control`` and, with a top-level ``cache_control``,
  the last block of the last message. A prefix is identified by a hash of the model and its item
  texts. A breakpoint reads the longest cached prefix ending at it or up to 19 items before it
  (the API's 20-block lookback); ``cache_creation_input_tokens`` runs from there to the last
  breakpoint whose prefix has >= ``min_cacheable_tokens`` tokens (split 5m / 1h by the ttl of the
  breakpoint closing each segment); every such breakpoint prefix is then stored for its ttl
  (``5m`` default, ``1h``; ``clock`` is ``time.monotonic``). ``input_tokens`` is the rest.
* Replies: with a prefill (final assistant message) the reply continues it: ``C)`` after ``(``,
  ``"stand_in": true...}`` after ``{``, else `` ... (continued by ...)``. Otherwise, when tools are
  offered and tool_choice is not ``none``: ``tool``/``any`` force a tool_use (``any``: the first
  tool); ``auto`` uses the first tool whose name, or a ``_``-separated part of it with >= 4
  letters, the last user text mentions, after a short text block. One tool_use per distinct
  Capitalized word after the message's first word (one if none, or with
  ``disable_parallel_tool_use``); inputs follow the input_schema's required properties: strings get
  that word (or ``example``), enums their first value, integers 1, numbers 1.0, booleans true,
  string arrays all the Capitalized words, objects recurse. Ids are ``toolu_`` + 24 hex of a hash.
  Forced tool_choice wins even over tool results; otherwise, when the last user message holds
  tool_result blocks: ``Tool results: name: content; ...``.
  Else ``You said: <first 80 chars of the last user text>`` and a sentence picked by the hash.
  With ``thinking`` enabled a thinking block (with a signature checked on replay) comes first.
  ``stop_sequences`` cut the text at the earliest match (``stop_sequence``); output beyond
  ``4 * max_tokens`` characters is cut (``max_tokens``; a tool_use that does not fit is dropped).
* Faults queue in order; each request to ``POST /v1/messages`` consumes one. ``cut_json`` sends
  half of any body (JSON or SSE); ``cut_stream`` on a JSON request does the same;
  ``error_event`` on a JSON request becomes the HTTP error of that type (overloaded_error -> 529).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

__all__ = ["LABEL", "MODEL_SUFFIX", "StandIn", "main"]

Json = dict[str, Any]

LABEL = "[stand-in, not Claude] "
MODEL_SUFFIX = "-standin"
_SENTENCES = (
    "This is a canned reply from convo's local stand-in server.",
    "No model was consulted; a hash of your request picked these words.",
    "Set a real ANTHROPIC_API_KEY and drop the stand-in to talk to Claude.",
    "The stand-in counts a token as four characters of your request.",
)
_THINKING = "The stand-in does not think; this block only lets clients practise passing it back."
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 409: "conflict_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
    529: "overloaded_error",
}
_TYPE_STATUS = {v: k for k, v in _ERROR_TYPES.items()}
_DEFAULT_MESSAGES = {
    "overloaded_error": "Overloaded", "api_error": "Internal server error",
    "rate_limit_error": "Number of requests has exceeded your rate limit (stand-in fault)",
    "timeout_error": "Request timed out", "request_too_large": "Request exceeds the maximum size",
}
_TTLS = {"5m": 300.0, "1h": 3600.0}
_LOOKBACK = 20
_MAX_BREAKPOINTS = 4
_NO_PREFILL = re.compile(r"claude-(?:opus|sonnet|haiku)-(\d+)(?:-(\d{1,2})(?!\d))?")
_WORD = re.compile(r"[^\W\d_][\w'-]*")


class _ApiError(Exception):
    def __init__(self, message: str, status: int = 400, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type or _ERROR_TYPES.get(status, "api_error")


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _tokens(chars: int) -> int:
    return (chars + 3) // 4


def _blocks(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content) if isinstance(content, list) else []


def _rejects_prefill(model: str) -> bool:
    """Claude 4.6 and later refuse a final assistant message."""
    m = _NO_PREFILL.search(model)
    return m is not None and (int(m.group(1)), int(m.group(2) or 0)) >= (4, 6)


def _thinking_on(body: Json) -> bool:
    t = body.get("thinking")
    return isinstance(t, dict) and t.get("type") in ("enabled", "adaptive")


def _signature(thinking: str) -> str:
    return "standin_sig_" + _sha("thinking", thinking)[:40]


@dataclass
class _Turn:
    role: str
    blocks: list[Json]
    index: int  # index of its first original message


def _merge(messages: list[Json]) -> list[_Turn]:
    turns: list[_Turn] = []
    for i, m in enumerate(messages):
        blocks = _blocks(m.get("content"))
        if turns and turns[-1].role == m["role"]:
            turns[-1].blocks.extend(blocks)
        else:
            turns.append(_Turn(m["role"], list(blocks), i))
    return turns


def _cache_controls(body: Json) -> list[dict[str, Any]]:
    """Every cache_control in the order the API processes them: tools, system, messages
    (the top-level automatic one at the end of messages)."""
    found: list[Any] = [t.get("cache_control") for t in body.get("tools") or [] if isinstance(t, dict)]
    system = body.get("system")
    found += [b.get("cache_control") for b in system if isinstance(b, dict)] if isinstance(system, list) else []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        found += [b.get("cache_control") for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    found.append(body.get("cache_control"))
    return [cc for cc in found if isinstance(cc, dict)]


def _check_cc(cc: Any, where: str) -> None:
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise _ApiError(f"{where}.cache_control.type: Input should be 'ephemeral'")
    if cc.get("ttl", "5m") not in _TTLS:
        raise _ApiError(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")


def _validate(body: Any, *, counting: bool = False) -> None:
    """Raise _ApiError for what the real API rejects (the subset convo must get right)."""
    if not isinstance(body, dict):
        raise _ApiError("Request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body and not (counting and name == "max_tokens"):
            raise _ApiError(f"{name}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise _ApiError("model: Input should be a valid string")
    mt = body.get("max_tokens")
    if not counting and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        raise _ApiError("max_tokens: Input should be an integer greater than or equal to 1")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _ApiError("messages: at least one message is required")
    breakpoints = 1 if body.get("cache_control") is not None else 0
    if breakpoints:
        _check_cc(body["cache_control"], "body")
    last = len(msgs) - 1
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _ApiError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if not isinstance(m.get("content"), (str, list)):
            raise _ApiError(f"messages.{i}.content: Field required")
        blocks = _blocks(m["content"])
        final_assistant = i == last and m["role"] == "assistant"
        if not blocks and not final_assistant:
            raise _ApiError(f"messages.{i}: all messages must have non-empty content except "
                            "for the optional final assistant message")
        for j, b in enumerate(blocks):
            if not isinstance(b, dict) or not isinstance(b.get("type"), str):
                raise _ApiError(f"messages.{i}.content.{j}.type: Field required")
            if "cache_control" in b:
                _check_cc(b["cache_control"], f"messages.{i}.content.{j}")
                breakpoints += 1
            if b["type"] == "text" and not final_assistant:
                if not isinstance(b.get("text"), str) or not b["text"]:
                    raise _ApiError("messages: text content blocks must be non-empty")
                if not b["text"].strip():
                    raise _ApiError(
                        "messages: text content blocks must contain non-whitespace text")
            if b["type"] == "tool_use" and not (isinstance(b.get("id"), str) and b.get("name")
                                                and isinstance(b.get("input"), dict)):
                raise _ApiError(f"messages.{i}.content.{j}: tool_use needs id, name and input")
            if (b["type"] == "thinking" and m["role"] == "assistant"
                    and b.get("signature") != _signature(str(b.get("thinking", "")))):
                raise _ApiError(f"messages.{i}.content.{j}: Invalid `signature` in "
                                "`thinking` block")
    if msgs[0]["role"] != "user":
        raise _ApiError('messages: first message must use the "user" role')
    turns = _merge(msgs)
    uses = [b.get("id") for t in turns for b in t.blocks if b["type"] == "tool_use"]
    if len(set(uses)) != len(uses):
        raise _ApiError("messages: `tool_use` ids must be unique")
    if (uses or any(b["type"] == "tool_result" for t in turns for b in t.blocks)) and not body.get("tools"):
        raise _ApiError("Requests which include `tool_use` or `tool_result` blocks must define tools.")
    for k, turn in enumerate(turns):
        ids = [b["id"] for b in turn.blocks if b["type"] == "tool_use"]
        nxt = turns[k + 1] if k + 1 < len(turns) else None
        if turn.role == "assistant" and ids:
            answered: set[Any] = set()
            for b in nxt.blocks if nxt else []:
                if b["type"] != "tool_result":
                    break
                answered.add(b.get("tool_use_id"))
            missing = [x for x in ids if x not in answered]
            if missing:
                raise _ApiError(
                    f"messages.{nxt.index if nxt else turn.index}: tool_use ids were found "
                    f"without tool_result blocks immediately after: {', '.join(missing)}. Each "
                    "tool_use block must have a corresponding tool_result block in the next "
                    "message.")
        if turn.role == "user":
            prev = turns[k - 1].blocks if k else []
            prev_ids = {b["id"] for b in prev if b["type"] == "tool_use"}
            for b in turn.blocks:
                if b["type"] == "tool_result" and b.get("tool_use_id") not in prev_ids:
                    raise _ApiError(
                        f"messages.{turn.index}: unexpected tool_use_id found in tool_result "
                        f"blocks: {b.get('tool_use_id')}. Each tool_result block must have a "
                        "corresponding tool_use block in the previous message.")
    if turns[-1].role == "assistant":
        if _rejects_prefill(body["model"]):
            raise _ApiError("This model does not support assistant message prefill. The "
                            "conversation must end with a user message.")
        if _thinking_on(body) and turns[-1].blocks:
            raise _ApiError("When `thinking` is enabled, a final `assistant` message must start "
                            "with a thinking block; prefill is not supported with thinking.")
        tail = turns[-1].blocks[-1] if turns[-1].blocks else None
        tail_text = str(tail.get("text", "")) if tail and tail["type"] == "text" else ""
        if tail_text != tail_text.rstrip():
            raise _ApiError("final assistant content cannot end with trailing whitespace")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _ApiError("system: Input should be a valid string or list of text blocks")
    for j, b in enumerate(system if isinstance(system, list) else []):
        if not isinstance(b, dict) or b.get("type") != "text":
            raise _ApiError(f"system.{j}.type: Input should be 'text'")
        if "cache_control" in b:
            _check_cc(b["cache_control"], f"system.{j}")
            breakpoints += 1
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise _ApiError("tools: Input should be a valid list")
    for j, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _ApiError(f"tools.{j}.name: Field required")
        if "cache_control" in t:
            _check_cc(t["cache_control"], f"tools.{j}")
            breakpoints += 1
    choice = body.get("tool_choice")
    if choice is not None and not (
        isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none")
    ):
        raise _ApiError("tool_choice: Input should be an object with type auto, any, tool or none")
    manual = isinstance(body.get("thinking"), dict) and body["thinking"].get("type") == "enabled"
    if manual and isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise _ApiError("Thinking may not be enabled when tool_choice forces tool use.")
    if manual and turns[-1].role == "user" and turns[-1].blocks \
            and turns[-1].blocks[0]["type"] == "tool_result" and len(turns) > 1 \
            and turns[-2].blocks and turns[-2].blocks[0]["type"] not in ("thinking", "redacted_thinking"):
        raise _ApiError(
            f"messages.{turns[-2].index}.content.0.type: Expected `thinking` or "
            "`redacted_thinking`, but found `tool_use`. When `thinking` is enabled, a final "
            "`assistant` message must start with a thinking block.")
    if (isinstance(choice, dict) and choice.get("type") == "tool"
            and choice.get("name") not in {t["name"] for t in tools}):
        raise _ApiError(f"tool_choice.name: Tool '{choice.get('name')}' not found in "
                        "provided tools")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list)
                                  and all(isinstance(s, str) for s in stops)):
        raise _ApiError("stop_sequences: Input should be a valid list of strings")
    if _thinking_on(body) and not counting:
        budget = body["thinking"].get("budget_tokens")
        if isinstance(budget, int) and isinstance(mt, int) and budget >= mt:
            raise _ApiError("`max_tokens` must be greater than `thinking.budget_tokens`")
    ttls = [cc.get("ttl", "5m") for cc in _cache_controls(body)]
    if "1h" in ttls and "5m" in ttls and ttls.index("5m") < len(ttls) - 1 - ttls[::-1].index("1h"):
        raise _ApiError("a ttl='1h' cache_control block must not come after a ttl='5m' "
                        "cache_control block. Note that blocks are processed in the following "
                        "order: `tools`, `system`, `messages`.")
    if breakpoints > _MAX_BREAKPOINTS:
        raise _ApiError(f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be "
                        f"provided. Found {breakpoints}.")


def _items(body: Json) -> tuple[list[str], list[Json | None]]:
    """The prompt as item texts (canonical, cache_control removed) and their breakpoints."""
    texts: list[str] = []
    marks: list[Json | None] = []

    def add(kind: str, block: Json) -> None:
        marks.append(block.get("cache_control"))
        texts.append(_canon([kind, {k: v for k, v in block.items() if k != "cache_control"}]))

    for tool in body.get("tools") or []:
        add("tool", tool)
    system = body.get("system")
    for block in _blocks(system) if system else []:
        add("system", block)
    first_message_item = len(texts)
    for m in body["messages"]:
        for block in _blocks(m["content"]):
            add(m["role"], block)
    top = body.get("cache_control")
    if top is not None and len(texts) > first_message_item and marks[-1] is None:
        marks[-1] = top
    return texts, marks


def _capitalized(text: str, exclude: set[str]) -> list[str]:
    out: list[str] = []
    for w in _WORD.findall(text)[1:]:
        w = w.strip("'-")
        if len(w) >= 2 and w[0].isupper() and w.lower() not in exclude and w not in out:
            out.append(w)
    return out


def _fill(schema: Any, word: str, words: list[str], depth: int = 0) -> Any:
    """A deterministic value matching a JSON schema (required properties only)."""
    if not isinstance(schema, dict) or depth > 8:
        return word
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _fill(schema[key][0], word, words, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if kind == "array":
        items = schema.get("items")
        if not isinstance(items, dict) or items.get("type", "string") == "string":
            return list(words or ["example"])
        return [_fill(items, word, words, depth + 1)]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: _fill(props.get(name), word, words, depth + 1)
                for name in schema.get("required") or []}
    return word


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = [b.get("text", "") if b.get("type") == "text" else f"[{b.get('type')}]"
             for b in content or [] if isinstance(b, dict)]
    return " ".join(parts)


def _plan(body: Json, digest: str) -> list[Json]:
    """The reply's blocks before max_tokens and stop_sequences are applied."""
    turns = _merge(body["messages"])
    thinking = ([{"type": "thinking", "thinking": _THINKING, "signature": ""}]
                if _thinking_on(body) else [])
    if turns[-1].role == "assistant":  # prefill: continue it
        prefill = "".join(b.get("text", "") for b in turns[-1].blocks if b["type"] == "text")
        if prefill:
            if prefill.endswith("("):
                text = "C)"
            elif prefill.endswith("{"):
                text = '"stand_in": true, "note": "not Claude"}'
            else:
                text = " ... (continued by convo's stand-in, not Claude)."
            return [{"type": "text", "text": text}]
    user = next(t for t in reversed(turns) if t.role == "user")
    user_text = "\n".join(b.get("text", "") for b in user.blocks if b["type"] == "text")
    results = [b for b in user.blocks if b["type"] == "tool_result"]
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {"type": "auto"}
    ctype = choice.get("type", "auto")
    tool: Json | None = None
    if tools and ctype == "tool":
        tool = next(t for t in tools if t["name"] == choice.get("name"))
    elif tools and ctype == "any":
        tool = tools[0]
    elif tools and ctype == "auto" and user_text and not results:
        low = user_text.lower()
        for t in tools:
            parts = [p.lower() for p in re.split(r"[_-]", t["name"]) if len(p) >= 4]
            if t["name"].lower() in low or any(re.search(r"\b" + re.escape(p), low) for p in parts):
                tool = t
                break
    if tool is not None:
        exclude = {tool["name"].lower(), *(p.lower() for p in re.split(r"[_-]", tool["name"]))}
        words = _capitalized(user_text, exclude)
        targets: list[str] = words or ["example"]
        if choice.get("disable_parallel_tool_use"):
            targets = targets[:1]
        out: list[Json] = list(thinking)
        if ctype == "auto":
            out.append({"type": "text", "text": f"{LABEL}Calling {tool['name']} for "
                        f"{', '.join(targets)}."})
        schema = tool.get("input_schema") or {}
        for k, word in enumerate(targets):
            out.append({"type": "tool_use", "id": "toolu_" + _sha(digest, str(k))[:24],
                        "name": tool["name"], "input": _fill(schema, word, words)})
        return out
    if results:
        names = {b["id"]: b["name"] for t in turns for b in t.blocks if b["type"] == "tool_use"}
        shown = "; ".join(
            f"{names.get(r.get('tool_use_id'), r.get('tool_use_id'))}: "
            f"{'error ' if r.get('is_error') else ''}{_result_text(r.get('content'))[:80]}"
            for r in results)
        return [*thinking, {"type": "text", "text": f"{LABEL}Tool results: {shown}"}]
    if user_text:
        snippet = " ".join(user_text.split())
        said = f"You said: {snippet[:80]}{'...' if len(snippet) > 80 else ''}"
    else:
        said = "You sent " + ", ".join(b["type"] for b in user.blocks) + " blocks."
    sentence = _SENTENCES[int(digest[:8], 16) % len(_SENTENCES)]
    return [*thinking, {"type": "text", "text": f"{LABEL}{said} {sentence}"}]


def _limit(plan: list[Json], max_tokens: int,
           stops: list[str]) -> tuple[list[Json], str, str | None, int]:
    """Apply stop_sequences and max_tokens: (blocks, stop_reason, stop_sequence, chars)."""
    budget = 4 * max_tokens
    used = 0
    out: list[Json] = []
    reason = "tool_use" if any(b["type"] == "tool_use" for b in plan) else "end_turn"
    for block in plan:
        if block["type"] == "tool_use":
            cost = len(block["name"]) + len(_canon(block["input"]))
            if used + cost > budget:
                return out, "max_tokens", None, used
            out.append(block)
            used += cost
            continue
        key = "thinking" if block["type"] == "thinking" else "text"
        text: str = block[key]
        hit: tuple[int, str] | None = None
        if key == "text":
            found = [(text.find(s), s) for s in stops if s and s in text]
            hit = min(found, key=lambda f: (f[0], -len(f[1]))) if found else None
            if hit:
                text = text[:hit[0]]
        cut = used + len(text) > budget
        if cut:
            text = text[:budget - used]
        used += len(text)
        if text:
            new = dict(block, **{key: text})
            if key == "thinking":
                new["signature"] = _signature(text)
            out.append(new)
        if cut:
            return out, "max_tokens", None, used
        if hit:
            return out, "stop_sequence", hit[1], used
    return out, reason, None, used


def _chunks(s: str, n: int) -> list[str]:
    return [s[i:i + n] for i in range(0, len(s), n)] or [""]


def _sse_events(msg: Json) -> list[tuple[str, Json]]:
    """The exact event sequence the API streams for a finished message."""
    usage = msg["usage"]
    start = dict(msg, content=[], stop_reason=None, stop_sequence=None,
                 usage=dict(usage, output_tokens=1))
    events: list[tuple[str, Json]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"})]
    for i, b in enumerate(msg["content"]):
        deltas: list[Json]
        if b["type"] == "text":
            first: Json = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": c} for c in _chunks(b["text"], 12)]
        elif b["type"] == "thinking":
            first = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": c} for c in _chunks(b["thinking"], 16)]
            deltas.append({"type": "signature_delta", "signature": b["signature"]})
        else:
            first = dict(b, input={})
            raw = json.dumps(b["input"], ensure_ascii=False)
            deltas = [{"type": "input_json_delta", "partial_json": c}
                      for c in ["", *_chunks(raw, 8)]]
        events.append(("content_block_start",
                       {"type": "content_block_start", "index": i, "content_block": first}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})
                   for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": msg["stop_sequence"]},
        "usage": {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                        "cache_read_input_tokens", "output_tokens")}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


@dataclass
class _Fault:
    kind: str
    status: int = 500
    error_type: str | None = None
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    after_events: int = 3
    seconds: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: StandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up are not errors
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    rid = ""

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.standin.verbose:
            super().log_message(format, *args)

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):  # headers and body are two writes: no Nagle wait
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.standin._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._track(self.connection, False)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: bytes, *, ctype: str = "application/json",
              headers: dict[str, str] | None = None, cut: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("request-id", self.rid)
        self.send_header("x-standin", "true")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if cut:
            self.close_connection = True
            payload = payload[:len(payload) // 2]
        self.wfile.write(payload)
        self.wfile.flush()

    def _json(self, status: int, obj: Any, *, cut: bool = False,
              headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), cut=cut, headers=headers)

    def _error(self, status: int, error_type: str, message: str, *,
               headers: dict[str, str] | None = None, cut: bool = False) -> None:
        self._json(status, {"type": "error", "error": {"type": error_type, "message": message},
                            "request_id": self.rid}, headers=headers, cut=cut)

    def _sse(self, msg: Json, fault: _Fault | None) -> None:
        pieces = [f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
                  for name, data in _sse_events(msg)]
        self.send_response(200)
        for k, v in (("Content-Type", "text/event-stream; charset=utf-8"),
                     ("Cache-Control", "no-cache"), ("Connection", "close"),
                     ("request-id", self.rid), ("x-standin", "true")):
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        if fault and fault.kind == "cut_json":
            whole = b"".join(pieces)
            pieces = [whole[:len(whole) // 2]]
        elif fault and fault.kind in ("cut_stream", "error_event"):
            pieces = pieces[:max(0, fault.after_events)]
        for piece in pieces:
            self.wfile.write(piece)
            self.wfile.flush()
        if fault and fault.kind == "error_event":
            etype = fault.error_type or "overloaded_error"
            err = {"type": "error", "error": {"type": etype, "message": fault.message
                                              or _DEFAULT_MESSAGES.get(etype, etype)}}
            self.wfile.write(f"event: error\ndata: {json.dumps(err)}\n\n".encode())
            self.wfile.flush()

    def _dispatch(self, method: str) -> None:
        st = self.server.standin
        self.rid = st._next_id()
        raw = self._read_body()
        path = urlsplit(self.path).path
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if path.startswith("/_standin/"):
            return self._control(method, path, body)
        headers = {k.lower(): v for k, v in self.headers.items()}
        st._record({"method": method, "path": path, "headers": headers, "body": body})
        fault = st._pop_fault() if (method, path) == ("POST", "/v1/messages") else None
        if fault and fault.kind == "fail":
            etype = fault.error_type or _ERROR_TYPES.get(
                fault.status, "api_error" if fault.status >= 500 else "invalid_request_error")
            return self._error(fault.status, etype, fault.message or
                               _DEFAULT_MESSAGES.get(etype, f"stand-in fault: {etype}"),
                               headers=fault.headers)
        if fault and fault.kind == "drop":
            self.close_connection = True
            return None
        if fault and fault.kind == "delay":
            st._stopping.wait(fault.seconds)
        cut = bool(fault and fault.kind in ("cut_json", "cut_stream"))
        try:
            if not headers.get("x-api-key") and not headers.get("authorization"):
                raise _ApiError("x-api-key header is required", 401)
            if not headers.get("anthropic-version"):
                raise _ApiError("anthropic-version: header is required")
            if method != "POST" or path not in ("/v1/messages", "/v1/messages/count_tokens"):
                raise _ApiError(f"Not found: {method} {path}", 404)
            if raw and body is None:
                raise _ApiError("There was an error parsing the body: invalid JSON")
            _validate(body, counting=path.endswith("count_tokens"))
            assert isinstance(body, dict)
            if path.endswith("count_tokens"):
                return self._json(200, {"input_tokens": _tokens(sum(map(len, _items(body)[0])))})
            msg = st._answer(body)
            if fault and fault.kind == "error_event" and body.get("stream") is not True:
                etype = fault.error_type or "overloaded_error"
                raise _ApiError(fault.message or _DEFAULT_MESSAGES.get(etype, etype),
                                _TYPE_STATUS.get(etype, 500), etype)
            if body.get("stream") is True:
                return self._sse(msg, fault)
            return self._json(200, msg, cut=cut)
        except _ApiError as e:
            return self._error(e.status, e.error_type, e.message, cut=cut)

    def _control(self, method: str, path: str, body: Any) -> None:
        st = self.server.standin
        if (method, path) == ("GET", "/_standin/requests"):
            with st._lock:
                recorded = list(st.requests)
            return self._json(200, recorded)
        if (method, path) == ("DELETE", "/_standin/requests"):
            st.clear_requests()
            return self._json(200, {"ok": True})
        if (method, path) == ("GET", "/_standin/health"):
            return self._json(200, {"ok": True, "standin": True, "note": "not Claude"})
        if (method, path) == ("POST", "/_standin/faults") and isinstance(body, dict):
            args = dict(body)
            kind = args.pop("kind", None)
            actions: dict[str, Callable[..., None]] = {
                "fail": st.fail_next, "drop": st.drop_next, "cut_json": st.cut_json_next,
                "cut_stream": st.cut_stream_next, "error_event": st.error_event_next,
                "delay": st.delay_next, "reset": st.reset_faults}
            if kind not in actions:
                return self._error(400, "invalid_request_error", f"unknown fault kind {kind!r}")
            try:
                actions[kind](**args)
            except (TypeError, ValueError) as e:
                return self._error(400, "invalid_request_error", f"bad fault arguments: {e}")
            with st._lock:
                queued = len(st._faults)
            return self._json(200, {"ok": True, "queued": queued})
        return self._error(404, "not_found_error", f"Not found: {method} {path}")


class StandIn:
    """The stand-in server. ``with StandIn() as s: ...`` or ``s = StandIn().start()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 min_cacheable_tokens: int = 1024, seed: int = 0, verbose: bool = False) -> None:
        self.host = host
        self.port = port
        self.min_cacheable_tokens = min_cacheable_tokens
        self.seed = seed
        self.verbose = verbose
        self.clock: Callable[[], float] = time.monotonic
        self.requests: list[Json] = []
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self._cache: dict[str, tuple[float, float]] = {}  # prefix hash -> (expires_at, ttl)
        self._counter = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        if self._server is not None:
            return self
        server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) \
            if ":" in self.host else _Server
        self._server = server_cls((self.host, self.port), _Handler)
        self._server.standin = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.05}, name=f"convo-standin-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wake handlers waiting on idle keep-alive connections
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ---------------------------------------------------------------------------
    def _queue(self, fault: _Fault, times: int) -> None:
        with self._lock:
            self._faults.extend(_Fault(**vars(fault)) for _ in range(int(times)))

    def fail_next(self, status: int, *, times: int = 1, error_type: str | None = None,
                  message: str | None = None, headers: dict[str, str] | None = None) -> None:
        self._queue(_Fault("fail", status=int(status), error_type=error_type, message=message,
                           headers=dict(headers or {})), times)

    def drop_next(self, times: int = 1) -> None:
        self._queue(_Fault("drop"), times)

    def cut_json_next(self, times: int = 1) -> None:
        self._queue(_Fault("cut_json"), times)

    def cut_stream_next(self, after_events: int = 3, times: int = 1) -> None:
        self._queue(_Fault("cut_stream", after_events=int(after_events)), times)

    def error_event_next(self, error_type: str = "overloaded_error", after_events: int = 3,
                         times: int = 1, message: str | None = None) -> None:
        self._queue(_Fault("error_event", error_type=error_type, message=message,
                           after_events=int(after_events)), times)

    def delay_next(self, seconds: float, times: int = 1) -> None:
        self._queue(_Fault("delay", seconds=float(seconds)), times)

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- internals ------------------------------------------------------------------------
    def _pop_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record(self, entry: Json) -> None:
        with self._lock:
            self.requests.append(entry)

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"req_standin_{self._counter:06d}"

    def _usage(self, body: Json) -> Json:
        """Input usage, reading and writing the prompt cache (see the module docstring)."""
        texts, marks = _items(body)
        cum: list[int] = []
        hashes: list[str] = []
        h = hashlib.sha256(body["model"].encode())
        for t in texts:
            cum.append((cum[-1] if cum else 0) + len(t))
            h.update(b"\x00" + t.encode())
            hashes.append(h.copy().hexdigest())
        total = _tokens(cum[-1]) if cum else 0

        def tok(i: int) -> int:
            return _tokens(cum[i])

        bps = [(i, _TTLS[m.get("ttl", "5m")]) for i, m in enumerate(marks) if m]
        c5 = c1 = read = 0
        with self._lock:
            now = self.clock()
            hit = -1
            for i, _ in bps:
                for j in range(i, max(-1, i - _LOOKBACK), -1):
                    entry = self._cache.get(hashes[j])
                    if entry and entry[0] > now:
                        hit = max(hit, j)
                        break
            if hit >= 0:
                read = tok(hit)
                ttl = self._cache[hashes[hit]][1]
                self._cache[hashes[hit]] = (now + ttl, ttl)
            done = read
            for i, ttl in bps:
                if tok(i) < self.min_cacheable_tokens:
                    continue
                if tok(i) > done:
                    if ttl >= 3600:
                        c1 += tok(i) - done
                    else:
                        c5 += tok(i) - done
                    done = tok(i)
                old = self._cache.get(hashes[i], (0.0, 0.0))
                self._cache[hashes[i]] = (max(old[0], now + ttl), max(old[1], ttl))
        return {"input_tokens": total - read - c5 - c1, "cache_creation_input_tokens": c5 + c1,
                "cache_read_input_tokens": read, "cache_creation": {
                    "ephemeral_5m_input_tokens": c5, "ephemeral_1h_input_tokens": c1}}

    def _answer(self, body: Json) -> Json:
        digest = _sha(str(self.seed), _canon({k: v for k, v in body.items() if k != "stream"}))
        blocks, reason, stop_seq, chars = _limit(_plan(body, digest), body["max_tokens"],
                                                 list(body.get("stop_sequences") or []))
        usage = self._usage(body)
        usage["output_tokens"] = max(1, _tokens(chars))
        usage["service_tier"] = "standard"
        with self._lock:
            self._counter += 1
            n = self._counter
        return {"id": f"msg_standin_{n:06d}{digest[:18]}", "type": "message",
                "role": "assistant", "model": body["model"] + MODEL_SUFFIX, "content": blocks,
                "stop_reason": reason, "stop_sequence": stop_seq, "usage": usage}


def main(argv: list[str] | None = None) -> None:
    """``python -m convo.standin``: serve until Ctrl-C."""
    p = argparse.ArgumentParser(prog="python -m convo.standin",
                                description="A local stand-in for the Messages API (not Claude).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--min-cacheable-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="do not log requests")
    args = p.parse_args(argv)
    standin = StandIn(args.host, args.port, min_cacheable_tokens=args.min_cacheable_tokens,
                      seed=args.seed, verbose=not args.quiet).start()
    print(f"convo stand-in Messages API listening on {standin.base_url}\n"
          "THIS IS A LOCAL STAND-IN, NOT CLAUDE: no model runs here; replies are canned, "
          "deterministic and labelled \"[stand-in, not Claude]\".\n"
          f"Use it with ANTHROPIC_BASE_URL={standin.base_url} (any API key value). "
          "Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stand-in stopped.", file=sys.stderr)
    finally:
        standin.stop()


if __name__ == "__main__":
    main()
