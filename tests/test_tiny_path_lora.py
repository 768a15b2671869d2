"""A LoRA load that fails leaves the server exactly as it was (issue 12): the load is a 400 that
says why, the base model and the adapters already loaded answer bit for bit as before, the
failed name can be loaded again, and unloading an adapter that never loaded is a 404 — against
``atelier serve lm`` (tiny LLaVA) and ``atelier serve image`` (tiny SD3) on loopback.

Before the fix, a failed load left a half-injected adapter behind: a 500 for unreadable
weights, the base model's outputs silently changed, and the name refused forever ("already
exists"); the image server dropped its active adapter before trying the new one."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers

CHAT = {"messages": [{"role": "user", "content": "describe the image"}], "max_tokens": 4}


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_config(directory: Path, **changes: Any) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def peft_lora(model: Any, directory: Path, targets: list[str], seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(model, config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def lm_loras(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A good adapter for the tiny VLM, and adapters that cannot load into it, each a way
    a user gets it wrong."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("lm-loras")
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_models.vlm)
    good = peft_lora(vlm, root / "good", ["q_proj", "v_proj"], seed=11)
    second = peft_lora(
        AutoModelForImageTextToText.from_pretrained(tiny_models.vlm),
        root / "second",
        ["q_proj", "v_proj"],
        seed=12,
    )
    text_lm = AutoModelForCausalLM.from_pretrained(tiny_models.lm)
    other = peft_lora(text_lm, root / "other-model", ["gate_proj"], seed=13)
    corrupt = copy_of(good, root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    shape = copy_of(good, root / "shape")
    edit_config(shape, r=8)  # the file's tensors have rank 4
    target = copy_of(good, root / "target")
    edit_config(target, target_modules=["no_such_proj"])
    empty = root / "empty"
    empty.mkdir()
    return {
        "good": good,
        "second": second,
        "other-model": other,
        "corrupt": corrupt,
        "shape": shape,
        "target": target,
        "empty": empty,
        "nowhere": root / "nowhere",
    }


@pytest.fixture(scope="module")
def lora_lm_server(tiny_models, lm_loras):
    """A server of its own (these tests load and unload adapters), with ``good`` loaded."""
    from nodes.backends.engines.lm_inprocess import LMService
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.lm_server import create_lm_app

    service = LMService.from_pretrained(tiny_models.vlm, name="tiny-vlm", torch_threads=1)
    server = BackgroundServer(create_lm_app(service)).start()
    reply = post(server, "/v1/load_lora_adapter", lora_name="good", lora_path=str(lm_loras["good"]))
    assert reply.status_code == 200, reply.text
    yield server
    server.stop()
    service.close()


def post(server: Any, path: str, **body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def logprobs(server: Any, model: str) -> list[float]:
    reply = post(server, "/v1/chat/completions", **CHAT, model=model, seed=3, logprobs=True)
    assert reply.status_code == 200, reply.text
    return [entry["logprob"] for entry in reply.json()["choices"][0]["logprobs"]["content"]]


def served(server: Any) -> list[str]:
    return [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]


@pytest.fixture(scope="module")
def lm_before(lora_lm_server) -> dict[str, list[float]]:
    """What the base model and ``good`` answer before any failed load."""
    base, good = logprobs(lora_lm_server, "tiny-vlm"), logprobs(lora_lm_server, "good")
    assert base != good  # the adapter does change the model (else nothing is tested)
    return {"tiny-vlm": base, "good": good}


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("corrupt", "Error while deserializing header"),
        ("shape", "have the wrong shape for this model"),
        ("other-model", "weights do not match this model"),
        ("target", "no_such_proj"),
        ("empty", "is not a LoRA adapter this server can read"),
        ("nowhere", "is not a LoRA adapter this server can read"),
    ],
)
def test_a_failed_lm_lora_load_changes_nothing(
    lora_lm_server, lm_loras, lm_before, kind: str, reason: str
):
    server = lora_lm_server
    reply = post(server, "/v1/load_lora_adapter", lora_name="bad", lora_path=str(lm_loras[kind]))
    assert reply.status_code == 400, reply.text
    assert reason in reply.json()["error"]["message"]
    assert "'bad'" in reply.json()["error"]["message"] or kind in ("empty", "nowhere")
    # The base model and the adapter loaded before answer exactly as they did.
    assert logprobs(server, "tiny-vlm") == lm_before["tiny-vlm"]
    assert logprobs(server, "good") == lm_before["good"]
    assert served(server) == ["tiny-vlm", "good"]
    assert post(server, "/v1/chat/completions", **CHAT, model="bad").status_code == 404
    missing = post(server, "/v1/unload_lora_adapter", lora_name="bad")
    assert missing.status_code == 404 and "not loaded" in missing.text
    # The failed name is free: a good adapter loads under it, and unloads.
    second = str(lm_loras["second"])
    again = post(server, "/v1/load_lora_adapter", lora_name="bad", lora_path=second)
    assert again.status_code == 200, again.text
    assert logprobs(server, "bad") not in (lm_before["tiny-vlm"], lm_before["good"])
    assert post(server, "/v1/unload_lora_adapter", lora_name="bad").status_code == 200
    assert logprobs(server, "tiny-vlm") == lm_before["tiny-vlm"]


def test_a_failed_in_place_reload_keeps_the_adapter_it_would_replace(
    lora_lm_server, lm_loras, lm_before
):
    server = lora_lm_server
    reply = post(
        server,
        "/v1/load_lora_adapter",
        lora_name="good",
        lora_path=str(lm_loras["corrupt"]),
        load_inplace=True,
    )
    assert reply.status_code == 400, reply.text
    assert logprobs(server, "good") == lm_before["good"]
    assert logprobs(server, "tiny-vlm") == lm_before["tiny-vlm"]
    replaced = post(
        server,
        "/v1/load_lora_adapter",
        lora_name="good",
        lora_path=str(lm_loras["second"]),
        load_inplace=True,
    )
    assert replaced.status_code == 200, replaced.text
    assert logprobs(server, "good") != lm_before["good"]
    restored = post(
        server,
        "/v1/load_lora_adapter",
        lora_name="good",
        lora_path=str(lm_loras["good"]),
        load_inplace=True,
    )
    assert restored.status_code == 200
    assert logprobs(server, "good") == lm_before["good"]
    assert served(server) == ["tiny-vlm", "good"]


# --- the image server ---------------------------------------------------------------------------

IMAGE = {"prompt": "a red circle", "size": "32x32", "seed": 5, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def image_loras(tiny_sd3, tmp_path_factory) -> dict[str, Path]:
    from nodes.backends.engines.flow_image import load_pipeline
    from policies.diffusion_lora import attach_lora, lora_config, save_lora

    root = tmp_path_factory.mktemp("image-loras")
    transformer = load_pipeline(tiny_sd3).transformer
    params = attach_lora(transformer, lora_config(4, 8))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for param in params:
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    good = save_lora(transformer, root / "good", name="draw", version="1").path
    corrupt = copy_of(good, root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    target = copy_of(good, root / "target")
    edit_config(target, target_modules=["no_such_module"])
    return {"good": good, "corrupt": corrupt, "target": target, "nowhere": root / "nowhere"}


@pytest.fixture(scope="module")
def lora_image_server(tiny_sd3):
    from nodes.backends.engines.image_inprocess import ImageService
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.image_server import create_image_app

    service = ImageService.from_pretrained(tiny_sd3, name="tiny-sd3", default_steps=3)
    server = BackgroundServer(create_image_app(service)).start()
    yield server
    server.stop()
    service.close()


def image(server: Any) -> str:
    reply = post(server, "/v1/images/generations", **IMAGE)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"][0]["b64_json"]


def adapters(server: Any) -> list[str]:
    return httpx.get(server.url + "/stats", timeout=30).json()["adapters"]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("corrupt", "not a readable safetensors file"),
        ("target", "does not fit this model"),
        ("nowhere", "is not a LoRA adapter this server can read"),
    ],
)
def test_a_failed_image_lora_load_keeps_the_active_adapter(
    lora_image_server, image_loras, kind: str, reason: str
):
    server = lora_image_server
    base = image(server)
    loaded = post(
        server, "/v1/load_lora_adapter", lora_name="draw@1", lora_path=str(image_loras["good"])
    )
    assert loaded.status_code == 200, loaded.text
    tuned = image(server)
    assert tuned != base
    try:
        reply = post(
            server, "/v1/load_lora_adapter", lora_name="bad", lora_path=str(image_loras[kind])
        )
        assert reply.status_code == 400 and reason in reply.text, reply.text
        assert adapters(server) == ["draw@1"]
        assert image(server) == tuned  # still drawing with the adapter it had
        missing = post(server, "/v1/unload_lora_adapter", lora_name="bad")
        assert missing.status_code == 404
    finally:
        assert post(server, "/v1/unload_lora_adapter", lora_name="draw@1").status_code == 200
    assert image(server) == base and adapters(server) == []
