"""Alembic environment: metadata from convo.models, the connection or URL from the caller.

convo runs migrations on its own connection (Alembic's "sharing a connection" recipe), passed
in `config.attributes["connection"]`; the `alembic` command line builds one from `-x url=`,
CONVO_DATABASE_URL or the embedded default.
"""

from __future__ import annotations

from alembic import context

from convo.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # only acts on SQLite, whose ALTER TABLE is limited
        compare_type=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return

    from convo import config as convo_config
    from convo.db import create_engine_for, hold_migration_lock, write

    url = convo_config.database_url(context.get_x_argument(as_dictionary=True).get("url"))
    engine = create_engine_for(url)
    try:
        # One write transaction, as `convo db upgrade` runs it: BEGIN IMMEDIATE on SQLite, the
        # migration lock on PostgreSQL, so two upgrades at once run one after the other.
        with write(engine) as conn:
            hold_migration_lock(conn)
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("convo's migrations run online only: pass a database URL")
run_migrations_online()
