"""The history builder: a pure function from a branch's path of turns to a Messages API body.

No I/O and no database types: the store hands it plain turn records and blob bytes, and it
returns plain JSON-serializable data, identical for the same input (so replay is byte-stable).

Rules, in the order they are applied:
1. Turns come out in path order; consecutive turns of one role become one message. A reply to a
   partial assistant turn (a prefill, or a synthetic turn at the end) continues its text: its
   first text block is joined to the previous one, so "The answer is (" + "C)" replays as
   "The answer is (C)". A reply after a pause_turn is appended block by block, as the API
   combines consecutive messages: the paused content is replayed as it was received.
2. A final assistant turn is a prefill: refused for models that reject prefill, with trailing
   whitespace, or with extended thinking; a final reply that stopped on pause_turn is sent back
   as it is for the model to continue.
3. Every tool_use is answered by a tool_result with its id at the start of the next user message.
4. The first message is from the user; at most 100 images, at most 2000 px a side above 20.
5. Settings come from the conversation; any of them can be overridden per request.
6. Prompt-cache markers are added here, never stored in turns, so replay never exceeds the
   API's four breakpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from convo.capabilities import supports_prefill
from convo.content import BLOB_SOURCE, blob_refs, inline_blobs
from convo.errors import HistoryError, InvalidInput, PrefillNotSupported
from convo.types import Block

# Parameters copied from settings into the body, in this order, when set.
REQUEST_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
)
SETTING_KEYS = frozenset(("model", "system", "max_tokens", "cache", *REQUEST_PARAMS))
CACHE_TTLS = ("5m", "1h")
MAX_IMAGES = 100
MANY_IMAGES = 20
MANY_IMAGES_MAX_SIDE = 2000
MAX_REQUEST_BYTES = 32 * 1024 * 1024
MAX_CACHE_BREAKPOINTS = 4
MIN_THINKING_BUDGET = 1024
# The description of a tool named again only because the history holds its calls.
REPLAYED_TOOL = "Used earlier in this conversation; not available now."


# A stored turn's integer id, or a label for one not yet written ("(edited turn)").
TurnId = int | str


@dataclass(slots=True)
class TurnRecord:
    """One stored turn as the builder sees it. Not frozen: a frozen dataclass's __init__
    costs three times as much, and a resume builds 20,000 of them. Treat it as read-only."""

    id: TurnId
    role: str
    kind: str
    content: list[Block]
    stop_reason: str | None = None


def merge_settings(settings: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Conversation settings with per-request overrides; an override of None unsets a setting."""
    merged = dict(settings)
    for key, value in (overrides or {}).items():
        if key not in SETTING_KEYS:
            raise InvalidInput(f"unknown request setting {key!r}")
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def build_messages(path: Sequence[TurnRecord]) -> tuple[list[dict[str, Any]], list[TurnId]]:
    """Messages for a path, and for each message the id of its last turn (for error messages)."""
    messages, owners, _ = _build_messages(path)
    return messages, owners


# The kinds of assistant turn a reply continues (see is_continued).
CONTINUED_KINDS = frozenset(("prefill", "synthetic"))


def _build_messages(
    path: Sequence[TurnRecord], *, with_block_owners: bool = True
) -> tuple[list[dict[str, Any]], list[TurnId], list[list[TurnId]] | None]:
    """build_messages, plus (when asked) the id of the turn each block came from, to name the
    turn at fault in an error; the hot path skips that and recomputes it only on an error."""
    messages: list[dict[str, Any]] = []
    owners: list[TurnId] = []
    block_owners: list[list[TurnId]] | None = [] if with_block_owners else None
    prev_role = None
    prev_continued = False  # whether the previous turn is one a reply continues
    merged = False  # whether the last message's content list is its own (merged) copy
    for turn in path:
        role = turn.role
        if role == prev_role:
            message = messages[-1]
            if not merged:
                # A message's list is its first turn's own until a second turn joins it.
                message["content"] = list(message["content"])
                merged = True
            blocks = message["content"]
            new = turn.content
            if (
                prev_continued
                and turn.kind == "reply"
                and new
                and blocks
                and _plain_text(blocks[-1])
                and _plain_text(new[0])
            ):
                blocks[-1] = {"type": "text", "text": blocks[-1]["text"] + new[0]["text"]}
                new = new[1:]
            blocks.extend(new)
            if block_owners is not None:
                block_owners[-1].extend([turn.id] * len(new))
            owners[-1] = turn.id
        else:
            messages.append({"role": role, "content": turn.content})
            merged = False
            owners.append(turn.id)
            if block_owners is not None:
                block_owners.append([turn.id] * len(turn.content))
        prev_role = role
        prev_continued = role == "assistant" and turn.kind in CONTINUED_KINDS  # (is_continued)
    return messages, owners, block_owners


def is_continued(turn: TurnRecord) -> bool:
    """Whether Claude's next reply continues this turn's text: a prefill, or an assistant turn a
    person wrote (at the end of a branch it acts as one). A reply that stopped on pause_turn is
    not: its continuation is new content after it."""
    return turn.role == "assistant" and turn.kind in CONTINUED_KINDS


def _plain_text(block: Block) -> bool:
    return block.get("type") == "text" and len(block) == 2


def check_structure(path: Sequence[TurnRecord], *, final_pending_ok: bool) -> None:
    """Refuse a path that could never be sent (for forks and edits, before anything is written).

    `final_pending_ok` allows a last assistant turn whose tool_use is still unanswered.
    """
    if not path:
        return
    messages, owners, block_owners = _build_messages(path)
    check_messages(messages, owners, final_pending_ok=final_pending_ok, block_owners=block_owners)


def check_messages(
    messages: list[dict[str, Any]],
    owners: list[TurnId],
    *,
    final_pending_ok: bool = False,
    block_owners: list[list[TurnId]] | None = None,
) -> list[str]:
    """Refuse a message list the API would refuse, naming the turn at fault; the names of
    the tools its tool_use blocks call.

    `final_pending_ok` accepts a branch still waiting for tool results: a last assistant
    turn with unanswered tool_use, or a last user message of tool_results answering only some.
    `block_owners` (the turn id of each block) names the very turn of a bad block when a
    message was merged from several turns; without it, a message's last turn is named.
    """
    if not messages:
        raise HistoryError("the branch has no turns to send")

    def owner(i: int, j: int) -> TurnId:
        """The turn a block came from (computed only to name it in an error)."""
        if block_owners is not None and j < len(block_owners[i]):
            return block_owners[i][j]
        return owners[i]

    if messages[0]["role"] != "user":
        first = owner(0, 0)
        raise HistoryError("the first turn must be from the user", turn_id=first)
    pending: list[str] = []  # tool_use ids the next user message must answer first
    pending_owner: TurnId = ""
    used: dict[str, str] = {}  # every tool_use id in the request (unique across it), its name
    last = len(messages) - 1
    for i, message in enumerate(messages):
        blocks = message["content"]
        if message["role"] == "user":
            if not pending:
                for b in blocks:
                    if b.get("type") == "tool_result":
                        break
                else:
                    continue  # no tool_result, and none owed: nothing to check
            answered: list[str] = []
            leading = True
            for j, b in enumerate(blocks):
                if b.get("type") == "tool_result":
                    if not leading:
                        who = owner(i, j)
                        raise HistoryError(
                            f"turn {who}: tool_result blocks must come before any other "
                            "content in their message",
                            turn_id=who,
                        )
                    tid = b.get("tool_use_id")
                    if tid not in pending:
                        who = owner(i, j)
                        raise HistoryError(
                            f"turn {who}: tool_result for {tid} answers no tool_use "
                            "in the turn before it",
                            turn_id=who,
                        )
                    if tid in answered:
                        who = owner(i, j)
                        raise HistoryError(
                            f"turn {who}: a second tool_result for {tid}", turn_id=who
                        )
                    answered.append(tid)
                else:
                    leading = False
            if not pending:
                continue
            missing = [t for t in pending if t not in answered]
            if missing and final_pending_ok and i == last and leading:
                # Results still being added one by one (parallel tool use): not an error yet.
                pending = missing
                continue
            if missing:
                raise HistoryError(
                    f"turn {pending_owner}: tool_use {', '.join(missing)} has no tool_result "
                    "at the start of the next user turn",
                    turn_id=pending_owner,
                )
            pending = []
        else:
            if pending:
                raise HistoryError(
                    f"turn {pending_owner}: tool_use {', '.join(pending)} has no tool_result "
                    "at the start of the next user turn",
                    turn_id=pending_owner,
                )
            for j, b in enumerate(blocks):
                if b.get("type") == "tool_use":
                    uid = b.get("id")
                    if not isinstance(uid, str) or not uid or uid in used:
                        who = owner(i, j)
                        raise HistoryError(
                            f"turn {who}: a tool_use needs an id no other tool_use in the "
                            f"branch has ({uid!r})",
                            turn_id=who,
                        )
                    used[uid] = b.get("name")
                    pending.append(uid)
                    pending_owner = owner(i, j)
    if pending and not final_pending_ok:
        raise HistoryError(
            f"turn {pending_owner}: tool_use {', '.join(pending)} awaits a tool_result: "
            "add the results before sending",
            turn_id=pending_owner,
        )
    return list(dict.fromkeys(n for n in used.values() if isinstance(n, str)))


def _check_tools(body: Mapping[str, Any]) -> None:
    """What the API refuses of tools and tool_choice together: two tools of one name, a choice
    that needs tools when there are none, a named choice of a tool not defined."""
    names = [t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
    repeated = sorted({str(n) for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"two tools have the same name: {', '.join(repeated)}")
    choice = body.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") == "none":
        return
    if not names:
        raise InvalidInput(f"tool_choice {choice.get('type')!r} needs tools, and the request defines none")
    if choice.get("type") == "tool" and choice.get("name") not in names:
        raise InvalidInput(f"tool_choice names tool {choice.get('name')!r}, which the request does not define")


def manual_thinking(settings: Mapping[str, Any]) -> bool:
    """Extended thinking with a budget (type "enabled"). The API's rules for it do not all hold
    for adaptive thinking, where Claude may skip thinking and a forced tool call is allowed."""
    thinking = settings.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") == "enabled"


def _check_thinking_tool_loop(
    messages: list[dict[str, Any]], owners: list[TurnId], settings: Mapping[str, Any]
) -> None:
    """With manual thinking on, the API wants the assistant turn whose tool uses the request
    answers to start with its thinking (as Claude wrote it): an edited or hand-written
    tool_use turn has none."""
    if not manual_thinking(settings) or len(messages) < 2 or messages[-1]["role"] != "user":
        return
    first = messages[-1]["content"][0] if messages[-1]["content"] else {}
    if first.get("type") != "tool_result":
        return
    blocks = messages[-2]["content"]
    if blocks and blocks[0].get("type") not in ("thinking", "redacted_thinking"):
        who = owners[-2]
        raise HistoryError(
            f"turn {who}: with extended thinking on, the assistant turn whose tool uses are "
            "being answered must start with Claude's thinking, and this one does not (edited "
            "or written by hand?): turn thinking off for this request (thinking=None) or "
            "answer a reply Claude wrote",
            turn_id=who,
        )


def _check_prefill(
    messages: list[dict[str, Any]],
    path: Sequence[TurnRecord],
    settings: Mapping[str, Any],
    prefill_models: Mapping[str, bool] | None,
) -> None:
    if messages[-1]["role"] != "assistant":
        return
    last = path[-1]
    if last.kind == "reply" and last.stop_reason == "pause_turn":
        return  # the API's documented way to let the model continue a paused turn
    model = settings["model"]
    if not supports_prefill(model, prefill_models):
        raise PrefillNotSupported(
            f"model {model} does not accept prefill (a final assistant turn {last.id}): "
            "end the branch with a user turn or use a model that accepts prefill",
            turn_id=last.id,
        )
    thinking = settings.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        raise HistoryError(
            f"turn {last.id}: prefill is not allowed with extended thinking", turn_id=last.id
        )
    final = messages[-1]["content"][-1]
    if final.get("type") == "text" and final["text"] != final["text"].rstrip():
        raise HistoryError(
            f"turn {last.id}: a prefill cannot end with whitespace", turn_id=last.id
        )


def _media_blocks(messages: list[dict[str, Any]]) -> list[Block]:
    found = []
    for m in messages:
        for b in m["content"]:
            if b.get("type") in ("image", "document"):
                found.append(b)
            elif b.get("type") == "tool_result" and isinstance(b.get("content"), list):
                found.extend(x for x in b["content"] if x.get("type") in ("image", "document"))
    return found


def _check_media(messages: list[dict[str, Any]]) -> int:
    """Refuse image counts and sizes the API would; return the blob bytes to inline."""
    media = _media_blocks(messages)
    images = [b for b in media if b["type"] == "image"]
    if len(images) > MAX_IMAGES:
        raise HistoryError(f"the request carries {len(images)} images: the API takes {MAX_IMAGES}")
    refs = [b["source"] for b in media if b.get("source", {}).get("type") == BLOB_SOURCE]
    if len(images) > MANY_IMAGES:
        for r in refs:
            side = max(r.get("width", 0), r.get("height", 0))
            if r["media_type"].startswith("image/") and side > MANY_IMAGES_MAX_SIDE:
                raise HistoryError(
                    f"with more than {MANY_IMAGES} images each must be at most "
                    f"{MANY_IMAGES_MAX_SIDE} px a side; one is {r.get('width')}x{r.get('height')}"
                )
    return sum(int(r.get("size", 0)) for r in refs)


def _markers(tools: Any, system: Any) -> list[Any]:
    """The cache_control markers on tools, then on system blocks: the API's order."""
    items = (tools if isinstance(tools, list) else []) + (system if isinstance(system, list) else [])
    return [item["cache_control"] for item in items if isinstance(item, dict) and "cache_control" in item]


def check_cache_markers(tools: Any, system: Any, cache: Any) -> None:
    """Refuse cache markers the API would: more than four (the automatic one of `cache`
    counts), or a 1-hour marker after a 5-minute one (the API reads tools, then system, then
    messages, where the automatic marker goes, and wants the longer lifetimes first)."""
    marks = _markers(tools, system)
    for m in marks:
        if not isinstance(m, dict) or m.get("type") != "ephemeral" or m.get("ttl", "5m") not in CACHE_TTLS:
            raise InvalidInput(
                f"a cache_control marker must be {{'type': 'ephemeral'}}, with a ttl of "
                f"{' or '.join(CACHE_TTLS)} if any: {m!r}"
            )
    if cache and cache not in ("off", False):
        marks.append({"ttl": cache})  # the automatic one, last: it goes on the messages
    if len(marks) > MAX_CACHE_BREAKPOINTS:
        raise InvalidInput(
            f"{len(marks)} cache_control markers (tools, system and the automatic one of cache="
            f"{cache!r}): the API takes at most {MAX_CACHE_BREAKPOINTS}"
        )
    seen_short = False
    for m in marks:
        ttl = m.get("ttl", "5m")
        if ttl == "1h" and seen_short:
            raise InvalidInput(
                "a 1-hour cache marker comes after a 5-minute one (tools, then system, then the "
                "automatic one of cache): the API refuses that order; use the same lifetime, "
                "or the longer one first"
            )
        seen_short = seen_short or ttl != "1h"


def build_request(
    path: Sequence[TurnRecord],
    settings: Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    blobs: Mapping[str, bytes] | None = None,
    prefill_models: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """The exact JSON body of the next POST /v1/messages for this path. The body shares its
    blocks, and a message's list with the turn it came from, with `path`: copy it before
    changing either (a resume builds it from turns read for it alone)."""
    s = merge_settings(settings, overrides)
    if not s.get("model"):
        raise InvalidInput("no model set")
    if not isinstance(s.get("max_tokens"), int) or s["max_tokens"] < 1:
        raise InvalidInput("max_tokens must be a positive integer")
    messages, owners, _ = _build_messages(path, with_block_owners=False)
    try:
        tools_used = check_messages(messages, owners)
    except HistoryError:
        # Build again with each block's turn, so the error names the very turn at fault.
        again, owners, block_owners = _build_messages(path)
        check_messages(again, owners, block_owners=block_owners)
        raise
    _check_prefill(messages, path, s, prefill_models)
    _check_thinking_tool_loop(messages, owners, s)
    if blobs is not None:
        # The store passes blobs (maybe empty) only when the path holds media, so a text-only
        # thread of 10,000 exchanges is not walked block by block here.
        blob_bytes = _check_media(messages)
        if blob_bytes * 4 // 3 > MAX_REQUEST_BYTES:
            raise HistoryError(
                f"images and documents in this branch come to about {blob_bytes * 4 // 3:,} "
                f"bytes of base64, over the API's {MAX_REQUEST_BYTES:,}-byte request limit"
            )
        for m in messages:
            if blob_refs(m["content"]):
                m["content"] = inline_blobs(m["content"], dict(blobs))

    body: dict[str, Any] = {"model": s["model"], "max_tokens": s["max_tokens"]}
    if s.get("system"):
        body["system"] = s["system"]
    body["messages"] = messages
    for key in REQUEST_PARAMS:
        if s.get(key) is not None:
            body[key] = s[key]
    _check_tools(body)
    if not body.get("tools") and not tools_used and body.get("tool_choice", {}).get("type") == "none":
        del body["tool_choice"]  # (no tools to call: the same request, without what needs tools)
    if manual_thinking(s):
        budget, most = s["thinking"].get("budget_tokens"), s["max_tokens"]
        if isinstance(budget, bool) or not isinstance(budget, int) or not MIN_THINKING_BUDGET <= budget < most:
            raise InvalidInput(
                f"thinking.budget_tokens must be an integer from {MIN_THINKING_BUDGET:,} up to "
                f"max_tokens ({most:,}), not including it: {budget!r}"
            )
    if tools_used and not body.get("tools"):
        # The API refuses tool_use and tool_result blocks in a request that defines no tools
        # (after run() or send_json(), whose tools were the request's own). Name them again,
        # and let the model call none of them: nothing here would run it.
        body["tools"] = [
            {"name": n, "description": REPLAYED_TOOL, "input_schema": {"type": "object"}}
            for n in tools_used
        ]
        body["tool_choice"] = {"type": "none"}
    cache = s.get("cache")
    if cache and cache != "off":
        if cache not in CACHE_TTLS:
            raise InvalidInput(f"cache must be one of {', '.join(CACHE_TTLS)} or off, not {cache!r}")
        body["cache_control"] = (
            {"type": "ephemeral"} if cache == "5m" else {"type": "ephemeral", "ttl": "1h"}
        )
    check_cache_markers(body.get("tools"), body.get("system"), cache)
    return body
