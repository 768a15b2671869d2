"""Tree-RL on the run's own backends (issue 15, item 3), with real servers.

``atelier rollout`` records a reflect-mode run whose reflector is the tiny VLM behind
``atelier serve lm`` (in this process, on loopback) and whose other roles are ShapeWorld;
``atelier train --run ... --tree-stage reflect_refine`` then forks it. Every reflection of the
forks is a request to that same server (its own request counter agrees), none is ShapeWorld's,
and the forked run records the backends file and its parent; a second training whose backends
file has gone stops with one line before any fork is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier

pytest_plugins = ("tests.tiny_models",)
pytestmark = pytest.mark.models

PROMPTS = "a red circle\ntwo blue squares\nthree green triangles above a yellow star\n"


def _backends(path: Path, url: str) -> Path:
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.vlm]\nkind = "openai"\nurls = ["{url}"]\ntimeout_s = 60\nretries = 0\n\n'
        "[backends.vlm.sampling]\nmax_tokens = 12\ntemperature = 1.0\ntop_p = 1.0\n\n"
        '[roles]\nplanner = "world"\nreflector = "vlm"\ndecomposer = "world"\n'
        'generator = "world"\neditor = "world"\njudge = "world"\n'
    )
    return path


def _reflections(store: TrajectoryStore, run_id: str) -> list[Any]:
    return [
        generation
        for summary in store.trajectories(run=run_id, limit=None)
        for step in store.trajectory(summary.id).steps
        if step.node == "reflect"
        for generation in step.generations
    ]


@pytest.fixture(scope="module")
def recorded(lm_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("tree-served")
    config = _backends(tmp / "served.toml", lm_server.url)
    (tmp / "prompts.txt").write_text(PROMPTS)
    db = tmp / "runs.db"
    done = run_atelier(
        *("rollout", "--config", str(config), "--mode", "reflect", "--prompts", "prompts.txt"),
        *("-G", "2", "--max-rounds", "1", "--name", "served"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return tmp, db, config


def test_tree_rl_forks_continue_on_the_runs_own_model_server(recorded: Any, vlm_service: Any):
    tmp, db, config = recorded
    with TrajectoryStore(f"sqlite:///{db}") as store:
        parent = store.resolve_run("served")
        assert {g.model for g in _reflections(store, parent.id)} == {"tiny-vlm"}
    before = vlm_service.batcher.requests
    done = run_atelier(
        *("train", "--run", "served", "--tree-stage", "reflect_refine", "--iterations", "1"),
        *("--starts", "4", "-G", "2", "--out", "versions"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    served = vlm_service.batcher.requests - before
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    row = table[-1].split("|")  # the last iteration's row (the training curves follow it)
    assert row[2].strip() == "stop@0"  # the behaviour: the fresh policy being trained
    # A version is made when some fork group carried a signal (C differing between members):
    # the tiny VLM's noisy reflections may give none, and then nothing is saved.
    used = int(row[5])
    assert (tmp / "versions" / "stop-1").is_dir() == (used > 0) == (row[7].strip() == "stop@1")

    with TrajectoryStore(f"sqlite:///{db}") as store:
        (forked,) = [run for run in store.runs() if run.name.startswith("tree-reflect_refine")]
        assert forked.config["world"] == "config"
        assert forked.config["backends_config"] == str(config.resolve())
        assert forked.config["tree"]["parent_runs"] == [parent.id]
        assert forked.config["stop_policy"] == "stop@0"  # the policy being trained
        members = store.trajectories(run=forked.id, limit=None)
        assert len(members) == 8 and {m.status for m in members} == {"succeeded"}
        reflections = _reflections(store, forked.id)
        assert len(reflections) >= 8  # each fork starts with a reflection
        # Every one came from the tiny VLM server, and it answered nothing else meanwhile.
        assert {g.model for g in reflections} == {"tiny-vlm"}
        assert all(g.token_ids and len(g.logprobs) == len(g.token_ids) for g in reflections)
        assert served == len(reflections)
        # The stage rewards the stop policy was trained on are stored with each member.
        for member in members:
            assert {"correction", "advantage"} <= set(member.rewards)


def test_tree_rl_stops_with_one_line_when_the_runs_backends_file_is_gone(recorded: Any):
    tmp, db, config = recorded
    moved = config.with_name("moved.toml")
    config.rename(moved)
    try:
        with TrajectoryStore(f"sqlite:///{db}") as store:
            runs_before = len(store.runs())
        done = run_atelier(
            *("train", "--run", "served", "--tree-stage", "reflect_refine", "--iterations", "1"),
            *("--starts", "2", "-G", "2", "--out", "gone"),
            db=db,
            cwd=tmp,
            timeout=600,
        )
    finally:
        moved.rename(config)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("atelier: error: cannot read config ")
    assert str(config.resolve()) in lines[0]
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert len(store.runs()) == runs_before  # no fork run was recorded
    assert not (tmp / "gone").exists()


def test_the_reflect_lora_trains_on_the_forks_groups(
    recorded: Any, tiny_models: Any, vlm_service: Any
) -> None:
    """Tree-RL's reflect-refine stage for the reflector's own LoRA: from a forked run, ``atelier
    train --policy reflect`` reads one group per fork point (the G members' first reflection,
    all of one input) and trains on R3's reflection reward C + r_format, stored first and
    recomputed here from the fork point's V̂, the first image the stage made and the text."""
    from nodes.formats import parse_reflection  # R3's format and stop rule (own table tests)

    tmp, db, _ = recorded
    forked = run_atelier(
        *("train", "--run", "served", "--tree-stage", "reflect_refine", "--iterations", "1"),
        *("--starts", "6", "-G", "3", "--perfect-share", "0", "--seed", "5", "--out", "v2"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    assert forked.returncode == 0, forked.stderr
    with TrajectoryStore(f"sqlite:///{db}") as store:
        fork_run = [r for r in store.runs() if r.config.get("tree", {}).get("seed") is not None][-1]
    done = run_atelier(
        *("train", "--run", fork_run.id, "--policy", "reflect", "--model", str(tiny_models.vlm)),
        *("--epochs", "1", "--out", "adapters"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    with TrajectoryStore(f"sqlite:///{db}") as store:
        forks = fork_run.config["tree"]["forks"]
        checked = 0
        for summary in store.trajectories(run=fork_run.id, status="succeeded", limit=None):
            detail = store.trajectory(summary.id)
            first = detail.steps[0]
            assert first.node == "reflect"
            text = first.generations[0].text
            v_prev = forks[summary.group_id]["score"]
            before = len(first.state_before["images"])
            after = (detail.final_state or {}).get("images") or []
            v_new = after[before]["score"] if len(after) > before else v_prev
            stop = parse_reflection(text).stop
            c = (v_new - v_prev) if v_prev < 1 else float(stop)
            expected = c + (1.0 if parse_reflection(text).well_formed else 0.0)
            (stored,) = [
                r for r in store.rewards(summary.id, "reflection") if r.step_seq == first.seq
            ]
            assert stored.value == pytest.approx(expected, abs=1e-12)
            checked += 1
        assert checked >= 6
        # The groups were read (one per fork point, else "no reflect groups of 2 or more"), and
        # trained on: the tiny VLM's reflections are noise (never well-formed, never the stop
        # phrase, edits the ShapeWorld editor cannot apply), so every member of a point gets the
        # same reward and nothing is saved — said in one line.
        assert done.returncode == 2
        assert "no reflect group carried a learning signal" in done.stderr, done.stderr
