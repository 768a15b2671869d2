"""``atelier train --policy decompose``: a text policy's LoRA from a run recorded by the CLI.

Real parts end to end: ``atelier serve lm`` (the tiny text LM, in this process, on loopback) is
the decomposer of a backends file whose other roles are ShapeWorld; ``atelier rollout`` records
a decompose-mode run (G = 3 per prompt, temperature 1, log-probs); ``atelier train --run ...
--policy decompose --model ...`` stores the run's rewards, trains the adapter on the node's
groups (ratio 1 before the first update), stores each member's reward and advantage, saves a
new registered version, and refuses bad input with one line."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier

pytest_plugins = ("tests.tiny_models",)
pytestmark = pytest.mark.models


def _backends(tmp: Path, url: str) -> Path:
    path = tmp / "served.toml"
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.lm]\nkind = "openai"\nurls = ["{url}"]\ntimeout_s = 60\n\n'
        "[backends.lm.sampling]\nmax_tokens = 12\ntemperature = 1.0\ntop_p = 1.0\n\n"
        '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "lm"\n'
        'generator = "world"\neditor = "world"\njudge = "world"\n'
    )
    return path


@pytest.fixture(scope="module")
def recorded(text_lm: Any, tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    server, _ = text_lm
    tmp = tmp_path_factory.mktemp("train-text")
    db = tmp / "runs.db"
    done = run_atelier(
        *("rollout", "--config", str(_backends(tmp, server.url)), "--mode", "decompose"),
        *("--per-category", "1", "-G", "3", "--name", "served"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return tmp, db, tiny_models.lm


def test_train_decompose_from_a_recorded_run(recorded: Any) -> None:
    tmp, db, model = recorded
    done = run_atelier(
        *("train", "--run", "served", "--policy", "decompose", "--model", str(model)),
        *("--epochs", "2", "--minibatch-size", "8", "--out", "adapters", "--beta", "0.04"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "step 1/" in done.stderr  # a metrics line per optimizer step
    assert (tmp / "adapters" / "decompose-1" / "adapter_model.safetensors").is_file()
    assert "saved adapters/decompose-1" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.count("|") == 3]
    rows = dict(line.strip("| ").split(" | ") for line in table if "---" not in line)
    assert abs(float(rows["first_max_abs_log_ratio"])) < 1e-4  # it saw what the server saw

    store = TrajectoryStore(f"sqlite:///{db}")
    (version,) = store.policy_versions(name="decompose")
    assert version.version == "1" and version.metadata["reward"] == "sair_penalised"
    assert version.metadata["config"]["beta"] == 0.04
    # Every member's reward and advantage are stored on its decompose step; the advantages of
    # each group are (R - mean) / (std + eps) of the stored rewards it was trained on.
    rewards = {(r.trajectory_id, r.name): r for r in store.rewards() if r.name.startswith("lora_")}
    groups: dict[str, list[tuple[float, float]]] = {}
    for (tid, name), row in rewards.items():
        if name == "lora_reward":
            advantage = rewards[(tid, "lora_advantage")]
            assert row.step_seq == advantage.step_seq is not None
            assert row.details["trained"] == "decompose@1"
            groups.setdefault(row.details["group"], []).append((row.value, advantage.value))
    assert groups
    for members in groups.values():
        values = [r for r, _ in members]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        mean = statistics.fmean(values)
        for reward, advantage in members:
            expected = 0.0 if std == 0 else (reward - mean) / (std + 1e-4)
            assert advantage == pytest.approx(expected, abs=1e-6)
    # ...and the reward each was trained on is the stored sair_penalised of its trajectory.
    stored = {r.trajectory_id: r.value for r in store.rewards(name="sair_penalised")}
    for (tid, name), row in rewards.items():
        if name == "lora_reward":
            assert row.value == pytest.approx(stored[tid], abs=1e-12)
    store.close()

    again = run_atelier(
        *("train", "--run", "served", "--policy", "decompose", "--model", str(model)),
        *("--epochs", "1", "--out", "adapters", "--init", "adapters/decompose-1"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    # The run was sampled by the base model, not by decompose@1: the ratio would not be 1, so
    # training decompose@1 on it is refused, naming the first token that differs.
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    assert "completion token 0" in lines[0] and "max_logprob_drift" in lines[0]
    assert not (tmp / "adapters" / "decompose-2").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--model", "/no/such/model"), "--model /no/such/model: no such model directory"),
        (("--lr", "-1"), "--lr: Input should be greater than or equal to 0"),
        (("--max-logprob-drift", "nan"), "--max-logprob-drift: Input should be a finite"),
        (("--init", "."), "is not a saved adapter"),
        (("--tree-stage", "reflect_refine"), "--tree-stage trains the stop policy"),
    ],
)
def test_bad_text_policy_input_is_one_line(recorded: Any, extra: tuple, message: str) -> None:
    tmp, db, model = recorded
    args = ["train", "--run", "served", "--policy", "decompose", "--model", str(model), *extra]
    done = run_atelier(*args, db=db, cwd=tmp)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("atelier: error:") and message in lines[0]


def test_a_run_without_served_groups_is_refused(tmp_path: Path, tiny_models: Any) -> None:
    """A ShapeWorld run's decompositions have no log-probs: no GRPO groups, one line."""
    db = tmp_path / "t.db"
    assert (
        run_atelier(
            *("rollout", "--mode", "decompose", "--per-category", "1", "-G", "2", "--name", "sw"),
            db=db,
            cwd=tmp_path,
        ).returncode
        == 0
    )
    done = run_atelier(
        *("train", "--run", "sw", "--policy", "decompose", "--model", str(tiny_models.lm)),
        db=db,
        cwd=tmp_path,
        timeout=600,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "atelier: error:" in lines[0]


def test_sft_imitates_a_rule_based_roles_recorded_outputs(tmp_path: Path, tiny_models: Any) -> None:
    """``--sft`` on a ShapeWorld run: the chosen decompositions (text only: the rule-based role
    has no token ids) are encoded with the student's tokenizer and become a new version."""
    db = tmp_path / "t.db"
    assert (
        run_atelier(
            *("rollout", "--mode", "decompose", "--per-category", "1", "--name", "teacher"),
            db=db,
            cwd=tmp_path,
        ).returncode
        == 0
    )
    done = run_atelier(
        *("train", "--run", "teacher", "--policy", "decompose", "--sft", "--epochs", "2"),
        *("--model", str(tiny_models.lm), "--minibatch-size", "4", "--lr", "0.003"),
        db=db,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.count("|") == 3]
    rows = dict(line.strip("| ").split(" | ") for line in table if "---" not in line)
    assert float(rows["last_loss"]) < float(rows["first_loss"])
    assert float(rows["examples"]) >= 1
    store = TrajectoryStore(f"sqlite:///{db}")
    (version,) = store.policy_versions(name="decompose")
    assert version.metadata["algorithm"] == "sft" and version.version == "1"
    assert (Path(version.path) / "adapter_model.safetensors").is_file()
    store.close()


@pytest.mark.parametrize(
    "args",
    [
        ("--world", "shapeworld", "--sft"),
        ("--world", "shapeworld", "--lr", "0.1"),
        ("--run", "any", "--policy", "stop", "--model", "."),
        ("--run", "any", "--reward", "checker"),
    ],
)
def test_text_policy_options_are_refused_for_decision_policies(tmp_path: Path, args: tuple):
    done = run_atelier("train", *args, db=tmp_path / "t.db", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "give --policy plan, reflect, decompose, draw or refine" in lines[0]
