"""Store fixtures over both backends: ``db_url`` and ``store`` run each test on SQLite and on a
private PostgreSQL server (``pg_server``, one per session; see ``tests/pg.py``).

Loaded by the store test modules with ``pytest_plugins = ("tests.conftest_pg",)``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import BACKENDS, PostgresServer, missing_reason


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer()
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        server.stop()
        raise RuntimeError(
            f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}"
        ) from exc
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: an SQLite file, or a new database on the private server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'atelier.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture
def store(db_url: str) -> Iterator[object]:
    from storage.store import TrajectoryStore

    opened = TrajectoryStore(db_url)
    yield opened
    opened.close()
