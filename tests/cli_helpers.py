"""Running the ``atelier`` command in a subprocess, as a user would: the one helper the CLI,
training and fault tests share."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ATELIER = [sys.executable, "-m", "atelier.cli"]
"""The command line, run by this interpreter (the venv's, with the package installed)."""


def atelier_env(db: Path | str | None = None, **env_vars: str) -> dict[str, str]:
    """The environment for a command: wide, colourless output and its own store — never the
    developer's ``atelier.db`` (a throwaway one unless ``db`` is given)."""
    store = str(db) if db is not None else f"sqlite:///{tempfile.mkdtemp(prefix='atelier-')}/a.db"
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "ATELIER_DB": store, **env_vars}


def run_atelier(
    *args: str,
    db: Path | str | None = None,
    cwd: Path | str | None = None,
    timeout: float = 300,
    **env_vars: str,
) -> subprocess.CompletedProcess:
    """``atelier ARGS`` to completion, its output captured as text."""
    return subprocess.run(
        [*ATELIER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=atelier_env(db, **env_vars),
    )


def recorded_steps(db: Path, run_name: str) -> int:
    """Steps recorded so far for the run named ``run_name`` in the SQLite file ``db`` (read
    with plain sqlite3, read-only, while another process writes it; 0 when unreadable)."""
    import sqlite3

    if not Path(db).exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM steps s JOIN trajectories t ON s.trajectory_id = t.id "
                "JOIN runs r ON t.run_id = r.id WHERE r.name = ?",
                (run_name,),
            ).fetchone()
    except sqlite3.Error:
        return 0
    return row[0] if row else 0


def sigkill_when(
    args: list[str], db: Path, ready: Any, *, cwd: Path, timeout: float = 300, **env_vars: str
) -> None:
    """Start ``atelier ARGS`` on the store ``db`` and SIGKILL it as soon as ``ready()`` holds
    (asserting it was still running then)."""
    import signal
    import time

    process = subprocess.Popen(
        [*ATELIER, *args],
        cwd=cwd,
        env=atelier_env(db, **env_vars),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready():
            time.sleep(0.01)
        assert process.poll() is None, "the command ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
