"""Flux in the traced Flow-GRPO sampler (tiny random-weight FLUX.1-dev-shaped pipeline, 32×32),
checked against independent references: ``FluxPipeline.__call__`` itself, the transformer called
by hand on latents packed by hand, and float64 Gaussian densities from the standard library."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from nodes.backends.base import EditRequest, ImageRequest  # noqa: E402
from nodes.backends.flow.sampler import FlowSampler, SampleJob, SDEConfig  # noqa: E402
from nodes.backends.flow.sampler import unpack_latents as unpack_transition  # noqa: E402
from tests.test_flow_sde import reference_logprob, reference_step  # noqa: E402

pytest_plugins = ("tests.tiny_models",)

SIZE, STEPS = 32, 4


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux):
    from nodes.backends.engines.flow_image import load_pipeline

    torch.set_num_threads(1)
    return load_pipeline(tiny_flux)


def flux_model(pipe):
    from nodes.backends.flow.flux import FluxFlow

    return FluxFlow(pipe, "tiny-flux")


def pixels(image) -> np.ndarray:
    return np.asarray(image, np.int16)


def test_deterministic_sampler_reproduces_the_flux_pipeline(flux_pipe):
    """With no stochastic step the traced loop is ``FluxPipeline``'s own sampling (packing, ids,
    shifted sigmas, t / 1000, guidance embedding), a batch of two seeds image for image."""
    sampler = FlowSampler(flux_model(flux_pipe), SDEConfig(count=0))
    prompts, seeds = ["a red circle", "two blue squares"], [7, 8]
    traced = sampler.sample(
        [SampleJob(p, s) for p, s in zip(prompts, seeds, strict=True)],
        width=SIZE, height=SIZE, steps=STEPS, guidance_scale=3.5,
    )  # fmt: skip
    assert all(t.transitions == () for t in traced)
    expected = flux_pipe(
        prompts,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images
    for image, reference in zip(traced, expected, strict=True):
        assert np.abs(pixels(image.image) - pixels(reference)).max() <= 1
    assert pixels(expected[0]).std() > 10  # a textured image, not a flat one that always matches
    # The guidance scale reaches the transformer (the distilled guidance embedding).
    other = sampler.sample(
        [SampleJob(prompts[0], 7)], width=SIZE, height=SIZE, steps=STEPS, guidance_scale=1.0
    )[0]
    assert np.abs(pixels(other.image) - pixels(traced[0].image)).max() > 1


def test_without_a_guidance_embedding_the_sampler_still_reproduces_the_pipeline(flux_pipe):
    """FLUX.1-schnell-style transformer (``guidance_embeds=False``): the guidance scale is not
    passed at all, as the pipeline does."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(1)
    config = {**flux_pipe.transformer.config, "guidance_embeds": False}
    transformer = FluxTransformer2DModel.from_config(config)
    pipe = FluxPipeline(**{**flux_pipe.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    sampler = FlowSampler(flux_model(pipe), SDEConfig(count=0))
    traced = sampler.sample(
        [SampleJob("a star", 2)], width=SIZE, height=SIZE, steps=2, guidance_scale=0.0
    )[0]
    expected = pipe(
        "a star", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=0.0,
        generator=torch.Generator().manual_seed(2),
    ).images[0]  # fmt: skip
    assert np.abs(pixels(traced.image) - pixels(expected)).max() <= 1


def pack_by_hand(x: torch.Tensor) -> torch.Tensor:
    """[C, h, w] → [h/2 · w/2, 4C]: 2×2 patches, row-major, channels then the patch's rows and
    columns (Flux's layout, written out independently of the pipeline's helper)."""
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape(h * w // 4, c * 4)


def test_recorded_logprob_is_the_density_of_the_packed_transition(flux_pipe):
    """The recorded log-prob equals the float64 density of the transition in Flux's packed
    layout, with the velocity from a hand-built transformer call (hand-packed latents, ids,
    t / 1000, guidance): the per-element mean is over the same elements in both layouts."""
    sampler = FlowSampler(flux_model(flux_pipe), SDEConfig(window=(0, 3), count=2))
    traced = sampler.sample(
        [SampleJob("a red circle", 3)], width=SIZE, height=SIZE, steps=STEPS, guidance_scale=3.5
    )[0]
    assert len(traced.transitions) == 2
    embeds, pooled, _ = flux_pipe.encode_prompt("a red circle", None, max_sequence_length=512)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    image_ids = torch.tensor(np.stack([np.zeros(64), rows.ravel(), cols.ravel()], 1)).float()
    for t in traced.transitions:
        x, x_next = unpack_transition(t.latents)
        assert x.shape == (16, 16, 16)  # the VAE's layout, as stored
        with torch.no_grad():
            v = flux_pipe.transformer(
                hidden_states=pack_by_hand(x)[None],
                timestep=torch.tensor([t.timestep / 1000]),
                guidance=torch.tensor([3.5]),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3),
                img_ids=image_ids,
                return_dict=False,
            )[0][0]
        assert t.timestep == pytest.approx(1000 * t.sigma, rel=1e-5)
        mean, std = reference_step(pack_by_hand(x).numpy(), v.numpy(), t.sigma, t.sigma_next,
                                   0.7, t.sigma_cap)  # fmt: skip
        expected = reference_logprob(pack_by_hand(x_next).numpy(), mean, std)
        assert t.logprob == pytest.approx(expected, abs=1e-4)


def test_stored_transitions_recompute_to_ratio_one_in_the_trainer(tiny_flux):
    """Through ``FlowGRPOTrainer`` (a fresh LoRA, B = 0): a batch mixing guidance scales and
    noise levels recomputes to ratio 1, and one optimizer step then moves the log-probs."""
    from nodes.backends.engines.flow_image import load_pipeline
    from training.images.groups import ImageGroup, ImageMember
    from training.images.trainer import FlowGRPOConfig, FlowGRPOTrainer

    pipe = load_pipeline(tiny_flux)
    trainer = FlowGRPOTrainer(pipe, FlowGRPOConfig(r=4, alpha=8, lr=1e-2), model="tiny-flux")
    transitions = []
    for guidance, level in ((2.0, 0.5), (5.0, 1.0)):
        sampler = FlowSampler(trainer.sampler.model, SDEConfig(noise_level=level))
        jobs = [SampleJob("a red circle", 11), SampleJob("a star", 12)]
        traced = sampler.sample(jobs, width=SIZE, height=SIZE, steps=STEPS, guidance_scale=guidance)
        transitions += [t for image in traced for t in image.transitions]
    assert [t.guidance_scale for t in transitions] == [2.0, 2.0, 5.0, 5.0]
    old = torch.tensor([t.logprob for t in transitions])
    with torch.no_grad():
        ratio = torch.exp(trainer.sampler.recompute(transitions).logprob - old)
    assert torch.allclose(ratio, torch.ones(4), atol=1e-5), ratio

    members = [ImageMember(f"t{i}", 1, (t,), float(i % 2)) for i, t in enumerate(transitions)]
    result = trainer.train([ImageGroup("g", "a red circle", tuple(members))])
    assert result.metrics["steps"] == 1 and result.metrics["first_max_abs_log_ratio"] < 1e-5
    with torch.no_grad():
        moved = trainer.sampler.recompute(transitions).logprob
    assert (moved - old).abs().max() > 1e-6  # the gradient reached the Flux transformer's LoRA


def test_a_diffusion_lora_saves_loads_and_changes_flux_images(flux_pipe, tiny_flux, tmp_path):
    """A peft LoRA on the Flux transformer round-trips through ``policies.diffusion_lora``;
    ``FlowImageModel.from_pretrained`` picks the Flux adapter, loads the LoRA and records its
    label; generations and edits come back with transitions."""
    from nodes.backends.engines.flow_image import FlowImageModel, load_pipeline
    from nodes.backends.flow.flux import FluxFlow
    from policies.diffusion_lora import attach_lora, load_lora, lora_config, save_lora

    def draw(pipe) -> np.ndarray:
        sampler = FlowSampler(FluxFlow(pipe), SDEConfig(count=0))
        job = SampleJob("a red circle", 21)
        return pixels(sampler.sample([job], width=SIZE, height=SIZE, steps=STEPS,
                                     guidance_scale=3.5)[0].image)  # fmt: skip

    tuned = load_pipeline(tiny_flux)
    base = draw(tuned)
    torch.manual_seed(0)
    params = attach_lora(tuned.transformer, lora_config(r=4, alpha=8))
    assert params and np.array_equal(draw(tuned), base)  # B = 0: the fresh LoRA is the base
    with torch.no_grad():
        for param in params:
            param.normal_(0, 0.3)
    changed = draw(tuned)
    assert np.abs(changed - base).max() > 8
    save_lora(tuned.transformer, tmp_path / "lora", name="draw", version="3")

    loaded = load_pipeline(tiny_flux)
    assert load_lora(loaded.transformer, tmp_path / "lora").label == "draw@3"
    assert np.array_equal(draw(loaded), changed)

    painter = FlowImageModel.from_pretrained(
        tiny_flux, name="tiny-flux", lora_dir=tmp_path / "lora", default_steps=STEPS,
        guidance_scale=3.5, torch_threads=1,
    )  # fmt: skip
    try:
        assert isinstance(painter.engine.sampler.model, FluxFlow)
        traced = asyncio.run(painter.generate_traced(ImageRequest("a star", SIZE, SIZE, seed=4)))
        (t,) = traced.transitions
        assert traced.image.size == (SIZE, SIZE) and t.step_index in (0, 1)
        assert (t.model, t.lora, t.guidance_scale, t.kind) == ("tiny-flux", "draw@3", 3.5,
                                                               "generate")  # fmt: skip
        assert unpack_transition(t.latents)[0].shape == (16, 16, 16)
        source = traced.image.convert("RGB")
        edited = asyncio.run(painter.edit_traced(EditRequest(source, "make it blue", seed=5)))
        (e,) = edited.transitions
        assert e.kind == "edit" and e.step_index >= 1  # strength 0.8 of 4 steps: from step 1
    finally:
        painter.close()


def test_only_plain_flux_pipelines_are_traced(flux_pipe):
    """Flux variants that feed extra latents to the transformer (Fill, Kontext, Control) are
    refused with a message, not sampled wrongly."""
    from nodes.backends.engines.flow_image import flow_model

    fill = type("FluxFillPipeline", (), {})()
    with pytest.raises(ValueError, match="FluxFillPipeline"):
        flow_model(fill, "x")
    assert type(flow_model(flux_pipe, "x")).__name__ == "FluxFlow"


def test_image_server_returns_flux_transitions_that_recompute_to_ratio_one(flux_pipe, tiny_flux):
    """``atelier serve image`` with the tiny Flux: ``return_transitions`` samples with the Flux
    adapter, and the transitions travel over HTTP and recompute to ratio 1 in another process's
    sampler (here: another pipeline instance)."""
    import httpx

    from nodes.backends.engines.image_inprocess import ImageService
    from nodes.backends.flow.transitions import transition_from_json
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.image_server import create_image_app

    service = ImageService.from_pretrained(
        tiny_flux, name="tiny-flux", default_steps=STEPS, torch_threads=1
    )
    server = BackgroundServer(create_image_app(service)).start()
    try:
        body = {"prompt": "a red circle", "size": "32x32", "n": 2, "seed": 5,
                "guidance_scale": 3.5, "return_transitions": True}  # fmt: skip
        reply = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        server.stop()
        service.close()
    data = reply.json()["data"]
    transitions = [transition_from_json(t) for item in data for t in item["transitions"]]
    assert [t.seed for t in transitions] == [5, 6] and transitions[0].model == "tiny-flux"
    with torch.no_grad():
        again = FlowSampler(flux_model(flux_pipe)).recompute(transitions).logprob
    old = torch.tensor([t.logprob for t in transitions])
    assert torch.allclose(torch.exp(again - old), torch.ones(2), atol=1e-5)
