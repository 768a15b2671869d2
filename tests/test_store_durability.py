"""Processes die and share files: a run killed with SIGKILL, and two writers on one SQLite file.

The writer processes run this module as a script (``python -m tests.test_store_durability``):
they drive the real graph with scripted backends and, after every ``record_step`` returns (the
step is durable, by contract), append "trajectory seq" to a log file with ``os.write`` — which
survives the SIGKILL — so the test knows exactly which steps must be in the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodes.state import ReasonerState
from storage.store import TrajectoryStore
from tests.pg import EDIT

ROOT = Path(__file__).resolve().parents[1]


class LoggingRecorder:
    """Forwards to the SQL recorder; logs each record once the recorder has returned."""

    def __init__(self, inner, log_path: str) -> None:
        self.inner = inner
        self.fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def start_trajectory(self, state) -> None:
        await self.inner.start_trajectory(state)

    async def record_step(self, record) -> None:
        await self.inner.record_step(record)
        os.write(self.fd, f"{record.trajectory_id} {record.seq}\n".encode())

    async def finish_trajectory(self, trajectory_id, status, state, error) -> None:
        await self.inner.finish_trajectory(trajectory_id, status, state, error)
        os.write(self.fd, f"{trajectory_id} {status}\n".encode())


async def child(
    url: str,
    run_id: str,
    log_path: str,
    count: int,
    delay: float,
    max_batch: int,
    busy_timeout_s: float,
) -> None:
    from agent_graph.runner import Runner, make_group_tasks
    from nodes.state import Budget
    from storage.recorder import SQLRecorder
    from tests.pg import graph_context
    from tests.scripted import CountingPainter

    class SlowPainter(CountingPainter):
        async def generate(self, request):
            await asyncio.sleep(delay)
            return await super().generate(request)

        async def edit(self, request):
            await asyncio.sleep(delay)
            return await super().edit(request)

    store = TrajectoryStore(url, busy_timeout_s=busy_timeout_s)
    prompts = [f"{i} red circles" for i in range(count // 4)]
    async with SQLRecorder(store, run_id, max_batch=max_batch) as sql:
        recorder = LoggingRecorder(sql, log_path)
        context = graph_context(
            store, recorder, mode="reflect", reflections=(EDIT,), painter=SlowPainter()
        )
        runner = Runner(context, concurrency=32, budget=Budget(max_rounds=4), keep_steps=False)
        results = await runner.run(make_group_tasks(prompts, group_size=4, seed=len(run_id)))
    summary = {"retries": store.db.retries, "statuses": [r.status for r in results]}
    Path(log_path + ".done").write_text(json.dumps(summary))
    store.close()


def spawn(url, run_id, log, count, delay=0.0, max_batch=512, busy_timeout_s=30.0):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.test_store_durability",
            url,
            run_id,
            str(log),
            str(count),
            str(delay),
            str(max_batch),
            str(busy_timeout_s),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def logged(log: Path) -> tuple[set[tuple[str, int]], dict[str, str]]:
    steps, finished = set(), {}
    for line in log.read_text().splitlines():
        trajectory_id, what = line.split()
        if what.isdigit():
            steps.add((trajectory_id, int(what)))
        else:
            finished[trajectory_id] = what
    return steps, finished


def wait_for_lines(log: Path, lines: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("\n") >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stdout.read().decode()}")
        time.sleep(0.01)
    raise AssertionError("the writer did not record enough steps in time")


def stored_steps(store: TrajectoryStore, run_id: str) -> set[tuple[str, int]]:
    return {(t.id, s.seq) for t in store.trajectories(run=run_id) for s in store.steps(t.id)}


def test_a_run_killed_mid_flight_loses_no_durable_step_and_can_be_resumed(db_url, tmp_path):
    log = tmp_path / "steps.log"
    proc = spawn(db_url, "killed", log, count=400, delay=0.003)
    wait_for_lines(log, 300, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    durable, finished = logged(log)

    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        raw.close()
    store = TrajectoryStore(db_url)
    assert durable <= stored_steps(store, "killed")  # every step whose caller returned
    for trajectory_id, status in finished.items():
        assert store.trajectory(trajectory_id).status == status
    running = store.trajectories(run="killed", status="running")
    assert running, "the kill should have caught trajectories mid-flight"
    assert store.mark_incomplete("killed") == len(running)
    assert store.trajectories(run="killed", status="running") == []
    assert store.run("killed").status == "incomplete"
    for summary in running:
        steps = store.steps(summary.id)
        assert [s.seq for s in steps] == list(range(len(steps)))
        for s in steps:  # images of durable steps are durable too
            for image in (*s.images_in, *s.images_out):
                assert image.load().size == (image.width, image.height)
        state = store.last_state(summary.id, ReasonerState)
        assert isinstance(state, ReasonerState) and state.trajectory_id == summary.id
        assert state.step_count == len(steps)
        assert store.trajectory(summary.id).status == "incomplete"
    store.close()


@pytest.mark.slow
def test_two_processes_writing_one_sqlite_file_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"  # created by whichever process opens it first
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # Small batches and a 1 ms busy timeout: many commits, and locks outlasting the timeout,
    # so the writers also go through the store's retry of locked transactions.
    procs = [
        spawn(url, run_id, log, count=80, max_batch=3, busy_timeout_s=0.001)
        for run_id, log in zip(("run-a", "run-b"), logs, strict=True)
    ]
    for proc in procs:
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, output
    store = TrajectoryStore(url)
    for run_id, log in zip(("run-a", "run-b"), logs, strict=True):
        summary = json.loads(Path(str(log) + ".done").read_text())
        assert summary["statuses"] == ["succeeded"] * 80
        durable, finished = logged(log)
        assert stored_steps(store, run_id) == durable
        assert len(finished) == 80 and set(finished.values()) == {"succeeded"}
        assert {t.status for t in store.trajectories(run=run_id)} == {"succeeded"}
        assert store.run(run_id).status == "finished"
    raw = sqlite3.connect(tmp_path / "shared.db")
    assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    raw.close()
    store.close()


if __name__ == "__main__":
    url_, run_, log_, count_, delay_, batch_, busy_ = sys.argv[1:8]
    asyncio.run(child(url_, run_, log_, int(count_), float(delay_), int(batch_), float(busy_)))
