"""Every node step is recorded by one wrapper that the graph builder applies to every node.

Nodes do not call the recorder: :class:`agent_graph.graph.AtelierGraph` wraps each node it is
given (the built-in ones and users' own), so nothing can be forgotten. The wrapper

- times the node and numbers the step (``state.step_count``),
- turns an exception into a recorded failure (``error`` + ``stop_reason=error`` in the state),
  so one bad model answer never loses the trajectory,
- takes the node's :class:`~nodes.common.NodeTrace` out of its update,
- hands the recorder the state the node saw and its update, and awaits ``recorder.record_step``
  before the trajectory moves on (a step is durable first). How the state is kept (a full
  snapshot or a delta) is the recorder's decision alone.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from pydantic_core import to_jsonable_python

from nodes.common import TRACE_KEY, NodeTrace
from nodes.state import StopReason


@dataclass(slots=True)  # one per recorded step: no per-instance __dict__
class StepRecord:
    trajectory_id: str
    seq: int
    node: str
    started_at: float
    """Unix time the step began."""
    latency_s: float
    state_before: Any
    """The state the node saw: the state object itself (what the recording wrapper hands
    over), its JSON form, or None when the caller has none. Enough to replay or fork from this
    step; the recorder decides how to keep it (a full snapshot, or only the update: e.g.
    ``SQLRecorder.state_snapshot_every``). A recorder reads it but never mutates it."""
    update: dict[str, Any]
    """The node's update (JSON-able), as merged into the state."""
    trace: NodeTrace = field(default_factory=NodeTrace)
    error: str | None = None


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
    """Keeps steps in memory, per trajectory, each with its full state as JSON (what a
    runner's results hand back). Forwards the records, as given, to ``inner`` when given: how
    ``inner`` keeps the state is its own decision."""

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
        if hasattr(record.state_before, "model_dump"):  # the state object: keep a snapshot
            record = replace(record, state_before=record.state_before.model_dump(mode="json"))
        self.steps.setdefault(record.trajectory_id, []).append(record)

    async def finish_trajectory(
        self, trajectory_id: str, status: str, state: Any, error: str | None
    ) -> None:
        if self.inner is not None:
            await self.inner.finish_trajectory(trajectory_id, status, state, error)


NodeFn = Callable[..., Any]


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
            record = StepRecord(
                trajectory_id=state.trajectory_id,
                seq=state.step_count,
                node=name,
                started_at=started_at,
                latency_s=time.perf_counter() - started,
                state_before=state,
                update=to_jsonable_python(update),
                trace=trace,
                error=error,
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
