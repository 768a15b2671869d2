"""Every reward formula against a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from nodes.formats import SubTask, format_reflection, format_subtasks
from training.rewards import (
    Reward,
    checker_score,
    complexity_penalty,
    composite_reward,
    correction,
    intrinsic_reward,
    plan_format_reward,
    reason_image_reward,
    reason_text_reward,
    refinement_reward,
    reflection_format_reward,
    reflection_reward,
    stepwise_reward,
    store_rewards,
    trajectory_format_reward,
    yes_probability,
)
from training.rewards.composite import (
    apply_complexity_penalty,
    linear_complexity_penalty,
    margin_complexity_penalty,
)

# --- outcome -------------------------------------------------------------------------------------


def test_checker_score_from_summary_judgement_or_image_scores():
    assert checker_score(SimpleNamespace(id="t", score=0.75)).value == 0.75
    state = {"judgement": {"score": 0.5, "model": "shapeworld-checker"}, "images": []}
    reward = checker_score(state)
    assert (reward.name, reward.value, reward.source) == ("checker", 0.5, "shapeworld-checker")
    images = {"images": [{"score": 0.25}, {"score": None}, {"score": 1.0}]}
    assert checker_score(images).value == 1.0
    with pytest.raises(ValueError):
        checker_score({"images": []})
    with pytest.raises(ValueError):
        checker_score(SimpleNamespace(id="t", score=None))


def test_yes_probability_normalises_over_the_two_answers():
    # p(yes) = 0.6, p(no) = 0.2 (0.2 on other tokens) -> 0.6 / 0.8 = 0.75
    assert yes_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75, abs=1e-15)
    # several spellings are summed: yes 0.3 + 0.3, no 0.1 + 0.1 -> 0.75
    both = yes_probability([math.log(0.3), math.log(0.3)], [math.log(0.1), math.log(0.1)])
    assert both == pytest.approx(0.75, abs=1e-15)
    assert yes_probability(0.0, -math.inf) == 1.0
    assert yes_probability(-math.inf, 0.0) == 0.0
    assert 0.0 <= yes_probability(-1e4, 0.0) < 1e-300
    with pytest.raises(ValueError):
        yes_probability(-math.inf, -math.inf)


def test_intrinsic_reward_is_the_geometric_mean_of_token_probabilities():
    probs = [0.5, 0.25, 0.125]
    expected = (0.5 * 0.25 * 0.125) ** (1 / 3)  # = 0.25
    assert intrinsic_reward([math.log(p) for p in probs]) == pytest.approx(expected, abs=1e-15)
    assert intrinsic_reward([0.0, 0.0]) == 1.0
    assert intrinsic_reward([-math.inf, 0.0]) == 0.0
    for bad in ([], [0.1], [float("nan")]):
        with pytest.raises(ValueError):
            intrinsic_reward(bad)


# --- format --------------------------------------------------------------------------------------


def test_format_rewards_use_the_graph_parsers():
    assert (
        reflection_format_reward(format_reflection("two circles, want three", "Add a circle.")) == 1
    )
    assert reflection_format_reward(format_reflection("all there", None)) == 1.0
    assert reflection_format_reward("Add a circle.") == 0.0  # no think block
    assert reflection_format_reward("<think>x</think>Add a circle.\nAdd a square.") == 0.0
    assert plan_format_reward(format_subtasks([SubTask("Draw a circle.", "a circle")])) == 1.0
    assert plan_format_reward('{"steps": []}') == 0.0
    assert plan_format_reward("first draw a circle") == 0.0

    good = {"text": format_reflection("ok", None)}
    assert trajectory_format_reward({"reflections": [good], "subtasks_well_formed": True}) == 1
    assert trajectory_format_reward({"reflections": [good, {"text": "meh"}]}) == 0.0
    assert trajectory_format_reward({"reflections": [], "subtasks_well_formed": False}) == 0.0
    assert trajectory_format_reward({"reflections": [], "subtasks_well_formed": None}) == 1.0


# --- composite and complexity penalty ------------------------------------------------------------


def test_stepwise_and_composite():
    assert stepwise_reward([1.0, 0.5, 0.0, 0.5]) == 0.5
    with pytest.raises(ValueError):
        stepwise_reward([])
    # 0.5·0.8 + 0.25·1 + 0.25·0.5 = 0.775
    assert composite_reward(0.8, 1.0, 0.5, (0.5, 0.25, 0.25)) == pytest.approx(0.775, abs=1e-15)
    assert composite_reward(0.8, 1.0, 0.5) == 0.8  # default: outcome only


def test_complexity_penalty_scales_only_the_near_best_by_fewest_images():
    rewards = [1.0, 1.0, 0.75, 0.5, 1.0]
    counts = [1, 3, 1, 2, 4]
    # eps 0.1: near-best = {0, 1, 4} (>= 0.9); N* = 1 -> 1, 1/3, 1/4; others unchanged
    assert complexity_penalty(rewards, counts, eps=0.1) == pytest.approx(
        [1.0, 1 / 3, 0.75, 0.5, 0.25], abs=1e-15
    )
    # eps exactly on the boundary (0.25, exact in binary): 0.75 >= 1 - 0.25 is near-best too
    assert complexity_penalty(rewards, counts, eps=0.25) == pytest.approx(
        [1.0, 1 / 3, 0.75, 0.5, 0.25], abs=1e-15
    )
    # just below the boundary it is not: same result since its N = 1 = N* either way; use N = 2
    counts2 = [2, 3, 4, 2, 4]
    assert complexity_penalty(rewards, counts2, eps=0.25) == pytest.approx(
        [1.0, 2 / 3, 0.75 * 2 / 4, 0.5, 0.5], abs=1e-15
    )
    assert complexity_penalty(rewards, counts2, eps=0.2499) == pytest.approx(
        [1.0, 2 / 3, 0.75, 0.5, 0.5], abs=1e-15
    )
    # eps = 0: only exact ties with the best; N* among them (2) even though a worse one has 1
    assert complexity_penalty([1.0, 0.5, 1.0], [2, 1, 4], eps=0.0) == [1.0, 0.5, 0.5]


def test_complexity_penalty_when_every_member_is_near_best():
    # all within eps: every one is scaled by N*/N_i with N* = 2
    assert complexity_penalty([0.9, 1.0, 0.95], [2, 4, 3], eps=0.5) == pytest.approx(
        [0.9, 0.5, 0.95 * 2 / 3], abs=1e-15
    )
    # equal rewards and equal counts: unchanged (a zero-variance group stays one)
    assert complexity_penalty([0.5, 0.5], [3, 3], eps=0.0) == [0.5, 0.5]
    # a member without images counts as one image
    assert complexity_penalty([0.0, 0.0], [0, 2], eps=0.0) == [0.0, 0.0]
    assert complexity_penalty([1.0, 1.0], [0, 2], eps=0.0) == [1.0, 0.5]
    assert complexity_penalty([], [], eps=0.1) == []
    with pytest.raises(ValueError):
        complexity_penalty([1.0], [1, 2], eps=0.1)


# --- R3 stage rewards ----------------------------------------------------------------------------


def test_correction_metric_both_branches():
    # V̂ < 1: C = V − V̂ (improvement, regression), whatever the reflection said
    assert correction(0.5, 0.75, stop_phrase=False) == 0.25
    assert correction(0.75, 0.5, stop_phrase=False) == -0.25
    # V̂ < 1 and the reflection stopped (no new image): C = V̂ − V̂ = 0
    assert correction(0.5, None, stop_phrase=True) == 0.0
    # V̂ = 1: C = 1 for the stop phrase, 0 otherwise (even if the edit kept V = 1)
    assert correction(1.0, None, stop_phrase=True) == 1.0
    assert correction(1.0, 1.0, stop_phrase=False) == 0.0
    assert correction(1.0, 0.5, stop_phrase=False) == 0.0


def test_stage_rewards():
    assert reflection_reward(0.5, 0.75, False, r_format=1.0) == 1.25
    assert reflection_reward(1.0, None, True, r_format=0.0) == 1.0
    assert refinement_reward(0.5, 0.75, False) == 0.25
    assert refinement_reward(1.0, 1.0, False) == 0.0
    assert reason_text_reward(0.75, r_format=1.0) == 1.75
    assert reason_image_reward(0.75) == 0.75


def test_reward_records_are_stored(tmp_path):
    import asyncio

    from agent_graph.rollout import rollout
    from nodes.state import Task
    from storage.store import TrajectoryStore

    store = TrajectoryStore(f"sqlite:///{tmp_path / 'r.db'}")
    task = Task(prompt="three red circles", group_id="g", seed=3)
    outcome = asyncio.run(rollout(store, [task], mode="reflect"))
    run_id, (result,) = outcome.run_id, outcome.results
    tid = result.trajectory_id
    row = Reward("gvu", 0.25, "tiny-vlm").store(store, tid)
    assert (row.name, row.value, row.source) == ("gvu", 0.25, "tiny-vlm")
    detail = store.trajectory(tid)
    checker = checker_score(detail)
    reflect_seq = next(s.seq for s in detail.steps if s.node == "reflect")
    store_rewards(store, [(tid, checker), (tid, Reward("c", 0.5, "r3", step=reflect_seq))])
    summary = store.trajectories(run=run_id)[0]
    # step rewards stay off the trajectory summary
    assert summary.rewards == {"gvu": 0.25, "checker": checker.value}
    assert checker.value == checker_score(detail.final_state).value == result.score
    assert [r.step_seq for r in store.rewards(tid)] == [None, None, reflect_seq]


def test_seed_002_penalty_can_rank_a_wrong_cheap_answer_above_a_right_one():
    # The case the margin form exists for: right in 2 images, right in 1, wrong in 1 (0.67).
    # eps 0.05: near-best = the two right ones, N* = 1 -> the 2-image one falls to 0.5 < 0.67.
    assert complexity_penalty([1.0, 1.0, 0.67], [2, 1, 1], eps=0.05) == pytest.approx(
        [0.5, 1.0, 0.67], abs=1e-15
    )


def test_margin_penalty_scales_the_margin_over_the_best_of_the_rest():
    # Same group: b = 0.67 (best outside the near-best set); the 2-image right answer gets
    # 0.67 + 0.33 · 1/2 = 0.835, still above the wrong one.
    assert margin_complexity_penalty([1.0, 1.0, 0.67], [2, 1, 1], eps=0.05) == pytest.approx(
        [0.835, 1.0, 0.67], abs=1e-15
    )
    # The first case of the Self-Adaptive Interleaved Reasoner (SAIR): near-best {0, 1, 4},
    # N* = 1, b = 0.75:
    # 0.75 + 0.25 · (1, 1/3, 1/4) = 1.0, 0.8333…, 0.8125; the others unchanged.
    rewards, counts = [1.0, 1.0, 0.75, 0.5, 1.0], [1, 3, 1, 2, 4]
    assert margin_complexity_penalty(rewards, counts, eps=0.1) == pytest.approx(
        [1.0, 0.75 + 0.25 / 3, 0.75, 0.5, 0.8125], abs=1e-15
    )
    # Every member near-best: b = 0, i.e. exactly SAIR's form.
    for group in (([0.9, 1.0, 0.95], [2, 4, 3], 0.5), ([1.0, 1.0], [0, 2], 0.0)):
        assert margin_complexity_penalty(*group) == complexity_penalty(*group)
    assert margin_complexity_penalty([], [], eps=0.1) == []
    with pytest.raises(ValueError):
        margin_complexity_penalty([1.0], [1, 2], eps=0.1)


def test_margin_penalty_keeps_the_order_of_better_and_worse_answers():
    # Property, over many random groups: a member outside the near-best set never ends at or
    # above a near-best one (SAIR's form breaks this in a sizeable share of the groups),
    # the near-best keep their order among equal image counts, and nothing is raised.
    import random

    rng = random.Random(0)
    broken_by_scale = 0
    for _ in range(2000):
        size = rng.randint(2, 8)
        rewards = [rng.choice([0.0, 0.25, 0.5, 0.67, 0.75, 1.0]) for _ in range(size)]
        counts = [rng.randint(1, 6) for _ in range(size)]
        eps = rng.choice([0.0, 0.05, 0.1])
        top = max(rewards)
        near = [r >= top - eps for r in rewards]
        shaped = margin_complexity_penalty(rewards, counts, eps)
        scaled = complexity_penalty(rewards, counts, eps)
        worst_near = min(v for v, n in zip(shaped, near, strict=True) if n)
        best_other = max((v for v, n in zip(shaped, near, strict=True) if not n), default=None)
        if best_other is not None:
            assert worst_near > best_other
            other = max(v for v, n in zip(scaled, near, strict=True) if not n)
            broken_by_scale += min(v for v, n in zip(scaled, near, strict=True) if n) <= other
        for i in range(size):
            assert shaped[i] <= rewards[i] + 1e-12  # a penalty never raises a reward
            for j in range(size):
                if near[i] and near[j] and counts[i] == counts[j] and rewards[i] > rewards[j]:
                    assert shaped[i] > shaped[j]
    assert broken_by_scale > 300


def test_complexity_penalty_by_name():
    args = ([1.0, 1.0, 0.67], [2, 1, 1], 0.05)
    assert apply_complexity_penalty(*args) == complexity_penalty(*args)
    assert apply_complexity_penalty(*args, form="margin") == margin_complexity_penalty(*args)
    assert apply_complexity_penalty(*args, form="linear", cost=0.2) == linear_complexity_penalty(
        args[0], args[1], 0.2
    )
    with pytest.raises(ValueError):
        apply_complexity_penalty(*args, form="additive")


def test_linear_penalty_prices_every_image_for_every_member():
    # λ = 0.1, N_min = 1: right in 2 images 1.0 − 0.1 = 0.9; right in 1: 1.0; wrong in 1: 0.67;
    # wrong in 4 (0.5): 0.5 − 0.3 = 0.2. No near-best set: every member pays its images.
    assert linear_complexity_penalty([1.0, 1.0, 0.67, 0.5], [2, 1, 1, 4], 0.1) == pytest.approx(
        [0.9, 1.0, 0.67, 0.2], abs=1e-15
    )
    # The price can outweigh a better score: right in 5 images (1 − 0.4 = 0.6) < wrong in 1.
    assert linear_complexity_penalty([1.0, 0.67], [5, 1], 0.1) == pytest.approx([0.6, 0.67])
    # A member without images counts as one; λ = 0 changes nothing; equal counts change nothing.
    assert linear_complexity_penalty([0.5, 1.0], [0, 3], 0.25) == pytest.approx([0.5, 0.5])
    assert linear_complexity_penalty([0.3, 0.9], [1, 6], 0.0) == [0.3, 0.9]
    assert linear_complexity_penalty([0.3, 0.9], [2, 2], 0.5) == [0.3, 0.9]
    assert linear_complexity_penalty([], [], 0.1) == []
    with pytest.raises(ValueError):
        linear_complexity_penalty([1.0], [1], -0.1)
