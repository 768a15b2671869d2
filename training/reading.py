"""Reading stored GRPO groups back in bulk: what every kind's ``read_groups`` shares.

A stored group is the trajectories of one prompt that share a ``group_id`` within a run. The
readers fetch whole groups' trajectories (steps, states and every reward record) with a few
chunked queries per batch of about :data:`READ_BATCH` trajectories, never a query per
trajectory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from storage.records import TrajectoryDetail
    from storage.store import TrajectoryStore

T = TypeVar("T")

READ_BATCH = 1000
"""Trajectories read back per bulk store call (``steps_many``, ``trajectory_details``): a few
queries per batch rather than several per trajectory, with the steps of only one batch in
memory at a time."""


def batches(items: Sequence[T], size: int = READ_BATCH) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_list(run_ids: str | Sequence[str]) -> list[str]:
    """One run id or several, as a list."""
    return [run_ids] if isinstance(run_ids, str) else list(run_ids)


def stored_groups(
    store: TrajectoryStore, run_ids: str | Sequence[str], status: str | None, min_size: int
) -> Iterator[tuple[str, str, list[TrajectoryDetail]]]:
    """(run id, group id, its members' ``TrajectoryDetail``) for every stored group of the runs
    with at least ``min_size`` members of ``status`` (None: any). Members are read in bulk,
    whole groups at a time, about ``READ_BATCH`` trajectories per read (a larger group alone)."""
    for run_id in run_list(run_ids):
        groups = [
            (group_id, [summary.id for summary in summaries])
            for group_id, summaries in store.groups(run=run_id, status=status).items()
            if len(summaries) >= min_size
        ]
        batch: list[tuple[str, list[str]]] = []
        for index, group in enumerate(groups):
            batch.append(group)
            following = groups[index + 1][1] if index + 1 < len(groups) else None
            if following is None or sum(len(ids) for _, ids in batch) + len(following) > READ_BATCH:
                wanted = [tid for _, ids in batch for tid in ids]
                details = store.trajectory_details(wanted)
                for group_id, ids in batch:
                    yield run_id, group_id, [details[tid] for tid in ids]
                batch = []
