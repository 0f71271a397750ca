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
- `calls` is the ledger: one row per API attempt, including failed and cut ones, with tokens and
  the cost computed when it was written, so an audit never changes when prices do. It refers to
  conversations, not branches, so deleting a branch never deletes spend.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
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


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    # JSON: a string or a list of text blocks.
    system: Mapped[str | None] = mapped_column(Text)
    # JSON object of default request parameters and convo options (cache, budgets).
    params: Mapped[str] = mapped_column(Text, default="{}")
    current_branch: Mapped[str] = mapped_column(String(200), default="main")
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Turn(Base):
    __tablename__ = "turns"
    __table_args__ = (Index("ix_turns_conversation_id_depth", "conversation_id", "depth"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("turns.id"), index=True)
    role: Mapped[str] = mapped_column(String(9))
    # user | reply | synthetic | prefill | tool_result
    kind: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    depth: Mapped[int] = mapped_column(Integer)
    # The turn this one edits or regenerates, for the tree view; None for ordinary appends.
    source_id: Mapped[str | None] = mapped_column(ID)
    stop_reason: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Branch(Base):
    __tablename__ = "branches"
    __table_args__ = (UniqueConstraint("conversation_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(200))
    head_id: Mapped[str | None] = mapped_column(ForeignKey("turns.id"))
    # A send holds the branch from its user turn to its reply, so two writers never interleave.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Blob(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    media_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Call(Base):
    __tablename__ = "calls"
    # (conversation, branch): audits by branch, and constant-time checks that a branch name
    # was never billed; it serves lookups by conversation alone too.
    __table_args__ = (Index("ix_calls_conversation_id_branch", "conversation_id", "branch"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    branch: Mapped[str] = mapped_column(String(200))
    # The last turn sent (the reply's parent) and the reply, once stored.
    turn_id: Mapped[str | None] = mapped_column(ID)
    reply_id: Mapped[str | None] = mapped_column(ID, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str] = mapped_column(String(200))
    streamed: Mapped[int] = mapped_column(Integer, default=0)
    # pending | ok | error | cut (a stream that ended early: billed, nothing appended)
    status: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    stop_reason: Mapped[str | None] = mapped_column(String(40))
    stop_sequence: Mapped[str | None] = mapped_column(Text)
    partial_text: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_creation_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_creation_5m_input_tokens: Mapped[int | None] = mapped_column(Integer)
    cache_creation_1h_input_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    # What the same call would have cost with no prompt caching, for "what the cache saved".
    uncached_cost_usd: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float | None] = mapped_column(Float)


class Setting(Base):
    """Store-wide settings (a store budget), as JSON values."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
