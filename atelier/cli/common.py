"""What every ``atelier`` subcommand module shares: the ``--db`` option, opening the store,
resolving a run reference. argparse only at import; the store loads when a command runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from atelier.cli.errors import CliError


def add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=os.environ.get("ATELIER_DB"),
        help="SQLAlchemy URL or SQLite path (default: $ATELIER_DB or sqlite:///atelier.db)",
    )


def open_store(args: argparse.Namespace, *, must_exist: bool = True):  # -> TrajectoryStore
    from agent_graph.rollout import database_url

    url = database_url(args.db)
    if must_exist and url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise CliError(f"no store at {path} (run `atelier demo` or pass --db)")
    from storage.store import TrajectoryStore

    try:
        return TrajectoryStore(url)
    except Exception as exc:  # a bad URL, a server that is down, a file that is not a store
        raise CliError(f"cannot open the store {url}: {type(exc).__name__}: {exc}") from None


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
