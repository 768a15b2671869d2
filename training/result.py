"""What every trainer returns, and what every trainer is.

Each policy kind (``decisions``, ``text``, ``images``) has one trainer with the same surface:
``train(groups) -> TrainResult`` on the groups its ``read_groups`` read from the store, and
``save(directory) -> Path`` for the weights it holds now. ``training.versions.save_version``
saves and registers a trainer's version; nothing else writes a version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

Group = TypeVar("Group", contravariant=True)

FIRST_STEP_KEY = "max_abs_log_ratio"
"""The per-step value whose first entry becomes ``first_max_abs_log_ratio``: max |log π_θ −
log π_old| over the step's tokens before its update. Its first value in a ``train`` call is
≈ 0 when the samples came from the policy being trained and the recomputation reproduces the
sampler exactly; later steps have moved the policy, so their mean says nothing."""


@dataclass
class TrainResult:
    """What one ``train`` call did.

    ``metrics`` keys shared by the kinds where they mean something: ``groups``, ``groups_used``,
    ``groups_zero_variance`` (all rewards equal: no signal, skipped), ``reward_mean``,
    ``steps`` (optimizer steps of this call), ``loss``, ``kl``, ``grad_norm`` (means over the
    steps) and ``first_max_abs_log_ratio`` (see :data:`FIRST_STEP_KEY`; nan without a step).
    """

    version: str
    """The version the trainer's weights are now: the next one after a call with groups."""
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per optimizer step, in order."""
    policy: Any = None
    """The decision trainer's frozen snapshot of the new version (ready to roll out); None for
    the LoRA kinds, whose weights live in the trainer's model."""
    member_rewards: dict[str, tuple[str, dict[str, float]]] = field(default_factory=dict)
    """What each member was trained with: trajectory id -> (group id, {name: value}), e.g. the
    decision trainer's ``composite``, ``penalised`` and ``advantage`` (stored with
    ``training.decisions.rewards.store_trained_rewards``)."""


class Trainer(Protocol[Group]):
    """The trainer of one policy kind (``GRPOTrainer``, ``LoRATrainer``, ``FlowGRPOTrainer``)."""

    @property
    def name(self) -> str:
        """The policy's name in the store's ``policy_versions``."""
        ...

    @property
    def version(self) -> str:
        """The version of the weights the trainer holds now."""
        ...

    def train(self, groups: Sequence[Group]) -> TrainResult: ...

    def save(self, directory: str | Path) -> Path:
        """Write the weights (as ``name@version``) into the new ``directory``, atomically; an
        existing ``directory`` raises ``FileExistsError``."""
        ...

    def describe(self) -> dict[str, Any]:
        """How the weights were made (algorithm, optimizer steps, base model, parent): recorded
        with the version in the store."""
        ...


def step_summary(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """A ``train`` call's step metrics: ``steps``, the mean of every per-step value, and
    ``first_max_abs_log_ratio`` (nan when no step was taken)."""
    summary: dict[str, float] = {"steps": float(len(history))}
    keys = dict.fromkeys(key for row in history for key in row if key != FIRST_STEP_KEY)
    for key in keys:
        values = [row[key] for row in history if key in row]
        summary[key] = float(sum(values) / len(values))
    first = history[0].get(FIRST_STEP_KEY, math.nan) if history else math.nan
    summary["first_max_abs_log_ratio"] = float(first)
    return summary
