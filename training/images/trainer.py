"""Flow-GRPO on a diffusion LoRA, from stored image groups (``training.images.groups``).

``FlowGRPOTrainer.train`` recomputes each stored transition's log-prob under base + LoRA with
CFG as sampled (the stored prompt, negative prompt and guidance), the reference mean with the
LoRA disabled, and minimises ``training.flow_grpo.flow_grpo_loss``. Before the first update the
ratio is 1 (``first_max_abs_log_ratio`` in the metrics): the check that the recomputation
matches the sampler. ``save`` writes the LoRA in peft's layout with Atelier's version file
(``policies.diffusion_lora``), which the image server and ``FlowImageModel`` load at run time.

Under a process group (``torchrun``, ``training.distributed``) every rank reads the same groups
and shuffles the same minibatches of transitions; each rank recomputes only its own groups'
transitions, weighted by their share of the minibatch (the loss is a mean over transitions),
and the LoRA gradients are summed over the ranks: the single-process update and metrics.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policies.weights import next_version, write_new_directory
from training.distributed import STEP_SUMS, DataParallel
from training.flow_grpo import flow_advantages, flow_grpo_loss
from training.grpo import AdvantageScale
from training.images.groups import ImageGroup
from training.result import FIRST_STEP_KEY, TrainResult, step_summary


@dataclass
class FlowGRPOConfig:
    r: int = 32
    """LoRA rank (Flow-GRPO: 32)."""
    alpha: int = 64
    """LoRA alpha (Flow-GRPO: 64)."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
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
    advantage_scale: AdvantageScale = "group"
    """"group" (GRPO), "batch" or "none" (Dr. GRPO), as ``training.grpo.group_advantages``."""
    epochs: int = 1
    """Passes over the transitions per ``train`` call."""
    minibatch_size: int = 8
    """Transitions per optimizer step."""
    max_grad_norm: float = 1.0
    seed: int = 0
    """Seeds the LoRA's random A matrices and the minibatch order."""


class FlowGRPOTrainer:
    """A flow pipeline's transformer (frozen) + a trainable LoRA, trained with Flow-GRPO.

    ``model`` names the base model (what transitions record). ``name`` / ``version`` are the
    LoRA's identity as a policy (default ``draw@0``, or those of ``init_lora``, the saved
    version training continues from); every ``train`` call that takes an optimizer step makes
    the next version.
    """

    ADAPTER = "policy"

    def __init__(
        self,
        pipe: Any,
        config: FlowGRPOConfig | None = None,
        *,
        model: str = "flow-model",
        name: str | None = None,
        version: str | None = None,
        init_lora: str | Path | None = None,
    ) -> None:
        from nodes.backends.engines.flow_image import flow_model
        from nodes.backends.flow.sampler import FlowSampler
        from policies.diffusion_lora import attach_lora, load_lora, lora_config

        self.config = cfg = config or FlowGRPOConfig()
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.parent: str | None = None
        """The version training started from (``init_lora``'s), recorded with every save."""
        if init_lora is not None:
            loaded = load_lora(self.transformer, init_lora, self.ADAPTER)
            name, version = name or loaded.name, version or loaded.version
            self.parent = loaded.version
            self.transformer.requires_grad_(False)
            self.parameters = [p for n, p in self.transformer.named_parameters() if "lora_" in n]
            for p in self.parameters:
                p.requires_grad_(True)
        else:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                self.parameters = attach_lora(
                    self.transformer,
                    lora_config(cfg.r, cfg.alpha, cfg.target_modules),
                    self.ADAPTER,
                )
        self.name, self.version = name or "draw", version or "0"
        self.transformer.eval()
        self.sampler = FlowSampler(flow_model(pipe, model))
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.rng = random.Random(cfg.seed)
        self.steps = 0
        """Optimizer steps taken so far (over every ``train`` call)."""

    def reference_means(self, transitions: Sequence[Any]) -> torch.Tensor:
        """μ of each transition under the base model (the LoRA disabled)."""
        self.transformer.disable_adapters()
        try:
            with torch.no_grad():
                return self.sampler.recompute(transitions).mean
        finally:
            self.transformer.enable_adapters()

    def train(self, groups: Sequence[ImageGroup]) -> TrainResult:
        """Flow-GRPO on ``groups`` (``epochs`` passes of shuffled minibatches of transitions);
        the metrics add ``transitions`` (the loss's tokens), ``clip_fraction`` and
        ``seconds``."""
        cfg = self.config
        started = time.perf_counter()
        items: list[tuple[Any, float]] = []
        zero_variance = 0
        parallel = DataParallel.current()
        mine: set[int] = set()  # the transitions this rank recomputes (all on one process)
        for index, group in enumerate(groups):
            rewards = torch.tensor([m.reward for m in group.members], dtype=torch.float32)
            advantages, zero = flow_advantages(
                rewards, scale=cfg.advantage_scale, clip=cfg.adv_clip
            )
            if bool(zero):
                zero_variance += 1
                continue
            for member, advantage in zip(group.members, advantages.tolist(), strict=True):
                for transition in member.transitions:
                    if parallel.owns(index):
                        mine.add(len(items))
                    items.append((transition, advantage))
        history: list[dict[str, float]] = []
        for _ in range(cfg.epochs):
            order = list(range(len(items)))
            self.rng.shuffle(order)
            for start in range(0, len(order), cfg.minibatch_size):
                picked = order[start : start + cfg.minibatch_size]
                batch = [items[i] for i in picked if i in mine]
                step = self._step(
                    [t for t, _ in batch], [a for _, a in batch], len(picked), parallel
                )
                history.append(step)
        rewards_all = [m.reward for g in groups for m in g.members]
        metrics = {
            "groups": float(len(groups)),
            "groups_used": float(len(groups) - zero_variance),
            "groups_zero_variance": float(zero_variance),
            "reward_mean": sum(rewards_all) / len(rewards_all) if rewards_all else math.nan,
            "transitions": float(len(items)),
            **step_summary(history),
        }
        if history:  # no optimizer step (every group zero-variance): the same version
            self.version = next_version(self.version)
        metrics["seconds"] = time.perf_counter() - started
        return TrainResult(self.version, metrics, history)

    def _step(
        self,
        transitions: list[Any],
        advantages: list[float],
        total: int | None = None,
        parallel: DataParallel | None = None,
    ) -> dict[str, float]:
        """One optimizer step on a minibatch of ``total`` transitions (default: these), of
        which this rank computes ``transitions``; gradients and metrics summed over
        ``parallel``'s ranks before the update."""
        parallel = parallel or DataParallel()
        total = len(transitions) if total is None else total
        self.optimizer.zero_grad(set_to_none=True)
        row: dict[str, float] = {}
        drift = 0.0
        if transitions:
            row, drift = self._local_loss(transitions, advantages, len(transitions) / total)
        row = parallel.sum(row, STEP_SUMS)
        parallel.all_reduce_gradients(self.parameters)
        row["clip_fraction"] = row["clip_low"] + row["clip_high"]
        cfg = self.config
        if cfg.max_grad_norm and math.isfinite(cfg.max_grad_norm):
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, cfg.max_grad_norm)
            row["grad_norm"] = float(norm)
        self.optimizer.step()
        self.steps += 1
        return {**row, FIRST_STEP_KEY: parallel.max(drift)}

    def _local_loss(
        self, transitions: list[Any], advantages: list[float], weight: float
    ) -> tuple[dict[str, float], float]:
        """Backward of the transitions' loss times ``weight`` (their share of the minibatch);
        their weighted loss and metrics, and their max |log ratio|."""
        cfg = self.config
        ref_mean = self.reference_means(transitions) if cfg.beta else None
        current = self.sampler.recompute(transitions)
        device = current.logprob.device  # the transformer's: a GPU when trained on one
        old = torch.tensor([t.logprob for t in transitions], dtype=torch.float32, device=device)
        drift = float((current.logprob.detach() - old).abs().max())
        loss, metrics = flow_grpo_loss(
            current.logprob,
            old,
            torch.tensor(advantages, dtype=torch.float32, device=device),
            clip_range=cfg.clip_range,
            beta=cfg.beta,
            mean=current.mean,
            ref_mean=ref_mean,
            std=current.std,
        )
        (loss * weight).backward()
        row = {"loss": float(loss.detach()) * weight}
        row.update({key: value * weight for key, value in metrics.items()})  # means: weighted
        return row, drift

    def save(self, directory: str | Path) -> Path:
        """The LoRA as the new ``directory``, atomically: peft's layout plus Atelier's version
        file (``name``, ``version`` and :meth:`describe`)."""
        from policies.diffusion_lora import save_lora

        def write(path: Path) -> None:
            save_lora(
                self.transformer, path, name=self.name, version=self.version,
                adapter_name=self.ADAPTER, meta=self.describe(),
            )  # fmt: skip

        return write_new_directory(directory, write)

    def save_checkpoint(self, directory: str | Path) -> Path:
        """What :meth:`save` leaves out and an exact continuation needs, into the new
        ``directory`` (atomic): the AdamW moments, the step count, the minibatch order's random
        state and the parent. :meth:`restore_checkpoint` on a trainer built from the saved
        version (``init_lora=``) then trains as if it had never stopped. The KL reference is
        the base model (the LoRA disabled): nothing to keep."""
        from policies.weights import save_weights

        state = self.optimizer.state_dict()
        tensors = {
            f"opt.{index}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
            for index, slot in state["state"].items()
            for key, value in slot.items()
        }
        version, internal, gauss = self.rng.getstate()
        meta = {
            "class": "flow-grpo-trainer-state",
            "version": self.version,
            "steps": self.steps,
            "param_groups": state["param_groups"],
            "parent": self.parent,
            "rng": [version, list(internal), gauss],
        }
        return save_weights(directory, tensors, meta)

    def restore_checkpoint(self, directory: str | Path) -> None:
        """Load :meth:`save_checkpoint`'s state into this trainer (built on the LoRA version
        the checkpoint was written after: a ``ValueError`` otherwise)."""
        from policies.weights import load_weights

        tensors, meta = load_weights(directory)
        if meta.get("class") != "flow-grpo-trainer-state":
            raise ValueError(f"{directory} is not a Flow-GRPO trainer checkpoint")
        if meta["version"] != self.version:
            raise ValueError(
                f"{directory} holds the trainer state after {self.name}@{meta['version']}, not "
                f"{self.name}@{self.version}"
            )
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, name = key.removeprefix("opt.").split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        self.steps = int(meta["steps"])
        self.parent = meta["parent"]
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "kind": "diffusion-lora",
            "algorithm": "flow-grpo",
            "optimizer_steps": self.steps,
            "base_model": self.sampler.model.name,
        }
        if self.parent is not None:
            described["parent"] = self.parent
        return described
