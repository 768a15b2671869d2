"""reflect: compare the current image with its target; the stop policy decides what follows.

The target is the task prompt, or, while a decomposition is being executed, the expectation of
the sub-task just carried out. The reflection is parsed with R3's format; malformed output is
kept and flagged, never raised. A reflection that asks to go on but gives no usable instruction
spends a round (so the budget bounds retries).
"""

from __future__ import annotations

from langgraph.runtime import Runtime

from nodes.common import TRACE_KEY, NodeTrace, call_chat, derive_seed, step_rng
from nodes.context import ReasonerContext
from nodes.formats import parse_reflection
from nodes.prompts import reflect_messages
from nodes.state import Decision, Mode, ReasonerState, Reflection
from policies.base import StopObservation


def reflection_target(state: ReasonerState) -> str:
    if state.mode == Mode.DECOMPOSE and 0 < state.subtasks_done < len(state.subtasks):
        return state.subtasks[state.subtasks_done - 1].expect
    return state.task.prompt


async def reflect(state: ReasonerState, runtime: Runtime[ReasonerContext]) -> dict:
    ctx = runtime.context
    current = state.current_image
    if current is None:
        raise ValueError("reflect needs an image; the graph reached it before any draw")
    trace = NodeTrace(images_in=[current.ref])
    target = reflection_target(state)
    image = ctx.images.get(current.ref)
    generation = await call_chat(
        ctx.backends.reflector,
        "reflect",
        reflect_messages(target, image, current.ref),
        ctx.settings.sampling,
        derive_seed(state.task.seed, state.step_count, "reflect"),
        trace,
        fields={"target": target, "prompt": state.task.prompt},
    )
    parsed = parse_reflection(generation.text)
    obs = StopObservation(
        prompt=state.task.prompt,
        target=target,
        reflection=generation.text,
        stop_phrase=parsed.stop,
        well_formed=parsed.well_formed,
        rounds_used=state.rounds,
        max_rounds=state.budget.max_rounds,
        image_count=len(state.images),
        scores=tuple(r.score for r in state.images if r.score is not None),
    )
    action = ctx.stop_policy.choose_stop(obs, step_rng(state.task.seed, state.step_count, "stop"))
    accept = action.choice == "stop"
    update: dict = {
        TRACE_KEY: trace,
        "reflections": [
            Reflection(
                image_index=len(state.images) - 1,
                image_ref=current.ref,
                target=target,
                text=generation.text,
                thought=parsed.thought,
                instruction=parsed.instruction,
                stop_phrase=parsed.stop,
                well_formed=parsed.well_formed,
                accept=accept,
            )
        ],
        "decisions": [
            Decision(
                kind="stop",
                action=action.choice,
                log_prob=action.log_prob,
                policy=action.policy,
                version=action.version,
                step=state.step_count,
            )
        ],
    }
    if not accept and not parsed.instruction:
        update["rounds"] = state.rounds + 1
    return update
