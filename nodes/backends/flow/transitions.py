"""What a traced flow-matching sample records, for training (Flow-GRPO) — torch-free.

A :class:`DiffusionTransition` is one *stochastic* denoising step ``x_σ → x_σ'`` with the
log-prob the sampler gave it; the latents travel as safetensors bytes (``latents`` holds the
two tensors ``"latents"`` and ``"next_latents"``), which the store keeps as a content-addressed
blob, never JSON. Everything needed to recompute the step's log-prob under another policy is
here: the prompt (and negative prompt) for the conditioning, the guidance scale as sampled, the
timestep and sigmas, the noise level and the sigma cap of the SDE.
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


@dataclass(frozen=True)
class TracedImage:
    """An image with the stochastic transitions that produced it."""

    image: object
    """A PIL image."""
    transitions: tuple[DiffusionTransition, ...]


def transition_to_json(transition: DiffusionTransition) -> dict[str, object]:
    """The wire form (the image server's ``return_transitions``): the fields, with the latents
    as base64 safetensors bytes under ``latents_b64``."""
    import base64
    from dataclasses import asdict

    data = asdict(transition)
    data["latents_b64"] = base64.b64encode(data.pop("latents")).decode("ascii")
    return data


def transition_from_json(data: dict[str, object]) -> DiffusionTransition:
    import base64
    from dataclasses import fields

    names = {f.name for f in fields(DiffusionTransition)} - {"latents"}
    latents = base64.b64decode(str(data["latents_b64"]), validate=True)
    return DiffusionTransition(latents=latents, **{k: data[k] for k in names if k in data})  # type: ignore[arg-type]
