"""Alembic environment for the trajectory store.

The store calls ``alembic upgrade head`` itself (see :mod:`storage.migrate`), handing over a
connection that is already inside its write transaction (so the check of the current revision
and the migration are one atomic step, serialised against other processes). From the command
line: ``alembic -c storage/migrations/alembic.ini upgrade head`` with ``ATELIER_DB_URL`` set.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from storage.engine import normalise_url
from storage.schema import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things: rebuild tables in batches
        compare_type=True,
        **kwargs,
    )


def _url() -> str:
    url = os.environ.get("ATELIER_DB_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set ATELIER_DB_URL (or sqlalchemy.url) to the database URL")
    return url


if context.is_offline_mode():
    _configure(url=str(normalise_url(_url())), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    else:
        engine = create_engine(normalise_url(_url()))
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
        engine.dispose()
