"""decompose: split the prompt into ordered sub-tasks (instruction + expected result)."""

from __future__ import annotations

from langgraph.runtime import Runtime

from nodes.common import TRACE_KEY, NodeTrace, call_chat, derive_seed
from nodes.context import ReasonerContext
from nodes.formats import SUBTASKS_SCHEMA, SubTask, parse_subtasks
from nodes.prompts import decompose_messages
from nodes.state import ReasonerState


async def decompose(state: ReasonerState, runtime: Runtime[ReasonerContext]) -> dict:
    ctx = runtime.context
    trace = NodeTrace()
    task = state.task
    generation = await call_chat(
        ctx.backends.decomposer,
        "decompose",
        decompose_messages(task.prompt),
        ctx.settings.sampling,
        derive_seed(task.seed, state.step_count, "decompose"),
        trace,
        fields={"prompt": task.prompt},
        response_format=_json_schema_format(),
    )
    steps, well_formed = parse_subtasks(generation.text)
    if not steps:
        # An unusable plan degrades to one step, the whole request: the trajectory goes on as
        # a reflect loop, and the malformed output stays recorded for training to punish.
        steps = [SubTask(instruction=state.blueprint or task.prompt, expect=task.prompt)]
    # No more steps than images left to make them with (escalate mode has made some already;
    # it escalates only with one left).
    steps = steps[: max(1, state.budget.max_images - len(state.images))]
    return {"subtasks": steps, "subtasks_well_formed": well_formed, TRACE_KEY: trace}


def _json_schema_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "subtasks", "schema": SUBTASKS_SCHEMA}}
