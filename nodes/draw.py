"""draw: generate the first image, from the blueprint or the first sub-task.

In escalate mode's decompose stage it draws again, on a fresh canvas: the first sub-task.
"""

from __future__ import annotations

from langgraph.runtime import Runtime

from nodes.backends.base import ImageRequest, TracedImageModel
from nodes.common import TRACE_KEY, NodeTrace, derive_seed, save_image
from nodes.context import ReasonerContext
from nodes.state import Mode, ReasonerState


async def draw(state: ReasonerState, runtime: Runtime[ReasonerContext]) -> dict:
    ctx = runtime.context
    trace = NodeTrace()
    update: dict = {TRACE_KEY: trace}
    if state.path == Mode.DECOMPOSE and state.subtasks:
        text = state.subtasks[0].instruction
        update["subtasks_done"] = 1
    else:
        text = state.blueprint or state.task.prompt
    settings = ctx.settings
    request = ImageRequest(
        prompt=text,
        width=settings.width,
        height=settings.height,
        steps=settings.steps,
        seed=derive_seed(state.task.seed, state.step_count, "draw"),
    )
    generator = ctx.backends.generator
    trace.models.append(generator.model_id)
    if isinstance(generator, TracedImageModel):  # records its Flow-GRPO transitions
        traced = await generator.generate_traced(request)
        image = traced.image
        trace.transitions.extend(traced.transitions)
    else:
        image = await generator.generate(request)
    update["images"] = [await save_image(ctx, state, image, "draw", text, trace)]
    return update
