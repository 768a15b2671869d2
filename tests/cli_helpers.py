"""Running the ``atelier`` command in a subprocess, as a user would: the one helper the CLI,
training and fault tests share."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

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
