"""Record ShapeWorld rollouts of a given (e.g. learned) mode_policy or stop policy into the store.

A GRPO iteration needs the policy version being trained as the behaviour policy: it goes into
the context ``agent_graph.rollout.rollout`` is given. The run's config names the policies
(name@version); ``resume_run`` asks for that context again rather than guess them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent_graph.presets import shapeworld_context
from agent_graph.rollout import rollout
from agent_graph.runner import TrajectoryResult
from nodes.context import GraphSettings
from nodes.state import Budget, Task
from policies.base import ModePolicy, StopPolicy

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


def shapeworld_policy_context(
    mode_policy: ModePolicy | None = None,
    stop_policy: StopPolicy | None = None,
    *,
    mode: str = "random",
    **kwargs: Any,
) -> Any:
    """``shapeworld_context(mode, ...)`` with ``mode_policy`` (when given) replacing its router."""
    ctx = shapeworld_context(mode, stop_policy=stop_policy, **kwargs)
    return dataclasses.replace(ctx, mode_policy=mode_policy) if mode_policy is not None else ctx


async def collect(
    store: TrajectoryStore,
    tasks: Sequence[Task],
    *,
    mode_policy: ModePolicy | None = None,
    stop_policy: StopPolicy | None = None,
    mode: str = "random",
    budget: Budget | None = None,
    name: str | None = None,
    concurrency: int = 64,
    settings: GraphSettings | None = None,
) -> tuple[str, list[TrajectoryResult]]:
    """Run ``tasks`` on ShapeWorld with these policies, recording every step; returns
    (run id, results). Without ``mode_policy``, ``mode`` picks a built-in one as in ``rollout``.
    The run records world ``shapeworld`` (its policies are named as code): Tree-RL forks and
    judges rebuild its backends from that."""
    context = shapeworld_policy_context(mode_policy, stop_policy, mode=mode, settings=settings)
    outcome = await rollout(
        store,
        tasks,
        context=context,
        world="shapeworld",
        budget=budget,
        name=name or "collect",
        concurrency=concurrency,
    )
    return outcome.run_id, outcome.results
