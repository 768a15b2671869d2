"""Record ShapeWorld rollouts of a given (e.g. learned) router or stop policy into the store.

``agent_graph.rollout.rollout`` takes a mode name; a GRPO iteration needs the policy version
being trained as the behaviour policy, so this builds the same context and swaps it in
(``dataclasses.replace(ctx, router=...)``). The run's config names the policies; such a run
cannot be rebuilt by ``agent_graph.rollout.resume_run`` (it only knows mode names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from agent_graph.context import GraphSettings
from agent_graph.presets import shapeworld_context
from agent_graph.rollout import run_config
from agent_graph.runner import Runner, TrajectoryResult
from agent_graph.state import Budget, Task
from policies.base import ModePolicy, StopPolicy


def _label(policy: Any) -> str:
    return f"{policy.name}@{policy.version}"


def shapeworld_policy_context(
    router: ModePolicy | None = None,
    stopper: StopPolicy | None = None,
    *,
    mode: str = "random",
    **kwargs: Any,
) -> Any:
    """``shapeworld_context(mode, ...)`` with ``router`` (when given) replacing its router."""
    ctx = shapeworld_context(mode, stopper=stopper, **kwargs)
    return dataclasses.replace(ctx, router=router) if router is not None else ctx


async def collect(
    store: Any,
    tasks: Sequence[Task],
    *,
    router: ModePolicy | None = None,
    stopper: StopPolicy | None = None,
    mode: str = "random",
    budget: Budget | None = None,
    name: str | None = None,
    concurrency: int = 64,
    settings: GraphSettings | None = None,
) -> tuple[str, list[TrajectoryResult]]:
    """Run ``tasks`` on ShapeWorld with these policies, recording every step; returns
    (run id, results). Without ``router``, ``mode`` picks a built-in one as in ``rollout``."""
    from storage.recorder import SQLRecorder

    budget = budget or Budget()
    label = f"policy:{_label(router)}" if router is not None else mode
    config = run_config(label, budget)
    if stopper is not None:
        config["stopper"] = _label(stopper)
    if settings is not None:
        config["settings"] = {"width": settings.width, "height": settings.height}
    run = store.create_run(name, config)
    async with SQLRecorder(store, run.id) as recorder:
        ctx = shapeworld_policy_context(
            router, stopper, mode=mode, images=store, recorder=recorder, settings=settings
        )
        runner = Runner(ctx, concurrency=concurrency, budget=budget, keep_steps=False)
        states = [runner.state_factory(task, budget) for task in tasks]
        store.register_trajectories(run.id, states)
        results = await runner.resume([(s, None) for s in states], description=name or "collect")
    return run.id, results
