"""Run many prompts × G samples (a group per prompt) concurrently, and return typed results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, is_dataclass, replace
from enum import Enum
from typing import Any, Literal, get_args

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import BaseModel

from agent_graph.graph import build_reasoner, step_limit
from agent_graph.ids import time_ordered_id
from agent_graph.recording import MemoryRecorder, RecordingFailed, StepRecord
from nodes.common import derive_seed
from nodes.context import ReasonerContext
from nodes.state import Budget, ReasonerState, Task
from storage.claims import ClaimLost

Status = Literal["succeeded", "failed"]


@dataclass
class TrajectoryResult:
    trajectory_id: str
    task: Task
    status: Status
    state: ReasonerState | None
    """The final state; None only when the graph itself broke before producing one."""
    error: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def score(self) -> float | None:
        judgement = self.state.judgement if self.state else None
        return judgement.score if judgement else None

    @property
    def correct(self) -> bool:
        judgement = self.state.judgement if self.state else None
        return bool(judgement and judgement.correct)

    @property
    def image_count(self) -> int:
        return len(self.state.images) if self.state else 0

    @property
    def mode(self) -> str | None:
        return self.state.mode.value if self.state and self.state.mode else None


def make_group_tasks(
    prompts: Sequence[str],
    group_size: int = 1,
    seed: int = 0,
    categories: Sequence[str | None] | None = None,
) -> list[Task]:
    """G tasks per prompt; samples of one prompt share a group id and differ by seed."""
    if group_size < 1:
        raise ValueError("group_size must be at least 1")
    tasks = []
    for index, prompt in enumerate(prompts):
        group_id = f"g{index:05d}-{derive_seed(seed, prompt, index) % 16**8:08x}"
        category = categories[index] if categories is not None else None
        for sample in range(group_size):
            tasks.append(
                Task(
                    prompt=prompt,
                    group_id=group_id,
                    sample_index=sample,
                    seed=derive_seed(seed, index, sample),
                    category=category,
                )
            )
    return tasks


class Runner:
    """Runs a compiled graph over many tasks with bounded concurrency.

    At most ``concurrency`` trajectories are in flight; they are admitted in the order given
    (a trajectory's asyncio task exists only once admitted, so 100k queued tasks cost nothing).
    ``keep_groups_together`` admits the G samples of a group (same ``task.group_id``) as one
    block, once ``min(G, concurrency)`` slots are free: the samples run side by side (servers
    see one prompt's requests together, which prefix caches reward) and a group finishes
    together instead of trailing its last member behind later groups.
    ``keep_steps`` keeps every step record in the results (and still forwards them to the
    context's recorder, if any). A :class:`~agent_graph.recording.RecordingFailed` (the store
    is gone) stops the run: the trajectories in flight are cancelled, left unfinished in the
    store for ``resume``, and the error is raised. A trajectory whose recorder says it is no
    longer this process's (:class:`~storage.claims.ClaimLost`: a rollout worker whose lease
    passed) is dropped: no result, nothing more recorded, the rest go on.
    """

    def __init__(
        self,
        context: ReasonerContext,
        graph: Any = None,
        *,
        concurrency: int = 32,
        budget: Budget | None = None,
        keep_steps: bool = True,
        state_factory: Callable[[Task, Budget], ReasonerState] | None = None,
        keep_groups_together: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.context = context
        self.graph = graph if graph is not None else build_reasoner()
        self.concurrency = concurrency
        self.keep_groups_together = keep_groups_together
        self.budget = budget or Budget()
        self.keep_steps = keep_steps
        self.state_factory = state_factory or _initial_state
        self._saver: InMemorySaver | None = None
        self._resumable: Any = None

    async def run(
        self, tasks: Sequence[Task], *, progress: bool = False, description: str = "trajectories"
    ) -> list[TrajectoryResult]:
        """Run each task from the start of the graph."""
        starts = [(self.state_factory(task, self.budget), None) for task in tasks]
        return await self._run_all(starts, progress, description)

    async def resume(
        self,
        points: Sequence[tuple[ReasonerState, str | None]],
        *,
        progress: bool = False,
        description: str = "resumed",
    ) -> list[TrajectoryResult]:
        """Continue trajectories from recorded states.

        Each point is (state after the last recorded step, that step's node); the graph goes
        on along the edges out of that node, exactly as if it had never stopped. ``None`` as
        the node starts the state from the beginning of the graph.
        """
        return await self._run_all(list(points), progress, description)

    async def run_one(self, task: Task) -> TrajectoryResult:
        return (await self.run([task]))[0]

    async def _run_all(
        self, starts: list[tuple[ReasonerState, str | None]], progress: bool, description: str
    ) -> list[TrajectoryResult]:
        collector = MemoryRecorder(inner=self.context.recorder) if self.keep_steps else None
        context = replace(self.context, recorder=collector) if collector else self.context
        slots = asyncio.Semaphore(self.concurrency)
        results: list[TrajectoryResult | None] = [None] * len(starts)
        bar = _progress(progress, len(starts), description)

        failures: list[Exception] = []
        settled = asyncio.Event()  # set on the first failure, or when the last one finished
        running: set[asyncio.Task[None]] = set()
        admitted_all = False

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            if admitted_all and not running:
                settled.set()

        async def one(index: int) -> None:
            state, after_node = starts[index]
            try:
                result = await self._run_one(state, after_node, context)
            except Exception as exc:  # the store failed (RecordingFailed): stop the run
                failures.append(exc)
                settled.set()
                return
            finally:
                slots.release()
            if result is None:  # another worker holds the trajectory now
                bar.advance()
                return
            if collector is not None:
                result.steps = collector.steps.pop(result.trajectory_id, [])
            results[index] = result
            bar.advance()

        try:
            with bar:
                for block in self._admission_blocks([state for state, _ in starts]):
                    # Only this loop acquires slots, so blocks are admitted in order.
                    for _ in block:
                        await slots.acquire()
                        if failures:
                            break
                    if failures:
                        break
                    for index in block:
                        task = asyncio.ensure_future(one(index))
                        running.add(task)
                        task.add_done_callback(finished)
                admitted_all = True
                if running and not failures:
                    await settled.wait()
        finally:  # on a failure (or our own cancellation) stop what is still in flight
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(set(running))
        if failures:
            raise failures[0]
        return [result for result in results if result is not None]

    def _admission_blocks(self, states: Sequence[ReasonerState]) -> list[list[int]]:
        """Indices of ``starts`` in admission order, in blocks admitted together."""
        if not self.keep_groups_together:
            return [[index] for index in range(len(states))]
        groups: dict[str, list[int]] = {}
        for index, state in enumerate(states):
            groups.setdefault(state.task.group_id, []).append(index)
        size = self.concurrency
        return [
            members[start : start + size]
            for members in groups.values()
            for start in range(0, len(members), size)
        ]

    async def _run_one(
        self, state: ReasonerState, after_node: str | None, context: ReasonerContext
    ) -> TrajectoryResult | None:
        """The trajectory's result; None when its claim was lost (see the class doc)."""
        try:
            return await self._run_claimed(state, after_node, context)
        except ClaimLost:
            return None
        except RecordingFailed as exc:
            if isinstance(exc.__cause__, ClaimLost):
                return None
            raise

    async def _run_claimed(
        self, state: ReasonerState, after_node: str | None, context: ReasonerContext
    ) -> TrajectoryResult:
        recorder = context.recorder
        started = time.perf_counter()
        if recorder is not None:
            await recorder.start_trajectory(state)
        final: ReasonerState | None = None
        try:
            limit = {"recursion_limit": step_limit(state)}
            if after_node is None:
                output = await self.graph.ainvoke(state, context=context, config=limit)
            else:
                output = await self._continue(state, after_node, context, limit)
            final = type(state).model_validate(output)
            error = final.error
            if error is None and final.final_image is None:
                error = "the trajectory ended without a final image"
        except RecordingFailed:  # the store's failure, not the trajectory's: stop the run
            raise
        except Exception as exc:  # the graph itself broke: a failed trajectory, not a crash
            error = f"graph: {type(exc).__name__}: {exc}"
        status: Status = "succeeded" if error is None else "failed"
        if recorder is not None:
            await recorder.finish_trajectory(state.trajectory_id, status, final, error)
        return TrajectoryResult(
            trajectory_id=state.trajectory_id,
            task=state.task,
            status=status,
            state=final,
            error=error,
            duration_s=time.perf_counter() - started,
        )

    async def _continue(
        self, state: ReasonerState, after_node: str, context: ReasonerContext, limit: dict
    ) -> Any:
        # LangGraph continues from a node only through a checkpoint: write the recorded state
        # as that node's output into a throwaway in-memory checkpointer, then go on from it.
        if self._resumable is None:
            self._saver = InMemorySaver(
                serde=JsonPlusSerializer(allowed_msgpack_modules=_model_types(type(state)))
            )
            self._resumable = self.graph.builder.compile(checkpointer=self._saver)
        config = {"configurable": {"thread_id": state.trajectory_id}, **limit}
        try:
            await self._resumable.aupdate_state(config, state, as_node=after_node)
            return await self._resumable.ainvoke(None, config, context=context)
        finally:
            self._saver.delete_thread(state.trajectory_id)


def _model_types(model: type[BaseModel]) -> list[tuple[str, str]]:
    """Every pydantic model, dataclass and enum a state type holds: what a checkpoint of it
    may contain (LangGraph's serializer refuses other types)."""
    found: dict[type, None] = {}

    def visit(annotation: Any) -> None:
        for arg in get_args(annotation):
            visit(arg)
        if not isinstance(annotation, type) or annotation in found:
            return
        if issubclass(annotation, BaseModel):
            found[annotation] = None
            for field_info in annotation.model_fields.values():
                visit(field_info.annotation)
        elif issubclass(annotation, Enum) or is_dataclass(annotation):
            found[annotation] = None

    visit(model)
    return [(cls.__module__, cls.__name__) for cls in found]


def _initial_state(task: Task, budget: Budget) -> ReasonerState:
    return ReasonerState(trajectory_id=time_ordered_id(), task=task, budget=budget)


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self) -> None:
        return None


class _RichProgress(_NoProgress):
    def __init__(self, total: int, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> _RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def advance(self) -> None:
        self._progress.advance(self._task)


def _progress(enabled: bool, total: int, description: str) -> _NoProgress:
    return _RichProgress(total, description) if enabled else _NoProgress()
