"""``atelier train --config`` on real servers: the on-policy loop of a text policy (issue 15,
item 2).

Two replicas of ``atelier serve lm`` (the tiny text LM, in this process, on loopback) are the
decomposer and the other roles are ShapeWorld's (a malformed decomposition falls back to one
step, whose reflect loop ends correct or not: rewards vary within a group). The image roles stay
ShapeWorld's: with ``atelier serve image``'s tiny InstructPix2Pix as the editor, edits of
ShapeWorld's 256-pixel drawings on this 2-core machine, next to two LM servers in the same
process, outlasted the client's 60 s timeout.

The loop rolls out, stores the runs and their rewards, trains the decomposer's LoRA, saves and
registers a version, loads it on both replicas and samples the next iteration from it. Killed
with SIGKILL in the middle of its second iteration's rollout, ``--resume`` finishes it: the
same versions as a loop never killed (same weights), every run and version once, no reward
row twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import recorded_steps, run_atelier, sigkill_when

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytest_plugins = ("tests.tiny_models",)
pytestmark = [pytest.mark.models, pytest.mark.slow]

PROMPTS = "two red circles left of a blue square\nthree green triangles above a yellow star\n"
LOOP = ("--policy", "decompose", "--mode", "decompose")
OPTIONS = ("--iterations", "2", "-G", "3", "--max-rounds", "1", "--loop", "served")
LORA = ("--epochs", "1", "--minibatch-size", "8", "--lr", "1e-2")


@pytest.fixture(scope="module")
def replicas(text_lm_replicas: Any) -> Any:
    """Two ``atelier serve lm`` replicas of the tiny text LM: (servers, services)."""
    return text_lm_replicas


def _backends(tmp: Path, lms: list[Any]) -> Path:
    urls = ", ".join(f'"{s.url}"' for s in lms)
    path = tmp / "served.toml"
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.lm]\nkind = "openai"\nurls = [{urls}]\ntimeout_s = 60\n\n'
        "[backends.lm.sampling]\nmax_tokens = 12\ntemperature = 1.0\ntop_p = 1.0\n\n"
        '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "lm"\n'
        'generator = "world"\neditor = "world"\njudge = "world"\n'
    )
    return path


@pytest.fixture(scope="module")
def setup(replicas: Any, tiny_models: Any, tmp_path_factory: Any) -> Any:
    servers, services = replicas
    tmp = tmp_path_factory.mktemp("loop-served")
    (tmp / "prompts.txt").write_text(PROMPTS)
    return tmp, _backends(tmp, servers), tiny_models.lm, services


def _command(config: Path, model: Path, *extra: str) -> list[str]:
    prompts = ("--prompts", str(config.parent / "prompts.txt"))
    return [
        "train",
        "--config",
        str(config),
        "--model",
        str(model),
        *prompts,
        *LOOP,
        *OPTIONS,
        *LORA,
        *extra,
    ]


def _loop_state(db: Path) -> dict[str, Any]:
    with TrajectoryStore(f"sqlite:///{db}") as store:
        runs = [r for r in store.runs() if (r.config.get("loop") or {}).get("name") == "served"]
        versions = [v for v in store.policy_versions(name="decompose")]
        trajectories = [t for r in runs for t in store.trajectories(run=r.id, limit=None)]
        rewards = store.rewards(trajectory_ids=[t.id for t in trajectories])
        models = {
            r.config["loop"]["iteration"]: Counter(
                g.model
                for t in store.trajectories(run=r.id, limit=None)
                for step in store.trajectory(t.id).steps
                if step.node == "decompose"
                for g in step.generations
            )
            for r in runs
        }
    return {
        "runs": runs,
        "versions": versions,
        "trajectories": trajectories,
        "rewards": rewards,
        "models": models,
    }


def _weights(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def test_two_iterations_deploy_on_every_replica_and_a_sigkill_resumes_exactly(setup: Any):
    tmp, config, model, services = setup
    clean = tmp / "clean"
    clean.mkdir()
    done = run_atelier(*_command(config, model), db=clean / "a.db", cwd=clean, timeout=600)
    assert done.returncode == 0, done.stderr
    state = _loop_state(clean / "a.db")
    assert [v.version for v in state["versions"]] == ["1", "2"]
    first, second = state["versions"]
    assert first.metadata["loop_iteration"] == 0 and second.metadata["loop_iteration"] == 1
    assert first.metadata["first_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    # Iteration 0 sampled the base model, iteration 1 only the version iteration 0 trained,
    # which was loaded on both replicas under its name@version from its registered directory.
    assert set(state["models"][0]) == {"tiny-lm"}
    assert set(state["models"][1]) == {"decompose@1"} and sum(state["models"][1].values()) >= 4
    for service in services:
        assert service.engine.adapters.get("decompose@1") == first.path
    assert second.metadata["behaviour"] == "decompose@1"
    # The replicas served decompose@1 exactly as trained: the trainer, holding those weights,
    # recomputes the log-probs they recorded (ratio 1 before the second iteration's update).
    assert second.metadata["first_ratio_mean"] == pytest.approx(1.0, abs=1e-4)

    # The same loop, killed with SIGKILL once its second iteration has recorded a step.
    cut = tmp / "cut"
    cut.mkdir()
    db = cut / "a.db"
    sigkill_when(_command(config, model), db, lambda: recorded_steps(db, "served/1") > 0, cwd=cut)
    before = _loop_state(db)
    assert [v.version for v in before["versions"]] == ["1"]
    assert any(t.status != "succeeded" for t in before["trajectories"])

    again = run_atelier(*_command(config, model), db=db, cwd=cut, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr  # not a second loop by mistake
    resumed = run_atelier(*_command(config, model, "--resume"), db=db, cwd=cut, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    after = _loop_state(db)
    assert [v.version for v in after["versions"]] == ["1", "2"]
    assert len(after["runs"]) == 2  # the killed iteration's run was finished, not redone
    assert {t.status for t in after["trajectories"]} <= {"succeeded", "failed"}
    assert set(after["models"][1]) == {"decompose@1"}
    keys = Counter((r.trajectory_id, r.step_seq, r.name) for r in after["rewards"])
    assert keys and max(keys.values()) == 1  # no reward stored twice
    # The same versions as the loop that was never killed: the same adapter weights, up to
    # float32 rounding (the servers batch concurrent requests differently from one run to the
    # next, so a recorded log-prob may differ in its last bits; measured up to 1.7e-6, which
    # Adam's normalisation can amplify). One optimizer step moves a weight by about lr = 1e-2.
    for clean_version, cut_version in zip(state["versions"], after["versions"], strict=True):
        a, b = _weights(clean_version.path), _weights(cut_version.path)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)
