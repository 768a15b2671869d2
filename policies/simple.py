"""Policies with no learned weights: fixed, uniform-random and rule-based.

They are baselines, and the behaviour policies that collect the first trajectories a learned
policy is trained on.
"""

from __future__ import annotations

import random
import re

from policies.base import (
    FIXED_MODES,
    MODES,
    STOP_ACTIONS,
    Action,
    ModeObservation,
    StopObservation,
    sample_categorical,
)


class FixedModePolicy:
    """Always the same mode (``atelier run --mode reflect``), escalate included."""

    version = "1"

    def __init__(self, mode: str) -> None:
        if mode not in FIXED_MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(FIXED_MODES)}")
        self.mode = mode
        self.name = f"fixed-{mode}"

    def choose_mode(self, obs: ModeObservation, rng: random.Random) -> Action:
        return Action(self.mode, 0.0, self.name, self.version)


class UniformModePolicy:
    """Each mode with probability 1/3: maximal exploration for collecting training data."""

    name = "uniform-mode"
    version = "1"

    def choose_mode(self, obs: ModeObservation, rng: random.Random) -> Action:
        choice, log_prob = sample_categorical(dict.fromkeys(MODES, 1.0), rng)
        return Action(choice, log_prob, self.name, self.version)


_NUMBER_WORDS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip
_RELATION_RE = re.compile(r"\b(left of|right of|above|below|beside|next to|on top of|under)\b")
_GROUP_SPLIT_RE = re.compile(r",|\band\b|\bwith\b|\bleft of\b|\bright of\b|\babove\b|\bbelow\b")


def prompt_complexity(prompt: str) -> tuple[int, int, int]:
    """(object groups, objects, spatial relations) read off the prompt text by surface rules."""
    text = prompt.lower()
    groups = [g for g in _GROUP_SPLIT_RE.split(text) if g.strip()]
    objects = 0
    for group in groups:
        words = re.findall(r"[a-z]+|\d+", group)
        counts = [
            int(w) if w.isdigit() else _NUMBER_WORDS[w]
            for w in words
            if w.isdigit() or w in _NUMBER_WORDS
        ]
        objects += counts[0] if counts else 1
    return len(groups), objects, len(_RELATION_RE.findall(text))


class RuleBasedModePolicy:
    """Mode from prompt complexity: one group → direct, a few objects → reflect, else decompose.

    Thresholds are on surface counts of the prompt text, so it works for any prompt; it is the
    hand-written prior a learned router should beat.
    """

    name = "rules-mode"
    version = "1"

    def __init__(
        self,
        reflect_from_objects: int = 2,
        decompose_from_groups: int = 3,
        decompose_from_objects: int = 6,
    ) -> None:
        self.reflect_from_objects = reflect_from_objects
        self.decompose_from_groups = decompose_from_groups
        self.decompose_from_objects = decompose_from_objects

    def choose_mode(self, obs: ModeObservation, rng: random.Random) -> Action:
        groups, objects, relations = prompt_complexity(obs.prompt)
        if (
            groups >= self.decompose_from_groups
            or objects >= self.decompose_from_objects
            or (relations and objects >= 4)
        ):
            mode = "decompose"
        elif objects >= self.reflect_from_objects or relations:
            mode = "reflect"
        else:
            mode = "direct"
        return Action(mode, 0.0, self.name, self.version)


class FollowReflectionStopPolicy:
    """R3's rule: stop exactly when the reflection says "No further edit needed"."""

    name = "follow-reflection"
    version = "1"

    def choose_stop(self, obs: StopObservation, rng: random.Random) -> Action:
        return Action("stop" if obs.stop_phrase else "continue", 0.0, self.name, self.version)


class UniformStopPolicy:
    """Stop or continue with probability ``p_stop`` regardless of the reflection."""

    name = "uniform-stop"
    version = "1"

    def __init__(self, p_stop: float = 0.5) -> None:
        if not 0.0 < p_stop < 1.0:
            raise ValueError("p_stop must be strictly between 0 and 1")
        self.p_stop = p_stop

    def choose_stop(self, obs: StopObservation, rng: random.Random) -> Action:
        probs = dict(zip(STOP_ACTIONS, (self.p_stop, 1.0 - self.p_stop), strict=True))
        choice, log_prob = sample_categorical(probs, rng)
        return Action(choice, log_prob, self.name, self.version)


class FixedStopPolicy:
    """Always the same answer: ``continue`` spends the whole budget, ``stop`` never corrects."""

    version = "1"

    def __init__(self, action: str) -> None:
        if action not in STOP_ACTIONS:
            raise ValueError(f"unknown stop action {action!r}; expected stop or continue")
        self.action = action
        self.name = f"fixed-{action}"

    def choose_stop(self, obs: StopObservation, rng: random.Random) -> Action:
        return Action(self.action, 0.0, self.name, self.version)
