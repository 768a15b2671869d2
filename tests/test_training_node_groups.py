"""Text-policy groups from whole graph runs, trained on exactly the prompt the server saw.

Real parts: ``atelier serve lm`` for the tiny text LM as the planner (temperature 1, top-p 1,
log-probs), the reasoner graph with the SQL recorder, G = 4 samples of 2 prompts; a scripted
reflector and a painter whose image depends on the draw seed, so that reflect inputs differ
within a group. The groups come from the stored requests; the trainer takes the stored prompt
ids (ratio 1 before the first update) and stops, naming the position, when a stored log-prob or
prompt id is not what the server saw."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.base import EditRequest, ImageRequest, SamplingParams
from nodes.backends.wire import messages_payload
from nodes.context import Backends, GraphSettings, ReasonerContext
from nodes.prompts import plan_messages
from nodes.state import Budget
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
from tests.scripted import ScriptedChat
from training.grpo import ragged_group_advantages
from training.text.groups import TextGroup, read_node_groups
from training.text.trainer import LORA_TARGETS, LoRAConfig, LoRATrainer
from training.versions import save_version

if TYPE_CHECKING:
    from nodes.backends.engines.tiny_models import TinyModels
    from storage.store import TrajectoryStore

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers
pytestmark = pytest.mark.models

PROMPTS = ["two red circles", "a blue square"]
G = 4
TOKENS = 6
REWARD = "quality"


class SeedPainter:
    """One of two images, chosen by the request's seed: reflect inputs split within a group."""

    model_id = "seed-painter"

    def _image(self, seed: int) -> Image.Image:
        return Image.new("RGB", (8, 8), (255, 0, 0) if seed % 2 else (0, 0, 255))

    async def generate(self, request: ImageRequest) -> Image.Image:
        return self._image(request.seed)

    async def edit(self, request: EditRequest) -> Image.Image:
        return self._image(request.seed)


@pytest.fixture(scope="module")
def recorded(text_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A recorded graph run: (store, run id); trajectory reward = the sample index."""
    from nodes.backends.clients.openai_client import OpenAIChatClient
    from storage.recorder import SQLRecorder
    from storage.store import TrajectoryStore

    server, _ = text_lm
    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('nodes')}/runs.db")
    run = store.create_run("node-groups", {"mode": "reflect"})

    async def rollout() -> None:
        planner = OpenAIChatClient(server.url, model="tiny-lm")
        painter = SeedPainter()
        reflector = ScriptedChat(["<think>It lacks red.</think>Make it red."])
        try:
            async with SQLRecorder(store, run.id) as recorder:
                context = ReasonerContext(
                    backends=Backends(planner, reflector, planner, painter, painter),
                    mode_policy=FixedModePolicy("reflect"),
                    stop_policy=FollowReflectionStopPolicy(),
                    images=store,
                    settings=GraphSettings(
                        width=8,
                        height=8,
                        score_images=False,
                        sampling=SamplingParams(max_tokens=TOKENS, temperature=1.0, top_p=1.0),
                    ),
                    recorder=recorder,
                )
                tasks = make_group_tasks(PROMPTS, group_size=G, seed=5)
                results = await Runner(context, budget=Budget(max_rounds=1)).run(tasks)
            assert all(r.status == "succeeded" for r in results), [r.error for r in results]
        finally:
            await planner.aclose()

    asyncio.run(rollout())
    for summary in store.trajectories(run=run.id):
        store.add_reward(summary.id, REWARD, float(summary.sample_index), source="test")
    yield store, run.id
    store.close()


def plan_step(store: TrajectoryStore, trajectory_id: str) -> Any:
    return next(s for s in store.trajectory(trajectory_id).steps if s.node == "plan")


def test_plan_groups_are_the_first_plan_completion_of_each_sample(recorded):
    store, run_id = recorded
    groups = read_node_groups(store, run_id, node="plan", reward=REWARD)
    stored = store.groups(run=run_id)
    assert sorted(g.group_id for g in groups) == sorted(stored)
    for group in groups:
        assert [m.trajectory_id for m in group.members] == [t.id for t in stored[group.group_id]]
        assert list(group.messages) == messages_payload(plan_messages(group.prompt))
        for member in group.members:
            [generation] = plan_step(store, member.trajectory_id).generations
            assert member.token_ids == generation.token_ids  # stored, never re-tokenised
            assert member.logprobs == generation.logprobs
            assert 0 < len(member.token_ids) == len(member.logprobs) <= TOKENS
            assert member.prompt_token_ids == generation.prompt_token_ids is not None
            assert member.sampling["temperature"] == 1.0 and member.sampling["top_p"] == 1.0
            assert member.messages == group.messages
        assert sorted(m.reward for m in group.members) == [0.0, 1.0, 2.0, 3.0]


def test_a_step_reward_wins_over_the_trajectory_reward(recorded):
    store, run_id = recorded
    (first, *_), *_ = store.groups(run=run_id).values()
    for summary in store.trajectories(run=run_id):
        store.add_reward(summary.id, "graded", 0.25)
    store.add_reward(first.id, "graded", 0.5, step=plan_step(store, first.id).seq)
    store.add_reward(first.id, "graded", 0.75, step=plan_step(store, first.id).seq)  # latest
    rewards = {
        m.trajectory_id: m.reward
        for g in read_node_groups(store, run_id, node="plan", reward="graded")
        for m in g.members
    }
    assert rewards.pop(first.id) == 0.75
    assert set(rewards.values()) == {0.25} and len(rewards) == len(PROMPTS) * G - 1
    with pytest.raises(KeyError, match="no reward 'missing'"):
        read_node_groups(store, run_id, node="plan", reward="missing")


def test_reflect_members_are_split_by_their_stored_input(recorded):
    store, run_id = recorded
    everything = read_node_groups(store, run_id, node="reflect", reward=REWARD, min_size=1)
    assert sum(len(g.members) for g in everything) == len(PROMPTS) * G
    inputs: dict[str, set[str]] = {}
    for group in everything:
        keys = {json.dumps(m.messages, sort_keys=True) for m in group.members}
        assert len(keys) == 1  # one input per group
        inputs.setdefault(group.group_id.split("#")[0], set()).update(keys)
        assert all(m.prompt_token_ids is None for m in group.members)  # a scripted reflector
    # Two images, two inputs per stored group (the seeds make both colours appear in each).
    assert sorted(len(keys) for keys in inputs.values()) == [2, 2]
    # A lone completion has no advantage: min_size drops it.
    kept = read_node_groups(store, run_id, node="reflect", reward=REWARD, min_size=2)
    assert [g.group_id for g in kept] == [g.group_id for g in everything if len(g.members) >= 2]
    # decompose never ran in reflect mode: no groups.
    assert read_node_groups(store, run_id, node="decompose", reward=REWARD) == []


def test_a_generation_without_a_stored_request_or_logprobs_is_refused(recorded, tmp_path):
    from sqlalchemy import update

    from storage.codec import pack_logprobs
    from storage.schema import GenerationRow

    store, run_id = recorded
    (first, second, *_), *_ = store.groups(run=run_id).values()
    step = plan_step(store, first.id)
    where = (GenerationRow.trajectory_id == first.id) & (GenerationRow.step_seq == step.seq)
    messages = step.generations[0].messages
    with store.db.writer.begin() as conn:
        conn.execute(update(GenerationRow).where(where).values(messages=None))
    try:
        with pytest.raises(ValueError, match=f"{first.id} .*schema version 4"):
            read_node_groups(store, run_id, node="plan", reward=REWARD)
    finally:
        with store.db.writer.begin() as conn:
            conn.execute(update(GenerationRow).where(where).values(messages=messages))
    step = plan_step(store, second.id)
    where = (GenerationRow.trajectory_id == second.id) & (GenerationRow.step_seq == step.seq)
    logprobs = step.generations[0].logprobs
    with store.db.writer.begin() as conn:
        conn.execute(update(GenerationRow).where(where).values(logprobs=pack_logprobs(())))
    try:
        with pytest.raises(ValueError, match=f"{second.id}: no sampling log-probs"):
            read_node_groups(store, run_id, node="plan", reward=REWARD)
    finally:
        with store.db.writer.begin() as conn:
            conn.execute(
                update(GenerationRow).where(where).values(logprobs=pack_logprobs(logprobs))
            )
    assert len(read_node_groups(store, run_id, node="plan", reward=REWARD)) == len(PROMPTS)


def corrupt(group: TextGroup, index: int, **changes: Any) -> list[TextGroup]:
    members = list(group.members)
    members[index] = dataclasses.replace(members[index], **changes)
    return [dataclasses.replace(group, members=tuple(members))]


# The server's peft notes that the adapter has a LoRA on the tied ``lm_head`` (intended).
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
async def test_lora_trains_on_the_stored_prompt_ids_and_stops_on_a_mismatch(
    recorded, text_lm, tiny_models: TinyModels, tmp_path: Path
):
    import torch

    from nodes.backends.clients.openai_client import OpenAIChatClient

    store, run_id = recorded
    groups = read_node_groups(store, run_id, node="plan", reward=REWARD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    try:
        trainer = LoRATrainer(tiny_models.lm, LoRAConfig(epochs=2, minibatch_size=8))

        def no_encoding(messages: Any) -> list[int]:
            raise AssertionError("the stored prompt ids are used, not re-encoded")

        trainer.prompt_ids = no_encoding  # type: ignore[method-assign]

        # A stored log-prob off by 0.5 at completion position 2: stopped, before any update.
        member = groups[0].members[1]
        bad = (*member.logprobs[:2], member.logprobs[2] + 0.5, *member.logprobs[3:])
        with pytest.raises(ValueError, match=f"{member.trajectory_id} .*completion token 2 "):
            trainer.train(corrupt(groups[0], 1, logprobs=bad))
        # A prompt id that is not the server's: the first completion token already differs.
        ids = member.prompt_token_ids
        wrong = (*ids[:-2], (ids[-2] + 1) % len(trainer.engine.tokenizer), ids[-1])
        with pytest.raises(ValueError, match=f"{member.trajectory_id} .*completion token 0 "):
            trainer.train(corrupt(groups[0], 1, prompt_token_ids=wrong))
        # Tempered sampling: the stored raw log-probs are not the sampling policy's.
        tempered = {**member.sampling, "temperature": 0.7}
        with pytest.raises(ValueError, match=r"temperature=0\.7.*require_raw_sampling"):
            trainer.train(corrupt(groups[0], 1, sampling=tempered))
        assert trainer.steps == 0

        result = trainer.train(groups)
        metrics = result.metrics
        assert metrics["first_max_abs_log_ratio"] < 1e-4  # ratio 1 before the first update
        assert metrics["groups_used"] == len(PROMPTS)
        assert metrics["steps"] == len(result.history) == 2  # 8 completions, 2 epochs
        assert result.history[-1]["max_abs_log_ratio"] > 1e-4  # the adapter moved
        # Each member's group, the reward it was trained with and the advantage it received.
        advantages, _ = ragged_group_advantages([[m.reward for m in g.members] for g in groups])
        assert result.member_rewards == {
            m.trajectory_id: (g.group_id, {"reward": m.reward, "advantage": a})
            for g, adv in zip(groups, advantages, strict=True)
            for m, a in zip(g.members, adv.tolist(), strict=True)
        }
        assert {v["advantage"] > 0 for _, v in result.member_rewards.values()} == {True, False}
        adapter = save_version(trainer, store, tmp_path / "plan-1", metrics)
        assert (adapter / "adapter_model.safetensors").exists()
        from safetensors import safe_open

        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
            names = list(weights.keys())
        # The default targets are the decoder's linear layers, which vLLM loads; never lm_head.
        assert names and not any("lm_head" in name for name in names)
        assert {name.split(".")[-3] for name in names} <= set(LORA_TARGETS)
        assert store.policy_versions(name="planner")[0].version == "1"
    finally:
        torch.set_num_threads(threads)

    client = OpenAIChatClient(text_lm[0].url, model="tiny-lm")
    try:
        await client.load_adapter("plan-1", str(adapter))
        assert await client.models() == ["tiny-lm", "plan-1"]
        await client.unload_adapter("plan-1")
    finally:
        await client.aclose()


def test_kl_to_the_adapter_disabled_base_is_zero_before_the_first_update_then_positive(
    recorded, tiny_models: TinyModels
):
    """β > 0: the k3 KL to the base model (adapter disabled) is 0 while the adapter is still
    its zero-initialised self, > 0 once it has moved, and enters the loss as β·KL."""
    import torch

    from training.grpo import grpo_loss

    store, run_id = recorded
    groups = read_node_groups(store, run_id, node="plan", reward=REWARD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = LoRAConfig(epochs=3, minibatch_size=8, beta=0.04)
        trainer = LoRATrainer(tiny_models.lm, config)
        result = trainer.train(groups)
        kls = [step["kl"] for step in result.history]
        assert kls[0] == pytest.approx(0.0, abs=1e-9)  # LoRA's B starts at 0: the base itself
        assert kls[-1] > 1e-7
        # The trainer's loss on a batch equals grpo_loss on the same tensors, β·KL included.
        rows = [(list(m.prompt_token_ids), m.token_ids, m.logprobs, 0.5) for m in groups[0].members]
        with torch.no_grad():
            logp, mask = trainer.logprobs([(p, c) for p, c, _, _ in rows])
            old = torch.zeros_like(logp)
            for i, (_, _, stored, _) in enumerate(rows):
                old[i, : len(stored)] = torch.tensor(stored, dtype=old.dtype)
            ref = trainer.reference_logprobs(rows)
            with_kl, metrics = grpo_loss(
                logp, old, torch.full((len(rows),), 0.5), mask, eps_low=0.2, eps_high=0.28,
                beta=0.04, ref_logprobs=ref,
            )  # fmt: skip
            without, _ = grpo_loss(
                logp, old, torch.full((len(rows),), 0.5), mask, eps_low=0.2, eps_high=0.28
            )
        assert metrics["kl"] > 0
        assert float(with_kl - without) == pytest.approx(0.04 * metrics["kl"], rel=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_the_kl_reference_can_be_the_version_training_starts_from(recorded, tiny_models):
    """After SFT the adapter-disabled base is a policy GRPO should not be pulled towards:
    ``set_reference`` freezes the adapter as it is now. Its log-probs are the reference's
    (the base's differ), computing them leaves the weights as they were, and the KL starts at
    0 against it and grows as training moves away."""
    import torch

    store, run_id = recorded
    groups = read_node_groups(store, run_id, node="plan", reward=REWARD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = LoRATrainer(tiny_models.lm, LoRAConfig(epochs=3, minibatch_size=8, beta=0.04))
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # stands in for SFT: the adapter is no longer the base
            for param in trainer.parameters:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        trainer.set_reference()
        before = [p.detach().clone() for p in trainer.parameters]
        rows = [(list(m.prompt_token_ids), m.token_ids) for m in groups[0].members]
        with torch.no_grad():
            mine, mask = trainer.logprobs(rows)
        ref = trainer.reference_logprobs([(*row, (), 0.0) for row in rows])
        assert torch.equal(ref * mask, mine * mask)
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.parameters, strict=True))
        with torch.no_grad(), trainer.model.disable_adapter():
            base, _ = trainer.logprobs(rows)
        assert ((base - mine) * mask).abs().max() > 1e-3
        # The perturbed adapter did not sample the stored completions: train off-policy.
        trainer.config.max_logprob_drift = 10.0
        result = trainer.train(groups)
        kls = [step["kl"] for step in result.history]
        assert kls[0] == pytest.approx(0.0, abs=1e-9) and kls[-1] > 1e-7
        assert trainer.describe()["kl_reference"] == "adapter@0"
    finally:
        torch.set_num_threads(threads)


def test_kl_reference_initial_is_the_adapter_given_with_init(recorded, tiny_models, tmp_path):
    """``kl_reference="initial"`` (``atelier train --kl-reference initial``): a trainer that
    starts from a saved adapter takes that adapter as its KL reference, not the base model;
    "base" (the default) keeps the adapter-disabled base."""
    import torch

    store, run_id = recorded
    groups = read_node_groups(store, run_id, node="plan", reward=REWARD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = LoRATrainer(tiny_models.lm, LoRAConfig(), version="3")
        generator = torch.Generator().manual_seed(6)
        with torch.no_grad():  # stands in for SFT
            for param in first.parameters:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        saved = first.save(tmp_path / "plan-3")
        rows = [(list(m.prompt_token_ids), m.token_ids) for m in groups[0].members]
        with torch.no_grad():
            adapted, mask = first.logprobs(rows)
        for reference, expected in (("initial", "adapter@3"), ("base", "base")):
            trainer = LoRATrainer(
                tiny_models.lm, LoRAConfig(beta=0.04, kl_reference=reference), version="3",
                adapter=saved,
            )  # fmt: skip
            ref = trainer.reference_logprobs([(*row, (), 0.0) for row in rows])
            assert trainer.describe()["kl_reference"] == expected
            gap = float(((ref - adapted) * mask).abs().max())
            assert gap < 1e-6 if reference == "initial" else gap > 1e-3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("loss_type", ["token_mean", "sequence_mean", "dr_grpo"])
def test_micro_batches_accumulate_the_same_update_as_one_pass(
    recorded, tiny_models: TinyModels, loss_type: str
):
    """A token budget that splits every minibatch into several forward passes gives the same
    gradient (hence the same step) as one pass over the minibatch, for each loss type."""
    import torch

    store, run_id = recorded
    groups = read_node_groups(store, run_id, node="plan", reward=REWARD)
    rows = [
        (list(m.prompt_token_ids), m.token_ids, m.logprobs, adv)
        for g in groups
        for m, adv in zip(g.members, (0.9, -0.4, 0.3, -0.8), strict=False)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads, losses, passes = [], [], []
        for budget in (None, 2 * max(len(p) + len(c) for p, c, _, _ in rows)):
            config = LoRAConfig(loss_type=loss_type, max_tokens_per_forward=budget, lr=0.0)
            trainer = LoRATrainer(tiny_models.lm, config)
            passes.append(len(trainer.microbatches(rows)))
            with torch.no_grad():  # a LoRA that has moved: B = 0 would hide B's gradient
                for p in trainer.parameters:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
            metrics = trainer._step(rows)
            losses.append(metrics["loss"])
            grads.append(torch.cat([p.grad.flatten() for p in trainer.parameters]))
        assert passes[0] == 1 and passes[1] == (len(rows) + 1) // 2
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    finally:
        torch.set_num_threads(threads)
