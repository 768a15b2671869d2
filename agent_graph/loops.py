"""Training loops in the store: how a trainer and the rollout workers that sample for it find
each other, with nothing but the store between them.

A loop is recorded as a run of its own, with no trajectories, whose config says
``{"async_loop": {"name": NAME, "role": "loop", ...}}`` and whose status is ``running`` while
its trainer runs (``finished``, ``failed`` or ``interrupted`` after). Each batch the trainer
wants sampled is a run registered for workers (``rollout(..., register_only=True)``) whose
config says ``{"async_loop": {"name": NAME, "loop_run": LOOP_ID, "behaviour": "router@3"}}``
and names the version to sample with (``policies`` / ``policy_paths``), which a worker loads
when it starts on the run: a version saved by the trainer is in use from the next batch on.

``atelier worker NAME`` on a loop's run follows the loop (:func:`agent_graph.workers.follow_loop`)
until its status leaves ``running``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.records import RunInfo
    from storage.store import TrajectoryStore

LOOP_KEY = "async_loop"


def loop_of(run: RunInfo) -> dict[str, Any]:
    """The run's loop entry (empty when the run belongs to no loop)."""
    entry = run.config.get(LOOP_KEY)
    return entry if isinstance(entry, dict) else {}


def is_loop_run(run: RunInfo) -> bool:
    """Whether ``run`` is a loop's own run (the one workers follow), not one of its batches."""
    return loop_of(run).get("role") == "loop"


def open_loop(store: TrajectoryStore, name: str, settings: dict[str, Any]) -> RunInfo:
    """Record a new loop ``name`` (status ``running``) with its ``settings`` (staleness bound,
    group size...); its run."""
    return store.create_run(name, {LOOP_KEY: {**settings, "name": name, "role": "loop"}})


def batch_runs(store: TrajectoryStore, loop: RunInfo) -> list[RunInfo]:
    """The loop's batch runs, oldest first."""
    return [
        run for run in store.runs() if run.id != loop.id and loop_of(run).get("loop_run") == loop.id
    ]
