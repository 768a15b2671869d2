"""Database connections: SQLite (embedded default) or PostgreSQL, with the same code above.

SQLite is opened in WAL mode with ``foreign_keys=ON``, a busy timeout, and
``synchronous=NORMAL`` by default. Durability: with WAL + NORMAL a committed transaction
survives the *process* being killed (SIGKILL, OOM) — the WAL is in the OS page cache — but the
last transactions before a power loss or kernel crash may be lost (the database stays
consistent). ``synchronous="FULL"`` fsyncs the WAL at every commit and survives power loss too,
at a cost per commit (group commit keeps the number of commits small).

Writes go through :meth:`Database.write`, which on SQLite starts every write transaction with
``BEGIN IMMEDIATE`` (so a transaction never has to upgrade a read lock into a write lock, the
case SQLite refuses at once with "database is locked" instead of waiting) and retries the whole
transaction when the database is still locked after the busy timeout, or, on PostgreSQL, on a
serialisation failure or deadlock. Reads use a separate engine with plain (deferred) ``BEGIN``,
so readers never wait for the writer (WAL) and see one consistent snapshot per unit of work.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError


def dump_json(value: Any) -> str:
    """JSON columns via orjson: ~10× faster than ``json.dumps`` on step states, which the
    writer encodes for every recorded step. Same text for the values states hold (shortest
    round-trip floats); NaN/inf become null, as PostgreSQL's JSONB requires anyway."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


T = TypeVar("T")

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_PG_TRANSIENT = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available


class DatabaseLocked(RuntimeError):
    """The database stayed locked by another writer for longer than the retry budget."""


def normalise_url(url: str | URL) -> URL:
    """``postgresql://`` means psycopg 3 here (``postgresql+psycopg://``)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry of the whole transaction can cure."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        message = str(orig).lower()
        return "locked" in message or "busy" in message
    return getattr(orig, "sqlstate", None) in _PG_TRANSIENT


class Database:
    """A writer engine and a reader engine (the same one on PostgreSQL)."""

    def __init__(
        self,
        url: str | URL,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_s: float = 30.0,
        lock_retry_s: float = 300.0,
        echo: bool = False,
    ) -> None:
        self.url = normalise_url(url)
        self.dialect = self.url.get_backend_name()
        self.lock_retry_s = lock_retry_s
        self._busy_ms = int(busy_timeout_s * 1000)
        self.retries = 0
        """Write transactions retried because the database was locked (or deadlocked)."""
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        if self.dialect == "sqlite":
            database = self.url.database or ""
            if database in ("", ":memory:") or database.startswith("file::memory:"):
                raise ValueError(
                    "the trajectory store needs an SQLite file (a writer thread and readers "
                    "share it); use sqlite:///path/to/atelier.db"
                )
            self.writer = self._sqlite_engine("BEGIN IMMEDIATE", synchronous, busy_timeout_s, echo)
            self.reader = self._sqlite_engine("BEGIN", synchronous, busy_timeout_s, echo)
        else:
            self.writer = self.reader = create_engine(
                self.url,
                echo=echo,
                pool_pre_ping=True,
                pool_size=8,
                max_overflow=16,
                json_serializer=dump_json,
                json_deserializer=orjson.loads,
            )

    def _sqlite_engine(
        self, begin: str, synchronous: str, busy_timeout_s: float, echo: bool
    ) -> Engine:
        engine = create_engine(
            self.url,
            echo=echo,
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
            json_serializer=dump_json,
            json_deserializer=orjson.loads,
        )
        busy_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            # The driver must not issue BEGIN itself: we emit ours (below).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql(begin)

        return engine

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read transaction (one consistent snapshot); rolled back at the end.

        Opening the connection is retried like a write (a new connection may briefly meet
        another process's lock while setting up WAL); the reads themselves need no lock in WAL.
        """
        conn, transaction = self._retry(self._open_reader)
        try:
            yield conn
        finally:
            transaction.rollback()
            conn.close()

    def _open_reader(self) -> tuple[Connection, Any]:
        conn = self.reader.connect()
        try:
            return conn, conn.begin()
        except BaseException:
            conn.close()
            raise

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one write transaction and commit; retry it whole while locked.

        ``work`` may run more than once, so it must have no effect outside the transaction.
        """

        def attempt() -> T:
            with self.writer.connect() as conn, conn.begin():
                return work(conn)

        return self._retry(attempt)

    def _retry(self, attempt: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.lock_retry_s
        delay = 0.005
        while True:
            try:
                return attempt()
            except DBAPIError as exc:
                if not is_transient(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseLocked(
                        f"the database stayed locked for {self.lock_retry_s:.0f} s: {exc.orig}"
                    ) from exc
                self.retries += 1
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    def dispose(self) -> None:
        """Close every pooled connection; on SQLite, first fold the WAL back into the database.

        SQLite checkpoints and deletes the ``-wal`` file when its last connection closes, but
        not while another process (a viewer, a second command) still has the database open:
        the committed data would then stay in ``-wal`` and a copy of the ``.db`` file alone
        would miss it. The explicit checkpoint makes the ``.db`` file self-contained."""
        if self.dialect == "sqlite":
            self.checkpoint()
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()

    def checkpoint(self, busy_timeout_ms: int = 2000) -> bool:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` (SQLite): copy every committed page into the
        database file and empty the WAL. Returns whether it completed; never raises (a store
        that is read-only, or a reader that holds an old snapshot for longer than
        ``busy_timeout_ms``, leaves the WAL to the next checkpoint: nothing is lost)."""
        if self.dialect != "sqlite":
            return True
        try:
            raw = self.writer.raw_connection()
        except Exception:  # the file is gone or unreadable: nothing to fold back
            return False
        try:
            # On the driver's connection: no BEGIN (a checkpoint cannot run in a transaction),
            # and a short busy timeout, so closing never waits 30 s behind another process.
            driver = raw.driver_connection
            driver.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            busy, _, _ = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            driver.execute(f"PRAGMA busy_timeout={self._busy_ms}")  # back in the pool as it was
            return busy == 0
        except sqlite3.Error:
            raw.invalidate()  # not back in the pool with the short timeout
            return False
        finally:
            raw.close()
