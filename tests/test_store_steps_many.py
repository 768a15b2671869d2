"""``TrajectoryStore.steps_many``: many trajectories' steps in a few chunked queries, exactly as
``steps`` reads them one by one; and the training readers that use it issue O(1) queries."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from PIL import Image
from sqlalchemy import func, select

from agent_graph.presets import shapeworld_context, shapeworld_tasks
from agent_graph.recording import StepRecord
from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.shapeworld import fixed_prompt_set
from nodes.common import Generation, NodeTrace
from nodes.context import GraphSettings
from nodes.state import Budget, ReasonerState, Task
from policies.simple import UniformStopPolicy
from storage.recorder import SQLRecorder
from storage.records import StepInfo
from storage.schema import StepRow
from tests.sql_spy import selects
from training.decisions.groups import read_groups
from training.decisions.sampling import collect
from training.tree import _stable_key, _start_states, read_stage_groups, stage_start_states

SETTINGS = GraphSettings(width=128, height=128)
UNKNOWN = ["no-such-trajectory", "another-unknown-one"]


def _ids(prefix: str):
    counter = itertools.count()
    return lambda task, budget: ReasonerState(
        trajectory_id=f"{prefix}{next(counter):04d}", task=task, budget=budget
    )


async def _record(store, mode: str, every: int, prefix: str) -> str:
    run = store.create_run(f"{mode}-{every}")
    async with SQLRecorder(store, run.id, state_snapshot_every=every) as recorder:
        context = dataclasses.replace(shapeworld_context(mode, images=store), recorder=recorder)
        runner = Runner(context, concurrency=16, keep_steps=False, state_factory=_ids(prefix))
        results = await runner.run(shapeworld_tasks(1, 2, 4, prompt_seed=11))
    assert all(r.status == "succeeded" for r in results)
    return run.id


async def _fork(store, sources, prefix: str, every: int) -> None:
    """Continue every source after its step 1: the forks' first recorded step is seq 2, a delta
    when ``every`` does not divide 2 (replayed from the fork's initial state)."""
    points = []
    for n, summary in enumerate(sources):
        steps = store.steps(summary.id)
        state = {**steps[2].state_before, "trajectory_id": f"{prefix}{n:02d}"}
        points.append((ReasonerState.model_validate(state), steps[1].node))
    run = store.create_run(prefix)
    async with SQLRecorder(store, run.id, state_snapshot_every=every) as recorder:
        context = dataclasses.replace(
            shapeworld_context("reflect", images=store), recorder=recorder
        )
        results = await Runner(context, keep_steps=False).resume(points)
    assert all(r.status == "succeeded" for r in results), [r.error for r in results]


def _assert_same_steps(got: dict[str, list[StepInfo]], ids: list[str], store) -> None:
    assert list(got) == list(dict.fromkeys(ids))
    for tid in ids:
        expected = store.steps(tid)
        assert len(got[tid]) == len(expected), tid
        for mine, theirs in zip(got[tid], expected, strict=True):
            for f in dataclasses.fields(StepInfo):
                assert getattr(mine, f.name) == getattr(theirs, f.name), (tid, mine.seq, f.name)
            assert mine == theirs
    assert got == {tid: store.steps(tid) for tid in ids}


def _delta_first_steps(store) -> set[str]:
    """Trajectories whose first stored step is a delta (JSON null state)."""
    with store.db.read() as conn:
        first = (
            select(StepRow.trajectory_id, func.min(StepRow.seq).label("seq"))
            .group_by(StepRow.trajectory_id)
            .subquery()
        )
        rows = conn.execute(
            select(StepRow.trajectory_id, StepRow.state_before).join(
                first,
                (first.c.trajectory_id == StepRow.trajectory_id) & (first.c.seq == StepRow.seq),
            )
        ).all()
    return {tid for tid, state in rows if state is None}


# --- recorded through the graph -------------------------------------------------------------


async def test_steps_many_reads_recorded_runs_exactly_as_steps(store):
    await _record(store, "reflect", 3, "r")
    await _record(store, "decompose", 3, "d")
    sources = [s for s in store.trajectories(limit=None) if s.id.startswith("r")][:4]
    await _fork(store, sources, "fork", 16)

    ids = [s.id for s in store.trajectories(limit=None)]
    forks = {tid for tid in ids if tid.startswith("fork")}
    assert len(forks) == 4 and forks <= _delta_first_steps(store)
    with store.db.read() as conn:
        states = conn.execute(select(StepRow.state_before)).scalars().all()
    assert sum(state is None for state in states) > 20  # JSON null: delta steps

    # Unknown ids and duplicates in the mix, ids in no particular order.
    asked = [*UNKNOWN[:1], *reversed(ids), ids[0], UNKNOWN[1]]
    got = store.steps_many(asked)
    _assert_same_steps(got, asked, store)
    assert got[UNKNOWN[0]] == got[UNKNOWN[1]] == [] == store.steps(UNKNOWN[0])
    assert any(step.images_out for tid in ids for step in got[tid])
    assert any(step.images_in for tid in ids for step in got[tid])
    assert {got[tid][0].seq for tid in forks} == {2}

    # trajectory() shares the bulk read: its steps and rewards are the same.
    store.add_reward(ids[0], "r", 0.5)
    store.add_reward(ids[1], "r", 0.25, step=1)
    details = store.trajectory_details(ids)
    for tid in ids:
        assert details[tid] == store.trajectory(tid)
        assert details[tid].steps == got[tid]
    assert [r.value for r in details[ids[0]].reward_records] == [0.5]


# --- many cheap trajectories: chunked IN lists --------------------------------------------


def _state(tid: str, n: int) -> ReasonerState:
    return ReasonerState(
        trajectory_id=tid, task=Task(prompt=f"prompt {n}", group_id=f"g{n // 4}", seed=n)
    )


def _generation(n: int, position: int) -> Generation:
    ids = tuple(range(n, n + 3 + position))
    return Generation(
        "planner",
        f"text {n}/{position}",
        ids,
        tuple(-0.125 * (i + 1) for i in range(len(ids))),
        "tiny-model",
        0.5,
    )


async def _record_cheap(store, count: int) -> list[str]:
    """``count`` trajectories written through the recorder API: two or three steps with
    generations (token ids, log-probs) and images; every third one starts with a delta step,
    every fifth has no steps at all."""
    red = store.put(Image.new("RGB", (8, 8), "red"))
    blue = store.put(Image.new("RGB", (4, 6), "blue"))
    ids = [f"cheap{n:05d}" for n in range(count)]
    async with SQLRecorder(store, "cheap") as recorder:
        for n, tid in enumerate(ids):
            state = _state(tid, n)
            await recorder.start_trajectory(state)
            if n % 5 == 4:
                await recorder.finish_trajectory(tid, "failed", state, "nothing")
                continue
            snapshot = state.model_dump(mode="json")
            first_is_delta = n % 3 == 0
            for seq in range(2 + n % 2):
                stored = None if (seq > 0 or first_is_delta) else snapshot
                update = {"step_count": seq + 1}
                trace = NodeTrace(
                    generations=[_generation(n, p) for p in range(seq % 2 + 1)],
                    images_in=[red] if seq else [],
                    images_out=[blue, red] if seq == 1 else [blue],
                )
                # stored None: no state given, so the recorder keeps the step as a delta.
                await recorder.record_step(
                    StepRecord(tid, seq, "draw", 1.0 + seq, 0.01, stored, update, trace, None)
                )
            await recorder.finish_trajectory(tid, "succeeded", state, None)
    return ids


@pytest.mark.slow
async def test_steps_many_chunks_more_than_500_ids(store):
    ids = await _record_cheap(store, 1100)
    asked = [*ids, *UNKNOWN]
    delta_first = _delta_first_steps(store)
    assert len(delta_first) == sum(1 for n in range(1100) if n % 3 == 0 and n % 5 != 4)

    with selects(store) as statements:
        got = store.steps_many(asked)
    # Three chunks of at most 500 ids, three queries each, plus the initial states of the
    # trajectories whose first step is a delta (fewer than 500: one chunk).
    assert len(statements) == 3 * 3 + 1, statements
    _assert_same_steps(got, asked, store)

    assert got[ids[4]] == [] and got[UNKNOWN[0]] == []
    first = got[ids[0]]
    assert first[0].state_before == _state(ids[0], 0).model_dump(mode="json")
    assert first[1].state_before == {**first[0].state_before, "step_count": 1}
    assert first[0].generations[0].token_ids == (0, 1, 2)
    assert first[0].generations[0].logprobs == (-0.125, -0.25, -0.375)
    assert [(i.width, i.height) for i in first[1].images_out] == [(4, 6), (8, 8)]
    assert store.steps_many([]) == {}
    assert store.steps_many(UNKNOWN) == {tid: [] for tid in UNKNOWN}


# --- the training readers: O(1) queries in the number of trajectories -------------------------


async def _collect(store, n_prompts: int, name: str) -> str:
    items = fixed_prompt_set(3, seed=11)[:n_prompts]
    run_id, _ = await collect(
        store,
        make_group_tasks(
            [i.text for i in items], 2, seed=11, categories=[i.category for i in items]
        ),
        mode="reflect",
        stop_policy=UniformStopPolicy(0.5),
        budget=Budget(max_rounds=2),
        settings=SETTINGS,
        name=name,
    )
    return run_id


async def test_training_readers_issue_a_constant_number_of_queries(store):
    small = await _collect(store, 10, "small")
    large = await _collect(store, 20, "large")
    assert len(store.trajectories(run=small)) == 20
    assert len(store.trajectories(run=large)) == 40

    counts = {}
    for run_id in (small, large):
        with selects(store) as statements:
            starts = stage_start_states(store, run_id)
        counts[run_id] = len(statements)
        # The same start states as read trajectory by trajectory.
        expected = [
            start
            for summary in store.trajectories(run=run_id, status="succeeded")
            for start in _start_states(summary.id, store.steps(summary.id), None, run_id)
        ]
        assert starts and starts == sorted(expected, key=_stable_key)
    assert counts[small] == counts[large] <= 5, counts

    counts = {}
    for run_id in (small, large):
        with selects(store) as statements:
            groups = read_groups(store, run_id, "stop")
        counts[run_id] = len(statements)
        assert groups
    assert counts[small] == counts[large] <= 8, counts


async def test_stage_groups_of_forked_runs_read_in_bulk(store):
    from training.tree import fork

    run_id = await _collect(store, 6, "parents")
    starts = stage_start_states(store, run_id)[:4]
    forked = await fork(
        store, starts, stop_policy=UniformStopPolicy(0.5), group_size=3, settings=SETTINGS
    )
    with selects(store) as statements:
        groups = read_stage_groups(store, forked)
    assert groups and len(statements) <= 8
    assert all(len(g.members) == 3 for g in groups)
