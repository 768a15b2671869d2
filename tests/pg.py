"""A private, throwaway PostgreSQL 15 server for the store tests, and the ``store`` fixtures.

The server is started once per test session from the binaries under
``/usr/lib/postgresql/15/bin`` (override with ``ATELIER_PG_BIN``): ``initdb -A trust`` into a
temporary directory, then ``pg_ctl start`` on a free port, listening on 127.0.0.1 and a socket in
that directory. PostgreSQL refuses to run as root, so as root the cluster is owned by and run as
the ``postgres`` user (``runuser -u postgres --``). Each test gets a fresh database. Tests that
need PostgreSQL skip, saying why, only when the binaries are absent.

The fixtures (``pg_server``, ``db_url``, ``store``) are in ``tests/conftest_pg.py``; test modules
load them with ``pytest_plugins = ("tests.conftest_pg",)``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_BIN = Path(os.environ.get("ATELIER_PG_BIN", "/usr/lib/postgresql/15/bin"))
BACKENDS = ["sqlite", "postgresql"]


def missing_reason() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg (3) driver is not installed: pip install 'psycopg[binary]'"
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL binaries not found ({PG_BIN / tool} is absent; set ATELIER_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not available to drop privileges"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="atelier-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            str(PG_BIN / "initdb"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "-D",
            str(self.data),
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.root / "server.log"),
            "start",
        )

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


# --- helpers shared by the store tests: the real graph with scripted backends ------------------

EDIT = "<think>The image lacks a circle.</think>Add one red circle."
STOP = "<think>It matches.</think>No further edit needed."
DECOMPOSITION = (
    '{"steps": [{"instruction": "Draw two red circles.", "expect": "two red circles"},'
    ' {"instruction": "Add a blue square.", "expect": "two red circles and a blue square"}]}'
)


class CyclingChat:
    """A chat model answering with its outputs in turn (so concurrent trajectories differ), with
    large token ids and extreme log-probs, to exercise the binary encodings."""

    def __init__(self, outputs: list[str], model_id: str = "cycling-chat") -> None:
        self.outputs = outputs
        self.model_id = model_id
        self.calls = 0

    async def chat(self, request: object) -> object:
        from nodes.backends.base import TextCompletion

        text = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        words = text.split()
        ids = tuple(2**31 - 1 - i * 7919 for i in range(len(words)))
        logprobs = tuple((-1e-300, -745.1, -0.0, -5e-324, -3.25)[i % 5] for i in range(len(ids)))
        return TextCompletion(text=text, token_ids=ids, logprobs=logprobs, model=self.model_id)


def graph_context(
    images: object,
    recorder: object | None,
    *,
    mode: str = "auto",
    reflections: tuple[str, ...] = (EDIT, EDIT, STOP),
    painter: object = None,
) -> object:
    """A ReasonerContext whose backends are scripted, storing images in ``images``."""
    from nodes.context import Backends, ReasonerContext
    from policies.simple import FixedModePolicy, FollowReflectionStopPolicy, UniformModePolicy
    from tests.scripted import CountingPainter, FixedJudge, ScriptedChat

    painter = painter or CountingPainter()
    backends = Backends(
        planner=ScriptedChat(["BLUEPRINT"]),
        reflector=CyclingChat(list(reflections)),
        decomposer=ScriptedChat([DECOMPOSITION]),
        generator=painter,  # type: ignore[arg-type]
        editor=painter,  # type: ignore[arg-type]
        judge=FixedJudge(0.75),
    )
    router = UniformModePolicy() if mode == "auto" else FixedModePolicy(mode)
    return ReasonerContext(
        backends=backends,
        mode_policy=router,
        stop_policy=FollowReflectionStopPolicy(),
        images=images,
        recorder=recorder,
    )  # type: ignore[arg-type]
