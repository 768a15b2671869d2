"""Library log records as one line each on the command line, never a traceback.

Libraries log what they cannot raise: SQLAlchemy's pool logs "Exception during reset or
similar" *with its traceback* when a connection dies under it, psycopg logs "error ignored
terminating ..." followed by libpq's multi-line message. Without a handler, Python's last-resort
handler prints all of it, and a user whose database went away sees a traceback above the one
``atelier: error:`` line that names the problem. The ``atelier`` commands install
:class:`OneLineHandler` on the root logger (unless the program already configured logging).
"""

from __future__ import annotations

import logging
import sys


def one_line(record: logging.LogRecord) -> str:
    """``atelier: warning (logger): message[: ExceptionType: first line of it]``."""
    lines = record.getMessage().strip().splitlines()
    text = lines[0] if lines else ""
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        detail = (str(error).strip().splitlines() or [""])[0]
        text += f": {type(error).__name__}" + (f": {detail}" if detail else "")
    level = "warning" if record.levelno < logging.ERROR else "library error"
    return f"atelier: {level} ({record.name}): {text}"


class OneLineHandler(logging.Handler):
    """Writes :func:`one_line` to the current ``sys.stderr`` (looked up at each record, so a
    replaced stderr, as under test capture, is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(one_line(record) + "\n")
        except Exception:
            self.handleError(record)


def install_cli_logging(level: int = logging.WARNING) -> None:
    """Route records of ``level`` and above through :class:`OneLineHandler`, once, unless the
    root logger already has handlers (a program embedding Atelier configured its own)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = OneLineHandler(level)
    root.addHandler(handler)
