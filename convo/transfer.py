"""Export a conversation as JSON, and import one, whole or not at all.

The export holds the whole tree (every turn of every branch, images inlined as base64), the
branch names and the calls ledger, so an imported thread replays byte-for-byte and its audit is
intact. It never holds the API key: convo never stores it. Imports get new ids, so a file can be
imported twice, or into the database it came from, without clashing.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from convo.content import BLOB_SOURCE, blank_text, check_json, inline_blobs, normalize
from convo.errors import InvalidInput
from convo.history import TurnRecord, check_structure
from convo.ids import check_branch_name, is_text, without_controls
from convo.models import ROLE_OF_KIND
from convo.store import Storage

FORMAT: Literal["convo.conversation/1"] = "convo.conversation/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Int32 = Annotated[int, Field(ge=0, le=2**31 - 1)]
# Turn ids only name turns within the file (an import numbers them afresh): convo writes its
# integer ids; text ids, as exports before integer keys had, are read too.
TurnRef = Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=200)]


def _utc(value: datetime) -> datetime:
    """An instant as convo stores it, in UTC (a naive one read as UTC): one whose zone puts it
    outside the years 1-9999 there cannot be stored."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once in UTC") from None


Instant = Annotated[datetime, AfterValidator(_utc)]


def _storable(value: str | None) -> str | None:
    """Text every engine stores: no lone surrogate; a NUL, which SQLite keeps and PostgreSQL
    refuses, replaced (an export from one imports into the other)."""
    if value is None:
        return None
    if not is_text(value):
        raise ValueError("holds a lone surrogate")
    return value.replace("\x00", "\ufffd")


def _identifier(value: str | None) -> str | None:
    """A name the API gave (a stop reason, a request id): stored as a send stores it, with its
    control characters replaced, so that nothing imported prints a line break or an escape."""
    value = _storable(value)
    return None if value is None else without_controls(value)


class TurnExport(_Strict):
    id: TurnRef
    parent_id: TurnRef | None
    role: Literal["user", "assistant"]
    kind: Literal["user", "reply", "synthetic", "prefill", "tool_result"]
    content: list[dict[str, Any]] = Field(min_length=1)
    source_id: TurnRef | None = None
    stop_reason: Annotated[str | None, AfterValidator(_identifier)] = Field(default=None, max_length=40)
    created_at: Instant


class BranchExport(_Strict):
    name: str = Field(min_length=1, max_length=200)
    head_id: TurnRef | None


class ConversationExport(_Strict):
    id: str
    title: str | None
    model: str = Field(min_length=1, max_length=200)
    system: str | list[dict[str, Any]] | None
    params: dict[str, Any]
    current_branch: str = Field(max_length=200)
    created_at: Instant
    updated_at: Instant


class CallExport(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int | str
    branch: str = Field(min_length=1, max_length=200)
    turn_id: TurnRef | None = None
    reply_id: TurnRef | None = None
    attempt: Int32 = 0
    model: str = Field(min_length=1, max_length=200)
    streamed: Int32 = 0
    status: Literal["pending", "ok", "error", "cut", "cancelled", "abandoned"]
    http_status: Int32 | None = None
    error_type: str | None = Field(default=None, max_length=64)
    error_message: str | None = None
    request_id: str | None = Field(default=None, max_length=200)
    message_id: str | None = Field(default=None, max_length=200)
    stop_reason: str | None = Field(default=None, max_length=40)
    stop_sequence: str | None = None
    partial_text: str | None = None
    input_tokens: Int32 = 0
    output_tokens: Int32 = 0
    cache_creation_input_tokens: Int32 = 0
    cache_read_input_tokens: Int32 = 0
    cache_creation_5m_input_tokens: Int32 | None = None
    cache_creation_1h_input_tokens: Int32 | None = None
    # (Never below zero: a negative cost would lower every audit and budget it counts in.)
    # (At most a million USD a call: one absurd figure would make every store total infinite.)
    cost_usd: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    uncached_cost_usd: float | None = Field(default=None, ge=0, le=1e6, allow_inf_nan=False)
    started_at: Instant
    finished_at: Instant | None = None
    duration_ms: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("duration_ms")
    @classmethod
    def _not_negative(cls, value: float | None) -> float | None:
        """A clock stepped back during a call once stored a negative duration: read as 0."""
        return None if value is None else max(0.0, value)

    @field_validator("error_message", "stop_sequence", "partial_text")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return _storable(value)

    @field_validator("branch", "model", "error_type", "request_id", "message_id", "stop_reason")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        """Names printed a row each by usage reports and `show`. A call's branch and model are
        a record, never edited: an older store's (a branch name convo once allowed) are kept,
        their control characters replaced, not refused."""
        return _identifier(value)


class Export(_Strict):
    format: Literal["convo.conversation/1"]
    conversation: ConversationExport
    turns: list[TurnExport]
    branches: list[BranchExport] = Field(min_length=1)
    calls: list[CallExport] = []


def export_conversation(storage: Storage, conv_id: str) -> dict[str, Any]:
    """The conversation as plain JSON-serializable data, as it was at one moment (a send
    finishing meanwhile is in it whole or not at all)."""
    with storage.one_read() as conn:
        info = storage.conversation_on(conn, conv_id)
        turns = storage.turns(conv_id, conn)
        path_blobs = storage.blobs_of(turns, conn)
        branches = storage.branches(conv_id, conn)
        calls = storage.calls(conv_id, conn)
    data = Export(
        format=FORMAT,
        conversation=ConversationExport(
            id=info.id,
            title=info.title,
            model=info.model,
            system=info.system,
            params=info.params,
            current_branch=info.current_branch,
            created_at=info.created_at,
            updated_at=info.updated_at,
        ),
        turns=[
            TurnExport(
                id=t.id,
                parent_id=t.parent_id,
                role=t.role,  # type: ignore[arg-type]
                kind=t.kind,  # type: ignore[arg-type]
                content=inline_blobs(t.content, path_blobs),
                source_id=t.source_id,
                stop_reason=t.stop_reason,
                created_at=t.created_at,
            )
            for t in turns
        ],
        branches=[BranchExport(name=b.name, head_id=b.head_id) for b in branches],
        calls=[CallExport.model_validate(c) for c in calls],
    )
    return data.model_dump(mode="json")


def parse_export(data: Any) -> Export:
    """A validated export, or InvalidInput naming the first problem."""
    try:
        export = Export.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise InvalidInput(f"not a convo export: {where}: {err['msg']}{more}") from None
    ids = {t.id for t in export.turns}
    if len(ids) != len(export.turns):
        raise InvalidInput("not a convo export: duplicate turn ids")
    for t in export.turns:
        if t.parent_id is not None and t.parent_id not in ids:
            raise InvalidInput(f"not a convo export: turn {t.id} has an unknown parent")
        if t.source_id is not None and t.source_id not in ids:
            raise InvalidInput(f"not a convo export: turn {t.id} edits an unknown turn")
    # Every turn a call names is in the file (turns leave only with their conversation): an
    # unknown one would be imported as no turn at all, and the audit would lose the link.
    for n, c in enumerate(export.calls):
        for ref in (c.turn_id, c.reply_id):
            if ref is not None and ref not in ids:
                raise InvalidInput(f"not a convo export: call {n + 1} refers to an unknown turn {ref}")
    names = [b.name for b in export.branches]
    for name in names:
        try:
            check_branch_name(name)
        except InvalidInput as e:
            raise InvalidInput(f"not a convo export: {e}") from None
    if len(set(names)) != len(names):
        raise InvalidInput("not a convo export: two branches share a name")
    for b in export.branches:
        if b.head_id is not None and b.head_id not in ids:
            raise InvalidInput(f"not a convo export: branch {b.name!r} has an unknown head")
    reached: set[int | str] = set()
    children: dict[int | str | None, list[int | str]] = {}
    for t in export.turns:
        children.setdefault(t.parent_id, []).append(t.id)
    stack = list(children.get(None, []))
    while stack:
        tid = stack.pop()
        reached.add(tid)
        stack.extend(children.get(tid, []))
    if len(reached) != len(ids):
        raise InvalidInput("not a convo export: some turns are not reachable from a root")
    if export.conversation.current_branch not in {b.name for b in export.branches}:
        raise InvalidInput("not a convo export: the current branch is not among the branches")
    return export


TURN_KINDS = frozenset((role, kind) for kind, role in ROLE_OF_KIND.items())


def _check_conversation(conv: ConversationExport) -> None:
    """The settings an imported conversation will send with, checked as `Store.create` would."""
    from convo.service import (
        MAX_TITLE,
        _check_as_request,
        _check_limits,
        _check_model,
        _check_settings,
        _check_system,
        _check_title,
        _tool_defs,
    )

    params = dict(conv.params)
    limits = {k: params.pop(k) for k in ("budget_usd", "max_input_tokens") if k in params}
    try:
        _check_model(conv.model)
        if conv.title is not None and conv.title.strip():
            # (A blank one, which convo once kept, imports as none; a long one is cut.)
            _check_title(conv.title[:MAX_TITLE])
        _check_limits({k: v for k, v in limits.items() if v is not None})
        _check_settings(params)
        tools = params.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise InvalidInput("tools must be a list of tool definitions")
            _tool_defs(tools)  # each checked as create checks it (the stored form is kept)
        system = None if _blank(conv.system) else conv.system  # (blank: none, as convo once stored it)
        if system is not None:
            _check_system(system)
        _check_as_request(conv.model, system, params)
    except InvalidInput as e:
        raise InvalidInput(f"not a convo export: conversation settings: {e}") from None
    if "max_tokens" not in params:
        raise InvalidInput("not a convo export: conversation settings lack max_tokens")


def _check_reply_media(blocks: list[Any], where: str) -> None:
    """A reply is kept as the API sent it, but what the store does with media in it must hold:
    base64 that decodes (its bytes are stored once, by content), and never convo's own blob
    reference, which only the store writes (an export carries the bytes instead)."""
    for b in blocks:
        if not isinstance(b, dict):
            continue
        source = b.get("source")
        if isinstance(source, dict) and source.get("type") == BLOB_SOURCE:
            raise InvalidInput(f"not a convo export: {where} holds a {BLOB_SOURCE} source")
        if b.get("type") in ("image", "document") and source is not None:
            if not isinstance(source, dict):
                raise InvalidInput(f"not a convo export: {where}: a {b['type']} source must be an object")
            if source.get("type") == "base64":
                data = source.get("data")
                try:
                    if not isinstance(data, str):
                        raise ValueError("not a string")
                    base64.b64decode("".join(data.split()), validate=True)  # (line breaks are fine)
                except ValueError as e:  # binascii.Error is one
                    raise InvalidInput(f"not a convo export: {where}: bad base64 data ({e})") from None
        if b.get("type") == "tool_result" and isinstance(b.get("content"), list):
            _check_reply_media(b["content"], where)


def _blank(system: Any) -> bool:
    """A system prompt older convo stored from empty input ("", or "\\n" from a pipe)."""
    return system is None or (isinstance(system, str) and not system.strip())


def import_conversation(storage: Storage, data: Any) -> str:
    """Import an export in one transaction; returns the new conversation id.

    Turns a person wrote are checked like new input, replies are kept as the API sent them,
    and every branch must replay (tool pairing) before anything is written.
    """
    export = parse_export(data)
    _check_conversation(export.conversation)
    by_id = {t.id: t for t in export.turns}
    for t in export.turns:
        if (t.role, t.kind) not in TURN_KINDS:
            raise InvalidInput(f"not a convo export: turn {t.id} is a {t.role} turn of kind {t.kind}")
    for t in export.turns:
        if t.kind != "reply":
            normalize(t.content, t.role, where=f"turn {t.id}")
        else:
            check_json(t.content, f"turn {t.id}")
            _check_reply_media(t.content, f"turn {t.id}")
            # As a send stores a reply: without blank text blocks, which the API refuses.
            t.content = [b for b in t.content if not blank_text(b)]
            if not t.content:
                raise InvalidInput(f"not a convo export: reply turn {t.id} holds only blank text")
    for b in export.branches:
        path: list[TurnRecord] = []
        cur = b.head_id
        while cur is not None:
            t = by_id[cur]
            path.append(TurnRecord(t.id, t.role, t.kind, t.content, t.stop_reason))
            cur = t.parent_id
            if len(path) > len(by_id):
                raise InvalidInput("not a convo export: the turns form a cycle")
        check_structure(path[::-1], final_pending_ok=True)
    conversation = export.conversation.model_dump()
    if conversation["title"] is not None:
        from convo.service import MAX_TITLE

        conversation["title"] = conversation["title"][:MAX_TITLE] if conversation["title"].strip() else None
    if _blank(conversation["system"]):
        conversation["system"] = None  # (it would be sent, and the API refuses a blank one)
    return storage.import_tree(
        conversation,
        [t.model_dump() for t in export.turns],
        [b.model_dump() for b in export.branches],
        [_finished(c.model_dump()) for c in export.calls],
    )


def _finished(call: dict[str, Any]) -> dict[str, Any]:
    """A call exported while it was under way never finishes in the store it is imported into:
    it is abandoned there, as a send's is when its process dies holding the branch."""
    if call["status"] == "pending":
        call.update(status="abandoned", error_type="abandoned",
                    error_message="under way when exported: it never finished in this copy")
    return call
