"""The command line's exceptions: each becomes one ``atelier:`` line and an exit code in
:func:`atelier.cli.app.main`."""

from __future__ import annotations


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


class StoreUnavailable(Exception):
    """The store failed under a running command (a database server went away): one line,
    exit code 1."""


class Interrupted(Exception):
    """Ctrl-C under a command that records a run: the message names the run to resume."""

    def __init__(self, run_id: str | None) -> None:
        super().__init__(run_id)
        self.run_id = run_id
