"""GRPO for node policies from stored decision groups (``training.decisions.groups``).

Each member of a group is one "completion" whose tokens are its decisions: the member's shaped
reward (composite, then the group's complexity penalty, both from the Self-Adaptive Interleaved
Reasoner (SAIR)) gives its group-relative advantage, shared by its decisions; the loss is
``training.grpo.grpo_loss`` on the policy's current log-probs against the log-probs recorded at
sampling time.

Under a process group (``torchrun``, ``training.distributed``) every rank builds the same rows
and minibatches from all groups, computes the loss of its own groups' rows only, weighted by
their share of the global minibatch, and the gradients are summed over the ranks: the update
is the single-process one.

The trainer owns a working copy of the policy and its AdamW state; ``train`` returns a frozen
snapshot with the next version, ready to roll out; ``training.versions.save_version`` saves it
and registers it in the store.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from policies.weights import load_policy, load_weights, next_version, save_weights
from training.decisions.groups import DecisionGroup, DecisionRecord
from training.distributed import STEP_SUMS, DataParallel
from training.grpo import (
    AdvantageScale,
    LossType,
    grpo_loss,
    microbatch_weight,
    ragged_group_advantages,
)
from training.result import FIRST_STEP_KEY, TrainResult, step_summary
from training.rewards import composite_reward
from training.rewards.composite import ComplexityForm, apply_complexity_penalty


@dataclass
class GRPOConfig:
    lr: float = 0.05
    """AdamW learning rate. The papers' 1e-6 is for billion-parameter LLMs; a router is a
    softmax over a few hundred features."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 8
    """Passes over each batch of groups (GRPO's μ; the papers' LLM runs use 1-2). A small policy
    needs several to move within the clip range; the clip stops each sample past 1 ± ε."""
    minibatch_size: int = 64
    """Members (trajectories) per optimizer step; their decisions are the loss's tokens."""
    eps_low: float = 0.2
    """Lower clip ε: ratios below 1 − ε_low stop pushing down negative-advantage actions."""
    eps_high: float = 0.28
    """Upper clip ε (DAPO "clip-higher", 0.28; GRPO uses 0.2)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference (the policy the trainer started from); DAPO and
    Dr. GRPO use 0, DeepSeekMath's GRPO 0.04."""
    loss_type: LossType = "token_mean"
    """Aggregation: "token_mean" (DAPO), "sequence_mean" (GRPO) or "dr_grpo"."""
    advantage_scale: AdvantageScale = "group"
    """"group" (GRPO), "batch" (batch std) or "none" (Dr. GRPO)."""
    advantage_eps: float = 1e-4
    """ε in (r − mean) / (std + ε), as TRL."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    complexity_eps: float | None = 0.05
    """SAIR's near-best margin for the complexity penalty (not published there); None
    turns the penalty off."""
    complexity_form: ComplexityForm = "scale"
    """"scale": SAIR as stated (near-best R × N*/N); "margin": the order-preserving form
    that scales only the margin over the best member outside the near-best set; "linear":
    R − λ·(N − N_min) for every member (``training.rewards.composite``)."""
    complexity_cost: float = 0.1
    """λ, the reward one image costs, for the "linear" form (not from a paper: an extra image
    must raise the judge score by 0.1 to pay for itself)."""
    reward_weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    """(a1, a2, a3) of R = a1·R_o + a2·R_f + a3·R_s (SAIR does not publish them)."""
    outcome_reward: str = "checker"
    """Reward component used as R_o (``checker`` = the stored judge score, or a stored name)."""
    format_reward: str = "format"
    """Component used as R_f."""
    stepwise_reward: str = "stepwise"
    """Component used as R_s (a trajectory reward stored under this name)."""
    seed: int = 0
    """Seeds the minibatch shuffling."""


def shaped_rewards(group: DecisionGroup, config: GRPOConfig) -> list[float]:
    """Composite reward of each member, then the group's complexity penalty."""
    return penalised_rewards(group, composite_rewards(group, config), config)


def composite_rewards(group: DecisionGroup, config: GRPOConfig) -> list[float]:
    """R = a1·R_o + a2·R_f + a3·R_s of each member, from its stored reward components."""
    names = (config.outcome_reward, config.format_reward, config.stepwise_reward)
    values = []
    for member in group.members:
        parts = []
        for name, weight in zip(names, config.reward_weights, strict=True):
            if weight == 0.0:
                parts.append(0.0)
            elif name in member.rewards:
                parts.append(member.rewards[name])
            else:
                raise KeyError(f"trajectory {member.trajectory_id} has no reward {name!r}")
        values.append(composite_reward(*parts, weights=config.reward_weights))
    return values


def penalised_rewards(
    group: DecisionGroup, composites: Sequence[float], config: GRPOConfig
) -> list[float]:
    """The group's complexity penalty applied to its members' composite rewards."""
    values = list(composites)
    if config.complexity_eps is not None:
        counts = [m.image_count for m in group.members]
        values = apply_complexity_penalty(
            values,
            counts,
            config.complexity_eps,
            config.complexity_form,
            config.complexity_cost,
        )
    return values


class GRPOTrainer:
    """GRPO on a decision policy (``LearnedModePolicy``, ``LearnedStopPolicy``)."""

    def __init__(self, policy: Any, config: GRPOConfig | None = None) -> None:
        self.config = config or GRPOConfig()
        self.policy = policy.clone()
        """The working copy being optimised (its version is the last one returned)."""
        self.reference = policy.clone()
        """Frozen start point: the KL reference when β > 0."""
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        self.steps = 0
        """Optimizer steps taken so far (over every ``train`` call)."""
        self.rounds = 0
        """``train`` calls so far."""

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def version(self) -> str:
        return self.policy.version

    # --- training -----------------------------------------------------------------------------

    def train(self, groups: Sequence[DecisionGroup]) -> TrainResult:
        """GRPO on ``groups``; returns the new policy version and metrics (``decisions``: the
        loss's tokens; ``updates``: optimizer steps over every call)."""
        cfg = self.config
        composites = [composite_rewards(g, cfg) for g in groups]
        rewards = [penalised_rewards(g, c, cfg) for g, c in zip(groups, composites, strict=True)]
        metrics: dict[str, float] = {
            "groups": float(len(groups)),
            "reward_mean": _mean([r for rs in rewards for r in rs]),
        }
        if not groups:
            metrics.update(step_summary([]))
            return TrainResult(self.version, metrics, policy=self.policy.clone())
        scale, eps = cfg.advantage_scale, cfg.advantage_eps
        advantages, zero = ragged_group_advantages(rewards, scale=scale, eps=eps)
        used: dict[str, tuple[str, dict[str, float]]] = {}
        for group, composite, penalised, adv in zip(
            groups, composites, rewards, advantages, strict=True
        ):
            members = zip(group.members, composite, penalised, adv.tolist(), strict=True)
            for member, c, r, a in members:
                values = {"composite": c, "penalised": r, "advantage": a}
                used[member.trajectory_id] = (group.group_id, values)
        rows = []  # one per member with decisions: (decisions, advantage)
        parallel = DataParallel.current()
        mine: set[int] = set()  # the rows this rank computes (every row on one process)
        for index, (group, adv, is_zero) in enumerate(zip(groups, advantages, zero, strict=True)):
            if is_zero:
                continue  # every advantage is 0: no signal, only noise in the loss's mean
            for member, a in zip(group.members, adv.tolist(), strict=True):
                if member.decisions:
                    if parallel.owns(index):
                        mine.add(len(rows))
                    rows.append((member.decisions, a))
        metrics["groups_zero_variance"] = float(sum(zero))
        metrics["groups_used"] = float(len(groups) - sum(zero))
        metrics["decisions"] = float(sum(len(d) for d, _ in rows))
        history: list[dict[str, float]] = []
        shuffler = random.Random(f"{cfg.seed}:{self.rounds}")
        for _ in range(cfg.epochs if rows else 0):
            order = list(range(len(rows)))
            shuffler.shuffle(order)
            for start in range(0, len(order), cfg.minibatch_size):
                picked = order[start : start + cfg.minibatch_size]
                batch = [rows[i] for i in picked]
                history.append(self._step(batch, [rows[i] for i in picked if i in mine], parallel))
        metrics.update(step_summary(history))
        self.rounds += 1
        if history:  # no optimizer step (every group zero-variance): the same version
            self.policy.version = next_version(self.policy.version)
        metrics["updates"] = float(self.steps)
        return TrainResult(self.version, metrics, history, self.policy.clone(), used)

    def _step(
        self,
        batch: list[tuple[Sequence[DecisionRecord], float]],
        local: list[tuple[Sequence[DecisionRecord], float]] | None = None,
        parallel: DataParallel | None = None,
    ) -> dict[str, float]:
        """One optimizer step on the minibatch ``batch``, of which this rank computes the
        ``local`` rows (default: all), weighted by their share of ``batch``; the gradients and
        metrics are summed over ``parallel``'s ranks before the update."""
        cfg = self.config
        parallel = parallel or DataParallel()
        local = batch if local is None else local
        width = max(len(decisions) for decisions, _ in batch)  # the global padded length
        total_tokens = sum(len(decisions) for decisions, _ in batch)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        drift = 0.0
        if local:
            totals, drift = self._local_loss(local, width, len(batch), total_tokens)
        totals = parallel.sum(totals, STEP_SUMS)
        parallel.all_reduce_gradients(self.policy.parameters())
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        drift = parallel.max(drift)
        return {
            "loss": totals.pop("loss"),
            "grad_norm": norm.item(),
            **totals,
            FIRST_STEP_KEY: drift,
        }

    def _local_loss(
        self,
        batch: list[tuple[Sequence[DecisionRecord], float]],
        width: int,
        total_rows: int,
        total_tokens: int,
    ) -> tuple[dict[str, float], float]:
        """Backward of ``batch``'s loss as its share of a minibatch of ``total_rows`` rows,
        ``total_tokens`` decisions and padded length ``width``; its loss and metrics so
        weighted, and its max |log ratio|."""
        cfg = self.config
        obs = [d.observation for decisions, _ in batch for d in decisions]
        actions = [d.action for decisions, _ in batch for d in decisions]
        # Members' decisions laid out as padded rows: [B, T] with a mask, like token sequences.
        index = torch.tensor(
            [i * width + j for i, (decisions, _) in enumerate(batch) for j in range(len(decisions))]
        )
        shape = (len(batch), width)
        old = torch.zeros(shape, dtype=torch.float64)
        old.view(-1)[index] = torch.tensor(
            [d.log_prob for decisions, _ in batch for d in decisions], dtype=torch.float64
        )
        mask = torch.zeros(shape, dtype=torch.float64)
        mask.view(-1)[index] = 1.0
        logp = torch.zeros(shape, dtype=torch.float64).view(-1)
        logp = logp.index_put((index,), self.policy.log_prob(obs, actions)).view(shape)
        ref = None
        if cfg.beta:
            with torch.no_grad():
                ref = torch.zeros(shape, dtype=torch.float64).view(-1)
                ref = ref.index_put((index,), self.reference.log_prob(obs, actions)).view(shape)
        adv = torch.tensor([a for _, a in batch], dtype=torch.float64)
        loss, metrics = grpo_loss(
            logp,
            old,
            adv,
            mask,
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            beta=cfg.beta,
            ref_logprobs=ref,
            loss_type=cfg.loss_type,
            max_completion_length=width,
        )
        drift = float(((logp.detach() - old).abs() * mask).max())
        tokens = sum(len(decisions) for decisions, _ in batch)
        weight = microbatch_weight(cfg.loss_type, len(batch), tokens, total_rows, total_tokens)
        (loss * weight).backward()
        totals = {"loss": loss.item() * weight}
        for key, value in metrics.items():  # token means: weighted by the tokens
            totals[key] = value * (tokens / total_tokens)
        return totals, drift

    # --- versions and checkpoints -------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """The policy's current version (``policy.save``: config JSON + safetensors, atomic)."""
        return self.policy.save(directory)

    def describe(self) -> dict[str, Any]:
        """The algorithm, the steps taken and the config (rewards, penalty, clip, lr, ...)."""
        return {"algorithm": "grpo", "optimizer_steps": self.steps, "config": asdict(self.config)}

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Policy (``policy/``), optimizer moments (safetensors) and counters + config (JSON)."""
        path = Path(directory)
        self.policy.save(path / "policy")
        self.reference.save(path / "reference")
        state = self.optimizer.state_dict()
        tensors = {
            f"{index}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
            for index, slot in state["state"].items()
            for key, value in slot.items()
        }
        groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
        meta = {
            "class": "grpo-trainer",
            "config": asdict(self.config),
            "updates": self.steps,
            "rounds": self.rounds,
            "param_groups": groups,
        }
        save_weights(path / "optimizer", tensors, meta)
        return path

    @classmethod
    def resume(cls, directory: str | Path, config: GRPOConfig | None = None) -> GRPOTrainer:
        """Rebuild a trainer from :meth:`save_checkpoint`; continuing gives the same updates as
        never having stopped."""
        path = Path(directory)
        tensors, meta = load_weights(path / "optimizer")
        saved = meta["config"]
        saved["reward_weights"] = tuple(saved["reward_weights"])
        trainer = cls(load_policy(path / "policy"), config or GRPOConfig(**saved))
        trainer.policy = load_policy(path / "policy")  # the working copy itself, not a clone
        trainer.reference = load_policy(path / "reference")
        trainer.optimizer = torch.optim.AdamW(trainer.policy.parameters(), lr=trainer.config.lr)
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        trainer.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        trainer.steps = int(meta["updates"])
        trainer.rounds = int(meta["rounds"])
        return trainer


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
