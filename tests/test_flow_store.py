"""Diffusion transitions through the graph and the store: the draw node records what the traced
sampler produced (latents as content-addressed safetensors blobs), and the stored transitions'
log-probs, recomputed under the unchanged policy, give ratio 1."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from nodes.backends.base import EditRequest  # noqa: E402
from nodes.backends.engines.flow_image import FlowImageEngine, FlowImageModel, load_pipeline  # noqa: E402
from nodes.backends.flow.sampler import unpack_latents  # noqa: E402

pytest_plugins = ("tests.tiny_models",)


@pytest.fixture(scope="module")
def pipe(tiny_sd3):
    torch.set_num_threads(1)
    return load_pipeline(tiny_sd3)


class Tap:
    """Passes traced draws through, keeping what the sampler returned (a traced model itself)."""

    def __init__(self, inner: FlowImageModel) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.outputs: list = []

    async def generate_traced(self, request):
        traced = await self.inner.generate_traced(request)
        self.outputs.append(traced)
        return traced

    async def edit_traced(self, request):
        return await self.inner.edit_traced(request)

    async def generate(self, request):
        return await self.inner.generate(request)

    edit = None


def painter_for(pipe) -> FlowImageModel:
    engine = FlowImageEngine(pipe, name="tiny-sd3")
    return FlowImageModel(engine, default_steps=4, guidance_scale=3.0, max_batch=8)


def test_draw_records_transitions_and_recomputed_ratio_is_one(pipe, tmp_path):
    from sqlalchemy import func, select

    from storage.diffusion import load_transitions
    from storage.schema import BlobRow
    from storage.store import TrajectoryStore
    from training.images.groups import read_groups
    from training.images.sampling import collect
    from training.images.trainer import FlowGRPOConfig, FlowGRPOTrainer

    store = TrajectoryStore(f"sqlite:///{tmp_path}/flow.db")
    painter = painter_for(pipe)
    tap = Tap(painter)
    run_id = asyncio.run(
        collect(tap, store, ["a red circle", "a blue star"], group_size=3, steps=4)
    )
    trajectories = store.trajectories(run=run_id)
    assert len(trajectories) == 6 and all(t.status == "succeeded" for t in trajectories)
    stored = load_transitions(store.db, trajectory_ids=[t.id for t in trajectories])
    assert len(stored) == 6  # one stochastic step per image (R3's default)
    for item in stored:
        step = store.steps(item.trajectory_id)[item.step_seq]
        assert step.node == "draw" and step.stage == "reason"
        t = item.transition
        assert t.model == "tiny-sd3" and t.guidance_scale == 3.0 and t.num_steps == 4
        assert t.step_index in (0, 1) and t.kind == "generate"
        x, x_next = unpack_latents(t.latents)
        assert x.shape == x_next.shape == (4, 16, 16)
    with store.db.read() as conn:  # latents are blobs (safetensors), not JSON
        kinds = conn.execute(select(BlobRow.media_type, func.count()).group_by("media_type"))
        assert dict(kinds.all()) == {"application/safetensors": 6}

    # Bit for bit what the sampler handed the draw node (latents bytes and float log-prob).
    sampled = {(t.prompt, t.seed): t for traced in tap.outputs for t in traced.transitions}
    assert len(sampled) == 6
    for item in stored:
        t = item.transition
        assert sampled[(t.prompt, t.seed)] == t
    final = store.trajectory(stored[0].trajectory_id).final_image
    images = {traced.image.tobytes() for traced in tap.outputs}
    assert store.get(final).tobytes() in images

    # Ratio 1 under the unchanged policy: a fresh LoRA (B = 0) is the sampling policy.
    assert read_groups(store, run_id, reward="redness") == []  # no reward stored yet
    trainer = FlowGRPOTrainer(pipe, FlowGRPOConfig(r=4, alpha=8), model="tiny-sd3")
    try:
        transitions = [s.transition for s in stored]
        with torch.no_grad():
            recomputed = trainer.sampler.recompute(transitions).logprob
        old = torch.tensor([t.logprob for t in transitions])
        ratio = torch.exp(recomputed - old)
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio
    finally:
        pipe.transformer.delete_adapters(trainer.ADAPTER)
        painter.close()
        store.close()


def test_traced_edits_record_transitions_of_the_part_of_the_schedule_they_run(pipe):
    from PIL import Image

    from nodes.backends.flow.sampler import FlowSampler, SD3Flow

    painter = painter_for(pipe)
    try:
        source = Image.new("RGB", (32, 32), (200, 30, 30))
        traced = asyncio.run(
            painter.edit_traced(EditRequest(source, "make it blue", seed=5, steps=5))
        )
        assert traced.image.size == (32, 32)
        (t,) = traced.transitions
        assert t.kind == "edit" and t.strength == 0.8 and t.prompt == "make it blue"
        assert 1 <= t.step_index <= 2  # strength 0.8 of 5 steps: the run starts at step 1
        recompute = FlowSampler(SD3Flow(pipe, "tiny-sd3"))
        with torch.no_grad():
            again = recompute.recompute([t]).logprob
        assert float(again[0]) == pytest.approx(t.logprob, abs=1e-5)
        plain = asyncio.run(painter.edit(EditRequest(source, "make it blue", seed=5, steps=5)))
        assert plain.tobytes() == traced.image.tobytes()
    finally:
        painter.close()


def test_refine_records_edit_transitions_and_groups_take_the_step_reward(pipe, tmp_path):
    """Reflect mode: the refine node records its edit's transitions (stage reflect_refine), and
    ``read_groups(node="refine")`` pairs them with the refine step's own reward (R3's C_j)."""
    from agent_graph.runner import Runner, make_group_tasks
    from nodes.context import Backends, GraphSettings, ReasonerContext
    from nodes.state import Budget
    from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
    from storage.diffusion import load_transitions
    from storage.recorder import SQLRecorder
    from storage.store import RewardInput, TrajectoryStore
    from tests.scripted import ScriptedChat
    from training.images.groups import read_groups

    edit = "<think>It lacks red.</think>Make it red."
    store = TrajectoryStore(f"sqlite:///{tmp_path}/refine.db")
    painter = painter_for(pipe)
    run = store.create_run("refine", {})

    async def rollout() -> list:
        async with SQLRecorder(store, run.id) as recorder:
            context = ReasonerContext(
                backends=Backends(
                    ScriptedChat(["a circle"]),
                    ScriptedChat([edit]),  # always edit; the budget of 1 round ends it
                    ScriptedChat(["{}"]),
                    painter,
                    painter,
                ),
                mode_policy=FixedModePolicy("reflect"),
                stop_policy=FollowReflectionStopPolicy(),
                images=store,
                settings=GraphSettings(width=32, height=32, steps=4, score_images=False),
                recorder=recorder,
            )
            tasks = make_group_tasks(["a circle"], group_size=2, seed=3)
            return await Runner(context, budget=Budget(max_rounds=1)).run(tasks)

    try:
        results = asyncio.run(rollout())
        assert all(r.status == "succeeded" for r in results)
        refines = []
        for result in results:
            steps = store.steps(result.trajectory_id)
            assert [s.node for s in steps][:4] == ["plan", "draw", "reflect", "refine"]
            refine = steps[3]
            assert refine.stage == "reflect_refine"
            (stored,) = load_transitions(store.db, [(result.trajectory_id, refine.seq)])
            assert stored.transition.kind == "edit" and stored.transition.prompt == "Make it red."
            refines.append((result.trajectory_id, refine.seq))
        # C_j on the refine step; a different trajectory-level value must not be used.
        store.add_rewards(
            [RewardInput(tid, "C", 0.1 * (i + 1), step=seq) for i, (tid, seq) in enumerate(refines)]
            + [RewardInput(tid, "C", 9.0) for tid, _ in refines]
        )
        (group,) = read_groups(store, run.id, reward="C", node="refine")
        assert sorted(m.reward for m in group.members) == pytest.approx([0.1, 0.2])
        assert all(m.transitions[0].kind == "edit" for m in group.members)
    finally:
        painter.close()
        store.close()
