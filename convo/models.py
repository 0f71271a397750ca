"""The tables. A conversation is a tree of turns; a branch is a name pointing at one turn.

- A turn is written once and never changed: editing, forking and regenerating add turns and move
  branch heads, so every path that ever existed can still be replayed exactly (newer models check
  that earlier history did not change) and a fork costs O(1) rows whatever the depth.
- `depth` is the turn's distance from its root. It orders a path and tells the store whether a
  conversation is nearly linear (read it in one index range scan and walk parent links in memory)
  or bushy (walk the path with a recursive CTE).
- Content is the Messages API's block list as JSON text: the store never needs to look inside
  it, and (de)serializing one column is the cheapest way to get it back. Images and documents
  are moved out into `blobs`, once per distinct sha256, and referenced from their block.
- Rows are joined by integer keys, public or not: a conversation's public id is a 26-character
  string (unguessable, sortable, safe in a URL), but turns, branches and calls refer to it by an
  integer key, and turn and call ids are integers. The benchmark showed text keys in every row
  and index made the store 1.8x the size of a plain turns table; integer keys and timestamps
  brought it to about 1.25x. Keys are AUTOINCREMENT, so a deleted turn's id is never reused.
- `calls` is the ledger: one row per API attempt, including failed and cut ones, with tokens and
  the cost computed when it was written, so an audit never changes when prices do. It refers to
  conversations, not branches, so deleting a branch never deletes spend.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so Alembic can drop and alter them by name on SQLite (batch mode) too.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(26)
# 64-bit keys on PostgreSQL; on SQLite exactly INTEGER, which makes a primary key the rowid itself
# (no second index, no bytes in the row).
KEY = BigInteger().with_variant(Integer(), "sqlite")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Timestamp(TypeDecorator[datetime]):
    """A UTC instant, always read back timezone-aware.

    PostgreSQL has timestamptz (8 bytes). SQLite has no time type, and SQLAlchemy's default there
    is a 26-character string parsed with a regex on every read: convo stores integer microseconds
    since the epoch instead, a third of the bytes, compared and indexed as numbers."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return to_micros(value)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else instant(value)


def instant(value: Any) -> datetime:
    """A Timestamp column's value as the driver returns it (microseconds on SQLite, a datetime
    in the session's time zone on PostgreSQL), as an aware UTC datetime."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return EPOCH + timedelta(microseconds=int(value))


def to_micros(value: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly (no float rounding)."""
    d = value - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


# What a turn is, and so which side of the conversation it speaks for.
ROLE_OF_KIND = {
    "user": "user",
    "tool_result": "user",
    "reply": "assistant",
    "synthetic": "assistant",
    "prefill": "assistant",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = {"sqlite_autoincrement": True}

    key: Mapped[int] = mapped_column(KEY, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID, unique=True)
    title: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    # JSON: a string or a list of text blocks.
    system: Mapped[str | None] = mapped_column(Text)
    # JSON object of default request parameters and convo options (cache, budgets).
    params: Mapped[str] = mapped_column(Text, default="{}")
    current_branch: Mapped[str] = mapped_column(String(200), default="main")
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    # Set once any turn holds an image or document: paths of other conversations skip looking
    # for blob references.
    has_media: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp())
    updated_at: Mapped[datetime] = mapped_column(Timestamp(), index=True)


class Turn(Base):
    __tablename__ = "turns"
    __table_args__ = (
        Index("ix_turns_conversation_key_depth", "conversation_key", "depth"),
        {"sqlite_autoincrement": True},
    )

    # Fixed-width columns first, widest first, then text: PostgreSQL aligns each column to its
    # width, so this order wastes no padding bytes in any row.
    id: Mapped[int] = mapped_column(KEY, primary_key=True, autoincrement=True)
    conversation_key: Mapped[int] = mapped_column(
        KEY, ForeignKey("conversations.key", ondelete="CASCADE")
    )
    parent_id: Mapped[int | None] = mapped_column(KEY, ForeignKey("turns.id"), index=True)
    # The turn this one edits or regenerates, for the tree view; None for ordinary appends.
    source_id: Mapped[int | None] = mapped_column(KEY)
    created_at: Mapped[datetime] = mapped_column(Timestamp())
    depth: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(9))
    # user | reply | synthetic | prefill | tool_result (the role follows: ROLE_OF_KIND)
    kind: Mapped[str] = mapped_column(String(16))
    stop_reason: Mapped[str | None] = mapped_column(String(40))
    content: Mapped[str] = mapped_column(Text)


class Branch(Base):
    __tablename__ = "branches"
    __table_args__ = (UniqueConstraint("conversation_key", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_key: Mapped[int] = mapped_column(
        KEY, ForeignKey("conversations.key", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(200))
    # Indexed: deleting a turn looks for a branch that still points at it (migration 0004).
    head_id: Mapped[int | None] = mapped_column(KEY, ForeignKey("turns.id"), index=True)
    # A send holds the branch from its user turn to its reply, so two writers never interleave.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires: Mapped[datetime | None] = mapped_column(Timestamp())
    created_at: Mapped[datetime] = mapped_column(Timestamp())


class Blob(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    media_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp())


class Call(Base):
    __tablename__ = "calls"
    # (conversation, branch): audits by branch, and constant-time checks that a branch name
    # was never billed; it serves lookups by conversation alone too (a transcript's calls).
    __table_args__ = (
        Index("ix_calls_conversation_key_branch", "conversation_key", "branch"),
        {"sqlite_autoincrement": True},
    )

    # Fixed-width columns first, widest first (see Turn).
    id: Mapped[int] = mapped_column(KEY, primary_key=True, autoincrement=True)
    conversation_key: Mapped[int] = mapped_column(
        KEY, ForeignKey("conversations.key", ondelete="CASCADE")
    )
    # The last turn sent (the reply's parent) and the reply, once stored.
    turn_id: Mapped[int | None] = mapped_column(KEY)
    reply_id: Mapped[int | None] = mapped_column(KEY)
    started_at: Mapped[datetime] = mapped_column(Timestamp(), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp())
    duration_ms: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    # What the same call would have cost with no prompt caching, for "what the cache saved".
    uncached_cost_usd: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    streamed: Mapped[int] = mapped_column(Integer, default=0)
    http_status: Mapped[int | None] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_creation_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_creation_5m_input_tokens: Mapped[int | None] = mapped_column(Integer)
    cache_creation_1h_input_tokens: Mapped[int | None] = mapped_column(Integer)
    branch: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    # pending | ok | error | cut (a stream that ended early: billed, nothing appended)
    status: Mapped[str] = mapped_column(String(16))
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    stop_reason: Mapped[str | None] = mapped_column(String(40))
    stop_sequence: Mapped[str | None] = mapped_column(Text)
    partial_text: Mapped[str | None] = mapped_column(Text)


class Setting(Base):
    """Store-wide settings (a store budget), as JSON values."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
