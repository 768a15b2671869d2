"""Bulk INSERTs straight through the DBAPI cursor, for the recorder's hot tables.

SQLAlchemy Core's ``executemany`` builds an execution context, looks statements up in its
compiled cache and constructs the parameters of every row in Python: on the recorder's writer
thread that was ~40 % of the CPU spent per recorded step (``benchmarks/overhead.py``), time
taken under the GIL from the graph itself. Here the SQL text and the columns' bind processors
are derived once per (dialect, table, columns, conflict key) from the SQLAlchemy ``Table``, and
each batch is one ``cursor.executemany`` on the transaction's own connection (on PostgreSQL,
large plain inserts are one ``COPY`` instead). Values go through
the same bind processors SQLAlchemy would apply (JSON via the engine's serializer, SQLite
timestamps as its text format), so the stored bytes are identical and SQLAlchemy reads them back.

DBAPI errors are re-raised as :class:`sqlalchemy.exc.DBAPIError`, like every other statement's,
so :meth:`storage.engine.Database.write` still recognises locks and transient failures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from storage import pg_copy  # imports psycopg only when it copies

Processor = Callable[[Any], Any]

BULK_DIALECTS = ("sqlite", "postgresql")

COPY_MIN_ROWS = 16
"""On PostgreSQL (psycopg), plain inserts of at least this many rows of one shape go through
``COPY`` (``storage.pg_copy``): ~9 µs of client CPU per row against executemany's ~26, but
~350 µs per call (two round trips), so small batches stay with executemany."""


@lru_cache(maxsize=256)
def _statement(
    dialect: Dialect, table: Table, columns: tuple[str, ...], conflict: tuple[str, ...]
) -> tuple[str, tuple[tuple[int, Processor], ...]]:
    quote = dialect.identifier_preparer.quote
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
        f"VALUES ({', '.join([marker] * len(columns))})"
    )
    if conflict:
        sql += f" ON CONFLICT ({', '.join(quote(c) for c in conflict)}) DO NOTHING"
    processors = []
    for index, name in enumerate(columns):
        column_type = table.c[name].type
        processor = column_type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors.append((index, processor))
    return sql, tuple(processors)


def bulk_insert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    ignore_conflicts_on: Sequence[str] = (),
) -> None:
    """INSERT ``rows`` (dicts; rows with different key sets are grouped) in the connection's
    current transaction; with ``ignore_conflicts_on``, rows whose key exists are skipped."""
    if not rows:
        return
    dialect = conn.dialect
    if dialect.name not in BULK_DIALECTS:  # pragma: no cover - other dialects: plain Core
        from storage.writes import insert_ignore

        if ignore_conflicts_on:
            insert_ignore(conn, table, list(rows), list(ignore_conflicts_on))
        else:
            from sqlalchemy import insert

            conn.execute(insert(table), list(rows))
        return
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        shapes.setdefault(tuple(row), []).append(row)
    copy = not ignore_conflicts_on and dialect.name == "postgresql" and dialect.driver == "psycopg"
    for columns, group in shapes.items():
        if copy and len(group) >= COPY_MIN_ROWS:
            pg_copy.copy_insert(conn, table, columns, [tuple(row.values()) for row in group])
            continue
        sql, processors = _statement(dialect, table, columns, tuple(ignore_conflicts_on))
        params = []
        for row in group:
            values = list(row.values())
            for index, processor in processors:
                values[index] = processor(values[index])
            params.append(values)
        _executemany(conn, sql, params)


@lru_cache(maxsize=256)
def _update_statement(
    dialect: Dialect, table: Table, columns: tuple[str, ...], key: str
) -> tuple[str, tuple[tuple[int, Processor], ...]]:
    quote = dialect.identifier_preparer.quote
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    assignments = ", ".join(f"{quote(c)} = {marker}" for c in columns)
    sql = f"UPDATE {quote(table.name)} SET {assignments} WHERE {quote(key)} = {marker}"
    processors = []
    for index, name in enumerate((*columns, key)):
        processor = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors.append((index, processor))
    return sql, tuple(processors)


def bulk_update(conn: Connection, table: Table, key: str, rows: Sequence[dict[str, Any]]) -> int:
    """UPDATE ``table`` setting each row's other columns WHERE ``key`` = the row's ``key``
    (one executemany per set of columns); returns how many rows matched in all."""
    if not rows:
        return 0
    if conn.dialect.name not in BULK_DIALECTS:  # pragma: no cover - other dialects: plain Core
        from sqlalchemy import bindparam, update

        matched = 0
        for row in rows:
            values = {c: v for c, v in row.items() if c != key}
            statement = update(table).where(table.c[key] == bindparam("_key")).values(values)
            matched += conn.execute(statement, {"_key": row[key]}).rowcount
        return matched
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        shapes.setdefault(tuple(c for c in row if c != key), []).append(row)
    matched = 0
    for columns, group in shapes.items():
        sql, processors = _update_statement(conn.dialect, table, columns, key)
        params = []
        for row in group:
            values = [row[c] for c in columns]
            values.append(row[key])
            for index, processor in processors:
                values[index] = processor(values[index])
            params.append(values)
        matched += _executemany(conn, sql, params)
    return matched


def select_text_column(
    conn: Connection, table: Table, key: str, column: str, keys: Sequence[str]
) -> dict[str, str]:
    """{key: column} for the rows whose ``key`` is in ``keys``: both text columns (the values
    come back as the driver returns them, with no result processing)."""
    found: dict[str, str] = {}
    if not keys:
        return found
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    dbapi_error = dialect.loaded_dbapi.Error
    cursor = conn.connection.cursor()
    try:
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            sql = (
                f"SELECT {quote(key)}, {quote(column)} FROM {quote(table.name)} "
                f"WHERE {quote(key)} IN ({', '.join([marker] * len(chunk))})"
            )
            try:
                cursor.execute(sql, chunk)
                found.update(cursor.fetchall())
            except dbapi_error as exc:
                raise DBAPIError.instance(sql, chunk, exc, dbapi_error) from exc
    finally:
        cursor.close()
    return found


def _executemany(conn: Connection, sql: str, params: list[list[Any]]) -> int:
    """``cursor.executemany``; returns the rows it changed in all (both drivers sum them)."""
    dbapi_error = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.cursor()
    try:
        cursor.executemany(sql, params)
        return int(cursor.rowcount)
    except dbapi_error as exc:
        raise DBAPIError.instance(sql, params[:1], exc, dbapi_error) from exc
    finally:
        cursor.close()
