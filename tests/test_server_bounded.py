"""Bounded work on ``atelier serve lm|image`` (issue #16): a full queue is a 503 with
``Retry-After``; a deadline is a 504; a client that disconnects, a deadline that passes and a
server shutting down each stop the model's batch between steps (denoising steps, generated
tokens), so one request cannot hold the model for ever; limits a deployer sets (output size,
steps, n, prompt characters, decoded pixels per request) are 400s that say which; SIGTERM drains
for a bounded time.

The queueing and cancellation mechanics run first against a slow engine of known step count
behind the real batcher, FastAPI app and uvicorn (so "stopped after k of n steps" is exact);
then the same is checked on the tiny diffusers and transformers models, counting their
forward passes."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from nodes.backends.abandon import raise_if_abandoned
from nodes.backends.engines.image_inprocess import ImageService
from nodes.backends.servers.http_common import BackgroundServer, ServerLimits
from nodes.backends.servers.image_server import create_image_app
from nodes.backends.wire import parse_size

pytest_plugins = ("tests.tiny_models",)

STEP_S = 0.02


class SlowEngine:
    """An image engine whose every job takes ``steps`` steps of ``STEP_S`` seconds, checking for
    abandonment between steps like the real samplers; it counts the steps it ran."""

    name = "slow"
    device = "cpu"
    can_generate = True
    can_edit = False

    def __init__(self) -> None:
        self.adapters: dict[str, str] = {}
        self.steps_run = 0
        self.batches_started = 0
        self.started = threading.Event()

    def run_batch(self, jobs: Sequence[Any]) -> list[Any]:
        self.batches_started += 1
        self.started.set()
        for _ in range(max(job.steps or 1 for job in jobs)):
            raise_if_abandoned()
            time.sleep(STEP_S)
            self.steps_run += 1
        return [Image.new("RGB", job.size, "white") for job in jobs]


def slow_server(
    max_wait_ms: float = 1, **limits: Any
) -> tuple[BackgroundServer, SlowEngine, ImageService]:
    engine = SlowEngine()
    service = ImageService(engine, max_batch=4, max_wait_ms=max_wait_ms)
    # The fake engine has no native size: requests without one are 8x8 (the default, 512x512,
    # would be beyond the small output limits some tests set, refused at start-up).
    app = create_image_app(
        service, limits=ServerLimits(**{"max_steps": 1000, **limits}), default_size=(8, 8)
    )
    return BackgroundServer(app).start(), engine, service


@pytest.fixture
def slow() -> Iterator[tuple[BackgroundServer, SlowEngine, ImageService]]:
    server, engine, service = slow_server(request_timeout_s=30, max_queue=2)
    yield server, engine, service
    server.stop()
    service.close()


def generate(url: str, steps: int, timeout: float = 30, **extra: Any) -> httpx.Response:
    body = {"prompt": "x", "size": "8x8", "num_inference_steps": steps, **extra}
    return httpx.post(url + "/v1/images/generations", json=body, timeout=timeout)


def stats(server: BackgroundServer) -> dict[str, Any]:
    return httpx.get(server.url + "/stats", timeout=10).json()


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def in_background(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn`` on a thread; the returned dict gets its ``result`` or ``error``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except Exception as error:
            box["error"] = error

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


# --- the queue, deadlines, disconnects (slow engine) -----------------------------------------


def test_a_full_queue_is_a_503_with_retry_after_and_nothing_is_lost(slow):
    server, engine, _ = slow
    first = in_background(generate, server.url, 40)  # 0.8 s: runs
    wait_for(engine.started.is_set)
    second = in_background(generate, server.url, 1, seed=2)  # waits behind it
    wait_for(lambda: stats(server)["pending"] == 2)
    refused = generate(server.url, 1, seed=3)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "server_busy"
    for box in (first, second):
        box["thread"].join(30)
        assert box["result"].status_code == 200
    assert stats(server)["refused"] == 1
    assert generate(server.url, 1).status_code == 200  # the queue drained


def test_a_deadline_is_a_504_and_stops_the_work_between_steps():
    server, engine, service = slow_server(request_timeout_s=0.3)
    try:
        reply = generate(server.url, 500)  # 10 s of work
        assert reply.status_code == 504, reply.text
        assert "deadline of 0.3 s" in reply.json()["error"]["message"]
        assert reply.json()["error"]["type"] == "timeout"
        wait_for(lambda: stats(server)["abandoned_batches"] == 1)
        assert engine.steps_run < 100  # stopped long before its 500 steps
        assert generate(server.url, 2).status_code == 200  # the model is free again
    finally:
        server.stop()
        service.close()


def test_the_deadline_counts_from_the_batchs_start_not_the_queue():
    """A small request queued behind a long one that hits the deadline is still served: the
    deadline bounds how long one request holds the model, and the wait in the queue is
    bounded by the queue's size (and the client's own patience)."""
    engine = KeyedSlowEngine()
    service = ImageService(engine, max_batch=4, max_wait_ms=1)
    limits = ServerLimits(max_steps=1000, request_timeout_s=0.5)
    server = BackgroundServer(create_image_app(service, limits=limits)).start()
    try:
        long = in_background(generate, server.url, 500)  # 10 s of work
        wait_for(engine.started.is_set)
        time.sleep(0.3)
        small = generate(server.url, 5)  # queued for ~0.2 s, then 0.1 s of work
        long["thread"].join(30)
        assert long["result"].status_code == 504
        assert small.status_code == 200, small.text
    finally:
        server.stop()
        service.close()


def test_a_client_that_disconnects_stops_its_work(slow):
    server, engine, _ = slow
    with pytest.raises(httpx.ReadTimeout):
        generate(server.url, 500, timeout=0.3)  # the client gives up and closes the socket
    wait_for(lambda: stats(server)["abandoned_batches"] == 1)
    assert engine.steps_run < 100
    started = time.monotonic()
    assert generate(server.url, 2).status_code == 200  # the model is free again at once
    assert time.monotonic() - started < 5


def test_a_batch_runs_on_while_one_of_its_callers_still_waits():
    # The batcher collects for 0.5 s: both requests land in one batch. One caller leaves while
    # it runs, the other gets its image, and every step is run for it.
    server, engine, service = slow_server(max_wait_ms=500, request_timeout_s=30)
    try:
        staying = in_background(generate, server.url, 60, seed=1)
        with pytest.raises(httpx.ReadTimeout):
            generate(server.url, 60, timeout=0.9, seed=2)
        staying["thread"].join(30)
        assert staying["result"].status_code == 200
        assert stats(server)["batch_sizes"] == [2]
        assert stats(server)["abandoned_batches"] == 0
        assert engine.batches_started == 1 and engine.steps_run == 60
    finally:
        server.stop()
        service.close()


class KeyedSlowEngine(SlowEngine):
    """Like the real engines: jobs with different steps never share a model call."""

    @staticmethod
    def batch_key(job: Any) -> Any:
        return job.steps


def test_a_small_request_does_not_wait_inside_a_long_ones_batch():
    engine = KeyedSlowEngine()
    service = ImageService(engine, max_batch=4, max_wait_ms=300)
    server = BackgroundServer(create_image_app(service, limits=ServerLimits(max_steps=1000)))
    server.start()
    try:
        long = in_background(generate, server.url, 300, timeout=1.5)  # 6 s; leaves at 1.5 s
        time.sleep(0.05)  # both arrive within one 0.3 s collection window
        started = time.monotonic()
        small = generate(server.url, 2)
        waited = time.monotonic() - started
        long["thread"].join(30)
        assert small.status_code == 200
        assert isinstance(long.get("error"), httpx.ReadTimeout)
        wait_for(lambda: stats(server)["abandoned_batches"] == 1)
        # Two model calls: the long one ran first (it came first) and was abandoned when its
        # client left; the small one then ran alone, not to the end of the long one's 300 steps.
        assert stats(server)["batch_sizes"] == [1, 1]
        assert waited < 4.0 and engine.steps_run < 150
    finally:
        server.stop()
        service.close()


def test_a_refused_image_of_n_cancels_the_images_already_queued():
    server, engine, service = slow_server(max_queue=2, request_timeout_s=30)
    try:
        reply = generate(server.url, 20, n=4)  # four jobs, the queue takes two
        assert reply.status_code == 503
        wait_for(lambda: stats(server)["pending"] == 0)
        time.sleep(0.2)
        assert engine.steps_run < 20  # the two it had queued were cancelled, not drawn
    finally:
        server.stop()
        service.close()


# --- limits a deployer sets --------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, "PNG")
    return buffer.getvalue()


def test_image_limits_are_400s_that_name_the_limit():
    server, engine, service = slow_server(
        max_output_pixels=64 * 64, max_steps=50, max_images_per_generation=2, max_prompt_chars=100
    )
    try:
        cases = [
            ({"size": "128x128"}, "exceeds this server's limit of 4096 pixels"),
            ({"size": "64x64", "num_inference_steps": 51}, "num_inference_steps 51 exceeds"),
            ({"size": "8x8", "n": 3}, "n 3 exceeds this server's limit of 2"),
            ({"size": "8x8", "prompt": "y" * 101}, "the prompt is 101 characters"),
            ({"size": "٣x٣"}, "expected 'WIDTHxHEIGHT'"),
        ]
        for extra, message in cases:
            reply = httpx.post(
                server.url + "/v1/images/generations", json={"prompt": "x", **extra}, timeout=10
            )
            assert reply.status_code == 400 and message in reply.text, (extra, reply.text)
        assert engine.batches_started == 0  # refused before any work
    finally:
        server.stop()
        service.close()


@pytest.mark.models
def test_scheduler_steps_bound_num_inference_steps(image_service):
    """1000 steps used to be an IndexError (a 500) inside diffusers: the tiny SD's DDIM has 1000
    training steps and ``steps_offset`` 1. Now it is refused up front at the scheduler's limit
    (999), and at the server's own when that is lower."""
    app = create_image_app(image_service, limits=ServerLimits(max_steps=5000))
    with BackgroundServer(app) as server:
        reply = generate(server.url, 1000, size="16x16")
        assert reply.status_code == 400, reply.text
        assert "num_inference_steps 1000 exceeds this server's limit of 999" in reply.text
    with BackgroundServer(create_image_app(image_service)) as server:
        reply = generate(server.url, 101, size="16x16")
        assert reply.status_code == 400 and "limit of 100" in reply.text


@pytest.mark.models
def test_an_auto_sized_edit_of_a_huge_upload_is_refused(image_service):
    app = create_image_app(image_service, limits=ServerLimits(max_output_pixels=128 * 128))
    with BackgroundServer(app) as server:
        reply = httpx.post(
            server.url + "/v1/images/edits",
            files={"image": ("big.png", png(512, 512), "image/png")},
            data={"prompt": "x", "size": "auto"},
            timeout=30,
        )
    assert reply.status_code == 400 and "size 'auto'" in reply.text, reply.text


@pytest.mark.models
def test_default_output_limit_is_the_models_native_size_on_cpu(image_service):
    from nodes.backends.servers.image_server import default_output_pixels, native_side

    side = native_side(image_service.engine)
    assert side == 64  # the tiny SD: sample_size 32 × its VAE's factor 2
    assert default_output_pixels(image_service) == 64 * 64


def data_url(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(width, height)).decode()


@pytest.mark.models
def test_lm_prompt_characters_and_request_pixels_are_bounded(vlm_service):
    from nodes.backends.servers.lm_server import create_lm_app

    limits = ServerLimits(max_request_pixels=3 * 100 * 100, max_body_bytes=4 * 1024 * 1024)
    with BackgroundServer(create_lm_app(vlm_service, limits=limits)) as server:
        context = vlm_service.engine.max_model_len
        long = {"messages": [{"role": "user", "content": "a" * (32 * context + 1)}]}
        reply = httpx.post(server.url + "/v1/chat/completions", json=long, timeout=30)
        assert reply.status_code == 400, reply.text
        assert f"the prompt is {32 * context + 1} characters" in reply.text
        images = [{"type": "image_url", "image_url": {"url": data_url(100, 100)}}] * 4
        many = {"messages": [{"role": "user", "content": images}], "max_tokens": 1}
        reply = httpx.post(server.url + "/v1/chat/completions", json=many, timeout=30)
        assert reply.status_code == 400, reply.text
        assert "messages[0].content[3]" in reply.text and "decoded pixels per request" in reply.text


# --- malformed requests are JSON 4xx, never 500 ------------------------------------------------


@pytest.fixture
def locked(slow):
    _, _, service = slow
    app = create_image_app(service, token="t0k", runtime_lora=False)
    with BackgroundServer(app) as locked_server:
        yield locked_server


def test_malformed_json_is_a_400_not_a_500(slow):
    server, _, _ = slow
    url = server.url + "/v1/images/generations"
    deep = "[" * 1000 + "]" * 1000
    nested = '{"prompt": "x", "lora": ' + '{"a":' * 40 + "1" + "}" * 40 + "}"
    for raw in (deep, nested, '{"prompt": "\\ud800"}', b'{"prompt": "\xff"}', "[]"):
        reply = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert reply.status_code == 400, (raw[:30], reply.text)
        assert set(reply.json()["error"]) == {"message", "type", "code"}


def test_openapi_and_unknown_paths_answer_json(slow):
    server, _, _ = slow
    schema = httpx.get(server.url + "/openapi.json", timeout=10)
    assert schema.status_code == 200 and "/v1/images/generations" in schema.json()["paths"]
    missing = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    wrong_method = httpx.get(server.url + "/v1/images/generations", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == 405


def test_the_bearer_scheme_is_case_insensitive_and_lora_endpoints_can_be_off(locked):
    for header in ("Bearer t0k", "bearer t0k", "BEARER  t0k"):
        reply = httpx.get(locked.url + "/stats", headers={"authorization": header}, timeout=10)
        assert reply.status_code == 200, header
    for header in ("Bearer wrong", "Basic t0k", "t0k", ""):
        reply = httpx.get(locked.url + "/stats", headers={"authorization": header}, timeout=10)
        assert reply.status_code == 401, header
    load = httpx.post(
        locked.url + "/v1/load_lora_adapter",
        json={"lora_name": "a", "lora_path": "/tmp"},
        headers={"authorization": "Bearer t0k"},
        timeout=10,
    )
    assert load.status_code == 404


def test_runtime_lora_is_off_beyond_loopback_without_a_token(monkeypatch):
    from atelier.cli.serve import TOKEN_ENV, _runtime_lora, build_parser

    monkeypatch.delenv(TOKEN_ENV, raising=False)

    def decide(*flags: str) -> bool:
        args = build_parser().parse_args(["serve", "image", "--model", "m", *flags])
        return _runtime_lora(args)

    assert decide()  # loopback
    assert not decide("--host", "0.0.0.0")
    assert decide("--host", "0.0.0.0", "--token", "t")
    assert not decide("--no-runtime-lora")


@pytest.mark.models
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-queue", "-1"], "--max-queue must be 0 (off) or positive"),
        (["--request-timeout", "-5"], "--request-timeout must be 0 (off) or positive"),
        (["--max-steps", "0"], "--max-steps must be positive"),
        (["--max-size", "big"], "--max-size: invalid size 'big'"),
        (["--max-prompt-chars", "0"], "--max-prompt-chars must be positive"),
        (["--size", "512x512"], "--size: the default size 512x512 is beyond the output limit"),
    ],
)
def test_bad_limit_flags_are_one_line(tiny_models, capsys, flags, message):
    from atelier.cli.serve import serve_main

    assert serve_main(["image", "--model", str(tiny_models.sd), *flags]) == 2
    err = capsys.readouterr().err  # (--size is checked once the model has loaded: its bars)
    lines = [line for line in err.splitlines() if line.startswith("atelier:")]
    assert len(lines) == 1 and lines[0].startswith("atelier: error:"), err
    assert message in lines[0] and "Traceback" not in err


def test_parse_size_takes_ascii_digits_only():
    assert parse_size("64x32") == (64, 32)
    for bad in ("٣x٣", "²x²", "1" * 7 + "x1", "x1", "-1x1", "0x4"):
        with pytest.raises(ValueError):
            parse_size(bad)


# --- the real models stop between their steps ---------------------------------------------------


def count_calls(module: Any, pause_s: float = 0.0) -> tuple[list[int], Any]:
    """Count ``module``'s forward passes; ``pause_s`` makes each one that much slower, so a
    tiny model's work outlasts a deadline whatever the machine's speed."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        time.sleep(pause_s)

    return calls, module.register_forward_hook(hook)


@pytest.mark.models
def test_diffusers_denoising_stops_when_the_client_leaves(tiny_models):
    service = ImageService.from_pretrained(tiny_models.sd, name="tiny-sd", torch_threads=1)
    calls, handle = count_calls(service.engine.generator_pipe.unet)
    app = create_image_app(service, limits=ServerLimits(max_steps=1000))
    try:
        with BackgroundServer(app) as server:
            with pytest.raises(httpx.ReadTimeout):
                generate(server.url, 400, timeout=1.0, size="32x32")  # ~30 s of denoising
            wait_for(lambda: stats(server)["abandoned_batches"] == 1, timeout=30)
            assert 0 < calls[0] < 200, calls
            assert generate(server.url, 2, size="32x32").status_code == 200
    finally:
        handle.remove()
        service.close()


@pytest.mark.models
def test_a_generation_row_whose_caller_left_stops_while_the_others_go_on(tiny_models):
    from nodes.backends.abandon import running_batch
    from nodes.backends.engines.transformers_lm import TransformersLM
    from nodes.backends.lm_types import LMRequest, PromptMessage

    engine = TransformersLM(tiny_models.lm)
    engine.stop_ids.clear()  # random weights could stop early; never here

    class Caller:  # a batch future: done before its batch ends = its caller has gone
        def __init__(self, gone: bool) -> None:
            self.gone = gone

        def done(self) -> bool:
            return self.gone

    requests = [
        LMRequest([PromptMessage("user", ("hi",))], max_tokens=12, seed=i) for i in range(3)
    ]
    with running_batch([Caller(False), Caller(True), Caller(False)]):
        results = engine.run_batch(requests)
    assert [r.finish_reason for r in results] == ["length", "abort", "length"]
    assert [len(r.token_ids) for r in results] == [12, 0, 12]
    alone = engine.run_batch([requests[0]])[0]  # the others' tokens are what they would be
    assert alone.token_ids == results[0].token_ids


@pytest.mark.models
def test_generation_stops_between_tokens_at_the_deadline(tiny_models):
    from nodes.backends.engines.lm_inprocess import LMService
    from nodes.backends.servers.lm_server import create_lm_app

    service = LMService.from_pretrained(tiny_models.lm, name="tiny-lm", torch_threads=1)
    calls, handle = count_calls(service.engine.model, pause_s=0.01)  # 512 tokens: > 5 s
    limits = ServerLimits(request_timeout_s=0.5)
    app = create_lm_app(service, limits=limits, max_tokens_limit=100_000)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}
    try:
        with BackgroundServer(app) as server:
            service.engine.stop_ids.clear()  # random weights could stop early; never here
            started = time.monotonic()
            reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 504, reply.text
            assert time.monotonic() - started < 5
            wait_for(lambda: stats(server)["abandoned_batches"] == 1)
            assert calls[0] < service.engine.max_model_len
    finally:
        handle.remove()
        service.close()


# --- SIGTERM drains for a bounded time ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.models
def test_sigterm_cancels_running_work_after_the_drain_timeout(tiny_models, tmp_path):
    from nodes.backends.servers.http_common import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    command = [
        sys.executable, "-m", "atelier.cli", "serve", "image", "--model", str(tiny_models.sd),
        "--port", str(port), "--torch-threads", "1", "--max-steps", "1000",
        "--drain-timeout", "1", "--log-level", "warning",
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), timeout=60)
        long = in_background(generate, url, 900, timeout=120, size="32x32")  # ~70 s of work
        time.sleep(1.0)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        took = time.monotonic() - started
        long["thread"].join(10)
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    assert took < 15, (took, (tmp_path / "server.log").read_text())
    assert "error" in long or long["result"].status_code >= 500


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_stats_report_the_queue(slow):
    server, _, _ = slow
    body = stats(server)
    assert {"pending", "max_queue", "refused", "abandoned_batches"} <= set(body)
    assert body["max_queue"] == 2
    assert json.loads(json.dumps(body)) == body
