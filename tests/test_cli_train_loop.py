"""``atelier train --config FILE``: the on-policy loop over a backends file, on ShapeWorld's
(``examples/configs/shapeworld.toml``) — decision policies deployed as a run deploys them,
resumed after SIGKILL without duplicates, and refused with one line on bad input. The text
policy's loop on real servers is ``tests/test_train_loop_served.py``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import recorded_steps, run_atelier, sigkill_when

pytest.importorskip("torch")

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "shapeworld.toml"
SMALL = ("--per-category", "1", "-G", "4", "--max-rounds", "1")


def _loop(db: Path, name: str, policy: str) -> dict[str, Any]:
    with TrajectoryStore(f"sqlite:///{db}") as store:
        runs = sorted(
            (r for r in store.runs() if (r.config.get("loop") or {}).get("name") == name),
            key=lambda r: r.config["loop"]["iteration"],
        )
        versions = store.policy_versions(name=policy)
        decisions = {}
        for run in runs:
            made = Counter()
            for summary in store.trajectories(run=run.id, limit=None):
                for step in store.trajectory(summary.id).steps:
                    if step.policy is not None:  # the policy version that took the step
                        made[f"{step.policy}@{step.policy_version}"] += 1
            decisions[run.config["loop"]["iteration"]] = made
        ids = [t.id for r in runs for t in store.trajectories(run=r.id, limit=None)]
        rewards = store.rewards(trajectory_ids=ids)
    return {"runs": runs, "versions": versions, "decisions": decisions, "rewards": rewards}


def test_router_loop_deploys_each_version_and_resume_continues(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    args = ("train", "--config", str(CONFIG), "--iterations", "2", *SMALL)
    done = run_atelier(*args, db=db, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| 1 | router@1 |" in done.stdout and "router@2" in done.stdout
    state = _loop(db, "train-router", "router")
    initial, first, second = state["versions"]
    assert initial.metadata["loop_iteration"] == -1 and initial.metadata["algorithm"].startswith(
        "initial"
    )
    assert [first.version, second.version] == ["1", "2"]
    # Each iteration's decisions were made by the version the one before trained (on-policy).
    routed = [{k for k in state["decisions"][i] if k.startswith("router@")} for i in (0, 1)]
    assert routed == [{"router@0"}, {"router@1"}]
    assert state["runs"][1].config["policies"] == {"router": "router@1"}
    # What each member was trained with is stored with its version, once.
    trained = Counter(
        (r.details or {}).get("trained") for r in state["rewards"] if r.name == "advantage"
    )
    assert set(trained) == {"router@1", "router@2"}
    keys = Counter((r.trajectory_id, r.step_seq, r.name) for r in state["rewards"])
    assert max(keys.values()) == 1

    again = run_atelier(*args, db=db, cwd=tmp_path)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith("atelier: error: a training loop named 'train-router'")

    # A save killed after writing the files but before registering them left router-3/.
    (tmp_path / "atelier-policies" / "router-3").mkdir()
    more = ("train", "--config", str(CONFIG), "--iterations", "3", *SMALL, "--resume")
    resumed = run_atelier(*more, db=db, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "was never registered (a killed save): moved aside" in resumed.stderr
    assert "router@1 (done before)" in resumed.stdout and "| 2 | router@2 |" in resumed.stdout
    after = _loop(db, "train-router", "router")
    assert [v.version for v in after["versions"]] == ["0", "1", "2", "3"]
    assert [v.metadata["loop_iteration"] for v in after["versions"]] == [-1, 0, 1, 2]
    assert len(after["runs"]) == 3
    assert list((tmp_path / "atelier-policies").glob(".router-3.unregistered-*"))


def test_a_sigkilled_stop_loop_resumes_to_the_same_versions(tmp_path: Path) -> None:
    args = ["train", "--config", str(CONFIG), "--policy", "stop", "--iterations", "2", *SMALL]
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    clean.mkdir(), cut.mkdir()
    done = run_atelier(*args, db=clean / "a.db", cwd=clean)
    assert done.returncode == 0, done.stderr

    db = cut / "a.db"
    sigkill_when(args, db, lambda: recorded_steps(db, "train-stop/1") > 0, cwd=cut, timeout=120)
    resumed = run_atelier(*args, "--resume", db=cut / "a.db", cwd=cut)
    assert resumed.returncode == 0, resumed.stderr

    want, got = (
        _loop(clean / "a.db", "train-stop", "stop"),
        _loop(cut / "a.db", "train-stop", "stop"),
    )
    assert [v.version for v in got["versions"]] == [v.version for v in want["versions"]]
    assert len(got["runs"]) == 2
    keys = Counter((r.trajectory_id, r.step_seq, r.name) for r in got["rewards"])
    assert max(keys.values()) == 1
    from policies.weights import load_weights

    for a, b in zip(want["versions"], got["versions"], strict=True):  # ShapeWorld: exact
        wa, wb = load_weights(a.path)[0], load_weights(b.path)[0]
        assert all((wa[k] == wb[k]).all() for k in wa), f"{a.version} differs"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--resume",), "--resume belongs to the on-policy loop: give --config FILE"),
        (("--config", "nope.toml"), "--config nope.toml: no such file"),
        (("--config", str(CONFIG), "--policy", "draw"), "--policy draw needs --model"),
        (("--config", str(CONFIG), "--mode", "reflect"), "--mode names a built-in router"),
        (("--config", str(CONFIG), "--policy", "decompose"), "needs --model"),
        (("--config", str(CONFIG), "--prompts", "empty.txt"), "holds no prompt"),
        (("--config", str(CONFIG), "--prompts", "missing.txt"), "cannot read --prompts"),
        (
            ("--config", str(CONFIG), "--policy", "decompose", "--model", "."),
            "trains the decomposer role's model, but",
        ),
        (("--config", str(CONFIG), "--concurrency", "0"), "--concurrency must be at least 1"),
        (
            ("--config", str(CONFIG), "--policy", "decompose", "--device", "cuda:99"),
            "--device cuda:99: torch sees",
        ),
        (("--config", str(CONFIG), "--policy", "draw", "--device", "gpu"), "not a device"),
        (("--config", str(CONFIG), "--tree-stage", "r3"), "r3 trains a reason-stage policy"),
        (("--run", "x", "--tree-stage", "r3"), "alternates stages through a backends file"),
    ],
)
def test_bad_loop_input_is_one_line(tmp_path: Path, extra: tuple, message: str) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    args = extra if extra[0] != "--resume" else ("--world", "shapeworld", *extra)
    done = run_atelier("train", *args, db=tmp_path / "a.db", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error: "), done.stderr
    assert message in lines[0]


def test_resume_with_other_options_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    args = ("train", "--config", str(CONFIG), "--iterations", "1", *SMALL)
    assert run_atelier(*args, db=db, cwd=tmp_path).returncode == 0
    changed = run_atelier(*args, "--resume", "--max-rounds", "2", db=db, cwd=tmp_path)
    assert changed.returncode == 2
    assert "the loop was started with max_rounds = 1, not 2" in changed.stderr


def test_a_server_down_is_one_line_and_resume_rolls_the_iteration_out_again(
    tmp_path: Path,
) -> None:
    config = tmp_path / "dead.toml"
    config.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        '[backends.dead]\nkind = "openai"\nurls = ["http://127.0.0.1:9"]\nretries = 0\n'
        "timeout_s = 2\n\n"
        '[roles]\nplanner = "dead"\nreflector = "world"\ndecomposer = "world"\n'
        'generator = "world"\neditor = "world"\njudge = "world"\n'
    )
    db = tmp_path / "a.db"
    args = ("train", "--config", str(config), "--iterations", "1", "--per-category", "1")
    done = run_atelier(*args, "-G", "2", db=db, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error: iteration 0 of loop"), lines
    assert "trajectories failed; the first:" in lines[0] and "127.0.0.1:9" in lines[0]
    again = run_atelier(*args, "-G", "2", "--resume", db=db, cwd=tmp_path)
    assert again.returncode == 2 and "iteration 0 of loop" in again.stderr
    with TrajectoryStore(f"sqlite:///{db}") as store:
        runs = [r for r in store.runs() if "loop" in r.config]
        assert len(runs) == 2  # the failed run kept, the iteration rolled out again
        assert [v.version for v in store.policy_versions(name="router")] == ["0"]
