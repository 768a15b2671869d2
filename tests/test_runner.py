"""The runner's admission: bounded concurrency, groups kept together, a store failure stops it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Literal

import pytest
from langgraph.graph import END, START

from agent_graph.graph import AtelierGraph
from agent_graph.presets import shapeworld_context, shapeworld_tasks
from agent_graph.recording import RecordingFailed
from agent_graph.runner import Runner
from nodes.state import ReasonerState


class Watcher:
    """A recorder that yields to the loop at every step (as a real one awaits its commit) and
    logs when each trajectory starts and finishes."""

    def __init__(self, fail_at: tuple[str, int] | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.in_flight = 0
        self.peak = 0
        self.fail_at = fail_at

    async def start_trajectory(self, state) -> None:
        self.events.append(("start", state.trajectory_id))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    async def record_step(self, record) -> None:
        await asyncio.sleep(0)
        if self.fail_at == (record.trajectory_id, record.seq):
            raise ConnectionError("the store went away")

    async def finish_trajectory(self, trajectory_id, status, state, error) -> None:
        self.events.append(("finish", trajectory_id))
        self.in_flight -= 1


def _tasks(prompts: int, group_size: int):
    """The first ``prompts`` of ShapeWorld's fixed set, ``group_size`` samples each."""
    return shapeworld_tasks(4, group_size, 5, prompt_seed=3)[: prompts * group_size]


def _runner(watcher: Watcher, concurrency: int, together: bool) -> Runner:
    context = dataclasses.replace(shapeworld_context("reflect"), recorder=watcher)
    return Runner(context, concurrency=concurrency, keep_steps=False, keep_groups_together=together)


def _groups_started_whole(events, group_of: dict[str, str], size: int) -> list[bool]:
    """For each group: were all its members in flight at once (none finished before the last
    one started)?"""
    whole: dict[str, bool] = {}
    started: dict[str, int] = {}
    finished_early: set[str] = set()
    for kind, tid in events:
        group = group_of[tid]
        if kind == "start":
            started[group] = started.get(group, 0) + 1
            if started[group] == size:
                whole[group] = group not in finished_early
        elif started.get(group, 0) < size:
            finished_early.add(group)
    return list(whole.values())


async def test_concurrency_bound_is_reached_and_never_exceeded():
    watcher = Watcher()
    results = await _runner(watcher, concurrency=5, together=False).run(_tasks(9, 3))
    assert len(results) == 27 and all(r.status == "succeeded" for r in results)
    assert watcher.peak == 5
    assert [r.task.sample_index for r in results[:3]] == [0, 1, 2]  # results in input order


async def test_groups_kept_together_run_side_by_side():
    tasks = _tasks(8, 4)
    runs = {}
    for together in (False, True):
        watcher = Watcher()
        runner = _runner(watcher, concurrency=6, together=together)
        results = await runner.run(tasks)
        assert all(r.status == "succeeded" for r in results)
        group_of = {r.trajectory_id: r.task.group_id for r in results}
        runs[together] = (watcher, _groups_started_whole(watcher.events, group_of, 4))
    watcher, whole = runs[True]
    assert len(whole) == 8 and all(whole)
    assert watcher.peak <= 6
    # Without the option a group of 4 straddles the slots 6 trajectories leave: some groups
    # have a member finished before their last one started.
    _, whole_without = runs[False]
    assert not all(whole_without)


async def test_group_larger_than_concurrency_is_admitted_in_chunks():
    watcher = Watcher()
    results = await _runner(watcher, concurrency=3, together=True).run(_tasks(2, 5))
    assert len(results) == 10 and all(r.status == "succeeded" for r in results)
    assert watcher.peak == 3


async def test_a_store_failure_stops_the_run_and_admits_nothing_more():
    tasks = _tasks(10, 2)
    probe = Watcher()
    first = (await _runner(probe, concurrency=4, together=False).run(tasks[:1]))[0]
    # Fail the first trajectory's third step (ids are fresh per run: fail by position).
    watcher = Watcher()
    runner = _runner(watcher, concurrency=4, together=False)
    ids = iter(f"t{i:03d}" for i in range(100))
    runner.state_factory = lambda task, budget: type(first.state)(
        trajectory_id=next(ids), task=task, budget=budget
    )
    watcher.fail_at = ("t000", 2)
    with pytest.raises(RecordingFailed, match="the store went away"):
        await runner.run(tasks)
    started = [tid for kind, tid in watcher.events if kind == "start"]
    finished = [tid for kind, tid in watcher.events if kind == "finish"]
    assert "t000" not in finished  # left unfinished for resume, not recorded as failed
    assert len(started) < len(tasks)  # admission stopped
    assert watcher.in_flight == len(started) - len(finished)  # the rest were cancelled
    await asyncio.sleep(0.05)
    assert [tid for kind, tid in watcher.events if kind == "start"] == started


def test_cli_rollout_keeps_groups_together(tmp_path):
    import os
    import subprocess
    import sys

    from storage.store import TrajectoryStore

    db = tmp_path / "atelier.db"
    args = ["rollout", "--per-category", "1", "-G", "3", "--mode", "reflect"]
    result = subprocess.run(
        [sys.executable, "-m", "atelier.cli", *args, "--keep-groups-together"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ATELIER_DB": str(db)},
    )
    assert result.returncode == 0, result.stderr
    store = TrajectoryStore(f"sqlite:///{db}")
    trajectories = store.trajectories()
    store.close()
    groups: dict[str, int] = {}
    for t in trajectories:
        groups[t.group_id] = groups.get(t.group_id, 0) + 1
    assert len(groups) == 9 and set(groups.values()) == {3}


async def test_sync_routers_run_inline_and_keep_their_literal_path_map():
    threads: list[str] = []

    def check(state: ReasonerState) -> Literal["finish", "__end__"]:
        threads.append(threading.current_thread().name)
        return "finish" if state.step_count == 1 else END

    def start(state: ReasonerState) -> dict:
        return {}

    def finish(state: ReasonerState) -> dict:
        return {}

    graph = AtelierGraph(ReasonerState)
    graph.add_node(start)
    graph.add_node(finish)
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", check)  # no path map: read off the Literal
    graph.add_conditional_edges("finish", check)
    compiled = graph.compile()
    edges = {(e.source, e.target) for e in compiled.get_graph().edges}
    assert ("start", "finish") in edges and ("start", "__end__") in edges
    task = _tasks(1, 1)[0]
    output = await compiled.ainvoke(ReasonerState(trajectory_id="t", task=task))
    assert output["step_count"] == 2
    # LangGraph would run a sync router in its thread pool; AtelierGraph runs it inline.
    assert threads == [threading.current_thread().name] * 2
