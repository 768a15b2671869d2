"""``atelier train``: the on-policy ShapeWorld loop and training from stored runs."""

from __future__ import annotations

import subprocess

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier

pytestmark = pytest.mark.slow  # see pyproject's markers: make test-fast skips it


def atelier(*args: str, db, cwd) -> subprocess.CompletedProcess:
    return run_atelier(*args, db=db, cwd=cwd, timeout=600)


def test_train_loop_then_train_from_a_stored_run(tmp_path):
    db = tmp_path / "train.db"
    loop = atelier(
        "train",
        "--world",
        "shapeworld",
        "--iterations",
        "2",
        "--per-category",
        "2",
        "-G",
        "4",
        "--out",
        "versions",
        "--tensorboard",
        "tb",
        db=db,
        cwd=tmp_path,
    )
    assert loop.returncode == 0, loop.stderr
    rows = [
        line for line in loop.stdout.splitlines() if line.startswith("| ") and "|---" not in line
    ]
    assert len(rows) == 3  # header + one row per iteration
    assert "uniform-mode@1" in rows[1] and "router@1" in rows[2]
    # The same numbers as TensorBoard scalars, one point per iteration.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    accuracy = [e.value for e in events.Scalars("rollout/accuracy")]
    printed = [float(row.split("|")[4]) for row in rows[1:]]
    assert accuracy == pytest.approx(printed, abs=0.005)
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
    assert (tmp_path / "versions" / "router-2" / "config.json").exists()

    store = TrajectoryStore(f"sqlite:///{db}")
    assert [v.version for v in store.policy_versions(name="router")] == ["1", "2"]
    runs = {run.name: run for run in store.runs()}
    assert {"grpo-0", "grpo-1"} <= set(runs)
    # The second iteration's decisions were taken (and recorded) by the first trained version.
    detail = store.trajectory(store.trajectories(run=runs["grpo-1"].id, limit=1)[0].id)
    decision = detail.steps[0].update["decisions"][0]
    assert (decision["policy"], decision["version"]) == ("router", "1")
    store.close()

    offline = atelier(
        "train",
        "--run",
        "grpo-0",
        "--init",
        "versions/router-2",
        "--out",
        "versions",
        "--penalty",
        "margin",
        db=db,
        cwd=tmp_path,
    )
    assert offline.returncode == 0, offline.stderr
    assert "trained router@3" in offline.stdout
    assert (tmp_path / "versions" / "router-3").is_dir()
    store = TrajectoryStore(f"sqlite:///{db}")
    (version,) = [v for v in store.policy_versions(name="router") if v.version == "3"]
    assert version.metadata["penalty"] == "margin"
    store.close()
    negative = atelier("train", "--run", "grpo-0", "--image-cost", "-1", db=db, cwd=tmp_path)
    assert negative.returncode == 2 and "--image-cost" in negative.stderr

    missing = atelier("train", "--run", "nope", db=db, cwd=tmp_path)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


def test_tree_rl_stage_from_a_stored_run(tmp_path):
    db = tmp_path / "tree.db"
    common = ("--per-category", "2", "-G", "4", "--out", "versions")
    loop = atelier(
        "train", "--world", "shapeworld", "--policy", "stop", "--iterations", "1", *common,
        db=db, cwd=tmp_path,
    )  # fmt: skip
    assert loop.returncode == 0, loop.stderr
    tree = atelier(
        "train", "--run", "grpo-0", "--tree-stage", "reflect_refine", "--iterations", "2",
        "--starts", "6", "--perfect-share", "0.5", "--start-weighting", "room", *common,
        db=db, cwd=tmp_path,
    )  # fmt: skip
    assert tree.returncode == 0, tree.stderr
    rows = [row for row in tree.stdout.splitlines() if row.startswith("| ") and "---" not in row]
    assert len(rows) == 3  # header + one row per iteration
    # A fresh stop policy takes a version no stored one has (stop@1 came from the loop).
    assert "| stop@2 |" in rows[1] and "6 (3)" in rows[1] and rows[1].endswith("| stop@3 |")
    assert "| stop@3 |" in rows[2] and rows[2].endswith("| stop@4 |")
    assert (tmp_path / "versions" / "stop-4" / "config.json").exists()

    store = TrajectoryStore(f"sqlite:///{db}")
    assert [v.version for v in store.policy_versions(name="stop")] == ["1", "3", "4"]
    forks = [run for run in store.runs() if run.name.startswith("tree-reflect_refine")]
    assert len(forks) == 2
    parent = store.resolve_run("grpo-0").id
    for run in forks:
        assert run.config["tree"]["parent_runs"] == [parent]
        assert run.config["world"] == "shapeworld"  # the parent's backends
        for point, parent_step in run.config["tree"]["forks"].items():
            assert point == f"{parent_step['trajectory']}@{parent_step['step']}"
            assert len(store.trajectories(run=run.id, group=point)) % 4 == 0
        # The stage reward (C_j) and what each member was trained with are in the store.
        for trajectory in store.trajectories(run=run.id, limit=None):
            assert {"correction", "advantage"} <= set(trajectory.rewards)
    store.close()

    wrong = atelier(
        "train", "--run", "grpo-0", "--tree-stage", "reflect_refine", "--policy", "router",
        db=db, cwd=tmp_path,
    )  # fmt: skip
    assert wrong.returncode == 2 and "trains the stop policy" in wrong.stderr
    no_run = atelier(
        "train", "--world", "shapeworld", "--tree-stage", "reflect_refine", db=db, cwd=tmp_path
    )
    assert no_run.returncode == 2 and "--run" in no_run.stderr


def test_reward_sources_on_a_shapeworld_run(tmp_path):
    """checker (the default) trains on the judge score each run stored, exactly as the library's
    GRPO pipeline does; judge and gvu need a VLM, which a ShapeWorld run has not: one line."""
    import torch

    from policies.mode import LearnedModePolicy
    from policies.weights import load_policy
    from training.decisions.groups import read_groups
    from training.decisions.trainer import GRPOConfig, GRPOTrainer

    db = tmp_path / "sw.db"
    rollout = atelier(
        "rollout", "--per-category", "1", "-G", "3", "--name", "sw", db=db, cwd=tmp_path
    )
    assert rollout.returncode == 0, rollout.stderr
    for source in ("gvu", "judge"):
        done = atelier(
            "train", "--run", "sw", "--reward-source", source, "--out", "bad", db=db, cwd=tmp_path
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"atelier: error: --reward-source {source} scores images")
        assert "recorded on ShapeWorld (no VLM)" in lines[0] and "--config FILE" in lines[0]
    loop = atelier("train", "--world", "shapeworld", "--reward-source", "gvu", db=db, cwd=tmp_path)
    assert loop.returncode == 2 and "--world shapeworld rolls out on ShapeWorld" in loop.stderr
    assert not (tmp_path / "bad").exists()

    default = atelier("train", "--run", "sw", "--out", "default", db=db, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    explicit = atelier(
        "train", "--run", "sw", "--reward-source", "checker", "--out", "explicit",
        db=db, cwd=tmp_path,
    )  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr
    with TrajectoryStore(f"sqlite:///{db}") as store:
        run_id = store.resolve_run("sw").id
        assert not store.rewards(name="gvu") and not store.rewards(name="vlm_yes")
        reference = GRPOTrainer(LearnedModePolicy(seed=0), GRPOConfig(seed=0))
        expected = reference.train(read_groups(store, run_id, "mode")).policy.parameters()
        for out in ("default", "explicit"):
            (path,) = (tmp_path / out).iterdir()  # a fresh policy: the first free version
            (info,) = [v for v in store.policy_versions(name="router") if v.path == str(path)]
            assert info.metadata["config"]["outcome_reward"] == "checker"
            assert info.metadata["reward_source"]["kind"] == "checker"
            trained = load_policy(path).parameters()
            assert len(trained) == len(expected)
            assert all(torch.equal(a, b) for a, b in zip(trained, expected, strict=True))
