"""Index calls by (conversation_id, branch) instead of conversation_id alone.

Why: the benchmark of fork/edit at depth 10,000 showed naming a new branch scanning every call
of the thread (a generated name must not reuse a deleted branch's name that still has spend in
the ledger, or an audit by branch would merge the two). The composite index makes that check
an index lookup, speeds up audits by branch, and still serves lookups by conversation alone, so
the old single-column index goes.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index(
            "ix_calls_conversation_id_branch", ["conversation_id", "branch"], unique=False
        )
        batch_op.drop_index("ix_calls_conversation_id")


def downgrade() -> None:
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index("ix_calls_conversation_id", ["conversation_id"], unique=False)
        batch_op.drop_index("ix_calls_conversation_id_branch")
