"""Rewards: each a small function with its formula in the docstring; values are plain floats,
wrapped in :class:`Reward` records to store them with ``TrajectoryStore.add_reward``."""

from training.rewards.composite import complexity_penalty, composite_reward, stepwise_reward
from training.rewards.formats import (
    plan_format_reward,
    reflection_format_reward,
    trajectory_format_reward,
)
from training.rewards.outcome import checker_score, intrinsic_reward, yes_probability
from training.rewards.record import Reward, store_rewards
from training.rewards.stages import (
    correction,
    reason_image_reward,
    reason_text_reward,
    refinement_reward,
    reflection_reward,
)

__all__ = [
    "Reward",
    "checker_score",
    "complexity_penalty",
    "composite_reward",
    "correction",
    "intrinsic_reward",
    "plan_format_reward",
    "reason_image_reward",
    "reason_text_reward",
    "refinement_reward",
    "reflection_format_reward",
    "reflection_reward",
    "stepwise_reward",
    "store_rewards",
    "trajectory_format_reward",
    "yes_probability",
]
