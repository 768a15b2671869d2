"""Decision groups read back from recorded ShapeWorld runs."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import pytest

from agent_graph.runner import make_group_tasks
from nodes.state import Budget
from policies.base import ModeObservation, StopObservation
from policies.simple import UniformModePolicy, UniformStopPolicy
from storage.store import TrajectoryStore
from training.decisions.groups import read_groups
from training.decisions.sampling import collect

PROMPTS = ["a red circle", "four blue squares", "two red circles above three green triangles"]


class Spy:
    """Wraps a policy and keeps every observation it was shown."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.version = inner.name, inner.version
        self.seen: list = []

    def choose_mode(self, obs: ModeObservation, rng: random.Random):
        self.seen.append(obs)
        return self.inner.choose_mode(obs, rng)

    def choose_stop(self, obs: StopObservation, rng: random.Random):
        self.seen.append(obs)
        return self.inner.choose_stop(obs, rng)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('groups') / 't.db'}")
    router, stop_policy = Spy(UniformModePolicy()), Spy(UniformStopPolicy(0.5))
    tasks = make_group_tasks(PROMPTS, 6, seed=4)
    run_id, results = asyncio.run(
        collect(
            store, tasks, mode_policy=router, stop_policy=stop_policy, budget=Budget(max_rounds=2)
        )
    )
    return store, run_id, results, router, stop_policy


def test_mode_groups_carry_the_stored_decisions_and_rewards(recorded):
    store, run_id, results, router, _ = recorded
    groups = read_groups(store, run_id, "mode")
    assert len(groups) == 3 and all(len(g.members) == 6 for g in groups)
    by_id = {r.trajectory_id: r for r in results}
    for group in groups:
        assert group.prompt in PROMPTS and group.kind == "mode"
        for member in group.members:
            (decision,) = member.decisions
            result = by_id[member.trajectory_id]
            assert decision.action == result.mode == member.mode
            assert decision.log_prob == pytest.approx(math.log(1 / 3), abs=1e-15)
            assert (decision.policy, decision.version) == ("uniform-mode", "1")
            assert decision.observation == ModeObservation(group.prompt)
            assert member.rewards["checker"] == result.score
            assert member.image_count == result.image_count
    seen = Counter(router.seen)
    assert Counter(m.decisions[0].observation for g in groups for m in g.members) == seen


def test_stop_observations_are_rebuilt_exactly_as_the_policy_saw_them(recorded):
    store, run_id, _, _, stop_policy = recorded
    groups = read_groups(store, run_id, "stop")
    rebuilt = [d.observation for g in groups for m in g.members for d in m.decisions]
    assert len(rebuilt) == len(stop_policy.seen) > 0
    assert Counter(rebuilt) == Counter(stop_policy.seen)
    for group in groups:
        for member in group.members:
            for d in member.decisions:
                assert d.log_prob == pytest.approx(math.log(0.5), abs=1e-15)
                assert d.action in ("stop", "continue")
    # direct trajectories took no stop decision but still count in their group's baseline
    direct = [m for g in groups for m in g.members if m.mode == "direct"]
    assert direct and all(m.decisions == () for m in direct)


def test_filters_by_policy_version_status_and_size(recorded):
    store, run_id, _, _, _ = recorded
    assert read_groups(store, run_id, "mode", policy="router") == []
    assert read_groups(store, run_id, "mode", policy="uniform-mode", version="2") == []
    assert len(read_groups(store, run_id, "mode", policy="uniform-mode", version="1")) == 3
    assert read_groups(store, run_id, "mode", status="failed") == []
    assert read_groups(store, run_id, "mode", min_size=7) == []
    assert len(read_groups(store, [run_id, run_id], "mode")) == 6


def test_a_fixed_escalate_mode_gives_no_router_groups_but_its_stop_decisions_count(tmp_path):
    """``escalate`` is a fixed mode no learned router can take: its mode decisions are not
    training data for the router (they would index outside its actions); the stop decisions
    of the same run are the stop policy's, and are read."""
    from agent_graph.presets import shapeworld_context, shapeworld_tasks
    from agent_graph.rollout import rollout

    store = TrajectoryStore(f"sqlite:///{tmp_path}/esc.db")
    done = asyncio.run(
        rollout(store, shapeworld_tasks(1, group_size=3), context=shapeworld_context("escalate"))
    )
    detail = store.trajectory(done.results[0].trajectory_id)
    kinds = [d["kind"] for s in detail.steps for d in s.update.get("decisions") or ()]
    assert "mode" in kinds  # the escalate decision is recorded...
    assert read_groups(store, done.run_id, "mode") == []  # ...but is no router data
    assert read_groups(store, done.run_id, "stop")
    store.close()
