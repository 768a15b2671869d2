"""HTTP clients and the server pool against small Starlette apps on loopback (no model).

The fake vLLM app answers exactly in vLLM's shapes (``choices[0].token_ids``, top-level
``prompt_token_ids`` and ``prompt_logprobs`` keyed by token-id strings, image placeholder
tokens in the prompt), so the client's parsing and alignment are checked against the protocol,
not only against Atelier's own server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time

import pytest
from PIL import Image

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from nodes.backends.base import (
    BackendError,
    BackendRequestError,
    BackendUnavailable,
    ChatMessage,
    ChatRequest,
    EditRequest,
    ImageEditor,
    ImageGenerator,
    ImageRequest,
    SamplingParams,
    ScoringChatModel,
)
from nodes.backends.clients.omni_client import OmniImageClient
from nodes.backends.clients.openai_client import OpenAIChatClient
from nodes.backends.clients.pool import RetryPolicy, ServerPool
from nodes.backends.servers.http_common import BackgroundServer, free_socket
from nodes.backends.wire import (
    ImageDecodeError,
    WireFormatError,
    decode_b64_image,
    decode_image,
    image_to_png,
    messages_payload,
    parse_chat_completion,
    parse_size,
)

FAST_RETRY = RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05, cooldown_s=0.5)

# --- a fake vLLM ------------------------------------------------------------------------------

IMAGE_PLACEHOLDER = 99
TEXT_IDS = {"two": 40, " red": 41, " circles": 42}


def _prompt_ids(messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """A toy chat template: [BOS] per message [ROLE] content [END]; images = 4 placeholders."""
    ids = [1]
    for index, message in enumerate(messages):
        ids.append(10 if message["role"] == "user" else 11)
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for part in parts:
            if part["type"] == "image_url":
                ids += [IMAGE_PLACEHOLDER] * 4
            else:
                ids += [TEXT_IDS.get(w, 50) for w in _words(part["text"])]
        final = index == len(messages) - 1
        if not (final and message["role"] == "assistant"):
            ids.append(2)
    if add_generation_prompt:
        ids.append(11)
    return ids


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *[" " + w for w in words[1:]]] if text else []


def fake_vllm_app(log: list[dict]) -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        log.append(body)
        ids = _prompt_ids(body["messages"], body.get("add_generation_prompt", True))
        response = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Add a star."},
                    "logprobs": {
                        "content": [
                            {"token": "Add", "logprob": -0.5, "bytes": [], "top_logprobs": []},
                            {"token": " a", "logprob": -0.25, "bytes": [], "top_logprobs": []},
                            {"token": " star.", "logprob": -1.5, "bytes": [], "top_logprobs": []},
                        ]
                    },
                    "finish_reason": "stop",
                    "token_ids": [60, 61, 62],
                }
            ],
            "prompt_logprobs": None,
        }
        if body.get("return_token_ids"):
            response["prompt_token_ids"] = ids
        if body.get("prompt_logprobs") is not None:
            # vLLM: the first entry is null; dict keys are token-id strings; the prompt token
            # itself is always there (plus top-k others).
            response["prompt_logprobs"] = [None] + [
                {
                    str(t): {"logprob": -t / 100, "rank": 1, "decoded_token": "x"},
                    "7": {"logprob": -0.01, "rank": 1, "decoded_token": "y"},
                }
                for t in ids[1:]
            ]
        return JSONResponse(response)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "served-model"}]})

    async def lora(request: Request) -> PlainTextResponse:
        log.append({"path": request.url.path, **(await request.json())})
        return PlainTextResponse("Success")

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/v1/load_lora_adapter", lora, methods=["POST"]),
            Route("/v1/unload_lora_adapter", lora, methods=["POST"]),
            Route("/health", health),
        ]
    )


def counting_app(name: str, hits: list[str], statuses: list[int] | None = None) -> Starlette:
    """Answers ``statuses`` in turn (then 200), recording each hit as ``name``."""
    queue = list(statuses or [])

    async def anything(request: Request) -> JSONResponse:
        hits.append(name)
        status = queue.pop(0) if queue else 200
        if status != 200:
            return JSONResponse({"error": {"message": f"status {status}"}}, status_code=status)
        return JSONResponse({"server": name})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("")

    return Starlette(
        routes=[Route("/health", health), Route("/x", anything, methods=["GET", "POST"])]
    )


def dead_url() -> str:
    sock = free_socket()
    host, port = sock.getsockname()[:2]
    sock.close()  # nothing listens there now
    return f"http://{host}:{port}"


def red_image(size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, (220, 20, 20))


# --- chat client ----------------------------------------------------------------------------


async def test_chat_sends_images_as_data_urls_and_reads_ids_and_logprobs():
    log: list[dict] = []
    with BackgroundServer(fake_vllm_app(log)) as server:
        client = OpenAIChatClient(server.url + "/v1", model="m")
        assert isinstance(client, ScoringChatModel)
        request = ChatRequest(
            messages=(ChatMessage("system", "sys"), ChatMessage("user", "look", (red_image(),))),
            sampling=SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, seed=5),
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
        )
        completion = await client.chat(request)
        await client.aclose()
    assert completion.text == "Add a star."
    assert completion.token_ids == (60, 61, 62)
    assert completion.logprobs == (-0.5, -0.25, -1.5)
    assert completion.model == "m"
    sent = log[0]
    assert sent["model"] == "m" and sent["seed"] == 5 and sent["max_tokens"] == 12
    assert sent["logprobs"] is True and sent["return_token_ids"] is True
    assert sent["temperature"] == 0.7 and sent["top_p"] == 0.9
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["messages"][0] == {"role": "system", "content": "sys"}
    image_part, text_part = sent["messages"][1]["content"]
    assert text_part == {"type": "text", "text": "look"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert decode_b64_image(url).tobytes() == red_image().tobytes()


async def test_score_text_aligns_by_token_ids_and_skips_image_placeholders():
    log: list[dict] = []
    with BackgroundServer(fake_vllm_app(log)) as server:
        client = OpenAIChatClient(server.url, model="m")
        scored = await client.score_text(
            [ChatMessage("user", "describe")], "two red circles", image=red_image()
        )
    assert scored.token_ids == (40, 41, 42)
    assert scored.logprobs == (-0.40, -0.41, -0.42)
    assert IMAGE_PLACEHOLDER not in scored.token_ids
    full = next(b for b in log if b.get("prompt_logprobs") is not None)
    prefix = next(b for b in log if b.get("prompt_logprobs") is None)
    assert full["continue_final_message"] is True and full["add_generation_prompt"] is False
    assert full["messages"][-1] == {"role": "assistant", "content": "two red circles"}
    assert full["max_tokens"] == 1 and full["return_token_ids"] is True
    assert prefix["add_generation_prompt"] is True
    assert prefix["messages"] == full["messages"][:-1]
    # The image went into the last user message.
    assert [p["type"] for p in full["messages"][0]["content"]] == ["image_url", "text"]


async def test_model_name_comes_from_v1_models_and_adapters_are_broadcast():
    logs: tuple[list[dict], list[dict]] = ([], [])
    with (
        BackgroundServer(fake_vllm_app(logs[0])) as one,
        BackgroundServer(fake_vllm_app(logs[1])) as two,
    ):
        client = OpenAIChatClient([one.url, two.url])
        await client.load_adapter("policy-v2", "/adapters/v2", inplace=True)
        tuned = client.with_adapter("policy-v2")
        await tuned.chat(ChatRequest(messages=(ChatMessage("user", "hi"),)))
        await client.unload_adapter("policy-v2")
        plain = await client.chat(ChatRequest(messages=(ChatMessage("user", "hi"),)))
    loads = [e for log in logs for e in log if e.get("path") == "/v1/load_lora_adapter"]
    assert (
        loads
        == [
            {
                "path": "/v1/load_lora_adapter",
                "lora_name": "policy-v2",
                "lora_path": "/adapters/v2",
                "load_inplace": True,
            }
        ]
        * 2
    )
    unloads = [e for log in logs for e in log if e.get("path") == "/v1/unload_lora_adapter"]
    assert len(unloads) == 2
    chats = [e for log in logs for e in log if "messages" in e]
    assert [c["model"] for c in chats] == ["policy-v2", "served-model"]
    assert plain.model == "served-model" and tuned.model_id == "policy-v2"


async def test_chat_reads_vllm_prompt_token_ids_and_reports_the_fields_it_sent():
    log: list[dict] = []
    with BackgroundServer(fake_vllm_app(log)) as server:
        client = OpenAIChatClient(server.url, model="m", extra_body={"min_p": 0.05, "top_k": 20})
        request = ChatRequest(
            messages=(ChatMessage("system", "sys"), ChatMessage("user", "look", (red_image(),))),
            sampling=SamplingParams(temperature=0.7, max_tokens=12, seed=5, top_k=4),
        )
        completion = await client.chat(request)
        await client.aclose()
    [sent] = log
    # vLLM's layout: the prompt's ids top-level, the sampled ids on the choice.
    assert completion.prompt_token_ids == tuple(_prompt_ids(sent["messages"], True))
    assert completion.prompt_token_ids.count(IMAGE_PLACEHOLDER) == 4
    assert completion.token_ids == (60, 61, 62)
    # Everything sent but the model and the base64-laden messages, extra_body included.
    assert completion.sampling == {k: v for k, v in sent.items() if k not in ("model", "messages")}
    assert completion.sampling["top_k"] == 20  # extra_body wins over SamplingParams.top_k
    assert completion.sampling["min_p"] == 0.05 and completion.sampling["seed"] == 5
    assert "base64" not in json.dumps(completion.sampling)


# Qwen2.5-VL-7B-Instruct's generation_config.json sampling fields, as vLLM reads them.
QWEN25_VL_GENERATION_CONFIG = {
    "repetition_penalty": 1.05,
    "temperature": 1e-06,
    "top_k": 1,
    "top_p": 0.001,
}


def vllm_effective_sampling(body: dict, generation_config: dict) -> dict:
    """What vLLM samples with for a chat request: each field the request omits (or sends as
    null) comes from the model's generation config, else from vLLM's own neutral default
    (``ChatCompletionRequest.to_sampling_params`` with ``get_diff_sampling_param``)."""
    neutral = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0}
    effective = {}
    for key, default in neutral.items():
        value = body.get(key)
        effective[key] = generation_config.get(key, default) if value is None else value
    if effective["top_k"] == -1:
        effective["top_k"] = 0  # vLLM: -1 and 0 both mean off
    return effective


async def test_every_sampling_field_vllm_would_fill_from_generation_config_is_pinned():
    from nodes.backends.clients.openai_client import PINNED_SAMPLING

    log: list[dict] = []
    with BackgroundServer(fake_vllm_app(log)) as server:
        client = OpenAIChatClient(server.url, model="m")
        look = (ChatMessage("user", "look", (red_image(),)),)
        defaults = await client.chat(ChatRequest(messages=look))
        await client.chat(ChatRequest(messages=look, sampling=SamplingParams(seed=3)))
        await client.with_adapter("reflect-v1").chat(ChatRequest(messages=look))
        user_set = await client.chat(
            ChatRequest(
                messages=look,
                sampling=SamplingParams(temperature=0.7, top_k=4, repetition_penalty=1.2),
            )
        )
        overridden = OpenAIChatClient(server.url, model="m", extra_body={"min_p": 0.05})
        await overridden.chat(ChatRequest(messages=look, sampling=SamplingParams(top_k=4)))
        await client.aclose()
    assert len(log) == 5
    for body in log:  # every chat request names every field, none null
        assert all(body.get(key) is not None for key in PINNED_SAMPLING), body
    neutral = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0}
    for body in log[:3]:
        # Under Qwen2.5-VL's generation config (top_k=1, ...) the server still samples neutrally.
        assert vllm_effective_sampling(body, QWEN25_VL_GENERATION_CONFIG) == neutral
        assert body["top_k"] == -1 and body["min_p"] == 0.0 and body["repetition_penalty"] == 1.0
    assert vllm_effective_sampling(log[3], QWEN25_VL_GENERATION_CONFIG) == {
        **neutral,
        "temperature": 0.7,
        "top_k": 4,  # a user-set top_k is sent as set
        "repetition_penalty": 1.2,
    }
    assert log[4]["min_p"] == 0.05 and log[4]["top_k"] == 4  # extra_body wins
    # The step records what was sent, pinned fields included.
    assert defaults.sampling is not None and user_set.sampling is not None
    assert {k: defaults.sampling[k] for k in PINNED_SAMPLING} == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 1024,
    }
    assert user_set.sampling["top_k"] == 4 and user_set.sampling["repetition_penalty"] == 1.2


async def test_a_server_without_prompt_ids_gives_none_and_the_store_records_the_rest(tmp_path):
    from storage.store import TrajectoryStore
    from tests.fake_servers import FakeModelServer
    from training.text.sampling import collect, prompt_messages

    fake = FakeModelServer()  # answers like an older vLLM: no prompt_token_ids
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'fake.db'}")
    with BackgroundServer(fake.app) as server:
        client = OpenAIChatClient(server.url, model="fake")
        completion = await client.chat(ChatRequest(messages=(ChatMessage("user", "hi"),)))
        assert completion.prompt_token_ids is None and completion.token_ids == (1, 2, 3, 4)
        run_id = await collect(client, store, ["a red circle"], group_size=2, max_tokens=5)
        await client.aclose()
    trajectories = store.trajectories(run=run_id)
    steps = store.steps_many([t.id for t in trajectories])
    generations = [g for t in trajectories for s in steps[t.id] for g in s.generations]
    assert len(generations) == 2
    for g in generations:
        assert g.prompt_token_ids is None
        assert g.messages == messages_payload(prompt_messages("a red circle"))
        assert g.sampling["max_tokens"] == 5 and g.sampling["return_token_ids"] is True
        assert g.token_ids and len(g.token_ids) == len(g.logprobs)
    store.close()


def test_legacy_token_ids_are_read_from_logprob_tokens():
    body = {
        "model": "m",
        "choices": [
            {
                "message": {"content": "ab"},
                "logprobs": {
                    "content": [
                        {"token": "token_id:7", "logprob": -1.0},
                        {"token": "token_id:9", "logprob": -2.0},
                    ]
                },
                "finish_reason": "length",
            }
        ],
    }
    completion = parse_chat_completion(body)
    assert completion.token_ids == (7, 9) and completion.logprobs == (-1.0, -2.0)
    assert completion.finish_reason == "length"
    body["choices"][0]["token_ids"] = [7]
    with pytest.raises(WireFormatError, match="1 token ids but 2 log-probs"):
        parse_chat_completion(body)


# --- the pool: retries, failures, balancing ---------------------------------------------------


async def test_503_twice_then_200_is_retried_and_succeeds():
    hits: list[str] = []
    with BackgroundServer(counting_app("a", hits, [503, 503])) as server:
        pool = ServerPool(server.url, retry=FAST_RETRY)
        body = await pool.post_json("probe", "/x", {})
        await pool.aclose()
    assert body == {"server": "a"}
    assert hits == ["a", "a", "a"]


async def test_a_busy_servers_retry_after_is_waited_for_up_to_the_backoff_cap():
    stamps: list[float] = []

    async def busy_once(request: Request) -> JSONResponse:
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            return JSONResponse({"error": {}}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/x", busy_once, methods=["POST"])])
    with BackgroundServer(app) as server:
        waits = RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.6, cooldown_s=0.0)
        pool = ServerPool(server.url, retry=waits)
        assert await pool.post_json("probe", "/x", {}) == {"ok": True}
        await pool.aclose()
    # 1 s asked, 0.6 s cap: far above the 0.01 s backoff, and not the full second
    assert 0.55 < stamps[1] - stamps[0] < 0.95


async def test_a_request_that_ran_past_the_servers_deadline_is_not_retried():
    hits: list[str] = []

    async def slow_work(request: Request) -> JSONResponse:
        hits.append("x")
        error = {"message": "ran past this server's deadline of 300 s", "type": "timeout"}
        return JSONResponse({"error": {**error, "code": 504}}, status_code=504)

    app = Starlette(routes=[Route("/x", slow_work, methods=["POST"])])
    with BackgroundServer(app) as server:
        pool = ServerPool(server.url, retry=FAST_RETRY)
        with pytest.raises(BackendUnavailable, match="gave up after 1 attempt;"):
            await pool.post_json("probe", "/x", {})
        await pool.aclose()
    assert hits == ["x"]  # a proxy's 504 (no "timeout" type) is retried like any 5xx


async def test_a_down_server_gives_a_backend_error_naming_the_url():
    url = dead_url()
    pool = ServerPool(url, retry=RetryPolicy(retries=2, backoff_s=0.01))
    with pytest.raises(BackendUnavailable) as info:
        await pool.post_json("chat", "/v1/chat/completions", {})
    error = info.value
    assert isinstance(error, BackendError)
    assert url in str(error) and "chat" in str(error) and "3 attempts" in str(error)
    assert error.url == url + "/v1/chat/completions" and error.kind == "chat"


async def test_5xx_exhausting_retries_names_the_status_and_4xx_is_not_retried():
    hits: list[str] = []
    with BackgroundServer(counting_app("a", hits, [500] * 10)) as server:
        pool = ServerPool(server.url, retry=RetryPolicy(retries=1, backoff_s=0.01))
        with pytest.raises(BackendUnavailable, match=r"HTTP 500: status 500"):
            await pool.post_json("images.generations", "/x", {})
        assert hits == ["a", "a"]
    hits.clear()
    with BackgroundServer(counting_app("b", hits, [422])) as server:
        pool = ServerPool(server.url, retry=FAST_RETRY)
        with pytest.raises(BackendRequestError, match="refused: HTTP 422") as info:
            await pool.post_json("chat", "/x", {})
        assert info.value.status == 422 and server.url in str(info.value)
    assert hits == ["b"]


async def test_a_failing_server_is_avoided_and_its_requests_retried_elsewhere():
    hits: list[str] = []
    with BackgroundServer(counting_app("good", hits)) as good:
        pool = ServerPool([dead_url(), good.url], retry=FAST_RETRY)
        answers = [await pool.post_json("probe", "/x", {}) for _ in range(6)]
    assert all(a == {"server": "good"} for a in answers)
    assert hits == ["good"] * 6


@pytest.mark.parametrize("strategy", ["least_inflight", "round_robin"])
async def test_load_balancing_spreads_requests_over_two_servers(strategy):
    hits: list[str] = []
    with (
        BackgroundServer(counting_app("a", hits)) as a,
        BackgroundServer(counting_app("b", hits)) as b,
    ):
        pool = ServerPool([a.url, b.url], strategy=strategy, retry=FAST_RETRY)
        for _ in range(6):
            await pool.post_json("probe", "/x", {})
        await asyncio.gather(*(pool.post_json("probe", "/x", {}) for _ in range(6)))
        counters = pool.counters()
    assert hits.count("a") == hits.count("b") == 6
    assert counters[a.url]["requests"] == counters[b.url]["requests"] == 6


async def test_health_checks_mark_servers_up_and_down():
    hits: list[str] = []
    with BackgroundServer(counting_app("a", hits)) as a:
        down = dead_url()
        pool = ServerPool([down, a.url], retry=FAST_RETRY, strategy="round_robin")
        assert await pool.check_health() == {down: False, a.url: True}
        for _ in range(3):  # the down server is skipped while its cool-down lasts
            await pool.post_json("probe", "/x", {})
    assert hits == ["a"] * 3


async def test_periodic_health_checks_keep_requests_off_a_dead_server():
    hits: list[str] = []
    with BackgroundServer(counting_app("a", hits)) as a:
        down = dead_url()
        pool = ServerPool([down, a.url], retry=FAST_RETRY, health_interval_s=60)
        await asyncio.gather(*(pool.post_json("probe", "/x", {}) for _ in range(4)))
        counters = pool.counters()
        in_flight = {server.url: server.in_flight for server in pool.servers}
    assert hits == ["a"] * 4
    assert in_flight == {down: 0, a.url: 0}
    assert counters[down] == dict.fromkeys(counters[down], 0)  # never sent, never in flight
    assert set(counters[down]) >= {"requests", "failures", "peak_in_flight"}


# --- the image client -------------------------------------------------------------------------


def fake_omni_app(log: list[dict]) -> Starlette:
    def answer(size: str) -> JSONResponse:
        width, height = parse_size(size)
        png = image_to_png(Image.new("RGB", (width, height), (0, 0, 255)))
        return JSONResponse({"data": [{"b64_json": base64.b64encode(png).decode()}]})

    async def generations(request: Request) -> JSONResponse:
        body = await request.json()
        log.append({"kind": "generations", **body})
        return answer(body["size"])

    async def edits(request: Request) -> JSONResponse:
        form = await request.form()
        upload = form["image"]
        image = decode_image(await upload.read())
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        log.append({"kind": "edits", "image_size": image.size, **fields})
        return answer(fields["size"])

    return Starlette(
        routes=[
            Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/images/edits", edits, methods=["POST"]),
        ]
    )


async def test_omni_client_generates_with_json_and_edits_with_multipart():
    log: list[dict] = []
    with BackgroundServer(fake_omni_app(log)) as server:
        client = OmniImageClient(server.url, model="qwen-image", extra_body={"guidance_scale": 4})
        assert isinstance(client, ImageGenerator) and isinstance(client, ImageEditor)
        image = await client.generate(ImageRequest("a red circle", 48, 32, seed=7, steps=3))
        edited = await client.edit(EditRequest(image, "make it red", seed=8, steps=2))
    assert image.size == (48, 32) and edited.size == (48, 32)
    generation, edit = log
    assert generation == {
        "kind": "generations",
        "prompt": "a red circle",
        "size": "48x32",
        "seed": 7,
        "n": 1,
        "response_format": "b64_json",
        "guidance_scale": 4,
        "model": "qwen-image",
        "num_inference_steps": 3,
    }
    assert edit["prompt"] == "make it red" and edit["seed"] == "8" and edit["size"] == "48x32"
    assert edit["num_inference_steps"] == "2" and edit["image_size"] == (48, 32)
    assert edit["guidance_scale"] == "4" and edit["model"] == "qwen-image"


def vllm_omni_lora(value):
    """vLLM-Omni's reading of a request's ``lora`` field (``parse_lora_request`` in
    ``vllm_omni/entrypoints/openai/utils.py``; edit forms carry it as JSON text): None, or
    (name, path, scale); a ValueError where vLLM-Omni answers 400."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError("Invalid lora field: expected an object.")
    name = value.get("name") or value.get("lora_name") or value.get("adapter")
    path = value.get("local_path") or value.get("path") or value.get("lora_path")
    if not name or not path:
        raise ValueError("Invalid lora object: both name and path are required.")
    scale = value.get("scale")
    return name, path, None if scale is None else float(scale)


def lora_checking_omni_app(log: list) -> Starlette:
    """A fake vLLM-Omni that parses ``lora`` as vLLM-Omni does and logs what it read."""

    def answer(fields: dict) -> JSONResponse:
        try:
            log.append((fields["kind"], vllm_omni_lora(fields.get("lora"))))
        except (ValueError, TypeError) as error:
            return JSONResponse({"error": {"message": str(error)}}, status_code=400)
        png = image_to_png(Image.new("RGB", parse_size(fields["size"]), (0, 0, 255)))
        return JSONResponse({"data": [{"b64_json": base64.b64encode(png).decode()}]})

    async def generations(request: Request) -> JSONResponse:
        return answer({"kind": "generations", **(await request.json())})

    async def edits(request: Request) -> JSONResponse:
        form = await request.form()
        return answer({"kind": "edits", **{k: v for k, v in form.items() if isinstance(v, str)}})

    return Starlette(
        routes=[
            Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/images/edits", edits, methods=["POST"]),
        ]
    )


async def test_omni_client_sends_a_per_request_lora_that_vllm_omni_reads():
    log: list = []
    with BackgroundServer(lora_checking_omni_app(log)) as server:
        base = OmniImageClient(server.url, model="qwen-image")
        tuned = base.with_adapter("draw@3", "/adapters/draw-3", scale=0.8)
        registered = base.with_adapter("draw@4")  # a name the server registered
        image = await tuned.generate(ImageRequest("a red circle", 16, 16, seed=1))
        await tuned.edit(EditRequest(image, "make it blue", seed=2))
        await base.generate(ImageRequest("a red circle", 16, 16, seed=1))
        await base.edit(EditRequest(image, "make it blue", seed=2))
        with pytest.raises(BackendRequestError, match="both name and path are required"):
            await registered.generate(ImageRequest("a red circle", 16, 16))  # this vLLM-Omni
        await base.aclose()
    assert log == [
        ("generations", ("draw@3", "/adapters/draw-3", 0.8)),
        ("edits", ("draw@3", "/adapters/draw-3", 0.8)),
        ("generations", None),  # the base client sends no lora
        ("edits", None),
    ]
    # What the draw and refine steps record (``trace.models``) names the adapter and its scale.
    assert tuned.model_id == "draw@3*0.8" and registered.model_id == "draw@4"
    assert base.model_id == "qwen-image" and tuned.with_adapter(None).model_id == "qwen-image"
    assert tuned.pool is base.pool  # the same servers and connections
    with pytest.raises(ValueError, match="adapter_path needs an adapter name"):
        OmniImageClient("http://127.0.0.1:1", adapter_path="/a")
    with pytest.raises(ValueError, match="not in extra_body"):
        OmniImageClient("http://127.0.0.1:1", extra_body={"lora": {"name": "x"}})


async def test_the_recorded_draw_and_refine_steps_name_the_omni_adapter(tmp_path):
    from agent_graph.runner import Runner
    from nodes.context import Backends, GraphSettings, ReasonerContext
    from nodes.state import Budget, Task
    from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
    from storage.recorder import SQLRecorder
    from storage.store import TrajectoryStore
    from tests.scripted import FixedJudge, ScriptedChat

    log: list = []
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'omni.db'}")
    run = store.create_run("omni-lora", {"mode": "reflect"})
    with BackgroundServer(lora_checking_omni_app(log)) as server:
        painter = OmniImageClient(server.url, model="qwen-image").with_adapter(
            "draw@3", "/adapters/draw-3"
        )
        edit = "<think>No star.</think>Add a star."
        stop = "<think>Done.</think>No further edit needed."
        async with SQLRecorder(store, run.id) as recorder:
            context = ReasonerContext(
                backends=Backends(
                    planner=ScriptedChat(["a red circle"]),
                    reflector=ScriptedChat([edit, stop]),
                    decomposer=ScriptedChat(["{}"]),
                    generator=painter,
                    editor=painter,
                    judge=FixedJudge(0.5),
                ),
                mode_policy=FixedModePolicy("reflect"),
                stop_policy=FollowReflectionStopPolicy(),
                images=store,
                settings=GraphSettings(width=16, height=16),
                recorder=recorder,
            )
            result = await Runner(context, budget=Budget(max_rounds=2)).run_one(
                Task(prompt="a red circle", seed=4)
            )
        await painter.aclose()
    assert result.status == "succeeded", result.error
    steps = store.trajectory(result.state.trajectory_id).steps
    image_steps = [s for s in steps if s.node in ("draw", "refine")]
    assert [s.node for s in image_steps] == ["draw", "refine"]
    assert all(s.models == ["draw@3"] for s in image_steps)
    assert log == [
        ("generations", ("draw@3", "/adapters/draw-3", 1.0)),
        ("edits", ("draw@3", "/adapters/draw-3", 1.0)),
    ]
    store.close()


async def test_asking_vllm_omni_for_transitions_fails_saying_it_is_atelier_only():
    from nodes.backends.clients.omni_client import TracedOmniImageClient

    log: list[dict] = []
    with BackgroundServer(fake_omni_app(log)) as server:  # answers like vLLM-Omni: no transitions
        client = TracedOmniImageClient(server.url)
        with pytest.raises(WireFormatError, match="extension of Atelier's own image server"):
            await client.generate_traced(ImageRequest("a red circle", 16, 16, seed=1))
        await client.aclose()
    assert log[0]["return_transitions"] is True  # it did ask


# --- wire helpers -------------------------------------------------------------------------------


def test_image_decoding_refuses_bombs_and_broken_bytes():
    big = image_to_png(Image.new("L", (300, 300)))
    with pytest.raises(ImageDecodeError, match="300x300 = 90000 pixels; the limit is 1000"):
        decode_image(big, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="could not decode image"):
        decode_image(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ImageDecodeError, match="could not decode image"):
        decode_image(big[: len(big) // 2])
    with pytest.raises(ImageDecodeError, match="not valid base64"):
        decode_b64_image("data:image/png;base64,@@@")
    assert decode_image(big).size == (300, 300)


def test_sizes_parse_strictly():
    assert parse_size("512x256") == (512, 256)
    for bad in ("512", "x512", "512x", "axb", "0x5"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_light_modules_do_not_import_heavy_libraries():
    code = (
        "import sys, nodes.backends.base, atelier.cli.serve, nodes.backends.config, "
        "nodes.backends.clients.openai_client, nodes.backends.clients.omni_client, "
        "nodes.backends.clients.pool\n"
        "from atelier.cli.serve import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'fastapi', 'uvicorn') "
        "if m in sys.modules]\n"
        "print(json.dumps(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []
    help_text = subprocess.run(
        [sys.executable, "-m", "atelier.cli.serve", "lm", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--max-batch" in help_text and "--token" in help_text
