"""LearnedStopPolicy: stop or continue correcting, from the reflection and the loop's counters.

Used as the graph's ``stop_policy``. Imports torch, so nothing the CLI or ShapeWorld imports should
import this module.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from policies.base import STOP_ACTIONS, Action, StopObservation
from policies.features import FeatureEncoder, HashedNgramEncoder
from policies.learned import CategoricalPolicy


def reflection_features(obs: StopObservation) -> list[float]:
    """Stop phrase flag, well-formed flag, rounds used / max rounds, image count / 8, whether
    the last image has a judge score, and that score (0 when absent)."""
    has_score = bool(obs.scores)
    return [
        float(obs.stop_phrase),
        float(obs.well_formed),
        obs.rounds_used / max(obs.max_rounds, 1),
        min(obs.image_count, 16) / 8,
        float(has_score),
        float(obs.scores[-1]) if has_score else 0.0,
    ]


class LearnedStopPolicy(CategoricalPolicy[StopObservation]):
    """Softmax over (stop, continue) from :func:`reflection_features` and hashed n-grams of the
    reflection text. A fresh one is 50/50; ``FollowReflectionStopPolicy`` is the rule it should
    learn to match or beat."""

    ACTIONS = STOP_ACTIONS
    KIND = "stop"
    extra_dim = len(reflection_features(StopObservation("", "", "", False, False, 0, 1, 1)))

    def __init__(
        self,
        encoder: FeatureEncoder | None = None,
        *,
        hidden: int = 0,
        name: str = "stop",
        version: str = "0",
        greedy: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            encoder or HashedNgramEncoder(buckets=256, numeric=False),
            hidden=hidden,
            name=name,
            version=version,
            greedy=greedy,
            seed=seed,
        )

    def features(self, observations: Sequence[StopObservation]) -> torch.Tensor:
        text = self.encoder.encode([o.reflection for o in observations])
        flags = torch.tensor([reflection_features(o) for o in observations], dtype=torch.float32)
        return torch.cat([text, flags], dim=1)

    def choose_stop(self, obs: StopObservation, rng: random.Random) -> Action:
        return self.act(obs, rng)
