"""Bring a database to this code's schema: always through Alembic's ``upgrade head``.

Why not ``create_all`` + ``stamp`` on a fresh database: that would leave the migration scripts
unexercised by everyday use, so a migration drifting from the ORM would go unnoticed until a
user upgrades an old database. Running the migrations on every fresh database (a test checks
they produce exactly the ORM schema) keeps one path for new and old databases alike.

The check and the upgrade run in one write transaction — ``BEGIN IMMEDIATE`` on SQLite, a
transaction-scoped advisory lock on PostgreSQL (both have transactional DDL) — so processes
opening a new database at the same time migrate it exactly once. When the database is already
at head (the common case) a single cheap read decides, and Alembic is not even imported.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, inspect, text

from storage.engine import Database
from storage.schema import HEAD_REVISION

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_PG_LOCK_KEY = 0x4154454C  # "ATEL": serialises migrations of one PostgreSQL database


class SchemaError(RuntimeError):
    """The database's schema is newer than (or unknown to) this code."""


def current_revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def ensure_schema(db: Database) -> None:
    with db.read() as conn:
        if current_revision(conn) == HEAD_REVISION:
            return
    db.write(_upgrade)


def _upgrade(conn: Connection) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    found = current_revision(conn)
    if found is not None and found not in known:
        raise SchemaError(
            f"the database is at schema revision {found!r}, which this version of Atelier does "
            f"not know (it knows up to {HEAD_REVISION!r}); upgrade Atelier"
        )
    try:
        command.upgrade(config, "head")
    except CommandError as exc:  # pragma: no cover - defensive
        raise SchemaError(str(exc)) from exc
