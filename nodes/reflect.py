"""reflect: compare the current image with its target; the stop policy decides what follows.

The target is the task prompt, or, while a decomposition is being executed, the expectation of
the sub-task just carried out. The reflection is parsed with R3's format; malformed output is
kept and flagged, never raised. A reflection that asks to go on but gives no usable instruction
spends a round (so the budget bounds retries).

In escalate mode the reflection is also the verdict that escalates: a rejected image moves the
direct stage on to reflect, and a rejection that leaves the reflect stage no correction round
moves it on to decompose (:func:`escalation`). The reflector's verdict, not the judge's score, is
what decides: it is what the graph knows at run time (the judge grades the outcome afterwards).
"""

from __future__ import annotations

from langgraph.runtime import Runtime

from nodes.common import TRACE_KEY, NodeTrace, call_chat, derive_seed, step_rng
from nodes.context import ReasonerContext
from nodes.formats import parse_reflection
from nodes.prompts import reflect_messages
from nodes.state import Decision, Mode, ReasonerState, Reflection, StageStart
from policies.base import StopObservation


def reflection_target(state: ReasonerState) -> str:
    if state.path == Mode.DECOMPOSE and 0 < state.subtasks_done < len(state.subtasks):
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
    rounds = state.rounds
    if not accept and not parsed.instruction and rounds < state.round_limit:
        rounds += 1  # a retry may follow; a verdict with no round left to retry spends none
    if rounds != state.rounds:
        update["rounds"] = rounds
    stage = escalation(state, accept, rounds)
    if stage is not None:
        start = StageStart(
            stage=stage,
            step=state.step_count + 1,  # the next step is the new stage's first
            image_index=len(state.images),
            reflection_index=len(state.reflections) + 1,
        )
        update["stage"] = stage
        update["stages"] = [*state.stages, start]
        if stage == Mode.DECOMPOSE:
            update["rounds"] = 0  # a fresh canvas with its own correction budget
    return update


def escalation(state: ReasonerState, accept: bool, rounds: int) -> Mode | None:
    """The stage an escalate trajectory moves to after a verdict on its current image, or None
    to stay. ``rounds``: the stage's rounds once this reflection is counted (an unusable one
    spends a round while one is left).

    A rejection in the direct stage opens the reflect stage, or the decompose stage when the
    reflect stage has no round to spend; a rejection in the reflect stage with no round left
    for a correction or a retry opens the decompose stage. Nothing opens without an image left
    in the budget to draw (the trajectory then stops on the budget in the stage it is in)."""
    if state.mode != Mode.ESCALATE or accept or state.stage == Mode.DECOMPOSE:
        return None
    if not state.image_budget_left:
        return None
    if rounds < state.round_limit:  # the reflect stage's: a correction or retry may follow
        return Mode.REFLECT if state.stage == Mode.DIRECT else None
    return Mode.DECOMPOSE
