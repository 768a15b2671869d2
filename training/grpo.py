"""GRPO math: group-relative advantages and the clipped surrogate loss, as pure torch functions.

Notation (one row per sampled completion; a completion is a sequence of T "tokens", which for
node policies are decisions):

    r_i       reward of completion i of a group of G completions of one prompt
    A_i       its advantage, shared by all its tokens
    ρ_i,t     exp(log π_θ(a_t) − log π_old(a_t)), the per-token importance ratio
    m_i,t     1 for a real token, 0 for padding

The formulas follow DESIGN.md "Training" (R3 and the Self-Adaptive Interleaved Reasoner (SAIR)
both train with GRPO) and are kept numerically identical to TRL's ``GRPOTrainer``
(tests/test_training_grpo.py runs TRL's own code on the same inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.grpo_options import AdvantageScale, LossType

_LOSS_ALIASES: dict[str, str] = {
    "token_mean": "token_mean",
    "dapo": "token_mean",
    "sequence_mean": "sequence_mean",
    "grpo": "sequence_mean",
    "dr_grpo": "dr_grpo",
}


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (n − 1) standard deviation, 0 for a single value (TRL does the same)."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim))
    return x.std() if dim is None else x.std(dim=dim)


def group_advantages(
    rewards: torch.Tensor, *, scale: AdvantageScale = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages. ``rewards`` is [G] (one group) or [B, G] (B groups of G).

        "group":  A_i = (r_i − mean_g(r)) / (std_g(r) + eps)        (GRPO, DeepSeekMath)
        "batch":  A_i = (r_i − mean_g(r)) / (std_batch(r) + eps)    (group mean, batch std)
        "none":   A_i =  r_i − mean_g(r)                            (Dr. GRPO: no std division)

    std is the unbiased (n − 1) estimate, as in TRL. Returns ``(advantages, zero_variance)``:
    advantages have the shape of ``rewards``; ``zero_variance`` has its leading shape ([] or
    [B]) and marks groups whose rewards are all equal (std_g ≈ 0): their advantages are 0, they
    carry no learning signal, and the trainer skips and counts them.
    """
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [G] or [B, G], got shape {tuple(rewards.shape)}")
    grouped = rewards if rewards.dim() == 2 else rewards.unsqueeze(0)
    mean = grouped.mean(dim=1, keepdim=True)
    group_std = _std(grouped, dim=1)
    if scale == "group":
        advantages = (grouped - mean) / (group_std.unsqueeze(1) + eps)
    elif scale == "batch":
        advantages = (grouped - mean) / (_std(grouped) + eps)
    elif scale == "none":
        advantages = grouped - mean
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', not {scale!r}")
    # torch.isclose(std, 0): TRL's test for a zero-variance group (atol 1e-8).
    zero_variance = torch.isclose(group_std, torch.zeros_like(group_std))
    if rewards.dim() == 1:
        return advantages.squeeze(0), zero_variance.squeeze(0)
    return advantages, zero_variance


def ragged_group_advantages(
    rewards: Sequence[Sequence[float]], *, scale: AdvantageScale = "group", eps: float = 1e-4
) -> tuple[list[torch.Tensor], list[bool]]:
    """:func:`group_advantages` (in float64) of groups that may differ in size: per group its
    advantages and whether its rewards were all equal. "batch" divides by the std of every
    reward of every group, as for equal sizes."""
    if len({len(r) for r in rewards}) == 1:
        adv, zero = group_advantages(
            torch.tensor(rewards, dtype=torch.float64), scale=scale, eps=eps
        )
        return list(adv), zero.tolist()
    tensors = [torch.tensor(r, dtype=torch.float64) for r in rewards]
    advs, zeros = [], []
    batch_std = torch.cat(tensors).std() if scale == "batch" else None
    for r in tensors:
        adv, zero = group_advantages(r, scale="group" if scale == "group" else "none", eps=eps)
        if batch_std is not None:
            adv = adv / (batch_std + eps)
        advs.append(adv)
        zeros.append(bool(zero))
    return advs, zeros


def microbatch_weight(
    loss_type: LossType, rows: int, tokens: int, total_rows: int, total_tokens: int
) -> float:
    """The factor that turns ``grpo_loss`` of a micro-batch (``rows`` completions, ``tokens``
    real tokens) into its share of the loss of the whole minibatch, so that accumulated
    gradients equal one pass: tokens/total for "token_mean", rows/total for "sequence_mean"
    and "dr_grpo" (the latter with the minibatch's ``max_completion_length``)."""
    kind = _LOSS_ALIASES.get(loss_type)
    if kind is None:
        raise ValueError(f"unknown loss_type {loss_type!r}: one of {sorted(_LOSS_ALIASES)}")
    return tokens / total_tokens if kind == "token_mean" else rows / total_rows


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: LossType = "token_mean",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate (to minimise). Shapes: log-probs and mask [B, T]; advantages [B]
    (one per completion) or [B, T].

        ρ_t   = exp(logp_t − old_logp_t)
        ℓ_t   = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β KL_t
        KL_t  = exp(ref_t − logp_t) − (ref_t − logp_t) − 1          (k3 estimator; β > 0 only)

    aggregated over real tokens (m = mask):
        "token_mean" ("dapo"):      Σ_i,t m ℓ / Σ_i,t m                      (DAPO)
        "sequence_mean" ("grpo"):   mean_i ( Σ_t m ℓ / Σ_t m )               (GRPO)
        "dr_grpo":                  Σ_i,t m ℓ / (B · max_completion_length)  (Dr. GRPO constant)

    ``max_completion_length`` defaults to T. TRL's "dapo" divides by the real tokens of the whole
    generation batch (``num_items_in_batch``): the same as "token_mean" when the batch is one
    minibatch. Returns (loss, metrics): ``clip_low`` / ``clip_high``
    (share of tokens whose gradient the clip removed: ρ < 1 − ε_low with A < 0, ρ > 1 + ε_high
    with A > 0), ``ratio_mean``, and ``kl`` (mean k3 estimate; 0 without a reference).
    """
    kind = _LOSS_ALIASES.get(loss_type)
    if kind is None:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; expected one of {sorted(_LOSS_ALIASES)}"
        )
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    mask = torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages

    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl

    tokens = mask.sum().clamp(min=1.0)
    if kind == "token_mean":
        loss = (per_token * mask).sum() / tokens
    elif kind == "sequence_mean":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        length = max_completion_length if max_completion_length is not None else logprobs.shape[1]
        loss = (per_token * mask).sum() / (logprobs.shape[0] * length)

    with torch.no_grad():

        def masked_mean(x: torch.Tensor) -> float:
            return float((x.to(mask.dtype) * mask).sum() / tokens)

        metrics = {
            "clip_low": masked_mean((ratio < 1 - eps_low) & (adv < 0)),
            "clip_high": masked_mean((ratio > 1 + eps_high) & (adv > 0)),
            "ratio_mean": masked_mean(ratio),
            "kl": masked_mean(kl) if kl is not None else 0.0,
        }
    return loss, metrics
