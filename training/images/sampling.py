"""Graph rollouts that draw the prompts themselves, recorded with their denoising transitions.

The draw node records each image's stochastic transitions (latents as blobs) with the step,
like every other output; a traced generator (e.g. ``FlowImageModel``) supplies them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.base import TextCompletion
from nodes.context import Backends, GraphSettings, ReasonerContext
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
from storage.recorder import SQLRecorder

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


class PromptPlanner:
    """A chat model for the plan node that answers with the task prompt itself, so the draw
    node draws the prompt (for training the image policy alone)."""

    model_id = "prompt-as-blueprint"

    async def chat(self, request: Any) -> Any:

        text = request.fields.get("prompt", "")
        return TextCompletion(text=text, model=self.model_id)


async def collect(
    painter: Any,
    store: TrajectoryStore,
    prompts: Sequence[str],
    *,
    group_size: int = 8,
    width: int = 32,
    height: int = 32,
    steps: int | None = None,
    seed: int = 0,
    name: str = "flow-draws",
    concurrency: int = 64,
) -> str:
    """Run the graph in direct mode (plan → draw → stop) for ``group_size`` samples of every
    prompt with ``painter`` (a traced generator, e.g. ``FlowImageModel``), recorded in
    ``store``. Returns the run id."""

    planner = PromptPlanner()
    run = store.create_run(name, {"kind": "flow-draws", "group_size": group_size, "seed": seed})
    tasks = make_group_tasks(list(prompts), group_size=group_size, seed=seed)
    tag = uuid.uuid4().hex[:8]  # group ids unique across runs
    tasks = [t.model_copy(update={"group_id": f"{tag}-{t.group_id}"}) for t in tasks]
    settings = GraphSettings(width=width, height=height, steps=steps, score_images=False)
    backends = Backends(planner, planner, planner, painter, painter)
    async with SQLRecorder(store, run.id) as recorder:
        context = ReasonerContext(
            backends=backends,
            mode_policy=FixedModePolicy("direct"),
            stop_policy=FollowReflectionStopPolicy(),
            images=store,
            settings=settings,
            recorder=recorder,
        )
        results = await Runner(context, concurrency=concurrency).run(tasks)
    failed = [r for r in results if r.status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} rollouts failed, e.g. {failed[0].error}")
    return run.id
