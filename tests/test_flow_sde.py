"""The Flow-GRPO SDE step and the traced sampler, checked against independent computations:
float64 Gaussian densities from the standard library, diffusers' own Euler step, and the
pipeline's own ``__call__``."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from nodes.backends.flow import sde  # noqa: E402
from nodes.backends.flow.sampler import (  # noqa: E402
    FlowSampler,
    SampleJob,
    SD3Flow,
    SDEConfig,
    unpack_latents,
)

pytest_plugins = ("tests.tiny_models",)


def reference_step(x, v, sigma, sigma_next, a, cap):
    """Flow-GRPO eq. 9 in float64, written in its drift form
    dx = [v + s²/(2σ) (x + (1 − σ) v)] dt + s dw (not the rearranged form the code uses)."""
    x, v = np.asarray(x, np.float64), np.asarray(v, np.float64)
    s = a * math.sqrt(sigma / (1 - min(sigma, cap)))
    dt = sigma_next - sigma
    drift = v + s * s / (2 * sigma) * (x + (1 - sigma) * v)
    return x + drift * dt, s * math.sqrt(-dt)


def reference_logprob(x_next, mean, std) -> float:
    """Mean over elements of log N(x'; μ, std²), from the standard library's NormalDist."""
    values = [
        math.log(NormalDist(float(m), std).pdf(float(x)))
        for x, m in zip(np.ravel(x_next), np.ravel(mean), strict=True)
    ]
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("sigma", "sigma_next", "level"), [(1.0, 0.9, 0.7), (0.75, 0.5, 0.7), (0.3, 0.0, 1.2)]
)
def test_sde_step_logprob_equals_an_independent_float64_computation(sigma, sigma_next, level):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    v = torch.randn(2, 4, 3, 3, generator=gen)
    step = sde.sde_step(x, v, sigma, sigma_next, noise_level=level, sigma_cap=0.95, generator=gen)
    for row in range(2):
        mean, std = reference_step(x[row], v[row], sigma, sigma_next, level, 0.95)
        assert np.allclose(step.mean[row].numpy(), mean, atol=1e-5)
        assert float(step.std) == pytest.approx(std, rel=1e-6)
        expected = reference_logprob(step.next_latents[row].numpy(), mean, std)
        assert float(step.logprob[row]) == pytest.approx(expected, abs=1e-5)
    # The same transition scored again (what training does) gives the same log-prob.
    again, _, _ = sde.transition_logprob(
        x, step.next_latents, v, sigma, sigma_next, noise_level=level, sigma_cap=0.95
    )
    assert torch.allclose(again, step.logprob, atol=1e-6)


def test_zero_noise_is_diffusers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, generator=gen)
    index = 2
    expected = scheduler.step(v, scheduler.timesteps[index], x, return_dict=False)[0]
    sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    assert torch.allclose(sde.ode_step(x, v, sigma, sigma_next), expected, atol=1e-6)
    mean, _ = sde.sde_mean_std(x, v, sigma, sigma_next, noise_level=0.0, sigma_cap=0.99)
    assert torch.allclose(mean, expected, atol=1e-6)


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3):
    from nodes.backends.engines.flow_image import load_pipeline

    torch.set_num_threads(1)
    return load_pipeline(tiny_sd3)


def test_deterministic_sampler_reproduces_the_pipeline(sd3_pipe):
    """With no stochastic step the traced loop is the pipeline's own sampling, image for image."""
    sampler = FlowSampler(SD3Flow(sd3_pipe, "tiny-sd3"), SDEConfig(count=0))
    traced = sampler.sample(
        [SampleJob("a red circle", 7)], width=32, height=32, steps=4, guidance_scale=3.0
    )[0]
    assert traced.transitions == ()
    expected = sd3_pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    diff = np.abs(np.asarray(traced.image, np.int16) - np.asarray(expected, np.int16))
    assert diff.max() <= 1


def test_recorded_logprob_matches_float64_recomputation_with_cfg(sd3_pipe):
    """The sampler's recorded log-prob equals the float64 density of its recorded transition,
    with the velocity rebuilt by separate conditional and unconditional transformer calls."""
    sampler = FlowSampler(SD3Flow(sd3_pipe, "tiny-sd3"), SDEConfig(window=(0, 3), count=2))
    jobs = [SampleJob("a red circle", 3), SampleJob("two blue squares", 4)]
    traced = sampler.sample(jobs, width=32, height=32, steps=4, guidance_scale=3.0)
    for job, image in zip(jobs, traced, strict=True):
        assert len(image.transitions) == 2
        assert all(0 <= t.step_index < 3 for t in image.transitions)
        for t in image.transitions:
            x, x_next = unpack_latents(t.latents)
            embeds, neg, pooled, neg_pooled = sd3_pipe.encode_prompt(
                job.prompt, None, None, negative_prompt="", do_classifier_free_guidance=True
            )
            with torch.no_grad():
                call = sd3_pipe.transformer
                ts = torch.tensor([t.timestep])
                cond, uncond = (
                    call(
                        hidden_states=x[None],
                        timestep=ts,
                        encoder_hidden_states=e,
                        pooled_projections=p,
                        return_dict=False,
                    )[0]
                    for e, p in ((embeds, pooled), (neg, neg_pooled))
                )
            v = (uncond + 3.0 * (cond - uncond))[0].numpy()
            mean, std = reference_step(x.numpy(), v, t.sigma, t.sigma_next, 0.7, t.sigma_cap)
            expected = reference_logprob(x_next.numpy(), mean, std)
            assert t.logprob == pytest.approx(expected, abs=1e-4)
            assert t.guidance_scale == 3.0 and t.seed == job.seed and t.prompt == job.prompt


def test_images_are_seeded_per_image_not_per_batch(sd3_pipe):
    sampler = FlowSampler(SD3Flow(sd3_pipe, "tiny-sd3"))
    batch = sampler.sample(
        [SampleJob("a star", 1), SampleJob("a star", 2)], width=32, height=32, steps=4,
        guidance_scale=3.0,
    )  # fmt: skip
    alone = sampler.sample(
        [SampleJob("a star", 2)], width=32, height=32, steps=4, guidance_scale=3.0
    )
    assert alone[0].image.tobytes() == batch[1].image.tobytes()
    # Same noise; the latents agree to float rounding (batch size changes the matmul order).
    for a, b in zip(alone[0].transitions, batch[1].transitions, strict=True):
        assert a.step_index == b.step_index
        for x, y in zip(unpack_latents(a.latents), unpack_latents(b.latents), strict=True):
            assert torch.allclose(x, y, atol=1e-5)
    assert batch[0].image.tobytes() != batch[1].image.tobytes()
    # R3's default: one stochastic step, in the high-noise window.
    assert [len(b.transitions) for b in batch] == [1, 1]
    assert all(b.transitions[0].step_index in (0, 1) for b in batch)


def test_a_batch_may_mix_transitions_sampled_with_different_noise_levels(sd3_pipe):
    model = SD3Flow(sd3_pipe, "tiny-sd3")
    mixed = []
    for level in (0.5, 1.0):
        sampler = FlowSampler(model, SDEConfig(noise_level=level))
        traced = sampler.sample(
            [SampleJob("a star", 9)], width=32, height=32, steps=6, guidance_scale=2.0
        )
        mixed += traced[0].transitions
    assert [t.noise_level for t in mixed] == [0.5, 1.0]
    with torch.no_grad():
        again = FlowSampler(model).recompute(mixed).logprob
    assert torch.allclose(again, torch.tensor([t.logprob for t in mixed]), atol=1e-5)
