"""Rewards: each a small function with its formula in the docstring; values are plain floats,
wrapped in :class:`Reward` records to store them with ``TrajectoryStore.add_reward``. Rewards of
an image against its prompt are also async, pluggable sources (``sources``: ShapeWorld checker,
VLM judge, GvU intrinsic, composite), stored by name with :func:`score_final_images`.

Stored by the trainers: ``stepwise`` (SAIR's R_s, an analyzer's score of each intermediate
text: :func:`store_stepwise_rewards`), what each member was trained with
(:func:`store_trained_rewards`); the text policies' per-step rewards are
``training.text.rewards.store_text_rewards``'s."""

from training.rewards.composite import complexity_penalty, composite_reward, stepwise_reward
from training.rewards.formats import (
    blueprint_format_reward,
    plan_format_reward,
    reflection_format_reward,
    trajectory_format_reward,
)
from training.rewards.outcome import checker_score, intrinsic_reward, yes_probability
from training.rewards.record import Reward, store_new_rewards, store_rewards, store_trained_rewards
from training.rewards.sources import (
    CheckerReward,
    FunctionReward,
    GvUReward,
    ImageReward,
    JudgeReward,
    RewardValue,
    WeightedReward,
    build_reward_source,
    describe_source,
    score_final_images,
)
from training.rewards.stages import (
    correction,
    reason_image_reward,
    reason_text_reward,
    refinement_reward,
    reflection_reward,
)
from training.rewards.stepwise import STEPWISE, store_stepwise_rewards

__all__ = [
    "STEPWISE",
    "CheckerReward",
    "FunctionReward",
    "GvUReward",
    "ImageReward",
    "JudgeReward",
    "Reward",
    "RewardValue",
    "WeightedReward",
    "blueprint_format_reward",
    "build_reward_source",
    "checker_score",
    "complexity_penalty",
    "composite_reward",
    "correction",
    "describe_source",
    "intrinsic_reward",
    "plan_format_reward",
    "reason_image_reward",
    "reason_text_reward",
    "refinement_reward",
    "reflection_format_reward",
    "reflection_reward",
    "score_final_images",
    "stepwise_reward",
    "store_new_rewards",
    "store_rewards",
    "store_stepwise_rewards",
    "store_trained_rewards",
    "trajectory_format_reward",
    "yes_probability",
]
