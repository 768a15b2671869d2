"""Rewards of recorded completions, stored as trajectory rewards.

A reward is any function of a completion's text and token ids; ``target_fraction`` (the share of
tokens from a chosen token set) is measurable even on random weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from storage.store import RewardInput
from training.reading import batches
from training.text.sampling import recorded_completion

if TYPE_CHECKING:
    from storage.store import TrajectoryStore

DEFAULT_REWARD = "lora_target"

TextReward = Callable[[str, Sequence[int]], float]
"""A reward of one completion: ``reward(text, token_ids)``."""


def target_fraction(target_ids: Iterable[int], stop_ids: Iterable[int] = ()) -> TextReward:
    """Reward: the share of a completion's tokens (stop tokens excluded) in ``target_ids``."""
    targets, stops = frozenset(target_ids), frozenset(stop_ids)

    def reward(text: str, token_ids: Sequence[int]) -> float:
        ids = [t for t in token_ids if t not in stops]
        return sum(t in targets for t in ids) / len(ids) if ids else 0.0

    return reward


def score_run(
    store: TrajectoryStore, run_id: str, reward: TextReward, name: str = DEFAULT_REWARD
) -> dict[str, float]:
    """Compute ``reward`` of every recorded completion of the run and store it as the
    trajectory reward ``name``; returns trajectory id → value."""

    values: dict[str, float] = {}
    for batch in batches(store.trajectories(run=run_id)):
        steps_of = store.steps_many([summary.id for summary in batch])
        for summary in batch:
            completion = recorded_completion(summary.id, steps_of[summary.id])
            values[summary.id] = float(reward(completion.text, completion.token_ids))
    store.add_rewards(
        RewardInput(tid, name, value, source="training.text") for tid, value in values.items()
    )
    return values
