"""The reward record: a named value with its source, storable with ``store.add_reward``; and the
two ways trainers store many: rows not stored yet (:func:`store_new_rewards`, so storing twice
adds nothing) and what each member was trained with (:func:`store_trained_rewards`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.store import RewardInput

if TYPE_CHECKING:
    from storage.records import RewardInfo
    from storage.store import TrajectoryStore
    from training.result import TrainResult

RewardKey = tuple[str, int | None, str]
"""(trajectory id, step seq or None for the trajectory, reward name)."""


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


def latest_values(records: Iterable[RewardInfo]) -> dict[RewardKey, float]:
    """The latest stored value of each (trajectory, step, name), from records in id order (as
    the store returns them)."""
    return {(r.trajectory_id, r.step_seq, r.name): r.value for r in records}


def store_new_rewards(
    store: TrajectoryStore, rows: Iterable[RewardInput], latest: Mapping[RewardKey, float]
) -> int:
    """Store the rows whose (trajectory, step, name) does not already hold the same value as
    its latest (``latest``: :func:`latest_values` of the trajectories' records): computing and
    storing again adds nothing, while a changed value (another analyzer, other weights) is
    stored as the new latest. Returns the rows written."""
    new = [r for r in rows if latest.get((r.trajectory_id, r.step, r.name)) != float(r.value)]
    if new:
        store.add_rewards(new)
    return len(new)


def trained_reward_rows(
    result: TrainResult,
    policy: str,
    details: dict[str, Any] | None = None,
    *,
    names: Sequence[str] | None = None,
    source: str = "training",
    prefix: str = "",
    steps: Mapping[str, int] | None = None,
) -> list[RewardInput]:
    """The rows of what each member of a ``train`` call was trained with: for every (trajectory
    id, (group id, {name: value})) of ``result.member_rewards``, one row per name (``names``, in
    that order; None: every name the member has) named ``prefix + name``, with the trained
    version (``policy@result.version``) and the group in the details. ``steps`` maps a
    trajectory id to the step seq the member is (a text or image member: its node's step);
    absent, the row is the trajectory's. Store them with the version
    (``save_version(..., rewards=rows)``: one transaction) or with :func:`store_trained_rewards`."""
    trained = f"{policy}@{result.version}"
    rows = []
    for tid, (group, values) in result.member_rewards.items():
        for name in values if names is None else names:
            rows.append(
                RewardInput(
                    tid,
                    prefix + name,
                    float(values[name]),
                    None if steps is None else steps.get(tid),
                    source,
                    {"trained": trained, "group": group, **(details or {})},
                )
            )
    return rows


def store_trained_rewards(
    store: TrajectoryStore,
    result: TrainResult,
    policy: str,
    details: dict[str, Any] | None = None,
    *,
    names: Sequence[str] | None = None,
    source: str = "training",
    prefix: str = "",
    steps: Mapping[str, int] | None = None,
) -> int:
    """Store :func:`trained_reward_rows` now; returns the rows written."""
    rows = trained_reward_rows(
        result, policy, details, names=names, source=source, prefix=prefix, steps=steps
    )
    if rows:
        store.add_rewards(rows)
    return len(rows)
