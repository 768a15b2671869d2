"""Record ShapeWorld rollouts of a given (e.g. learned) router or stop policy into the store.

A GRPO iteration needs the policy version being trained as the behaviour policy:
``agent_graph.rollout.rollout`` takes it as ``router=`` / ``stopper=``. The run's config names
the policies; ``resume_run`` refuses such a run rather than guess them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from agent_graph.presets import shapeworld_context
from agent_graph.rollout import rollout
from agent_graph.runner import TrajectoryResult
from nodes.context import GraphSettings
from nodes.state import Budget, Task
from policies.base import ModePolicy, StopPolicy


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
    return await rollout(
        store,
        tasks,
        mode=mode,
        router=router,
        stopper=stopper,
        settings=settings,
        budget=budget,
        name=name or "collect",
        concurrency=concurrency,
    )
