"""Tree-RL (R3): start-state selection, forks from stored states, per-fork-point stage groups
with R3's stage rewards, and stage-wise training of the stop policy."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from agent_graph.runner import make_group_tasks
from nodes.backends.shapeworld import fixed_prompt_set
from nodes.context import GraphSettings
from nodes.state import Budget
from policies.base import StopObservation
from policies.simple import UniformStopPolicy
from policies.stop import LearnedStopPolicy
from storage.store import TrajectoryStore
from training.decisions.groups import stop_observation
from training.decisions.sampling import collect
from training.decisions.trainer import GRPOConfig, GRPOTrainer
from training.rewards import correction
from training.tree import (
    StartState,
    fork,
    member_stage_rewards,
    read_stage_groups,
    reflect_refine_rewards,
    select_start_states,
    stage_config,
    stage_start_states,
    tree_iterations,
)

SETTINGS = GraphSettings(width=128, height=128)


def _start(name: str, score: float) -> StartState:
    return StartState(name, 1, "draw", "reason", {}, score, 0)


# --- selection ------------------------------------------------------------------------------


def test_selection_takes_the_perfect_share_exactly():
    pool = [_start(f"p{i}", 1.0) for i in range(3)] + [_start(f"i{i}", 0.5) for i in range(5)]
    for share, expected in ((0.15, 30), (0.0, 0), (0.5, 100), (1.0, 200)):
        chosen = select_start_states(pool, 200, perfect_share=share, seed=1)
        assert len(chosen) == 200
        assert sum(s.perfect for s in chosen) == expected
    # One pool empty: every draw comes from the other.
    imperfect_only = [s for s in pool if not s.perfect]
    assert not any(s.perfect for s in select_start_states(imperfect_only, 50, perfect_share=0.15))
    perfect_only = [s for s in pool if s.perfect]
    assert all(s.perfect for s in select_start_states(perfect_only, 50, perfect_share=0.15))


def test_selection_weights_imperfect_states_by_room_to_improve():
    # Weights 1 − V̂ = 1, 0.5, 0.25 (and 0 for V̂ = 0.999… just below perfect is ~0):
    # P = 4/7, 2/7, 1/7 among the imperfect draws.
    pool = [_start("a", 0.0), _start("b", 0.5), _start("c", 0.75), _start("p", 1.0)]
    n = 20_000
    chosen = select_start_states(pool, n, perfect_share=0.15, seed=7)
    counts = Counter(s.trajectory_id for s in chosen)
    assert counts["p"] == 3000
    imperfect = n - 3000
    for name, p in (("a", 4 / 7), ("b", 2 / 7), ("c", 1 / 7)):
        share = counts[name] / imperfect
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / imperfect), (name, share, p)
    # The perfect pool is drawn uniformly.
    perfect = [_start(f"p{i}", 1.0) for i in range(4)] + [_start("x", 0.2)]
    counts = Counter(s.trajectory_id for s in select_start_states(perfect, 8000, perfect_share=0.5))
    for i in range(4):
        assert abs(counts[f"p{i}"] / 4000 - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)


def test_selection_is_seeded():
    pool = [_start(f"s{i}", i / 10) for i in range(11)]
    first = select_start_states(pool, 40, seed=3)
    assert first == select_start_states(pool, 40, seed=3)
    assert first != select_start_states(pool, 40, seed=4)
    with pytest.raises(ValueError):
        select_start_states(pool, 5, perfect_share=1.5)
    with pytest.raises(ValueError):
        select_start_states([], 5)


# --- stage rewards (hand-computed) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("v_prev", "v_new", "stopped", "r_format", "c", "reflection"),
    [
        (0.5, 0.75, False, 1.0, 0.25, 1.25),  # improved: C = V − V̂
        (0.75, 0.5, False, 1.0, -0.25, 0.75),  # the edit made it worse
        (0.6, None, True, 1.0, 0.0, 1.0),  # stopped on a flawed image: V = V̂, C = 0
        (1.0, None, True, 1.0, 1.0, 2.0),  # stopped on a perfect image: C = 1
        (1.0, 1.0, False, 0.0, 0.0, 0.0),  # went on from a perfect image: C = 0
        (1.0, 0.5, False, 1.0, 0.0, 1.0),  # ... whatever the edit did
    ],
)
def test_reflect_refine_stage_rewards(v_prev, v_new, stopped, r_format, c, reflection):
    rewards = reflect_refine_rewards(v_prev, v_new, stopped, r_format)
    assert rewards == pytest.approx({"correction": c, "reflection": reflection, "refinement": c})


# --- start states and forks from a stored run ----------------------------------------------


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A stored reflect-mode run (uniform stop policy: some images are kept, some corrected)
    plus a decompose run, on one store."""
    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('tree') / 't.db'}")
    items = fixed_prompt_set(2, seed=11)
    prompts, categories = [i.text for i in items], [i.category for i in items]
    budget = Budget(max_rounds=2)
    runs = []
    for mode in ("reflect", "decompose"):
        run_id, _ = asyncio.run(
            collect(
                store,
                make_group_tasks(prompts, 2, seed=11, categories=categories),
                mode=mode,
                stop_policy=UniformStopPolicy(0.5),
                budget=budget,
                settings=SETTINGS,
            )
        )
        runs.append(run_id)
    return store, runs


def test_start_states_are_the_states_where_a_reflect_refine_stage_began(stored):
    store, (reflect_run, decompose_run) = stored
    starts = stage_start_states(store, reflect_run)
    assert len(starts) >= 10
    assert {s.node for s in starts} == {"draw", "refine"}
    assert {s.rounds for s in starts} >= {0, 1}
    for s in starts:
        steps = store.steps(s.trajectory_id)
        seqs = [step.seq for step in steps]
        after = steps[seqs.index(s.step_seq) + 1]
        assert after.node == "reflect" and after.state_before == s.state
        assert s.score == s.state["images"][-1]["score"]
        assert s.rounds == s.state["rounds"]
    assert all(s.rounds == 0 for s in stage_start_states(store, reflect_run, rounds=0))
    # In decompose mode only the states after the last sub-task count (the reflection checks
    # the prompt there); earlier ones check a sub-task's expectation.
    for s in stage_start_states(store, decompose_run):
        assert s.state["subtasks_done"] >= len(s.state["subtasks"])
    with pytest.raises(ValueError):
        stage_start_states(store, reflect_run, "reason")


def _without_fork_fields(state: dict) -> dict:
    task = {k: v for k, v in state["task"].items() if k not in ("group_id", "sample_index", "seed")}
    return {**{k: v for k, v in state.items() if k != "trajectory_id"}, "task": task}


def test_forks_continue_from_exactly_the_stored_state(stored):
    store, (reflect_run, _) = stored
    starts = select_start_states(stage_start_states(store, reflect_run), 4, seed=2)
    starts = list({s.point: s for s in starts}.values())  # distinct fork points
    group_size = 3
    fork_run = asyncio.run(
        fork(
            store,
            starts,
            stop_policy=UniformStopPolicy(0.5),
            group_size=group_size,
            seed=5,
            parent_runs=[reflect_run],
            settings=SETTINGS,
        )
    )
    run = store.run(fork_run)
    tree = run.config["tree"]
    assert tree["stage"] == "reflect_refine" and tree["parent_runs"] == [reflect_run]
    groups = store.groups(run=fork_run)
    assert set(groups) == {s.point for s in starts}
    parents = {r.id for r in store.trajectories(run=reflect_run)}
    for start in starts:
        members = groups[start.point]
        assert len(members) == group_size
        assert tree["forks"][start.point] == {
            "trajectory": start.trajectory_id,
            "step": start.step_seq,
            "node": start.node,
            "from_stage": start.from_stage,
            "score": start.score,
        }
        seeds = set()
        for index, summary in enumerate(members):
            assert summary.id not in parents and summary.sample_index == index
            detail = store.trajectory(summary.id)
            first = detail.steps[0]
            assert first.node == "reflect" and first.seq == start.state["step_count"]
            assert _without_fork_fields(first.state_before) == _without_fork_fields(
                dict(start.state)
            )
            task = first.state_before["task"]
            assert task["group_id"] == start.point
            assert task["seed"] != start.state["task"]["seed"]
            seeds.add(task["seed"])
            # Stage rewards as the formulas give them from the raw stored values.
            rewards, seq = member_stage_rewards(detail)
            reflection = first.update["reflections"][0]
            after = detail.final_state["images"]
            n0 = len(start.state["images"])
            v_new = after[n0]["score"] if len(after) > n0 else None
            assert seq == first.seq
            assert rewards["correction"] == pytest.approx(
                correction(start.score, v_new, reflection["accept"])
            )
            assert rewards["reflection"] == pytest.approx(
                rewards["correction"] + float(reflection["well_formed"])
            )
        assert len(seeds) == group_size  # every continuation samples differently
    # Groups per fork point, carrying only the decision taken at the fork.
    groups = read_stage_groups(store, fork_run)
    assert groups and {g.group_id for g in groups} <= {s.point for s in starts}
    for group in groups:
        assert len(group.members) == group_size and group.kind == "stop"
        for member in group.members:
            (decision,) = member.decisions
            first = store.trajectory(member.trajectory_id).steps[0]
            assert decision.step_seq == first.seq
            assert decision.observation == stop_observation(first.state_before, first.update)


# --- stage-wise training --------------------------------------------------------------------


def _p_stop(policy, store, starts) -> float:
    """Mean P(stop) over the observations the stop policy saw at these start states in the
    stored run (their reflections are the reflector's, fixed by the parent trajectory)."""
    values = []
    for s in starts:
        steps = store.steps(s.trajectory_id)
        step = next(x for x in steps if x.seq > s.step_seq)
        obs: StopObservation = stop_observation(step.state_before, step.update)
        values.append(policy.probabilities(obs)["stop"])
    return sum(values) / len(values)


def test_stage_training_learns_to_stop_on_perfect_images_and_to_go_on_otherwise(stored):
    store, (reflect_run, _) = stored
    candidates = stage_start_states(store, reflect_run)
    perfect = [s for s in candidates if s.perfect]
    flawed = [s for s in candidates if s.score <= 0.5]
    assert perfect and flawed
    start = LearnedStopPolicy(seed=0)
    trainer = GRPOTrainer(start, stage_config(GRPOConfig(seed=0)))
    policy, log = asyncio.run(
        tree_iterations(
            store,
            trainer,
            reflect_run,
            iterations=3,
            starts=16,
            group_size=6,
            perfect_share=0.3,
            seed=0,
            settings=SETTINGS,
        )
    )
    assert [it.trained for it in log] == ["stop@1", "stop@2", "stop@3"]
    assert all(it.perfect_starts == round(0.3 * 16) for it in log)
    assert all(it.metrics["groups_used"] > 0 for it in log)
    # C = 1 for stopping on a perfect image, 0 for going on: P(stop) there rises from 0.5.
    assert _p_stop(start, store, perfect) == pytest.approx(0.5)
    assert _p_stop(policy, store, perfect) > 0.6
    # On flawed images (V̂ ≤ 0.5) stopping earns C = 0 and a correction V − V̂, mostly > 0.
    assert _p_stop(policy, store, flawed) < 0.4
