"""Every mode's path through the real LangGraph graph, the budget, and bad model output."""

from __future__ import annotations

import math

import pytest

from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.base import BackendError
from nodes.context import Backends, ReasonerContext
from nodes.formats import SubTask, format_subtasks
from nodes.state import Budget, Mode, ReasonerState, StopReason, Task
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy, UniformModePolicy
from tests.scripted import CountingPainter, FixedJudge, ScriptedChat

EDIT = "<think>The image lacks a circle.</think>Add one red circle."
STOP = "<think>It matches.</think>No further edit needed."


def make_context(mode: str, reflections: list[str], decomposition: str = "", judge=None):
    painter = CountingPainter()
    backends = Backends(
        planner=ScriptedChat(["BLUEPRINT"]),
        reflector=ScriptedChat(reflections or [STOP]),
        decomposer=ScriptedChat([decomposition or "{}"]),
        generator=painter,
        editor=painter,
        judge=judge or FixedJudge(0.75),
    )
    router = UniformModePolicy() if mode == "auto" else FixedModePolicy(mode)
    return ReasonerContext(
        backends=backends, mode_policy=router, stop_policy=FollowReflectionStopPolicy()
    )


async def run(context, prompt="two red circles", budget=None, seed=0):
    runner = Runner(context, budget=budget or Budget())
    return await runner.run_one(Task(prompt=prompt, seed=seed))


def nodes_of(result):
    return [step.node for step in result.steps]


async def test_direct_mode_draws_once_from_the_blueprint():
    ctx = make_context("direct", [])
    result = await run(ctx)
    assert result.status == "succeeded"
    assert nodes_of(result) == ["plan", "draw", "stop"]
    state = result.state
    assert state.mode == Mode.DIRECT and state.stop_reason == StopReason.DONE
    assert [img.node for img in state.images] == ["draw"]
    assert ctx.backends.generator.calls == ["generate:BLUEPRINT"]
    assert state.final_image == state.images[0].ref
    assert state.judgement.score == 0.75 and state.images[0].score == 0.75
    assert [(d.kind, d.action, d.log_prob) for d in state.decisions] == [("mode", "direct", 0.0)]
    assert ctx.backends.reflector.requests == []


async def test_reflect_mode_edits_until_the_stop_phrase():
    ctx = make_context("reflect", [EDIT, EDIT, STOP])
    result = await run(ctx)
    assert nodes_of(result) == [
        "plan",
        "draw",
        "reflect",
        "refine",
        "reflect",
        "refine",
        "reflect",
        "stop",
    ]
    state = result.state
    assert state.rounds == 2 and len(state.images) == 3
    assert state.stop_reason == StopReason.ACCEPTED
    assert ctx.backends.editor.calls[1:] == ["edit:Add one red circle."] * 2
    assert [r.accept for r in state.reflections] == [False, False, True]
    assert all(r.well_formed for r in state.reflections)
    # Each reflection is about the newest image, and sees that image's pixels.
    assert [r.image_index for r in state.reflections] == [0, 1, 2]
    sent = [req.messages[-1].images[0] for req in ctx.backends.reflector.requests]
    stored = [ctx.images.get(img.ref) for img in state.images]
    assert [a.tobytes() for a in sent] == [b.tobytes() for b in stored]


@pytest.mark.parametrize("max_rounds", [0, 1, 4])
async def test_round_budget_bounds_a_reflector_that_never_stops(max_rounds):
    ctx = make_context("reflect", [EDIT])
    result = await run(ctx, budget=Budget(max_rounds=max_rounds))
    state = result.state
    assert result.status == "succeeded"
    assert state.rounds == max_rounds
    assert len(state.images) == 1 + max_rounds
    # After the last permitted edit the graph stops without another reflection (so a budget
    # of 0 makes the reflect mode a direct draw).
    assert len(state.reflections) == max_rounds
    assert state.stop_reason == StopReason.BUDGET


async def test_image_budget_bounds_the_loop_too():
    ctx = make_context("reflect", [EDIT])
    result = await run(ctx, budget=Budget(max_rounds=10, max_images=3))
    assert len(result.state.images) == 3
    assert result.state.stop_reason == StopReason.BUDGET


@pytest.mark.parametrize(
    "text",
    [
        "<think>ok</think>no further edit needed",
        "<think>ok</think>NO FURTHER EDIT NEEDED!",
        "<think>ok</think>  No further edits needed. ",
    ],
)
async def test_stop_phrase_is_recognised_case_insensitively(text):
    result = await run(make_context("reflect", [text]))
    state = result.state
    assert state.reflections[0].stop_phrase and state.reflections[0].accept
    assert state.reflections[0].well_formed
    assert nodes_of(result)[-2:] == ["reflect", "stop"]


async def test_malformed_reflection_with_an_instruction_is_flagged_and_still_used():
    ctx = make_context("reflect", ["Add one blue square.", STOP])
    result = await run(ctx)
    first = result.state.reflections[0]
    assert not first.well_formed and not first.stop_phrase
    assert first.instruction == "Add one blue square."
    assert ctx.backends.editor.calls[-1] == "edit:Add one blue square."
    assert result.state.stop_reason == StopReason.ACCEPTED


@pytest.mark.parametrize(
    "garbage",
    ["", "<think>unfinished thought", "<think>x</think>", "<think>a</think><think>b</think>"],
)
async def test_unusable_reflections_spend_rounds_and_the_budget_ends_the_loop(garbage):
    ctx = make_context("reflect", [garbage])
    result = await run(ctx, budget=Budget(max_rounds=3))
    state = result.state
    assert result.status == "succeeded"
    assert not any(r.well_formed for r in state.reflections)
    edits = [c for c in ctx.backends.editor.calls if c.startswith("edit:")]
    # Each reflection either produced an edit or was retried; both spend a round.
    assert state.rounds == 3
    assert len(state.reflections) + len(edits) >= 3
    assert state.stop_reason == StopReason.BUDGET


async def test_stop_phrase_without_think_block_still_stops_but_is_not_well_formed():
    result = await run(make_context("reflect", ["no further edit needed"]))
    reflection = result.state.reflections[0]
    assert reflection.stop_phrase and not reflection.well_formed and reflection.accept
    assert len(result.state.images) == 1


async def test_decompose_mode_executes_subtasks_in_order_with_evaluation():
    steps = [
        SubTask("Draw two red circles.", "two red circles"),
        SubTask("Add a blue square right of them.", "two red circles left of a blue square"),
        SubTask("Add a star above.", "everything"),
    ]
    ctx = make_context("decompose", [STOP], decomposition=format_subtasks(steps))
    result = await run(ctx, prompt="the full prompt")
    assert nodes_of(result) == [
        "plan",
        "decompose",
        "draw",
        "reflect",
        "refine",
        "reflect",
        "refine",
        "reflect",
        "stop",
    ]
    state = result.state
    assert state.subtasks_well_formed and state.subtasks == steps
    assert ctx.backends.generator.calls == [
        "generate:Draw two red circles.",
        "edit:Add a blue square right of them.",
        "edit:Add a star above.",
    ]
    # Intermediate checks use each step's expectation; the last one checks the whole prompt.
    assert [r.target for r in state.reflections] == [
        "two red circles",
        "two red circles left of a blue square",
        "the full prompt",
    ]
    assert state.rounds == 0 and state.stop_reason == StopReason.ACCEPTED
    # The decomposer was asked for structured output.
    assert ctx.backends.decomposer.requests[0].response_format["type"] == "json_schema"


async def test_decompose_corrections_share_the_round_budget():
    steps = [SubTask("Draw a.", "a"), SubTask("Add b.", "a and b")]
    ctx = make_context("decompose", [EDIT], decomposition=format_subtasks(steps))
    result = await run(ctx, budget=Budget(max_rounds=2))
    state = result.state
    assert state.rounds == 2
    assert state.subtasks_done == 2  # the second step is still carried out
    assert [i.instruction for i in state.images] == [
        "Draw a.",
        "Add one red circle.",
        "Add one red circle.",
        "Add b.",
    ]
    assert state.stop_reason == StopReason.BUDGET


@pytest.mark.parametrize(
    "bad", ["not json", '{"steps": []}', '{"steps": [{"instruction": 3}]}', "[1, 2]"]
)
async def test_malformed_decomposition_falls_back_to_one_step(bad):
    ctx = make_context("decompose", [STOP], decomposition=bad)
    result = await run(ctx, prompt="p")
    state = result.state
    assert result.status == "succeeded"
    assert state.subtasks_well_formed is False
    assert [(s.instruction, s.expect) for s in state.subtasks] == [("BLUEPRINT", "p")]
    assert ctx.backends.generator.calls == ["generate:BLUEPRINT"]


class BrokenPainter(CountingPainter):
    async def generate(self, request):
        raise BackendError("image server at http://127.0.0.1:9/ refused the connection")


async def test_backend_failure_is_a_recorded_failure_not_a_crash():
    ctx = make_context("reflect", [STOP])
    painter = BrokenPainter()
    ctx = ReasonerContext(
        backends=Backends(
            ctx.backends.planner,
            ctx.backends.reflector,
            ctx.backends.decomposer,
            painter,
            painter,
            None,
        ),
        mode_policy=ctx.mode_policy,
        stop_policy=ctx.stop_policy,
    )
    result = await run(ctx)
    assert result.status == "failed"
    assert "refused the connection" in result.error
    assert nodes_of(result) == ["plan", "draw", "stop"]
    assert result.steps[1].error is not None and "BackendError" in result.steps[1].error
    assert result.state.stop_reason == StopReason.ERROR and result.state.final_image is None


async def test_steps_are_numbered_and_state_snapshots_replay():
    ctx = make_context("reflect", [EDIT, STOP])
    result = await run(ctx)
    assert [s.seq for s in result.steps] == list(range(len(result.steps)))
    for step in result.steps:
        snapshot = ReasonerState.model_validate(step.state_before)
        assert snapshot.step_count == step.seq
    reflect_step = result.steps[2]
    generation = reflect_step.trace.generations[0]
    assert generation.role == "reflect" and generation.text == EDIT
    assert len(generation.token_ids) == len(generation.logprobs) > 0
    assert reflect_step.trace.images_in == [result.state.images[0].ref]


async def test_uniform_router_is_reproducible_and_reports_its_log_prob():
    tasks = make_group_tasks(["two red circles"] * 30, group_size=2, seed=7)
    first = await Runner(make_context("auto", [STOP])).run(tasks)
    again = await Runner(make_context("auto", [STOP])).run(tasks)
    modes = [r.mode for r in first]
    assert modes == [r.mode for r in again]
    assert set(modes) == {"direct", "reflect", "decompose"}
    for r in first:
        decision = r.state.decisions[0]
        assert decision.policy == "uniform-mode"
        assert math.isclose(decision.log_prob, math.log(1 / 3))
    # Samples in a group share the group id but not the seed.
    assert tasks[0].group_id == tasks[1].group_id and tasks[0].seed != tasks[1].seed
