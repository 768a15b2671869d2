"""Flow-GRPO math (Liu et al. 2025): GRPO on the stochastic denoising steps of a flow model.

One "token" per stored transition ``x_σ → x_σ'`` of image i (a group is the G images of one
prompt, or of one stored start state in Tree-RL):

    A_i     = clip((r_i − mean_g r) / (std_g r + eps), −A_max, A_max)    the image's advantage
    ρ       = exp(log π_θ(x' | x) − log π_old(x' | x))                    log π: mean per element
    ℓ_clip  = −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A)
    KL      = mean over elements of (μ_θ − μ_ref)² / (2 std²)              (Gaussians, same std)
    loss    = mean over transitions of ℓ_clip + β KL

The KL is exact for two Gaussians that share the step's std (the SDE's std does not depend on
the weights), which is why Flow-GRPO uses it instead of the k3 estimator of text GRPO. Rewards
are the stage's (R3: V for the image the draw node made, C_j for a refine); the advantage and
the clipped surrogate are ``training.grpo``'s own functions.
"""

from __future__ import annotations

import torch

from training.grpo import AdvantageScale, group_advantages, grpo_loss


def flow_advantages(
    rewards: torch.Tensor,
    *,
    scale: AdvantageScale = "group",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of ``rewards`` ([G] or [B, G]), clipped to ``±clip`` as
    Flow-GRPO does (``adv_clip_max``). Returns ``(advantages, zero_variance)``."""
    advantages, zero_variance = group_advantages(rewards, scale=scale, eps=eps)
    return advantages.clamp(-clip, clip), zero_variance


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(μ, s²) ‖ N(μ_ref, s²)) = mean over elements of (μ − μ_ref)² / (2 s²)."""
    per_element = (mean - ref_mean) ** 2 / (2 * std**2)
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1)


def flow_grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise over a batch of B transitions (all shapes lead with [B]).

    ``clip_range`` defaults to Flow-GRPO's 1e-4: a per-element-mean log-prob moves little, so
    the ratio lives very near 1. With ``beta > 0``, ``mean``/``ref_mean``/``std`` give the KL.
    """
    surrogate, metrics = grpo_loss(
        logprobs.reshape(-1, 1),
        old_logprobs.reshape(-1, 1),
        advantages.reshape(-1),
        eps_low=clip_range,
        eps_high=clip_range,
        loss_type="token_mean",
    )
    kl_value = 0.0
    loss = surrogate
    if beta != 0.0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("beta > 0 needs mean, ref_mean and std")
        kl = gaussian_mean_kl(mean, ref_mean, std)
        loss = surrogate + beta * kl.mean()
        kl_value = float(kl.mean().detach())
    metrics = {**metrics, "kl": kl_value}
    return loss, metrics
