"""The service layer: a `Store` of `Conversation`s that send, stream, retry, branch and audit.

How a send keeps its promises (nothing lost, nothing duplicated):
1. Validate and build the request first: a refused request writes nothing.
2. In one transaction, append the user turn (and prefill) at the branch head and lease the
   branch, so a second writer on the same branch waits for this send to finish instead of
   interleaving its turns. The user turn is committed before any request is made.
3. Each API attempt is a row in the calls ledger, written before the request and completed
   after it, whatever happened (error, cut stream, Ctrl-C).
4. The reply, the branch head and the call's usage are committed in one transaction.
A failed send leaves the user turn as the branch head: `retry()` sends that same head again, and
`send(text)` on it sends both user turns together as one message (the API merges them).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path as FilePath
from typing import Any, Literal, cast, overload

from pydantic import BaseModel, ConfigDict

from convo import config, db
from convo.capabilities import prefill_overrides_from_env
from convo.client import Client, check_settings_json
from convo.content import blank_text, image_block, normalize
from convo.errors import (
    APIError,
    APIStatusError,
    BudgetExceeded,
    Conflict,
    ConvoError,
    HistoryError,
    InvalidInput,
    StoreError,
)
from convo.history import (
    SETTING_KEYS,
    TurnRecord,
    build_request,
    check_structure,
    is_continued,
)
from convo.ids import check_branch_name, is_text, without_controls
from convo.pricing import PriceTable, load_prices
from convo.retry import RetryPolicy
from convo.store import (
    STORE_BUDGET_KEY,
    Branching,
    BranchRow,
    ConversationRow,
    ConversationSummary,
    Deleted,
    FirstCall,
    NewTurn,
    Path,
    Storage,
    TurnRow,
    UsageReport,
    gc_paused,
    lease_owner_id,
    now,
)
from convo.stream import MessageAccumulator
from convo.tokens import estimate_input_tokens, estimate_text_tokens
from convo.types import Block, ToolUse, Usage, text_of, tool_uses_of

DEFAULT_MODEL = "claude-sonnet-4-5"
DEFAULT_MAX_TOKENS = 1024
# How long a send holds its branch; a holder that died on this host is detected sooner.
LEASE = timedelta(minutes=15)
LEASE_RENEW_SECONDS = 60.0
# How long a second writer on a busy branch waits before raising Conflict.
WAIT_FOR_BRANCH_SECONDS = 120.0
KEEP = object()  # "leave this setting as it is"


class Reply(BaseModel):
    """Claude's answer as stored: prefill + continuation in `text`, usage and cost of the call."""

    model_config = ConfigDict(frozen=True)

    turn_id: int | None
    call_id: int
    model: str
    content: list[Block]
    text: str
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage
    cost_usd: float | None
    message_id: str | None
    request_id: str | None

    @property
    def tool_uses(self) -> list[ToolUse]:
        return tool_uses_of(self.content)


@dataclass(frozen=True)
class _Target:
    """Where a send's reply goes: after `last_id` (at `last_depth`) on `branch`, leased to
    `owner`; `prefill_text` leads the reply's text."""

    branch: str
    last_id: int
    last_depth: int
    owner: str
    prefill_text: str


@dataclass(frozen=True)
class RetryNotice:
    """Yielded inside a stream when an attempt failed and another one starts."""

    attempt: int
    error: APIError
    delay: float


class Store:
    """Conversations in a SQL database; SQLite by default, PostgreSQL by URL."""

    def __init__(
        self,
        url: str | None = None,
        *,
        upgrade: bool | None = None,
        client: Client | None = None,
        prices: PriceTable | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wait_for_branch: float = WAIT_FOR_BRANCH_SECONDS,
    ) -> None:
        if prices is not None and not isinstance(prices, PriceTable):
            raise InvalidInput("prices must be a PriceTable (see convo.pricing.load_prices)")
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise InvalidInput("policy must be a RetryPolicy")
        if client is not None and not isinstance(client, Client):
            raise InvalidInput("client must be a convo Client")
        if not callable(sleep):
            raise InvalidInput("sleep must be a function of seconds")
        if isinstance(wait_for_branch, bool) or not isinstance(wait_for_branch, int | float) or not (
            0 <= wait_for_branch < float("inf")
        ):
            raise InvalidInput("wait_for_branch must be a number of seconds, 0 or more")
        self.url = config.database_url(url)
        database = db.Database(self.url)
        if upgrade is None:
            # The embedded default manages itself; a shared server is upgraded on purpose.
            upgrade = database.name == "sqlite"
        try:
            db.ensure_schema(database, upgrade=upgrade)
        except BaseException:
            database.close()
            raise
        self.storage = Storage(database)
        self._client = client
        self._owns_client = client is None
        self.prices = prices if prices is not None else load_prices()
        self.prefill_models = prefill_overrides_from_env()
        self.policy = policy
        self.sleep = sleep
        self.wait_for_branch = wait_for_branch
        self.closed = False

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = (
                Client(sleep=self.sleep, policy=self.policy) if self.policy else Client(sleep=self.sleep)
            )
        return self._client

    @property
    def retry_policy(self) -> RetryPolicy:
        return self.policy or self.client.policy

    def close(self) -> None:
        """Close the connections and the HTTP client the Store made. A send already under way
        in another thread still finishes; a new one is refused before it writes anything."""
        self.closed = True
        if self._client is not None and self._owns_client:
            self._client.close()
        self.storage.database.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(
        self,
        model: str = DEFAULT_MODEL,
        *,
        system: str | list[Block] | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        title: str | None = None,
        cache: str | None = "5m",
        budget_usd: float | None = None,
        max_input_tokens: int | None = None,
        tools: Sequence[Any] | None = None,
        **params: Any,
    ) -> Conversation:
        """A new conversation with one branch, `main`; `params` are default request settings."""
        settings = _check_settings(
            {"max_tokens": max_tokens, "cache": cache, "tools": _tool_defs(tools), **params}
        )
        if system is not None:
            _check_system(system)
        _check_model(model)
        _check_as_request(model, system, settings)
        extra = {k: v for k, v in (("budget_usd", budget_usd), ("max_input_tokens", max_input_tokens)) if v is not None}
        _check_limits(extra)
        _check_title(title)
        row = self.storage.create_conversation(
            model=model, system=system, params={**settings, **extra}, title=title
        )
        return Conversation(self, row.id)

    def get(self, ref: str) -> Conversation:
        """A conversation by id or unique id prefix."""
        return Conversation(self, self.storage.resolve_conversation(ref))

    def latest(self) -> Conversation | None:
        row = self.storage.most_recent()
        return Conversation(self, row.id) if row else None

    def list(self, limit: int | None = None) -> list[ConversationSummary]:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit < 2**31):
            raise InvalidInput("limit must be a positive integer, or None for all")
        return self.storage.list_conversations(limit)

    def usage(
        self,
        conversation: str | None = None,
        branch: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        by: str = "conversation",
    ) -> UsageReport:
        since, until = _instant(since, "since"), _instant(until, "until")
        if since is not None and until is not None and since > until:
            raise InvalidInput(f"since ({since.isoformat()}) is after until ({until.isoformat()})")
        if branch is not None:
            _branch_ref(branch)
        if conversation is not None and (not isinstance(conversation, str) or not conversation):
            raise InvalidInput("conversation must be a conversation id, or None for all")
        cid = self.storage.conversation(conversation).id if conversation else None
        return self.storage.usage(conversation=cid, branch=branch, since=since, until=until, by=by)

    def delete(self, ref: str) -> Deleted:
        """Delete a conversation for good: its turns, branches and calls in the ledger (so
        store-wide usage no longer counts them), and images only it held. Refused (Conflict)
        while a send is running on it. `export` it first to keep a record."""
        return self.storage.delete_conversation(self.storage.resolve_conversation(ref))

    def export(self, ref: str) -> dict[str, Any]:
        """A conversation's whole tree, branches and ledger as JSON-serializable data."""
        from convo.transfer import export_conversation

        return export_conversation(self.storage, self.storage.resolve_conversation(ref))

    def import_(self, data: Any) -> Conversation:
        """Import an export (from this or another store) under new ids, all or nothing."""
        from convo.transfer import import_conversation

        return Conversation(self, import_conversation(self.storage, data))

    def set_budget(self, usd: float | None) -> None:
        """A spending cap for the whole store, checked before every send (None removes it)."""
        _check_limits({"budget_usd": usd} if usd is not None else {})
        self.storage.set_setting(STORE_BUDGET_KEY, usd)

    @property
    def budget(self) -> float | None:
        value = self.storage.get_setting(STORE_BUDGET_KEY)
        return None if value is None else float(value)


def _tool_defs(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidInput("tools must be a list of tool definitions, Tool objects or functions")
    from convo.tools import tool_definition

    return [tool_definition(t) for t in tools]


def _instant(value: Any, name: str) -> datetime | None:
    """A usage window's end as an aware datetime in UTC (naive means UTC, as the store keeps
    time)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{name} must be a datetime, not {type(value).__name__}")
    try:
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).astimezone(UTC)
    except OverflowError:
        raise InvalidInput(f"{name} is out of range: {value.isoformat()}") from None


def _worst_input_price(price: Any, body: Mapping[str, Any]) -> float:
    """USD per million input tokens at worst: a cache write's price if the body caches."""
    found: list[Any] = [body.get("cache_control")]
    for part in (body.get("system"), body.get("tools")):
        if isinstance(part, list):
            found += [b.get("cache_control") for b in part if isinstance(b, dict)]
    marks = [m for m in found if isinstance(m, dict)]
    if not marks:
        return float(price.input)
    write = price.cache_write_1h if any(m.get("ttl") == "1h" for m in marks) else price.cache_write_5m
    return float(max(price.input, write))


def _check_model(model: Any) -> None:
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        raise InvalidInput("model must be a non-empty string of at most 200 characters")
    _check_utf8(model, "model")
    if model != model.strip() or not model.isprintable():
        raise InvalidInput(f"model {model.strip()[:60]!r} has surrounding spaces or a control character")


MAX_TITLE = 1000


def _check_title(title: Any) -> None:
    if title is None:
        return
    if not isinstance(title, str) or not title.strip():
        raise InvalidInput("title must be a non-blank string, or None for no title")
    if len(title) > MAX_TITLE or "\x00" in title:
        raise InvalidInput(f"a title is at most {MAX_TITLE} characters, with no NUL")
    _check_utf8(title, "title")


def _branch_ref(name: Any) -> None:
    """A branch name to look up: a string any engine can compare (names an older convo allowed
    are found; `check_branch_name` holds new ones to more)."""
    if not isinstance(name, str):
        raise InvalidInput(f"a branch name is a string, not {type(name).__name__}")
    _check_utf8(name, "the branch name")
    if "\x00" in name:
        raise InvalidInput("a branch name holds no NUL")


def _check_utf8(text: str, what: str) -> None:
    if not is_text(text):
        raise InvalidInput(f"{what} is not valid text (it holds a lone surrogate)")


def _check_system(system: Any) -> None:
    if isinstance(system, str):
        texts = [system]
    elif isinstance(system, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        for b in system
    ):
        texts = [b["text"] for b in system]
    else:
        raise InvalidInput("system must be a string or a list of text blocks")
    # (`echo | convo new --system -` gave "\n": the API refuses a blank text block.)
    if not texts or any(not t.strip() for t in texts):
        raise InvalidInput("the system prompt is empty or only whitespace")
    check_settings_json({"system": system})


def _check_as_request(model: Any, system: Any, settings: Mapping[str, Any]) -> None:
    """Settings as a request would carry them, built into one with a placeholder turn: what
    the builder refuses (tools and tool_choice together, a thinking budget, cache markers) is
    refused when the settings are given, not at every send after."""
    request = {k: v for k, v in settings.items() if k in SETTING_KEYS}
    if not request.get("tools"):
        # A tool_choice with no tools of the conversation's own is for requests that bring
        # theirs (run(), send(tools=...)): checked then.
        request.pop("tool_choice", None)
    request.update(model=model, system=system)
    build_request([TurnRecord(0, "user", "user", [{"type": "text", "text": "."}])], request)


def _check_limits(values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        # (Finite: stored as JSON, an infinity or NaN would come back as null, no limit at all.)
        if (
            isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 < value < float("inf")
        ):
            raise InvalidInput(f"{key} must be a positive, finite number")
        if key == "max_input_tokens" and isinstance(value, float) and not value.is_integer():
            raise InvalidInput("max_input_tokens must be a whole number of tokens")


def _check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Known request settings with sane types; None values are dropped."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        if key not in SETTING_KEYS or key in ("model", "system"):
            raise InvalidInput(f"unknown request setting {key!r}")
        if key == "max_tokens" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInput("max_tokens must be a positive integer")
        if key in ("temperature", "top_p") and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
        ):
            raise InvalidInput(f"{key} must be a number from 0 to 1")
        if key == "top_k" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInput("top_k must be a positive integer")
        if key == "stop_sequences" and (
            not isinstance(value, list) or not all(isinstance(s, str) and s for s in value)
        ):
            raise InvalidInput("stop_sequences must be a list of non-empty strings")
        if key == "cache" and not (value is False or value in ("5m", "1h", "off")):
            raise InvalidInput("cache must be '5m', '1h' or 'off'")
        if key == "cache" and (value is False or value == "off"):
            continue
        if key == "tool_choice":
            _check_tool_choice(value)
        if key in ("metadata", "thinking") and not isinstance(value, dict):
            raise InvalidInput(f"{key} must be an object")
        out[key] = value
    # (Stored by orjson, a NaN deep in metadata or a tool's schema would come back as null.)
    check_settings_json(out)
    return out


def _check_tool_choice(value: Any) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidInput("tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'}")
    if kind == "tool" and not isinstance(value.get("name"), str):
        raise InvalidInput("tool_choice of type 'tool' needs a tool name")


class Conversation:
    """A handle on one stored conversation; every call reads the current state from the store."""

    def __init__(self, store: Store, conversation_id: str) -> None:
        self.store = store
        self.id = conversation_id

    def __repr__(self) -> str:
        return f"Conversation({self.id!r})"

    # -- reading ---------------------------------------------------------------------------

    @property
    def info(self) -> ConversationRow:
        return self.store.storage.conversation(self.id)

    @property
    def branch(self) -> str:
        return self.info.current_branch

    def settings(self, info: ConversationRow | None = None) -> dict[str, Any]:
        info = info or self.info
        s = {k: v for k, v in info.params.items() if k in SETTING_KEYS}
        s["model"] = info.model
        if info.system is not None:
            s["system"] = info.system
        return s

    def turns(self, branch: str | None = None) -> list[TurnRecord]:
        """The branch's path from the root, as the history builder sees it."""
        if branch is not None:
            _branch_ref(branch)
        return self.store.storage.path(self.id, branch).turns

    def turn(self, ref: int | str) -> TurnRow:
        """A turn of this conversation by id (an int, or its digits as text)."""
        return self.store.storage.resolve_turn(self.id, ref)

    def request(
        self,
        content: str | list[Block] | None = None,
        *,
        prefill: str | None = None,
        images: Sequence[str | FilePath] = (),
        **overrides: Any,
    ) -> dict[str, Any]:
        """The exact body the next send would POST, with `content` as a new user turn. Writes nothing."""
        new = self._new_turns(content, prefill, images)
        # One pause of the cyclic collector for reading and building, not one each: the path's
        # turns are freed before it resumes, so its next collection walks only the body.
        with gc_paused():
            return self._request_body(new, overrides)

    def _request_body(self, new: Sequence[NewTurn], overrides: Mapping[str, Any]) -> dict[str, Any]:
        info, path = self.store.storage.snapshot(self.id)
        return self._build(info, path, new, overrides)

    def _build(
        self,
        info: ConversationRow,
        path: Path,
        new: Sequence[NewTurn],
        overrides: Mapping[str, Any],
    ) -> dict[str, Any]:
        records = path.turns + _records(new)
        blobs = path.blobs
        if blobs is None and any(
            b.get("type") in ("image", "document") for t in new for b in t.content
        ):
            blobs = {}
        with gc_paused():
            body = build_request(
                records,
                self.settings(info),
                overrides=_normalize_overrides(overrides),
                blobs=blobs,
                prefill_models=self.store.prefill_models,
            )
        if overrides:
            # Before a send writes anything (see client.encode_body). Without overrides every
            # setting is as stored, and was checked when it was written (orjson, which stores
            # them, writes a NaN as null and refuses what it cannot encode).
            check_settings_json(body)
        return body

    def _new_turns(
        self,
        content: str | list[Block] | None,
        prefill: str | None,
        images: Sequence[str | FilePath],
    ) -> list[NewTurn]:
        new: list[NewTurn] = []
        if isinstance(images, str | bytes) or not isinstance(images, Sequence) or not all(
            isinstance(i, str | os.PathLike) for i in images
        ):
            raise InvalidInput("images must be a list of file paths")
        if content is not None or images:
            blocks = [image_block(p) for p in images]
            if content is not None:
                blocks += normalize(content, "user", where="user turn")
            new.append(NewTurn("user", "user", blocks))
        if prefill is not None:
            new.append(NewTurn("assistant", "prefill", normalize(prefill, "assistant", where="prefill")))
        return new

    # -- writing without a request ---------------------------------------------------------

    def add_user(
        self, content: str | list[Block], *, images: Sequence[str | FilePath] = ()
    ) -> int:
        """Append a user turn without sending it; returns its id."""
        if content is None and not images:
            raise InvalidInput("a user turn needs text, blocks or images")
        return self._append(self._new_turns(content, None, images))[0]

    def add_assistant(self, content: str | list[Block]) -> int:
        """Append an assistant turn a person wrote (synthetic); at the end it acts as a prefill."""
        blocks = normalize(content, "assistant", where="assistant turn")
        return self._append([NewTurn("assistant", "synthetic", blocks)])[0]

    def add_tool_result(
        self, tool_use_id: str, content: str | list[Block], *, is_error: bool = False
    ) -> int:
        """Answer a tool_use of the branch's last reply; parallel results share one user message."""
        path = self.store.storage.path(self.id)
        pending = self._pending_tool_uses(path)
        if tool_use_id not in pending:
            raise HistoryError(
                f"no unanswered tool_use {tool_use_id} at the head of branch {path.branch!r}"
                + (f" (unanswered: {', '.join(pending)})" if pending else "")
            )
        block: Block = {"type": "tool_result", "tool_use_id": tool_use_id}
        if isinstance(content, str):
            if content:
                block["content"] = content
        else:
            block["content"] = content
        if is_error:
            block["is_error"] = True
        blocks = normalize([block], "user", where="tool result")
        new = [NewTurn("user", "tool_result", blocks)]
        check_structure(path.turns + _records(new), final_pending_ok=True)
        return self.store.storage.append(self.id, path.branch, path.head_id, new)[0]

    @staticmethod
    def _pending_tool_uses(path: Path) -> list[str]:
        """tool_use ids of the last assistant turn not yet answered by the turns after it."""
        answered: set[str] = set()
        for t in reversed(path.turns):
            if t.role == "assistant":
                ids = [b["id"] for b in t.content if b.get("type") == "tool_use"]
                return [i for i in ids if i not in answered]
            answered.update(
                b["tool_use_id"] for b in t.content if b.get("type") == "tool_result"
            )
        return []

    def pending_tool_uses(self) -> list[ToolUse]:
        path = self.store.storage.path(self.id)
        pending = set(self._pending_tool_uses(path))
        for t in reversed(path.turns):
            if t.role == "assistant":
                return [u for u in tool_uses_of(t.content) if u.id in pending]
        return []

    def _append(self, new: list[NewTurn]) -> list[int]:
        """Append turns without a request, refusing any that would make the branch unsendable
        (turns are never rewritten, so a bad one could not be repaired later)."""
        path = self.store.storage.path(self.id)
        check_structure(path.turns + _records(new), final_pending_ok=True)
        return self.store.storage.append(
            self.id, path.branch, path.head_id, new, head_depth=path.head_depth
        )

    # -- sending ---------------------------------------------------------------------------

    def send(
        self,
        content: str | list[Block] | None = None,
        *,
        prefill: str | None = None,
        images: Sequence[str | FilePath] = (),
        on_retry: Callable[[RetryNotice], None] | None = None,
        **overrides: Any,
    ) -> Reply:
        """Append a user turn, ask Claude, store and return the reply.

        With no content, continues the branch as it is: after tool results, a prefill, an
        unanswered user turn or a paused turn. `on_retry` hears of each automatic retry.
        """
        steps = self._send_steps(content, prefill, images, overrides, streaming=False)
        return _drain(steps, on_retry)

    def stream(
        self,
        content: str | list[Block] | None = None,
        *,
        prefill: str | None = None,
        images: Sequence[str | FilePath] = (),
        on_retry: Callable[[RetryNotice], None] | None = None,
        **overrides: Any,
    ) -> ReplyStream:
        """Like send, streaming: iterate for text as it arrives; `.reply` once it is stored.

        A stream that fails midway is retried under the same policy as a send, and the new
        attempt's text starts over: pass `on_retry` to learn of it (the CLI starts a new line).
        The stored reply is always the one complete attempt.
        """
        steps = self._send_steps(content, prefill, images, overrides, streaming=True)
        return ReplyStream(steps, on_retry)

    @overload
    def retry(self, *, stream: Literal[False] = False, **overrides: Any) -> Reply: ...

    @overload
    def retry(
        self,
        *,
        stream: Literal[True],
        on_retry: Callable[[RetryNotice], None] | None = None,
        **overrides: Any,
    ) -> ReplyStream: ...

    def retry(
        self,
        *,
        stream: bool = False,
        on_retry: Callable[[RetryNotice], None] | None = None,
        **overrides: Any,
    ) -> Reply | ReplyStream:
        """Send the branch head again after a failed send: no turn is added or duplicated."""
        return self._retry(None, stream, on_retry, overrides)

    def _retry(
        self,
        branch: str | None,
        stream: bool,
        on_retry: Callable[[RetryNotice], None] | None,
        overrides: Mapping[str, Any],
    ) -> Reply | ReplyStream:
        """`retry` on `branch` (default: the checked-out one, read now)."""
        path = self.store.storage.path(self.id, branch)
        if not path.turns:
            raise InvalidInput("nothing to retry: the branch has no turns")
        last = path.turns[-1]
        if last.role == "assistant" and last.kind == "reply" and last.stop_reason != "pause_turn":
            raise InvalidInput("nothing to retry: the last turn already has its reply")
        steps = self._send_steps(None, None, (), overrides, streaming=stream, branch=branch)
        return ReplyStream(steps, on_retry) if stream else _drain(steps, on_retry)

    def _send_steps(
        self,
        content: str | list[Block] | None,
        prefill: str | None,
        images: Sequence[str | FilePath],
        overrides: Mapping[str, Any],
        *,
        streaming: bool,
        branch: str | None = None,
    ) -> Generator[str | RetryNotice, None, Reply]:
        storage = self.store.storage
        if self.store.closed:
            raise StoreError("the store is closed: open a new Store to send")
        new = self._new_turns(content, prefill, images)
        owner = lease_owner_id()
        deadline = time.monotonic() + self.store.wait_for_branch
        wait = 0.02
        while True:
            info, path = storage.snapshot(self.id, branch, for_send=True)
            if not new:
                self._check_continuable(path)
            body = self._build(info, path, new, overrides)
            self.store.client.require_key()
            estimate = self._check_budget(info, body)
            try:
                first_call = FirstCall(now(), body["model"], streaming)
                ids, first_call_id = storage.begin_send(
                    self.id, path.branch, path.head_id, new, owner=owner, hold=LEASE,
                    head_depth=path.head_depth if path.head_id else None,
                    first_call=first_call,
                )
                break
            except Conflict:
                # Another send holds or moved the branch: wait for it, then append after it.
                if time.monotonic() > deadline:
                    raise
                self.store.sleep(wait * (0.5 + random.random()))
                wait = min(wait * 2, 0.5)
            except BaseException:
                # The write may have landed before the failure (Ctrl-C, a connection lost at
                # COMMIT): this send's lease must not outlive it. (Only this send's own lease
                # is released; if nothing landed, nothing changes.)
                self._release_quietly(path.branch, owner, abandon_pending=True)
                raise
        stored = False
        try:
            last_id = ids[-1] if ids else path.head_id
            assert last_id is not None
            prefill_text = text_of(new[-1].content) if new and new[-1].role == "assistant" else ""
            if not new and path.turns and is_continued(path.turns[-1]):
                prefill_text = text_of(path.turns[-1].content)
            last_depth = (path.head_depth if path.head_id else -1) + len(ids)
            target = _Target(path.branch, last_id, last_depth, owner, prefill_text)
            reply = yield from self._call(
                target, body, streaming, first_call, first_call_id, info, estimate
            )
            stored = True
            return reply
        finally:
            if not stored:
                # A call whose failure was recorded is no longer pending; one still pending was
                # stopped (Ctrl-C, SIGTERM) before its attempt began: mark it never made, or
                # nothing would (this process let go of the branch, so no one finds it dead).
                self._release_quietly(path.branch, owner, abandon_pending=True)

    def _release_quietly(self, branch: str, owner: str, *, abandon_pending: bool = False) -> None:
        try:
            self.store.storage.release(self.id, branch, owner, abandon_pending=abandon_pending)
        except ConvoError:
            pass  # the lease expires, or the next send sees this process is gone

    def _check_continuable(self, path: Path) -> None:
        if not path.turns:
            raise InvalidInput("nothing to send: give the first user turn's text")
        pending = self._pending_tool_uses(path)
        if pending:
            raise HistoryError(
                f"tool_use {', '.join(pending)} awaits a tool_result: add the results "
                "(add_tool_result / `convo tool-result`) before sending"
            )
        last = path.turns[-1]
        if last.role == "assistant" and last.kind == "reply" and last.stop_reason != "pause_turn":
            raise InvalidInput("nothing to send: the branch ends with Claude's reply; give text")

    def _check_budget(
        self,
        info: ConversationRow,
        body: dict[str, Any],
        *,
        retrying: BaseException | None = None,
        estimate: int | None = None,
    ) -> int | None:
        """Refuse a request whose worst case would pass a budget or the input cap, counting
        what was spent so far (`retrying`: another attempt after that failure, which may have
        been billed; the refusal then says the turn is kept). Returns the input estimate it
        used, for the retries' checks (None when nothing is limited)."""
        budget = info.params.get("budget_usd")
        cap = info.params.get("max_input_tokens")
        store_budget = info.store_budget_usd
        if budget is None and cap is None and store_budget is None:
            return None
        if estimate is None:  # (count_tokens is a request: a retry's check reuses the first's)
            estimate = self._estimate_tokens(body)
        outcome = (
            f"not retried after {type(retrying).__name__}; your turn is saved"
            if retrying is not None else "nothing was sent"
        )
        if cap is not None and estimate > cap:
            raise BudgetExceeded(
                f"this request's input is about {estimate:,} tokens, over the conversation's "
                f"cap of {cap:,}; {outcome}"
            )
        price = self.store.prices.lookup(body["model"])
        if price is None:
            if budget is None and store_budget is None:
                return estimate
            raise BudgetExceeded(
                f"a budget is set but convo has no price for model {body['model']}: add one "
                "with CONVO_PRICES; nothing was sent"
            )
        # Input at the price of writing it to the cache when the request caches (1.25x, or
        # 2x for the 1-hour TTL): the worst case is a prefix nothing has cached yet.
        worst = (estimate * _worst_input_price(price, body) + body["max_tokens"] * price.output) / 1_000_000
        for limit, scope in ((budget, "conversation"), (store_budget, "store")):
            if limit is None:
                continue
            spent = self.store.storage.usage(
                conversation=self.id if scope == "conversation" else None, by="conversation"
            ).total.cost_usd
            if spent + worst > limit:
                raise BudgetExceeded(
                    f"the {scope} budget of ${limit:.4f} would be exceeded: ${spent:.4f} spent, "
                    f"this request may cost up to ${worst:.4f}; {outcome}"
                )
        return estimate

    def _limits_now(self, info: ConversationRow) -> ConversationRow:
        """`info` with the conversation's limits and the store's budget as they are now: a
        retry follows a failure (and then its backoff), in which either may have changed."""
        current = self.store.storage.conversation(self.id)
        return replace(info, params=current.params, store_budget_usd=self.store.budget)

    def _estimate_tokens(self, body: dict[str, Any]) -> int:
        """count_tokens where the API is reachable, the local estimate otherwise."""
        try:
            return self.store.client.count_tokens(body)
        except (APIError, InvalidInput):
            return estimate_input_tokens(body)

    def _call(
        self, target: _Target, body: dict[str, Any], streaming: bool, first_call: FirstCall,
        first_call_id: int, info: ConversationRow, estimate: int | None,
    ) -> Generator[str | RetryNotice, None, Reply]:
        """Attempts under the retry policy, each a ledger row (the first one was written with
        the user turn, in the same transaction). Each retry is held to the budgets again: a
        cut attempt was billed."""
        store = self.store
        storage = store.storage
        client = store.client
        policy = store.retry_policy
        model = body["model"]
        attempt = 0
        while True:
            if attempt == 0:
                call_id, started = first_call_id, first_call.started_at
            else:
                started = now()
                call_id = storage.start_call(
                    conv_id=self.id, branch=target.branch, turn_id=target.last_id, model=model,
                    attempt=attempt, streamed=streaming, started_at=started,
                )
            acc = MessageAccumulator()
            request_id: str | None = None
            http_status: int | None = None
            if attempt:  # the first attempt's lease was just taken with the user turn
                storage.renew_lease(self.id, target.branch, target.owner, LEASE)
            renewed = time.monotonic()
            try:
                if streaming:
                    with client.stream_message_once(body) as events:
                        request_id = events.info.request_id
                        http_status = events.info.status_code
                        for event in events:
                            delta = acc.feed(event)
                            if time.monotonic() - renewed > LEASE_RENEW_SECONDS:
                                # A long stream keeps its branch: renew before the lease lapses.
                                storage.renew_lease(self.id, target.branch, target.owner, LEASE)
                                renewed = time.monotonic()
                            if delta:
                                yield delta
                    if not acc.complete:
                        raise _incomplete_stream()
                    acc.check_tool_inputs()
                    message = acc.message
                else:
                    message, meta = client.create_message_once(body)
                    request_id, http_status = meta.request_id, meta.status_code
                _check_message(message)
            except APIError as e:
                self._record_failure(call_id, started, model, acc, e, request_id, http_status, streaming)
                if attempt < policy.max_retries and policy.should_retry(e):
                    self._check_budget(self._limits_now(info), body, retrying=e, estimate=estimate)
                    delay = policy.delay(attempt, e, random.random())
                    yield RetryNotice(attempt + 1, e, delay)
                    store.sleep(delay)
                    # Again after the backoff: the budgets as they are when the retry is made.
                    self._check_budget(self._limits_now(info), body, retrying=e, estimate=estimate)
                    attempt += 1
                    continue
                raise
            except BaseException as e:  # Ctrl-C, a closed generator: keep what was billed
                self._record_failure(call_id, started, model, acc, e, request_id, http_status, streaming)
                raise
            return self._store_reply(target, call_id, started, model, message, request_id, http_status)

    def _record_failure(
        self,
        call_id: int,
        started_at: datetime,
        model: str,
        acc: MessageAccumulator,
        error: BaseException,
        request_id: str | None,
        http_status: int | None,
        streaming: bool,
    ) -> None:
        usage = acc.usage
        started = usage.input_tokens or usage.output_tokens or acc.text
        if isinstance(error, APIError):
            # "cut": a stream that ended early. One that ended (a reply refused after its
            # message_stop) is an error with the usage its final count gave.
            status = "cut" if streaming and started and not acc.complete else "error"
        else:
            status = "cancelled"
        kind = getattr(error, "error_type", None)
        if not kind:
            kind = "interrupted" if isinstance(error, KeyboardInterrupt | GeneratorExit) else type(error).__name__
        fields: dict[str, Any] = {
            "status": status,
            "error_type": kind,
            "error_message": (str(error).splitlines() or [""])[0][:500] or type(error).__name__,
        }
        if isinstance(error, APIStatusError):
            fields["http_status"] = error.status_code or http_status
            fields["request_id"] = error.request_id or request_id
        else:
            fields["http_status"] = http_status
            fields["request_id"] = request_id
        if started:
            if not acc.final_usage:
                # Cut before the cumulative count: message_start's placeholder would bill the
                # text received as one token. The estimate (4 bytes a token) says so.
                estimate = estimate_text_tokens(acc.generated)
                if estimate > usage.output_tokens:
                    usage = usage.model_copy(update={"output_tokens": estimate})
                    fields["error_message"] = f"{fields['error_message'][:440]} (output tokens estimated)"
            fields.update(self._usage_fields(model, usage))
            fields["partial_text"] = acc.text or None
        self.store.storage.finish_call(call_id, started_at=started_at, **fields)

    def _usage_fields(self, model: str, usage: Usage) -> dict[str, Any]:
        return {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
            "cache_creation_5m_input_tokens": usage.cache_creation_5m_input_tokens,
            "cache_creation_1h_input_tokens": usage.cache_creation_1h_input_tokens,
            "cost_usd": self.store.prices.cost(model, usage),
            "uncached_cost_usd": self.store.prices.uncached_cost(model, usage),
        }

    def _store_reply(
        self,
        target: _Target,
        call_id: int,
        started_at: datetime,
        model: str,
        message: dict[str, Any],
        request_id: str | None,
        http_status: int | None,
    ) -> Reply:
        usage = Usage.from_api(message.get("usage"))
        # A text block with no text (a streamed block that got no delta, or the API's own
        # `""` before a tool_use) would make every later request a 400: the API refuses
        # empty and whitespace-only text blocks in history. It carries nothing to keep.
        content = [b for b in message.get("content") or [] if not blank_text(b)]
        fields = {
            "status": "ok",
            "http_status": http_status,
            "request_id": request_id,
            "message_id": message.get("id"),
            "stop_reason": message.get("stop_reason"),
            "stop_sequence": message.get("stop_sequence"),
            **self._usage_fields(model, usage),
        }
        storage = self.store.storage
        reply_id: int | None = None
        if content:
            stop = message.get("stop_reason")
            # (The column holds 40 characters: the API's reasons are a word or two.)
            reply = NewTurn(
                "assistant", "reply", content,
                stop_reason=without_controls(stop)[:40] if isinstance(stop, str) else None,
            )
            try:
                reply_id = storage.finish_with_reply(
                    call_id, self.id, target.branch, target.last_id, reply, target.owner, fields,
                    parent_depth=target.last_depth, started_at=started_at,
                )
            except BaseException as e:
                # The branch moved or vanished, the database failed, or the user interrupted
                # the write (Ctrl-C while it waited for a lock): the call was billed all the
                # same. Record that on its row in a transaction of its own, unless the reply's
                # own commit landed first.
                interrupted = not isinstance(e, Exception)
                try:
                    storage.finish_call(
                        call_id,
                        started_at=started_at,
                        unless_replied=True,
                        **{**fields, "status": "cancelled" if interrupted else "error",
                           "error_type": "interrupted" if interrupted else "reply_not_stored",
                           "error_message": str(e).splitlines()[0][:500] if str(e) else type(e).__name__,
                           "partial_text": text_of(content) or None},
                    )
                except ConvoError:
                    pass  # the original error says more
                raise
        else:
            # An empty reply cannot be replayed (the API refuses empty messages): keep the call,
            # leave the branch at the unanswered turn.
            storage.finish_call(call_id, started_at=started_at, **fields)
            storage.release(self.id, target.branch, target.owner)
        return Reply(
            turn_id=reply_id,
            call_id=call_id,
            model=message.get("model") or model,
            content=content,
            text=target.prefill_text + text_of(content),
            stop_reason=message.get("stop_reason"),
            stop_sequence=message.get("stop_sequence"),
            usage=usage,
            cost_usd=fields["cost_usd"],
            message_id=message.get("id"),
            request_id=request_id,
        )

    def _stored_reply(self) -> Reply | None:
        """The branch's last turn as the Reply that stored it, if it is a reply Claude wrote
        (for a run resumed after it had already finished)."""
        path = self.store.storage.path(self.id)
        if not path.turns or path.turns[-1].kind != "reply":
            return None
        last = path.turns[-1]
        call = next((c for c in reversed(self.calls()) if c["reply_id"] == last.id), None)
        if call is None:
            return None
        before = path.turns[-2] if len(path.turns) > 1 else None
        lead = text_of(before.content) if before is not None and is_continued(before) else ""
        return Reply(
            turn_id=int(last.id),
            call_id=call["id"],
            model=call["model"],
            content=last.content,
            text=lead + text_of(last.content),
            stop_reason=call["stop_reason"],
            stop_sequence=call["stop_sequence"],
            usage=Usage(**{k: call[k] for k in Usage.model_fields if call.get(k) is not None}),
            cost_usd=call["cost_usd"],
            message_id=call["message_id"],
            request_id=call["request_id"],
        )

    # -- branching -------------------------------------------------------------------------

    def fork(self, at: int | str, name: str | None = None, *, checkout: bool = True) -> str:
        """A new branch whose head is turn `at` (its id): one row, whatever the depth."""
        if name is not None:
            check_branch_name(name)  # before it is a query's parameter (PostgreSQL refuses NUL)
        with self.store.storage.branching(self.id) as tx:
            turn = tx.turn(at, name=name)
            _check_local(tx, turn, [], final_pending_ok=False)
            name, _ = tx.create(
                _branch_name(tx, name, "fork"), turn.id, checkout=checkout,
                rename_as=None if name else "fork",
            )
        return name

    def edit(self, turn: int | str, content: str | list[Block], *, name: str | None = None) -> int:
        """A sibling of `turn` with new content, as the head of a new checked-out branch.

        Editing a reply or synthetic turn gives a synthetic assistant turn: replay sends the
        edited text, and the original reply's call stays in the audit. Returns the new turn id.
        Constant time and two rows, whatever the depth.
        """
        if name is not None:
            check_branch_name(name)
        with self.store.storage.branching(self.id) as tx:
            old = tx.turn(turn, name=name)
            if old.role == "user":
                if old.kind == "tool_result" and isinstance(content, str):
                    ids = [b["tool_use_id"] for b in old.content if b.get("type") == "tool_result"]
                    if len(ids) != 1:
                        raise InvalidInput(
                            f"turn {old.id} answers {len(ids)} tool uses: give the new content as blocks"
                        )
                    content = [{"type": "tool_result", "tool_use_id": ids[0], "content": content}]
                blocks = normalize(content, "user", where="edited turn")
                kind = "tool_result" if any(b.get("type") == "tool_result" for b in blocks) else "user"
            else:
                blocks = normalize(content, "assistant", where="edited turn")
                kind = "synthetic"
            new = NewTurn(old.role, kind, blocks, source_id=old.id)
            _check_local(
                tx,
                old.parent_id,
                [TurnRecord("(edited turn)", new.role, new.kind, new.content)],
                final_pending_ok=old.role == "assistant" or kind == "tool_result",
            )
            _, ids = tx.create(
                _branch_name(tx, name, "edit"), old.parent_id, [new], parent_depth=old.depth - 1,
                rename_as=None if name else "edit",
            )
            return ids[0]

    @overload
    def regenerate(
        self, turn: int | str | None = None, *, name: str | None = None,
        stream: Literal[False] = False, **overrides: Any,
    ) -> Reply: ...

    @overload
    def regenerate(
        self, turn: int | str | None = None, *, name: str | None = None, stream: Literal[True],
        on_retry: Callable[[RetryNotice], None] | None = None, **overrides: Any,
    ) -> ReplyStream: ...

    def regenerate(
        self,
        turn: int | str | None = None,
        *,
        name: str | None = None,
        stream: bool = False,
        on_retry: Callable[[RetryNotice], None] | None = None,
        **overrides: Any,
    ) -> Reply | ReplyStream:
        """Another reply on a new checked-out branch; the old reply stays on its branch.

        `turn` is the reply to redo (default: the branch's last reply), or the user turn to
        answer again. If the branch ends with a turn nothing has answered yet (an edit), that
        turn is answered on this branch. If the send fails, the turn waits for retry().
        """
        storage = self.store.storage
        if turn is None:
            path = storage.path(self.id)
            last = path.turns[-1] if path.turns else None
            if last is not None and not (last.role == "assistant" and last.kind == "reply"):
                # Nothing answered the branch's last turn yet (after an edit, say): answering
                # it is the reply to generate, here, with nothing to keep on another branch.
                return self._retry(path.branch, stream, on_retry, overrides)
            replies = [t for t in path.turns if t.role == "assistant" and t.kind == "reply"]
            if not replies:
                raise InvalidInput("nothing to regenerate: the branch has no reply yet")
            target = storage.turn(int(replies[-1].id))
        else:
            target = storage.resolve_turn(self.id, turn)
        at = target.parent_id if target.kind == "reply" else target.id
        if at is None:
            raise InvalidInput(f"turn {target.id} has nothing before it to answer")
        # Everything that can refuse the send, before the new branch exists: a refused
        # regenerate leaves no branch behind and the checkout where it was.
        info = self.info
        body = self._build(info, storage.path(self.id, head_id=at), [], overrides)
        self.store.client.require_key()
        self._check_budget(info, body)
        with storage.branching(self.id) as tx:
            tail, _ = tx.tail(at)
            if tail[-1].role == "assistant" and tail[-1].kind == "reply":
                raise InvalidInput(f"turn {at} is a reply: regenerate answers a user turn")
            _check_local(tx, at, [], final_pending_ok=False)
            name, _ = tx.create(_branch_name(tx, name, "regen"), at, rename_as=None if name else "regen")
        # On the new branch, whatever another process checks out meanwhile.
        return self._retry(name, stream, on_retry, overrides)

    def configure(
        self,
        *,
        model: str | object = KEEP,
        system: str | list[Block] | None | object = KEEP,
        title: str | None | object = KEEP,
        tools: Sequence[Any] | None | object = KEEP,
        **settings: Any,
    ) -> None:
        """Change what later requests use by default (model, system prompt, title, tools,
        max_tokens, temperature, cache...); the turns already stored stay as they are. A
        setting given None is removed, back to the API's default; `cache="off"` stops caching.
        Checked as `create` checks, all or nothing."""
        for key in settings:
            if key in ("budget_usd", "max_input_tokens"):
                raise InvalidInput(f"{key} is a limit: use set_limits")
        if settings.get("max_tokens", 0) is None:
            raise InvalidInput("max_tokens cannot be removed: every request needs one")
        # (cache="off" removes the setting: no cache is how a conversation says off.)
        drop = {k for k, v in settings.items() if v is None or (k == "cache" and (v is False or v == "off"))}
        given = {k: v for k, v in settings.items() if k not in drop}
        if tools is not KEEP and tools is not None:
            given["tools"] = _tool_defs(cast(Sequence[Any], tools))
        given = _check_settings(given)
        if tools is None:
            drop.add("tools")
        if model is not KEEP:
            _check_model(model)
        if system is not KEEP and system is not None:
            _check_system(system)
        if title is not KEEP:
            _check_title(title)

        def change(row: ConversationRow) -> dict[str, Any]:
            params = {k: v for k, v in row.params.items() if k not in drop}
            params.update(given)
            if settings or model is not KEEP or system is not KEEP or tools is not KEEP:
                # (A title alone sends nothing: settings stored before a check existed do not
                # stop it. Any change to what is sent must leave a request that can be sent.)
                _check_as_request(
                    row.model if model is KEEP else model, row.system if system is KEEP else system, params
                )
            fields: dict[str, Any] = {"params": params}
            if model is not KEEP:
                fields["model"] = model
            if system is not KEEP:
                fields["system"] = system
            if title is not KEEP:
                fields["title"] = title
            return fields

        self.store.storage.change_conversation(self.id, change)

    def set_limits(
        self, *, budget_usd: float | None | object = KEEP, max_input_tokens: int | None | object = KEEP
    ) -> None:
        """Set (or, with None, remove) the conversation's budget in USD and input-token cap."""
        changes = {
            key: value
            for key, value in (("budget_usd", budget_usd), ("max_input_tokens", max_input_tokens))
            if value is not KEEP
        }
        _check_limits({k: v for k, v in changes.items() if v is not None})

        def change(row: ConversationRow) -> dict[str, Any]:
            params = {k: v for k, v in row.params.items() if changes.get(k, KEEP) is not None}
            params.update({k: v for k, v in changes.items() if v is not None})
            return {"params": params}

        self.store.storage.change_conversation(self.id, change)

    @property
    def limits(self) -> dict[str, Any]:
        p = self.info.params
        return {"budget_usd": p.get("budget_usd"), "max_input_tokens": p.get("max_input_tokens")}

    def branches(self) -> list[BranchRow]:
        return self.store.storage.branches(self.id)

    def checkout(self, name: str) -> None:
        _branch_ref(name)
        self.store.storage.checkout(self.id, name)

    def delete_branch(self, name: str) -> None:
        _branch_ref(name)
        self.store.storage.delete_branch(self.id, name)

    # -- tools -----------------------------------------------------------------------------

    def run(
        self,
        content: str | list[Block] | None = None,
        *,
        tools: Sequence[Any],
        max_steps: int = 8,
        **overrides: Any,
    ) -> Reply:
        """Send and run the requested tools until Claude stops asking (see convo.runner.run)."""
        from convo import runner

        return runner.run(self, content, tools=tools, max_steps=max_steps, **overrides)

    def send_json(self, content: str | list[Block], schema: Any, **overrides: Any) -> Any:
        """Structured output validated against a pydantic model or JSON schema."""
        from convo import runner

        return runner.send_json(self, content, schema, **overrides)

    # -- spend -----------------------------------------------------------------------------

    def usage(
        self,
        by: str = "branch",
        *,
        branch: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> UsageReport:
        return self.store.usage(self.id, branch=branch, since=since, until=until, by=by)

    def calls(self) -> list[dict[str, Any]]:
        return self.store.storage.calls(self.id)


def _check_local(
    tx: Branching, parent: int | TurnRow | None, new: list[TurnRecord], *, final_pending_ok: bool
) -> None:
    """check_structure on just the turns that decide it (back to the nearest assistant turn),
    so a fork or an edit costs the same at depth 10,000 as at depth 10. Stored paths were
    checked when written, so what lies before that assistant turn is valid."""
    tail, from_root = tx.tail(parent) if parent else ([], True)
    if not from_root:  # stands for the (valid) turns before the assistant turn
        tail.insert(0, TurnRecord("(earlier turns)", "user", "user", [{"type": "text", "text": "."}]))
    check_structure(tail + new, final_pending_ok=final_pending_ok)


def _branch_name(tx: Branching, name: str | None, prefix: str) -> str:
    """The given name, checked, or a readable free one (`fork-1`, `edit-2`, ...)."""
    if name is None:
        return tx.free_name(prefix)
    check_branch_name(name)
    if tx.name_taken(name):
        raise InvalidInput(f"branch {name!r} already exists (or did, and has calls in the audit)")
    return name


def _records(new: Sequence[NewTurn]) -> list[TurnRecord]:
    """Turns not yet written, as the history builder sees them (named for error messages)."""
    return [TurnRecord(f"(the new {t.kind} turn)", t.role, t.kind, t.content) for t in new]


_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _check_message(message: Any) -> None:
    """A reply of the shape convo stores and reports: APIError (not retried: the same request
    would get the same answer) for one that is not, before anything of it is written, so its
    call is recorded as failed instead of left pending."""

    def malformed(what: str) -> APIError:
        return APIError(f"the API answered with a malformed message: {what}")

    if not isinstance(message, dict):
        raise malformed("not an object")
    content = message.get("content")
    if content is not None and (
        not isinstance(content, list)
        or not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in content)
    ):
        raise malformed("content is not a list of blocks")
    for key in ("id", "model", "stop_reason", "stop_sequence"):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise malformed(f"{key} is not text")
    usage = message.get("usage")
    if usage is None:
        return
    if not isinstance(usage, dict):
        raise malformed("usage is not an object")
    split = usage.get("cache_creation")
    if split is not None and not isinstance(split, dict):
        raise malformed("usage.cache_creation is not an object")
    counts = [(k, usage.get(k)) for k in _TOKEN_FIELDS] + [(f"cache_creation.{k}", v) for k, v in (split or {}).items()]
    for key, value in counts:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31):
            raise malformed(f"usage.{key} is not a token count: {str(value)[:40]}")


def _normalize_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Per-request settings, checked as `create` checks a conversation's (a bad one would
    otherwise reach the API, after the user's turn is written)."""
    if not overrides:
        return {}
    out = dict(overrides)
    _check_settings({k: v for k, v in out.items() if k not in ("model", "system", "tools")})
    if out.get("model") is not None:
        _check_model(out["model"])
    if out.get("system") is not None:
        _check_system(out["system"])
    if out.get("cache") in ("off", False):
        out["cache"] = None
    if "tools" in out and out["tools"] is not None:
        out["tools"] = _tool_defs(out["tools"])
    return out


def _incomplete_stream() -> APIError:
    from convo.errors import APIConnectionError

    return APIConnectionError("the stream ended before message_stop")


def _drain(
    steps: Generator[str | RetryNotice, None, Reply],
    on_retry: Callable[[RetryNotice], None] | None = None,
) -> Reply:
    """Run a send's steps to the end, passing retry notices on."""
    while True:
        try:
            item = next(steps)
        except StopIteration as done:
            return done.value
        if on_retry is not None and isinstance(item, RetryNotice):
            on_retry(item)


class ReplyStream:
    """Text chunks of a streamed reply as they arrive; `reply` once it has been stored."""

    def __init__(
        self,
        steps: Generator[str | RetryNotice, None, Reply],
        on_retry: Callable[[RetryNotice], None] | None,
    ) -> None:
        self._steps = steps
        self._on_retry = on_retry
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                try:
                    item = next(self._steps)
                except StopIteration as done:
                    self.reply = done.value
                    return
                if isinstance(item, RetryNotice):
                    if self._on_retry:
                        self._on_retry(item)
                else:
                    yield item
        finally:
            self._steps.close()

    def until_done(self) -> Reply:
        for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    def close(self) -> None:
        self._steps.close()
