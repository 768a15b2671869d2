"""The examples run, and do what they say."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from nodes.state import StopReason

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def test_reflect_loop_with_custom_judge_node():
    example = load("reflect_with_judge")
    from nodes.backends.shapeworld import fixed_prompt_set

    prompts = [item.text for item in fixed_prompt_set(4, seed=3)]
    results = await example.run(prompts)
    assert all(r.status == "succeeded" for r in results)
    edited = 0
    for result in results:
        state = result.state
        nodes = [step.node for step in result.steps]
        # The user's node is recorded like the built-in ones, once per image.
        assert nodes.count("judge") == len(state.images) == len(state.judge_scores)
        assert nodes[0] == "draw" and nodes[-1] == "stop" and "plan" not in nodes
        # The loop stops at the first passing score and never edits a passing image.
        scores = state.judge_scores
        assert all(s < example.PASS_SCORE for s in scores[:-1])
        if scores[-1] < example.PASS_SCORE:
            assert state.rounds == state.budget.max_rounds or nodes[-2] == "reflect"
        # The judge node and the stop node's judge agree on the final image.
        assert scores[-1] == state.judgement.score
        # The stop reason says who ended the loop: the judge's pass is an acceptance.
        if scores[-1] >= example.PASS_SCORE:
            assert state.stop_reason == StopReason.ACCEPTED
            judged = [s for s in result.steps if s.node == "judge"]
            assert judged[-1].update["stop_reason"] == StopReason.ACCEPTED  # the judge said so
        else:
            assert state.stop_reason in (
                StopReason.BUDGET,
                StopReason.ACCEPTED,  # the reflector found nothing to edit
            )
        edited += len(state.images) > 1
    assert edited > 0  # the sample includes prompts the first draw got wrong


def test_reflect_with_judge_prints_the_judges_scores_and_its_acceptance():
    # As the README says to run it. "four blue squares" is drawn wrong first, then fixed.
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "reflect_with_judge.py"), "four blue squares"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()

    def steps_of(node: str) -> list[int]:  # step lines: "  <seq> <node>  <ms> ms  <what>"
        return [
            i
            for i, line in enumerate(lines)
            if line.split()[1:2] == [node] and line.split()[0].isdigit()
        ]

    judged = steps_of("judge")
    assert len(judged) == 2
    assert lines[judged[0]].endswith("judge_scores: [0.50]")
    assert lines[judged[1]].endswith("stop: accepted")  # the judge accepted the second image
    assert lines[judged[1] + 1] == "      judge_scores: [1.00]"
    assert "updated judge_scores" not in result.stdout
    (stop,) = steps_of("stop")
    assert lines[stop].endswith("stop: accepted")
    assert lines[stop + 1] == "      final V=1.00 correct=True"
    assert "stop=accepted, score V=1.00, correct=True" in lines[-1]
    assert "budget" not in result.stdout


def _paths(store, run_id: str) -> dict[str, list[tuple[str, str]]]:
    """prompt -> the trajectory's recorded steps as (node, text)."""
    return {
        t.prompt: [(s.node, s.text or "") for s in store.steps(t.id)]
        for t in store.trajectories(run=run_id, limit=None)
    }


async def test_a_users_graph_is_recorded_and_an_interrupted_run_resumes_where_it_stopped(
    tmp_path,
):
    """``rollout(graph=..., state_factory=..., context=...)`` records a custom graph and state;
    cancelled mid-run, ``resume_run`` with the same graph and context finishes every trajectory
    exactly as the uninterrupted run did (same nodes, same texts), and refuses without them."""
    import asyncio

    import pytest

    from nodes.backends.shapeworld import fixed_prompt_set
    from storage.store import TrajectoryStore

    example = load("reflect_with_judge")
    prompts = [item.text for item in fixed_prompt_set(6, seed=5)]
    reference = TrajectoryStore(f"sqlite:///{tmp_path / 'reference.db'}")
    whole = await example.record(reference, prompts)
    assert {r.status for r in whole.results} == {"succeeded"}
    expected = _paths(reference, whole.run_id)
    run = reference.run(whole.run_id)
    assert run.config["state"] == "reflect_with_judge.JudgedState" and "mode" not in run.config
    assert all(nodes[0][0] == "draw" and "judge" in dict(nodes) for nodes in expected.values())

    store = TrajectoryStore(f"sqlite:///{tmp_path / 'cut.db'}")
    total = sum(len(nodes) for nodes in expected.values())
    work = asyncio.ensure_future(example.record(store, prompts))
    for _ in range(2000):  # cut it off after some, not all, steps were recorded
        await asyncio.sleep(0.002)
        if not store.runs():
            continue
        (cut,) = store.runs()
        recorded = sum(len(store.steps(t.id)) for t in store.trajectories(run=cut.id, limit=None))
        if recorded >= total // 3:
            break
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    (cut,) = store.runs()
    unfinished = [
        t.id for t in store.trajectories(run=cut.id, limit=None) if t.status != "succeeded"
    ]
    assert unfinished, "the run finished before it was cut off"

    with pytest.raises(ValueError, match=r"started in code \(a graph on reflect_with_judge.Judged"):
        await atelier_resume(store, cut.id)
    resumed = await example.resume(store, cut.id)
    assert sorted(r.trajectory_id for r in resumed.results) == sorted(unfinished)
    assert {r.status for r in resumed.results} == {"succeeded"}
    assert all(isinstance(r.state, example.JudgedState) for r in resumed.results)
    assert _paths(store, cut.id) == expected
    assert store.run(cut.id).status == "finished"
    store.close()
    reference.close()


async def atelier_resume(store, run_id: str):
    import atelier

    return await atelier.resume_run(store, run_id)
