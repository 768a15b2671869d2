"""Atelier's ``image`` server and in-process image model, with tiny random-weight Stable
Diffusion (text-to-image) and InstructPix2Pix (edits), spoken to by the vLLM-Omni client."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from nodes.backends.base import (
    BackendRequestError,
    EditRequest,
    ImageEditor,
    ImageGenerator,
    ImageRequest,
)
from nodes.backends.clients.omni_client import OmniImageClient
from nodes.backends.wire import image_to_png

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers


def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


async def stats(server) -> dict:
    async with httpx.AsyncClient(timeout=60) as http:
        return (await http.get(server.url + "/stats")).json()


async def test_generations_and_edits_return_pngs_of_the_requested_size(image_server):
    client = OmniImageClient(image_server.url)
    assert isinstance(client, ImageGenerator) and isinstance(client, ImageEditor)
    image = await client.generate(ImageRequest("a red circle", width=64, height=48, seed=1))
    assert image.size == (64, 48)
    again = await client.generate(ImageRequest("a red circle", width=64, height=48, seed=1))
    assert again.tobytes() == image.tobytes()  # seeded
    edited = await client.edit(EditRequest(image, "make the circle blue", seed=2))
    assert edited.size == (64, 48)
    # Odd sizes are rounded up for the pipeline and resized back exactly.
    odd = await client.generate(ImageRequest("a star", width=50, height=30, seed=3, steps=1))
    assert odd.size == (50, 30)
    async with httpx.AsyncClient(timeout=60) as http:
        raw = await http.post(
            image_server.url + "/v1/images/generations",
            json={"prompt": "two squares", "size": "32x40", "n": 2, "seed": 4},
        )
        body = raw.json()
        assert [png_size(d["b64_json"]) for d in body["data"]] == [(32, 40), (32, 40)]
        assert body["size"] == "32x40"
        form = await http.post(
            image_server.url + "/v1/images/edits",
            files={"image": ("in.png", image_to_png(image), "image/png")},
            data={"prompt": "add a star", "size": "48x32", "seed": "5"},
        )
        assert png_size(form.json()["data"][0]["b64_json"]) == (48, 32)
        as_json = await http.post(
            image_server.url + "/v1/images/edits",
            json={"prompt": "add a star", "image": base64.b64encode(image_to_png(image)).decode()},
        )
        assert png_size(as_json.json()["data"][0]["b64_json"]) == (64, 48)


async def test_concurrent_image_requests_are_batched(image_server):
    client = OmniImageClient(image_server.url)
    before = len((await stats(image_server))["batch_sizes"])
    images = await asyncio.gather(
        *(client.generate(ImageRequest(f"shape {i}", 32, 32, seed=i, steps=1)) for i in range(4))
    )
    sizes = (await stats(image_server))["batch_sizes"][before:]
    assert sum(sizes) == 4 and max(sizes) > 1
    assert all(img.size == (32, 32) for img in images)
    edits = await asyncio.gather(
        *(client.edit(EditRequest(img, "make it green", seed=9, steps=1)) for img in images)
    )
    sizes = (await stats(image_server))["batch_sizes"][before:]
    assert sum(sizes) == 8 and max(sizes[-2:]) > 1
    assert all(img.size == (32, 32) for img in edits)


async def test_image_server_guards(image_server, image_service):
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.image_server import create_image_app

    url = image_server.url
    async with httpx.AsyncClient(timeout=60) as http:
        bomb = image_to_png(Image.new("L", (300, 300)))  # 90 000 pixels > 65 536
        response = await http.post(
            url + "/v1/images/edits",
            files={"image": ("bomb.png", bomb, "image/png")},
            data={"prompt": "x"},
        )
        assert response.status_code == 400
        assert "decompression-bomb guard" in response.json()["error"]["message"]
        broken = await http.post(
            url + "/v1/images/edits",
            files={"image": ("x.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")},
            data={"prompt": "x"},
        )
        assert broken.status_code == 400
        assert "could not decode image" in broken.json()["error"]["message"]
        too_big = await http.post(
            url + "/v1/images/edits",
            files={"image": ("big.bin", b"\0" * 1_200_000, "image/png")},
            data={"prompt": "x"},
        )
        assert too_big.status_code == 413
        huge_size = await http.post(
            url + "/v1/images/generations", json={"prompt": "x", "size": "4096x4096"}
        )
        assert huge_size.status_code == 400 and "pixels" in huge_size.text
        bad_size = await http.post(
            url + "/v1/images/generations", json={"prompt": "x", "size": "big"}
        )
        assert bad_size.status_code == 400 and "WIDTHxHEIGHT" in bad_size.text
        no_image = await http.post(url + "/v1/images/edits", data={"prompt": "x"})
        assert no_image.status_code == 400
    with BackgroundServer(create_image_app(image_service, token="s3cret")) as locked:
        with pytest.raises(BackendRequestError) as info:
            await OmniImageClient(locked.url).generate(ImageRequest("x", 16, 16))
        assert info.value.status == 401
        image = await OmniImageClient(locked.url, token="s3cret").generate(
            ImageRequest("x", 16, 16, steps=1)
        )
        assert image.size == (16, 16)


async def test_in_process_image_model(image_service):
    from nodes.backends.engines.image_inprocess import InProcessImageModel

    model = InProcessImageModel(image_service)
    assert isinstance(model, ImageGenerator) and isinstance(model, ImageEditor)
    image = await model.generate(ImageRequest("a blue square", 40, 24, seed=3, steps=1))
    assert image.size == (40, 24)
    edited = await model.edit(EditRequest(image, "add a red circle", seed=4, steps=1))
    assert edited.size == (40, 24)
    assert model.model_id == "tiny-sd"


async def test_text_to_image_model_edits_through_img2img(tiny_models):
    from nodes.backends.engines.image_inprocess import InProcessImageModel

    model = InProcessImageModel.from_pretrained(tiny_models.sd, default_steps=2, torch_threads=1)
    assert type(model.service.engine.edit_pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    image = await model.generate(ImageRequest("a circle", 32, 32, seed=1))
    edited = await model.edit(EditRequest(image, "a square", seed=1))
    assert edited.size == (32, 32)
    edit_only = InProcessImageModel.from_pretrained(
        tiny_models.ip2p, default_steps=1, torch_threads=1
    )
    with pytest.raises(ValueError, match="cannot generate"):
        await edit_only.generate(ImageRequest("a circle", 32, 32))
    model.service.close()
    edit_only.service.close()
