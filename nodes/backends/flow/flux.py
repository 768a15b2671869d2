""":class:`~nodes.backends.flow.sampler.FlowModel` for Flux (``FluxPipeline`` and
``FluxImg2ImgPipeline``: the same components), built the way diffusers' ``FluxPipeline.__call__``
builds its transformer inputs, from the pipeline's own helpers:

- prompt: the pipeline's ``encode_prompt`` — T5 hidden states (padded to
  ``max_sequence_length``) and CLIP's pooled output; the text ids are zeros, one row per token;
- latents: drawn and kept in the VAE's layout ``[16, h, w]`` (as ``prepare_latents`` draws its
  noise, so a seed gives the pipeline's image), packed into 2×2 patches (``_pack_latents``,
  ``[h/2 · w/2, 64]``) with their image ids (``_prepare_latent_image_ids``) for each transformer
  call and the output unpacked again (``_unpack_latents``). Packing is a permutation of the
  elements, so the SDE step and its per-element mean log-prob are the same in either layout;
- schedule: ``np.linspace(1, 1/steps, steps)`` sigmas, shifted with ``mu =
  calculate_shift(image tokens, ...)`` from the scheduler config (resolution-dependent shift);
- transformer: ``timestep = t / 1000`` and, when ``guidance_embeds`` is set (FLUX.1-dev), the
  guidance scale as the distilled guidance embedding. There is no classifier-free guidance: the
  pipeline's optional "true CFG" (a negative prompt with ``true_cfg_scale > 1``) is not traced,
  and the negative prompt is ignored, as the pipeline ignores it by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from nodes.backends.flow.sampler import Conditioning, vae_decode, vae_encode

FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")
"""Pipelines whose transformer takes only the packed noisy latents (Fill, Kontext and Control
variants concatenate conditioning latents, which this adapter does not build)."""


class FluxFlow:
    """:class:`~nodes.backends.flow.sampler.FlowModel` for Flux pipeline components."""

    def __init__(self, pipe: Any, name: str = "flux", max_sequence_length: int = 512) -> None:
        self.pipe = pipe
        self.name = name
        self.transformer = pipe.transformer
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.max_sequence_length = max_sequence_length
        """T5 tokens per prompt (the pipeline's default 512; FLUX.1-schnell uses 256)."""

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str) -> Conditioning:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        # Guidance-distilled: no negative branch. Empty tensors keep Conditioning.stack working.
        return Conditioning(embeds, pooled, embeds[:, :0], pooled[:, :0])

    def velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        pipe = self.pipe
        packed = pipe._pack_latents(latents.to(self.dtype), batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(
            batch, height // 2, width // 2, self.device, self.dtype
        )
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        embed_guidance = self.transformer.config.guidance_embeds
        out = self.transformer(
            hidden_states=packed,
            # The pipeline casts t to the latents' dtype before dividing: same rounding here.
            timestep=timesteps.to(self.device, self.dtype) / 1000,
            guidance=guidance.to(self.device, torch.float32) if embed_guidance else None,
            pooled_projections=cond.pooled.to(self.dtype),
            encoder_hidden_states=cond.embeds.to(self.dtype),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        factor = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, height * factor, width * factor, factor)

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        # prepare_latents: 2 · (size // (vae_scale_factor · 2)) — even, for the 2×2 packing.
        factor = int(self.pipe.vae_scale_factor) * 2
        channels = self.transformer.config.in_channels // 4
        return (channels, 2 * (height // factor), 2 * (width // factor))

    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * 2

    def schedule(
        self, steps: int, latent_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.pipe.scheduler
        sigmas: Any = np.linspace(1.0, 1 / steps, steps)
        if scheduler.config.get("use_flow_sigmas", False):  # the scheduler makes its own
            sigmas = None
        image_tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        mu = calculate_shift(
            image_tokens,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        return scheduler.timesteps.float().clone(), scheduler.sigmas.float().clone()

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return vae_decode(self.pipe, latents)

    def encode_image(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        return vae_encode(self.pipe, images, width, height, self.device)
