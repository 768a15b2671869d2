"""Many rollout workers on one run (``agent_graph.workers``, ``storage.claims``, ``atelier
worker``): claims never overlap, a lapsed lease is taken over and its old holder can write
nothing more, and workers killed with SIGKILL leave every trajectory finished exactly once —
each one the same trajectory an uninterrupted single-process rollout records."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from agent_graph.recording import StepRecord
from agent_graph.rollout import resume_run, rollout
from agent_graph.runner import make_group_tasks
from agent_graph.workers import work_run
from nodes.backends.shapeworld import fixed_prompt_set
from nodes.state import Budget, ReasonerState, Task
from storage.claims import ClaimLost
from storage.recorder import SQLRecorder
from storage.store import TrajectoryStore
from tests.cli_helpers import ATELIER, atelier_env, run_atelier

ROOT = Path(__file__).resolve().parents[1]


def register(store: TrajectoryStore, count: int) -> tuple[str, list[str]]:
    run = store.create_run("claims")
    states = [
        ReasonerState(trajectory_id=f"t{i:04d}", task=Task(prompt="a red circle", seed=i))
        for i in range(count)
    ]
    store.register_trajectories(run.id, states)
    return run.id, [s.trajectory_id for s in states]


def shapeworld_tasks(per_category: int = 2, group_size: int = 3) -> list[Task]:
    items = fixed_prompt_set(per_category, seed=0)
    return make_group_tasks([i.text for i in items], group_size, 0, [i.category for i in items])


def paths(store: TrajectoryStore, run_id: str) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(group, sample) -> the trajectory's steps as (node, text)."""
    return {
        (s.group_id, s.sample_index): [(x.node, x.text or "") for x in store.steps(s.id)]
        for s in store.trajectories(run=run_id)
    }


def check_finished_once(store: TrajectoryStore, run_id: str, count: int) -> None:
    summaries = store.trajectories(run=run_id)
    assert len(summaries) == count
    for summary in summaries:
        assert summary.status == "succeeded", summary
        steps = store.steps(summary.id)
        assert [s.seq for s in steps] == list(range(len(steps))), summary.id
        assert sum(s.node == "stop" for s in steps) == 1 and steps[-1].node == "stop"
        assert store.trajectory(summary.id).final_state["step_count"] == len(steps)


def test_concurrent_claims_are_disjoint_and_cover_the_run(db_url):
    with TrajectoryStore(db_url) as store:
        run_id, ids = register(store, 60)
    stores = [TrajectoryStore(db_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    claimed: list[list[str]] = [[] for _ in stores]

    def claimer(index: int) -> None:
        start.wait()
        while batch := stores[index].claim(run_id, f"w{index}", 3, lease_s=30):
            claimed[index] += batch
            time.sleep(0.002)  # let the others in (else one thread may take all, GIL-bound)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [tid for batch in claimed for tid in batch]
    assert sorted(every) == ids  # each trajectory claimed once, by one worker
    assert sum(bool(batch) for batch in claimed) >= 2  # they did claim side by side
    counts = stores[0].claim_counts(run_id)
    assert (counts.unfinished, counts.free, counts.leased) == (60, 0, 60)
    assert stores[0].release("w0", run_id) == len(claimed[0])
    assert stores[0].claim_counts(run_id).free == len(claimed[0])
    for store in stores:
        store.close()


def test_a_lapsed_lease_is_taken_over_and_its_old_holder_writes_nothing(db_url):
    async def scenario(store: TrajectoryStore, run_id: str) -> None:
        stale, fresh = "stale-worker", "fresh-worker"
        assert store.claim(run_id, stale, 2, lease_s=0.3) == ["t0000", "t0001"]
        assert store.claim(run_id, fresh, 10, lease_s=30) == ["t0002", "t0003"]
        assert store.claim(run_id, fresh, 10, lease_s=30) == []  # nothing free: leases live
        await asyncio.sleep(0.6)
        assert store.claim(run_id, fresh, 10, lease_s=30) == ["t0000", "t0001"]
        assert store.renew(stale, ["t0000", "t0001"], 30) == []  # taken over
        state = store.last_state("t0000", ReasonerState)
        step = StepRecord("t0000", 0, "plan", time.time(), 0.01, state, {"step_count": 1})
        async with SQLRecorder(store, run_id, claimant=stale) as old:
            with pytest.raises(ClaimLost):
                await old.start_trajectory(state)
            with pytest.raises(ClaimLost):
                await old.record_step(step)
            with pytest.raises(ClaimLost):
                await old.finish_trajectory("t0000", "succeeded", state, None)
        assert store.steps("t0000") == []
        assert store.trajectories(run=run_id, limit=1)[0].status == "incomplete"
        async with SQLRecorder(store, run_id, claimant=fresh) as new:
            await new.start_trajectory(state)
            await new.record_step(step)
            await new.finish_trajectory("t0000", "succeeded", state, None)
        assert store.trajectories(run=run_id, limit=1)[0].status == "succeeded"
        assert store.renew(fresh, ["t0000", "t0001"], 30) == ["t0000", "t0001"]
        # The fresh recorder's close released what it had not finished; t0001 is free again.
        assert store.claim_counts(run_id).free == 0  # t0001 still leased by fresh (renewed)
        assert store.release(fresh, run_id) == 3
        assert store.claim(run_id, stale, 10, lease_s=30) == ["t0001", "t0002", "t0003"]
        with store.db.read() as conn:
            holders = dict(conn.execute(text("SELECT id, claimed_by FROM trajectories")).all())
        assert holders["t0000"] == fresh  # a finished trajectory names who finished it

    with TrajectoryStore(db_url) as store:
        run_id, _ = register(store, 4)
        asyncio.run(scenario(store, run_id))


def test_two_workers_sample_a_registered_run_as_one_rollout_would(tmp_path):
    tasks = shapeworld_tasks()
    with TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        reference = asyncio.run(rollout(store, tasks, mode="random", name="reference"))
        registered = asyncio.run(
            rollout(store, tasks, mode="random", name="workers", register_only=True)
        )
        assert registered.results == []
        assert store.run(registered.run_id).status == "incomplete"
        assert store.claim_counts(registered.run_id).free == len(tasks)
        second = TrajectoryStore(store.url)

        async def two_workers():
            return await asyncio.gather(
                work_run(store, registered.run_id, worker="one", batch=4, lease_s=10),
                work_run(second, registered.run_id, worker="two", batch=4, lease_s=10),
            )

        one, two = asyncio.run(two_workers())
        second.close()
        assert len(one.results) + len(two.results) == len(tasks)
        assert one.lost == two.lost == 0
        assert store.run(registered.run_id).status == "finished"
        check_finished_once(store, registered.run_id, len(tasks))
        assert paths(store, registered.run_id) == paths(store, reference.run_id)


class LosingRecorder:
    """Loses the claim on one trajectory at its step 2, as a fenced SQLRecorder does once
    another worker took the trajectory over."""

    def __init__(self, lose: str) -> None:
        self.lose = lose
        self.finished: list[str] = []

    async def start_trajectory(self, state: object) -> None:
        return None

    async def record_step(self, record: StepRecord) -> None:
        if record.trajectory_id == self.lose and record.seq == 2:
            raise ClaimLost("taken over")

    async def finish_trajectory(self, trajectory_id: str, *_: object) -> None:
        self.finished.append(trajectory_id)


def test_the_runner_drops_a_trajectory_whose_claim_was_lost_and_runs_the_rest():
    from agent_graph.presets import shapeworld_context
    from agent_graph.runner import Runner

    tasks = shapeworld_tasks(1, 2)
    recorder = LosingRecorder(lose="")
    runner = Runner(shapeworld_context("reflect", recorder=recorder), concurrency=4)
    points = [(runner.state_factory(task, runner.budget), None) for task in tasks]
    recorder.lose = points[3][0].trajectory_id
    results = asyncio.run(runner.resume(points))
    assert [r.trajectory_id for r in results] == [
        state.trajectory_id for i, (state, _) in enumerate(points) if i != 3
    ]
    assert {r.status for r in results} == {"succeeded"}
    assert recorder.lose not in recorder.finished  # nothing more recorded of it
    assert len(recorder.finished) == len(tasks) - 1


def test_resume_refuses_a_run_that_workers_hold(tmp_path):
    with TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        outcome = asyncio.run(rollout(store, shapeworld_tasks(1, 1), register_only=True))
        assert store.claim(outcome.run_id, "busy", 2, lease_s=30)
        with pytest.raises(ValueError, match=r"rollout workers .* live lease"):
            asyncio.run(resume_run(store, outcome.run_id))


def worker_process(url: str, worker: str, *, lease: float = 2.0) -> subprocess.Popen:
    command = [*ATELIER, "worker", "killed", "--db", url, "--worker-id", worker]
    command += ["--batch", "4", "--concurrency", "4", "--lease", str(lease)]
    return subprocess.Popen(
        command,
        env={**atelier_env(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def held_with_steps(store: TrajectoryStore, worker: str) -> dict[str, int]:
    """The worker's unfinished claims that have recorded steps: id -> steps recorded."""
    query = text(
        "SELECT t.id, count(s.seq) FROM trajectories t JOIN steps s ON s.trajectory_id = t.id "
        "WHERE t.claimed_by = :w AND t.status IN ('incomplete', 'running') GROUP BY t.id"
    )
    with store.db.read() as conn:
        return {tid: n for tid, n in conn.execute(query, {"w": worker})}


def test_three_worker_processes_one_killed_finish_every_trajectory_once(pg_server, tmp_path):
    tasks = shapeworld_tasks(per_category=3, group_size=3)[:60]  # 20 groups of 3
    url = pg_server.create_database()
    with TrajectoryStore(f"sqlite:///{tmp_path / 'reference.db'}") as reference:
        expected = paths(reference, asyncio.run(rollout(reference, tasks, mode="reflect")).run_id)
    store = TrajectoryStore(url)
    run_id = asyncio.run(
        rollout(store, tasks, mode="reflect", name="killed", budget=Budget(), register_only=True)
    ).run_id
    victim = worker_process(url, "victim")
    deadline = time.monotonic() + 90
    while True:  # freeze the victim while it holds trajectories it has recorded steps of
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "the victim never held a trajectory mid-way"
        if held_with_steps(store, "victim"):
            victim.send_signal(signal.SIGSTOP)
            held = held_with_steps(store, "victim")
            if held:
                break
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    survivors = [worker_process(url, "a"), worker_process(url, "b")]
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    outputs = [proc.communicate(timeout=120) for proc in survivors]
    for proc, (out, err) in zip(survivors, outputs, strict=True):
        assert proc.returncode == 0, err
        assert err == ""
        assert "the run is finished" in out
    done = {
        name: int(re.search(r": (\d+) trajectories", out).group(1))
        for name, (out, _) in zip("ab", outputs, strict=True)
    }

    check_finished_once(store, run_id, len(tasks))
    assert store.run(run_id).status == "finished"
    with store.db.read() as conn:
        by_worker = dict(conn.execute(text("SELECT id, claimed_by FROM trajectories")).all())
    finished_by_victim = sum(holder == "victim" for holder in by_worker.values())
    assert done["a"] + done["b"] + finished_by_victim == len(tasks)  # none finished twice
    for tid, recorded in held.items():  # taken over, continued from the victim's steps
        assert by_worker[tid] in ("a", "b")
        assert len(store.steps(tid)) > recorded
    assert paths(store, run_id) == expected  # each the trajectory an undisturbed run records
    store.close()


@pytest.mark.slow  # worker processes: make test-fast skips it
def test_worker_command_on_sqlite_several_processes_and_bad_input(tmp_path):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    made = run_atelier(
        "rollout",
        "--per-category",
        "1",
        "-G",
        "3",
        "--name",
        "shared",
        "--register-only",
        db=db,
    )
    assert made.returncode == 0, made.stderr
    assert "registered 27 trajectories" in made.stdout
    assert "atelier worker" in made.stdout
    env = atelier_env(db, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [*ATELIER, "worker", "shared", "--batch", "2", "--lease", "5"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    counts = [int(re.search(r": (\d+) trajectories", out).group(1)) for out, _ in outputs]
    assert sum(counts) == 27
    with TrajectoryStore(db) as store:
        check_finished_once(store, store.resolve_run("shared").id, 27)

    for args, message in (
        (("worker", "shared"), "has nothing for a worker: its 27 trajectories are all finished"),
        (("worker", "nope"), "no run 'nope'"),
        (("worker", "shared", "--lease", "0"), "--lease must be a positive"),
        (("worker", "shared", "--batch", "0"), "--batch and --concurrency must be at least 1"),
    ):
        done = run_atelier(*args, db=db)
        assert done.returncode == 2, (args, done.stderr)
        [line] = done.stderr.splitlines()  # one line, no traceback
        assert line.startswith("atelier: error: ") and message in line, line
    missing = run_atelier("worker", "shared", db=f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.returncode == 2 and missing.stderr.startswith("atelier: error: no store at")


@pytest.mark.slow  # worker processes: make test-fast skips it
def test_a_terminated_worker_releases_its_claims_at_once(tmp_path):
    pytest.importorskip("starlette")
    from nodes.backends.servers.http_common import BackgroundServer
    from tests.fake_servers import FakeModelServer
    from tests.faults_common import write_backends_config

    db = f"sqlite:///{tmp_path / 'a.db'}"
    with BackgroundServer(FakeModelServer(latency_s=3).app) as server:  # 9 s a trajectory
        config = write_backends_config(tmp_path / "slow.toml", server.url, timeout_s=60)
        tasks = make_group_tasks([f"prompt {i}" for i in range(8)], 1, seed=0)
        with TrajectoryStore(db) as store:
            run_id = asyncio.run(
                rollout(store, tasks, mode="reflect", backends_config=config, register_only=True)
            ).run_id
        proc = subprocess.Popen(
            [*ATELIER, "worker", run_id, "--concurrency", "4", "--batch", "2", "--lease", "60"],
            env=atelier_env(db, PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with TrajectoryStore(db) as store:
            deadline = time.monotonic() + 60
            while store.count_trajectories(run=run_id, status="running") < 4:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            assert store.claim_counts(run_id).leased == 4  # in flight (none waits: no slot free)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 130
            [line] = err.splitlines()
            assert line.startswith("atelier: interrupted — this worker's claims were released")
            counts = store.claim_counts(run_id)
            assert (counts.unfinished, counts.free, counts.leased) == (8, 8, 0)
            assert store.run(run_id).status == "incomplete"
