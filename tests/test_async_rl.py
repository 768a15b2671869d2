"""Asynchronous GRPO through the store (``training.decisions.async_loop``): the staleness bound.

Interleavings are fixed with events (``before_step`` waits for the sampler's ``on_batch``),
never with sleeps, so every assertion holds however fast either side runs.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from agent_graph.runner import make_group_tasks
from nodes.context import GraphSettings
from nodes.state import Budget
from policies.mode import LearnedModePolicy
from policies.weights import load_policy
from storage.store import TrajectoryStore
from training.decisions.async_loop import AsyncConfig, async_grpo, record_batch
from training.decisions.groups import read_groups
from training.decisions.loop import grpo_iterations
from training.decisions.trainer import GRPOConfig, GRPOTrainer

SETTINGS = GraphSettings(width=128, height=128)
BUDGET = Budget(max_rounds=1)
G = 4
PROMPTS = [
    ["three blue squares", "two red circles above a green star"],
    ["five triangles", "a yellow circle left of a blue square"],
    ["four green stars", "a red square below two circles"],
    ["two purple triangles", "one orange circle"],
]


def _batches(count: int) -> list[list]:
    return [make_group_tasks(PROMPTS[i], G, seed=10 + i) for i in range(count)]


def _trainer(version: str = "0") -> GRPOTrainer:
    policy = LearnedModePolicy(seed=0)
    if version != policy.version:
        policy = policy.clone(version=version)
    return GRPOTrainer(policy, GRPOConfig(seed=0, epochs=2))


def _store(tmp_path) -> TrajectoryStore:
    return TrajectoryStore(f"sqlite:///{tmp_path / 'async.db'}")


def _run(coro):
    return asyncio.run(coro)


def _sampled_versions(store: TrajectoryStore, loop: str) -> dict[str, set[str]]:
    """run id -> the router versions its recorded decisions name."""
    out = {}
    for run in store.runs():
        if (run.config.get("async_loop") or {}).get("name") == loop:
            groups = read_groups(store, run.id, "mode", policy="router")
            out[run.id] = {d.version for g in groups for m in g.members for d in m.decisions}
    return out


def test_k0_trains_only_on_the_current_version_like_the_synchronous_loop(tmp_path):
    store = _store(tmp_path)
    trainer = _trainer()
    cfg = AsyncConfig(max_staleness=0, groups_per_step=2, iterations=3)
    policy, log = _run(
        async_grpo(
            store,
            trainer,
            _batches(3),
            tmp_path / "v",
            cfg,
            group_size=G,
            budget=BUDGET,
            settings=SETTINGS,
        )
    )
    assert [(it.start, it.trained) for it in log] == [
        ("router@0", "router@1"),
        ("router@1", "router@2"),
        ("router@2", "router@3"),
    ]
    for it in log:  # every group trained was sampled by the version being updated
        assert {g.sampled for g in it.used} == {it.start.split("@")[1]}
        assert it.staleness == {0: 2} and it.skipped == []
    # each batch was sampled by one version, each a newer one (the sampler hot-loads them)
    assert sorted(v for vs in _sampled_versions(store, "async").values() for v in vs) == [
        "0",
        "1",
        "2",
    ]
    registered = [v.version for v in store.policy_versions(name="router")]
    assert registered == ["0", "1", "2", "3"]

    # The synchronous loop on the same batches from the same start makes the same weights.
    sync_store = TrajectoryStore(f"sqlite:///{tmp_path / 'sync.db'}")
    sync_policy, sync_log = _run(
        grpo_iterations(sync_store, _trainer(), _batches(3), budget=BUDGET, settings=SETTINGS)
    )
    assert [it.trained for it in sync_log] == [it.trained for it in log]
    for p, q in zip(policy.parameters(), sync_policy.parameters(), strict=True):
        assert torch.allclose(p, q)


def test_k1_with_a_slow_trainer_trains_one_version_behind(tmp_path):
    """The trainer starts step i only once the sampler recorded i + 2 batches: the sampler runs
    one batch ahead (the most K = 1 allows), so from step 1 on every group is one version old."""
    store = _store(tmp_path)
    recorded: list[str] = []
    progress = asyncio.Event()

    def on_batch(run_id: str) -> None:
        recorded.append(run_id)
        progress.set()

    async def before_step(index: int) -> None:
        while len(recorded) < min(index + 2, 4):
            progress.clear()
            await progress.wait()

    cfg = AsyncConfig(max_staleness=1, groups_per_step=2, iterations=3)
    _, log = _run(
        async_grpo(
            store,
            _trainer(),
            _batches(4),
            tmp_path / "v",
            cfg,
            group_size=G,
            budget=BUDGET,
            settings=SETTINGS,
            before_step=before_step,
            on_batch=on_batch,
        )
    )
    assert [it.trained for it in log] == ["router@1", "router@2", "router@3"]
    assert [it.staleness for it in log] == [{0: 2}, {1: 2}, {1: 2}]
    assert [sorted({g.sampled for g in it.used}) for it in log] == [["0"], ["0"], ["1"]]
    # the sampler hot-loaded each version as soon as it was registered: batches 0 and 1 ran
    # before version 1 existed, batch 2 after it, batch 3 after version 2
    versions = _sampled_versions(store, "async")
    assert [versions[run_id] for run_id in recorded] == [{"0"}, {"0"}, {"1"}, {"2"}]
    # every group at most once; the unused last batch stays in the store, untrained
    used = [(g.run_id, g.group_id) for it in log for g in it.used]
    assert len(used) == len(set(used)) == 6
    assert {run for run, _ in used} == set(recorded[:3])
    assert [v.version for v in store.policy_versions(name="router")] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("k", [0, 1])
def test_groups_staler_than_k_are_skipped_and_logged(tmp_path, k):
    """Runs of versions 0 and 1 already in the store; the trainer starts at version 2."""
    store = _store(tmp_path)
    old = {}
    for version, batch in (("0", 2), ("1", 3)):
        policy = LearnedModePolicy(seed=0).clone(version=version)
        tasks = make_group_tasks(PROMPTS[batch], G, seed=20 + batch)
        old[version] = _run(
            record_batch(store, tasks, policy, loop="async", budget=BUDGET, settings=SETTINGS)
        )
    cfg = AsyncConfig(max_staleness=k, groups_per_step=2, iterations=2)
    _, log = _run(
        async_grpo(
            store,
            _trainer("2"),
            _batches(1),
            tmp_path / "v",
            cfg,
            group_size=G,
            budget=BUDGET,
            settings=SETTINGS,
        )
    )
    first = log[0]
    skipped = {(g.run_id, g.sampled, g.staleness) for g in first.skipped}
    if k == 0:  # only the sampler's own batch (version 2) is trained; both old runs skipped
        assert skipped == {(old["0"], "0", 2), (old["1"], "1", 1)}
        assert [it.staleness for it in log] == [{0: 2}]
        assert {g.sampled for g in first.used} == {"2"}
    else:  # version 1 is one behind: used; version 0 is two behind: skipped
        assert skipped == {(old["0"], "0", 2)}
        assert {(g.run_id, g.sampled) for g in first.used} == {(old["1"], "1")}
        # then the sampler's batch, sampled by 2 and trained on by 3
        assert [it.staleness for it in log] == [{1: 2}, {1: 2}]
        assert {g.sampled for g in log[1].used} == {"2"}
    assert len(first.skipped) == 2 * (2 - k)  # two groups per skipped run
    # the skips are in the registered version's metadata, not just in memory
    (info,) = store.policy_versions(name="router", version="3")
    assert len(info.metadata["skipped_stale"]) == len(first.skipped)
    assert all(g.staleness <= k for it in log for g in it.used)
    used = [(g.run_id, g.group_id) for it in log for g in it.used]
    assert len(used) == len(set(used))


def test_versions_are_registered_in_order_and_never_overwritten(tmp_path):
    store = _store(tmp_path)
    cfg = AsyncConfig(max_staleness=1, groups_per_step=2, iterations=2)
    _run(
        async_grpo(
            store,
            _trainer(),
            _batches(2),
            tmp_path / "v",
            cfg,
            group_size=G,
            budget=BUDGET,
            settings=SETTINGS,
        )
    )
    infos = store.policy_versions(name="router")
    assert [v.version for v in infos] == ["0", "1", "2"]
    assert [v.metadata["async_iteration"] for v in infos] == [-1, 0, 1]
    assert load_policy(infos[-1].path).version == "2"
    # a second loop from the same start would overwrite router@0: refused before any rollout
    with pytest.raises(ValueError, match="never overwritten"):
        _run(async_grpo(store, _trainer(), _batches(1), tmp_path / "w", cfg, group_size=G))
    assert [v.version for v in store.policy_versions(name="router")] == ["0", "1", "2"]
    assert len(store.runs()) == 2


def test_cli_max_staleness(tmp_path):
    from tests.cli_helpers import run_atelier

    db = tmp_path / "cli.db"
    args = ("train", "--world", "shapeworld", "--iterations", "2", "--per-category", "1")
    done = run_atelier(
        *args, "-G", "4", "--max-staleness", "1", "--out", "v", db=db, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = [
        line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == 3 and "router@1" in rows[2]  # header + one row per version
    store = TrajectoryStore(f"sqlite:///{db}")
    assert [v.version for v in store.policy_versions(name="router")] == ["0", "1", "2"]
    assert (tmp_path / "v" / "router-2" / "config.json").exists()
    refused = run_atelier(
        *args, "--policy", "stop", "--max-staleness", "1", db=db, cwd=tmp_path, timeout=300
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("atelier: error: --max-staleness")
