"""Integer keys for every reference, and integer timestamps on SQLite.

Why: the benchmark measured the store at 1.8x the bytes of a plain turns table. Most of the
difference was 26-character text ids repeated in every row and every index (a turn carried its
own id, its conversation's and its parent's, and indexed all three), and 26-character ISO
timestamps. Now:
- turn and call ids are integers (AUTOINCREMENT on SQLite, never reused), so a turn's id is the
  rowid itself: no id bytes in the row and no separate primary key index;
- a conversation keeps its public 26-character id, but turns, branches and calls refer to it by
  an integer `key`;
- SQLite timestamps are integer microseconds since the epoch (PostgreSQL keeps timestamptz);
- fixed-width columns come first, so PostgreSQL pads no row for alignment;
- calls lose their reply_id index: a transcript's calls are found by conversation;
- conversations note whether any turn ever held media (`has_media`), so the path of one that
  never did is not searched for blob references (0.8 ms of a 1,000-exchange resume).
Measured on the benchmark's n=10,000 database: SQLite 20.4 MB -> 14.2 MB (the floor 11.6 MB).

Data is carried over: new turn ids follow creation order (created_at, depth, old id); calls
likewise by started_at. SQLite timestamps convert exactly, to the microsecond. Downgrading writes
the integer ids back as 26-character, zero-padded strings (valid ids, in the same order).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("conversations", "turns", "branches", "calls", "blobs")
# Secondary indexes of each shape; index names are per schema, so they are created only once
# the old tables (and their indexes) are gone.
NEW_INDEXES = [
    ("ix_conversations_updated_at", "conversations", ["updated_at"]),
    ("ix_turns_conversation_key_depth", "turns", ["conversation_key", "depth"]),
    ("ix_turns_parent_id", "turns", ["parent_id"]),
    ("ix_calls_conversation_key_branch", "calls", ["conversation_key", "branch"]),
    ("ix_calls_started_at", "calls", ["started_at"]),
]
OLD_INDEXES = [
    ("ix_conversations_updated_at", "conversations", ["updated_at"]),
    ("ix_turns_conversation_id_depth", "turns", ["conversation_id", "depth"]),
    ("ix_turns_parent_id", "turns", ["parent_id"]),
    ("ix_calls_conversation_id_branch", "calls", ["conversation_id", "branch"]),
    ("ix_calls_reply_id", "calls", ["reply_id"]),
    ("ix_calls_started_at", "calls", ["started_at"]),
]
CALL_COLUMNS = (
    "branch, attempt, model, streamed, status, http_status, error_type, error_message, "
    "request_id, message_id, stop_reason, stop_sequence, partial_text, input_tokens, "
    "output_tokens, cache_creation_input_tokens, cache_read_input_tokens, "
    "cache_creation_5m_input_tokens, cache_creation_1h_input_tokens, cost_usd, "
    "uncached_cost_usd"
)


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _set_aside(tables: tuple[str, ...]) -> None:
    """Rename the current tables to *_old, freeing every name the new ones take."""
    pg = not _sqlite()
    for t in tables:
        op.rename_table(t, f"{t}_old")
        if pg:
            op.execute(f'ALTER TABLE "{t}_old" RENAME CONSTRAINT "pk_{t}" TO "pk_{t}_old"')
    if pg and "branches" in tables:
        op.execute("ALTER SEQUENCE branches_id_seq RENAME TO branches_old_id_seq")


def _drop_old(tables: tuple[str, ...]) -> None:
    for t in ("calls", "branches", "turns", "conversations", "blobs"):
        if t in tables:
            op.drop_table(f"{t}_old")


def _create_indexes(indexes: list[tuple[str, str, list[str]]]) -> None:
    for name, table, cols in indexes:
        op.create_index(name, table, cols, unique=False)


def _reset_sequences(tables: tuple[str, ...]) -> None:
    """PostgreSQL serials continue after the highest id copied in (SQLite's AUTOINCREMENT does
    that by itself)."""
    if _sqlite():
        return
    for t, col in (("conversations", "key"), ("turns", "id"), ("branches", "id"), ("calls", "id")):
        if t in tables:
            op.execute(
                f"SELECT setval(pg_get_serial_sequence('{t}', '{col}'), "
                f"COALESCE((SELECT MAX({col}) FROM {t}), 0) + 1, false)"
            )


# -- upgrade -------------------------------------------------------------------------------------


def upgrade() -> None:
    sqlite = _sqlite()
    tables = TABLES if sqlite else TABLES[:-1]  # PostgreSQL's blobs table does not change
    ts: Callable[[], sa.types.TypeEngine[object]] = (
        (lambda: sa.BigInteger()) if sqlite else (lambda: sa.DateTime(timezone=True))
    )
    key = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

    def to_ts(col: str) -> str:
        if not sqlite:
            return col
        # 'YYYY-MM-DD HH:MM:SS.ffffff', as SQLAlchemy writes it, to integer microseconds.
        # Whole seconds from the first 19 characters only: strftime would round the fraction to
        # milliseconds, and .9995 s or more would carry into the next second.
        return (
            f"(CAST(strftime('%s', substr({col}, 1, 19)) AS INTEGER) * 1000000 "
            f"+ CAST(substr({col}, 21, 6) AS INTEGER))"
        )

    _set_aside(tables)
    op.create_table(
        "conversations",
        sa.Column("key", key, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=26), nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("current_branch", sa.String(length=200), nullable=False),
        sa.Column("turn_count", sa.Integer(), nullable=False),
        sa.Column("has_media", sa.Boolean(), nullable=False),
        sa.Column("created_at", ts(), nullable=False),
        sa.Column("updated_at", ts(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_conversations"),
        sa.UniqueConstraint("id", name="uq_conversations_id"),
        sqlite_autoincrement=True,
    )
    # Fixed-width columns first, widest first, then text: no alignment padding on PostgreSQL.
    op.create_table(
        "turns",
        sa.Column("id", key, autoincrement=True, nullable=False),
        sa.Column("conversation_key", key, nullable=False),
        sa.Column("parent_id", key, nullable=True),
        sa.Column("source_id", key, nullable=True),
        sa.Column("created_at", ts(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=9), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("stop_reason", sa.String(length=40), nullable=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_key"], ["conversations.key"],
            name="fk_turns_conversation_key_conversations", ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["parent_id"], ["turns.id"], name="fk_turns_parent_id_turns"),
        sa.PrimaryKeyConstraint("id", name="pk_turns"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "branches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("conversation_key", key, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("head_id", key, nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires", ts(), nullable=True),
        sa.Column("created_at", ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_key"], ["conversations.key"],
            name="fk_branches_conversation_key_conversations", ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["head_id"], ["turns.id"], name="fk_branches_head_id_turns"),
        sa.PrimaryKeyConstraint("id", name="pk_branches"),
        sa.UniqueConstraint("conversation_key", "name", name="uq_branches_conversation_key"),
    )
    op.create_table(
        "calls",
        sa.Column("id", key, autoincrement=True, nullable=False),
        sa.Column("conversation_key", key, nullable=False),
        sa.Column("turn_id", key, nullable=True),
        sa.Column("reply_id", key, nullable=True),
        sa.Column("started_at", ts(), nullable=False),
        sa.Column("finished_at", ts(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("uncached_cost_usd", sa.Float(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("streamed", sa.Integer(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_creation_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_read_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_creation_5m_input_tokens", sa.Integer(), nullable=True),
        sa.Column("cache_creation_1h_input_tokens", sa.Integer(), nullable=True),
        sa.Column("branch", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error_type", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("stop_reason", sa.String(length=40), nullable=True),
        sa.Column("stop_sequence", sa.Text(), nullable=True),
        sa.Column("partial_text", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_key"], ["conversations.key"],
            name="fk_calls_conversation_key_conversations", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_calls"),
        sqlite_autoincrement=True,
    )
    if sqlite:
        op.create_table(
            "blobs",
            sa.Column("sha256", sa.String(length=64), nullable=False),
            sa.Column("media_type", sa.String(length=100), nullable=False),
            sa.Column("size", sa.Integer(), nullable=False),
            sa.Column("data", sa.LargeBinary(), nullable=False),
            sa.Column("created_at", ts(), nullable=False),
            sa.PrimaryKeyConstraint("sha256", name="pk_blobs"),
        )
        op.execute(
            "INSERT INTO blobs (sha256, media_type, size, data, created_at) "
            f"SELECT sha256, media_type, size, data, {to_ts('created_at')} FROM blobs_old"
        )

    op.create_table(
        "_convo_turn_keys",
        sa.Column("old", sa.String(length=26), primary_key=True),
        sa.Column("new", sa.BigInteger(), nullable=False),
    )
    op.execute(
        "INSERT INTO _convo_turn_keys (old, new) "
        "SELECT id, ROW_NUMBER() OVER (ORDER BY created_at, depth, id) FROM turns_old"
    )
    op.execute(
        "INSERT INTO conversations (key, id, title, model, system, params, current_branch, "
        "turn_count, has_media, created_at, updated_at) "
        "SELECT ROW_NUMBER() OVER (ORDER BY c.created_at, c.id), c.id, c.title, c.model, c.system, "
        "c.params, c.current_branch, c.turn_count, "
        # A blob reference is the only JSON object with a "source" key convo stores.
        "EXISTS (SELECT 1 FROM turns_old t WHERE t.conversation_id = c.id "
        "AND t.content LIKE '%\"source\"%'), "
        f"{to_ts('c.created_at')}, {to_ts('c.updated_at')} "
        "FROM conversations_old c"
    )
    op.execute(
        "INSERT INTO turns (id, conversation_key, parent_id, role, kind, content, depth, "
        "source_id, stop_reason, created_at) "
        "SELECT m.new, c.key, p.new, t.role, t.kind, t.content, t.depth, s.new, t.stop_reason, "
        f"{to_ts('t.created_at')} "
        "FROM turns_old t JOIN _convo_turn_keys m ON m.old = t.id "
        "JOIN conversations c ON c.id = t.conversation_id "
        "LEFT JOIN _convo_turn_keys p ON p.old = t.parent_id "
        "LEFT JOIN _convo_turn_keys s ON s.old = t.source_id "
        "ORDER BY m.new"
    )
    op.execute(
        "INSERT INTO branches (id, conversation_key, name, head_id, lease_owner, lease_expires, "
        "created_at) "
        f"SELECT b.id, c.key, b.name, h.new, b.lease_owner, {to_ts('b.lease_expires')}, "
        f"{to_ts('b.created_at')} "
        "FROM branches_old b JOIN conversations c ON c.id = b.conversation_id "
        "LEFT JOIN _convo_turn_keys h ON h.old = b.head_id"
    )
    op.execute(
        f"INSERT INTO calls (id, conversation_key, turn_id, reply_id, {CALL_COLUMNS}, "
        "started_at, finished_at, duration_ms) "
        "SELECT ROW_NUMBER() OVER (ORDER BY k.started_at, k.id), c.key, tk.new, rk.new, "
        + ", ".join(f"k.{col.strip()}" for col in CALL_COLUMNS.split(","))
        + f", {to_ts('k.started_at')}, {to_ts('k.finished_at')}, k.duration_ms "
        "FROM calls_old k JOIN conversations c ON c.id = k.conversation_id "
        "LEFT JOIN _convo_turn_keys tk ON tk.old = k.turn_id "
        "LEFT JOIN _convo_turn_keys rk ON rk.old = k.reply_id"
    )
    op.drop_table("_convo_turn_keys")
    _drop_old(tables)
    _create_indexes(NEW_INDEXES)
    _reset_sequences(tables)


# -- downgrade -----------------------------------------------------------------------------------


def downgrade() -> None:
    sqlite = _sqlite()
    tables = TABLES if sqlite else TABLES[:-1]
    ts: Callable[[], sa.types.TypeEngine[object]] = lambda: sa.DateTime(timezone=True)  # noqa: E731
    ID = sa.String(length=26)

    def pad(col: str) -> str:
        """An integer id as a 26-character id string, in the same order."""
        if sqlite:
            return f"CASE WHEN {col} IS NULL THEN NULL ELSE substr('{'0' * 26}' || {col}, -26, 26) END"
        return f"lpad(CAST({col} AS TEXT), 26, '0')"

    def from_ts(col: str) -> str:
        if not sqlite:
            return col
        return (
            f"CASE WHEN {col} IS NULL THEN NULL ELSE "
            f"strftime('%Y-%m-%d %H:%M:%S', {col} / 1000000, 'unixepoch') || '.' || "
            f"substr('000000' || ({col} % 1000000), -6, 6) END"
        )

    _set_aside(tables)
    op.create_table(
        "conversations",
        sa.Column("id", ID, nullable=False),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("current_branch", sa.String(length=200), nullable=False),
        sa.Column("turn_count", sa.Integer(), nullable=False),
        sa.Column("created_at", ts(), nullable=False),
        sa.Column("updated_at", ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
    )
    op.create_table(
        "calls",
        sa.Column("id", ID, nullable=False),
        sa.Column("conversation_id", ID, nullable=False),
        sa.Column("branch", sa.String(length=200), nullable=False),
        sa.Column("turn_id", ID, nullable=True),
        sa.Column("reply_id", ID, nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("streamed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error_type", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("stop_reason", sa.String(length=40), nullable=True),
        sa.Column("stop_sequence", sa.Text(), nullable=True),
        sa.Column("partial_text", sa.Text(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_creation_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_read_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_creation_5m_input_tokens", sa.Integer(), nullable=True),
        sa.Column("cache_creation_1h_input_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("uncached_cost_usd", sa.Float(), nullable=True),
        sa.Column("started_at", ts(), nullable=False),
        sa.Column("finished_at", ts(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"],
            name="fk_calls_conversation_id_conversations", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_calls"),
    )
    op.create_table(
        "turns",
        sa.Column("id", ID, nullable=False),
        sa.Column("conversation_id", ID, nullable=False),
        sa.Column("parent_id", ID, nullable=True),
        sa.Column("role", sa.String(length=9), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("source_id", ID, nullable=True),
        sa.Column("stop_reason", sa.String(length=40), nullable=True),
        sa.Column("created_at", ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"],
            name="fk_turns_conversation_id_conversations", ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["parent_id"], ["turns.id"], name="fk_turns_parent_id_turns"),
        sa.PrimaryKeyConstraint("id", name="pk_turns"),
    )
    op.create_table(
        "branches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("conversation_id", ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("head_id", ID, nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires", ts(), nullable=True),
        sa.Column("created_at", ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"],
            name="fk_branches_conversation_id_conversations", ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["head_id"], ["turns.id"], name="fk_branches_head_id_turns"),
        sa.PrimaryKeyConstraint("id", name="pk_branches"),
        sa.UniqueConstraint("conversation_id", "name", name="uq_branches_conversation_id"),
    )
    if sqlite:
        op.create_table(
            "blobs",
            sa.Column("sha256", sa.String(length=64), nullable=False),
            sa.Column("media_type", sa.String(length=100), nullable=False),
            sa.Column("size", sa.Integer(), nullable=False),
            sa.Column("data", sa.LargeBinary(), nullable=False),
            sa.Column("created_at", ts(), nullable=False),
            sa.PrimaryKeyConstraint("sha256", name="pk_blobs"),
        )
        op.execute(
            "INSERT INTO blobs (sha256, media_type, size, data, created_at) "
            f"SELECT sha256, media_type, size, data, {from_ts('created_at')} FROM blobs_old"
        )
    op.execute(
        "INSERT INTO conversations (id, title, model, system, params, current_branch, turn_count, "
        "created_at, updated_at) "
        "SELECT id, title, model, system, params, current_branch, turn_count, "
        f"{from_ts('created_at')}, {from_ts('updated_at')} FROM conversations_old"
    )
    op.execute(
        "INSERT INTO turns (id, conversation_id, parent_id, role, kind, content, depth, source_id, "
        "stop_reason, created_at) "
        f"SELECT {pad('t.id')}, c.id, {pad('t.parent_id')}, t.role, t.kind, t.content, t.depth, "
        f"{pad('t.source_id')}, t.stop_reason, {from_ts('t.created_at')} "
        "FROM turns_old t JOIN conversations_old c ON c.key = t.conversation_key ORDER BY t.id"
    )
    op.execute(
        "INSERT INTO branches (id, conversation_id, name, head_id, lease_owner, lease_expires, "
        "created_at) "
        f"SELECT b.id, c.id, b.name, {pad('b.head_id')}, b.lease_owner, "
        f"{from_ts('b.lease_expires')}, {from_ts('b.created_at')} "
        "FROM branches_old b JOIN conversations_old c ON c.key = b.conversation_key"
    )
    op.execute(
        f"INSERT INTO calls (id, conversation_id, turn_id, reply_id, {CALL_COLUMNS}, "
        "started_at, finished_at, duration_ms) "
        f"SELECT {pad('k.id')}, c.id, {pad('k.turn_id')}, {pad('k.reply_id')}, "
        + ", ".join(f"k.{col.strip()}" for col in CALL_COLUMNS.split(","))
        + f", {from_ts('k.started_at')}, {from_ts('k.finished_at')}, k.duration_ms "
        "FROM calls_old k JOIN conversations_old c ON c.key = k.conversation_key"
    )
    _drop_old(tables)
    _create_indexes(OLD_INDEXES)
    if not sqlite:
        op.execute(
            "SELECT setval(pg_get_serial_sequence('branches', 'id'), "
            "COALESCE((SELECT MAX(id) FROM branches), 0) + 1, false)"
        )
