"""LearnedModePolicy: a learned choice of mode (direct / reflect / decompose) from the prompt.

The graph's router (its mode policy): ``dataclasses.replace(ctx, mode_policy=LearnedModePolicy())``.
Imports torch, so nothing the CLI or ShapeWorld imports should import this module.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from policies.base import MODES, Action, ModeObservation
from policies.features import FeatureEncoder, HashedNgramEncoder
from policies.learned import CategoricalPolicy


class LearnedModePolicy(CategoricalPolicy[ModeObservation]):
    """Softmax over the three modes from prompt features (default: hashed n-grams + counts)
    and the number of input images."""

    ACTIONS = MODES
    KIND = "router"
    extra_dim = 1

    def __init__(
        self,
        encoder: FeatureEncoder | None = None,
        *,
        hidden: int = 0,
        name: str = "router",
        version: str = "0",
        greedy: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            encoder or HashedNgramEncoder(),
            hidden=hidden,
            name=name,
            version=version,
            greedy=greedy,
            seed=seed,
        )

    def features(self, observations: Sequence[ModeObservation]) -> torch.Tensor:
        text = self.encoder.encode([o.prompt for o in observations])
        images = torch.tensor(
            [[min(o.input_image_count, 4) / 4] for o in observations], dtype=torch.float32
        )
        return torch.cat([text, images], dim=1)

    def choose_mode(self, obs: ModeObservation, rng: random.Random) -> Action:
        return self.act(obs, rng)
