"""Index branches by head_id.

Why: every branch's head is a foreign key to a turn, and a database checks such a key from the
other side too: deleting a turn looks for a branch still pointing at it. With no index on
head_id, that look was a scan of every branch in the store, once per deleted turn, so deleting
a conversation cost its turns times the store's branches: 1.0 s on SQLite and 1.6 s on
PostgreSQL for a 10,000-turn thread in a store of 3,000 conversations, 0.04 s and 0.22 s with
the index. Each head move updates the index too: a send measured 1% slower on SQLite (11 us of
850) and no slower beyond the noise on PostgreSQL.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_branches_head_id", "branches", ["head_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_branches_head_id", table_name="branches")
