"""The reward record: a named value with its source, storable with ``store.add_reward``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.store import RewardInput

if TYPE_CHECKING:
    from storage.records import RewardInfo
    from storage.store import TrajectoryStore


@dataclass(frozen=True)
class Reward:
    name: str
    """What was measured ("checker", "vlm_yes", "gvu", "format", "composite", ...)."""
    value: float
    source: str = ""
    """Who measured it: a judge model id, a parser, or the reward function's name."""
    step: int | None = None
    """The step's sequence number for a step-level reward; None for the whole trajectory."""
    details: dict[str, Any] | None = None

    def store(self, store: TrajectoryStore, trajectory_id: str) -> RewardInfo:
        """Record it on a trajectory (``TrajectoryStore.add_reward``); returns the stored row."""
        return store.add_reward(
            trajectory_id,
            self.name,
            self.value,
            step=self.step,
            source=self.source,
            details=self.details,
        )


def store_rewards(store: TrajectoryStore, items: Iterable[tuple[str, Reward]]) -> list[int]:
    """Record many (trajectory id, reward) pairs in one transaction; returns their ids."""
    return store.add_rewards(
        RewardInput(tid, r.name, r.value, r.step, r.source, r.details) for tid, r in items
    )
