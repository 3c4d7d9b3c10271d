"""Alembic environment of the store.

The connection normally comes from ``service.store.migrate`` through
``config.attributes["connection"]`` (already inside a transaction that holds the
migration lock); run by hand (``alembic -c migrations/alembic.ini ...``) the URL
comes from the settings (``MLPQ_DATABASE_URL``). The metadata is the models'.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from service.store import Base
from service.store.migrate import include_object

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=include_object,
    )


def run_migrations_offline() -> None:
    from service.settings import get_settings

    context.configure(
        url=get_settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from service.settings import get_settings
    from service.store import make_engine

    engine = make_engine(get_settings().database_url)
    try:
        with engine.begin() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
