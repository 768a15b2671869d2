"""The rewards decision groups train on: computed from the stored trajectories, stored, read back.

Before ``read_groups``, :func:`score_run` stores each trajectory's reward components (R_o, the
judge's score, named ``checker``; R_f, SAIR's binary format reward, named ``format``), so that
the values the trainer reads are rows of the ``rewards`` table anyone can inspect. After
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
from training.reading import batches, run_list
from training.result import TrainResult
from training.rewards import trajectory_format_reward

if TYPE_CHECKING:
    from storage.records import TrajectoryDetail
    from storage.store import TrajectoryStore

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


def score_run(store: TrajectoryStore, run_ids: str | Sequence[str]) -> dict[str, dict[str, float]]:
    """Compute R_o and R_f of every trajectory of the runs and store each one not stored yet
    (scoring a run twice adds nothing). Returns trajectory id -> {name: value}."""
    scored: dict[str, dict[str, float]] = {}
    rows: list[RewardInput] = []
    for run_id in run_list(run_ids):
        summaries = store.trajectories(run=run_id, limit=None)
        for batch in batches([summary.id for summary in summaries]):
            for tid, detail in store.trajectory_details(batch).items():
                values = trajectory_rewards(detail)
                scored[tid] = values
                rows.extend(
                    RewardInput(tid, name, value, source=f"training.decisions.rewards:{name}")
                    for name, value in values.items()
                    if name not in (detail.rewards or {})
                )
    if rows:
        store.add_rewards(rows)
    return scored


def store_trained_rewards(
    store: TrajectoryStore, result: TrainResult, policy: str, details: dict | None = None
) -> int:
    """Store each member's composite, penalised reward and advantage from ``result`` (a
    decision trainer's), naming the version trained (``policy``@``result.version``) in the
    details; returns how many rows were written."""
    trained = f"{policy}@{result.version}"
    rows = [
        RewardInput(
            tid,
            name,
            values[name],
            source="training.decisions.trainer",
            details={"trained": trained, "group": values_group, **(details or {})},
        )
        for tid, (values_group, values) in result.member_rewards.items()
        for name in TRAINED
    ]
    if rows:
        store.add_rewards(rows)
    return len(rows)
