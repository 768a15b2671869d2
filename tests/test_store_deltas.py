"""Steps recorded as deltas (state snapshots every K steps) read back exactly like snapshots."""

from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Annotated

import pytest

from agent_graph.presets import shapeworld_context, shapeworld_tasks
from agent_graph.runner import Runner
from nodes.state import ReasonerState
from storage.recorder import SQLRecorder
from storage.rows import replayable
from storage.store import TrajectoryStore


def _ids(prefix: str):
    counter = itertools.count()
    return lambda task, budget: ReasonerState(
        trajectory_id=f"{prefix}{next(counter):04d}", task=task, budget=budget
    )


async def _record(url: str, mode: str, every: int, tasks, state_factory) -> TrajectoryStore:
    store = TrajectoryStore(url)
    run = store.create_run(f"{mode}-{every}")
    async with SQLRecorder(store, run.id, state_snapshot_every=every) as recorder:
        context = dataclasses.replace(shapeworld_context(mode, images=store), recorder=recorder)
        runner = Runner(context, concurrency=16, keep_steps=False, state_factory=state_factory)
        results = await runner.run(tasks)
    assert all(r.status == "succeeded" for r in results)
    return store


@pytest.mark.parametrize("mode", ["reflect", "decompose", "auto"])
async def test_delta_steps_read_back_as_the_full_snapshots(db_url, tmp_path, mode):
    tasks = shapeworld_tasks(2, 2, 4, prompt_seed=11)
    reference = await _record(f"sqlite:///{tmp_path}/full.db", mode, 1, tasks, _ids(f"{mode}-"))
    store = await _record(db_url, mode, 3, tasks, _ids(f"{mode}-"))
    deltas = 0
    for summary in reference.trajectories(limit=None):
        expected = reference.steps(summary.id)
        got = store.steps(summary.id)
        assert [s.state_before for s in got] == [s.state_before for s in expected]
        assert [s.stage for s in got] == [s.stage for s in expected]
        assert store.last_state_dict(summary.id) == reference.last_state_dict(summary.id)
        assert store.last_state(summary.id, ReasonerState) == reference.last_state(
            summary.id, ReasonerState
        )
        deltas += sum(1 for s in got if s.seq % 3)
    assert deltas > 50
    # The deltas really are stored as JSON null (not as the full state).
    with store.db.read() as conn:
        from sqlalchemy import select

        from storage.schema import StepRow

        stored = conn.execute(select(StepRow.seq, StepRow.state_before)).all()
    assert {seq % 3 == 0 for seq, state in stored if state is not None} == {True}
    assert sum(state is None for _, state in stored) == deltas
    reference.close()
    store.close()


async def test_a_trajectory_forked_mid_way_replays_from_its_initial_state(tmp_path):
    tasks = shapeworld_tasks(1, 1, 4, prompt_seed=11)[:6]
    store = await _record(f"sqlite:///{tmp_path}/src.db", "reflect", 1, tasks, _ids("s"))
    sources = store.trajectories(limit=None)

    async def fork(prefix: str, every: int) -> None:
        points = []
        for n, summary in enumerate(sources):
            steps = store.steps(summary.id)
            # Continue after step 1: the state it left is step 2's state_before.
            state = {**steps[2].state_before, "trajectory_id": f"{prefix}{n:02d}"}
            points.append((ReasonerState.model_validate(state), steps[1].node))
        run = store.create_run(prefix)
        async with SQLRecorder(store, run.id, state_snapshot_every=every) as recorder:
            context = dataclasses.replace(
                shapeworld_context("reflect", images=store), recorder=recorder
            )
            results = await Runner(context, keep_steps=False).resume(points)
        assert all(r.status == "succeeded" for r in results), [r.error for r in results]

    await fork("full", 1)
    await fork("delta", 16)

    def without_id(state: dict) -> dict:
        return {k: v for k, v in state.items() if k != "trajectory_id"}

    for n in range(len(sources)):
        got, expected = store.steps(f"delta{n:02d}"), store.steps(f"full{n:02d}")
        assert got[0].seq == 2 and len(got) == len(expected) > 1
        assert [without_id(s.state_before) for s in got] == [
            without_id(s.state_before) for s in expected
        ]
        assert without_id(store.last_state_dict(f"delta{n:02d}")) == without_id(
            store.last_state_dict(f"full{n:02d}")
        )
    with store.db.read() as conn:
        from sqlalchemy import select

        from storage.schema import StepRow

        first = conn.execute(
            select(StepRow.state_before).where(StepRow.trajectory_id == "delta00", StepRow.seq == 2)
        ).scalar_one()
    assert first is None  # really a delta, rebuilt from the trajectory's initial state
    store.close()


class NotedState(ReasonerState):
    notes: Annotated[list[str], operator.add] = []  # noqa: RUF012 - pydantic copies defaults


class CountedState(ReasonerState):
    total: Annotated[int, operator.add] = 0


def test_only_states_the_store_can_replay_are_recorded_as_deltas():
    class Plain(ReasonerState):
        label: str = ""

    assert replayable(ReasonerState) and replayable(Plain)
    assert not replayable(NotedState)  # an extra list reducer the store does not know
    assert not replayable(CountedState)  # a reducer that adds numbers


async def test_a_state_with_its_own_reducers_is_always_snapshot(tmp_path):
    tasks = shapeworld_tasks(1, 1, 4, prompt_seed=11)[:4]

    def noted(task, budget):
        return NotedState(trajectory_id=f"n{task.seed % 10**6}", task=task, budget=budget)

    store = TrajectoryStore(f"sqlite:///{tmp_path}/noted.db")
    run = store.create_run("noted")
    async with SQLRecorder(store, run.id, state_snapshot_every=16) as recorder:
        context = dataclasses.replace(
            shapeworld_context("reflect", images=store), recorder=recorder
        )
        from agent_graph.graph import reasoner_graph

        graph = reasoner_graph(NotedState).compile()
        results = await Runner(context, graph, keep_steps=False, state_factory=noted).run(tasks)
    assert all(r.status == "succeeded" for r in results)
    with store.db.read() as conn:
        from sqlalchemy import select

        from storage.schema import StepRow

        states = conn.execute(select(StepRow.state_before)).scalars().all()
    assert states and all(state is not None for state in states)


def test_the_recorder_alone_decides_snapshot_or_delta(tmp_path):
    """The recording wrapper hands over the state object; ``SQLRecorder.stored_state`` keeps
    every K-th step in full, the others as deltas, and keeps in full what it cannot replay:
    a state type with its own reducers, or a state given only as JSON."""
    from agent_graph.recording import StepRecord
    from nodes.state import Task

    store = TrajectoryStore(f"sqlite:///{tmp_path}/decide.db")
    recorder = SQLRecorder(store, "decide", state_snapshot_every=4)
    task = Task(prompt="two red circles")

    def stored(seq: int, state):
        return recorder.stored_state(StepRecord("t", seq, "draw", 0.0, 0.0, state, {}))

    state = ReasonerState(trajectory_id="t", task=task, step_count=5)
    assert stored(4, state) == stored(8, state) == state.model_dump(mode="json")
    assert stored(5, state) is None and stored(7, state) is None
    noted = NotedState(trajectory_id="t", task=task)
    assert stored(5, noted) == noted.model_dump(mode="json")
    as_json = state.model_dump(mode="json")
    assert stored(5, as_json) is as_json
    assert stored(4, None) is None  # no state given: only the update can be kept
    every_step = SQLRecorder(store, "every", state_snapshot_every=1)
    record = StepRecord("t", 5, "draw", 0.0, 0.0, state, {})
    assert every_step.stored_state(record) == state.model_dump(mode="json")
    store.close()
