"""Queries and transactions over the tables: no HTTP, no request building, no printing.

Every public write is all or nothing: one transaction, or on PostgreSQL, where a send's writes,
a one-turn append, a fork and an edit are each one statement, that statement. Writes that must
agree with what was read (appending at a branch head) re-read the head inside the write and
raise `Conflict` when another writer moved it, so no history is ever silently interleaved.

The hot paths (a resume's reads, a send's two writes, any one-turn append) run prebuilt SQL
text on the driver (`db.Reader`, `db.Writer`, on PostgreSQL `db.write_once`); everything else
goes through SQLAlchemy Core.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, cast

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.elements import TextClause

from convo import db
from convo.content import BlobData, blob_refs, extract_blobs
from convo.errors import AmbiguousId, Conflict, InvalidInput, NotFound
from convo.history import TurnRecord
from convo.ids import new_id, normalize_prefix, prefix_range, without_controls
from convo.models import ROLE_OF_KIND, Blob, Branch, Call, Conversation, Setting, Turn, instant
from convo.types import Block

C = cast(Table, Conversation.__table__)
T = cast(Table, Turn.__table__)
B = cast(Table, Branch.__table__)
K = cast(Table, Call.__table__)
BL = cast(Table, Blob.__table__)
S = cast(Table, Setting.__table__)

STORE_BUDGET_KEY = "budget_usd"
# A call the API billed: any tokens at all (a call refused before the model ran has none). One
# with no cost is then unpriced, not free.
_BILLED = or_(
    K.c.input_tokens > 0, K.c.output_tokens > 0,
    K.c.cache_creation_input_tokens > 0, K.c.cache_read_input_tokens > 0,
)
# The unique (conversation, name) of branches (models.NAMING_CONVENTION names it), and how many
# names a PostgreSQL fork tries when other writers take the free ones first.
BRANCH_NAME_CONSTRAINT = "uq_branches_conversation_key"
NAME_ATTEMPTS = 20

# The statements every resume runs, as SQL strings run straight on the driver (`db.Reader`):
# portable SQL, the same on SQLite and PostgreSQL, run by every resume test on both. A fresh
# Store (every CLI command) would otherwise compile each into its new engine's empty cache.
_SNAPSHOT = (
    "SELECT c.key, c.id, c.title, c.model, c.system, c.params, c.current_branch, "
    "c.turn_count, c.has_media, c.created_at, c.updated_at, "  # _CONVERSATION_COLUMNS
    "b.name, b.head_id, t.depth{budget} "
    "FROM conversations c "
    "LEFT OUTER JOIN branches b "
    "ON b.conversation_key = c.key AND b.name = COALESCE(:branch, c.current_branch) "
    "LEFT OUTER JOIN turns t ON t.id = b.head_id "
    "WHERE c.id = :conv_id"
)
# A send also needs the store's budget; a resume does not, and on a new PostgreSQL connection
# every further table a statement touches costs its catalog lookups (about 0.7 ms here).
_SNAPSHOT_FOR_SEND = _SNAPSHOT.format(
    budget=", (SELECT s.value FROM settings s WHERE s.key = :budget_key)"
)
_SNAPSHOT = _SNAPSHOT.format(budget="")
# Path rows are (id, kind, content, stop_reason[, parent_id]): the role follows from the kind
# (ROLE_OF_KIND), and every column not read is a value per turn the driver need not build,
# a tenth of reading a path. A never-branched thread needs no parent ids either.
_LINEAR_PATH = (
    "SELECT id, kind, content, stop_reason FROM turns "
    "WHERE conversation_key = :conv_key AND depth <= :depth ORDER BY depth"
)
_NEAR_LINEAR_PATH = (
    "SELECT id, kind, content, stop_reason, parent_id FROM turns "
    "WHERE conversation_key = :conv_key AND depth <= :depth"
)
# From a head back to the root, for a tree too bushy to scan.
_WALK_PATH = (
    "WITH RECURSIVE walk(id, kind, content, stop_reason, parent_id, depth) AS ("
    "SELECT id, kind, content, stop_reason, parent_id, depth FROM turns WHERE id = :head_id "
    "UNION ALL SELECT t.id, t.kind, t.content, t.stop_reason, t.parent_id, t.depth "
    "FROM turns t JOIN walk w ON t.id = w.parent_id) "
    "SELECT id, kind, content, stop_reason, parent_id FROM walk ORDER BY depth"
)
_CONVERSATION_COLUMNS = (
    "key, id, title, model, system, params, current_branch, turn_count, has_media, "
    "created_at, updated_at"
)
_CONVERSATION = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = :id"
_MOST_RECENT = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1"
_TURN_IN_CONVERSATION = (
    "SELECT t.depth, c.turn_count, c.key, c.has_media "
    "FROM turns t JOIN conversations c ON c.key = t.conversation_key "
    "WHERE t.id = :head_id AND c.id = :conv_id"
)
_CONVERSATIONS_BY_PREFIX = (
    "SELECT id FROM conversations WHERE id >= :low AND id < :high ORDER BY id LIMIT 11"
)
# Statements a fork, an edit or a send runs every time, built once: building a select() in
# Python costs about as much as running it on SQLite.
_INSERT_TURNS = insert(T)
_INSERT_TURN = insert(T).returning(T.c.id)
_INSERT_BRANCH = insert(B)
_COUNT_TURNS = (
    update(C)
    .where(C.c.key == bindparam("conv_key"))
    .values(updated_at=bindparam("ts"), turn_count=C.c.turn_count + bindparam("n"))
)
# The same, for turns that carry images or documents.
_COUNT_MEDIA_TURNS = (
    update(C)
    .where(C.c.key == bindparam("conv_key"))
    .values(updated_at=bindparam("ts"), turn_count=C.c.turn_count + bindparam("n"), has_media=True)
)
# Where-clause parameters are named w_*: any other key given with _MOVE_HEAD or _UPDATE_CALL
# is a column to SET, so one statement serves every combination of fields.
_MOVE_HEAD = update(B).where(B.c.conversation_key == bindparam("w_conv"), B.c.name == bindparam("w_branch"))
_UPDATE_CALL = update(K).where(K.c.id == bindparam("w_id"))
_UPDATE_UNREPLIED_CALL = _UPDATE_CALL.where(K.c.reply_id.is_(None))
_INSERT_CALL = insert(K).returning(K.c.id)
# Ledger columns of bounded length (error type, request and message ids, stop reason...).
_CALL_LENGTHS: dict[str, int] = {c.name: n for c in K.c if (n := getattr(c.type, "length", None))}
# The branch row to write at, with the conversation's key: one lookup by public id and name.
_LOCK_BRANCH = (
    "SELECT b.head_id, b.lease_owner, b.lease_expires, b.conversation_key "
    "FROM branches b JOIN conversations c ON c.key = b.conversation_key "
    "WHERE c.id = :conv_id AND b.name = :branch"
)
_LOCK_BRANCH_FOR_UPDATE = _LOCK_BRANCH + " FOR UPDATE OF b"
_KEY_SQL = "SELECT key FROM conversations WHERE id = :conv_id"
# A branch's pending calls, which will never finish (:why says why), by the conversation's key
# or its public id: only the lease holder has one.
_ABANDON = (
    "UPDATE calls SET status = 'abandoned', error_type = 'abandoned', error_message = :why "
    "WHERE conversation_key = {key} AND branch = :branch AND status = 'pending'"
)
_ABANDON_CALLS = _ABANDON.format(key=":key")  # the holder died
_ABANDON_INTERRUPTED = _ABANDON.format(key=f"({_KEY_SQL})")  # the send stopped before its request
_RELEASE = (
    "UPDATE branches SET lease_owner = NULL, lease_expires = NULL WHERE conversation_key = "
    f"({_KEY_SQL}) AND name = :branch AND lease_owner = :owner"
)
_DEPTH_SQL = "SELECT depth FROM turns WHERE id = :id"
_STARTED_SQL = "SELECT started_at FROM calls WHERE id = :id"
# A blob is stored once, whoever wrote it first (the same statement on both engines).
_INSERT_BLOB = (
    "INSERT INTO blobs (sha256, media_type, size, data, created_at) "
    "VALUES (:sha256, :media_type, :size, :data, :created_at) ON CONFLICT (sha256) DO NOTHING"
)
_PARENT = T.alias("parent")
# A turn by id, with the public id of its conversation (to tell "not here" from "not at all")
# and its parent's columns: an edit or fork checks the turns back to the nearest assistant
# turn, which is usually the parent, so one round trip serves both.
_TURN_BY_ID = (
    select(
        *T.c,
        C.c.id.label("conversation_id"),
        _PARENT.c.parent_id.label("p_parent_id"),
        _PARENT.c.role.label("p_role"),
        _PARENT.c.kind.label("p_kind"),
        _PARENT.c.content.label("p_content"),
        _PARENT.c.stop_reason.label("p_stop_reason"),
    )
    .join(C, C.c.key == T.c.conversation_key)
    .outerjoin(_PARENT, _PARENT.c.id == T.c.parent_id)
    .where(T.c.id == bindparam("id"))
)


def _name_taken(conv_key: Any) -> Any:
    """Whether branch name :name is used by a live branch, or by a deleted one with calls in
    the ledger (a new branch must not inherit an old one's spend in an audit by branch)."""
    return or_(
        select(B.c.id).where(B.c.conversation_key == conv_key, B.c.name == bindparam("name")).exists(),
        select(K.c.id).where(K.c.conversation_key == conv_key, K.c.branch == bindparam("name")).exists(),
    )


_BRANCH_NAME_TAKEN = select(_name_taken(bindparam("conv_key")))
# A fork or edit given a branch name reads its turn and checks the name in one round trip.
_TURN_BY_ID_AND_NAME = _TURN_BY_ID.add_columns(_name_taken(T.c.conversation_key).label("name_taken"))
# Check out a branch only if it exists: one statement, no read first.
_CHECKOUT = (
    update(C)
    .where(
        C.c.id == bindparam("conv_id"),
        select(B.c.id).where(B.c.conversation_key == C.c.key, B.c.name == bindparam("name")).exists(),
    )
    .values(current_branch=bindparam("name"), updated_at=bindparam("ts"))
)
_TAIL_TURN = select(T.c.id, T.c.parent_id, T.c.role, T.c.kind, T.c.content, T.c.stop_reason).where(
    T.c.id == bindparam("id")
)
# Allocating several turn ids at once, for a chain or tree written in one statement.
_NEXT_TURN_IDS = {
    "sqlite": text("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'turns'), 0)"),
    "postgresql": text("SELECT nextval(pg_get_serial_sequence('turns', 'id')) FROM generate_series(1, :n)"),
}
# A turn's INSERT; its parameters are the row's columns, prefixed t_ (see _turn_params).
_INSERT_TURN_SQL = (
    "INSERT INTO turns (conversation_key, parent_id, role, kind, content, depth, source_id, "
    "stop_reason, created_at) VALUES (:t_conversation_key, :t_parent_id, :t_role, :t_kind, "
    ":t_content, :t_depth, :t_source_id, :t_stop_reason, :t_created_at) RETURNING id"
)
# The same turn written by a data-modifying CTE.
_PG_NEW_TURN = f"new_turn AS ({_INSERT_TURN_SQL})"
# A fork and an edit on PostgreSQL, where each statement is a round trip: the branch row (and
# an edit's turn) written by data-modifying CTEs of the conversation's UPDATE.
_PG_CREATE = (
    "UPDATE conversations SET updated_at = :ts{count}, "
    "current_branch = CASE WHEN :checkout THEN :name ELSE current_branch END "
    "WHERE key = :key"
)
_PG_FORK = text(
    "WITH new_branch AS (INSERT INTO branches (conversation_key, name, head_id, created_at) "
    "VALUES (:key, :name, :head_id, :ts)) " + _PG_CREATE.format(count="")
)


@lru_cache(maxsize=16)
def _pg_edit(blobs: int) -> TextClause:
    """An edit's statement, with the `blobs` media its turn holds written by it too (:b<i>_*),
    so that the whole edit is one statement (see `Storage.branching`)."""
    media = "".join(f"blob_{i} AS ({_INSERT_BLOB.replace(':', f':b{i}_')}), " for i in range(blobs))
    return text(
        f"WITH {media}{_PG_NEW_TURN}, "
        "new_branch AS (INSERT INTO branches (conversation_key, name, head_id, created_at) "
        "SELECT :key, :name, id, :ts FROM new_turn) "
        + _PG_CREATE.format(count=", turn_count = turn_count + 1, has_media = has_media OR :media")
        + " RETURNING (SELECT id FROM new_turn)"
    )


# A branch's row locked for a one-turn write on PostgreSQL, and `ok`: its conversation's key if
# the head is where the writer expects it and no other writer holds the lease (else nothing).
_PG_LOCKED = (
    f"locked AS ({_LOCK_BRANCH_FOR_UPDATE}), "
    "ok AS (SELECT conversation_key AS key FROM locked "
    "WHERE head_id IS NOT DISTINCT FROM CAST(:expected AS bigint) "
    "AND (lease_owner IS NULL OR lease_owner = CAST(:holder AS text)))"
)
# The turn written only if `ok` has a row (the ids it may lack a type for without one cast).
_PG_NEW_TURN_IF_OK = (
    "new_turn AS (INSERT INTO turns (conversation_key, parent_id, role, kind, content, depth, "
    "source_id, stop_reason, created_at) SELECT key, CAST(:t_parent_id AS bigint), :t_role, "
    ":t_kind, :t_content, :t_depth, CAST(:t_source_id AS bigint), :t_stop_reason, "
    ":t_created_at FROM ok RETURNING id)"
)
# Whether a one-turn write that lost its connection committed: the turn it would have written
# (parent, depth, instant and content all equal), and the call it opened, if any (the first on
# that turn, whatever has become of it since).
_PG_TURN_LANDED = (
    "SELECT t.id, (SELECT k.id FROM calls k WHERE k.turn_id = t.id "
    "ORDER BY k.id LIMIT 1) FROM turns t JOIN conversations c ON c.key = t.conversation_key "
    "WHERE c.id = :conv_id AND t.depth = :t_depth "
    "AND t.parent_id IS NOT DISTINCT FROM CAST(:t_parent_id AS bigint) "
    "AND t.created_at = :t_created_at AND t.content = :t_content"
)


@lru_cache(maxsize=64)
def _one_turn_sql(
    dialect: str, lease: bool, new_call: bool, finished_fields: tuple[str, ...], locked: bool = False
) -> tuple[str, ...]:
    """The statements of `Storage._write_one_turn`, one set per shape, built once.

    PostgreSQL runs them as one statement of data-modifying CTEs (each statement there is a
    round trip); SQLite, which has none, runs them in a row, the turn's id bound as :turn_id.
    `locked` (PostgreSQL): the statement also locks and checks the branch (`_PG_LOCKED`) and
    writes nothing unless it may, so that it can run alone in autocommit; its row is the
    branch's (head, lease holder, lease expiry) as locked, then the turn and call ids."""
    if new_call and finished_fields:
        raise InvalidInput("a turn's write either opens a call or finishes one, not both")
    unknown = set(finished_fields) - (set(K.c.keys()) - {"id", "reply_id"})
    if unknown:
        raise InvalidInput(f"unknown call fields: {sorted(unknown)}")
    pg = dialect == "postgresql"
    if locked and not pg:
        raise InvalidInput("only PostgreSQL writes a turn and locks its branch in one statement")
    turn = "(SELECT id FROM new_turn)" if pg else ":turn_id"
    key = "(SELECT key FROM ok)" if locked else ":key"
    writes = [
        ("moved", f"UPDATE branches SET head_id = {turn}"
         + (", lease_owner = :lease_owner, lease_expires = :lease_expires" if lease else "")
         + f" WHERE conversation_key = {key} AND name = :branch"),
        ("counted", "UPDATE conversations SET updated_at = :ts, turn_count = turn_count + 1, "
         f"has_media = has_media OR :media WHERE key = {key}"),
    ]
    if new_call:
        writes.append((
            "new_call",
            "INSERT INTO calls (conversation_key, branch, turn_id, attempt, model, streamed, status, "
            "started_at, input_tokens, output_tokens, cache_creation_input_tokens, "
            "cache_read_input_tokens) "
            + (f"SELECT {key}, :branch, id, " if pg else "VALUES (:key, :branch, :turn_id, ")
            + "0, :model, :streamed, 'pending', :started_at, 0, 0, 0, 0"
            + (" FROM new_turn" if pg else ")")
            + " RETURNING id",
        ))
    if finished_fields:
        sets = "".join(f", {k} = :f_{k}" for k in finished_fields)
        writes.append((
            "finished", f"UPDATE calls SET reply_id = {turn}{sets} WHERE id = :call_id"
            + (" AND EXISTS (SELECT 1 FROM new_turn)" if locked else ""),
        ))
    if not pg:
        return (_INSERT_TURN_SQL, *(sql for _, sql in writes))
    ctes = ([_PG_LOCKED, _PG_NEW_TURN_IF_OK] if locked else [_PG_NEW_TURN])
    ctes += [f"{name} AS ({sql})" for name, sql in writes]
    call = "(SELECT id FROM new_call)" if new_call else "NULL"
    ids = f"(SELECT id FROM new_turn), {call}"
    if locked:
        return ("WITH " + ", ".join(ctes) + f" SELECT head_id, lease_owner, lease_expires, {ids} FROM locked",)
    return ("WITH " + ", ".join(ctes) + f" SELECT {ids}",)


# A thread is read with one range scan when it has at most this many turns per turn on the
# path (plus slack); a bushier tree is walked with a recursive CTE instead.
SCAN_RATIO = 2
SCAN_SLACK = 100


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects that all stay alive.

    Decoding a 20,000-turn path allocates some 60,000 containers; each allocation threshold
    crossed starts a collection that walks all of them again, which made decoding four times
    slower than the decoding itself. Nothing built here forms a cycle."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _key_of(conv_id: str) -> Any:
    """The conversation's key as a subquery, for statements off the hot paths."""
    return select(C.c.key).where(C.c.id == conv_id).scalar_subquery()


def _check_ref(ref: Any) -> None:
    """A conversation id or prefix is a string (an error message quotes it, so it must be one)."""
    if not isinstance(ref, str):
        raise InvalidInput(f"a conversation id is a string, not {type(ref).__name__}")


def parse_turn_id(ref: int | str) -> int:
    """A turn id from an int or its digits (a leading '#' allowed, as the CLI shows them)."""
    if isinstance(ref, bool):
        raise NotFound(f"no turn with id {ref!r}")
    if isinstance(ref, int):
        if not 0 < ref < 2**63:  # (a key column's range: past it SQLite's driver overflows)
            raise NotFound(f"no turn with id {ref!r}")
        return ref
    if not isinstance(ref, str):
        raise InvalidInput(f"a turn id is an int or its digits, not {type(ref).__name__}")
    text_ref = ref.strip().removeprefix("#")
    if not text_ref.isascii() or not text_ref.isdigit() or len(text_ref) > 18:
        raise NotFound(f"no turn with id {ref!r}")
    return int(text_ref)


def now() -> datetime:
    return datetime.now(UTC)


def dumps(value: Any) -> str:
    """A value as the JSON text stored for it: InvalidInput for what JSON cannot hold (an
    integer past 64 bits, say), before any row is written."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as e:
        raise InvalidInput(f"not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def encode_content(blocks: list[Block]) -> str:
    """A turn's blocks as its `content` column holds them: a lone plain text block as its bare
    text, anything else as JSON (always an array, so never text that starts with "[").

    Most turns are one text block, and a resume rebuilds that block from bare text in a third
    of the time parsing its JSON takes (and JSON's quoting costs 27 bytes a turn). Text JSON
    would escape stays JSON: a NUL (PostgreSQL's text refuses it), and a text that starts
    with "[" (it would read back as JSON)."""
    encoded = dumps(blocks)  # (refuses what JSON cannot hold, whichever form is stored)
    if len(blocks) == 1:
        block = blocks[0]
        if isinstance(block, dict) and list(block) == ["type", "text"] and block["type"] == "text":
            text = block["text"]
            if isinstance(text, str) and text and text[0] != "[" and "\x00" not in text:
                return text
    return encoded


def decode_content(stored: str) -> list[Block]:
    """A `content` column's value as blocks (see encode_content)."""
    return orjson.loads(stored) if stored[:1] == "[" else [{"type": "text", "text": stored}]


@dataclass(frozen=True)
class ConversationRow:
    id: str
    title: str | None
    model: str
    system: Any
    params: dict[str, Any]
    current_branch: str
    turn_count: int
    created_at: datetime
    updated_at: datetime
    # The store-wide budget in force (read with the conversation by `snapshot`).
    store_budget_usd: float | None = None
    # The integer the tables refer to the conversation by (the id is its public name).
    key: int = -1
    # Whether any turn ever held an image or document (a path without any needs no blob read).
    has_media: bool = False


@dataclass(frozen=True)
class TurnRow:
    id: int
    conversation_id: str
    conversation_key: int
    parent_id: int | None
    role: str
    kind: str
    content: list[dict[str, Any]]
    depth: int
    source_id: int | None
    stop_reason: str | None
    created_at: datetime


@dataclass(frozen=True)
class BranchRow:
    name: str
    head_id: int | None
    created_at: datetime
    lease_owner: str | None = None
    lease_expires: datetime | None = None
    head_depth: int | None = None


@dataclass(frozen=True)
class NewTurn:
    role: str
    kind: str
    content: list[dict[str, Any]]
    source_id: int | None = None
    stop_reason: str | None = None


@dataclass(frozen=True)
class FirstCall:
    """The ledger row of a send's first attempt, written with its user turn."""

    started_at: datetime
    model: str
    streamed: bool


@dataclass(frozen=True)
class Path:
    """A branch's path from root to head, ready for the history builder."""

    branch: str
    head_id: int | None
    turns: list[TurnRecord]
    # None when the path holds no image or document (the builder then skips media checks).
    blobs: dict[str, bytes] | None = None
    head_depth: int = -1


@dataclass(frozen=True)
class Deleted:
    """What deleting a conversation removed."""

    id: str
    turns: int
    branches: int
    calls: int
    blobs: int


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str | None
    model: str
    current_branch: str
    turn_count: int
    created_at: datetime
    updated_at: datetime
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # The first words of the first user turn, for untitled conversations.
    preview: str | None = None
    # Billed calls with no known price, left out of `cost_usd`.
    unpriced_calls: int = 0


@dataclass(frozen=True)
class UsageRow:
    key: str
    calls: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float
    uncached_cost_usd: float
    # Billed calls with no known price: `cost_usd` leaves them out, so it is a lower bound.
    unpriced_calls: int = 0


@dataclass(frozen=True)
class UsageReport:
    by: str
    rows: list[UsageRow]
    total: UsageRow
    unpriced_calls: int = 0
    models_without_price: list[str] = field(default_factory=list)


def lease_owner_id() -> str:
    """Who holds a lease: host and pid, so a dead holder on this host can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:]}"


def _busy(branch: str) -> Conflict:
    return Conflict(f"branch {branch!r} is busy: another send on it has not finished")


def _lease_live(holder: str, expires: Any) -> bool:
    """Whether a branch's lease still keeps others off it: not run out, its holder alive."""
    return expires is not None and instant(expires) > now() and not _holder_is_dead(holder)


def _duration_ms(started: datetime, end: datetime) -> float:
    """A call's duration, never negative (the wall clock may step back during a call)."""
    return max(0.0, (end - _utc(started)).total_seconds() * 1000)


def _holder_is_dead(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Storage:
    """convo's tables, one transaction per method."""

    def __init__(self, database: db.Database) -> None:
        self.database = database
        self.dialect = database.name

    @property
    def engine(self) -> Engine:
        """Built the first time a method needs SQLAlchemy (see `db.Database`)."""
        return self.database.engine

    # -- conversations ---------------------------------------------------------------------

    def create_conversation(
        self,
        *,
        model: str,
        system: Any = None,
        params: dict[str, Any] | None = None,
        title: str | None = None,
        branch: str = "main",
    ) -> ConversationRow:
        cid = new_id()
        ts = now()
        with db.write(self.engine) as conn:
            key = conn.execute(
                insert(C)
                .values(
                    id=cid,
                    title=title,
                    model=model,
                    system=None if system is None else dumps(system),
                    params=dumps(params or {}),
                    current_branch=branch,
                    turn_count=0,
                    has_media=False,
                    created_at=ts,
                    updated_at=ts,
                )
                .returning(C.c.key)
            ).scalar_one()
            conn.execute(
                insert(B).values(conversation_key=key, name=branch, head_id=None, created_at=ts)
            )
        return self.conversation(cid)

    def conversation(self, ref: str) -> ConversationRow:
        """A conversation by full id or unique prefix."""
        _check_ref(ref)
        with db.reader(self.database) as r:
            row = r.first(_CONVERSATION, {"id": ref})
            if row is None:
                row = r.first(_CONVERSATION, {"id": self._resolve(r, ref)})
                if row is None:  # deleted between the two reads
                    raise NotFound(f"no conversation with id {ref!r}")
        return _conversation_row(row)

    @contextmanager
    def _reading(self, conn: Connection | None) -> Iterator[Connection]:
        """`conn`, a read already under way, or a read transaction of its own."""
        if conn is not None:
            yield conn
        else:
            with db.read(self.engine) as conn:
                yield conn

    @contextmanager
    def one_read(self) -> Iterator[Connection]:
        """One read that sees a single moment of the database, for reads that must agree with
        each other (an export): a writer committing in between is not seen by any of them."""
        with db.read(self.engine, repeatable=True) as conn:
            yield conn

    def conversation_on(self, conn: Connection, conv_id: str) -> ConversationRow:
        """`conversation` by full id, inside a read under way."""
        row = db.OnConnection(conn).first(_CONVERSATION, {"id": conv_id})
        if row is None:
            raise NotFound(f"no conversation with id {conv_id!r}")
        return _conversation_row(row)

    def resolve_conversation(self, ref: str) -> str:
        """The full id of a conversation given by id or unique prefix."""
        _check_ref(ref)
        with db.reader(self.database) as r:
            return self._resolve(r, ref)

    def most_recent(self) -> ConversationRow | None:
        with db.reader(self.database) as r:
            row = r.first(_MOST_RECENT)
        return _conversation_row(row) if row else None

    def update_conversation(self, conv_id: str, **fields: Any) -> None:
        self.change_conversation(conv_id, lambda _row: fields)

    def change_conversation(
        self, conv_id: str, change: Callable[[ConversationRow], Mapping[str, Any]]
    ) -> ConversationRow:
        """Write the fields `change` makes of the conversation as it is now, in one transaction
        that holds its row (two changes at once cannot undo each other); the row written."""
        with db.write(self.engine) as conn:
            on = db.OnConnection(conn)
            lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
            row = on.first(_CONVERSATION + lock, {"id": conv_id})
            if row is None:
                raise NotFound(f"no conversation with id {conv_id!r}")
            fields = change(_conversation_row(row))
            values: dict[str, Any] = {}
            for key, value in fields.items():
                if key == "params":
                    values[key] = dumps(value)
                elif key == "system":
                    values[key] = None if value is None else dumps(value)
                elif key in ("title", "model", "current_branch"):
                    values[key] = value
                else:
                    raise InvalidInput(f"cannot update conversation field {key!r}")
            if values:
                conn.execute(update(C).where(C.c.key == row[0]).values(**values))
            row = on.first(_CONVERSATION, {"id": conv_id})
        return _conversation_row(row)

    def list_conversations(self, limit: int | None = None) -> list[ConversationSummary]:
        spend = (
            select(
                K.c.conversation_key,
                func.count().label("calls"),
                func.sum(K.c.input_tokens + K.c.cache_creation_input_tokens + K.c.cache_read_input_tokens).label("inp"),
                func.sum(K.c.output_tokens).label("out"),
                func.sum(K.c.cost_usd).label("cost"),
                func.sum(case((and_(K.c.cost_usd.is_(None), _BILLED), 1), else_=0)).label("unpriced"),
            )
            .group_by(K.c.conversation_key)
            .subquery()
        )
        first = (
            select(T.c.content)
            .where(T.c.conversation_key == C.c.key, T.c.depth == 0, T.c.role == "user")
            .order_by(T.c.id)
            .limit(1)
            .scalar_subquery()
        )
        q = (
            select(C, spend.c.calls, spend.c.inp, spend.c.out, spend.c.cost, spend.c.unpriced, first.label("first"))
            .outerjoin(spend, spend.c.conversation_key == C.c.key)
            .order_by(C.c.updated_at.desc(), C.c.id.desc())
        )
        if limit:
            q = q.limit(limit)
        with db.read(self.engine) as conn:
            rows = conn.execute(q).all()
        return [
            ConversationSummary(
                id=r.id,
                title=r.title,
                model=r.model,
                current_branch=r.current_branch,
                turn_count=r.turn_count,
                created_at=r.created_at,
                updated_at=r.updated_at,
                calls=r.calls or 0,
                input_tokens=int(r.inp or 0),
                output_tokens=int(r.out or 0),
                cost_usd=float(r.cost or 0.0),
                preview=_preview(r.first),
                unpriced_calls=int(r.unpriced or 0),
            )
            for r in rows
        ]

    def delete_conversation(self, conv_id: str) -> Deleted:
        """Delete a conversation whole, all or nothing: its turns, branches and ledger rows, and
        the images and documents no other conversation holds (a blob is stored once, shared by
        content). Conflict while a send holds one of its branches: its reply would be lost."""
        pg = self.dialect == "postgresql"
        with db.write(self.engine) as conn:
            # On PostgreSQL, the conversation's row first: a fork, an edit or a send that has not
            # yet touched it waits until the delete is done (then finds nothing); one that is
            # already under way holds a branch or a turn, and the delete, which takes those
            # without waiting, is then a Conflict rather than half of a deadlock.
            def locked(q: Any, **how: Any) -> Any:
                return q.with_for_update(**how) if pg else q  # (SQLite: BEGIN IMMEDIATE did)

            row = conn.execute(locked(select(C.c.key, C.c.has_media).where(C.c.id == conv_id), of=C)).first()
            if row is None:
                raise NotFound(f"no conversation with id {conv_id!r}")
            key, media = row
            try:
                leases = conn.execute(locked(
                    select(B.c.name, B.c.lease_owner, B.c.lease_expires).where(B.c.conversation_key == key),
                    nowait=True, of=B,
                )).all()
                for name, holder, expires in leases:
                    if holder and _lease_live(holder, expires):
                        raise _busy(name)
                if pg:
                    conn.execute(locked(select(T.c.id).where(T.c.conversation_key == key), nowait=True, of=T)).all()
            except sa_exc.OperationalError as e:
                code = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)  # psycopg, psycopg2
                if code != "55P03":  # lock_not_available
                    raise
                raise Conflict(f"conversation {conv_id} is busy: another writer is changing it") from None
            shas: set[str] = set()
            if media:
                for (content,) in conn.execute(select(T.c.content).where(T.c.conversation_key == key)):
                    shas.update(r["sha256"] for r in blob_refs(decode_content(content)))
            conn.execute(update(B).where(B.c.conversation_key == key).values(head_id=None))
            calls = conn.execute(delete(K).where(K.c.conversation_key == key)).rowcount
            # Unlink parents first, so the self-referencing foreign key holds at every statement.
            conn.execute(update(T).where(T.c.conversation_key == key).values(parent_id=None))
            turns = conn.execute(delete(T).where(T.c.conversation_key == key)).rowcount
            branches = conn.execute(delete(B).where(B.c.conversation_key == key)).rowcount
            conn.execute(delete(C).where(C.c.key == key))
            blobs = self._drop_unused_blobs(conn, sorted(shas)) if shas else 0
        return Deleted(conv_id, turns=turns, branches=branches, calls=calls, blobs=blobs)

    def _drop_unused_blobs(self, conn: Connection, shas: Sequence[str]) -> int:
        """Delete the blobs no remaining turn refers to. On PostgreSQL, first wait out every
        transaction that may be writing a turn with media: each one writes its blobs in the
        same transaction (`_INSERT_BLOB`, which would not re-insert a blob it found), so a
        turn not yet committed could otherwise point at a blob deleted under it."""
        if self.dialect == "postgresql":
            conn.exec_driver_sql("LOCK TABLE blobs IN SHARE ROW EXCLUSIVE MODE")
        dropped = 0
        for sha in shas:
            # Only conversations that ever held media can refer to a blob (hex: no LIKE escapes).
            used = conn.execute(
                select(T.c.id)
                .join(C, C.c.key == T.c.conversation_key)
                .where(C.c.has_media.is_(True), T.c.content.like(f"%{sha}%"))
                .limit(1)
            ).first()
            if used is None:
                dropped += conn.execute(delete(BL).where(BL.c.sha256 == sha)).rowcount
        return dropped

    def _key(self, x: Connection | db.Writer | db.OnConnection, conv_id: str) -> int:
        """The integer key of a conversation given by its full public id."""
        if isinstance(x, Connection):
            x = db.OnConnection(x)
        row = x.first(_KEY_SQL, {"conv_id": conv_id})
        if row is None:
            raise NotFound(f"no conversation with id {conv_id!r}")
        return int(row[0])

    # -- ids -------------------------------------------------------------------------------

    def _resolve(self, r: db.Reader, ref: str) -> str:
        """The id of the one conversation whose id starts with `ref`."""
        prefix = normalize_prefix(ref)
        if prefix is None:
            raise NotFound(f"no conversation with id {ref!r}")
        low, high = prefix_range(prefix)
        ids = [row[0] for row in r.all(_CONVERSATIONS_BY_PREFIX, {"low": low, "high": high})]
        if not ids:
            raise NotFound(f"no conversation with id {ref!r}")
        if len(ids) > 1:
            raise AmbiguousId(ref, ids, "conversation")
        return ids[0]

    def resolve_turn(self, conv_id: str, ref: int | str) -> TurnRow:
        with db.read(self.engine) as conn:
            return self._resolve_turn(conn, conv_id, ref)

    def _resolve_turn(self, conn: Connection, conv_id: str, ref: int | str) -> TurnRow:
        return _turn_row(self._turn_with_parent(conn, conv_id, ref))

    def _turn_with_parent(
        self, conn: Connection, conv_id: str, ref: int | str, name: str | None = None
    ) -> Any:
        """A turn of this conversation by id (an integer, or its digits as text), as the row
        of _TURN_BY_ID; with `name`, also whether that branch name is taken (`name_taken`)."""
        turn_id = parse_turn_id(ref)
        if name is None:
            row = conn.execute(_TURN_BY_ID, {"id": turn_id}).first()
        else:
            row = conn.execute(_TURN_BY_ID_AND_NAME, {"id": turn_id, "name": name}).first()
        if row is None:
            raise NotFound(f"no turn with id {ref!r}")
        if row.conversation_id != conv_id:
            raise NotFound(f"turn {turn_id} belongs to another conversation")
        return row

    def turn(self, turn_id: int) -> TurnRow:
        with db.read(self.engine) as conn:
            row = conn.execute(_TURN_BY_ID, {"id": turn_id}).first()
        if row is None:
            raise NotFound(f"no turn with id {turn_id!r}")
        return _turn_row(row)

    def turns(self, conv_id: str, conn: Connection | None = None) -> list[TurnRow]:
        """Every turn of a conversation, parents before children (for the tree view)."""
        with self._reading(conn) as conn:
            key = self._key(conn, conv_id)
            rows = conn.execute(
                select(T).where(T.c.conversation_key == key).order_by(T.c.depth, T.c.id)
            ).all()
        return [_turn_row(r, conv_id) for r in rows]

    # -- paths -----------------------------------------------------------------------------

    def path(self, conv_id: str, branch: str | None = None, head_id: int | None = None) -> Path:
        """A branch's (or any turn's) path from its root."""
        if head_id is None:
            return self.snapshot(conv_id, branch)[1]
        with db.reader(self.database) as r:
            row = r.first(_TURN_IN_CONVERSATION, {"head_id": head_id, "conv_id": conv_id})
            if row is None:
                raise NotFound(f"no turn {head_id} in conversation {conv_id}")
            depth, count, key, media = row
            chain = self._chain(r, key, head_id, depth, count)
        return self._path(branch or "", head_id, depth, chain, bool(media))

    def snapshot(
        self, conv_id: str, branch: str | None = None, *, for_send: bool = False
    ) -> tuple[ConversationRow, Path]:
        """A conversation and a branch's path (default: the current one) in two statements:
        what building the next request needs (`for_send`: with the store's budget)."""
        params = {"conv_id": conv_id, "branch": branch, "budget_key": STORE_BUDGET_KEY}
        with db.reader(self.database) as r:
            row = r.first(_SNAPSHOT_FOR_SEND if for_send else _SNAPSHOT, params)
            if row is None:
                raise NotFound(f"no conversation with id {conv_id!r}")
            branch_name, head_id, depth = row[11:14]
            if branch_name is None:
                raise NotFound(f"no branch {branch!r} in conversation {conv_id}")
            info = _conversation_row(row)
            if for_send and row[14] is not None:
                info = replace(info, store_budget_usd=float(orjson.loads(row[14])))
            if head_id is None:
                return info, Path(branch_name, None, [], None, -1)
            chain = self._chain(r, info.key, head_id, depth, info.turn_count)
        return info, self._path(branch_name, head_id, depth, chain, info.has_media)

    def _chain(self, r: db.Reader, conv_key: int, head_id: int, depth: int, count: int) -> list[Any]:
        """The path's rows, root first, read in the fewest rows a thread of this shape allows.

        `depth` and `count` come from an earlier statement: a writer may have added turns since
        (turns are only ever added, or deleted with their whole conversation), so what is read
        is checked against them instead of relying on a snapshot across statements."""
        if count == depth + 1:
            # A thread that never branched: its turns down to the head are the path.
            chain = r.all(_LINEAR_PATH, {"conv_key": conv_key, "depth": depth})
            if len(chain) == depth + 1 and chain[-1][0] == head_id:
                return chain
            # A turn added beside the path since: fall through and walk from the head.
        if count <= (depth + 1) * SCAN_RATIO + SCAN_SLACK:
            rows = r.all(_NEAR_LINEAR_PATH, {"conv_key": conv_key, "depth": depth})
            by_id = {row[0]: row for row in rows}
            chain = []
            cur: int | None = head_id
            while cur is not None:
                found = by_id.get(cur)
                if found is None:
                    break
                chain.append(found)
                cur = found[4]
            chain.reverse()
        else:
            chain = self._walk_cte(r, head_id)
        if len(chain) != depth + 1:
            raise NotFound("the conversation was deleted while it was being read")
        return chain

    def _walk_cte(self, r: db.Reader, head_id: int) -> list[Any]:
        return r.all(_WALK_PATH, {"head_id": head_id})

    def _path(self, branch: str, head_id: int, depth: int, chain: list[Any], media: bool) -> Path:
        loads, role_of = orjson.loads, ROLE_OF_KIND
        with gc_paused():
            # decode_content, inline: a call per turn is a tenth of reading a path.
            turns = [
                TurnRecord(
                    r[0],
                    role_of[r[1]],
                    r[1],
                    loads(c) if (c := r[2])[:1] == "[" else [{"type": "text", "text": c}],
                    r[3],
                )
                for r in chain
            ]
        blobs = None
        # Blob references are the only "source" objects convo stores (URL media needs no bytes),
        # and only a conversation that ever held media can have one: the others skip the scan
        # (a substring search of every turn costs 40 us per 100 turns).
        if media and any('"source"' in r[2] for r in chain):
            blobs = self.blobs_of(turns)
        return Path(branch, head_id, turns, blobs, depth)

    def blobs_of(self, turns: Iterable[TurnRecord | TurnRow], conn: Connection | None = None) -> dict[str, bytes]:
        """The bytes behind every blob reference in these turns."""
        shas = {r["sha256"] for t in turns for r in blob_refs(t.content)}
        if not shas:
            return {}
        with self._reading(conn) as conn:
            rows = conn.execute(select(BL.c.sha256, BL.c.data).where(BL.c.sha256.in_(shas))).all()
        return {sha: bytes(data) for sha, data in rows}

    # -- appending -------------------------------------------------------------------------

    def append(
        self,
        conv_id: str,
        branch: str,
        expected_head: int | None,
        turns: Sequence[NewTurn],
        *,
        owner: str | None = None,
        hold: timedelta | None = None,
        head_depth: int | None = None,
    ) -> list[int]:
        """Append turns at a branch head in one transaction; optionally take the branch lease.

        Raises Conflict when the head is no longer `expected_head` or another live writer holds
        the branch. With `hold`, the branch stays leased to `owner` until `release`.
        `head_depth`, when the caller knows it, saves a lookup.
        """
        return self._append(conv_id, branch, expected_head, turns, owner, hold, head_depth, None)[0]

    def begin_send(
        self,
        conv_id: str,
        branch: str,
        expected_head: int | None,
        turns: Sequence[NewTurn],
        *,
        owner: str,
        hold: timedelta,
        head_depth: int | None,
        first_call: FirstCall,
    ) -> tuple[list[int], int]:
        """`append` with the lease, plus the ledger row of the call about to be made, in one
        commit: the turn ids and the call id."""
        ids, call_id = self._append(
            conv_id, branch, expected_head, turns, owner, hold, head_depth, first_call
        )
        assert call_id is not None
        return ids, call_id

    def _append(
        self,
        conv_id: str,
        branch: str,
        expected_head: int | None,
        turns: Sequence[NewTurn],
        owner: str | None,
        hold: timedelta | None,
        head_depth: int | None,
        first_call: FirstCall | None,
    ) -> tuple[list[int], int | None]:
        lease = (
            {"lease_owner": owner, "lease_expires": now() + hold}
            if owner is not None and hold is not None
            else {}
        )
        if len(turns) == 1:  # a send's turn, or any one turn: on the driver (see db.Writer)
            if self.dialect == "postgresql":
                done = self._one_turn_at_once(
                    conv_id, branch, expected_head, turns[0], head_depth, owner, lease,
                    lambda head: _moved(branch, head, expected_head), first_call=first_call,
                )
                if done is not None:
                    return done
            with db.writer(self.database) as w:
                head, key = self._lock_branch(w, conv_id, branch, owner)
                _check_head(branch, head, expected_head)
                return self._write_one_turn(
                    w, key, branch, head, turns[0], head_depth, lease, first_call=first_call
                )
        call_id = None
        with db.write(self.engine) as conn:
            head, key = self._lock_branch(db.OnConnection(conn), conv_id, branch, owner)
            _check_head(branch, head, expected_head)
            ids = self._insert_turns(conn, key, branch, head, turns, head_depth, lease)
            if lease and not ids:
                conn.execute(_MOVE_HEAD, {"w_conv": key, "w_branch": branch, **lease})
            if first_call is not None:
                call_id = conn.execute(
                    _INSERT_CALL,
                    {
                        "conversation_key": key, "branch": branch,
                        "turn_id": ids[-1] if ids else head, "attempt": 0, "model": first_call.model,
                        "streamed": int(first_call.streamed), "status": "pending",
                        "started_at": first_call.started_at,
                    },
                ).scalar_one()
        return ids, call_id

    def _write_one_turn(
        self,
        w: db.Writer,
        key: int,
        branch: str,
        parent_id: int | None,
        turn: NewTurn,
        parent_depth: int | None,
        lease: Mapping[str, Any],
        *,
        first_call: FirstCall | None = None,
        finish: tuple[int, datetime, Mapping[str, Any]] | None = None,
    ) -> tuple[list[int], int | None]:
        """A turn with everything written beside it: the branch's new head (and lease change),
        the conversation's count, and the call's ledger row (`first_call`: a new pending row;
        `finish`: (call id, its start, the fields that complete it)). One statement on
        PostgreSQL, where each is a round trip: each of a send's two transactions makes 4
        (BEGIN, the branch lock, this, COMMIT) instead of 7. Returns ([turn id], new call id
        or None)."""
        ts = now()
        rows, media = self._turn_rows(w, key, parent_id, [turn], parent_depth, ts)
        params, calls = _one_turn_params(rows[0], key, branch, media, ts, lease, first_call, finish)
        insert_turn, *writes = _one_turn_sql(self.dialect, bool(lease), first_call is not None, calls)
        params = db.bind(params, self.dialect)  # once, for all the statements
        row = w.first(insert_turn, params)
        if not writes:  # PostgreSQL: the one statement wrote them all
            return [int(row[0])], None if row[1] is None else int(row[1])
        params["turn_id"] = row[0]
        new_call = None
        if first_call is not None:
            *writes, insert_call = writes
        for sql in writes:
            w.run(sql, params)
        if first_call is not None:
            new_call = int(w.first(insert_call, params)[0])
        return [int(row[0])], new_call

    def _one_turn_at_once(
        self,
        conv_id: str,
        branch: str,
        expected: int | None,
        turn: NewTurn,
        parent_depth: int | None,
        owner: str | None,
        lease: Mapping[str, Any],
        moved: Callable[[int | None], Conflict],
        *,
        first_call: FirstCall | None = None,
        finish: tuple[int, datetime, Mapping[str, Any]] | None = None,
    ) -> tuple[list[int], int | None] | None:
        """`_write_one_turn` under `expected` on PostgreSQL as one statement in autocommit,
        the branch locked and checked by the statement itself: one round trip where BEGIN, the
        lock, the write and COMMIT took four (a send makes two such writes).

        Raises `moved(head)` if the head is not `expected`. None where it writes nothing and
        the caller's transaction must do it: the turn carries media (blobs go first), the
        parent's depth is unknown, the branch is missing or another writer holds its lease
        (that transaction's checks tell which, and deal with a dead holder)."""
        if expected is None:
            parent_depth = -1
        elif parent_depth is None:
            return None
        ts = now()
        rows, blobs = _chain_rows(None, expected, [turn], parent_depth, ts)
        if blobs:
            return None
        params, calls = _one_turn_params(rows[0], None, branch, False, ts, lease, first_call, finish)
        params.update(conv_id=conv_id, expected=expected, holder=owner)
        (sql,) = _one_turn_sql(self.dialect, bool(lease), first_call is not None, calls, locked=True)

        def landed(r: db.Reader, bound: Mapping[str, Any]) -> Any:
            row = r.first(_PG_TURN_LANDED, bound)
            return None if row is None else (expected, owner, None, row[0], row[1])

        got = db.write_once(self.database, sql, params, landed)
        if got is None:
            return None
        head, _holder, _expires, turn_id, call_id = got
        if turn_id is None:
            if head != expected:
                raise moved(head)
            return None
        return [int(turn_id)], None if call_id is None else int(call_id)

    def _lock_branch(
        self, x: db.Writer | db.OnConnection, conv_id: str, branch: str, owner: str | None
    ) -> tuple[int | None, int]:
        """The branch's head and the conversation's key, the branch row locked for writing."""
        q = _LOCK_BRANCH_FOR_UPDATE if self.dialect == "postgresql" else _LOCK_BRANCH
        row = x.first(q, {"conv_id": conv_id, "branch": branch})
        if row is None:
            self._key(x, conv_id)  # NotFound for the conversation itself, if that is it
            raise NotFound(f"no branch {branch!r} in conversation {conv_id}")
        head, holder, expires, key = row
        if holder and holder != owner:
            if _lease_live(holder, expires):
                raise Conflict(
                    f"branch {branch!r} is busy: another send on it has not finished"
                )
            # The holder died or its lease ran out: the calls it left pending will never
            # finish. Say so in the ledger rather than leave them pending forever.
            why = "the sending process died before the call finished"
            x.run(_ABANDON_CALLS, {"key": key, "branch": branch, "why": why})
        return head, key

    def _insert_turns(
        self,
        conn: Connection,
        conv_key: int,
        branch: str,
        parent_id: int | None,
        turns: Sequence[NewTurn],
        parent_depth: int | None = None,
        branch_values: dict[str, Any] | None = None,
    ) -> list[int]:
        """Insert turns under `parent_id` and move the branch head (with `branch_values`, such
        as a lease change, in the same UPDATE)."""
        ts = now()
        ids, media = self._write_turns(conn, conv_key, parent_id, turns, parent_depth, ts)
        if ids:
            conn.execute(
                _MOVE_HEAD,
                {"w_conv": conv_key, "w_branch": branch, "head_id": ids[-1], **(branch_values or {})},
            )
            conn.execute(
                _COUNT_MEDIA_TURNS if media else _COUNT_TURNS, {"conv_key": conv_key, "n": len(ids), "ts": ts}
            )
        return ids

    def _write_turns(
        self,
        conn: Connection,
        conv_key: int,
        parent_id: int | None,
        turns: Sequence[NewTurn],
        parent_depth: int | None,
        ts: datetime,
    ) -> tuple[list[int], bool]:
        """Insert turns (and their blobs) as a chain under `parent_id`; their ids, and whether
        any of them holds an image or document."""
        rows, media = self._turn_rows(db.OnConnection(conn), conv_key, parent_id, turns, parent_depth, ts)
        if not rows:
            return [], False
        if len(rows) == 1:  # a send's turn: the database numbers it
            return [int(conn.execute(_INSERT_TURN, rows[0]).scalar_one())], media
        ids = self._next_turn_ids(conn, len(rows))
        for row, tid in zip(rows, ids, strict=True):
            row["id"], row["parent_id"] = tid, parent_id
            parent_id = tid
        conn.execute(_INSERT_TURNS, rows)
        return ids, media

    def _turn_rows(
        self,
        x: db.Writer | db.OnConnection,
        conv_key: int,
        parent_id: int | None,
        turns: Sequence[NewTurn],
        parent_depth: int | None,
        ts: datetime,
    ) -> tuple[list[dict[str, Any]], bool]:
        """The rows of turns about to be written as a chain under `parent_id` (their blobs
        written already), and whether any of them holds an image or document."""
        if not turns:
            return [], False
        rows, blobs = _chain_rows(conv_key, parent_id, turns, _depth_of(x, parent_id, parent_depth), ts)
        if blobs:
            self._insert_blobs(x, blobs, ts)
        return rows, bool(blobs)

    def _next_turn_ids(self, conn: Connection, n: int) -> list[int]:
        """`n` fresh turn ids, in order, for rows that must name their parents before they are
        written. On SQLite the write transaction holds the database's only write lock."""
        if self.dialect == "sqlite":
            last = int(conn.execute(_NEXT_TURN_IDS["sqlite"]).scalar_one())
            return list(range(last + 1, last + n + 1))
        return [int(v) for v in conn.execute(_NEXT_TURN_IDS["postgresql"], {"n": n}).scalars()]

    def _insert_blobs(self, x: db.Writer | db.OnConnection, blobs: Iterable[BlobData], ts: datetime) -> None:
        for b in blobs:
            x.run(
                _INSERT_BLOB,
                {"sha256": b.sha256, "media_type": b.media_type, "size": len(b.data), "data": b.data, "created_at": ts},
            )

    def renew_lease(self, conv_id: str, branch: str, owner: str, hold: timedelta) -> None:
        """Extend a lease this owner holds (a long call must not lose its branch)."""
        with db.write(self.engine) as conn:
            conn.execute(
                update(B)
                .where(B.c.conversation_key == _key_of(conv_id), B.c.name == branch, B.c.lease_owner == owner)
                .values(lease_expires=now() + hold)
            )

    def release(self, conv_id: str, branch: str, owner: str, *, abandon_pending: bool = False) -> None:
        """Free a branch a failed send held; with `abandon_pending`, when it did hold it, mark
        the call it opened as never made (the send stopped before its request). The release
        changes nothing when run twice, so a connection found lost (the server dropped the
        pool's connections while the call failed) is replaced and the statement run again: a
        lease left behind would keep every process, this one too, off the branch until it
        expired."""
        with db.writer(self.database) as w:
            released = w.run(_RELEASE, {"conv_id": conv_id, "branch": branch, "owner": owner})
            if released and abandon_pending:
                w.run(_ABANDON_INTERRUPTED, {"conv_id": conv_id, "branch": branch,
                                             "why": "the send stopped before its request was made"})

    # -- branches --------------------------------------------------------------------------

    def refuse_if_busy(self, conv_id: str) -> None:
        """Conflict if a send holds one of the conversation's branches: what a delete would
        find, read without locking anything (to say so before asking whether to delete)."""
        for b in self.branches(conv_id):
            if b.lease_owner and _lease_live(b.lease_owner, b.lease_expires):
                raise _busy(b.name)

    def branches(self, conv_id: str, conn: Connection | None = None) -> list[BranchRow]:
        with self._reading(conn) as conn:
            rows = conn.execute(
                select(
                    B.c.name, B.c.head_id, B.c.created_at, B.c.lease_owner, B.c.lease_expires,
                    T.c.depth,
                )
                .select_from(B.outerjoin(T, T.c.id == B.c.head_id))
                .where(B.c.conversation_key == _key_of(conv_id))
                .order_by(B.c.created_at, B.c.id)
            ).all()
        return [BranchRow(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def branch(self, conv_id: str, name: str) -> BranchRow:
        for b in self.branches(conv_id):
            if b.name == name:
                return b
        raise NotFound(f"no branch {name!r} in conversation {conv_id}")

    def checkout(self, conv_id: str, name: str) -> None:
        with db.write(self.engine) as conn:
            done = conn.execute(_CHECKOUT, {"conv_id": conv_id, "name": name, "ts": now()}).rowcount
            if not done:
                self._key(conn, conv_id)  # NotFound for the conversation, if that is it
                raise NotFound(f"no branch {name!r} in conversation {conv_id}")

    def delete_branch(self, conv_id: str, name: str) -> None:
        """Drop a branch name. Its turns and its spend stay: other branches and audits use them."""
        with db.write(self.engine) as conn:
            current = conn.execute(select(C.c.current_branch).where(C.c.id == conv_id)).scalar_one_or_none()
            if current is None:
                raise NotFound(f"no conversation with id {conv_id!r}")
            if current == name:
                raise InvalidInput(f"branch {name!r} is checked out: check out another one first")
            _, key = self._lock_branch(db.OnConnection(conn), conv_id, name, None)  # NotFound, or Conflict while in use
            conn.execute(delete(B).where(B.c.conversation_key == key, B.c.name == name))

    def _free_branch_name(self, conn: Connection, conv_key: int, prefix: str) -> str:
        """`prefix-N` with the smallest N used by no branch, live or deleted with calls in the
        ledger (so a new branch never inherits an old one's spend in an audit by branch).
        Index lookups only: constant time whatever the thread's length."""
        live = set(conn.execute(select(B.c.name).where(B.c.conversation_key == conv_key)).scalars())
        n = 1
        while True:
            name = f"{prefix}-{n}"
            if name not in live and not self._billed_branch(conn, conv_key, name):
                return name
            n += 1

    def _branch_name_taken(self, conn: Connection, conv_key: int, name: str) -> bool:
        return bool(conn.execute(_BRANCH_NAME_TAKEN, {"conv_key": conv_key, "name": name}).scalar())

    def _billed_branch(self, conn: Connection, conv_key: int, name: str) -> bool:
        q = select(K.c.id).where(K.c.conversation_key == conv_key, K.c.branch == name).limit(1)
        return conn.execute(q).first() is not None

    @contextmanager
    def branching(self, conv_id: str) -> Iterator[Branching]:
        """A fork or an edit: resolve, check, name, write. One transaction on SQLite; on
        PostgreSQL, where the write is one statement (`Branching.create`), none: each read and
        the write are a round trip each, with no BEGIN and COMMIT around them (the reads saw
        no more of one snapshot inside a READ COMMITTED transaction either)."""
        with db.write(self.engine, autocommit=self.dialect == "postgresql") as conn:
            yield Branching(self, conn, conv_id)

    def _tail(
        self, conn: Connection, start: int | TurnRow, known: Mapping[int, tuple[Any, ...]] | None = None
    ) -> tuple[list[TurnRecord], bool]:
        """The turns from the nearest assistant ancestor of `start` (inclusive) down to it,
        and whether the walk reached the root: all that tool pairing and role order depend on
        when a turn is forked at or edited, read without loading the whole path. `start` may
        be a row already read, and `known` rows (in _TAIL_TURN's shape) are not read again."""
        out: list[TurnRecord] = []
        cur: int | None
        if isinstance(start, TurnRow):
            out.append(TurnRecord(start.id, start.role, start.kind, start.content, start.stop_reason))
            if start.role == "assistant":
                return out, False
            cur = start.parent_id
        else:
            cur = start
        while cur is not None:
            r = known[cur] if known and cur in known else conn.execute(_TAIL_TURN, {"id": cur}).one()
            out.append(TurnRecord(r[0], r[2], r[3], decode_content(r[4]), r[5]))
            if r[2] == "assistant":
                return out[::-1], False
            cur = r[1]
        return out[::-1], True

    # -- the calls ledger ------------------------------------------------------------------

    def start_call(
        self,
        *,
        conv_id: str,
        branch: str,
        turn_id: int | None,
        model: str,
        attempt: int,
        streamed: bool,
        started_at: datetime | None = None,
    ) -> int:
        with db.write(self.engine) as conn:
            return int(
                conn.execute(
                    _INSERT_CALL,
                    {
                        "conversation_key": self._key(conn, conv_id),
                        "branch": branch,
                        "turn_id": turn_id,
                        "attempt": attempt,
                        "model": model,
                        "streamed": int(streamed),
                        "status": "pending",
                        "started_at": started_at or now(),
                    },
                ).scalar_one()
            )

    def finish_call(
        self, call_id: int, *, started_at: datetime | None = None, unless_replied: bool = False,
        **fields: Any,
    ) -> None:
        """Write how a call ended. `unless_replied`: not if its reply is stored (its commit
        landed before the failure being recorded); a call another writer marked abandoned
        meanwhile still gets what it was billed."""
        with db.write(self.engine) as conn:
            self._finish_call(conn, call_id, fields, started_at, unless_replied=unless_replied)

    def _finish_call(
        self, conn: Connection, call_id: int, fields: dict[str, Any], started: datetime | None = None,
        *, unless_replied: bool = False,
    ) -> None:
        if started is None:
            started = self._call_started(db.OnConnection(conn), call_id)
        end = now()
        conn.execute(
            _UPDATE_UNREPLIED_CALL if unless_replied else _UPDATE_CALL,
            {"w_id": call_id, "finished_at": end, "duration_ms": _duration_ms(started, end), **_fit(fields)},
        )

    def _call_started(self, x: db.Writer | db.OnConnection, call_id: int) -> datetime:
        found = x.first(_STARTED_SQL, {"id": call_id})
        if found is None:
            raise NotFound(f"no call with id {call_id}")
        return instant(found[0])

    def finish_with_reply(
        self,
        call_id: int,
        conv_id: str,
        branch: str,
        parent_id: int,
        reply: NewTurn,
        owner: str | None,
        fields: dict[str, Any],
        *,
        parent_depth: int | None = None,
        started_at: datetime | None = None,
    ) -> int:
        """Store a reply, move the head, release the lease and complete its call row: all or
        nothing."""
        release = {"lease_owner": None, "lease_expires": None} if owner is not None else {}

        def moved(_head: int | None) -> Conflict:
            return Conflict(f"branch {branch!r} moved while waiting for the reply; the reply was not stored")

        if self.dialect == "postgresql" and started_at is not None:
            done = self._one_turn_at_once(
                conv_id, branch, parent_id, reply, parent_depth, owner, release, moved,
                finish=(call_id, started_at, fields),
            )
            if done is not None:
                return done[0][0]
        with db.writer(self.database) as w:
            head, key = self._lock_branch(w, conv_id, branch, owner)
            if head != parent_id:
                raise moved(head)
            if started_at is None:
                started_at = self._call_started(w, call_id)
            (reply_id,), _ = self._write_one_turn(
                w, key, branch, parent_id, reply, parent_depth, release,
                finish=(call_id, started_at, fields),
            )
        return reply_id

    def calls(self, conv_id: str, conn: Connection | None = None) -> list[dict[str, Any]]:
        """The conversation's ledger rows, oldest first (`conversation_id` is its public id)."""
        with self._reading(conn) as conn:
            rows = conn.execute(
                select(*(c for c in K.c if c.name != "conversation_key"), C.c.id.label("conversation_id"))
                .join(C, C.c.key == K.c.conversation_key)
                .where(C.c.id == conv_id)
                .order_by(K.c.started_at, K.c.id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def reply_calls(self, conv_id: str, reply_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The successful call behind each reply turn, for showing usage beside a transcript:
        the conversation's calls that stored a reply, read through its index, kept if wanted."""
        wanted = set(reply_ids)
        if not wanted:
            return {}
        with db.read(self.engine) as conn:
            rows = conn.execute(
                select(K).where(K.c.conversation_key == _key_of(conv_id), K.c.reply_id.is_not(None))
            ).mappings().all()
        return {r["reply_id"]: dict(r) for r in rows if r["reply_id"] in wanted}

    def usage(
        self,
        *,
        conversation: str | None = None,
        branch: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        by: str = "conversation",
    ) -> UsageReport:
        """Spend grouped by conversation, branch, model or day: one aggregate query.

        Calls are grouped by integer key first and named afterwards, so an audit reads the
        ledger in index order and looks each conversation's public id up once."""
        group: list[ColumnElement[Any]]
        if by == "conversation":
            group = [K.c.conversation_key]
        elif by == "branch":
            group = [K.c.conversation_key, K.c.branch] if conversation is None else [K.c.branch]
        elif by == "model":
            group = [K.c.model]
        elif by == "day":
            group = [
                (
                    func.to_char(func.timezone("UTC", K.c.started_at), "YYYY-MM-DD")
                    if self.dialect == "postgresql"
                    # integer microseconds on SQLite (see models.Timestamp)
                    # whole seconds: a fraction would be rounded, moving 23:59:59.9995 to the next day
                    else func.strftime("%Y-%m-%d", type_coerce(K.c.started_at, Integer) // 1_000_000, "unixepoch")
                ).label("day")
            ]
        else:
            shown = repr(by)[:40] if isinstance(by, str) else type(by).__name__
            raise InvalidInput(f"usage can be grouped by conversation, branch, model or day, not {shown}")
        conds = []
        if conversation is not None:
            conds.append(K.c.conversation_key == _key_of(conversation))
        if branch is not None:
            conds.append(K.c.branch == branch)
        if since is not None:
            conds.append(K.c.started_at >= since)
        if until is not None:
            conds.append(K.c.started_at < until)
        billed = _BILLED
        unpriced = func.sum(case((and_(K.c.cost_usd.is_(None), billed), 1), else_=0))
        sums = select(
            *group,
            func.count().label("calls"),
            func.coalesce(func.sum(K.c.input_tokens), 0).label("inp"),
            func.coalesce(func.sum(K.c.output_tokens), 0).label("out"),
            func.coalesce(func.sum(K.c.cache_creation_input_tokens), 0).label("cw"),
            func.coalesce(func.sum(K.c.cache_read_input_tokens), 0).label("cr"),
            func.coalesce(func.sum(K.c.cost_usd), 0.0).label("cost"),
            func.coalesce(func.sum(K.c.uncached_cost_usd), 0.0).label("uncached"),
            unpriced.label("unpriced"),
        ).where(*conds).group_by(*group).subquery()
        key: ColumnElement[Any]
        if by == "conversation":
            key = C.c.id
        elif by == "branch" and conversation is None:
            key = C.c.id + literal(":") + sums.c.branch
        else:
            key = sums.c[group[0].name]
        totals = [sums.c[n] for n in ("calls", "inp", "out", "cw", "cr", "cost", "uncached", "unpriced")]
        q = select(key.label("key"), *totals)
        if "conversation_key" in sums.c:
            q = q.join(C, C.c.key == sums.c.conversation_key)
        q = q.order_by(key)
        with db.read(self.engine) as conn:
            result = conn.execute(q).all()
            missing = []
            if any(r[8] for r in result):
                missing = sorted(
                    conn.execute(
                        select(K.c.model).where(*conds, K.c.cost_usd.is_(None), billed).distinct()
                    ).scalars()
                )
        rows = [
            UsageRow(str(r[0]), r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]), float(r[6]), float(r[7]),
                     int(r[8] or 0))
            for r in result
        ]
        total = UsageRow(
            "total",
            sum(r.calls for r in rows),
            sum(r.input_tokens for r in rows),
            sum(r.output_tokens for r in rows),
            sum(r.cache_creation_input_tokens for r in rows),
            sum(r.cache_read_input_tokens for r in rows),
            sum(r.cost_usd for r in rows),
            sum(r.uncached_cost_usd for r in rows),
            sum(r.unpriced_calls for r in rows),
        )
        return UsageReport(by, rows, total, total.unpriced_calls, missing)

    # -- import ----------------------------------------------------------------------------

    def import_tree(
        self,
        conversation: dict[str, Any],
        turns: list[dict[str, Any]],
        branches: list[dict[str, Any]],
        calls: list[dict[str, Any]],
    ) -> str:
        """A whole conversation under new ids, in one transaction (validated by the caller)."""
        children: dict[Any, list[dict[str, Any]]] = {}
        for t in turns:
            children.setdefault(t["parent_id"], []).append(t)
        cid = new_id()
        ts = now()
        rows, blobs = [], {}
        stack = [(t, 0) for t in reversed(children.get(None, []))]
        while stack:  # parents before children, siblings in the file's order, depth from the root
            t, depth = stack.pop()
            content, found = extract_blobs(t["content"])
            blobs.update({b.sha256: b for b in found})
            rows.append(
                {
                    "old": t["id"],
                    "old_parent": t["parent_id"],
                    "old_source": t.get("source_id"),
                    "role": t["role"],
                    "kind": t["kind"],
                    "content": encode_content(content),
                    "depth": depth,
                    "stop_reason": t.get("stop_reason"),
                    "created_at": t["created_at"],
                }
            )
            stack.extend((c, depth + 1) for c in reversed(children.get(t["id"], [])))
        with db.write(self.engine) as conn:
            key = conn.execute(
                insert(C)
                .values(
                    id=cid,
                    title=conversation["title"],
                    model=conversation["model"],
                    system=None if conversation["system"] is None else dumps(conversation["system"]),
                    params=dumps(conversation["params"]),
                    current_branch=conversation["current_branch"],
                    turn_count=len(rows),
                    has_media=bool(blobs),
                    created_at=conversation["created_at"],
                    updated_at=ts,
                )
                .returning(C.c.key)
            ).scalar_one()
            if blobs:
                self._insert_blobs(db.OnConnection(conn), blobs.values(), ts)
            ids = dict(zip((r["old"] for r in rows), self._next_turn_ids(conn, len(rows)), strict=True))
            if rows:
                conn.execute(
                    _INSERT_TURNS,
                    [
                        {
                            "id": ids[r.pop("old")],
                            "conversation_key": key,
                            "parent_id": ids.get(r.pop("old_parent")),
                            "source_id": ids.get(r.pop("old_source")),
                            **r,
                        }
                        for r in rows
                    ],
                )
            conn.execute(
                insert(B),
                [
                    {"conversation_key": key, "name": b["name"], "head_id": ids.get(b["head_id"]), "created_at": ts}
                    for b in branches
                ],
            )
            if calls:
                conn.execute(
                    insert(K),
                    [
                        {
                            **{k: v for k, v in c.items() if k != "id"},
                            "conversation_key": key,
                            "turn_id": ids.get(c.get("turn_id")),
                            "reply_id": ids.get(c.get("reply_id")),
                        }
                        for c in calls
                    ],
                )
        return cid

    # -- settings --------------------------------------------------------------------------

    def get_setting(self, key: str) -> Any:
        with db.read(self.engine) as conn:
            value = conn.execute(select(S.c.value).where(S.c.key == key)).scalar()
        return None if value is None else orjson.loads(value)

    def set_setting(self, key: str, value: Any) -> None:
        with db.write(self.engine) as conn:
            conn.execute(delete(S).where(S.c.key == key))
            if value is not None:
                conn.execute(insert(S).values(key=key, value=dumps(value)))

    def integrity_problems(self) -> list[str]:
        """Structural checks beyond the engine's own: every branch head and parent exists."""
        problems: list[str] = []
        with db.read(self.engine) as conn:
            if self.dialect == "sqlite":
                res = conn.exec_driver_sql("PRAGMA integrity_check").scalar()
                if res != "ok":
                    problems.append(f"sqlite integrity_check: {res}")
                for row in conn.exec_driver_sql("PRAGMA foreign_key_check"):
                    problems.append(f"foreign key violation: {tuple(row)}")
            parent = T.alias("parent")
            orphans = conn.execute(
                select(func.count())
                .select_from(T.outerjoin(parent, T.c.parent_id == parent.c.id))
                .where(T.c.parent_id.is_not(None), parent.c.id.is_(None))
            ).scalar()
            if orphans:
                problems.append(f"{orphans} turns with a missing parent")
            bad_depth = conn.execute(
                select(func.count())
                .select_from(T.join(parent, T.c.parent_id == parent.c.id))
                .where(T.c.depth != parent.c.depth + 1)
            ).scalar()
            if bad_depth:
                problems.append(f"{bad_depth} turns whose depth is not their parent's + 1")
            dangling = conn.execute(
                select(func.count())
                .select_from(B.outerjoin(T, T.c.id == B.c.head_id))
                .where(B.c.head_id.is_not(None), T.c.id.is_(None))
            ).scalar()
            if dangling:
                problems.append(f"{dangling} branches whose head is missing")
        return problems


class Branching:
    """What a fork or an edit needs, on one connection (see Storage.branching)."""

    def __init__(self, storage: Storage, conn: Connection, conv_id: str) -> None:
        self._s, self._conn, self.conv_id = storage, conn, conv_id
        self._key: int | None = None
        self._known: dict[int, tuple[Any, ...]] = {}
        self._taken: dict[str, bool] = {}

    @property
    def key(self) -> int:
        """The conversation's key: read once, and free when a turn was looked up first."""
        if self._key is None:
            self._key = self._s._key(self._conn, self.conv_id)
        return self._key

    def turn(self, ref: int | str, *, name: str | None = None) -> TurnRow:
        """The turn; with `name`, whether that branch name is taken is read with it (see
        `name_taken`)."""
        row = self._s._turn_with_parent(self._conn, self.conv_id, ref, name)
        if name is not None:
            self._taken[name] = bool(row.name_taken)
        if row.parent_id is not None:  # read with the turn: `tail` will not read it again
            self._known[row.parent_id] = (
                row.parent_id, row.p_parent_id, row.p_role, row.p_kind, row.p_content, row.p_stop_reason
            )
        turn = _turn_row(row)
        self._key = turn.conversation_key
        return turn

    def tail(self, start: int | TurnRow) -> tuple[list[TurnRecord], bool]:
        return self._s._tail(self._conn, start, self._known)

    def free_name(self, prefix: str) -> str:
        return self._s._free_branch_name(self._conn, self.key, prefix)

    def name_taken(self, name: str) -> bool:
        if name in self._taken:
            return self._taken[name]
        return self._s._branch_name_taken(self._conn, self.key, name)

    def create(
        self,
        name: str,
        parent_id: int | None,
        turns: Sequence[NewTurn] = (),
        *,
        parent_depth: int | None = None,
        checkout: bool = True,
        rename_as: str | None = None,
    ) -> tuple[str, list[int]]:
        """A branch at `parent_id`, extended by `turns`: the turns, one branch row at their
        head, and one update of the conversation (count, checkout). Returns the branch's name
        and the new turns' ids.

        On PostgreSQL, where nothing holds the name between choosing it and writing it,
        another writer may take it first: a name convo chose (`rename_as`, its prefix) moves
        on to the next free one; a name the caller gave is InvalidInput, as it is when taken
        already. (SQLite's write transaction holds the whole fork.)"""
        ts = now()
        key = self.key
        if self._s.dialect == "postgresql":
            if len(turns) > 1:  # not one statement, and `Storage.branching` runs no transaction
                raise InvalidInput("a branch is created with at most one new turn")
            for _ in range(NAME_ATTEMPTS):
                try:
                    return name, self._create_in_one_statement(
                        key, name, parent_id, turns, parent_depth, checkout, ts
                    )
                except sa_exc.IntegrityError as e:  # (one statement: nothing was written)
                    if _constraint(e) != BRANCH_NAME_CONSTRAINT:
                        raise
                    if rename_as is None:
                        raise InvalidInput(f"branch {name!r} already exists") from None
                    name = self.free_name(rename_as)
            raise Conflict(f"no free branch name after {NAME_ATTEMPTS} tries: try again")
        ids, media = self._s._write_turns(self._conn, key, parent_id, turns, parent_depth, ts)
        head = ids[-1] if ids else parent_id
        self._conn.execute(
            _INSERT_BRANCH, {"conversation_key": key, "name": name, "head_id": head, "created_at": ts}
        )
        values: dict[str, Any] = {}
        if ids:
            values["turn_count"] = C.c.turn_count + len(ids)
        if media:
            values["has_media"] = True
        if checkout:
            values["current_branch"] = name
        if values:
            self._conn.execute(update(C).where(C.c.key == key).values(updated_at=ts, **values))
        return name, ids

    def _create_in_one_statement(
        self,
        key: int,
        name: str,
        parent_id: int | None,
        turns: Sequence[NewTurn],
        parent_depth: int | None,
        checkout: bool,
        ts: datetime,
    ) -> list[int]:
        """`create` on PostgreSQL for a fork or an edit: the new turn and its media, the branch
        row and the conversation's update in one statement (which `Storage.branching` runs in
        autocommit, as all it writes)."""
        params = {"key": key, "name": name, "ts": ts, "checkout": checkout}  # ts: aware (now())
        if not turns:
            self._conn.execute(_PG_FORK, {**params, "head_id": parent_id})
            return []
        depth = _depth_of(db.OnConnection(self._conn), parent_id, parent_depth)
        rows, blobs = _chain_rows(key, parent_id, turns, depth, ts)
        params.update(_turn_params(rows[0]), media=bool(blobs))
        for i, b in enumerate(blobs):
            params.update({f"b{i}_sha256": b.sha256, f"b{i}_media_type": b.media_type,
                           f"b{i}_size": len(b.data), f"b{i}_data": b.data, f"b{i}_created_at": ts})
        return [int(self._conn.execute(_pg_edit(len(blobs)), params).scalar_one())]


def _constraint(e: sa_exc.IntegrityError) -> str | None:
    """The name of the constraint a driver's integrity error names (psycopg and psycopg2)."""
    diag = getattr(e.orig, "diag", None)
    return getattr(diag, "constraint_name", None)


def _depth_of(x: db.Writer | db.OnConnection, parent_id: int | None, parent_depth: int | None) -> int:
    """The depth of the turn a chain is written under (-1 for a root), read if not given."""
    if parent_id is None:
        return -1
    if parent_depth is not None:
        return parent_depth
    found = x.first(_DEPTH_SQL, {"id": parent_id})
    if found is None:
        raise NotFound(f"no turn with id {parent_id!r}")
    return int(found[0])


def _chain_rows(
    conv_key: int | None, parent_id: int | None, turns: Sequence[NewTurn], parent_depth: int, ts: datetime
) -> tuple[list[dict[str, Any]], list[BlobData]]:
    """The rows of `turns` as a chain under `parent_id` (at depth `parent_depth`), their content
    with the media taken out, and those media (each once)."""
    rows = []
    blobs: dict[str, BlobData] = {}
    depth = parent_depth
    for t in turns:
        content, found = extract_blobs(t.content)
        for b in found:
            blobs[b.sha256] = b
        depth += 1
        rows.append(
            {
                "conversation_key": conv_key,
                "parent_id": parent_id,
                "role": t.role,
                "kind": t.kind,
                "content": encode_content(content),
                "depth": depth,
                "source_id": t.source_id,
                "stop_reason": t.stop_reason,
                "created_at": ts,
            }
        )
    return rows, list(blobs.values())


def _one_turn_params(
    row: Mapping[str, Any],
    key: int | None,
    branch: str,
    media: bool,
    ts: datetime,
    lease: Mapping[str, Any],
    first_call: FirstCall | None,
    finish: tuple[int, datetime, Mapping[str, Any]] | None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The parameters of `_one_turn_sql`'s statements, and the call fields a finish sets."""
    params = _turn_params(row)
    params.update(key=key, branch=branch, ts=ts, media=media, **lease)
    if first_call is not None:
        params.update(model=first_call.model, streamed=int(first_call.streamed), started_at=first_call.started_at)
    calls: tuple[str, ...] = ()
    if finish is not None:
        call_id, started, fields = finish
        # As `_finish_call`: the given fields may set the end and duration; the reply id is
        # always the stored reply's.
        done = {"finished_at": ts, "duration_ms": _duration_ms(started, ts)}
        done.update((k, v) for k, v in _fit(fields).items() if k != "reply_id")
        params.update({f"f_{k}": v for k, v in done.items()}, call_id=call_id)
        calls = tuple(sorted(done))
    return params, calls


def _fit(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Call fields every engine can store, cut to their columns' lengths. What a server sends
    (an error type, a request id) is not convo's to refuse, and a row the database refused
    would leave its call pending and hide the API's error behind the database's."""
    return {k: _fit_text(k, v) if isinstance(v, str) else v for k, v in fields.items()}


# What a server names, not what it writes: one line, no control character (see without_controls).
IDENTIFIER_FIELDS = frozenset(("error_type", "request_id", "message_id", "stop_reason"))


def _fit_text(key: str, value: str) -> str:
    """A NUL (which PostgreSQL refuses in text) replaced, and every control character of an
    identifier, then cut to the column's length."""
    value = without_controls(value) if key in IDENTIFIER_FIELDS else value.replace("\x00", "\ufffd")
    return value[: _CALL_LENGTHS[key]] if key in _CALL_LENGTHS else value


def _turn_params(row: Mapping[str, Any]) -> dict[str, Any]:
    """A turn row's values as the parameters of _INSERT_TURN_SQL."""
    return {f"t_{k}": v for k, v in row.items()}


def _check_head(branch: str, head: int | None, expected: int | None) -> None:
    if head != expected:
        raise _moved(branch, head, expected)


def _moved(branch: str, head: int | None, expected: int | None) -> Conflict:
    return Conflict(
        f"branch {branch!r} moved (head is now {head}, expected {expected}): "
        "another writer got there first; reload and try again"
    )


def _utc(value: Any) -> Any:
    """A naive datetime as UTC (what the Timestamp type does for statements built with it)."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _preview(content: str | None, width: int = 60) -> str | None:
    if content is None:
        return None
    text = " ".join(
        b.get("text", "") for b in decode_content(content) if b.get("type") == "text"
    ).split()
    line = " ".join(text)
    return line if len(line) <= width else line[: width - 1] + "…"


def _conversation_row(row: Sequence[Any]) -> ConversationRow:
    """A ConversationRow from a driver row starting with _CONVERSATION_COLUMNS."""
    key, cid, title, model, system, params, branch, count, media, created, updated = row[:11]
    return ConversationRow(
        key=key,
        id=cid,
        title=title,
        model=model,
        system=None if system is None else orjson.loads(system),
        params=orjson.loads(params or "{}"),
        current_branch=branch,
        turn_count=count,
        has_media=bool(media),
        created_at=instant(created),
        updated_at=instant(updated),
    )


def _turn_row(row: Any, conv_id: str | None = None) -> TurnRow:
    return TurnRow(
        id=row.id,
        conversation_id=conv_id if conv_id is not None else row.conversation_id,
        conversation_key=row.conversation_key,
        parent_id=row.parent_id,
        role=row.role,
        kind=row.kind,
        content=decode_content(row.content),
        depth=row.depth,
        source_id=row.source_id,
        stop_reason=row.stop_reason,
        created_at=row.created_at,
    )
