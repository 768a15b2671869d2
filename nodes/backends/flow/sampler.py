"""Traced flow-matching sampling from a diffusers pipeline's components, and the log-prob of a
stored transition under the current weights.

The sampler does not call the pipeline's ``__call__``: it runs the same three phases from the
pipeline's parts so it can swap in the SDE step — encode the prompt (the pipeline's own
``encode_prompt``), a denoising loop over the scheduler's own sigmas/timesteps with the family's
guidance, and the VAE decode. What differs between model families (how the transformer is
called and guided, how latents are laid out) sits behind :class:`FlowModel`; :class:`SD3Flow`
implements it for ``StableDiffusion3Pipeline`` (and its img2img variant, same components) with
classifier-free guidance, :class:`~nodes.backends.flow.flux.FluxFlow` for ``FluxPipeline``
(packed latents, the distilled guidance embedding, text/image ids). The sampler keeps latents in
the VAE's layout ``[C, h, w]`` for every family; an adapter that packs them does so inside
``velocity``.

Stochastic window (R3 trains with one stochastic high-noise step per image; Flow-GRPO-Fast does
the same): of the steps in ``[window[0], window[1])`` — counted from the first step actually
run — ``count`` are chosen by a RNG seeded from the image's seed; those take the SDE step and
are recorded; every other step is the deterministic ODE step.

Randomness is per image: one ``torch.Generator`` seeded with the image's seed draws its initial
noise and then its SDE noise, so an image does not depend on what it was batched with.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from nodes.backends.abandon import raise_if_abandoned
from nodes.backends.flow import sde
from nodes.backends.flow.transitions import (
    LATENTS_KEY,
    NEXT_LATENTS_KEY,
    DiffusionTransition,
    TracedImage,
)


@dataclass(frozen=True)
class SDEConfig:
    """Which steps are stochastic, and how noisy."""

    noise_level: float = 0.7
    """Flow-GRPO's ``a`` in ``s_σ = a √(σ / (1 − σ))`` (the paper's default 0.7)."""
    window: tuple[int, int] = (0, 2)
    """Steps eligible to be stochastic, ``[start, end)``, counted from the first step run: the
    high-noise end of the schedule by default."""
    count: int = 1
    """How many steps of the window are stochastic (R3: one per image)."""

    def stochastic_steps(self, seed: int, num_run: int) -> frozenset[int]:
        start, end = max(0, self.window[0]), min(self.window[1], num_run)
        eligible = list(range(start, end))
        if self.count <= 0 or not eligible:
            return frozenset()
        rng = random.Random(f"sde-window:{seed}")
        return frozenset(rng.sample(eligible, min(self.count, len(eligible))))


@dataclass
class Conditioning:
    """Prompt embeddings of a batch: conditional and (for CFG) unconditional."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor
    negative_pooled: torch.Tensor

    @staticmethod
    def stack(items: Sequence[Conditioning]) -> Conditioning:
        return Conditioning(
            *(torch.cat([getattr(c, name) for c in items]) for name in _COND_FIELDS)
        )


_COND_FIELDS = ("embeds", "pooled", "negative_embeds", "negative_pooled")

CONDITIONING_CACHE_BYTES = 512 << 20
"""Prompt embeddings kept per sampler (least recently used first out)."""


class FlowModel(Protocol):
    """What the sampler needs from a model family."""

    name: str
    transformer: Any

    def encode(self, prompt: str, negative_prompt: str) -> Conditioning: ...

    def velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        """The velocity to step with, for latents ``[B, *latent_shape]``, the scheduler's
        timesteps ``[B]`` and the guidance scales ``[B]``, applied the family's way (CFG for SD3,
        the guidance embedding for guidance-distilled Flux)."""
        ...

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]: ...

    def size_multiple(self) -> int: ...

    def schedule(
        self, steps: int, latent_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [steps], sigmas [steps + 1]) from the pipeline's scheduler."""
        ...

    def decode(self, latents: torch.Tensor) -> list[Image.Image]: ...

    def encode_image(
        self, images: Sequence[Image.Image], width: int, height: int
    ) -> torch.Tensor: ...


class SD3Flow:
    """:class:`FlowModel` for Stable Diffusion 3 / 3.5 pipeline components."""

    def __init__(self, pipe: Any, name: str = "sd3") -> None:
        self.pipe = pipe
        self.name = name
        self.transformer = pipe.transformer
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=True,
            device=self.device,
        )
        return Conditioning(embeds, pooled, negative, negative_pooled)

    def velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        # One transformer call for both halves, as the pipeline does for CFG.
        out = self.transformer(
            hidden_states=torch.cat([latents, latents]).to(self.dtype),
            timestep=torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([cond.negative_embeds, cond.embeds]),
            pooled_projections=torch.cat([cond.negative_pooled, cond.pooled]),
            return_dict=False,
        )[0]
        uncond, conditional = out.chunk(2)
        return guided(conditional, uncond, guidance)

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor
        channels = self.transformer.config.in_channels
        return (channels, height // factor, width // factor)

    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * int(self.transformer.config.patch_size)

    def schedule(
        self, steps: int, latent_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        scheduler = self.pipe.scheduler
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", False):  # SD3.5-style resolution shift
            patch = self.transformer.config.patch_size
            seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device="cpu", **kwargs)
        return scheduler.timesteps.float().clone(), scheduler.sigmas.float().clone()

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return vae_decode(self.pipe, latents)

    def encode_image(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        return vae_encode(self.pipe, images, width, height, self.device)


@torch.no_grad()
def vae_decode(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Images of latents in the VAE's layout (SD3 and Flux scale and shift them alike)."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")


@torch.no_grad()
def vae_encode(
    pipe: Any, images: Sequence[Image.Image], width: int, height: int, device: Any
) -> torch.Tensor:
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(
        [img.convert("RGB") for img in images], height=height, width=width
    ).to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean  # the mode: no randomness outside seeds
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()


def guided(conditional: torch.Tensor, uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``u + g (c − u)``; rows with ``g ≤ 1`` use ``c`` alone (the
    pipelines switch CFG off there)."""
    g = guidance.reshape(-1, *([1] * (conditional.dim() - 1))).to(conditional.dtype)
    mixed = uncond + g * (conditional - uncond)
    return torch.where(g > 1, mixed, conditional)


def pack_latents(latents: torch.Tensor, next_latents: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save(
        {
            LATENTS_KEY: latents.detach().float().cpu().contiguous(),
            NEXT_LATENTS_KEY: next_latents.detach().float().cpu().contiguous(),
        }
    )


def unpack_latents(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load

    tensors = load(data)
    return tensors[LATENTS_KEY], tensors[NEXT_LATENTS_KEY]


@dataclass(frozen=True)
class SampleJob:
    prompt: str
    seed: int
    image: Image.Image | None = None
    """The image to edit (img2img); None to generate from noise."""


@dataclass
class Recomputed:
    logprob: torch.Tensor
    """[B] log π(x' | x) under the current weights (differentiable)."""
    mean: torch.Tensor
    std: torch.Tensor


class FlowSampler:
    """Traced sampling and log-prob recomputation for one :class:`FlowModel`."""

    def __init__(self, model: FlowModel, sde_config: SDEConfig | None = None) -> None:
        self.model = model
        self.sde = sde_config or SDEConfig()
        self.lora: str | None = None
        """The active diffusion LoRA's name, recorded with each transition."""
        self._cond_cache: OrderedDict[tuple[str, str], tuple[Conditioning, int]] = OrderedDict()
        self._cond_bytes = 0

    def conditioning(self, prompt: str, negative_prompt: str) -> Conditioning:
        """The prompt's embeddings, from a least-recently-used cache bounded in bytes (the text
        encoders are frozen, so an entry stays valid): at real Flux/SD3 sizes one prompt's T5
        embeddings are megabytes, so a cache bounded by count could hold gigabytes."""
        key = (prompt, negative_prompt)
        found = self._cond_cache.get(key)
        if found is not None:
            self._cond_cache.move_to_end(key)
            return found[0]
        conditioning = self.model.encode(prompt, negative_prompt)
        size = sum(
            getattr(conditioning, name).numel() * getattr(conditioning, name).element_size()
            for name in _COND_FIELDS
        )
        self._cond_cache[key] = (conditioning, size)
        self._cond_bytes += size
        while self._cond_bytes > CONDITIONING_CACHE_BYTES and len(self._cond_cache) > 1:
            _, (_, evicted) = self._cond_cache.popitem(last=False)
            self._cond_bytes -= evicted
        return conditioning

    @torch.no_grad()
    def sample(
        self,
        jobs: Sequence[SampleJob],
        *,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        negative_prompt: str = "",
        strength: float = 1.0,
        sde_config: SDEConfig | None = None,
    ) -> list[TracedImage]:
        """Images for ``jobs`` (all generations, or all edits with ``strength``), each with its
        stochastic transitions. Sizes must be multiples of ``model.size_multiple()``.
        ``sde_config``: the stochastic steps of this call (None: the sampler's own ``sde``)."""
        model = self.model
        sde_config = sde_config or self.sde
        shape = model.latent_shape(width, height)
        generators = [torch.Generator("cpu").manual_seed(job.seed % 2**63) for job in jobs]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        timesteps, sigmas = model.schedule(steps, shape)
        edit = jobs[0].image is not None
        start = 0
        if edit:  # img2img: enter the schedule part-way, at σ_start, from the noised image
            start = min(steps - max(1, int(steps * strength)), steps - 1)
            clean = model.encode_image([job.image for job in jobs], width, height)  # type: ignore[misc]
            latents = sigmas[start] * noise + (1 - sigmas[start]) * clean
        else:
            latents = noise
        latents = latents.to(model.device)
        stochastic = [sde_config.stochastic_steps(job.seed, steps - start) for job in jobs]
        sigma_cap = float(sigmas[1]) if len(sigmas) > 1 else 1.0
        guidance = torch.full((len(jobs),), float(guidance_scale), device=model.device)
        cond = Conditioning.stack([self.conditioning(j.prompt, negative_prompt) for j in jobs])
        transitions: list[list[DiffusionTransition]] = [[] for _ in jobs]
        for index in range(start, steps):
            raise_if_abandoned()  # a served batch whose callers all left stops here
            sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
            t = timesteps[index].expand(len(jobs)).to(model.device)
            velocity = model.velocity(latents, t, cond, guidance)
            next_latents = sde.ode_step(latents, velocity, sigma, sigma_next)
            for row, job in enumerate(jobs):
                if index - start not in stochastic[row]:
                    continue
                z = torch.randn(shape, generator=generators[row]).unsqueeze(0)
                step = sde.sde_step(
                    latents[row : row + 1],
                    velocity[row : row + 1],
                    sigma,
                    sigma_next,
                    noise_level=sde_config.noise_level,
                    sigma_cap=sigma_cap,
                    noise=z.to(model.device),
                )
                next_latents[row] = step.next_latents[0]
                transitions[row].append(
                    DiffusionTransition(
                        step_index=index,
                        num_steps=steps,
                        timestep=float(timesteps[index]),
                        sigma=sigma,
                        sigma_next=sigma_next,
                        sigma_cap=sigma_cap,
                        noise_level=sde_config.noise_level,
                        logprob=float(step.logprob[0]),
                        latents=pack_latents(latents[row], step.next_latents[0]),
                        prompt=job.prompt,
                        negative_prompt=negative_prompt,
                        guidance_scale=float(guidance_scale),
                        seed=job.seed,
                        width=width,
                        height=height,
                        model=model.name,
                        lora=self.lora,
                        kind="edit" if edit else "generate",
                        strength=strength if edit else 1.0,
                    )
                )
            latents = next_latents.to(latents.dtype)
        images = model.decode(latents)
        return [
            TracedImage(image, tuple(steps_of))
            for image, steps_of in zip(images, transitions, strict=True)
        ]

    def recompute(self, transitions: Sequence[DiffusionTransition]) -> Recomputed:
        """log π(x' | x) of stored transitions under the model's current weights, guided as
        sampled (same prompt, negative prompt, guidance scale); differentiable."""
        model = self.model
        pairs = [unpack_latents(t.latents) for t in transitions]
        latents = torch.stack([p[0] for p in pairs]).to(model.device)
        next_latents = torch.stack([p[1] for p in pairs]).to(model.device)
        cond = Conditioning.stack(
            [self.conditioning(t.prompt, t.negative_prompt) for t in transitions]
        )
        timesteps = torch.tensor([t.timestep for t in transitions], device=model.device)
        guidance = torch.tensor([t.guidance_scale for t in transitions], device=model.device)
        velocity = model.velocity(latents, timesteps, cond, guidance)
        sigma = torch.tensor([t.sigma for t in transitions])
        sigma_next = torch.tensor([t.sigma_next for t in transitions])
        # Per-transition noise level and cap: a batch may mix draws sampled with different SDEs.
        levels = torch.tensor([t.noise_level for t in transitions], device=model.device)
        caps = torch.tensor([t.sigma_cap for t in transitions], device=model.device)
        logprob, mean, std = sde.transition_logprob(
            latents,
            next_latents,
            velocity,
            sigma.to(model.device),
            sigma_next.to(model.device),
            noise_level=levels,
            sigma_cap=caps,
        )
        return Recomputed(logprob, mean, std)
