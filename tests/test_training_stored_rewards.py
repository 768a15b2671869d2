"""Every reward a decision trainer uses is in the store, and recomputes to the stored value.

A recorded ShapeWorld run of a learned router is scored (R_o, R_f stored), read back as GRPO
groups, trained on, and the members' composite, penalised reward and advantage are stored.
Each stored value is then recomputed here from the stored rows alone, in float64, without the
trainer's code: the composite from the stored R_o and R_f with the config's weights, SAIR's
complexity penalty from its definition, the advantage as (R − mean) / (std + ε) per group.
"""

from __future__ import annotations

import asyncio
import statistics

import pytest

from agent_graph.presets import shapeworld_tasks
from nodes.state import Budget
from policies.mode import LearnedModePolicy
from storage.store import TrajectoryStore
from training.decisions.groups import read_groups
from training.decisions.rewards import (
    FORMAT,
    OUTCOME,
    store_member_rewards,
    store_trained_rewards,
)
from training.decisions.sampling import collect
from training.decisions.trainer import GRPOConfig, GRPOTrainer
from training.rewards import trajectory_format_reward

WEIGHTS = (1.0, 0.25, 0.0)
EPS = 0.05


def _values(store: TrajectoryStore, name: str) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for reward in store.rewards(name=name):
        found.setdefault(reward.trajectory_id, []).append(reward.value)
    return found


def _penalised(rewards: list[float], images: list[int], eps: float) -> list[float]:
    """SAIR's penalty as the paper states it: near-best members scaled by N* / N_i."""
    counts = [max(1, n) for n in images]
    near = [r >= max(rewards) - eps for r in rewards]
    fewest = min(n for n, is_near in zip(counts, near, strict=True) if is_near)
    return [r * fewest / n if m else r for r, n, m in zip(rewards, counts, near, strict=True)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('rewards') / 'r.db'}")
    router = LearnedModePolicy(seed=3)
    tasks = shapeworld_tasks(2, 4, seed=7)
    run_id, _ = asyncio.run(collect(store, tasks, mode_policy=router, budget=Budget(max_rounds=2)))
    groups = read_groups(store, run_id, "mode", policy=router.name, version=router.version)
    stored = store_member_rewards(store, groups, (OUTCOME, FORMAT))
    config = GRPOConfig(reward_weights=WEIGHTS, complexity_eps=EPS, epochs=1)
    trainer = GRPOTrainer(router, config)
    result = trainer.train(groups)
    written = store_trained_rewards(store, result, trainer.name, {"run": run_id})
    yield store, run_id, stored, groups, result, written
    store.close()


def test_the_reward_components_are_stored_once_and_equal_the_trajectories(trained):
    store, run_id, stored, groups, *_ = trained
    members = [m.trajectory_id for g in groups for m in g.members]
    assert members and stored == 2 * len(members)  # R_o and R_f of every member
    outcome, format_ = _values(store, "checker"), _values(store, "format")
    assert set(outcome) == set(format_) == set(members)
    for tid in members:
        detail = store.trajectory(tid)
        assert outcome[tid] == [detail.score if detail.score is not None else 0.0]
        assert format_[tid] == [trajectory_format_reward(detail.final_state)]
    rows = len(store.rewards())
    again = read_groups(store, run_id, "mode", policy="router", version="0")
    parts = (OUTCOME, FORMAT)  # read back from the stored rows: the values trained on
    assert [[m.rewards[n] for n in parts] for g in again for m in g.members] == [
        [m.rewards[n] for n in parts] for g in groups for m in g.members
    ]
    assert store_member_rewards(store, again, (OUTCOME, FORMAT)) == 0  # nothing stored twice
    assert len(store.rewards()) == rows


def test_composite_penalty_and_advantage_are_stored_and_recompute_from_stored_rows(trained):
    store, _, _, groups, result, written = trained
    assert groups and written == 3 * sum(len(g.members) for g in groups)
    outcome, format_ = _values(store, "checker"), _values(store, "format")
    composite, penalised = _values(store, "composite"), _values(store, "penalised")
    advantage = _values(store, "advantage")
    spread = 0
    for group in groups:
        ids = [m.trajectory_id for m in group.members]
        r = [WEIGHTS[0] * outcome[t][0] + WEIGHTS[1] * format_[t][0] for t in ids]
        assert [composite[t] for t in ids] == [[pytest.approx(v, abs=1e-12)] for v in r]
        shaped = _penalised(r, [m.image_count for m in group.members], EPS)
        assert [penalised[t] for t in ids] == [[pytest.approx(v, abs=1e-12)] for v in shaped]
        mean, std = statistics.fmean(shaped), statistics.stdev(shaped)
        expected = [(v - mean) / (std + GRPOConfig().advantage_eps) for v in shaped]
        assert [advantage[t] for t in ids] == [[pytest.approx(v, abs=1e-9)] for v in expected]
        spread += std > 0
    assert spread > 0  # some group had a signal (else the advantages are trivially 0)
    (row, *_) = store.rewards(name="advantage")
    assert row.details["trained"] == f"router@{result.version}" and row.details["group"]


@pytest.mark.slow  # a training loop in a subprocess
def test_atelier_train_leaves_the_rewards_it_trained_on_in_the_store(tmp_path):
    from tests.cli_helpers import run_atelier

    db = tmp_path / "t.db"
    done = run_atelier(
        *("train", "--world", "shapeworld", "--iterations", "1", "--per-category", "1"),
        *("-G", "2", "--out", "versions", "--reward-weights", "1,0.5,0.25", "--penalty", "none"),
        db=db,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    store = TrajectoryStore(f"sqlite:///{db}")
    names = {reward.name for reward in store.rewards()}
    assert {"checker", "format", "stepwise", "composite", "penalised", "advantage"} <= names
    (run,) = [run for run in store.runs() if run.name == "grpo-0"]
    trajectories = store.trajectories(run=run.id, limit=None)
    trained = [t for t in trajectories if "composite" in t.rewards]
    assert trained and all({"checker", "format", "stepwise"} <= set(t.rewards) for t in trained)
    for t in trained:  # the CLI's weights, as stored: R = R_o + 0.5·R_f + 0.25·R_s
        expected = t.rewards["checker"] + 0.5 * t.rewards["format"]
        expected += 0.25 * t.rewards["stepwise"]
        assert t.rewards["composite"] == pytest.approx(expected, abs=1e-12)
    (version,) = store.policy_versions(name="router")
    assert version.metadata["config"]["reward_weights"] == [1.0, 0.5, 0.25]
    store.close()


@pytest.mark.parametrize(
    "weights",
    ["1,0", "a,b,c", "-1,0,0", "0,0,0", "nan,0,0", "inf,0,0"],
)
def test_bad_reward_weights_are_one_line_errors(tmp_path, weights):
    from tests.cli_helpers import run_atelier

    done = run_atelier(
        "train", "--world", "shapeworld", f"--reward-weights={weights}", db=tmp_path / "t.db",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error: --reward-weights")


def test_reward_weights_are_refused_for_a_tree_stage(tmp_path):
    from tests.cli_helpers import run_atelier

    done = run_atelier(
        "train", "--run", "any", "--tree-stage", "reflect_refine", "--reward-weights=1,1,0",
        db=tmp_path / "t.db", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "do not apply to --tree-stage" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_train_from_a_stored_run_stores_r_s_and_trains_on_it(tmp_path):
    """``--run`` with a3 > 0: the analyzer's R_s is stored (per text and per trajectory) before
    the groups are read, and the stored composite is a1·R_o + a2·R_f + a3·R_s of stored rows."""
    from tests.cli_helpers import run_atelier

    db = tmp_path / "t.db"
    recorded = run_atelier(
        *("rollout", "--mode", "random", "--per-category", "1", "-G", "3", "--name", "src"),
        db=db,
        cwd=tmp_path,
    )
    assert recorded.returncode == 0, recorded.stderr
    done = run_atelier(
        *("train", "--run", "src", "--out", "versions", "--reward-weights", "0.5,0,1"),
        *("--penalty", "none"),
        db=db,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    store = TrajectoryStore(f"sqlite:///{db}")
    stepwise = [r for r in store.rewards(name="stepwise")]
    per_step = [r for r in stepwise if r.step_seq is not None]
    assert per_step and all(r.source == "shapeworld-analyzer" for r in stepwise)
    by_trajectory = {r.trajectory_id: r.value for r in stepwise if r.step_seq is None}
    for t in store.trajectories(limit=None):
        if "composite" not in t.rewards:
            continue
        texts = [r.value for r in per_step if r.trajectory_id == t.id]
        expected_rs = sum(texts) / len(texts) if texts else 0.0
        assert by_trajectory[t.id] == pytest.approx(expected_rs, abs=1e-12)
        expected = 0.5 * t.rewards["checker"] + by_trajectory[t.id]
        assert t.rewards["composite"] == pytest.approx(expected, abs=1e-12)
    store.close()


def _darkness(image, prompt: str) -> float:
    """A reward of the image alone: 1 − its mean grey level (ShapeWorld draws on white)."""
    from PIL import ImageStat

    return 1.0 - ImageStat.Stat(image.convert("L")).mean[0] / 255.0


def test_the_loop_scores_each_run_with_a_reward_source_and_trains_on_it(tmp_path):
    """``grpo_iterations(reward_source=...)``: every rollout's final images are scored and
    stored under the source's name before the groups are read, R_o is that reward (the stored
    composite equals it), and the saved version records the source."""
    from training.decisions.loop import grpo_iterations
    from training.rewards.sources import FunctionReward

    store = TrajectoryStore(f"sqlite:///{tmp_path / 'loop.db'}")
    source = FunctionReward(_darkness, "darkness")
    tasks = [shapeworld_tasks(2, 3, seed=7)]
    wrong = GRPOTrainer(LearnedModePolicy(seed=3), GRPOConfig(epochs=1))
    with pytest.raises(ValueError, match="outcome_reward='darkness'"):
        asyncio.run(grpo_iterations(store, wrong, tasks, reward_source=source))
    assert not store.runs()  # refused before any rollout

    config = GRPOConfig(outcome_reward="darkness", complexity_eps=None, epochs=1)
    trainer = GRPOTrainer(LearnedModePolicy(seed=3), config)
    _, log = asyncio.run(
        grpo_iterations(
            store,
            trainer,
            tasks,
            budget=Budget(max_rounds=1),
            save_dir=tmp_path / "versions",
            reward_source=source,
        )
    )
    finals = [
        t for t in store.trajectories(run=log[0].run_id, limit=None) if t.final_image is not None
    ]
    dark = _values(store, "darkness")
    assert finals and set(dark) == {t.id for t in finals}
    for t in finals:  # recomputed from the stored image
        assert dark[t.id] == [pytest.approx(_darkness(store.get(t.final_image), ""), abs=1e-12)]
    composite = _values(store, "composite")
    assert composite and all(composite[t] == pytest.approx(dark[t]) for t in composite)
    assert not store.rewards(name="checker")  # the judge score was not what it trained on
    (version,) = store.policy_versions(name="router")
    assert version.metadata["reward_source"]["reward"] == "darkness"
    assert version.metadata["reward_source"]["kind"] == "function"
    assert version.metadata["config"]["outcome_reward"] == "darkness"
    store.close()
