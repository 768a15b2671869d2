"""The decision-maker interface shared by every node policy.

A policy sees a small observation, returns an :class:`Action` (the choice, its log-probability
under the policy, and the policy's name and version) and is sampled with a caller-provided
``random.Random`` so that a trajectory's decisions are reproducible from its seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

MODES: tuple[str, ...] = ("direct", "reflect", "decompose")
"""What a router chooses among (the learned router's actions)."""
ESCALATE = "escalate"
"""SAIR's escalation pipeline as one trajectory: direct, then reflect, then decompose while
the reflector still rejects the image. A data-collection mode a fixed policy can choose; no
router samples it (it is a schedule over the three modes, not a fourth)."""
FIXED_MODES: tuple[str, ...] = (*MODES, ESCALATE)
"""What a fixed mode policy may always choose (``--mode``)."""
STOP_ACTIONS: tuple[str, ...] = ("stop", "continue")


@dataclass(frozen=True)
class Action:
    choice: str
    log_prob: float
    """log π(choice | observation) at sampling time; 0.0 for deterministic policies."""
    policy: str
    version: str


@dataclass(frozen=True)
class ModeObservation:
    prompt: str
    input_image_count: int = 0


@dataclass(frozen=True)
class StopObservation:
    prompt: str
    target: str
    """What the image was checked against (the prompt, or a sub-task's expectation)."""
    reflection: str
    stop_phrase: bool
    well_formed: bool
    rounds_used: int
    max_rounds: int
    image_count: int
    scores: tuple[float, ...] = ()
    """Judge scores of the images so far, when the graph computes them."""


@runtime_checkable
class ModePolicy(Protocol):
    name: str
    version: str

    def choose_mode(self, obs: ModeObservation, rng: random.Random) -> Action: ...


@runtime_checkable
class StopPolicy(Protocol):
    name: str
    version: str

    def choose_stop(self, obs: StopObservation, rng: random.Random) -> Action: ...


def sample_categorical(probs: Mapping[str, float], rng: random.Random) -> tuple[str, float]:
    """Draw one key with the given probabilities; returns (key, log-prob of that key).

    Uses ``rng`` (not torch's generator) so sampling is reproducible from a trajectory's seed
    whatever computed the probabilities.
    """
    total = sum(probs.values())
    if not math.isfinite(total) or total <= 0 or any(p < 0 for p in probs.values()):
        raise ValueError(f"not a probability vector: {dict(probs)}")
    threshold = rng.random() * total
    cumulative = 0.0
    last = None
    for key, p in probs.items():
        if p <= 0:
            continue
        last = key
        cumulative += p
        if threshold < cumulative:
            return key, math.log(p / total)
    assert last is not None  # total > 0 guarantees a positive entry
    return last, math.log(probs[last] / total)
