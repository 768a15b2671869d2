"""Rewards of recorded images, stored as trajectory rewards.

A reward of an image policy is any stage reward stored under a name: R3's V for the draw stage,
C_j for a refine (``training.rewards``), or any reward of the final image (``score_run``): a
reward source of ``training.rewards.sources`` (ShapeWorld checker, VLM judge, GvU intrinsic,
composite; async, scored concurrently) or a plain function ``reward(pil_image, prompt)``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from training.rewards.sources import ImageReward, RewardFunction, score_final_images

if TYPE_CHECKING:
    from storage.store import TrajectoryStore

__all__ = ["ImageReward", "RewardFunction", "score_final_images", "score_run"]


def score_run(
    store: TrajectoryStore,
    run_id: str,
    reward: ImageReward | RewardFunction,
    name: str | None = None,
    *,
    concurrency: int = 8,
) -> dict[str, float]:
    """Score every succeeded trajectory's final image with ``reward`` and store it as the
    trajectory reward ``name`` (default: the source's name); returns trajectory id → value.

    The synchronous form of :func:`training.rewards.sources.score_final_images` (await that
    one inside an event loop); a trajectory already holding ``name`` keeps its value."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(score_final_images(store, run_id, reward, name, concurrency=concurrency))
    raise RuntimeError("score_run runs its own event loop: inside one, await score_final_images")
