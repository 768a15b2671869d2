"""Asynchronous GRPO across processes: a trainer registers batches in the store, ``atelier
worker LOOP`` processes sample them with the newest version, and the trainer consumes complete
groups at most K versions old (``AsyncConfig.workers``, ``agent_graph.loops``,
``agent_graph.workers.follow_loop``).

The trainer runs in the test's process; the workers are real ``atelier worker`` processes,
started once the loop is recorded (``on_loop``).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import text

from agent_graph.loops import batch_runs, is_loop_run, loop_of
from agent_graph.runner import make_group_tasks
from nodes.state import Budget
from policies.mode import LearnedModePolicy
from storage.store import TrajectoryStore
from tests.cli_helpers import ATELIER, atelier_env, run_atelier
from tests.test_rollout_workers import held_with_steps
from training.decisions.async_loop import AsyncConfig, async_grpo
from training.decisions.groups import read_groups
from training.decisions.trainer import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.slow  # worker processes: make test-fast skips these

ROOT = Path(__file__).resolve().parents[1]
BUDGET = Budget(max_rounds=1)
G = 4
PROMPTS = [
    ["three blue squares", "two red circles above a green star"],
    ["five triangles", "a yellow circle left of a blue square"],
    ["four green stars", "a red square below two circles"],
    ["two purple triangles", "one orange circle"],
]


def _batches(count: int, per_batch: int = 2) -> list[list]:
    return [make_group_tasks(PROMPTS[i][:per_batch], G, seed=10 + i) for i in range(count)]


def _trainer() -> GRPOTrainer:
    return GRPOTrainer(LearnedModePolicy(seed=0), GRPOConfig(seed=0, epochs=2))


def _worker(url: str, loop: str, name: str, lease: float = 30.0) -> subprocess.Popen:
    command = [*ATELIER, "worker", loop, "--db", url, "--worker-id", name]
    command += ["--batch", "2", "--concurrency", "4", "--lease", str(lease)]
    return subprocess.Popen(
        command,
        env={**atelier_env(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _loop(store: TrajectoryStore, name: str):  # -> RunInfo
    (loop,) = [run for run in store.runs() if is_loop_run(run) and run.name == name]
    return loop


def _run_versions(store: TrajectoryStore, loop) -> dict[str, tuple[str, set[str]]]:
    """batch run id -> (the version its config names, the versions its decisions record)."""
    out = {}
    for run in batch_runs(store, loop):
        groups = read_groups(store, run.id, "mode", policy="router")
        recorded = {d.version for g in groups for m in g.members for d in m.decisions}
        out[run.id] = (loop_of(run)["behaviour"].split("@")[1], recorded)
    return out


def test_k0_through_two_worker_processes_equals_the_in_process_loop(tmp_path):
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    store = TrajectoryStore(url)
    workers: list[subprocess.Popen] = []

    def start_workers(loop) -> None:
        assert loop.status == "running" and store.run(loop.id).trajectory_count == 0
        workers.extend(_worker(url, loop.name, name) for name in ("w1", "w2"))

    cfg = AsyncConfig(max_staleness=0, groups_per_step=2, iterations=3, workers=True, poll_s=0.1)
    policy, log = asyncio.run(
        async_grpo(
            store,
            _trainer(),
            _batches(3),
            tmp_path / "v",
            cfg,
            group_size=G,
            budget=BUDGET,
            on_loop=start_workers,
        )
    )
    outputs = [proc.communicate(timeout=120) for proc in workers]
    for proc, (out, err) in zip(workers, outputs, strict=True):
        assert proc.returncode == 0 and err == "", err
        assert "the loop is finished" in out
    done = sum(int(re.search(r": (\d+) trajectories", out)[1]) for out, _ in outputs)
    assert done == 3 * 2 * G  # every trajectory sampled once, by one of the two

    assert [(it.start, it.trained) for it in log] == [
        ("router@0", "router@1"),
        ("router@1", "router@2"),
        ("router@2", "router@3"),
    ]
    assert all(it.staleness == {0: 2} and not it.skipped for it in log)
    loop = _loop(store, cfg.name)
    assert loop.status == "finished"
    # each batch run sampled by exactly the version it named, a newer one each batch
    versions = _run_versions(store, loop)
    assert sorted(named for named, _ in versions.values()) == ["0", "1", "2"]
    assert all(recorded == {named} for named, recorded in versions.values())
    assert all(run.status == "finished" for run in batch_runs(store, loop))

    # The same loop sampled in this process (same batches, same start): the same weights.
    local_store = TrajectoryStore(f"sqlite:///{tmp_path / 'local.db'}")
    local = AsyncConfig(max_staleness=0, groups_per_step=2, iterations=3)
    local_policy, _ = asyncio.run(
        async_grpo(
            local_store, _trainer(), _batches(3), tmp_path / "l", local, group_size=G, budget=BUDGET
        )
    )
    for p, q in zip(policy.parameters(), local_policy.parameters(), strict=True):
        assert torch.allclose(p, q)
    assert not any(
        p.equal(q)
        for p, q in zip(policy.parameters(), LearnedModePolicy(seed=0).parameters(), strict=True)
    )
    store.close()
    local_store.close()


@pytest.mark.postgres
def test_k1_with_a_worker_killed_mid_loop_on_postgresql(pg_server, tmp_path):
    """Three workers on one PostgreSQL store; one frozen while it holds started trajectories,
    then SIGKILLed: the other two finish them once its leases pass, the trainer trains on every
    group exactly once and never on one more than K = 1 versions old."""
    url = pg_server.create_database()
    store = TrajectoryStore(url)
    procs: dict[str, subprocess.Popen] = {}
    killed: dict[str, int] = {}
    killer = threading.Thread(target=lambda: freeze_then_kill())

    def start_workers(loop) -> None:
        procs.update({name: _worker(url, loop.name, name, lease=2.0) for name in ("a", "b")})
        procs["victim"] = _worker(url, loop.name, "victim", lease=2.0)
        killer.start()

    def freeze_then_kill() -> None:
        victim, deadline = procs["victim"], time.monotonic() + 90
        while victim.poll() is None and time.monotonic() < deadline:
            # freeze the victim while it holds trajectories it has recorded steps of
            if held_with_steps(store, "victim"):
                victim.send_signal(signal.SIGSTOP)
                if held := held_with_steps(store, "victim"):
                    killed.update(held)
                    break
                victim.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)

    cfg = AsyncConfig(max_staleness=1, groups_per_step=2, iterations=4, workers=True, poll_s=0.1)
    batches = [
        make_group_tasks(
            PROMPTS[i % 4],
            G,
            seed=20 + i,
        )
        for i in range(4)
    ]
    _, log = asyncio.run(
        async_grpo(
            store,
            _trainer(),
            batches,
            tmp_path / "v",
            cfg,
            group_size=G,
            budget=Budget(max_rounds=2),
            on_loop=start_workers,
        )
    )
    killer.join(timeout=60)
    procs["victim"].wait(timeout=30)
    for name in ("a", "b"):
        out, err = procs[name].communicate(timeout=120)
        assert procs[name].returncode == 0 and err == "", err
        assert "the loop is finished" in out

    assert killed, "the victim was never killed mid-way"
    # one version a step; a step short when skipped groups left too few for the last one
    assert [it.trained for it in log] == [f"router@{i + 1}" for i in range(len(log))]
    assert len(log) >= 3
    used = [(g.run_id, g.group_id) for it in log for g in it.used]
    skipped = [(g.run_id, g.group_id) for it in log for g in it.skipped]
    assert len(used) + len(skipped) == len(set(used) | set(skipped))  # each group once
    assert all(g.staleness <= 1 for it in log for g in it.used)
    # A batch the victim held finishes late, after newer batches: its groups may be staler
    # than K by then, and are skipped, never trained on.
    assert all(g.staleness > 1 for it in log for g in it.skipped)
    assert len(used) + len(skipped) <= 2 * len(batches)
    loop = _loop(store, cfg.name)
    assert loop.status == "finished"
    with store.db.read() as conn:
        holders = dict(conn.execute(text("SELECT id, claimed_by FROM trajectories")).all())
    for tid, recorded in killed.items():  # taken over and continued from the victim's steps
        assert holders[tid] in ("a", "b")
        assert len(store.steps(tid)) > recorded
        assert store.trajectory(tid).status == "succeeded"
    for run_id, group_id in used:  # what was trained on: all G members finished, steps 0..n-1
        members = store.groups(run=run_id)[group_id]
        assert len(members) == G and all(m.status == "succeeded" for m in members)
        for member in members:
            assert [s.seq for s in store.steps(member.id)] == list(
                range(len(store.steps(member.id)))
            )
    versions = _run_versions(store, loop)
    assert all(recorded <= {named} for named, recorded in versions.values())
    store.close()


def test_cli_trainer_and_worker_processes_and_wrong_input(tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    trainer = subprocess.Popen(
        [
            *ATELIER,
            "train",
            "--world",
            "shapeworld",
            "--policy",
            "router",
            "--max-staleness",
            "1",
            "--workers",
            "--iterations",
            "2",
            "--per-category",
            "1",
            "-G",
            "3",
            "--out",
            str(tmp_path / "versions"),
        ],
        env={**atelier_env(db), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert trainer.stdout is not None
    announced = trainer.stdout.readline()
    loop = re.search(r"`atelier worker (\S+) --db", announced)
    assert loop, announced
    worker = run_atelier("worker", loop[1], db=db, timeout=240)
    out, err = trainer.communicate(timeout=240)
    assert trainer.returncode == 0 and "error" not in err and "Traceback" not in err, err
    assert worker.returncode == 0, worker.stderr
    assert "the loop is finished" in worker.stdout
    assert re.search(r": 54 trajectories in 2 runs, 54 succeeded", worker.stdout), worker.stdout
    assert "final policy router@2" in out + err

    # wrong input: one error line, exit 2
    again = run_atelier("worker", loop[1], db=db)
    assert again.returncode == 2
    assert (
        again.stderr.startswith("atelier: error: training loop ") and "is finished" in again.stderr
    )
    assert len(again.stderr.splitlines()) == 1
    lone = run_atelier("train", "--world", "shapeworld", "--workers", db=db)
    assert lone.returncode == 2 and "give --max-staleness" in lone.stderr
    assert len(lone.stderr.splitlines()) == 1


def test_an_interrupted_trainer_ends_its_loop_and_its_workers_leave(tmp_path):
    url = f"sqlite:///{tmp_path / 'stop.db'}"
    store = TrajectoryStore(url)
    workers: list[subprocess.Popen] = []
    cfg = AsyncConfig(max_staleness=0, groups_per_step=2, iterations=3, workers=True, poll_s=0.1)

    async def main() -> None:
        task = asyncio.create_task(
            async_grpo(
                store,
                _trainer(),
                _batches(3),
                tmp_path / "v",
                cfg,
                group_size=G,
                budget=BUDGET,
                on_loop=lambda loop: workers.append(_worker(url, loop.name, "w")),
                before_step=lambda index: asyncio.sleep(0 if index == 0 else 3600),
            )
        )
        while len(store.policy_versions(name="router")) < 2:  # step 0 done, step 1 waiting
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _loop(store, cfg.name).status == "interrupted"
    out, err = workers[0].communicate(timeout=60)
    assert workers[0].returncode == 0 and err == "", err
    assert "the loop is interrupted" in out
    store.close()
