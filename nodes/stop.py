"""stop: settle the final image, the stop reason, and the judge's verdict."""

from __future__ import annotations

from langgraph.runtime import Runtime

from nodes.common import TRACE_KEY, NodeTrace
from nodes.context import ReasonerContext
from nodes.state import FinalJudgement, Mode, ReasonerState, StopReason


def stop_reason(state: ReasonerState) -> StopReason:
    if state.error is not None or not state.images:
        return StopReason.ERROR
    if state.stop_reason is not None:
        # A node before stop already decided why the trajectory ends, e.g. a custom judge
        # node that accepted the image without a reflection (examples/reflect_with_judge.py).
        return state.stop_reason
    if state.mode == Mode.DIRECT:
        return StopReason.DONE
    last = state.reflections[-1] if state.reflections else None
    if last is not None and last.accept and last.image_index == len(state.images) - 1:
        return StopReason.ACCEPTED
    return StopReason.BUDGET


async def stop(state: ReasonerState, runtime: Runtime[ReasonerContext]) -> dict:
    ctx = runtime.context
    trace = NodeTrace()
    update: dict = {TRACE_KEY: trace, "stop_reason": stop_reason(state)}
    final = state.current_image
    if final is None:
        if state.error is None:
            update["error"] = "the trajectory ended without an image"
        return update
    update["final_image"] = final.ref
    judge = ctx.backends.judge
    if judge is not None:
        trace.images_in.append(final.ref)
        trace.models.append(judge.model_id)
        verdict = await judge.judge(ctx.images.get(final.ref), state.task.prompt)
        update["judgement"] = FinalJudgement(
            score=float(verdict.score),
            correct=bool(verdict.correct),
            criteria=dict(verdict.criteria),
            model=judge.model_id,
        )
    return update
