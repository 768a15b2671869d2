"""Run many prompts × G samples (a group per prompt) concurrently, and return typed results."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agent_graph.context import ReasonerContext
from agent_graph.graph import build_reasoner, step_limit
from agent_graph.recording import MemoryRecorder, StepRecord
from agent_graph.state import Budget, ReasonerState, Task
from nodes.common import derive_seed

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

    ``keep_steps`` keeps every step record in the results (and still forwards them to the
    context's recorder, if any).
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
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.context = context
        self.graph = graph if graph is not None else build_reasoner()
        self.concurrency = concurrency
        self.budget = budget or Budget()
        self.keep_steps = keep_steps
        self.state_factory = state_factory or _initial_state

    async def run(
        self, tasks: Sequence[Task], *, progress: bool = False, description: str = "trajectories"
    ) -> list[TrajectoryResult]:
        collector = MemoryRecorder(inner=self.context.recorder) if self.keep_steps else None
        context = replace(self.context, recorder=collector) if collector else self.context
        limiter = asyncio.Semaphore(self.concurrency)
        bar = _progress(progress, len(tasks), description)

        async def one(task: Task) -> TrajectoryResult:
            async with limiter:
                result = await self._run_one(task, context)
            if collector is not None:
                result.steps = collector.steps.pop(result.trajectory_id, [])
            bar.advance()
            return result

        with bar:
            return list(await asyncio.gather(*(one(task) for task in tasks)))

    async def run_one(self, task: Task) -> TrajectoryResult:
        return (await self.run([task]))[0]

    async def _run_one(self, task: Task, context: ReasonerContext) -> TrajectoryResult:
        state = self.state_factory(task, self.budget)
        recorder = context.recorder
        started = time.perf_counter()
        if recorder is not None:
            await recorder.start_trajectory(state)
        final: ReasonerState | None = None
        try:
            output = await self.graph.ainvoke(
                state, context=context, config={"recursion_limit": step_limit(state)}
            )
            final = type(state).model_validate(output)
            error = final.error
            if error is None and final.final_image is None:
                error = "the trajectory ended without a final image"
        except Exception as exc:
            error = f"graph: {type(exc).__name__}: {exc}"
        status: Status = "succeeded" if error is None else "failed"
        if recorder is not None:
            await recorder.finish_trajectory(state.trajectory_id, status, final, error)
        return TrajectoryResult(
            trajectory_id=state.trajectory_id,
            task=task,
            status=status,
            state=final,
            error=error,
            duration_s=time.perf_counter() - started,
        )


def _initial_state(task: Task, budget: Budget) -> ReasonerState:
    return ReasonerState(trajectory_id=uuid.uuid4().hex, task=task, budget=budget)


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
