"""What every ``atelier`` subcommand module shares: the ``--db`` option, opening the store,
resolving a run reference. argparse only at import; the store loads when a command runs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from atelier.cli.errors import CliError

_opened: list[Any] = []
"""The stores this process opened (:func:`open_store`), closed by :func:`close_stores` when the
command ends."""


def add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        # An empty $ATELIER_DB means unset (the shell convention); an empty --db is refused.
        default=os.environ.get("ATELIER_DB") or None,
        help="SQLAlchemy URL or SQLite path (default: $ATELIER_DB or sqlite:///atelier.db)",
    )


def store_url(args: argparse.Namespace) -> str:
    """The database URL ``--db`` names (``$ATELIER_DB``, else ``sqlite:///atelier.db``, when
    left out). ``--db ''`` is refused: silently meaning ``./atelier.db`` would write a store
    where nobody looks for one."""
    from agent_graph.rollout import database_url

    if args.db is not None and not args.db.strip():
        raise CliError("--db is empty: give a SQLite path or a database URL, or leave --db out")
    return database_url(args.db)


def safe_url(url: str) -> str:
    """``url`` with its password masked (``***``), for messages; as given if it does not parse."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def open_store(args: argparse.Namespace, *, must_exist: bool = True):  # -> TrajectoryStore
    url = store_url(args)
    if must_exist and url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise CliError(f"no store at {path} (run `atelier demo` or pass --db)")
    from storage.store import TrajectoryStore

    try:
        store = TrajectoryStore(url)
    except Exception as exc:  # a bad URL, a server that is down, a file that is not a store
        problem = _open_problem(url, exc)
        raise CliError(f"cannot open the store {safe_url(url)}: {problem}") from None
    _opened.append(store)
    return store


def _open_problem(url: str, exc: Exception) -> str:
    """Why a store did not open, in one line, with no password in it (drivers quote the
    connection string in some errors); a SQLite file in a read-only folder is named as such."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    reason = " ".join((str(cause).strip().splitlines() or [""])[:1]) or type(cause).__name__
    with contextlib.suppress(Exception):
        password = make_url(url).password
        if password:
            reason = reason.replace(str(password), "***")
    if url.startswith("sqlite:///") and (is_read_only(cause) or "unable to open" in reason):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if folder.is_dir() and not os.access(folder, os.W_OK):
            # SQLite opens the file, then cannot create its -wal beside it: say why.
            return (
                f"the database is read-only (cannot be written): its folder {folder} is not "
                f"writable, and SQLite needs to create the -wal and -shm files there ({reason})"
            )
    if is_read_only(cause):
        return f"the database is read-only (cannot be written): {reason}"
    return f"{type(cause).__name__}: {reason}"


def is_read_only(cause: BaseException) -> bool:
    """Whether a driver error says the database refuses every write: SQLite's read-only file
    (or a folder where its journal cannot be created), PostgreSQL's read-only transaction
    (a standby, ``default_transaction_read_only``)."""
    import sqlite3

    if isinstance(cause, sqlite3.Error):
        code = getattr(cause, "sqlite_errorcode", None)
        # SQLITE_READONLY and its extended codes (RECOVERY, CANTLOCK, ROLLBACK, DBMOVED, ...)
        return (code is not None and code & 0xFF == sqlite3.SQLITE_READONLY) or (
            "readonly database" in str(cause)
        )
    return getattr(cause, "sqlstate", None) == "25006"  # read_only_sql_transaction


def close_stores(*, quietly: bool = False) -> None:
    """Close the stores this command opened: buffered images written, connections released and
    (SQLite) the WAL checkpointed into the database file, so that the ``.db`` file alone holds
    everything once the command has exited. ``quietly`` (after an error): only release the
    connections, and never raise over the error being reported."""
    while _opened:
        store = _opened.pop()
        if not quietly:
            store.close()
            continue
        with contextlib.suppress(Exception):
            store.db.dispose()


def resolve_run(store, ref: str):  # -> RunInfo
    """The run ``ref`` names; a note on stderr when the name is shared by several runs (the
    newest is used), so that nobody reads the wrong run without knowing."""
    try:
        match = store.match_run(ref)
    except KeyError as exc:
        raise CliError(str(exc.args[0]) if exc.args else str(exc)) from None
    if match.same_name > 1:
        print(
            f"atelier: note: {match.same_name} runs are named {ref!r}; using the newest, "
            f"{match.run.id[:12]} (created {when(match.run.created_at)}) — pass a run id "
            "(`atelier runs` lists them) to pick another",
            file=sys.stderr,
        )
    return match.run


def when(moment) -> str:  # a datetime -> its UTC time, as `atelier runs` shows it
    return moment.strftime("%Y-%m-%d %H:%M:%S")
