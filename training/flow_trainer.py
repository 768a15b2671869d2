"""Flow-GRPO from stored trajectories: train a diffusion LoRA on the draw (or refine) node's
recorded denoising transitions.

The loop, end to end (``tests/test_flow_training.py`` runs it on a tiny random-weight SD3)::

    trainer = FlowGRPOTrainer(pipe)                                  # base + trainable LoRA
    painter = FlowImageModel(FlowImageEngine(trainer.pipe, name=...))  # samples with the LoRA
    run_id = await collect_draws(painter, store, prompts, group_size=8)  # graph → store
    score_images(store, run_id, redness, "redness")                  # rewards, into the store
    groups = flow_groups(store, run_id, reward="redness")            # read back
    stats = trainer.train(groups)                                    # ratio, clip, KL, AdamW
    trainer.save("draw-lora-1", name="draw", version="1", store=store)

1. Rollouts go through the graph: the draw node records each image's stochastic transitions
   (latents as blobs) with the step, like every other output.
2. A reward is any stage reward stored under a name: R3's V for the draw stage, C_j for a
   refine (``training.rewards``), or any function of the final image (``score_images``).
3. ``flow_groups`` reads a run's GRPO groups (trajectories sharing a group id) with the
   transitions of their ``node`` steps and the reward: a step-level reward of that step wins
   over the trajectory-level one of the same name.
4. ``FlowGRPOTrainer.train`` recomputes each transition's log-prob under base + LoRA with CFG
   as sampled (the stored prompt, negative prompt and guidance), the reference mean with the
   LoRA disabled, and minimises ``training.flow_grpo.flow_grpo_loss``. Before the first update
   the ratio is 1 (``TrainStats.first_max_abs_log_ratio``): the check that the recomputation
   matches the sampler.
5. ``save`` writes the LoRA in peft's layout (``policies.diffusion_lora``), which the image
   server and ``FlowImageModel`` load at run time, and registers the version in the store.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.flow_grpo import flow_advantages, flow_grpo_loss

ImageReward = Callable[[Any, str], float]
"""A reward of one image: ``reward(pil_image, prompt)``."""


@dataclass
class FlowGRPOConfig:
    r: int = 32
    """LoRA rank (Flow-GRPO: 32)."""
    alpha: int = 64
    """LoRA alpha (Flow-GRPO: 64)."""
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Transformer modules that get a LoRA (attention projections)."""
    lr: float = 3e-4
    """AdamW learning rate (Flow-GRPO: 3e-4)."""
    weight_decay: float = 1e-4
    clip_range: float = 1e-4
    """ε of the clipped ratio (Flow-GRPO: 1e-4; log-probs are per-element means)."""
    beta: float = 0.04
    """Weight of the KL to the reference (the base model, LoRA disabled) (Flow-GRPO: 0.04)."""
    adv_clip: float = 5.0
    """Advantages are clipped to ±adv_clip (Flow-GRPO: 5)."""
    advantage_scale: str = "group"
    """"group" (GRPO), "batch" or "none" (Dr. GRPO), as ``training.grpo.group_advantages``."""
    epochs: int = 1
    """Passes over the transitions per ``train`` call."""
    minibatch: int = 8
    """Transitions per optimizer step."""
    max_grad_norm: float = 1.0
    seed: int = 0
    """Seeds the LoRA's random A matrices and the minibatch order."""


@dataclass(frozen=True)
class FlowSample:
    trajectory_id: str
    step_seq: int
    transitions: tuple[Any, ...]
    """:class:`~nodes.backends.flow.transitions.DiffusionTransition` as stored."""
    reward: float


@dataclass(frozen=True)
class FlowGroup:
    group_id: str
    prompt: str
    samples: tuple[FlowSample, ...]


@dataclass
class FlowTrainStats:
    steps: int = 0
    transitions: int = 0
    skipped_groups: int = 0
    """Groups whose rewards were all equal (no signal)."""
    losses: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    clip_fraction: list[float] = field(default_factory=list)
    first_max_abs_log_ratio: float | None = None
    """max |log π_θ − log π_old| over the first minibatch, before any update: ~0 when the
    recomputation reproduces the sampler."""
    seconds: float = 0.0


# --- 1-2. rollouts and rewards ---------------------------------------------------------------


class PromptPlanner:
    """A chat model for the plan node that answers with the task prompt itself, so the draw
    node draws the prompt (for training the image policy alone)."""

    model_id = "prompt-as-blueprint"

    async def chat(self, request: Any) -> Any:
        from nodes.backends.base import TextCompletion

        text = request.fields.get("prompt", "")
        return TextCompletion(text=text, model=self.model_id)


async def collect_draws(
    painter: Any,
    store: Any,
    prompts: Sequence[str],
    *,
    group_size: int = 8,
    width: int = 32,
    height: int = 32,
    steps: int | None = None,
    seed: int = 0,
    name: str = "flow-draws",
    concurrency: int = 64,
) -> str:
    """Run the graph in direct mode (plan → draw → stop) for ``group_size`` samples of every
    prompt with ``painter`` (a traced generator, e.g. ``FlowImageModel``), recorded in
    ``store``. Returns the run id."""
    from agent_graph.runner import Runner, make_group_tasks
    from nodes.context import Backends, GraphSettings, ReasonerContext
    from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
    from storage.recorder import SQLRecorder

    planner = PromptPlanner()
    run = store.create_run(name, {"kind": "flow-draws", "group_size": group_size, "seed": seed})
    tasks = make_group_tasks(list(prompts), group_size=group_size, seed=seed)
    tag = uuid.uuid4().hex[:8]  # group ids unique across runs
    tasks = [t.model_copy(update={"group_id": f"{tag}-{t.group_id}"}) for t in tasks]
    settings = GraphSettings(width=width, height=height, steps=steps, score_images=False)
    backends = Backends(planner, planner, planner, painter, painter)
    async with SQLRecorder(store, run.id) as recorder:
        context = ReasonerContext(
            backends=backends,
            router=FixedModePolicy("direct"),
            stopper=FollowReflectionStopPolicy(),
            images=store,
            settings=settings,
            recorder=recorder,
        )
        results = await Runner(context, concurrency=concurrency).run(tasks)
    failed = [r for r in results if r.status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} rollouts failed, e.g. {failed[0].error}")
    return run.id


def score_images(store: Any, run_id: str, reward: ImageReward, name: str) -> dict[str, float]:
    """Score every trajectory's final image with ``reward`` and store it as the trajectory
    reward ``name``; returns trajectory id → value."""
    from storage.store import RewardInput

    values: dict[str, float] = {}
    for summary in store.trajectories(run=run_id, status="succeeded"):
        if summary.final_image is None:
            continue
        values[summary.id] = float(reward(store.get(summary.final_image), summary.prompt))
    store.add_rewards(
        [
            RewardInput(tid, name, value, source="training.flow_trainer")
            for tid, value in values.items()
        ]
    )
    return values


# --- 3. groups from the store ------------------------------------------------------------------


def flow_groups(
    store: Any, run_ids: str | Sequence[str], *, reward: str, node: str = "draw"
) -> list[FlowGroup]:
    """GRPO groups of the runs' trajectories, with the stored transitions of their ``node``
    steps and the reward ``reward``. Members without transitions or reward are left out (and a
    group with fewer than two members is dropped)."""
    from storage.diffusion import load_transitions

    runs = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    groups: list[FlowGroup] = []
    for run_id in runs:
        for group_id, members in store.groups(run=run_id, status="succeeded").items():
            ids = [m.id for m in members]
            by_step: dict[tuple[str, int], list[Any]] = {}
            for stored in load_transitions(store.db, trajectory_ids=ids):
                by_step.setdefault((stored.trajectory_id, stored.step_seq), []).append(
                    stored.transition
                )
            step_rewards = {
                (r.trajectory_id, r.step_seq): r.value
                for tid in ids
                for r in store.rewards(tid, reward)
                if r.step_seq is not None
            }
            samples = []
            steps_of = store.steps_many(ids)
            for member in members:
                for step in steps_of[member.id]:
                    key = (member.id, step.seq)
                    if step.node != node or key not in by_step:
                        continue
                    value = step_rewards.get(key, member.rewards.get(reward))
                    if value is None:
                        continue
                    samples.append(
                        FlowSample(member.id, step.seq, tuple(by_step[key]), float(value))
                    )
            if len(samples) >= 2:
                groups.append(FlowGroup(group_id, members[0].prompt, tuple(samples)))
    return groups


# --- 4-5. the trainer --------------------------------------------------------------------------


class FlowGRPOTrainer:
    """A flow pipeline's transformer (frozen) + a trainable LoRA, trained with Flow-GRPO."""

    ADAPTER = "policy"

    def __init__(
        self,
        pipe: Any,
        config: FlowGRPOConfig | None = None,
        *,
        name: str = "flow-model",
        init_lora: str | Path | None = None,
    ) -> None:
        from nodes.backends.engines.flow_image import flow_model
        from nodes.backends.flow.sampler import FlowSampler
        from policies.diffusion_lora import attach_lora, load_lora, lora_config

        self.config = cfg = config or FlowGRPOConfig()
        self.pipe = pipe
        self.transformer = pipe.transformer
        if init_lora is not None:
            load_lora(self.transformer, init_lora, self.ADAPTER)
            self.transformer.requires_grad_(False)
            self.parameters = [p for n, p in self.transformer.named_parameters() if "lora_" in n]
            for p in self.parameters:
                p.requires_grad_(True)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                self.parameters = attach_lora(
                    self.transformer, lora_config(cfg.r, cfg.alpha, cfg.targets), self.ADAPTER
                )
        self.transformer.eval()
        self.sampler = FlowSampler(flow_model(pipe, name))
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.rng = random.Random(cfg.seed)
        self.steps = 0

    def reference_means(self, transitions: Sequence[Any]) -> torch.Tensor:
        """μ of each transition under the base model (the LoRA disabled)."""
        self.transformer.disable_adapters()
        try:
            with torch.no_grad():
                return self.sampler.recompute(transitions).mean
        finally:
            self.transformer.enable_adapters()

    def train(self, groups: Sequence[FlowGroup]) -> FlowTrainStats:
        cfg = self.config
        stats = FlowTrainStats()
        started = time.perf_counter()
        items: list[tuple[Any, float]] = []
        for group in groups:
            rewards = torch.tensor([s.reward for s in group.samples], dtype=torch.float32)
            advantages, zero = flow_advantages(
                rewards,
                scale=cfg.advantage_scale,
                clip=cfg.adv_clip,  # type: ignore[arg-type]
            )
            if bool(zero):
                stats.skipped_groups += 1
                continue
            for sample, advantage in zip(group.samples, advantages.tolist(), strict=True):
                items.extend((t, advantage) for t in sample.transitions)
        stats.transitions = len(items)
        for _ in range(cfg.epochs):
            order = list(range(len(items)))
            self.rng.shuffle(order)
            for start in range(0, len(order), cfg.minibatch):
                batch = [items[i] for i in order[start : start + cfg.minibatch]]
                self._step([t for t, _ in batch], [a for _, a in batch], stats)
        stats.seconds = time.perf_counter() - started
        return stats

    def _step(self, transitions: list[Any], advantages: list[float], stats: FlowTrainStats) -> None:
        cfg = self.config
        ref_mean = self.reference_means(transitions) if cfg.beta else None
        current = self.sampler.recompute(transitions)
        old = torch.tensor([t.logprob for t in transitions], dtype=torch.float32)
        if stats.first_max_abs_log_ratio is None:
            stats.first_max_abs_log_ratio = float((current.logprob.detach() - old).abs().max())
        loss, metrics = flow_grpo_loss(
            current.logprob,
            old,
            torch.tensor(advantages, dtype=torch.float32),
            clip_range=cfg.clip_range,
            beta=cfg.beta,
            mean=current.mean,
            ref_mean=ref_mean,
            std=current.std,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm and math.isfinite(cfg.max_grad_norm):
            torch.nn.utils.clip_grad_norm_(self.parameters, cfg.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        stats.steps += 1
        stats.losses.append(float(loss.detach()))
        stats.kl.append(metrics["kl"])
        stats.clip_fraction.append(metrics["clip_low"] + metrics["clip_high"])

    def save(
        self,
        directory: str | Path,
        *,
        name: str = "draw",
        version: str = "1",
        store: Any = None,
        meta: dict[str, Any] | None = None,
    ) -> Any:
        """Save the LoRA (peft layout + Atelier's version file); register it in ``store``."""
        from policies.diffusion_lora import save_lora

        info_meta = {
            "kind": "diffusion-lora",
            "algorithm": "flow-grpo",
            "optimizer_steps": self.steps,
            "base_model": self.sampler.model.name,
            **(meta or {}),
        }
        info = save_lora(
            self.transformer, directory, name=name, version=version,
            adapter_name=self.ADAPTER, meta=info_meta,
        )  # fmt: skip
        if store is not None:
            store.register_policy_version(
                name, version, path=str(Path(directory).resolve()), metadata=info_meta
            )
        return info
