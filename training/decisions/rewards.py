"""The rewards decision groups train on: computed from the stored trajectories, stored, read back.

``read_groups`` gives each member its reward components (R_o, the judge's score, named
``checker``; R_f, SAIR's binary format reward, named ``format``; Tree-RL's stage rewards);
before training, :func:`store_member_rewards` stores those its trajectory does not hold yet,
so that the values the trainer uses are rows of the ``rewards`` table anyone can inspect. After
``train``, :func:`store_trained_rewards` stores what each member then received: the composite
R = a1·R_o + a2·R_f + a3·R_s (``composite``), R after the group's complexity penalty
(``penalised``) and its group-relative advantage (``advantage``), each with the trained
version in its details. Recomputing any of them from the stored rows gives the stored value
(``tests/test_training_stored_rewards.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from storage.store import RewardInput
from training.rewards import trajectory_format_reward
from training.rewards.record import store_trained_rewards as store_trained

if TYPE_CHECKING:
    from storage.records import TrajectoryDetail
    from storage.store import TrajectoryStore
    from training.decisions.groups import DecisionGroup
    from training.result import TrainResult

OUTCOME = "checker"
"""R_o: the judge's (ShapeWorld: the checker's) score of the final image; 0 when it failed."""
FORMAT = "format"
"""R_f: 1 if every reflection text of the trajectory parses (SAIR's binary format reward)."""
TRAINED = ("composite", "penalised", "advantage")
"""What :func:`store_trained_rewards` records per member, in this order."""


def trajectory_rewards(detail: TrajectoryDetail) -> dict[str, float]:
    """R_o and R_f of one stored trajectory, computed from what the store holds."""
    final = detail.final_state or {}
    return {
        OUTCOME: float(detail.score) if detail.score is not None else 0.0,
        FORMAT: trajectory_format_reward(final) if final else 0.0,
    }


def store_member_rewards(
    store: TrajectoryStore, groups: Sequence[DecisionGroup], names: Sequence[str] | None = None
) -> int:
    """Store the reward components the groups' members carry (``names``; None: all of them),
    each one its trajectory does not hold yet (storing twice adds nothing), before a trainer
    uses them. Reads only the runs' trajectory summaries; returns the rows written."""
    stored = {
        summary.id: summary.rewards
        for run_id in dict.fromkeys(group.run_id for group in groups)
        for summary in store.trajectories(run=run_id, limit=None)
    }
    rows = [
        RewardInput(member.trajectory_id, name, value, source=f"training.decisions:{name}")
        for group in groups
        for member in group.members
        for name, value in member.rewards.items()
        if (names is None or name in names) and name not in stored.get(member.trajectory_id, {})
    ]
    if rows:
        store.add_rewards(rows)
    return len(rows)


def store_trained_rewards(
    store: TrajectoryStore, result: TrainResult, policy: str, details: dict | None = None
) -> int:
    """Store each member's composite, penalised reward and advantage from ``result`` (a
    decision trainer's), naming the version trained (``policy``@``result.version``) in the
    details; returns how many rows were written. (The decision trainer's use of
    :func:`training.rewards.record.store_trained_rewards`, which the other kinds share.)"""
    return store_trained(
        store, result, policy, details, names=TRAINED, source="training.decisions.trainer"
    )
