"""``atelier rollout`` killed with SIGKILL mid-run while 20 % of its requests fail, then
``atelier resume``: every trajectory completes exactly once, and each one that succeeded took
exactly the path the same trajectory takes in an undisturbed run."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
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
from tests.fault_proxy import FAULTS, FaultProxy
from tests.faults_common import check_recorded_run, write_backends_config

pytestmark = pytest.mark.slow  # see pyproject's markers: make test-fast skips it

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"{i % 4 + 1} blue squares above a red circle, take {i}" for i in range(40)]
GROUP = 2
SEED = 11
MAX_ROUNDS = 3


def atelier(*args: str) -> list[str]:
    return [*ATELIER, *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def stored_steps(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as raw:
            return raw.execute("SELECT count(*) FROM steps").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def paths(store: TrajectoryStore, run_id: str) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(group, sample) -> the succeeded trajectory's steps as (node, text)."""
    found = {}
    for summary in store.trajectories(run=run_id, status="succeeded"):
        steps = store.steps(summary.id)
        found[(summary.group_id, summary.sample_index)] = [(s.node, s.text or "") for s in steps]
    return found


def test_a_killed_faulty_rollout_resumes_and_completes_every_trajectory_once(tmp_path):
    fake = FakeModelServer(latency_s=0.01, edit_percent=50)
    with BackgroundServer(fake.app) as server:
        # The undisturbed reference: the same tasks, straight to the server, in this process.
        reference = TrajectoryStore(f"sqlite:///{tmp_path / 'reference.db'}")
        direct = write_backends_config(tmp_path / "direct.toml", server.url)
        tasks = make_group_tasks(PROMPTS, GROUP, SEED)
        reference_run = asyncio.run(
            rollout(
                reference,
                tasks,
                mode="reflect",
                budget=Budget(max_rounds=MAX_ROUNDS),
                backends_config=direct,
            )
        )
        ref_run, ref_results = reference_run.run_id, reference_run.results
        assert {r.status for r in ref_results} == {"succeeded"}
        expected = paths(reference, ref_run)
        reference.close()

        mix = {kind: 1.0 for kind in FAULTS} | {"garbage": 0.2}
        with FaultProxy(server.url, rate=0.2, mix=mix, seed=5) as proxy:
            config = write_backends_config(tmp_path / "faulty.toml", proxy.url)
            db = tmp_path / "killed.db"
            (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
            command = atelier(
                "rollout",
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "-G",
                str(GROUP),
                "--seed",
                str(SEED),
                "--mode",
                "reflect",
                "--max-rounds",
                str(MAX_ROUNDS),
                "--concurrency",
                "16",
                "--name",
                "killed",
                "--config",
                str(config),
                "--db",
                str(db),
            )
            proc = subprocess.Popen(
                command, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            total_steps = sum(len(p) for p in expected.values())
            deadline = time.monotonic() + 90
            while stored_steps(db) < total_steps // 3:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the rollout recorded too little in time"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at = stored_steps(db)

            store = TrajectoryStore(f"sqlite:///{db}")
            run = store.resolve_run("killed")
            running = store.trajectories(run=run.id, status="running")
            assert running, "the kill should catch trajectories mid-flight"
            unfinished = [*running, *store.trajectories(run=run.id, status="incomplete")]
            assert killed_at < total_steps
            requests_before = proxy.requests
            resumed = subprocess.run(
                atelier("resume", "killed", "--concurrency", "16", "--db", str(db)),
                cwd=tmp_path,
                env=env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            resume_attempts = proxy.requests - requests_before

    # Every trajectory ended once; none was lost or run twice; the run is finished.
    statuses = check_recorded_run(store, run.id, len(tasks))
    assert statuses["succeeded"] + statuses["failed"] == len(tasks)
    assert store.run(run.id).status == "finished"
    line = re.search(r"resumed (\d+) trajectories, (\d+) succeeded", resumed.stdout)
    assert line is not None and int(line[1]) == len(unfinished), resumed.stdout
    # The resume reports its requests, and they are the ones the proxy saw.
    counts = re.search(r"backends: (\d+) requests to 1 server, (\d+) retried", resumed.stdout)
    assert counts is not None and int(counts[1]) == resume_attempts, resumed.stdout
    # Succeeded trajectories took the undisturbed path, step for step (no step repeated or
    # skipped across the kill); failed ones name the fault and the proxy.
    got = paths(store, run.id)
    assert len(got) == statuses["succeeded"] >= len(tasks) * 0.8
    for key, steps in got.items():
        assert steps == expected[key], key
    for summary in store.trajectories(run=run.id, status="failed"):
        assert proxy.url in summary.error
        assert "not JSON" in summary.error or "gave up after" in summary.error
    print(
        f"\nkilled at {killed_at}/{total_steps} steps, {len(running)} trajectories in flight, "
        f"{len(unfinished)} unfinished; proxy {dict(proxy.injected)}; {statuses}; "
        f"{resumed.stdout.strip()}"
    )
    store.close()
