"""GRPOTrainer on synthetic decision groups: direction of learning, zero-variance groups,
reward shaping, checkpoint/resume, saving a registered version."""

from __future__ import annotations

import math

import pytest
import torch

from policies.base import ModeObservation, StopObservation
from policies.mode import LearnedModePolicy
from policies.stop import LearnedStopPolicy
from training.decisions.groups import DecisionGroup, DecisionMember, DecisionRecord
from training.decisions.trainer import GRPOConfig, GRPOTrainer, shaped_rewards
from training.versions import save_version

UNIFORM = math.log(1 / 3)
BEST = {"a red circle": "direct", "two red circles, three green triangles and a star": "decompose"}


def _member(i: int, prompt: str, action: str, reward: float, images: int = 1) -> DecisionMember:
    decision = DecisionRecord(
        "mode", action, UNIFORM, "uniform-mode", "1", 0, 0, ModeObservation(prompt)
    )
    return DecisionMember(f"t{i}", i, "succeeded", action, images, {"checker": reward}, (decision,))


def _group(prompt: str, gid: str) -> DecisionGroup:
    """Six samples, two per mode; the prompt's best mode scores 1, the others 0."""
    members = tuple(
        _member(i, prompt, mode, 1.0 if mode == BEST[prompt] else 0.0)
        for i, mode in enumerate(["direct", "reflect", "decompose"] * 2)
    )
    return DecisionGroup("run", gid, prompt, None, "mode", members)


def _flat_group(gid: str) -> DecisionGroup:
    members = tuple(_member(i, "a blue square", "reflect", 0.5) for i in range(4))
    return DecisionGroup("run", gid, "a blue square", None, "mode", members)


def _config(**overrides) -> GRPOConfig:
    return GRPOConfig(**{"lr": 0.05, "epochs": 4, "complexity_eps": None, **overrides})


def test_training_raises_the_probability_of_positive_advantage_actions():
    router = LearnedModePolicy()
    groups = [_group(p, f"g{i}") for i, p in enumerate(BEST)] + [_flat_group("flat")]
    trainer = GRPOTrainer(router, _config())
    result = trainer.train(groups)
    assert result.policy.version == result.version == trainer.version == "1"
    assert router.version == "0"
    assert result.metrics["groups_zero_variance"] == 1 and result.metrics["groups_used"] == 2
    assert result.metrics["decisions"] == 12
    assert result.metrics["steps"] == len(result.history) == 4  # 12 members, 1 batch, 4 epochs
    # The stored log-probs are the uniform router's, which the fresh router is: ratio 1 first.
    assert result.metrics["first_max_abs_log_ratio"] < 1e-12
    for prompt, best in BEST.items():
        before = router.probabilities(ModeObservation(prompt))
        after = result.policy.probabilities(ModeObservation(prompt))
        assert before[best] == pytest.approx(1 / 3)  # the input policy is left untouched
        assert after[best] > 0.4
    again = trainer.train(groups)
    assert again.policy.version == "2"


def test_only_zero_variance_groups_means_no_update():
    router = LearnedModePolicy()
    result = GRPOTrainer(router, _config()).train([_flat_group("a"), _flat_group("b")])
    assert result.metrics["groups_zero_variance"] == 2 and result.metrics["decisions"] == 0
    assert result.version == router.version  # no optimizer step: no new version
    for p, q in zip(router.parameters(), result.policy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_shaped_rewards_compose_then_penalise():
    members = (
        DecisionMember("a", 0, "succeeded", "direct", 1, {"checker": 1.0, "format": 1.0}),
        DecisionMember("b", 1, "succeeded", "decompose", 3, {"checker": 1.0, "format": 1.0}),
        DecisionMember("c", 2, "succeeded", "reflect", 2, {"checker": 0.5, "format": 0.0}),
    )
    group = DecisionGroup("run", "g", "p", None, "mode", members)
    # R = 0.5·R_o + 0.5·R_f = 1, 1, 0.25; near-best (eps 0.1) = a, b; N* = 1 -> b scaled by 1/3
    cfg = GRPOConfig(reward_weights=(0.5, 0.5, 0.0), complexity_eps=0.1)
    assert shaped_rewards(group, cfg) == pytest.approx([1.0, 1 / 3, 0.25])
    with pytest.raises(KeyError):
        shaped_rewards(group, GRPOConfig(reward_weights=(1.0, 0.0, 1.0)))  # no "stepwise"


def test_stop_policy_trains_on_multi_decision_members_with_kl():
    def obs(stop_phrase: bool) -> StopObservation:
        text = "<think>ok</think>No further edit needed." if stop_phrase else "<think>x</think>Add."
        return StopObservation("p", "p", text, stop_phrase, True, 0, 4, 1, (0.5,))

    def member(i: int, actions: list[tuple[bool, str]], reward: float) -> DecisionMember:
        decisions = tuple(
            DecisionRecord("stop", a, math.log(0.5), "stop", "0", j, j, obs(s))
            for j, (s, a) in enumerate(actions)
        )
        return DecisionMember(f"t{i}", i, "succeeded", "reflect", 1, {"checker": reward}, decisions)

    # Following the reflection pays; going against it does not.
    members = (
        member(0, [(False, "continue"), (True, "stop")], 1.0),
        member(1, [(True, "continue"), (True, "continue")], 0.0),
        member(2, [(False, "stop")], 0.0),
        member(3, [(True, "stop")], 1.0),
    )
    group = DecisionGroup("run", "g", "p", None, "stop", members)
    cfg = _config(beta=0.04, loss_type="sequence_mean")
    result = GRPOTrainer(LearnedStopPolicy(), cfg).train([group])
    assert result.metrics["decisions"] == 6 and result.metrics["kl"] > 0
    assert result.policy.probabilities(obs(True))["stop"] > 0.55
    assert result.policy.probabilities(obs(False))["continue"] > 0.55


def test_checkpoint_resume_continues_exactly(tmp_path):
    groups = [_group(p, f"g{i}") for i, p in enumerate(BEST)]
    cfg = _config(minibatch_size=4, beta=0.01)
    trainer = GRPOTrainer(LearnedModePolicy(hidden=8), cfg)
    trainer.train(groups)
    trainer.save_checkpoint(tmp_path / "ckpt")
    straight = trainer.train(groups).policy

    resumed = GRPOTrainer.resume(tmp_path / "ckpt")
    assert resumed.config == cfg and resumed.steps == trainer.steps - 12
    assert resumed.policy.version == "1"
    continued = resumed.train(groups).policy
    assert continued.version == straight.version == "2"
    for p, q in zip(straight.parameters(), continued.parameters(), strict=True):
        assert torch.equal(p, q)


def test_save_version_registers_the_trained_version(tmp_path):
    from policies.weights import load_policy
    from storage.store import TrajectoryStore

    store = TrajectoryStore(f"sqlite:///{tmp_path / 't.db'}")
    trainer = GRPOTrainer(LearnedModePolicy(), _config())
    result = trainer.train([_group("a red circle", "g")])
    path = save_version(trainer, store, tmp_path / "router-1", result.metrics)
    (info,) = store.policy_versions(name="router")
    assert (info.version, info.path) == ("1", str(path))
    assert info.metadata["groups_used"] == 1
    assert info.metadata["optimizer_steps"] == trainer.steps == result.metrics["updates"]
    saved = load_policy(path)
    assert saved.version == "1"
    for p, q in zip(result.policy.parameters(), saved.parameters(), strict=True):
        assert torch.equal(p, q)


def test_one_stop_policy_iteration_from_recorded_rollouts(tmp_path):
    import asyncio

    from agent_graph.runner import make_group_tasks
    from nodes.state import Budget
    from storage.store import TrajectoryStore
    from training.decisions.loop import grpo_iterations

    store = TrajectoryStore(f"sqlite:///{tmp_path / 't.db'}")
    prompts = ["three blue squares", "two red circles above a green star", "five triangles"]
    tasks = make_group_tasks(prompts, 6, seed=2)
    stop = LearnedStopPolicy()
    policy, (it,) = asyncio.run(
        grpo_iterations(
            store,
            GRPOTrainer(stop, _config()),
            [tasks],
            kind="stop",
            budget=Budget(max_rounds=2),
        )
    )
    assert it.behaviour == "stop@0" and it.trained == "stop@1" == f"{policy.name}@{policy.version}"
    assert it.metrics["decisions"] > 0
    assert it.metrics["groups"] == 3


def test_shaped_rewards_with_the_order_preserving_penalty():
    members = (
        DecisionMember("a", 0, "succeeded", "decompose", 2, {"checker": 1.0}),
        DecisionMember("b", 1, "succeeded", "reflect", 1, {"checker": 1.0}),
        DecisionMember("c", 2, "succeeded", "direct", 1, {"checker": 0.67}),
    )
    group = DecisionGroup("run", "g", "p", None, "mode", members)
    # the Self-Adaptive Interleaved Reasoner's (SAIR) form: the right 2-image answer drops to
    # 0.5, below the wrong one (0.67)
    assert shaped_rewards(group, GRPOConfig(complexity_eps=0.05)) == pytest.approx([0.5, 1.0, 0.67])
    # margin: 0.67 + (1 − 0.67) / 2 = 0.835
    margin = GRPOConfig(complexity_eps=0.05, complexity_form="margin")
    assert shaped_rewards(group, margin) == pytest.approx([0.835, 1.0, 0.67])
