"""The names of GRPO's options, torch-free (typed configs and the CLI use them without torch)."""

from __future__ import annotations

from typing import Literal

AdvantageScale = Literal["group", "batch", "none"]
"""How a group's centred rewards are scaled (``training.grpo.group_advantages``)."""
LossType = Literal["token_mean", "dapo", "sequence_mean", "grpo", "dr_grpo"]
"""How per-token losses are aggregated (``training.grpo.grpo_loss``)."""
