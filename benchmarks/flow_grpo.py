"""Flow-GRPO training cost: seconds per optimizer step and peak memory.

    PYTHONPATH=. python benchmarks/flow_grpo.py [--config tiny] [--family sd3|flux] [--device cpu]
                                               [--batch 8,16] [--size 32] [--rank 8] [--repeats 5]
    PYTHONPATH=. python benchmarks/flow_grpo.py --config sd3-medium --device cuda \\
                                               --dtype bfloat16 --size 512 --batch 1,4 --rank 32

One optimizer step = recompute the log-probs of ``batch`` stored transitions under base + LoRA
(SD3: one transformer call with CFG, 2 × batch rows; Flux: batch rows, the guidance as an
embedding), the reference means with the LoRA disabled (another, no grad), the loss, backward,
AdamW — ``FlowGRPOTrainer._step`` as ``train`` runs it.

``tiny``: the test suite's tiny SD3 pipeline, or with ``--family flux`` its tiny Flux pipeline
(32×32 images, their real text encoders), the transitions sampled by the traced sampler.
``sd3-medium``: an SD3-medium-sized transformer (24 layers, hidden 1536, 16 latent channels; random
weights, built from its config) with synthetic prompt embeddings of SD3's shapes (the text encoders
are frozen and cached during training, so they are not part of a step); transitions are random
latents at the schedule's first sigmas. CPU peak memory is the process's peak RSS (``ru_maxrss``,
imports included), with the RSS before training for reference; on CUDA
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nodes.backends.flow.sampler import Conditioning, SampleJob
from training.images.groups import ImageGroup, ImageMember
from training.images.trainer import FlowGRPOConfig, FlowGRPOTrainer

SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}


class SyntheticSD3:
    """The parts of an SD3 pipeline the trainer touches, with random prompt embeddings of SD3's
    shapes (77 CLIP + 256 T5 tokens, width 4096; pooled 2048) instead of text encoders."""

    def __init__(self, transformer: Any, device: str) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.vae_scale_factor = 8
        self.device = device

    def encode_prompt(self, prompt: str, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(abs(hash(prompt)) % 2**31)
        dtype = self.transformer.dtype
        embeds = [torch.randn(1, 333, 4096, generator=gen) for _ in range(2)]
        pooled = [torch.randn(1, 2048, generator=gen) for _ in range(2)]
        e, n, p, q = (t.to(self.device, dtype) for t in (*embeds, *pooled))
        return e, n, p, q


StableDiffusion3Synthetic = type("StableDiffusion3Synthetic", (SyntheticSD3,), {})
"""Named like the family so ``flow_model`` picks the SD3 adapter."""


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_setup(
    size: int, batch: int, rank: int, family: str = "sd3"
) -> tuple[FlowGRPOTrainer, list[Any]]:
    from nodes.backends.engines.flow_image import load_pipeline
    from nodes.backends.engines.tiny_models import build_flux, build_sd3
    from nodes.backends.flow.sampler import FlowSampler, SDEConfig

    build = build_flux if family == "flux" else build_sd3
    directory = Path(tempfile.mkdtemp(prefix="flow-bench-")) / family
    pipe = load_pipeline(build(directory))
    config = FlowGRPOConfig(r=rank, alpha=2 * rank)
    trainer = FlowGRPOTrainer(pipe, config, model=f"tiny-{family}")
    sampler = FlowSampler(trainer.sampler.model, SDEConfig(window=(0, 3), count=1))
    traced = sampler.sample(
        [SampleJob(f"prompt {i % 4}", i) for i in range(batch)],
        width=size,
        height=size,
        steps=4,
        guidance_scale=3.0,
    )
    return trainer, [t for image in traced for t in image.transitions]


def synthetic_setup(
    size: int, batch: int, rank: int, device: str, dtype: torch.dtype, layers: int | None = None
) -> tuple[FlowGRPOTrainer, list[Any]]:
    from diffusers import SD3Transformer2DModel

    from nodes.backends.flow.sampler import pack_latents
    from nodes.backends.flow.transitions import DiffusionTransition

    config = dict(SD3_MEDIUM, num_layers=layers or SD3_MEDIUM["num_layers"])
    transformer = SD3Transformer2DModel(**config).to(device, dtype)
    pipe = StableDiffusion3Synthetic(transformer, device)
    trainer = FlowGRPOTrainer(pipe, FlowGRPOConfig(r=rank, alpha=2 * rank), model="sd3-medium")
    model = trainer.sampler.model
    model.encode = lambda prompt, negative: Conditioning(*_split(pipe.encode_prompt(prompt)))
    shape = model.latent_shape(size, size)
    timesteps, sigmas = model.schedule(28, shape)
    transitions = []
    for i in range(batch):
        x = torch.randn(shape)
        transitions.append(
            DiffusionTransition(
                step_index=1, num_steps=28, timestep=float(timesteps[1]), sigma=float(sigmas[1]),
                sigma_next=float(sigmas[2]), sigma_cap=float(sigmas[1]), noise_level=0.7,
                logprob=0.0, latents=pack_latents(x, x * 0.99), prompt=f"prompt {i % 4}",
                negative_prompt="", guidance_scale=4.5, seed=i, width=size, height=size,
                model="sd3-medium",
            )
        )  # fmt: skip
    return trainer, transitions


def _split(out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    embeds, negative, pooled, negative_pooled = out
    return embeds, pooled, negative, negative_pooled


def measure(trainer: FlowGRPOTrainer, transitions: list[Any], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` optimizer steps on one minibatch of ``transitions``."""
    members = [
        ImageMember(f"t{i}", 1, (t,), reward=float(i % 2)) for i, t in enumerate(transitions)
    ]
    group = ImageGroup("bench", "prompt", tuple(members))
    trainer.config.minibatch_size = len(transitions)
    times = []
    for _ in range(repeats + 1):  # the first step warms up (allocations, kernels)
        started = time.perf_counter()
        trainer.train([group])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("tiny", "sd3-medium"), default="tiny")
    parser.add_argument(
        "--family", choices=("sd3", "flux"), default="sd3", help="tiny: which tiny pipeline"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", default="8,16", help="transitions per step, comma-separated")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--layers", type=int, default=None, help="sd3-medium: fewer layers (a quick CPU check)"
    )
    args = parser.parse_args()
    if args.family != "sd3" and args.config != "tiny":
        raise SystemExit("--family flux: only with --config tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    label = args.config if args.layers is None else f"{args.config} ({args.layers} layers)"
    if args.config == "tiny":
        label = f"tiny {args.family}"
    print(
        "| config | device | dtype | image | LoRA rank | transitions/step | s/step | peak memory |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        if batch < 2:
            raise SystemExit("--batch: at least 2 transitions (a group needs reward variance)")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        before = rss_mb()
        if args.config == "tiny":
            trainer, transitions = tiny_setup(args.size, batch, args.rank, args.family)
        else:
            trainer, transitions = synthetic_setup(
                args.size, batch, args.rank, args.device, dtype, args.layers
            )
        times = measure(trainer, transitions[:batch], args.repeats)
        if args.device.startswith("cuda"):
            memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA)"
        else:
            memory = f"{peak_rss_mb():.0f} MB RSS (before: {before:.0f} MB)"
        print(
            f"| {label} | {args.device} | {args.dtype} | {args.size}×{args.size} | "
            f"{args.rank} | {batch} | {statistics.median(times):.3f} "
            f"(min {min(times):.3f}) | {memory} |"
        )


if __name__ == "__main__":
    main()
