"""Rewards of recorded images, stored as trajectory rewards.

A reward of an image policy is any stage reward stored under a name: R3's V for the draw stage,
C_j for a refine (``training.rewards``), or any function of the final image (``score_run``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from storage.store import RewardInput

if TYPE_CHECKING:
    from storage.store import TrajectoryStore

ImageReward = Callable[[Any, str], float]
"""A reward of one image: ``reward(pil_image, prompt)``."""


def score_run(
    store: TrajectoryStore, run_id: str, reward: ImageReward, name: str
) -> dict[str, float]:
    """Score every succeeded trajectory's final image with ``reward`` and store it as the
    trajectory reward ``name``; returns trajectory id → value."""

    values: dict[str, float] = {}
    for summary in store.trajectories(run=run_id, status="succeeded"):
        if summary.final_image is None:
            continue
        values[summary.id] = float(reward(store.get(summary.final_image), summary.prompt))
    store.add_rewards(
        RewardInput(tid, name, value, source="training.images") for tid, value in values.items()
    )
    return values
