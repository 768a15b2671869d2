"""Count the SQL a store runs: for tests that bound the queries a reader issues."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event


@contextmanager
def selects(store: Any) -> Iterator[list[str]]:
    """The SELECT statements the store's reader engine runs inside the block."""
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(store.db.reader, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(store.db.reader, "before_cursor_execute", count)
