"""The record of one stochastic denoising step of a traced flow-matching sample (Flow-GRPO).

A :class:`DiffusionTransition` is one *stochastic* denoising step ``x_σ → x_σ'`` with the
log-prob the sampler gave it; the latents travel as safetensors bytes (``latents`` holds the
two tensors ``"latents"`` and ``"next_latents"``), which the store keeps as a content-addressed
blob, never JSON. Everything needed to recompute the step's log-prob under another policy is
here: the prompt (and negative prompt) for the conditioning, the guidance scale as sampled, the
timestep and sigmas, the noise level and the sigma cap of the SDE.

It lives in ``storage`` (the lowest package) because the store reads and writes it; the traced
samplers in ``nodes.backends.flow`` produce it.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENTS_KEY = "latents"
NEXT_LATENTS_KEY = "next_latents"


@dataclass(frozen=True)
class DiffusionTransition:
    step_index: int
    """Index of the step in the denoising loop (0 = the noisiest)."""
    num_steps: int
    timestep: float
    """The transformer's timestep input (σ · num_train_timesteps for SD3/Flux)."""
    sigma: float
    sigma_next: float
    sigma_cap: float
    """The SDE's cap on σ in ``σ / (1 − σ)`` (see :mod:`nodes.backends.flow.sde`)."""
    noise_level: float
    logprob: float
    """Sampling-time log π(x' | x): mean over latent elements (Flow-GRPO's convention)."""
    latents: bytes
    """safetensors bytes with ``latents`` (x_σ) and ``next_latents`` (x_σ'), float32."""
    prompt: str
    negative_prompt: str
    guidance_scale: float
    seed: int
    width: int
    height: int
    model: str
    """The pipeline's name (its model id)."""
    lora: str | None = None
    """Name/version of the diffusion LoRA active when sampling (None: the base weights)."""
    kind: str = "generate"
    """``generate`` (text to image) or ``edit``."""
    strength: float = 1.0
    """For edits: the share of the schedule that was run (1.0 for generation)."""
