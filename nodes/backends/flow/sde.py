"""One denoising step of a rectified-flow model, deterministic (ODE) or stochastic (SDE).

Rectified flow interpolates data and noise, ``x_σ = (1 − σ) x_0 + σ ε``, and the model predicts
the velocity ``v = ε − x_0``. Sampling walks σ down the scheduler's grid, ``dt = σ' − σ < 0``.

ODE (what diffusers' ``FlowMatchEulerDiscreteScheduler.step`` does)::

    x' = x + v dt

SDE (Flow-GRPO, Liu et al. 2025, eq. 9; same marginals as the ODE, but every step is a Gaussian
``π(x' | x)`` whose log-density the policy gradient needs)::

    s_σ  = a √(σ / (1 − σ))                                  a: the noise level ("eta")
    μ    = x (1 + s_σ² / (2σ) · dt) + v (1 + s_σ² (1 − σ) / (2σ)) · dt
    x'   = μ + s_σ √(−dt) · z,          z ~ N(0, I)
    log π(x' | x) = mean over elements of −(x' − μ)² / (2 std²) − log std − ½ log 2π,
                    std = s_σ √(−dt)

At σ = 1 (the first step of a full schedule) ``σ / (1 − σ)`` is infinite; as Flow-GRPO does, the
denominator then uses ``sigma_cap`` (the schedule's next-largest sigma) instead.

The log-density is the *mean* over latent elements, not the sum: Flow-GRPO's convention, which
keeps importance ratios of high-dimensional latents in a range a clip of ±0.2 means anything
for (``numel`` × it is the exact joint log-density). With a = 0 the SDE step is the ODE step.

Everything is computed in float32 at least (bf16 overflows in ``μ`` for real models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class SDEStep:
    """One stochastic step: the sampled next latent, its Gaussian's mean and std, and the
    log-density of ``next_latents`` (shape ``[B]``: the mean over each sample's elements)."""

    next_latents: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    logprob: torch.Tensor


def _as_batch(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar (float, [B] or [B,1,...]) shaped to broadcast against ``like``."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if tensor.dim() == 0:
        return tensor
    return tensor.reshape(-1, *([1] * (like.dim() - 1)))


def _up(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def ode_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
) -> torch.Tensor:
    """The deterministic Euler step ``x + v (σ' − σ)``."""
    x = _up(latents)
    dt = _as_batch(sigma_next, x) - _as_batch(sigma, x)
    return x + _up(velocity) * dt


def sde_std(
    sigma: torch.Tensor | float,
    noise_level: torch.Tensor | float,
    sigma_cap: torch.Tensor | float,
) -> torch.Tensor:
    """``s_σ = a √(σ / (1 − min(σ, sigma_cap)))`` (the diffusion coefficient, before √−dt).
    Each argument is a float or a tensor broadcastable against the others (per-sample values)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    cap = torch.as_tensor(sigma_cap, dtype=torch.float32, device=sigma.device)
    level = torch.as_tensor(noise_level, dtype=torch.float32, device=sigma.device)
    return level * torch.sqrt(sigma / (1 - torch.minimum(sigma, cap)))


def sde_mean_std(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: torch.Tensor | float,
    sigma_cap: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``μ`` and std ``s_σ √(−dt)`` of ``π(x' | x)`` (std shaped to broadcast)."""
    x, v = _up(latents), _up(velocity)
    s = _as_batch(sigma, x)
    dt = _as_batch(sigma_next, x) - s
    level, cap = _as_batch(noise_level, x), _as_batch(sigma_cap, x)
    s_sigma = sde_std(s, level, cap).to(x.device)
    var = s_sigma**2
    mean = x * (1 + var / (2 * s) * dt) + v * (1 + var * (1 - s) / (2 * s)) * dt
    return mean, s_sigma * torch.sqrt(-dt)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over elements of ``log N(x; mean, std²)`` (shape ``[B]``)."""
    x = _up(x)
    density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return density.reshape(density.shape[0], -1).mean(dim=1)


def sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: float,
    sigma_cap: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Sample ``x' ~ π(· | x)`` (``noise`` given, or drawn from ``generator``) and report it with
    its mean, std and log-density."""
    mean, std = sde_mean_std(
        latents, velocity, sigma, sigma_next, noise_level=noise_level, sigma_cap=sigma_cap
    )
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu").to(
            mean.device
        )
    next_latents = mean + std * _up(noise)
    return SDEStep(next_latents, mean, std, gaussian_logprob(next_latents, mean, std))


def transition_logprob(
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: torch.Tensor | float,
    sigma_cap: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π(x' | x), μ, std) of a given transition under the velocity ``v`` — what training
    recomputes under the current policy (differentiable in ``velocity``)."""
    mean, std = sde_mean_std(
        latents, velocity, sigma, sigma_next, noise_level=noise_level, sigma_cap=sigma_cap
    )
    return gaussian_logprob(next_latents, mean, std), mean, std
