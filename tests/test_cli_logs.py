"""Library log records reach a command-line user as one line each, never as a traceback."""

from __future__ import annotations

import logging
import subprocess
import sys

from agent_graph.logs import one_line


def record_with_exception() -> logging.LogRecord:
    try:
        raise ConnectionError("the connection is lost\nThis probably means the server died")
    except ConnectionError:
        return logging.LogRecord(
            "sqlalchemy.pool.impl.QueuePool",
            logging.ERROR,
            __file__,
            1,
            "Exception during reset or similar",
            None,
            sys.exc_info(),
        )


def test_a_record_with_a_traceback_is_one_line_naming_the_exception():
    line = one_line(record_with_exception())
    assert line == (
        "atelier: library error (sqlalchemy.pool.impl.QueuePool): Exception during reset or "
        "similar: ConnectionError: the connection is lost"
    )
    warning = logging.LogRecord("psycopg", logging.WARNING, "", 1, "a\nb", None, None)
    assert one_line(warning) == "atelier: warning (psycopg): a"


def test_the_cli_prints_library_records_as_one_line_without_a_traceback(tmp_path):
    # A command whose libraries log an exception (as SQLAlchemy's pool does when a database
    # connection dies under it): the user sees one line, not the traceback Python's
    # last-resort handler would print.
    script = (
        "import logging, sys\n"
        "from atelier.cli import app as cli\n"
        "def handler(args):\n"
        "    try:\n"
        "        raise ConnectionError('the connection is lost')\n"
        "    except ConnectionError:\n"
        "        log = logging.getLogger('sqlalchemy.pool')\n"
        "        log.error('Exception during reset', exc_info=True)\n"
        "    return 0\n"
        "cli.cmd_graph = handler  # any command will do\n"
        "sys.exit(cli.main(['graph']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "atelier: library error (sqlalchemy.pool): Exception during reset: "
        "ConnectionError: the connection is lost"
    ]
