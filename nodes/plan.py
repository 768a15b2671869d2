"""plan: choose the mode (a policy decision) and expand the prompt into a blueprint.

In escalate mode ``plan`` also opens the first stage, direct: the blueprint is its text.
"""

from __future__ import annotations

from langgraph.runtime import Runtime

from nodes.common import TRACE_KEY, NodeTrace, call_chat, derive_seed, step_rng
from nodes.context import ReasonerContext
from nodes.prompts import plan_messages
from nodes.state import Decision, Mode, ReasonerState, StageStart
from policies.base import ModeObservation


async def plan(state: ReasonerState, runtime: Runtime[ReasonerContext]) -> dict:
    ctx = runtime.context
    trace = NodeTrace()
    update: dict = {TRACE_KEY: trace}
    task = state.task
    mode = state.mode
    if mode is None:  # a forked or user-built state may already fix the mode
        obs = ModeObservation(prompt=task.prompt, input_image_count=len(task.input_images))
        action = ctx.mode_policy.choose_mode(obs, step_rng(task.seed, state.step_count, "mode"))
        update["mode"] = mode = Mode(action.choice)
        update["decisions"] = [
            Decision(
                kind="mode",
                action=action.choice,
                log_prob=action.log_prob,
                policy=action.policy,
                version=action.version,
                step=state.step_count,
            )
        ]
    if mode == Mode.ESCALATE and state.stage is None:
        update["stage"] = Mode.DIRECT
        start = StageStart(
            stage=Mode.DIRECT,
            step=state.step_count,
            image_index=len(state.images),
            reflection_index=len(state.reflections),
        )
        update["stages"] = [*state.stages, start]
    generation = await call_chat(
        ctx.backends.planner,
        "plan",
        plan_messages(task.prompt),
        ctx.settings.sampling,
        derive_seed(task.seed, state.step_count, "plan"),
        trace,
        fields={"prompt": task.prompt},
    )
    update["blueprint"] = generation.text.strip() or task.prompt
    return update
