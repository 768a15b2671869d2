"""Flow-GRPO learns: a few on-policy iterations on CPU (tiny random-weight SD3, 32×32, 4 steps)
with a measurable reward — the mean redness of the image — raise the redness of images drawn
from held-out seeds far beyond the seed-to-seed noise, and the trained LoRA, saved as a
versioned policy, loads into ``atelier serve image`` and makes its images redder too."""

from __future__ import annotations

import asyncio
import statistics

import numpy as np
import pytest

from tests.sql_spy import selects

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

pytest_plugins = ("tests.tiny_models",)

PROMPTS = ["a picture", "a scene"]
STEPS, GUIDANCE, SIZE = 4, 3.0, 32


def redness(image, prompt: str = "") -> float:
    """Mean of R − (G + B) / 2 over the pixels, in [−1, 1]."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return float((rgb[..., 0] - (rgb[..., 1] + rgb[..., 2]) / 2).mean())


def mean_redness(sampler, seeds) -> float:
    from nodes.backends.flow.sampler import SampleJob

    jobs = [SampleJob(PROMPTS[0], seed) for seed in seeds]
    with torch.no_grad():
        images = sampler.sample(jobs, width=SIZE, height=SIZE, steps=STEPS, guidance_scale=GUIDANCE)
    return statistics.fmean(redness(t.image) for t in images)


def test_flow_grpo_raises_redness_and_the_lora_serves(tiny_sd3, tmp_path):
    import httpx

    from nodes.backends.engines.flow_image import FlowImageEngine, FlowImageModel, load_pipeline
    from nodes.backends.engines.image_inprocess import ImageService
    from nodes.backends.flow.sampler import SDEConfig
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.image_server import create_image_app
    from nodes.backends.wire import decode_b64_image
    from policies.diffusion_lora import read_lora
    from storage.store import TrajectoryStore
    from training.images.groups import read_groups
    from training.images.rewards import score_run
    from training.images.sampling import collect
    from training.images.trainer import FlowGRPOConfig, FlowGRPOTrainer
    from training.versions import save_version

    torch.set_num_threads(1)
    pipe = load_pipeline(tiny_sd3)
    config = FlowGRPOConfig(r=8, alpha=16, lr=2e-2, clip_range=1e-2, beta=0.004, minibatch_size=16)
    trainer = FlowGRPOTrainer(pipe, config, model="tiny-sd3")
    sde = SDEConfig(noise_level=0.7, window=(0, 3), count=2)
    engine = FlowImageEngine(pipe, name="tiny-sd3", sde_config=sde, lora="draw@0")
    painter = FlowImageModel(engine, default_steps=STEPS, guidance_scale=GUIDANCE, max_batch=32)
    store = TrajectoryStore(f"sqlite:///{tmp_path}/flow.db")

    held_out = range(10_000, 10_032)
    # Run-to-run noise: the spread of the 32-image mean over disjoint seed sets (base policy).
    spread = [
        mean_redness(engine.sampler, range(20_000 + 100 * k, 20_032 + 100 * k)) for k in range(4)
    ]
    noise = statistics.stdev(spread)
    before = mean_redness(engine.sampler, held_out)

    for iteration in range(3):
        run_id = asyncio.run(
            collect(
                painter, store, PROMPTS, group_size=16, width=SIZE, height=SIZE, steps=STEPS,
                seed=iteration, name=f"flow-{iteration}",
            )
        )  # fmt: skip
        assert len(score_run(store, run_id, redness, "redness")) == 32
        with selects(store) as statements:
            groups = read_groups(store, run_id, reward="redness", node="draw")
        # In bulk: a few queries for the run's trajectories, steps and rewards, and one per group
        # for its transitions; not a query per trajectory (32 here).
        assert len(statements) <= 10, statements
        assert len(groups) == 2 and all(len(g.members) == 16 for g in groups)
        result = trainer.train(groups)
        assert result.metrics["transitions"] == 64 and result.metrics["steps"] == 4
        assert result.version == trainer.version == str(iteration + 1)
        # On-policy: the first minibatch's recomputed log-probs equal the sampler's.
        assert result.metrics["first_max_abs_log_ratio"] < 1e-5
        losses, kls = [h["loss"] for h in result.history], [h["kl"] for h in result.history]
        assert len(losses) == 4 and all(np.isfinite(losses)) and 0 <= max(kls) < 1.0
    painter.close()

    after = mean_redness(engine.sampler, held_out)
    gain = after - before
    print(f"redness {before:.4f} -> {after:.4f} (gain {gain:.4f}; seed-set noise {noise:.4f})")
    assert gain > 5 * noise and gain > 0.005

    path = save_version(trainer, store, tmp_path / "draw-3", result.metrics)
    _, _, info = read_lora(path)
    assert info.label == "draw@3" and info.meta["optimizer_steps"] == 12
    (registered,) = store.policy_versions(name="draw")
    assert registered.version == "3" and registered.metadata["optimizer_steps"] == 12
    assert registered.metadata["base_model"] == "tiny-sd3" and registered.path == str(path)
    store.close()

    # The trained LoRA in `atelier serve image` (plain ODE sampling there): redder images.
    service = ImageService.from_pretrained(tiny_sd3, name="tiny-sd3", default_steps=STEPS)
    server = BackgroundServer(create_image_app(service)).start()
    try:

        def served() -> list[float]:
            body = {"prompt": PROMPTS[0], "size": "32x32", "n": 4, "guidance_scale": GUIDANCE}
            values = []
            for seed in range(30_000, 30_032, 4):
                reply = httpx.post(
                    server.url + "/v1/images/generations", json={**body, "seed": seed}, timeout=60
                )
                assert reply.status_code == 200, reply.text
                values += [redness(decode_b64_image(d["b64_json"])) for d in reply.json()["data"]]
            return values

        base = served()
        load = {"lora_name": "draw@3", "lora_path": str(path)}
        reply = httpx.post(server.url + "/v1/load_lora_adapter", json=load, timeout=60)
        assert reply.status_code == 200, reply.text
        tuned = served()
        print(f"served redness {statistics.fmean(base):.4f} -> {statistics.fmean(tuned):.4f}")
        assert statistics.fmean(tuned) - statistics.fmean(base) > 5 * noise
        reply = httpx.post(
            server.url + "/v1/unload_lora_adapter", json={"lora_name": "draw@3"}, timeout=60
        )
        assert reply.status_code == 200 and served() == base
    finally:
        server.stop()
        service.close()
