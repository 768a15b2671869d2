"""``atelier serve image`` with a tiny SD3 and diffusion LoRAs, over real loopback HTTP:
transitions come back with ``return_transitions`` and recompute to ratio 1; a LoRA loaded at
run time changes the images and unloading restores them bit for bit; bad adapters are refused
with a message that says what is wrong, and leave the model as it was."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from atelier.cli import CliError  # noqa: E402
from nodes.backends.base import ImageRequest  # noqa: E402

pytest_plugins = ("tests.tiny_models",)

BODY = {"prompt": "a red circle", "size": "32x32", "n": 2, "seed": 5, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def sd3_server(tiny_sd3):
    from nodes.backends.engines.image_inprocess import ImageService
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.image_server import create_image_app

    service = ImageService.from_pretrained(
        tiny_sd3, name="tiny-sd3", default_steps=4, torch_threads=1
    )
    server = BackgroundServer(create_image_app(service)).start()
    yield server
    server.stop()
    service.close()


@pytest.fixture(scope="module")
def loras(tiny_sd3, tmp_path_factory):
    """A LoRA with non-zero weights, a corrupt copy, a wrong-shape copy, a wrong-target copy."""
    from safetensors.torch import load_file, save_file

    from nodes.backends.engines.flow_image import load_pipeline
    from policies.diffusion_lora import attach_lora, lora_config, save_lora

    root = tmp_path_factory.mktemp("loras")
    transformer = load_pipeline(tiny_sd3).transformer
    params = attach_lora(transformer, lora_config(4, 8))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    good = save_lora(transformer, root / "good", name="draw", version="7").path
    dirs = {"good": good}
    for name in ("corrupt", "shape", "target"):
        target = root / name
        target.mkdir()
        for file in good.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        dirs[name] = target
    (dirs["corrupt"] / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(dirs["shape"] / "adapter_model.safetensors"))
    config = json.loads((good / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_module"]
    (dirs["target"] / "adapter_config.json").write_text(json.dumps(config))
    return dirs


def generate(server, **extra) -> dict:
    reply = httpx.post(server.url + "/v1/images/generations", json={**BODY, **extra}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def images(body: dict) -> list[str]:
    return [item["b64_json"] for item in body["data"]]


def test_transitions_over_http_recompute_to_ratio_one(sd3_server, tiny_sd3):
    from nodes.backends.clients.omni_client import TracedOmniImageClient
    from nodes.backends.engines.flow_image import TRACED_GUIDANCE, load_pipeline
    from nodes.backends.flow.sampler import FlowSampler, SD3Flow
    from nodes.backends.flow.transitions import transition_from_json

    plain = generate(sd3_server)
    assert all("transitions" not in item for item in plain["data"])  # opt-in only
    traced = generate(sd3_server, return_transitions=True, noise_level=0.5)
    transitions = [transition_from_json(t) for d in traced["data"] for t in d["transitions"]]
    assert len(transitions) == 2 and [t.seed for t in transitions] == [5, 6]
    assert all(t.noise_level == 0.5 and t.guidance_scale == 3.0 for t in transitions)
    assert images(traced) != images(plain)  # SDE sampling, not the pipeline's ODE
    sampler = FlowSampler(SD3Flow(load_pipeline(tiny_sd3), "tiny-sd3"))
    with torch.no_grad():
        again = sampler.recompute(transitions).logprob
    old = torch.tensor([t.logprob for t in transitions])
    assert torch.allclose(torch.exp(again - old), torch.ones(2), atol=1e-5)

    client = TracedOmniImageClient(sd3_server.url, extra_body={"guidance_scale": 3.0})
    result = asyncio.run(client.generate_traced(ImageRequest("a red circle", 32, 32, seed=5)))
    assert result.image.size == (32, 32) and len(result.transitions) == 1
    assert result.transitions[0].seed == 5 and result.transitions[0].noise_level == 0.7

    # What a request leaves open takes the one set of traced defaults (the service's steps).
    unguided = {k: v for k, v in BODY.items() if k != "guidance_scale"}
    reply = httpx.post(
        sd3_server.url + "/v1/images/generations",
        json={**unguided, "n": 1, "return_transitions": True},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["data"][0]["transitions"]
    default = transition_from_json(item)
    assert (default.guidance_scale, default.num_steps) == (TRACED_GUIDANCE, 4)


def test_lora_loads_at_run_time_changes_images_and_unloads(sd3_server, loras):
    base = images(generate(sd3_server))
    post = lambda path, body: httpx.post(sd3_server.url + path, json=body, timeout=60)  # noqa: E731
    reply = post("/v1/load_lora_adapter", {"lora_name": "draw@7", "lora_path": str(loras["good"])})
    assert reply.status_code == 200, reply.text
    stats = httpx.get(sd3_server.url + "/stats", timeout=10).json()
    assert stats["adapters"] == ["draw@7"]
    tuned = images(generate(sd3_server))
    assert tuned != base
    traced = generate(sd3_server, return_transitions=True)
    assert {t["lora"] for d in traced["data"] for t in d["transitions"]} == {"draw@7"}
    again = post("/v1/load_lora_adapter", {"lora_name": "draw@7", "lora_path": str(loras["good"])})
    assert again.status_code == 400 and "already been loaded" in again.text
    assert post("/v1/unload_lora_adapter", {"lora_name": "draw@7"}).status_code == 200
    assert images(generate(sd3_server)) == base
    missing = post("/v1/unload_lora_adapter", {"lora_name": "draw@7"})
    assert missing.status_code == 404 and "not loaded" in missing.text


def test_a_per_request_lora_is_honoured_only_when_it_is_the_loaded_adapter(sd3_server, loras):
    """vLLM-Omni's ``lora`` field on ``atelier serve image``: this server applies its one loaded
    adapter to every request, so it accepts the field naming that adapter and refuses the rest
    with a 400, never ignoring it (the recorded step would name an adapter not used)."""
    from nodes.backends.base import BackendRequestError, EditRequest
    from nodes.backends.clients.omni_client import OmniImageClient, TracedOmniImageClient

    good = str(loras["good"])
    request = ImageRequest("a red circle", 32, 32, seed=5)

    async def scenario() -> None:
        base = OmniImageClient(sd3_server.url, extra_body={"guidance_scale": 3.0})
        with pytest.raises(BackendRequestError, match="not loaded here"):
            await base.with_adapter("draw@7", good).generate(request)
        load = {"lora_name": "draw@7", "lora_path": good}
        await base.pool.request("load", "POST", "/v1/load_lora_adapter", json=load)
        try:
            tuned = base.with_adapter("draw@7", good)
            image = await tuned.generate(request)
            assert image.tobytes() == (await base.generate(request)).tobytes()  # same adapter
            by_name = await base.with_adapter("draw@7").generate(request)
            assert by_name.tobytes() == image.tobytes()
            edited = await tuned.edit(EditRequest(image, "make it blue", seed=2, steps=2))
            assert edited.size == (32, 32)  # the edit form's JSON-text lora was accepted
            for wrong, message in [
                (base.with_adapter("draw@8"), "not loaded here"),
                (base.with_adapter("draw@7", str(loras["shape"])), "loaded here from another path"),
                (base.with_adapter("draw@7", good, scale=0.5), "scale 0.5 is not supported"),
            ]:
                with pytest.raises(BackendRequestError, match=message):
                    await wrong.generate(request)
                with pytest.raises(BackendRequestError, match=message):
                    await wrong.edit(EditRequest(image, "make it blue", seed=2, steps=2))
            traced = TracedOmniImageClient(sd3_server.url).with_adapter("draw@7", good)
            result = await traced.generate_traced(request)
            assert [t.lora for t in result.transitions] == ["draw@7"]
            assert traced.model_id == "draw@7"
        finally:
            unload = {"lora_name": "draw@7"}
            await base.pool.request("unload", "POST", "/v1/unload_lora_adapter", json=unload)
            await base.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt", "not a readable safetensors file"),
        ("shape", "shapes do not match"),
        ("target", "does not fit this model"),
        ("nowhere", "is not a LoRA adapter this server can read"),
    ],
)
def test_bad_adapters_are_refused_clearly_and_change_nothing(sd3_server, loras, kind, message):
    base = images(generate(sd3_server))
    path = str(loras.get(kind, loras["good"].parent / "nowhere"))
    reply = httpx.post(
        sd3_server.url + "/v1/load_lora_adapter",
        json={"lora_name": f"bad-{kind}", "lora_path": path},
        timeout=60,
    )
    assert reply.status_code == 400 and message in reply.text, reply.text
    assert path not in reply.text  # the server's paths are its own business
    assert httpx.get(sd3_server.url + "/stats", timeout=10).json()["adapters"] == []
    assert images(generate(sd3_server)) == base


def test_serve_image_loads_a_lora_at_start_up(tiny_sd3, loras):
    from atelier.cli.serve import build_image_app, build_parser
    from nodes.backends.servers.http_common import BackgroundServer

    def args(lora: str):
        return build_parser().parse_args(
            [
                "serve",
                "image",
                "--model",
                str(tiny_sd3),
                "--steps",
                "4",
                "--size",
                "32x32",
                "--lora",
                lora,
            ]
        )

    app = build_image_app(args(f"draw@7={loras['good']}"))
    with BackgroundServer(app) as server:
        assert httpx.get(server.url + "/stats", timeout=10).json()["adapters"] == ["draw@7"]
    with pytest.raises(CliError, match="not a readable safetensors file"):
        build_image_app(args(f"bad={loras['corrupt']}"))
    with pytest.raises(CliError, match="NAME=PATH"):
        build_image_app(args(str(loras["good"])))


def test_trainer_continues_from_a_saved_version(tiny_sd3, loras, tmp_path):
    """A trainer started from version 7 holds exactly its weights, and saves the next version
    with its lineage; both client backends satisfy the traced-model protocol."""
    from safetensors.torch import load_file

    from nodes.backends.base import TracedImageModel
    from nodes.backends.clients.omni_client import OmniImageClient, TracedOmniImageClient
    from nodes.backends.engines.flow_image import FlowImageEngine, FlowImageModel, load_pipeline
    from policies.diffusion_lora import read_lora
    from policies.weights import next_version
    from training.images.groups import ImageGroup, ImageMember
    from training.images.trainer import FlowGRPOTrainer

    pipe = load_pipeline(tiny_sd3)
    trainer = FlowGRPOTrainer(pipe, init_lora=loras["good"], model="tiny-sd3")
    assert trainer.parameters and all(p.requires_grad for p in trainer.parameters)
    _, _, parent = read_lora(loras["good"])
    assert (trainer.name, trainer.version) == (parent.name, parent.version) == ("draw", "7")
    # A round without signal (equal rewards) takes no step: no weight changes, no new version.
    flat = (ImageMember("a", 1, (), 0.5), ImageMember("b", 1, (), 0.5))
    result = trainer.train([ImageGroup("g", "a red circle", flat)])
    assert result.version == parent.version and result.metrics["steps"] == 0
    trainer.version = next_version(trainer.version)  # as a step would: the saved lineage
    _, _, info = read_lora(trainer.save(tmp_path / "v8"))
    assert (info.label, info.meta["parent"]) == ("draw@8", "7")
    saved = load_file(str(info.path / "adapter_model.safetensors"))
    original = load_file(str(loras["good"] / "adapter_model.safetensors"))
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)

    painter = FlowImageModel(FlowImageEngine(pipe, name="tiny-sd3"))
    assert isinstance(painter, TracedImageModel)
    assert isinstance(TracedOmniImageClient("http://127.0.0.1:1"), TracedImageModel)
    assert not isinstance(OmniImageClient("http://127.0.0.1:1"), TracedImageModel)
    painter.close()
