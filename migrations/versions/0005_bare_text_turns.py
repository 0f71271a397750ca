"""A turn that is one plain text block keeps its bare text in `content`, not JSON.

Why: most turns are a single text block, and a resume parsed each one's JSON only to rebuild
that block. The benchmark measured a fresh-store resume of a 100-exchange thread on SQLite at
1.36x the floor before, 1.16x after (the text read back needs no parsing, and the 27 bytes of
JSON quoting a turn are gone). `content` is JSON whenever it starts with "[" (JSON of a block
list always does); anything else is the text of one {"type": "text", "text": ...} block. A text
that starts with "[" or holds a NUL stays JSON (see `convo.store.encode_content`).

The upgrade changes no row: turns written before it stay JSON, read as before, so upgrading a
large store is instant. It exists so that an older convo, which would fail to parse a bare-text
turn, refuses the database as too new when it opens it. A process of the older convo that already
has the database open does not look again, and fails at the first bare-text turn it reads: stop
those before upgrading (and a newer convo's before downgrading, which it would not notice
either). Downgrading writes every bare-text turn back as the JSON the older convo reads.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    pass


def downgrade() -> None:
    conn = op.get_bind()
    after = 0
    while True:
        rows = conn.execute(
            sa.text(
                "SELECT id, content FROM turns WHERE id > :after AND substr(content, 1, 1) <> '[' "
                "ORDER BY id LIMIT :n"
            ),
            {"after": after, "n": BATCH},
        ).all()
        if not rows:
            return
        conn.execute(
            sa.text("UPDATE turns SET content = :content WHERE id = :id"),
            [
                {"id": tid, "content": orjson.dumps([{"type": "text", "text": text}]).decode()}
                for tid, text in rows
            ],
        )
        after = rows[-1][0]
