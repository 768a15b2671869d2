"""Every node step is recorded by one wrapper that the graph builder applies to every node.

Nodes do not call the recorder: :class:`agent_graph.graph.AtelierGraph` wraps each node it is
given (the built-in ones and users' own), so nothing can be forgotten. The wrapper

- times the node and numbers the step (``state.step_count``),
- turns an exception into a recorded failure (``error`` + ``stop_reason=error`` in the state),
  so one bad model answer never loses the trajectory,
- takes the node's :class:`~nodes.common.NodeTrace` out of its update,
- awaits ``recorder.record_step`` before the trajectory moves on (a step is durable first).
"""

from __future__ import annotations

import functools
import inspect
import operator
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic_core import to_jsonable_python

from nodes.common import TRACE_KEY, NodeTrace
from nodes.state import ReasonerState, StopReason


@dataclass(slots=True)  # one per recorded step: no per-instance __dict__
class StepRecord:
    trajectory_id: str
    seq: int
    node: str
    started_at: float
    """Unix time the step began."""
    latency_s: float
    state_before: dict[str, Any] | None
    """The full state the node saw (JSON-able): enough to replay or fork from this step. None
    when the recorder keeps snapshots only every few steps (``state_snapshot_every``) and this
    step is not one: the state is then the previous one merged with the previous update."""
    update: dict[str, Any]
    """The node's update (JSON-able), as merged into the state."""
    trace: NodeTrace = field(default_factory=NodeTrace)
    error: str | None = None
    state: Any = field(default=None, repr=False)
    """The state object itself, only with ``state_before`` None: a recorder may read a few
    fields of it (e.g. the mode, for the step's training stage) but never mutate it."""


class RecordingFailed(RuntimeError):
    """A step could not be recorded (e.g. the store went away): the trajectory cannot go on
    durably. The runner stops the run on it instead of recording the trajectory as failed, so
    ``resume`` later continues the trajectory from its last recorded step."""


@runtime_checkable
class Recorder(Protocol):
    async def start_trajectory(self, state: Any) -> None: ...
    async def record_step(self, record: StepRecord) -> None: ...
    async def finish_trajectory(
        self, trajectory_id: str, status: str, state: Any, error: str | None
    ) -> None: ...


class MemoryRecorder:
    """Keeps steps in memory, per trajectory. Forwards to ``inner`` when given."""

    def __init__(self, inner: Recorder | None = None) -> None:
        self.inner = inner
        self.steps: dict[str, list[StepRecord]] = {}

    async def start_trajectory(self, state: Any) -> None:
        self.steps.setdefault(state.trajectory_id, [])
        if self.inner is not None:
            await self.inner.start_trajectory(state)

    async def record_step(self, record: StepRecord) -> None:
        if self.inner is not None:
            await self.inner.record_step(record)
        self.steps.setdefault(record.trajectory_id, []).append(record)

    async def finish_trajectory(
        self, trajectory_id: str, status: str, state: Any, error: str | None
    ) -> None:
        if self.inner is not None:
            await self.inner.finish_trajectory(trajectory_id, status, state, error)


NodeFn = Callable[..., Any]


def _snapshot_due(recorder: Any, state: Any) -> bool:
    """Whether this step carries the full state, or only its update (a delta).

    Dumping the whole state at every step was the largest part of the recording's per-step
    cost (and of the bytes stored). A recorder that replays deltas sets
    ``state_snapshot_every`` = K: steps whose number is a multiple of K carry the state, the
    others only their update. Only for states whose reducers the store replays exactly (the
    reasoner's list-append ones); any other state type is always snapshot."""
    every = getattr(recorder, "state_snapshot_every", 1)
    if every <= 1 or state.step_count % every == 0:
        return True
    return not replayable(type(state))


@functools.cache
def replayable(state_type: type) -> bool:
    """True when merging a step's JSON update into the JSON state (list fields with a reducer
    appended, the rest replaced: ``storage.rows.merge_update``) gives the next state: the
    state's reducers are exactly ``ReasonerState``'s list appends."""
    reduced = {
        name: (_reducers(info), typing.get_origin(info.annotation))
        for name, info in state_type.model_fields.items()
        if _reducers(info)
    }
    return set(reduced) == _append_fields(ReasonerState) and all(
        reducers == [operator.add] and origin is list for reducers, origin in reduced.values()
    )


def _reducers(info: Any) -> list[Any]:
    return [meta for meta in info.metadata if callable(meta)]


def _append_fields(state_type: type) -> frozenset[str]:
    return frozenset(
        name
        for name, info in state_type.model_fields.items()
        if _reducers(info) and typing.get_origin(info.annotation) is list
    )


def recorded(name: str, node: NodeFn) -> NodeFn:
    """Wrap ``node`` (sync or async; with or without a ``runtime`` parameter) for recording."""
    takes_runtime = "runtime" in inspect.signature(node).parameters
    is_async = inspect.iscoroutinefunction(node)

    # ``state`` is left unannotated on purpose: LangGraph then hands the node the graph's own
    # state schema (a user's subclass included) rather than a schema read off this wrapper.
    async def run_recorded(state, runtime):  # type: ignore[no-untyped-def]
        started_at, started = time.time(), time.perf_counter()
        error: str | None = None
        try:
            result = node(state, runtime) if takes_runtime else node(state)
            if is_async or inspect.isawaitable(result):
                result = await result
            update = dict(result or {})
        except Exception as exc:
            error = f"{name}: {type(exc).__name__}: {exc}"
            update = {"error": error, "stop_reason": StopReason.ERROR}
        trace = update.pop(TRACE_KEY, None) or NodeTrace()
        update["step_count"] = state.step_count + 1
        recorder = getattr(runtime.context, "recorder", None) if runtime is not None else None
        if recorder is not None:
            snapshot = _snapshot_due(recorder, state)
            record = StepRecord(
                trajectory_id=state.trajectory_id,
                seq=state.step_count,
                node=name,
                started_at=started_at,
                latency_s=time.perf_counter() - started,
                state_before=state.model_dump(mode="json") if snapshot else None,
                update=to_jsonable_python(update),
                trace=trace,
                error=error,
                state=None if snapshot else state,
            )
            try:
                await recorder.record_step(record)
            except Exception as exc:  # the store's failure, not the node's
                raise RecordingFailed(
                    f"recording step {state.step_count} of trajectory {state.trajectory_id} "
                    f"failed: {type(exc).__name__}: {exc}"
                ) from exc
        return update

    run_recorded.__name__ = name
    run_recorded.__qualname__ = f"recorded[{name}]"
    return run_recorded
