"""GRPO groups of recorded images, read back from the store with their denoising transitions.

A member is one ``node`` step (``draw``, or ``refine``) of a group's trajectory that recorded
transitions, with its reward: a step-level reward of that step wins over the trajectory-level
one of the same name (R3's C_j of a refine step; V of the final image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.diffusion import load_transitions
from training.reading import stored_groups

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


@dataclass(frozen=True)
class ImageMember:
    trajectory_id: str
    step_seq: int
    """The stored step (``steps.seq``) that made the image."""
    transitions: tuple[Any, ...]
    """:class:`~nodes.backends.flow.transitions.DiffusionTransition` as stored."""
    reward: float


@dataclass(frozen=True)
class ImageGroup:
    group_id: str
    prompt: str
    members: tuple[ImageMember, ...]


def read_groups(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    *,
    reward: str,
    node: str = "draw",
) -> list[ImageGroup]:
    """GRPO groups of the runs' succeeded trajectories, with the stored transitions of their
    ``node`` steps and the reward ``reward``. Members without transitions or reward are left
    out (and a group with fewer than two members is dropped). Trajectories, steps and rewards
    are read in bulk; the transitions (``storage.diffusion``) a group at a time."""

    groups: list[ImageGroup] = []
    for _, group_id, details in stored_groups(store, run_ids, "succeeded", 1):
        by_step: dict[tuple[str, int], list[Any]] = {}
        for stored in load_transitions(store.db, trajectory_ids=[d.id for d in details]):
            by_step.setdefault((stored.trajectory_id, stored.step_seq), []).append(
                stored.transition
            )
        members = []
        for detail in details:
            step_rewards = {  # by record id: the latest value of a step's reward wins
                r.step_seq: r.value
                for r in detail.reward_records
                if r.name == reward and r.step_seq is not None
            }
            for step in detail.steps:
                key = (detail.id, step.seq)
                if step.node != node or key not in by_step:
                    continue
                value = step_rewards.get(step.seq, detail.rewards.get(reward))
                if value is None:
                    continue
                members.append(ImageMember(detail.id, step.seq, tuple(by_step[key]), float(value)))
        if len(members) >= 2:
            groups.append(ImageGroup(group_id, details[0].prompt, tuple(members)))
    return groups
