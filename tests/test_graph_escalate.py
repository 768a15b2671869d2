"""Escalate mode: SAIR's data pipeline (direct → up to 3 reflect rounds → decompose while the
reflector still rejects the image) as one recorded trajectory whose stages can be told apart.

Scripted backends pin the paths exactly; ShapeWorld runs (recorded in a SQL store) check the
same rules on real mistakes, the budget, and that a run cut anywhere, the escalation included,
resumes to exactly the paths of an uninterrupted run."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from agent_graph.graph import step_limit
from agent_graph.presets import shapeworld_context, shapeworld_tasks
from agent_graph.recording import RecordingFailed
from agent_graph.rollout import resume_run, rollout, run_config
from agent_graph.runner import Runner
from nodes.context import Backends, ReasonerContext
from nodes.formats import SubTask, format_subtasks
from nodes.state import Budget, Mode, ReasonerState, StageStart, StopReason, Task
from policies.base import MODES
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy, UniformModePolicy
from storage.recorder import SQLRecorder
from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier
from tests.scripted import CountingPainter, FixedJudge, ScriptedChat

EDIT = "<think>The image lacks a circle.</think>Add one red circle."
STOP = "<think>It matches.</think>No further edit needed."
GARBAGE = "<think>I cannot tell.</think>"  # no instruction, no stop phrase: unusable
STEPS = [SubTask("Draw two red circles.", "two red circles"), SubTask("Add a star.", "everything")]


def make_context(reflections: list[str], decomposition: str = "") -> ReasonerContext:
    painter = CountingPainter()
    backends = Backends(
        planner=ScriptedChat(["BLUEPRINT"]),
        reflector=ScriptedChat(reflections),
        decomposer=ScriptedChat([decomposition or format_subtasks(STEPS)]),
        generator=painter,
        editor=painter,
        judge=FixedJudge(0.75),
    )
    return ReasonerContext(
        backends=backends,
        mode_policy=FixedModePolicy("escalate"),
        stop_policy=FollowReflectionStopPolicy(),
    )


async def run(context: ReasonerContext, budget: Budget | None = None, prompt: str = "p") -> Any:
    return await Runner(context, budget=budget or Budget()).run_one(Task(prompt=prompt))


def nodes_of(result: Any) -> list[str]:
    return [step.node for step in result.steps]


def stages_of(result: Any) -> list[tuple[str, int]]:
    return [(s.stage.value, s.step) for s in result.state.stages]


def step_stages(result: Any) -> list[str | None]:
    """The stage each recorded step belongs to: the one its state before names (plan opens
    the first)."""
    return [s.state_before["stage"] or s.update.get("stage") for s in result.steps]


# --- the paths, scripted ------------------------------------------------------------------------


async def test_an_accepted_direct_image_stops_after_the_first_verdict():
    ctx = make_context([STOP])
    result = await run(ctx)
    assert nodes_of(result) == ["plan", "draw", "reflect", "stop"]
    state = result.state
    assert state.mode == Mode.ESCALATE and state.stage == Mode.DIRECT
    assert stages_of(result) == [("direct", 0)]
    assert state.stop_reason == StopReason.ACCEPTED and state.rounds == 0
    assert ctx.backends.generator.calls == ["generate:BLUEPRINT"]
    assert [(d.kind, d.action) for d in state.decisions] == [("mode", "escalate"), ("stop", "stop")]


async def test_a_rejection_opens_the_reflect_stage_which_stops_once_the_image_is_fixed():
    ctx = make_context([EDIT, EDIT, STOP])
    result = await run(ctx)
    assert nodes_of(result) == [
        "plan", "draw", "reflect",                        # direct: rejected
        "refine", "reflect", "refine", "reflect",        # reflect: fixed in round 2
        "stop",
    ]  # fmt: skip
    state = result.state
    assert state.stage == Mode.REFLECT and state.stop_reason == StopReason.ACCEPTED
    assert stages_of(result) == [("direct", 0), ("reflect", 3)]
    assert step_stages(result) == ["direct"] * 3 + ["reflect"] * 5
    # The reflect stage starts after the verdict that opened it: its first image is the edit.
    assert state.stages[1] == StageStart(
        stage=Mode.REFLECT, step=3, image_index=1, reflection_index=1
    )
    assert state.rounds == 2 and len(state.images) == 3


async def test_still_rejected_after_three_rounds_it_decomposes_on_a_fresh_canvas():
    ctx = make_context([EDIT] * 4 + [STOP])
    result = await run(ctx, prompt="the full prompt")
    assert nodes_of(result) == [
        "plan", "draw", "reflect",
        "refine", "reflect", "refine", "reflect", "refine", "reflect",  # 3 rounds, still wrong
        "decompose", "draw", "reflect", "refine", "reflect",          # multi-step, evaluated
        "stop",
    ]  # fmt: skip
    state = result.state
    assert state.stage == Mode.DECOMPOSE and state.stop_reason == StopReason.ACCEPTED
    assert stages_of(result) == [("direct", 0), ("reflect", 3), ("decompose", 9)]
    assert step_stages(result)[9:] == ["decompose"] * 6
    # A fresh canvas: the first sub-task is generated, not edited into the rejected image.
    assert ctx.backends.generator.calls == [
        "generate:BLUEPRINT",
        *["edit:Add one red circle."] * 3,
        "generate:Draw two red circles.",
        "edit:Add a star.",
    ]
    assert state.stages[2].image_index == 4 and state.images[4].node == "draw"
    # The decompose stage has its own correction budget and checks each sub-task.
    assert state.rounds == 0
    assert [r.target for r in state.reflections[4:]] == ["two red circles", "the full prompt"]
    assert state.final_image == state.images[-1].ref


@pytest.mark.parametrize(
    ("max_rounds", "escalate_rounds", "reflect_rounds"),
    [(4, 3, 3), (2, 3, 2), (4, 1, 1), (4, 0, 0), (0, 3, 0)],
)
async def test_the_reflect_stage_has_min_of_max_rounds_and_escalate_rounds(
    max_rounds, escalate_rounds, reflect_rounds
):
    ctx = make_context([EDIT] * (1 + reflect_rounds) + [STOP])
    budget = Budget(max_rounds=max_rounds, escalate_rounds=escalate_rounds)
    result = await run(ctx, budget)
    nodes = nodes_of(result)
    escalated_at = nodes.index("decompose")
    assert nodes[:escalated_at] == [
        "plan",
        "draw",
        "reflect",
        *["refine", "reflect"] * reflect_rounds,
    ]
    expected = [("direct", 0)] + ([("reflect", 3)] if reflect_rounds else [])
    assert stages_of(result) == [*expected, ("decompose", escalated_at)]
    # With no round at all the decompose stage carries out its sub-tasks unchecked.
    ended = StopReason.ACCEPTED if max_rounds else StopReason.BUDGET
    assert result.state.stop_reason == ended


async def test_without_an_image_left_it_does_not_escalate():
    ctx = make_context([EDIT])
    result = await run(ctx, Budget(max_images=4))  # direct + 3 edits use them all
    state = result.state
    assert nodes_of(result)[-2:] == ["reflect", "stop"] and "decompose" not in nodes_of(result)
    assert state.stage == Mode.REFLECT and state.stop_reason == StopReason.BUDGET
    assert len(state.images) == 4 and len(state.reflections) == 4  # the last image got a verdict


async def test_the_decomposition_is_cut_to_the_images_left():
    ctx = make_context([EDIT] * 4 + [STOP])
    result = await run(ctx, Budget(max_images=5))
    state = result.state
    assert state.stage == Mode.DECOMPOSE and state.subtasks == STEPS[:1]
    assert len(state.images) == 5
    # As in decompose mode, an image no correction could follow is not reflected on: the
    # stop is the budget's, and the judge alone grades the last image.
    assert len(state.reflections) == 4 and state.stop_reason == StopReason.BUDGET


async def test_unusable_verdicts_spend_the_reflect_stage_rounds_then_escalate():
    ctx = make_context([GARBAGE] * 3 + [STOP])
    result = await run(ctx)
    assert nodes_of(result) == [
        "plan", "draw", "reflect",   # unusable: opens the reflect stage with a round spent
        "reflect", "reflect",        # retries, a round each: 3 spent
        "decompose", "draw", "reflect", "refine", "reflect", "stop",
    ]  # fmt: skip
    assert stages_of(result) == [("direct", 0), ("reflect", 3), ("decompose", 5)]
    assert result.state.stop_reason == StopReason.ACCEPTED


@pytest.mark.parametrize("seed", range(12))
async def test_the_budget_bounds_any_reflector(seed):
    rng = random.Random(seed)
    script = [rng.choice([EDIT, EDIT, GARBAGE, STOP]) for _ in range(40)]
    budget = Budget(
        max_rounds=rng.randint(0, 4),
        max_images=rng.randint(1, 9),
        escalate_rounds=rng.randint(0, 4),
    )
    many = format_subtasks([SubTask(f"Step {i}.", f"after {i}") for i in range(6)])
    result = await run(make_context(script, many), budget)
    state = result.state
    assert result.status == "succeeded"
    assert len(result.steps) <= step_limit(ReasonerState(task=Task(prompt="p"), budget=budget))
    assert len(state.images) <= budget.max_images
    stages = [s.stage.value for s in state.stages]
    assert stages in (
        ["direct"], ["direct", "reflect"], ["direct", "reflect", "decompose"],
        ["direct", "decompose"],
    )  # fmt: skip
    # Rounds per stage, counted off the steps: edits answering a verdict, plus reflections
    # retried (a reflection right after another one), each in the stage it ran in.
    for stage, limit in (
        ("reflect", min(budget.max_rounds, budget.escalate_rounds)),
        ("decompose", budget.max_rounds),
    ):
        rounds = 0
        for previous, s in zip(result.steps, result.steps[1:], strict=False):
            if s.state_before["stage"] != stage:
                continue
            rounds += s.node == "refine" and "subtasks_done" not in s.update
            rounds += s.node == "reflect" and previous.node == "reflect"
        assert rounds <= limit, (stage, [(s.node, s.update) for s in result.steps])
        assert 0 <= result.state.rounds <= budget.max_rounds
    # Escalation only on a rejection, never past an accepted image.
    for step in result.steps:
        if step.node == "reflect" and step.update.get("stage"):
            assert not step.update["reflections"][0]["accept"]


def test_escalate_is_a_fixed_mode_not_one_a_router_samples():
    from policies.mode import LearnedModePolicy

    assert FixedModePolicy("escalate").mode == "escalate"
    assert "escalate" not in MODES and LearnedModePolicy.ACTIONS == MODES
    rng = random.Random(0)
    assert {UniformModePolicy().choose_mode(None, rng).choice for _ in range(200)} == set(MODES)
    with pytest.raises(ValueError, match="unknown mode"):
        FixedModePolicy("sideways")
    with pytest.raises(ValueError, match="escalate is a mode, not a stage"):
        ReasonerState(task=Task(prompt="p"), mode=Mode.ESCALATE, stage=Mode.ESCALATE)


def test_states_stored_before_escalate_existed_still_load():
    old = ReasonerState(task=Task(prompt="p"), mode=Mode.REFLECT).model_dump(mode="json")
    for key in ("stage", "stages"):
        old.pop(key)
    old["budget"].pop("escalate_rounds")
    state = ReasonerState.model_validate(old)
    assert state.stage is None and state.stages == [] and state.budget.escalate_rounds == 3
    assert state.path == Mode.REFLECT and state.round_limit == state.budget.max_rounds


# --- ShapeWorld, recorded -------------------------------------------------------------------


TASKS = shapeworld_tasks(2, 1, 2)  # 18 prompts: all three stages end some trajectories
BUDGET = Budget()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('escalate')}/runs.db")
    outcome = asyncio.run(rollout(store, TASKS, mode="escalate", budget=BUDGET, name="esc"))
    assert {r.status for r in outcome.results} == {"succeeded"}
    yield store, outcome.run_id
    store.close()


def paths(store: TrajectoryStore, run_id: str) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(group, sample) -> the trajectory's recorded (node, text) steps."""
    return {
        (t.group_id, t.sample_index): [(s.node, s.text or "") for s in store.steps(t.id)]
        for t in store.trajectories(run=run_id, limit=None)
    }


def test_shapeworld_escalate_paths_follow_the_verdicts(recorded):
    store, run_id = recorded
    ended = Counter()
    for summary in store.trajectories(run=run_id, limit=None):
        detail = store.trajectory(summary.id)
        steps, final = detail.steps, detail.final_state
        nodes = [s.node for s in steps]
        verdicts = {s.seq: s.update["reflections"][0] for s in steps if s.node == "reflect"}
        assert detail.mode == "escalate" and final["mode"] == "escalate"
        assert nodes[:3] == ["plan", "draw", "reflect"] and nodes[-1] == "stop"
        assert len(final["images"]) <= BUDGET.max_images
        ended[final["stage"]] += 1
        if verdicts[2]["accept"]:  # right first time: stops after the first verdict
            assert nodes == ["plan", "draw", "reflect", "stop"]
            assert final["stage"] == "direct" and final["stop_reason"] == "accepted"
            continue
        cut = nodes.index("decompose") if "decompose" in nodes else len(nodes) - 1
        reflect_stage = steps[3:cut]
        # Every image of the reflect stage gets a verdict; its rounds are edits plus
        # reflections retried (one right after another).
        assert nodes[cut - 1] == "reflect"
        rounds = sum(
            s.node == "refine" or (s.node == "reflect" and nodes[s.seq - 1] == "reflect")
            for s in reflect_stage
        )
        assert rounds <= 3
        last = verdicts[cut - 1]
        if "decompose" not in nodes:  # fixed within 3 rounds
            assert last["accept"] and final["stage"] == "reflect"
            continue
        # Still rejected after its 3 rounds: decomposed, drawn again from scratch, evaluated.
        assert not last["accept"] and rounds == 3
        assert nodes[cut + 1] == "draw" and final["stage"] == "decompose"
        fresh = final["images"][len(steps[cut].state_before["images"])]
        assert (
            fresh["node"] == "draw" and fresh["instruction"] == final["subtasks"][0]["instruction"]
        )
        assert [s["stage"] for s in final["stages"]] == ["direct", "reflect", "decompose"]
        assert [s["step"] for s in final["stages"]] == [0, 3, cut]
        # The stored steps say which stage each belongs to.
        assert [s.state_before["stage"] for s in steps[1:]] == (
            ["direct"] * 2 + ["reflect"] * (cut - 3) + ["decompose"] * (len(steps) - cut)
        )
    assert set(ended) == {"direct", "reflect", "decompose"}, ended


async def test_resuming_after_any_step_continues_exactly_as_the_run_went_on():
    """From the state after each step (the stage switches included), the graph goes on along
    the same path to the same final state."""
    context = shapeworld_context("escalate")
    tasks = [t for t in TASKS if t.category in ("position_count", "multi_count")]
    reference = await Runner(context, budget=BUDGET).run(tasks)
    escalated = [r for r in reference if r.state.stage == Mode.DECOMPOSE]
    assert escalated
    for whole in escalated[:2]:
        for k in range(len(whole.steps) - 1):
            after = ReasonerState.model_validate(whole.steps[k + 1].state_before)
            runner = Runner(context, budget=BUDGET)
            [rest] = await runner.resume([(after, whole.steps[k].node)])
            assert [s.node for s in rest.steps] == [s.node for s in whole.steps[k + 1 :]]
            assert rest.state == whole.state


class CutAtEscalation:
    """A recorder that fails (the store went away) when the first decompose step is recorded,
    and forwards everything before it to the real one."""

    def __init__(self, inner: SQLRecorder) -> None:
        self.inner = inner

    async def start_trajectory(self, state: Any) -> None:
        await self.inner.start_trajectory(state)

    async def record_step(self, record: Any) -> None:
        if record.node == "decompose":
            raise ConnectionError("the store went away")
        await self.inner.record_step(record)

    async def finish_trajectory(self, *args: Any) -> None:
        await self.inner.finish_trajectory(*args)


async def test_a_run_cut_at_the_escalation_resumes_to_the_uninterrupted_paths(recorded, tmp_path):
    reference_store, reference_run = recorded
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'cut.db'}")
    run = store.create_run("cut", run_config("escalate", BUDGET))
    async with SQLRecorder(store, run.id) as sql:
        context = shapeworld_context("escalate", images=store, recorder=CutAtEscalation(sql))
        runner = Runner(context, budget=BUDGET, concurrency=4, keep_steps=False)
        states = [runner.state_factory(task, BUDGET) for task in TASKS]
        store.register_trajectories(run.id, states)
        with pytest.raises(RecordingFailed, match="the store went away"):
            await runner.resume([(state, None) for state in states])
    unfinished = [t for t in store.trajectories(run=run.id, limit=None) if t.status != "succeeded"]
    assert unfinished
    # One trajectory stopped exactly between its escalating verdict and the decomposition.
    last_steps = [store.steps(t.id)[-1] for t in unfinished if store.steps(t.id)]
    assert any(s.update.get("stage") == "decompose" for s in last_steps)

    resumed = await resume_run(store, run.id)  # what `atelier resume` does: config alone
    assert {r.status for r in resumed.results} == {"succeeded"}
    assert paths(store, run.id) == paths(reference_store, reference_run)
    store.close()


def test_cli_rollout_and_run_take_mode_escalate(tmp_path):
    db = tmp_path / "cli.db"
    result = run_atelier("rollout", "--mode", "escalate", "--per-category", "1", "-G", "1", db=db)
    assert result.returncode == 0, result.stderr
    assert "9 trajectories, 9 succeeded" in result.stdout
    result = run_atelier("run", "--mode", "escalate", "four blue squares", db=db)
    assert result.returncode == 0, result.stderr
    listed = run_atelier("ls", "--mode", "escalate", "--ids", db=db)
    assert listed.returncode == 0 and len(listed.stdout.split()) == 10
