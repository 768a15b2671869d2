"""Tree-RL (R3): start-state selection, forks from stored states, per-fork-point stage groups
with R3's stage rewards, and stage-wise training of the stop policy."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from agent_graph.presets import shapeworld_backends
from agent_graph.rollout import resume_run, rollout
from agent_graph.runner import make_group_tasks
from nodes.backends.shapeworld import fixed_prompt_set
from nodes.context import GraphSettings
from nodes.state import Budget
from policies.base import StopObservation
from policies.simple import FixedStopPolicy, UniformStopPolicy
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
    parent_backends,
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


def _chi_square(counts: Counter, names: list[str], total: int) -> float:
    expected = total / len(names)
    return sum((counts[name] - expected) ** 2 / expected for name in names)


CHI2_999 = {3: 16.27, 4: 18.47}
"""The chi-square distribution's 99.9% quantiles (degrees of freedom → value)."""


def test_selection_by_default_is_r3s_a_perfect_state_with_probability_p_per_draw():
    # R3's RolloutBuffer.sample: Bernoulli(0.15) per draw, uniform within each pool, whatever
    # V̂ the imperfect states have.
    names = ["a", "b", "c", "d", "e"]
    pool = [_start(n, v) for n, v in zip(names, (0.0, 0.25, 0.5, 0.9, 0.999), strict=True)]
    pool += [_start(f"p{i}", 1.0) for i in range(4)]
    n = 40_000
    chosen = select_start_states(pool, n, seed=7)
    assert chosen == select_start_states(pool, n, perfect_share=0.15, weighting="uniform", seed=7)
    counts = Counter(s.trajectory_id for s in chosen)
    n_perfect = sum(s.perfect for s in chosen)
    assert abs(n_perfect - 0.15 * n) < 4 * math.sqrt(n * 0.15 * 0.85), n_perfect
    assert _chi_square(counts, names, n - n_perfect) < CHI2_999[4], counts  # uniform
    perfect = [f"p{i}" for i in range(4)]
    assert _chi_square(counts, perfect, n_perfect) < CHI2_999[3], counts
    # Per draw, not a fixed share: over many small draws the perfect count is
    # Binomial(20, 0.15) — mean 3, variance 2.55 (a fixed share would give 3 every time).
    per_call = [sum(s.perfect for s in select_start_states(pool, 20, seed=k)) for k in range(2000)]
    mean = sum(per_call) / len(per_call)
    variance = sum((c - mean) ** 2 for c in per_call) / (len(per_call) - 1)
    assert abs(mean - 3.0) < 4 * math.sqrt(2.55 / 2000), mean
    assert 2.2 < variance < 2.9, variance
    for k, share in ((0, 0.0), (1, 1.0)):  # the edges: never / always perfect
        drawn = select_start_states(pool, 200, perfect_share=share, seed=k)
        assert sum(s.perfect for s in drawn) == 200 * share
    # One pool empty: every draw comes from the other.
    imperfect_only = [s for s in pool if not s.perfect]
    assert not any(s.perfect for s in select_start_states(imperfect_only, 50, perfect_share=0.9))
    perfect_only = [s for s in pool if s.perfect]
    assert all(s.perfect for s in select_start_states(perfect_only, 50, perfect_share=0.1))


def test_room_weighting_takes_the_perfect_share_exactly():
    pool = [_start(f"p{i}", 1.0) for i in range(3)] + [_start(f"i{i}", 0.5) for i in range(5)]
    for share, expected in ((0.15, 30), (0.0, 0), (0.5, 100), (1.0, 200)):
        chosen = select_start_states(pool, 200, perfect_share=share, weighting="room", seed=1)
        assert len(chosen) == 200
        assert sum(s.perfect for s in chosen) == expected
    # One pool empty: every draw comes from the other.
    imperfect_only = [s for s in pool if not s.perfect]
    drawn = select_start_states(imperfect_only, 50, perfect_share=0.15, weighting="room")
    assert not any(s.perfect for s in drawn)
    perfect_only = [s for s in pool if s.perfect]
    drawn = select_start_states(perfect_only, 50, perfect_share=0.15, weighting="room")
    assert all(s.perfect for s in drawn)


def test_room_weighting_weights_imperfect_states_by_room_to_improve():
    # Weights 1 − V̂ = 1, 0.5, 0.25 (and 0 for V̂ = 0.999… just below perfect is ~0):
    # P = 4/7, 2/7, 1/7 among the imperfect draws.
    pool = [_start("a", 0.0), _start("b", 0.5), _start("c", 0.75), _start("p", 1.0)]
    n = 20_000
    chosen = select_start_states(pool, n, perfect_share=0.15, weighting="room", seed=7)
    counts = Counter(s.trajectory_id for s in chosen)
    assert counts["p"] == 3000
    imperfect = n - 3000
    for name, p in (("a", 4 / 7), ("b", 2 / 7), ("c", 1 / 7)):
        share = counts[name] / imperfect
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / imperfect), (name, share, p)
    # The perfect pool is drawn uniformly.
    perfect = [_start(f"p{i}", 1.0) for i in range(4)] + [_start("x", 0.2)]
    drawn = select_start_states(perfect, 8000, perfect_share=0.5, weighting="room")
    counts = Counter(s.trajectory_id for s in drawn)
    for i in range(4):
        assert abs(counts[f"p{i}"] / 4000 - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)


def test_selection_is_seeded():
    pool = [_start(f"s{i}", i / 10) for i in range(11)]
    for weighting in ("uniform", "room"):
        first = select_start_states(pool, 40, weighting=weighting, seed=3)
        assert first == select_start_states(pool, 40, weighting=weighting, seed=3)
        assert first != select_start_states(pool, 40, weighting=weighting, seed=4)
    with pytest.raises(ValueError):
        select_start_states(pool, 5, perfect_share=1.5)
    with pytest.raises(ValueError, match="weighting"):
        select_start_states(pool, 5, weighting="v-hat")
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
    # `collect` records ShapeWorld as its world; the forks ran there too, with this stop policy.
    assert store.run(reflect_run).config["world"] == run.config["world"] == "shapeworld"
    assert run.config["stop_policy"] == "uniform-stop@1"
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
    assert 0 < sum(it.perfect_starts for it in log) < 3 * 16  # Bernoulli(0.3) per draw
    assert all(it.metrics["groups_used"] > 0 for it in log)
    # C = 1 for stopping on a perfect image, 0 for going on: P(stop) there rises from 0.5.
    assert _p_stop(start, store, perfect) == pytest.approx(0.5)
    assert _p_stop(policy, store, perfect) > 0.6
    # On flawed images (V̂ ≤ 0.5) stopping earns C = 0 and a correction V − V̂, mostly > 0.
    assert _p_stop(policy, store, flawed) < 0.4


# --- forks on the parent run's own backends --------------------------------------------------

NO_EDITS = """[backends.world]
kind = "shapeworld"
options = { edit_failure_rate = 1.0 }   # every edit leaves the image as it was

[roles]
planner = "world"
reflector = "world"
decomposer = "world"
generator = "world"
editor = "world"
judge = "world"
"""


@pytest.fixture(scope="module")
def no_edits(tmp_path_factory):
    """A reflect-mode run recorded with a backends file: ShapeWorld whose editor always fails."""
    tmp = tmp_path_factory.mktemp("tree-config")
    path = tmp / "no-edits.toml"
    path.write_text(NO_EDITS)
    store = TrajectoryStore(f"sqlite:///{tmp / 't.db'}")
    items = fixed_prompt_set(2, seed=11)
    tasks = make_group_tasks(
        [i.text for i in items], 2, seed=11, categories=[i.category for i in items]
    )
    outcome = asyncio.run(
        rollout(store, tasks, backends_config=path, mode="reflect", budget=Budget(max_rounds=2))
    )
    return store, outcome.run_id, path


def _corrections(store, run_id):
    """(C, whether the stage made an image) of every member of a forked run."""
    found = []
    for summary in store.trajectories(run=run_id, limit=None):
        detail = store.trajectory(summary.id)
        rewards, _ = member_stage_rewards(detail)
        made = len(detail.final_state["images"]) > len(detail.steps[0].state_before["images"])
        found.append((rewards["correction"], made))
    return found


def test_forks_continue_on_the_shapeworld_config_the_parent_run_recorded(no_edits):
    store, run_id, path = no_edits
    # First-round starts: the budget (2 rounds) leaves every fork room for an edit.
    starts = [s for s in stage_start_states(store, run_id, rounds=0) if not s.perfect][:8]
    assert len(starts) == 8 and {s.run_id for s in starts} == {run_id}
    always_edit = FixedStopPolicy("continue")
    forked = asyncio.run(fork(store, starts, stop_policy=always_edit, group_size=2, seed=1))
    config = store.run(forked).config
    assert config["world"] == "config" and config["backends_config"] == str(path.resolve())
    assert config["stop_policy"] == "fixed-continue@1"
    assert config["tree"]["parent_runs"] == [run_id]  # from the start states alone
    # The recorded world's editor fails every edit: each member edits, and gains nothing.
    members = _corrections(store, forked)
    assert len(members) == 16 and all(made for _, made in members)
    assert all(c == 0.0 for c, _ in members)
    # The same forks on default ShapeWorld (backends given in code) do improve some images:
    # the check above would have caught forks that ignored the recorded config.
    control = asyncio.run(
        fork(
            store,
            starts,
            stop_policy=always_edit,
            group_size=2,
            seed=1,
            backends=shapeworld_backends(),
        )
    )
    assert store.run(control).config["world"] == "context"
    assert any(c > 0 for c, _ in _corrections(store, control))
    # A forked run is itself a parent (the tree grows a level) on the same backends...
    assert parent_backends(store, forked) == parent_backends(store, run_id)
    # ...but resuming it would need its stop policy, which is code: refused, not guessed.
    with pytest.raises(ValueError, match="started in code"):
        asyncio.run(resume_run(store, forked))


def test_parents_must_share_rebuildable_backends(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'p.db'}")
    shape = store.create_run("shape", {"world": "shapeworld"})
    served = store.create_run("served", {"world": "config", "backends_config": "/x/a.toml"})
    adapted = store.create_run(
        "adapted",
        {
            "world": "config",
            "backends_config": "/x/a.toml",
            "adapters": {"reflector": "reflect@2"},
            "adapter_paths": {"reflector": "/v/reflect-2"},
        },
    )
    in_code = store.create_run("code", {"world": "context", "stop_policy": "x@1"})
    assert parent_backends(store, [shape.id, shape.id]) == {"world": "shapeworld"}
    with pytest.raises(ValueError, match="different backends"):
        parent_backends(store, [shape.id, served.id])
    with pytest.raises(ValueError, match=r"/x/a.toml with reflector reflect@2"):
        parent_backends(store, [served.id, adapted.id])
    with pytest.raises(ValueError, match=r"given in code .* fork\(\.\.\., backends=\.\.\.\)"):
        parent_backends(store, in_code.id)
    store.close()
