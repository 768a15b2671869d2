"""GRPO LoRA on a vision-language policy from a recorded graph run (issue 14, item 3).

Real parts: ``atelier serve lm`` for the tiny LLaVA VLM (float32, and a second one in bfloat16)
as the reflector (temperature 1, top-p 1, log-probs and prompt ids), the reasoner graph with the
SQL recorder, G = 4 samples of 2 prompts; a scripted planner and a painter that draws one image
per prompt, so each group's reflect steps saw one input. The trainer reads the images back from
the store's image store, recomputes the log-probs through the model's processor as the server
does (ratio 1 before the first update), and its adapter, loaded by the server, moves the served
log-probs of the rewarded completions the way it was trained. A tiny Qwen2-VL (multimodal rotary
positions, its processor built without torchvision) goes through the same path."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image, ImageDraw

from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.base import (
    ChatMessage,
    ChatRequest,
    EditRequest,
    ImageRequest,
    SamplingParams,
    TextCompletion,
)
from nodes.backends.wire import IMAGE_REF_PART
from nodes.context import Backends, GraphSettings, ReasonerContext
from nodes.state import Budget
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
from tests.scripted import ScriptedChat
from training.grpo import grpo_loss, ragged_group_advantages
from training.text.groups import TextGroup, read_node_groups
from training.text.trainer import DEFAULT_DRIFT, LoRAConfig, LoRATrainer, Row

if TYPE_CHECKING:
    from nodes.backends.engines.tiny_models import TinyModels

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models
pytestmark = pytest.mark.models

PROMPTS = ["two red circles", "a blue square"]
G = 4
TOKENS = 6
REWARD = "quality"
IMAGE_TOKENS = 16  # the tiny LLaVA: a 32x32 image in 8x8 patches


class EchoPlanner(ScriptedChat):
    """Plans by repeating the request (the painter then draws the prompt's colour)."""

    async def chat(self, request: ChatRequest) -> TextCompletion:
        self.outputs = [request.messages[-1].text]
        return await super().chat(request)


class PromptPainter:
    """One image per prompt (whatever the seed): each group's reflect steps see one input."""

    model_id = "prompt-painter"

    def _image(self, prompt: str) -> Image.Image:
        image = Image.new("RGB", (16, 16), (250, 250, 250))
        colour = (220, 30, 30) if "red" in prompt else (30, 30, 220)
        ImageDraw.Draw(image).ellipse((3, 3, 12, 12), fill=colour)
        return image

    async def generate(self, request: ImageRequest) -> Image.Image:
        return self._image(request.prompt)

    async def edit(self, request: EditRequest) -> Image.Image:
        return self._image(request.instruction)


def vlm_server(model_dir: Path, dtype: str) -> Any:
    from nodes.backends.engines.lm_inprocess import LMService
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.lm_server import create_lm_app

    service = LMService.from_pretrained(
        model_dir, name="tiny-vlm", dtype=dtype, max_wait_ms=20, torch_threads=1
    )
    return BackgroundServer(create_lm_app(service)).start(), service


def record(store: Any, server: Any, name: str) -> str:
    """A graph run with the served VLM as the reflector; trajectory reward = sample index."""
    from nodes.backends.clients.openai_client import OpenAIChatClient
    from storage.recorder import SQLRecorder

    run = store.create_run(name, {"mode": "reflect"})

    async def rollout() -> None:
        reflector = OpenAIChatClient(server.url, model="tiny-vlm")
        planner = EchoPlanner([""])
        painter = PromptPainter()
        try:
            async with SQLRecorder(store, run.id) as recorder:
                context = ReasonerContext(
                    backends=Backends(planner, reflector, planner, painter, painter),
                    mode_policy=FixedModePolicy("reflect"),
                    stop_policy=FollowReflectionStopPolicy(),
                    images=store,
                    settings=GraphSettings(
                        width=16,
                        height=16,
                        score_images=False,
                        sampling=SamplingParams(max_tokens=TOKENS, temperature=1.0, top_p=1.0),
                    ),
                    recorder=recorder,
                )
                tasks = make_group_tasks(PROMPTS, group_size=G, seed=7)
                results = await Runner(context, budget=Budget(max_rounds=1)).run(tasks)
            assert all(r.status == "succeeded" for r in results), [r.error for r in results]
        finally:
            await reflector.aclose()

    asyncio.run(rollout())
    for summary in store.trajectories(run=run.id):
        store.add_reward(summary.id, REWARD, float(summary.sample_index), source="test")
    return run.id


@pytest.fixture(scope="module")
def threads() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (see tests.tiny_models)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def served(tiny_models: TinyModels, threads: Any) -> Any:
    """The tiny VLM served in float32 and in bfloat16 (this module loads adapters into them)."""
    servers = {dtype: vlm_server(tiny_models.vlm, dtype) for dtype in ("float32", "bfloat16")}
    yield servers
    for server, service in servers.values():
        server.stop()
        service.close()


@pytest.fixture(scope="module")
def recorded(served: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(store, {dtype: run id}): one recorded graph run per served dtype."""
    from storage.store import TrajectoryStore

    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('vlm')}/runs.db")
    runs = {dtype: record(store, server, f"vlm-{dtype}") for dtype, (server, _) in served.items()}
    yield store, runs
    store.close()


@pytest.fixture(scope="module")
def groups(recorded: Any) -> list[TextGroup]:
    store, runs = recorded
    return read_node_groups(store, runs["float32"], node="reflect", reward=REWARD)


@pytest.fixture(scope="module")
def trainer(tiny_models: TinyModels, threads: Any) -> LoRATrainer:
    """A float32 trainer that has not stepped (tests that step make their own)."""
    return LoRATrainer(tiny_models.vlm, LoRAConfig(epochs=1, beta=0.04), name="reflector")


def with_member(group: TextGroup, index: int, **changes: Any) -> list[TextGroup]:
    members = list(group.members)
    members[index] = dataclasses.replace(members[index], **changes)
    return [dataclasses.replace(group, members=tuple(members))]


def perturb(trainer: LoRATrainer, scale: float = 0.05) -> None:
    """Move the LoRA off B = 0 (which would hide A's gradient and make the adapter a no-op)."""
    import torch

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in trainer.parameters:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def rows_of(trainer: LoRATrainer, groups: list[TextGroup]) -> list[Row]:
    advantages = (0.9, -0.4, 0.3, -0.8)
    rows = []
    for group in groups:
        for member, advantage in zip(group.members, advantages, strict=False):
            prompt, extras = trainer.member_inputs(group, member)
            rows.append(Row(prompt, member.token_ids, member.logprobs, advantage, extras))
    return rows


def test_reflect_groups_carry_the_stored_images_and_the_servers_prompt_ids(
    recorded, groups, trainer
):
    import numpy as np

    store, runs = recorded
    assert sorted(g.group_id for g in groups) == sorted(store.groups(run=runs["float32"]))
    painter = PromptPainter()
    image_token = trainer.engine.processor.image_token_id
    for group in groups:
        assert len(group.members) == G
        assert sorted(m.reward for m in group.members) == [0.0, 1.0, 2.0, 3.0]
        for member in group.members:
            (ref,) = member.image_refs
            _, user = member.messages
            assert user["content"][0] == {"type": IMAGE_REF_PART, "ref": ref}
            step = next(
                s for s in store.trajectory(member.trajectory_id).steps if s.seq == member.step_seq
            )
            assert step.node == "reflect" and [i.ref for i in step.images_in] == [ref]
            # The exact stored bytes, decoded: the painter's pixels, losslessly.
            image = member.load_images()[ref]
            expected = painter._image(group.prompt)
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
            # The server's prompt ids: the image placeholder expanded to the image's tokens.
            assert member.prompt_token_ids.count(image_token) == IMAGE_TOKENS
            assert 0 < len(member.token_ids) == len(member.logprobs) <= TOKENS
            # The trainer's prompt is the server's, ids and pixels (what encode makes).
            prompt, extras = trainer.member_inputs(group, member)
            assert prompt == list(member.prompt_token_ids)
            assert tuple(extras["pixel_values"].shape) == (1, 3, 32, 32)


def test_a_missing_image_is_named_when_the_groups_are_read(recorded, groups):
    from sqlalchemy import update

    from storage.schema import GenerationRow

    store, runs = recorded
    member = groups[0].members[0]
    messages = [dict(m) for m in member.messages]
    fake = "0" * 64
    messages[1] = {**messages[1], "content": [{"type": IMAGE_REF_PART, "ref": fake}]}
    where = (GenerationRow.trajectory_id == member.trajectory_id) & (
        GenerationRow.step_seq == member.step_seq
    )
    with store.db.writer.begin() as conn:
        conn.execute(update(GenerationRow).where(where).values(messages=messages))
    try:
        with pytest.raises(ValueError, match=f"{member.trajectory_id} step .*image {fake}"):
            read_node_groups(store, runs["float32"], node="reflect", reward=REWARD)
    finally:
        with store.db.writer.begin() as conn:
            conn.execute(update(GenerationRow).where(where).values(messages=list(member.messages)))
    assert len(read_node_groups(store, runs["float32"], node="reflect", reward=REWARD)) == 2


def test_the_stored_ids_with_the_images_give_the_servers_inputs(groups, trainer):
    """``encode_ids`` (stored prompt ids + the images through the processor's image path) is
    what ``encode`` (the server's rendering) gives; a stored prompt with another rendering keeps
    its ids, and one whose image tokens do not fit its images is refused by name."""
    import torch

    group = groups[0]
    member = group.members[0]
    prompt, extras = trainer.member_inputs(group, member)
    images = member.load_images()
    again = trainer.engine.encode_ids(prompt, [images[r] for r in member.image_refs])
    assert again.input_ids == prompt and again.extras.keys() == extras.keys()
    assert all(torch.equal(again.extras[k], extras[k]) for k in extras)
    # Another rendering (a text token changed): its ids are what the trainer uses.
    ids = list(member.prompt_token_ids)
    ids[1] = (ids[1] + 1) % len(trainer.engine.tokenizer)
    other = dataclasses.replace(member, prompt_token_ids=tuple(ids))
    assert trainer.member_inputs(group, other)[0] == ids
    # One image token fewer than the image makes: refused, naming the trajectory.
    image_token = trainer.engine.processor.image_token_id
    fewer = list(member.prompt_token_ids)
    fewer.remove(image_token)
    short = dataclasses.replace(member, prompt_token_ids=tuple(fewer))
    with pytest.raises(ValueError, match=f"{member.trajectory_id} .*15 image placeholder"):
        trainer.member_inputs(group, short)
    # A member built by hand, with no store to read its images from: named, not guessed.
    orphan = dataclasses.replace(member, image_store=None)
    with pytest.raises(ValueError, match=f"{member.trajectory_id} .*no image store"):
        trainer.member_inputs(group, orphan)


def test_ratio_is_one_before_the_first_update_and_a_wrong_image_is_caught(groups, trainer):
    rows = rows_of(trainer, groups)
    owners = [m for g in groups for m in g.members]
    worst = trainer.check_alignment(rows, owners)
    print(f"float32 max |recomputed - stored| = {worst:.2e}")
    assert worst < 1e-4
    # The other prompt's image (same text, same ids): the log-probs move past the bound, and
    # the error names the trajectory and the first differing completion token.
    other = groups[1].members[0]
    member = groups[0].members[2]
    swapped = dataclasses.replace(member, image_store=SwappedImages(member, other))
    prompt, extras = trainer.member_inputs(groups[0], swapped)
    assert prompt == list(member.prompt_token_ids)
    row = Row(prompt, member.token_ids, member.logprobs, 1.0, extras)
    with pytest.raises(ValueError, match=f"{member.trajectory_id} \\(step .*completion token 0 "):
        trainer.check_alignment([row], [member])


class SwappedImages:
    """An image store that answers ``member``'s image ref with ``other``'s image bytes."""

    def __init__(self, member: Any, other: Any) -> None:
        self.store, self.ref = member.image_store, member.image_refs[0]
        self.other = other.image_store.get_bytes(other.image_refs[0])

    def get_bytes(self, ref: str) -> bytes:
        return self.other if ref == self.ref else self.store.get_bytes(ref)


def test_training_starts_on_policy_with_kl_zero_then_moves_and_records_each_members_reward(
    groups, tiny_models
):
    trainer = LoRATrainer(tiny_models.vlm, LoRAConfig(epochs=3, minibatch_size=8, beta=0.04))
    result = trainer.train(groups)
    metrics = result.metrics
    assert metrics["first_max_abs_log_ratio"] < 1e-4  # ratio 1 before the first update
    assert metrics["first_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["groups_used"] == 2 and metrics["members_skipped"] == 0
    assert metrics["steps"] == len(result.history) == 3
    kls = [step["kl"] for step in result.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-9)  # LoRA's B starts at 0: the base itself
    assert kls[-1] > 1e-7
    assert result.history[-1]["max_abs_log_ratio"] > 1e-4  # the adapter moved
    # Every member: its group, the reward used and the advantage it received.
    advantages, _ = ragged_group_advantages([[m.reward for m in g.members] for g in groups])
    expected = {
        m.trajectory_id: (g.group_id, {"reward": m.reward, "advantage": a})
        for g, adv in zip(groups, advantages, strict=True)
        for m, a in zip(g.members, adv.tolist(), strict=True)
    }
    assert result.member_rewards == expected
    assert result.version == "1"


def test_loss_and_gradient_are_grpo_loss_on_the_same_tensors(groups, tiny_models):
    """One step's loss and LoRA gradient equal ``grpo_loss`` (β·KL included) on the trainer's
    own log-probs of the same rows, computed and differentiated here."""
    import torch

    config = LoRAConfig(lr=0.0, beta=0.04, max_grad_norm=1e9, loss_type="sequence_mean")
    trainer = LoRATrainer(tiny_models.vlm, config)
    perturb(trainer)
    rows = rows_of(trainer, groups)
    metrics = trainer._step(rows)
    grads = [p.grad.clone() for p in trainer.parameters]

    trainer.optimizer.zero_grad(set_to_none=True)
    logp, mask = trainer.logprobs([(r.prompt, r.completion, r.extras) for r in rows])
    old = torch.zeros_like(logp)
    for i, row in enumerate(rows):
        old[i, : len(row.old)] = torch.tensor(row.old)
    ref = trainer.reference_logprobs(rows)
    loss, expected = grpo_loss(
        logp, old, torch.tensor([r.advantage for r in rows]), mask, eps_low=0.2, eps_high=0.28,
        beta=0.04, ref_logprobs=ref, loss_type="sequence_mean",
    )  # fmt: skip
    loss.backward()
    assert expected["kl"] > 0 and metrics["kl"] == pytest.approx(expected["kl"], rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for got, want in zip(grads, (p.grad for p in trainer.parameters), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(groups, tiny_models):
    import torch

    rows = rows_of(LoRATrainer(tiny_models.vlm), groups)
    losses, grads, recomputed = [], [], []
    for checkpointing in (False, True):
        config = LoRAConfig(lr=0.0, beta=0.04, gradient_checkpointing=checkpointing)
        trainer = LoRATrainer(tiny_models.vlm, config)
        perturb(trainer)
        calls: list[int] = []  # forward calls of one attention block
        decoder = trainer.engine.model.get_decoder()
        decoder.layers[0].self_attn.register_forward_hook(lambda *_, c=calls: c.append(1))
        metrics = trainer._step(rows)
        losses.append(metrics["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in trainer.parameters]))
        recomputed.append(len(calls))
    # beta > 0: one pass with the adapter, one reference pass without (no gradient), and with
    # checkpointing the backward pass runs the adapter's pass again.
    assert recomputed == [2, 3]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_bfloat16_trains_against_a_bfloat16_server(recorded, tiny_models):
    import torch

    store, runs = recorded
    groups = read_node_groups(store, runs["bfloat16"], node="reflect", reward=REWARD)
    trainer = LoRATrainer(tiny_models.vlm, LoRAConfig(dtype="bfloat16", epochs=2, beta=0.04))
    assert trainer.config.drift_bound == DEFAULT_DRIFT["bfloat16"]
    assert trainer.engine.model.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.parameters} == {torch.float32}  # LoRA (and AdamW) in fp32
    rows = rows_of(trainer, groups)
    owners = [m for g in groups for m in g.members]
    worst = trainer.check_alignment(rows, owners)
    print(f"bfloat16 max |recomputed - stored| = {worst:.2e}")
    assert worst < DEFAULT_DRIFT["bfloat16"]
    # The bound still stops a stored log-prob that is not the server's (off by 0.5 at token 1).
    member = groups[0].members[3]
    bad = (member.logprobs[0], member.logprobs[1] - 0.5, *member.logprobs[2:])
    with pytest.raises(ValueError, match=f"{member.trajectory_id} .*completion token 1 "):
        trainer.train(with_member(groups[0], 3, logprobs=bad))
    assert trainer.steps == 0
    result = trainer.train(groups)
    assert result.metrics["first_max_abs_log_ratio"] < DEFAULT_DRIFT["bfloat16"]
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert result.history[-1]["max_abs_log_ratio"] > 1e-3  # the adapter moved
    # A float32 trainer does not see what the bf16 server saw: its bound stops it.
    with pytest.raises(ValueError, match=r"max_logprob_drift 0\.0001"):
        LoRATrainer(tiny_models.vlm, LoRAConfig(epochs=1)).train(groups)


async def served_scores(client: Any, pairs: list) -> list[Any]:
    """Each completion's text scored by the server (``score_text``) after its stored request,
    the stored image attached as the reflect node sent it."""
    scores = []
    for _, member in pairs:
        system, user = member.messages
        image = member.load_images()[member.image_refs[0]]
        text = next(p["text"] for p in user["content"] if p["type"] == "text")
        messages = [ChatMessage("system", system["content"]), ChatMessage("user", text)]
        scores.append(await client.score_text(messages, member.text, image))
    return scores


def mean_logprob(scores: list[Any]) -> float:
    """Mean over completions of their mean per-token log-prob."""
    return sum(sum(s.logprobs) / len(s.logprobs) for s in scores) / len(scores)


async def test_the_saved_adapter_loads_in_the_server_and_moves_the_rewarded_completions(
    recorded, groups, served, tiny_models, tmp_path
):
    import torch
    from safetensors import safe_open

    from nodes.backends.clients.openai_client import OpenAIChatClient
    from training.versions import save_version

    store, _ = recorded
    config = LoRAConfig(epochs=8, minibatch_size=4)
    trainer = LoRATrainer(tiny_models.vlm, config, name="reflector")
    result = trainer.train(groups)
    adapter = save_version(trainer, store, tmp_path / "reflect-1", result.metrics)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    # Only the language model's layers: vLLM serves LoRA on a VLM's language backbone only.
    assert names and all(".language_model." in name for name in names)
    assert store.policy_versions(name="reflector")[0].version == "1"

    server, _ = served["float32"]
    client = OpenAIChatClient(server.url, model="tiny-vlm")
    try:
        best = [(g, max(g.members, key=lambda m: m.reward)) for g in groups]
        worst = [(g, min(g.members, key=lambda m: m.reward)) for g in groups]
        base_best = mean_logprob(await served_scores(client, best))
        base_worst = mean_logprob(await served_scores(client, worst))
        await client.load_adapter("reflect-1", str(adapter))
        tuned = client.with_adapter("reflect-1")
        scores = await served_scores(tuned, best)
        tuned_best = mean_logprob(scores)
        tuned_worst = mean_logprob(await served_scores(tuned, worst))
        print(
            f"best {base_best:.3f} -> {tuned_best:.3f}, worst {base_worst:.3f} -> {tuned_worst:.3f}"
        )
        # The trained direction (measured: about +0.13 and -0.22 nats per token).
        assert tuned_best - base_best > 0.05
        assert tuned_worst - base_worst < -0.05
        # The server with the adapter samples with the trainer's own log-probs: the next
        # round starts on-policy.
        group, member = best[0]
        system, user = member.messages
        image = member.load_images()[member.image_refs[0]]
        text = next(p["text"] for p in user["content"] if p["type"] == "text")
        request = ChatRequest(
            messages=(
                ChatMessage("system", system["content"]),
                ChatMessage("user", text, (image,)),
            ),
            sampling=SamplingParams(max_tokens=TOKENS, temperature=1.0, top_p=1.0, seed=11),
        )
        sampled = await tuned.chat(request)
        prompt, extras = trainer.member_inputs(group, member)
        assert list(sampled.prompt_token_ids) == prompt
        with torch.no_grad():
            mine, _ = trainer.logprobs([(prompt, sampled.token_ids, extras)])
        assert mine[0].tolist() == pytest.approx(list(sampled.logprobs), abs=1e-4)
        await client.unload_adapter("reflect-1")
    finally:
        await client.aclose()


def test_a_qwen2_vl_reflector_trains_on_policy_with_its_multimodal_positions(
    tiny_qwen2_vl, threads, tmp_path
):
    """Qwen2-VL without torchvision: the server builds its processor from the image processor
    and tokenizer, runs it with its multimodal rotary positions, and the trainer recomputes
    the same log-probs (ratio 1) — the model's own positions, not 0, 1, 2, ... (which give
    other log-probs)."""
    import torch

    from storage.store import TrajectoryStore

    server, service = vlm_server(tiny_qwen2_vl, "float32")
    store = TrajectoryStore(f"sqlite:///{tmp_path}/qwen.db")
    try:
        assert type(service.engine.processor).__name__ == "Qwen2VLProcessorImageOnly"
        run_id = record(store, server, "qwen")
        groups = read_node_groups(store, run_id, node="reflect", reward=REWARD)
        assert [len(g.members) for g in groups] == [G, G]
        trainer = LoRATrainer(tiny_qwen2_vl, LoRAConfig(epochs=2, minibatch_size=8, beta=0.04))
        rows = rows_of(trainer, groups)
        owners = [m for g in groups for m in g.members]
        assert trainer.check_alignment(rows, owners) < 1e-4
        # The positions used are the model's own: its forward with no positions given (it
        # then computes them from the image grid) gives the trainer's log-probs, and counting
        # the image tokens 0, 1, 2, ... does not.
        row = rows[0]
        ids = torch.tensor([[*row.prompt, *row.completion]])
        types = torch.cat(
            [row.extras["mm_token_type_ids"], torch.zeros((1, len(row.completion)))], 1
        )
        inputs = {**row.extras, "mm_token_type_ids": types.long(), "input_ids": ids}
        start, end = len(row.prompt) - 1, ids.shape[1] - 1
        targets = torch.tensor(row.completion)[:, None]

        def scored(**extra: Any) -> torch.Tensor:
            trainer.engine.model.model.rope_deltas = None  # no state from an earlier call
            with torch.no_grad(), trainer.model.disable_adapter():
                logits = trainer.engine.model(**inputs, **extra).logits[0, start:end]
            return torch.log_softmax(logits.float(), -1).gather(1, targets)[:, 0]

        stored = torch.tensor(row.old)
        assert (scored() - stored).abs().max() < 1e-5
        plain = torch.arange(ids.shape[1])[None]
        assert (scored(position_ids=plain) - stored).abs().max() > 1e-4
        result = trainer.train(groups)
        assert result.metrics["first_max_abs_log_ratio"] < 1e-4
        assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-9)
        assert result.history[-1]["max_abs_log_ratio"] > 1e-4
        # The adapter (language model only) loads into the Qwen2-VL server.
        adapter = trainer.save(tmp_path / "qwen-reflect")
        service.engine.load_adapter("qwen-reflect", str(adapter))
        assert service.models() == ["tiny-vlm", "qwen-reflect"]
    finally:
        server.stop()
        service.close()
        store.close()


def test_a_text_model_refuses_a_member_with_images(groups, tiny_models, threads):
    group = groups[0]
    member = group.members[0]
    with pytest.raises(ValueError, match=f"{member.trajectory_id} .*1 images, .* text model"):
        LoRATrainer(tiny_models.lm).member_inputs(group, member)


def test_sft_on_stored_reflections_sees_their_images(recorded, groups, tiny_models, threads):
    """SFT of the VLM on stored reflections: each example's prompt is the server's, pixels
    included (before any step its targets' log-probs are the stored sampling ones, and a swapped
    image changes them), and SFT raises the targets' log-probs."""
    import torch

    from training.text.sft import SFTExample, example_rows, sft_loss, train_sft

    store, _ = recorded
    members = [m for g in groups for m in g.members][:6]
    examples = [
        SFTExample(
            trajectory_id=m.trajectory_id,
            step_seq=m.step_seq,
            node="reflect",
            stage="reflect",
            role="diagnosis",
            text=m.text,
            target_ids=m.token_ids,
            messages=m.messages,
            prompt_token_ids=m.prompt_token_ids,
            position=0,
            target_source="stored",
        )
        for m in members
    ]
    trainer = LoRATrainer(tiny_models.vlm, LoRAConfig(lr=2e-2), name="reflector")
    rows = example_rows(trainer, examples, store)
    assert all("pixel_values" in extras for _, _, extras in rows)
    with torch.no_grad():
        logp, mask = trainer.logprobs(rows)
    for i, member in enumerate(members):  # exactly what the server sampled with
        stored = torch.tensor(member.logprobs, dtype=torch.float64)
        assert (logp[i, : len(stored)].double() - stored).abs().max() < 1e-4
    swapped = [(p, c, rows[(i + 1) % len(rows)][2]) for i, (p, c, _) in enumerate(rows)]
    with torch.no_grad():
        other, _ = trainer.logprobs(swapped)
    assert (other - logp).abs().max() > 1e-4  # the pixels are part of the prompt
    with pytest.raises(ValueError, match="image"):
        example_rows(trainer, examples)  # no image store: the images cannot be read
    before = sft_loss(logp, mask).item()
    result = train_sft(trainer, examples, epochs=4, minibatch_size=6, image_store=store)
    with torch.no_grad():
        after = sft_loss(*trainer.logprobs(rows)).item()
    assert result.metrics["steps"] == 4 and after < before - 0.1
