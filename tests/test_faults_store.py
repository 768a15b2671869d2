"""The store goes away mid-run: PostgreSQL is stopped under a running ``atelier rollout``.

The rollout must end promptly with one clear error line naming the database (not hang, not a
traceback); once PostgreSQL is back, ``atelier resume`` finishes the run, every trajectory
ends exactly once, and the trajectories continue exactly where their recording stopped (each
one that succeeded took the undisturbed run's path, step for step).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from agent_graph.rollout import rollout
from agent_graph.runner import make_group_tasks
from nodes.backends.servers.http_common import BackgroundServer
from nodes.state import Budget
from storage.store import TrajectoryStore
from tests.cli_helpers import ATELIER
from tests.fake_servers import FakeModelServer
from tests.faults_common import check_recorded_run, write_backends_config
from tests.pg import PG_BIN, PostgresServer, missing_reason

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"{i % 4 + 1} yellow stars below a green circle, take {i}" for i in range(30)]
GROUP, SEED, MAX_ROUNDS = 2, 21, 3


class StoppablePostgres(PostgresServer):
    """A private cluster of its own (the session's shared one must stay up for other tests),
    which this test stops and starts again."""

    def options(self) -> str:
        return (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=300"
        )

    def pg_ctl(self, *args: str) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args)

    def halt(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.pg_ctl("-o", self.options(), "-w", "-l", str(self.root / "server.log"), "start")

    def count_steps(self, url: str) -> int:
        import psycopg

        dbname = url.rsplit("/", 1)[1]
        try:
            with psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=2
            ) as conn:
                return conn.execute("SELECT count(*) FROM steps").fetchone()[0]
        except psycopg.Error:  # the tables are not there yet
            return 0


@pytest.fixture
def postgres():
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = StoppablePostgres()
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # stopped already
            server.stop()


def atelier(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*ATELIER, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def paths(store: TrajectoryStore, run_id: str) -> dict[tuple[str, int], list[tuple[str, str]]]:
    return {
        (t.group_id, t.sample_index): [(s.node, s.text or "") for s in store.steps(t.id)]
        for t in store.trajectories(run=run_id, status="succeeded")
    }


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """The fake model server, its config, and the undisturbed run's path per (group, sample)."""
    tmp = tmp_path_factory.mktemp("models")
    fake = FakeModelServer(latency_s=0.02, edit_percent=50)
    with BackgroundServer(fake.app) as server:
        config = write_backends_config(tmp / "b.toml", server.url)
        reference = TrajectoryStore(f"sqlite:///{tmp / 'reference.db'}")
        ref_run = asyncio.run(
            rollout(
                reference,
                make_group_tasks(PROMPTS, GROUP, SEED),
                mode="reflect",
                budget=Budget(max_rounds=MAX_ROUNDS),
                backends_config=config,
            )
        ).run_id
        expected = paths(reference, ref_run)
        reference.close()
        assert len(expected) == len(PROMPTS) * GROUP
        yield config, expected


def kill_connections(postgres: StoppablePostgres, url: str, seconds: float) -> int:
    """Terminate every connection to the database, again and again for ``seconds``."""
    import psycopg

    dbname = url.rsplit("/", 1)[1]
    killed = 0
    deadline = time.monotonic() + seconds
    with psycopg.connect(
        host="127.0.0.1", port=postgres.port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        while time.monotonic() < deadline:
            killed += conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchone()[0]
            time.sleep(0.02)
    return killed


@pytest.mark.parametrize("outage", ["server_stopped", "connections_killed"])
def test_the_store_failing_mid_run_gives_a_clear_error_and_resume_finishes(
    postgres, model_server, tmp_path, outage
):
    """``server_stopped``: PostgreSQL stopped (fast) under the run, started again afterwards.
    ``connections_killed``: the server stays up but drops the run's connections (an admin, a
    failover, a proxy): a step whose write was cut off must stop the run, never be recorded as
    a failed trajectory (which resume would not retry)."""
    config, expected = model_server
    total_steps = sum(len(p) for p in expected.values())
    url = postgres.create_database()
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    proc = atelier(
        "rollout",
        *("--prompts", str(tmp_path / "prompts.txt"), "-G", str(GROUP), "--seed", str(SEED)),
        *("--mode", "reflect", "--max-rounds", str(MAX_ROUNDS), "--concurrency", "16"),
        *("--name", "pgdown", "--config", str(config), "--db", url),
    )
    deadline = time.monotonic() + 90
    while postgres.count_steps(url) < total_steps // 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the rollout recorded too little in time"
        time.sleep(0.05)
    if outage == "server_stopped":
        postgres.halt()
    else:
        assert kill_connections(postgres, url, seconds=0.5) > 0
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=60)  # not a hang
    ended_after = time.monotonic() - stopped
    rollout_error = err.strip()

    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    library = ("atelier: warning (", "atelier: library error (")
    if outage == "connections_killed" and proc.returncode == 0:
        # The kills can land between writes, or on a batch that the recorder then writes again
        # record by record on a fresh connection (pool_pre_ping): the run recovers by itself.
        # That is right too, provided nothing was lost or recorded twice.
        assert all(line.startswith(library) for line in lines), err
        store = TrajectoryStore(url)
        run = store.resolve_run("pgdown")
        statuses = check_recorded_run(store, run.id, len(PROMPTS) * GROUP)
        assert statuses == {"succeeded": len(PROMPTS) * GROUP}
        assert store.run(run.id).status == "finished"
        assert paths(store, run.id) == expected
        store.close()
        print(f"\n{outage}: the run recovered by itself: {rollout_error}")
        return

    # One clear line naming the database, last, and no traceback. Libraries may log what they
    # met on the way, one line each (agent_graph/logs.py): psycopg's "error ignored
    # terminating <psycopg.Pipeline [BAD]>: ...", SQLAlchemy's pool "Exception during reset
    # or similar" (which it logs with a traceback: that failed this test under load).
    assert proc.returncode == 1, (out, err)
    assert sum("atelier: error" in line for line in lines) == 1, err
    assert all(line.startswith(library) for line in lines[:-1]), err
    # At most a line or two per pooled connection (8 + 16 overflow) that met the outage.
    assert len(lines) <= 1 + 2 * 24, err
    line = lines[-1]
    assert line.startswith("atelier: error: the store ") and "unavailable" in line
    assert f"127.0.0.1:{postgres.port}" in line
    assert "atelier resume pgdown" in line
    assert ended_after < 30

    if outage == "server_stopped":
        postgres.restart()
    store = TrajectoryStore(url)
    run = store.resolve_run("pgdown")
    before = {t.id: t.status for t in store.trajectories(run=run.id)}
    assert "failed" not in before.values()  # a store error is not the trajectory's failure
    resumed = atelier("resume", "pgdown", "--db", url)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, (out, err)

    statuses = check_recorded_run(store, run.id, len(PROMPTS) * GROUP)
    assert statuses == {"succeeded": len(PROMPTS) * GROUP}
    assert store.run(run.id).status == "finished"
    assert paths(store, run.id) == expected  # each continued exactly where its recording stopped
    resumed_count = sum(status != "succeeded" for status in before.values())
    assert f"resumed {resumed_count} trajectories, {resumed_count} succeeded" in out
    print(f"\n{outage}: rollout ended {ended_after:.1f} s later: {rollout_error}; {out}")
    store.close()
