"""Initial schema: conversations as trees of immutable turns, branches as named heads.

Why this shape (see convo/models.py for the full data model):
- turns(parent_id, depth) make a tree, so fork/edit/regenerate add one row and move a branch
  head: O(1) writes at any depth, and the original path stays replayable byte-for-byte.
- (conversation_id, depth) indexes the one-range-scan read of a nearly linear thread; the
  primary key serves the recursive-CTE walk of a bushy one.
- blobs hold each image/document once by sha256: 20 turns with the same image store it once.
- calls is the spend ledger, one row per attempt, with cost fixed at write time, tied to the
  conversation rather than a branch so that deleting a branch keeps its spend.
- branches carry a lease so two writers on one branch never interleave a history.

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 22:27:20.353487
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('blobs',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('media_type', sa.String(length=100), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blobs'))
    )
    op.create_table('conversations',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('title', sa.Text(), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('system', sa.Text(), nullable=True),
    sa.Column('params', sa.Text(), nullable=False),
    sa.Column('current_branch', sa.String(length=200), nullable=False),
    sa.Column('turn_count', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversations'))
    )
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversations_updated_at'), ['updated_at'], unique=False)

    op.create_table('settings',
    sa.Column('key', sa.String(length=100), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_settings'))
    )
    op.create_table('calls',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('conversation_id', sa.String(length=26), nullable=False),
    sa.Column('branch', sa.String(length=200), nullable=False),
    sa.Column('turn_id', sa.String(length=26), nullable=True),
    sa.Column('reply_id', sa.String(length=26), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('streamed', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('http_status', sa.Integer(), nullable=True),
    sa.Column('error_type', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('request_id', sa.String(length=200), nullable=True),
    sa.Column('message_id', sa.String(length=200), nullable=True),
    sa.Column('stop_reason', sa.String(length=40), nullable=True),
    sa.Column('stop_sequence', sa.Text(), nullable=True),
    sa.Column('partial_text', sa.Text(), nullable=True),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_creation_input_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_read_input_tokens', sa.Integer(), nullable=False),
    sa.Column('cache_creation_5m_input_tokens', sa.Integer(), nullable=True),
    sa.Column('cache_creation_1h_input_tokens', sa.Integer(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('uncached_cost_usd', sa.Float(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_ms', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_calls_conversation_id_conversations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_calls'))
    )
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_calls_conversation_id'), ['conversation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_calls_reply_id'), ['reply_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_calls_started_at'), ['started_at'], unique=False)

    op.create_table('turns',
    sa.Column('id', sa.String(length=26), nullable=False),
    sa.Column('conversation_id', sa.String(length=26), nullable=False),
    sa.Column('parent_id', sa.String(length=26), nullable=True),
    sa.Column('role', sa.String(length=9), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('depth', sa.Integer(), nullable=False),
    sa.Column('source_id', sa.String(length=26), nullable=True),
    sa.Column('stop_reason', sa.String(length=40), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_turns_conversation_id_conversations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['turns.id'], name=op.f('fk_turns_parent_id_turns')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_turns'))
    )
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.create_index('ix_turns_conversation_id_depth', ['conversation_id', 'depth'], unique=False)
        batch_op.create_index(batch_op.f('ix_turns_parent_id'), ['parent_id'], unique=False)

    op.create_table('branches',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('conversation_id', sa.String(length=26), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('head_id', sa.String(length=26), nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_branches_conversation_id_conversations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['head_id'], ['turns.id'], name=op.f('fk_branches_head_id_turns')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_branches')),
    sa.UniqueConstraint('conversation_id', 'name', name=op.f('uq_branches_conversation_id'))
    )


def downgrade() -> None:
    op.drop_table('branches')
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_turns_parent_id'))
        batch_op.drop_index('ix_turns_conversation_id_depth')

    op.drop_table('turns')
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_calls_started_at'))
        batch_op.drop_index(batch_op.f('ix_calls_reply_id'))
        batch_op.drop_index(batch_op.f('ix_calls_conversation_id'))

    op.drop_table('calls')
    op.drop_table('settings')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversations_updated_at'))

    op.drop_table('conversations')
    op.drop_table('blobs')
