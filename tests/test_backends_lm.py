"""Atelier's ``lm`` server and in-process chat model, with a tiny random-weight LLaVA model,
spoken to by the same HTTP client that talks to vLLM."""

from __future__ import annotations

import asyncio
import warnings
from typing import TYPE_CHECKING

import httpx
import pytest
from PIL import Image

from nodes.backends.base import (
    BackendRequestError,
    ChatMessage,
    ChatRequest,
    SamplingParams,
    ScoringChatModel,
)
from nodes.backends.clients.openai_client import OpenAIChatClient
from nodes.backends.wire import image_to_b64, image_to_data_url, image_to_png

if TYPE_CHECKING:
    from nodes.backends.engines.tiny_models import TinyModels

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers

SYSTEM = "You check a generated image against its target description."
TEXT = "two red circles left of a blue square"


def picture() -> Image.Image:
    image = Image.new("RGB", (40, 30), (250, 250, 250))
    image.paste((220, 30, 30), (4, 4, 18, 18))
    return image


def messages(image: Image.Image | None = None) -> list[ChatMessage]:
    images = (image,) if image is not None else ()
    return [ChatMessage("system", SYSTEM), ChatMessage("user", "Describe the image.", images)]


def chat_request(seed: int = 1, max_tokens: int = 8, image: Image.Image | None = None):
    return ChatRequest(
        messages=tuple(messages(image or picture())),
        sampling=SamplingParams(max_tokens=max_tokens, seed=seed),
    )


async def stats(server) -> dict:
    async with httpx.AsyncClient(timeout=60) as http:
        return (await http.get(server.url + "/stats")).json()


def reference_logprobs(model_dir, image: Image.Image, text: str) -> list[float]:
    """The text's log-probs computed straight with transformers (independent of Atelier)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ]
    prompt = processor.apply_chat_template(conversation, continue_final_message=True)
    batch = processor(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits[0]
    ids = batch["input_ids"][0]
    logprobs = torch.log_softmax(logits[:-1].float(), -1).gather(1, ids[1:, None])[:, 0]
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return logprobs[-n:].tolist()


# --- chat -------------------------------------------------------------------------------------


async def test_chat_with_an_image_returns_text_token_ids_and_logprobs(lm_server):
    client = OpenAIChatClient(lm_server.url, model="tiny-vlm")
    assert isinstance(client, ScoringChatModel)
    completion = await client.chat(chat_request(max_tokens=12))
    assert completion.model == "tiny-vlm"
    assert len(completion.token_ids) == len(completion.logprobs) == 12
    assert completion.finish_reason == "length"
    assert all(lp <= 0 for lp in completion.logprobs)
    assert isinstance(completion.text, str) and completion.text
    # The same seed samples the same tokens; another seed (almost surely) does not.
    again = await client.chat(chat_request(max_tokens=12))
    assert again.token_ids == completion.token_ids and again.logprobs == completion.logprobs
    other = await client.chat(chat_request(seed=2, max_tokens=12))
    assert other.token_ids != completion.token_ids
    await client.aclose()


async def test_raw_response_has_vllm_fields(lm_server):
    payload = {
        "model": "tiny-vlm",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_to_data_url(picture())}},
                    {"type": "text", "text": "Describe the image."},
                ],
            },
        ],
        "max_tokens": 3,
        "seed": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "return_token_ids": True,
        "prompt_logprobs": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    }
    async with httpx.AsyncClient(timeout=60) as http:
        body = (await http.post(lm_server.url + "/v1/chat/completions", json=payload)).json()
        models = (await http.get(lm_server.url + "/v1/models")).json()
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == len(choice["logprobs"]["content"]) == 3
    assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])
    prompt_ids, prompt_lps = body["prompt_token_ids"], body["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == len(prompt_ids)
    assert all(str(t) in entry for t, entry in zip(prompt_ids[1:], prompt_lps[1:], strict=True))
    assert prompt_ids.count(3) == 16  # the image token, expanded to the image's 16 patches
    assert choice["structured_output"] == {
        "type": "json_schema",
        "constrained": False,
        "valid_json": False,
    }
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert [m["id"] for m in models["data"]] == ["tiny-vlm"]


async def test_concurrent_requests_are_batched(lm_server):
    client = OpenAIChatClient(lm_server.url)
    before = len((await stats(lm_server))["batch_sizes"])
    completions = await asyncio.gather(*(client.chat(chat_request(seed=s)) for s in range(8)))
    sizes = (await stats(lm_server))["batch_sizes"][before:]
    assert sum(sizes) == 8 and max(sizes) > 1
    # Batched rows sample exactly what they sample alone.
    alone = await client.chat(chat_request(seed=5))
    assert alone.token_ids == completions[5].token_ids
    assert alone.logprobs == pytest.approx(completions[5].logprobs, abs=1e-5)


# --- score_text ---------------------------------------------------------------------------------


async def test_score_text_over_http_equals_in_process_and_excludes_image_tokens(
    lm_server, vlm_service, tiny_models: TinyModels
):
    from nodes.backends.engines.lm_inprocess import InProcessChatModel

    image = picture()
    http_scored = await OpenAIChatClient(lm_server.url).score_text(messages(), TEXT, image=image)
    local = InProcessChatModel(vlm_service)
    assert isinstance(local, ScoringChatModel)
    local_scored = await local.score_text(messages(), TEXT, image=image)
    tokenizer = vlm_service.engine.tokenizer
    text_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert list(http_scored.token_ids) == list(local_scored.token_ids) == text_ids
    assert len(http_scored.logprobs) == len(text_ids)
    assert http_scored.logprobs == pytest.approx(local_scored.logprobs, abs=1e-4)
    reference = reference_logprobs(tiny_models.vlm, image, TEXT)
    assert http_scored.logprobs == pytest.approx(reference, abs=1e-4)
    assert -20 < http_scored.mean_logprob < 0


async def test_in_process_chat_batches_concurrent_calls(vlm_service):
    from nodes.backends.engines.lm_inprocess import InProcessChatModel

    model = InProcessChatModel(vlm_service)
    before = len(vlm_service.batcher.batch_sizes)
    outs = await asyncio.gather(*(model.chat(chat_request(seed=s)) for s in range(6)))
    sizes = list(vlm_service.batcher.batch_sizes)[before:]
    assert sum(sizes) == 6 and max(sizes) > 1
    assert all(len(o.token_ids) == len(o.logprobs) == 8 for o in outs)


# --- LoRA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_models: TinyModels, tmp_path_factory) -> str:
    """A LoRA adapter with non-zero random weights (peft, saved as safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(123)
    base = AutoModelForImageTextToText.from_pretrained(tiny_models.vlm)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    path = tmp_path_factory.mktemp("lora") / "adapter"
    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(base, config).save_pretrained(path, safe_serialization=True)
    assert (path / "adapter_model.safetensors").exists()
    return str(path)


async def test_lora_adapter_changes_logprobs_and_unloading_restores_them(lm_server, lora_dir):
    client = OpenAIChatClient(lm_server.url)
    base_chat = await client.chat(chat_request(seed=3))
    base_score = await client.score_text(messages(), TEXT, image=picture())

    await client.load_adapter("policy-v1", lora_dir)
    try:
        assert await client.models() == ["tiny-vlm", "policy-v1"]
        tuned = client.with_adapter("policy-v1")
        tuned_score = await tuned.score_text(messages(), TEXT, image=picture())
        assert tuned_score.token_ids == base_score.token_ids
        assert (
            max(abs(a - b) for a, b in zip(tuned_score.logprobs, base_score.logprobs, strict=True))
            > 1e-3
        )
        tuned_chat = await tuned.chat(chat_request(seed=3))
        assert tuned_chat.model == "policy-v1"
        assert tuned_chat.logprobs != base_chat.logprobs
        # The base model is still served, unchanged, while the adapter is loaded.
        assert (await client.chat(chat_request(seed=3))).logprobs == base_chat.logprobs
        with pytest.raises(BackendRequestError, match="already been loaded"):
            await client.load_adapter("policy-v1", lora_dir)
    finally:
        await client.unload_adapter("policy-v1")

    restored_chat = await client.chat(chat_request(seed=3))
    assert restored_chat.token_ids == base_chat.token_ids
    assert restored_chat.logprobs == base_chat.logprobs  # exactly
    restored_score = await client.score_text(messages(), TEXT, image=picture())
    assert restored_score.logprobs == pytest.approx(base_score.logprobs, abs=1e-6)
    with pytest.raises(BackendRequestError, match="404") as info:
        await client.with_adapter("policy-v1").chat(chat_request())
    assert info.value.status == 404
    assert await client.models() == ["tiny-vlm"]


# --- guards -------------------------------------------------------------------------------------


async def test_bearer_token_is_enforced(vlm_service):
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.lm_server import create_lm_app

    with BackgroundServer(create_lm_app(vlm_service, token="s3cret")) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            assert (await http.get(server.url + "/health")).status_code == 200
            refused = await http.get(server.url + "/v1/models")
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "unauthorized"
            wrong = await http.get(
                server.url + "/v1/models", headers={"Authorization": "Bearer nope"}
            )
            assert wrong.status_code == 401
        with pytest.raises(BackendRequestError, match="401") as info:
            await OpenAIChatClient(server.url).chat(chat_request(max_tokens=2))
        assert info.value.status == 401
        completion = await OpenAIChatClient(server.url, token="s3cret").chat(
            chat_request(max_tokens=2)
        )
        assert len(completion.token_ids) == 2


async def test_oversized_requests_get_413(lm_server):
    huge = {"model": "tiny-vlm", "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(lm_server.url + "/v1/chat/completions", json=huge)
        assert response.status_code == 413
        assert "exceeds the limit" in response.json()["error"]["message"]

        async def chunks():  # no Content-Length: the server counts what it reads
            for _ in range(40):
                yield b"x" * 32_768

        streamed = await http.post(lm_server.url + "/v1/chat/completions", content=chunks())
        assert streamed.status_code == 413


def _image_payload(url: str) -> dict:
    return {
        "model": "tiny-vlm",
        "max_tokens": 1,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "what is this?"},
                ],
            }
        ],
    }


async def test_bomb_and_broken_images_get_400(lm_server):
    bomb = Image.new("L", (300, 300))  # 90 000 pixels > this server's 65 536
    broken = "data:image/png;base64," + image_to_b64(picture())[:-40] + "AAAA"
    junk = "data:image/png;base64,aGVsbG8gd29ybGQ="
    async with httpx.AsyncClient(timeout=60) as http:
        url = lm_server.url + "/v1/chat/completions"
        response = await http.post(url, json=_image_payload(image_to_data_url(bomb)))
        assert response.status_code == 400
        assert "decompression-bomb guard" in response.json()["error"]["message"]
        for bad in (broken, junk):
            response = await http.post(url, json=_image_payload(bad))
            assert response.status_code == 400
            assert "could not decode image" in response.json()["error"]["message"]
        remote = await http.post(url, json=_image_payload("http://example.com/cat.png"))
        assert remote.status_code == 400 and "data URLs" in remote.json()["error"]["message"]
        assert len(image_to_png(bomb)) < 1024 * 1024  # refused for its pixels, not its bytes


async def test_bad_requests_get_clear_400s(lm_server):
    async with httpx.AsyncClient(timeout=60) as http:
        url = lm_server.url + "/v1/chat/completions"
        not_json = await http.post(url, content=b"{nope", headers={"content-type": "x"})
        assert not_json.status_code == 400 and "not valid JSON" in not_json.text
        no_messages = await http.post(url, json={"model": "tiny-vlm", "messages": []})
        assert no_messages.status_code == 400 and "messages" in no_messages.text
        conflict = await http.post(
            url,
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "continue_final_message": True,
            },
        )
        assert conflict.status_code == 400
        unknown = await http.post(
            url, json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert unknown.status_code == 404


async def test_pinned_neutral_sampling_fields_change_nothing_and_min_p_is_refused(lm_server):
    # OpenAIChatClient pins top_k, min_p and repetition_penalty on every request (vLLM would
    # fill omitted ones from generation_config.json): their neutral values must be accepted and
    # sample exactly what omitting them does; a min_p this server cannot honour is a 400.
    base = {
        "model": "tiny-vlm",
        "messages": [{"role": "user", "content": "Describe a red circle."}],
        "max_tokens": 6,
        "seed": 4,
        "logprobs": True,
        "return_token_ids": True,
    }
    neutral = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
    url = lm_server.url + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=60) as http:
        omitted = (await http.post(url, json=base)).json()["choices"][0]
        pinned = (await http.post(url, json={**base, **neutral})).json()["choices"][0]
        zero_k = (await http.post(url, json={**base, **neutral, "top_k": 0})).json()["choices"][0]
        min_p = await http.post(url, json={**base, **neutral, "min_p": 0.1})
    assert pinned["token_ids"] == omitted["token_ids"] == zero_k["token_ids"]
    assert pinned["logprobs"] == omitted["logprobs"]
    assert min_p.status_code == 400 and "min_p" in min_p.json()["error"]["message"]


async def test_text_only_model_in_process(tiny_models: TinyModels):
    from nodes.backends.engines.lm_inprocess import InProcessChatModel
    from nodes.backends.lm_types import InvalidRequest

    model = InProcessChatModel.from_pretrained(tiny_models.lm, name="tiny-lm", torch_threads=1)
    completion = await model.chat(
        ChatRequest(
            messages=(ChatMessage("user", "hello"),), sampling=SamplingParams(max_tokens=4, seed=1)
        )
    )
    assert len(completion.token_ids) == len(completion.logprobs) == 4
    scored = await model.score_text([ChatMessage("user", "say it")], TEXT)
    ids = model.service.engine.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert list(scored.token_ids) == ids
    with pytest.raises(InvalidRequest, match="text model"):
        await model.chat(chat_request())
    model.service.close()


async def test_serve_lm_command_starts_a_working_server(tiny_models: TinyModels):
    """``python -m atelier.cli.serve lm ...`` (what ``atelier serve lm`` runs)."""
    import subprocess
    import sys
    import time

    from nodes.backends.servers.http_common import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    command = [
        sys.executable, "-m", "atelier.cli.serve", "lm",
        "--model", str(tiny_models.vlm), "--port", str(port), "--token", "t0k",
        "--served-model-name", "cli-vlm", "--torch-threads", "1", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                try:
                    if (await http.get(url + "/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                await asyncio.sleep(0.2)
        client = OpenAIChatClient(url, token="t0k")
        completion = await client.chat(chat_request(max_tokens=3))
        assert completion.model == "cli-vlm" and len(completion.token_ids) == 3
    finally:
        process.terminate()
        process.wait(timeout=30)
