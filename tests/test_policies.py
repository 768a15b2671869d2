"""The shipped node policies: sampling statistics, log-probs, rules, reproducibility."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from policies.base import ModeObservation, StopObservation, sample_categorical
from policies.simple import (
    FixedModePolicy,
    FixedStopPolicy,
    FollowReflectionStopPolicy,
    RuleBasedModePolicy,
    UniformModePolicy,
    UniformStopPolicy,
    prompt_complexity,
)


def test_sample_categorical_matches_probabilities_and_log_probs():
    probs = {"a": 0.7, "b": 0.2, "c": 0.1}
    rng = random.Random(0)
    n = 20000
    draws = [sample_categorical(probs, rng) for _ in range(n)]
    counts = Counter(choice for choice, _ in draws)
    for key, p in probs.items():
        # 5 standard errors: fails by chance with probability < 1e-6
        assert abs(counts[key] / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    for choice, log_prob in draws[:50]:
        assert log_prob == pytest.approx(math.log(probs[choice]))


def test_sample_categorical_normalises_and_skips_zero_mass():
    rng = random.Random(1)
    choices = {sample_categorical({"x": 0.0, "y": 2.0, "z": 2.0}, rng)[0] for _ in range(200)}
    assert choices == {"y", "z"}
    assert sample_categorical({"y": 2.0, "z": 2.0}, rng)[1] == pytest.approx(math.log(0.5))
    for bad in ({}, {"a": 0.0}, {"a": -1.0, "b": 2.0}, {"a": float("nan")}):
        with pytest.raises(ValueError):
            sample_categorical(bad, rng)


def test_uniform_policies_are_reproducible_from_the_rng_seed():
    obs = ModeObservation(prompt="a red circle")
    policy = UniformModePolicy()
    first = [policy.choose_mode(obs, random.Random(s)).choice for s in range(60)]
    again = [policy.choose_mode(obs, random.Random(s)).choice for s in range(60)]
    assert first == again and set(first) == {"direct", "reflect", "decompose"}
    stop = UniformStopPolicy(0.25)
    actions = [stop.choose_stop(_stop_obs(True), random.Random(s)) for s in range(4000)]
    share = sum(a.choice == "stop" for a in actions) / len(actions)
    assert abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)
    assert {round(a.log_prob, 9) for a in actions} == {
        round(math.log(0.25), 9),
        round(math.log(0.75), 9),
    }


def _stop_obs(stop_phrase: bool) -> StopObservation:
    return StopObservation(
        prompt="p",
        target="p",
        reflection="r",
        stop_phrase=stop_phrase,
        well_formed=True,
        rounds_used=0,
        max_rounds=4,
        image_count=1,
    )


def test_follow_reflection_and_fixed_stop():
    rng = random.Random(0)
    assert FollowReflectionStopPolicy().choose_stop(_stop_obs(True), rng).choice == "stop"
    assert FollowReflectionStopPolicy().choose_stop(_stop_obs(False), rng).choice == "continue"
    assert FixedStopPolicy("continue").choose_stop(_stop_obs(True), rng).choice == "continue"
    with pytest.raises(ValueError):
        FixedStopPolicy("maybe")
    with pytest.raises(ValueError):
        UniformStopPolicy(1.0)


def test_fixed_mode_policy_validates():
    action = FixedModePolicy("decompose").choose_mode(ModeObservation("x"), random.Random(0))
    assert (action.choice, action.log_prob, action.policy) == ("decompose", 0.0, "fixed-decompose")
    with pytest.raises(ValueError, match="unknown mode"):
        FixedModePolicy("sideways")


@pytest.mark.parametrize(
    ("prompt", "counts", "mode"),
    [
        ("a red circle", (1, 1, 0), "direct"),
        ("a photo of a blue star", (1, 1, 0), "direct"),
        ("four blue squares", (1, 4, 0), "reflect"),
        ("a red circle and a blue square", (2, 2, 0), "reflect"),
        ("a red circle to the left of a blue square", (2, 2, 1), "reflect"),
        ("two red circles above three green triangles", (2, 5, 1), "decompose"),
        ("two red circles, three green triangles and a yellow star", (3, 6, 0), "decompose"),
        ("seven purple hexagons", (1, 7, 0), "decompose"),
    ],
)
def test_rule_based_router(prompt, counts, mode):
    assert prompt_complexity(prompt) == counts
    action = RuleBasedModePolicy().choose_mode(ModeObservation(prompt), random.Random(0))
    assert action.choice == mode and action.log_prob == 0.0
