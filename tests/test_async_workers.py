"""Asynchronous GRPO across processes (``training.online_async``, ``agent_graph.loops``,
``agent_graph.workers.follow_loop``): ``atelier train --config FILE --max-staleness K --workers``
registers each iteration's run naming the newest version, ``atelier worker LOOP`` processes
sample them, and the trainer trains on complete runs at most K versions old.

Everything here is real processes: the trainer and the workers are ``atelier`` commands.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from agent_graph.loops import batch_runs, is_loop_run, loop_of, open_loop
from storage.store import TrajectoryStore
from tests.cli_helpers import ATELIER, atelier_env, run_atelier
from tests.test_cli_rollout import _sigint_as_in_a_terminal
from tests.test_rollout_workers import held_with_steps
from training.decisions.groups import read_groups

pytest_plugins = ("tests.tiny_models",)
pytestmark = pytest.mark.slow  # processes: make test-fast skips these

ROOT = Path(__file__).resolve().parents[1]
SHAPEWORLD = ROOT / "examples" / "configs" / "shapeworld.toml"
ROUTER = ("--config", str(SHAPEWORLD), "--policy", "router", "--per-category", "1", "-G", "3")


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left() -> Any:
    """A failed test leaves no trainer waiting for workers, nor a worker for its loop."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _start(*args: str, db: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*ATELIER, *args, "--db", db],
        env={**atelier_env(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,  # Ctrl-C reaches it even if pytest runs in `&`
    )
    _started.append(proc)
    return proc


def _trainer(db: str, *args: str) -> tuple[subprocess.Popen, str]:
    """Start an asynchronous ``atelier train ... --workers``; (process, the loop's name) once
    the loop is recorded (its first line names the worker command)."""
    proc = _start("train", *args, "--workers", db=db)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"`atelier worker (\S+) --db", line)
    assert found, (line, proc.stderr.read() if proc.stderr else "")
    return proc, found[1]


def _worker(db: str, loop: str, name: str, lease: float = 30.0) -> subprocess.Popen:
    options = ("--worker-id", name, "--batch", "2", "--concurrency", "4", "--lease", str(lease))
    return _start("worker", loop, *options, db=db)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "atelier: error" not in err, err
    return out


def _k1_with_two_workers(db: str, args: tuple[str, ...]) -> str:
    """``atelier train ARGS --max-staleness 1 --workers`` with two workers, to the end; the
    loop's name."""
    trainer, loop_name = _trainer(db, *args, "--max-staleness", "1")
    workers = [_worker(db, loop_name, name) for name in ("w1", "w2")]
    _finish(trainer, timeout=600)
    assert all("the loop is finished" in _finish(w, timeout=120) for w in workers)
    return loop_name


def _loop(store: TrajectoryStore, name: str) -> Any:
    (loop,) = [run for run in store.runs() if is_loop_run(run) and run.name == name]
    return loop


def _weights(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    (file,) = Path(path).glob("*.safetensors")
    return load_file(str(file))


def test_k0_with_two_workers_equals_the_synchronous_loop(tmp_path):
    """K = 0 through two worker processes trains the same router versions, weight for weight,
    as the synchronous loop sampling in its own process; each run sampled by the version it
    names, a new one each iteration."""
    db = f"sqlite:///{tmp_path / 'async.db'}"
    loop_args = (*ROUTER, "--iterations", "3", "--out", str(tmp_path / "a"), "--loop", "al")
    trainer, loop_name = _trainer(db, *loop_args, "--max-staleness", "0")
    assert loop_name == "al"
    workers = [_worker(db, loop_name, name) for name in ("w1", "w2")]
    out = _finish(trainer)
    outputs = [_finish(w) for w in workers]
    assert all("the loop is finished" in o for o in outputs)
    assert out.count("staleness 0") == 3
    sampled = sum(int(re.search(r": (\d+) trajectories", o)[1]) for o in outputs)
    assert sampled == 3 * 9 * 3  # every trajectory once, by one of the two

    sync_db = f"sqlite:///{tmp_path / 'sync.db'}"
    sync_args = (*ROUTER, "--iterations", "3", "--out", str(tmp_path / "s"), "--loop", "sl")
    done = run_atelier("train", *sync_args, db=sync_db, timeout=300)
    assert done.returncode == 0, done.stderr

    store, sync = TrajectoryStore(db), TrajectoryStore(sync_db)
    trained = {v.version: v for v in store.policy_versions(name="router")}
    expected = {v.version: v for v in sync.policy_versions(name="router")}
    assert sorted(trained) == sorted(expected) == ["0", "1", "2", "3"]
    for version in ("1", "2", "3"):
        a, b = _weights(trained[version].path), _weights(expected[version].path)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].equal(b[key]), (version, key)
        assert trained[version].metadata["staleness"] == 0
    start, first = _weights(trained["0"].path), _weights(trained["1"].path)
    assert any(not start[key].equal(first[key]) for key in start)  # it did train
    loop = _loop(store, "al")
    assert loop.status == "finished"
    runs = batch_runs(store, loop)
    assert [loop_of(r)["behaviour"] for r in runs] == ["router@0", "router@1", "router@2"]
    for run in runs:  # sampled by the version it names, and by nothing else
        groups = read_groups(store, run.id, "mode", policy="router")
        recorded = {d.version for g in groups for m in g.members for d in m.decisions}
        assert recorded == {loop_of(run)["behaviour"].split("@")[1]}
        assert run.status == "finished"
    with store.db.read() as conn:
        holders = Counter(conn.execute(text("SELECT claimed_by FROM trajectories")).scalars())
    assert set(holders) <= {"w1", "w2"} and sum(holders.values()) == sampled
    store.close()
    sync.close()


@pytest.mark.postgres
def test_k1_with_a_worker_killed_mid_loop_on_postgresql(pg_server, tmp_path):
    """Three workers on one PostgreSQL store; one frozen while it holds started trajectories,
    then SIGKILLed: the others finish them once its leases pass; the trainer never trains on a
    run more than K = 1 versions old, and each run at most once."""
    db = pg_server.create_database()
    args = (*ROUTER, "--iterations", "4", "--out", str(tmp_path / "v"), "--loop", "pgl")
    trainer, loop_name = _trainer(db, *args, "--max-rounds", "2", "--max-staleness", "1")
    store = TrajectoryStore(db)
    victim = _worker(db, loop_name, "victim", lease=2.0)
    held: dict[str, int] = {}

    def freeze_then_kill() -> None:
        deadline = time.monotonic() + 90
        while victim.poll() is None and time.monotonic() < deadline:
            # freeze the victim while it holds trajectories it has recorded steps of
            if held_with_steps(store, "victim"):
                victim.send_signal(signal.SIGSTOP)
                if found := held_with_steps(store, "victim"):
                    held.update(found)
                    break
                victim.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=freeze_then_kill)
    killer.start()
    others = [_worker(db, loop_name, name, lease=2.0) for name in ("a", "b")]
    out = _finish(trainer)
    killer.join(timeout=60)
    victim.wait(timeout=30)
    assert all("the loop is finished" in _finish(w) for w in others)
    assert held, "the victim was never frozen holding a started trajectory"

    versions = [v for v in store.policy_versions(name="router") if v.version != "0"]
    assert [v.version for v in versions] == ["1", "2", "3", "4"][: len(versions)]
    assert len(versions) >= 3  # a step short only when a delayed run was skipped as stale
    trained_runs = [v.metadata["run"] for v in versions]
    assert len(trained_runs) == len(set(trained_runs))
    assert all(v.metadata["staleness"] <= 1 for v in versions)
    skipped = [s for v in versions for s in v.metadata["skipped_stale"]]
    assert all(staleness > 1 for _, _, staleness in skipped)
    assert not set(trained_runs) & {run for run, _, _ in skipped}
    assert out.count("staleness ") == len(versions)
    loop = _loop(store, loop_name)
    assert loop.status == "finished"
    with store.db.read() as conn:
        holders = dict(conn.execute(text("SELECT id, claimed_by FROM trajectories")).all())
    for tid, recorded in held.items():  # taken over and continued from the victim's steps
        assert holders[tid] in ("a", "b")
        assert len(store.steps(tid)) > recorded
    for run_id in trained_runs:  # what was trained on: every trajectory finished once
        for summary in store.trajectories(run=run_id, limit=None):
            assert summary.status == "succeeded"
            seqs = [s.seq for s in store.steps(summary.id)]
            assert seqs == list(range(len(seqs)))
    store.close()


def test_wrong_input_and_an_interrupted_trainer(tmp_path):
    db = f"sqlite:///{tmp_path / 'w.db'}"
    for args, message in (
        (("--world", "shapeworld", "--workers"), "give --config FILE"),
        ((*ROUTER, "--workers"), "give --max-staleness K too"),
        ((*ROUTER, "--max-staleness", "1"), "add --workers"),
        ((*ROUTER, "--max-staleness", "-1", "--workers"), "must be >= 0"),
        ((*ROUTER, "--max-staleness", "1", "--workers", "--resume"), "neither resumes"),
    ):
        wrong = run_atelier("train", *args, db=db)
        assert wrong.returncode == 2, (args, wrong.stderr)
        assert wrong.stderr.startswith("atelier: error: ") and message in wrong.stderr, args
        assert len(wrong.stderr.splitlines()) == 1

    # No worker comes: the trainer waits; Ctrl-C ends the loop, and a worker started after
    # that is told there is nothing to sample.
    args = (*ROUTER, "--iterations", "2", "--out", str(tmp_path / "v"), "--loop", "stopped")
    trainer, loop_name = _trainer(db, *args, "--max-staleness", "1")
    time.sleep(1.0)
    trainer.send_signal(signal.SIGINT)
    _, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    with TrajectoryStore(db) as store:
        assert _loop(store, loop_name).status == "interrupted"
    late = run_atelier("worker", loop_name, db=db)
    assert late.returncode == 2
    assert late.stderr.startswith("atelier: error: training loop stopped")
    assert "is interrupted" in late.stderr and len(late.stderr.splitlines()) == 1
    # The loop's name is taken: a second loop of that name is refused.
    again = run_atelier("train", *args, "--max-staleness", "1", "--workers", db=db)
    assert again.returncode == 2 and "does not resume" in again.stderr

    # A loop whose trainer died without ending it (SIGKILL): --idle-timeout lets workers leave.
    with TrajectoryStore(db) as store:
        open_loop(store, "orphan", {})
    idle = run_atelier("worker", "orphan", "--idle-timeout", "0.5", db=db, timeout=60)
    assert idle.returncode == 0, idle.stderr
    assert "0 trajectories in 0 runs" in idle.stdout
    assert "left after 0.5 s with nothing to sample" in idle.stdout
    for args, message in (
        (("worker", "orphan", "--idle-timeout", "0"), "--idle-timeout must be a positive"),
        (("worker", f"{loop_name}/0", "--idle-timeout", "5"), "applies to following"),
        (("rollout", "--register-only", "--keep-groups-together"), "--keep-groups-together"),
    ):
        wrong = run_atelier(*args, db=db)
        assert wrong.returncode == 2, (args, wrong.stderr)
        assert wrong.stderr.startswith("atelier: error: ") and message in wrong.stderr, args
        assert len(wrong.stderr.splitlines()) == 1


@pytest.mark.models
def test_a_text_lora_loop_hot_loads_each_version_on_every_replica(
    text_lm_replicas, tiny_models, tmp_path
):
    """The decomposer's LoRA on two ``atelier serve lm`` replicas (the tiny text LM): the
    trainer registers each run with the newest adapter version, the workers load it on both
    replicas as they start the run, and every decomposition of a run is requested from that
    version; a run sampled by the version being updated recomputes to ratio 1."""
    from tests.test_train_loop_served import LORA, PROMPTS, _backends

    servers, services = text_lm_replicas
    config = _backends(tmp_path, servers)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    db = f"sqlite:///{tmp_path / 'text.db'}"
    args = (
        *("--config", str(config), "--model", str(tiny_models.lm)),
        *("--prompts", str(tmp_path / "prompts.txt"), "--policy", "decompose"),
        *("--mode", "decompose", "--iterations", "3", "-G", "3", "--max-rounds", "1"),
        *("--loop", "text-async", "--out", str(tmp_path / "v"), *LORA),
    )
    loop_name = _k1_with_two_workers(db, args)
    store = TrajectoryStore(db)
    versions = store.policy_versions(name="decompose")
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert all(v.metadata["staleness"] <= 1 for v in versions)
    # Runs 0 and 1 are registered at once with the base model (K = 1 allows one run ahead):
    # step 1 trains on base samples, one version stale, checked under the base model's weights.
    assert versions[1].metadata["behaviour"] == "base"
    assert versions[1].metadata["staleness"] == 1
    for version in versions:
        if version.metadata["staleness"] == 0:  # sampled by the weights being updated
            assert version.metadata["first_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    for run in batch_runs(store, _loop(store, loop_name)):
        behaviour = loop_of(run)["behaviour"]
        models = Counter(
            g.model
            for t in store.trajectories(run=run.id, limit=None)
            for step in store.trajectory(t.id).steps
            if step.node == "decompose"
            for g in step.generations
        )
        assert set(models) == {"tiny-lm" if behaviour == "base" else behaviour}, run.name
    paths = {f"decompose@{v.version}": v.path for v in versions}
    sampled = {loop_of(r)["behaviour"] for r in batch_runs(store, _loop(store, loop_name))}
    for service in services:  # each version a run named was loaded on both replicas
        for label in sampled - {"base"}:
            assert service.engine.adapters.get(label) == paths[label]
    store.close()


@pytest.mark.models
def test_a_flow_lora_loop_draws_each_run_with_the_version_it_names(tiny_sd3, tmp_path):
    """The draw policy's diffusion LoRA (Flow-GRPO) on an in-process tiny SD3 in each worker:
    each worker loads the version a run names into its own flow model when it starts the run;
    every transition of a run names that version (or the base model); a step trained on the
    version being updated recomputes the sampler's log-probs (ratio 1)."""
    from storage.diffusion import load_transitions
    from tests.test_train_loop_image import FLOW, PROMPTS, _loop_config

    config = _loop_config(tmp_path, tiny_sd3)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    db = f"sqlite:///{tmp_path / 'flow.db'}"
    args = (
        *("--config", str(config), "--policy", "draw", "--model", str(tiny_sd3)),
        *("--prompts", str(tmp_path / "prompts.txt"), "--mode", "direct", "--seed", "0"),
        *("--iterations", "3", "-G", "3", "--max-rounds", "1", "--loop", "flow-async"),
        *("--out", str(tmp_path / "v"), *FLOW),
    )
    loop_name = _k1_with_two_workers(db, args)
    store = TrajectoryStore(db)
    versions = store.policy_versions(name="draw")
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert [v.metadata["staleness"] for v in versions][:2] == [0, 1]  # run 1 drawn by base
    for version in versions:
        assert version.metadata["loop_kind"] == "diffusion-lora"
        if version.metadata["staleness"] == 0:
            assert version.metadata["first_max_abs_log_ratio"] < 1e-4
        else:  # drawn by an older version: the ratio is off-policy, not 1
            assert version.metadata["first_max_abs_log_ratio"] > 1e-4
    for run in batch_runs(store, _loop(store, loop_name)):
        behaviour = loop_of(run)["behaviour"]
        ids = [t.id for t in store.trajectories(run=run.id, limit=None)]
        loras = Counter(s.transition.lora for s in load_transitions(store.db, trajectory_ids=ids))
        assert set(loras) == {None if behaviour == "base" else behaviour}, run.name
        assert sum(loras.values()) == len(PROMPTS) * 3
    store.close()
