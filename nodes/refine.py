"""refine: edit the current image, either to correct it or to carry out the next sub-task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from langgraph.runtime import Runtime

from nodes.backends.base import EditRequest, TracedImageModel
from nodes.common import TRACE_KEY, NodeTrace, derive_seed, save_image
from nodes.context import ReasonerContext
from nodes.state import Mode, ReasonerState


@dataclass(frozen=True)
class PendingEdit:
    instruction: str
    kind: Literal["correction", "subtask"]


def next_edit(state: ReasonerState) -> PendingEdit | None:
    """The edit the trajectory should make next, or None. The single source of truth for both
    the refine node and the graph's routing."""
    if state.error is not None or not state.images or not state.image_budget_left:
        return None
    if state.path == Mode.DECOMPOSE and state.subtasks_done == 0:
        # Nothing drawn on this path yet: escalate mode's decompose stage starts a fresh canvas,
        # so the rejected image of the stage before is not edited (its verdict is context only).
        return None
    last = state.reflections[-1] if state.reflections else None
    on_current = last is not None and last.image_index == len(state.images) - 1
    if on_current and not last.accept and last.instruction and state.correction_budget_left:
        return PendingEdit(last.instruction, "correction")
    if state.path == Mode.DECOMPOSE and state.subtasks_done < len(state.subtasks):
        return PendingEdit(state.subtasks[state.subtasks_done].instruction, "subtask")
    return None


async def refine(state: ReasonerState, runtime: Runtime[ReasonerContext]) -> dict:
    ctx = runtime.context
    edit = next_edit(state)
    current = state.current_image
    if edit is None or current is None:
        raise ValueError("refine reached with nothing to edit")
    trace = NodeTrace(images_in=[current.ref])
    request = EditRequest(
        image=ctx.images.get(current.ref),
        instruction=edit.instruction,
        seed=derive_seed(state.task.seed, state.step_count, "refine"),
        steps=ctx.settings.steps,
    )
    editor = ctx.backends.editor
    trace.models.append(editor.model_id)
    if isinstance(editor, TracedImageModel):  # records its Flow-GRPO transitions
        traced = await editor.edit_traced(request)
        image = traced.image
        trace.transitions.extend(traced.transitions)
    else:
        image = await editor.edit(request)
    update: dict = {
        TRACE_KEY: trace,
        "images": [await save_image(ctx, state, image, "refine", edit.instruction, trace)],
    }
    if edit.kind == "correction":
        update["rounds"] = state.rounds + 1
    else:
        update["subtasks_done"] = state.subtasks_done + 1
    return update
