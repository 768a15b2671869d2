"""Servers that are slow, truncate their bodies, or answer garbage: each gives a clear error
(or a retried success), a trajectory that meets one is recorded as failed with the reason, and
nothing hangs."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent_graph.runner import Runner
from nodes.backends.base import BackendError, ChatMessage, ChatRequest, ImageRequest
from nodes.backends.clients.omni_client import OmniImageClient
from nodes.backends.clients.openai_client import OpenAIChatClient
from nodes.backends.clients.pool import RetryPolicy, Timeouts
from nodes.backends.servers.http_common import BackgroundServer
from nodes.context import Backends, ReasonerContext
from nodes.state import Task
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
from tests.scripted import CountingPainter, ScriptedChat

FAST = RetryPolicy(retries=1, backoff_s=0.01, max_backoff_s=0.02, cooldown_s=0.1)


def app(body: bytes, *, delay_s: float = 0.0, media: str = "application/json") -> Starlette:
    async def answer(request: Request) -> Response:
        await asyncio.sleep(delay_s)
        return Response(body, media_type=media)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"id": "m"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", answer, methods=["POST"]),
            Route("/v1/images/generations", answer, methods=["POST"]),
            Route("/v1/models", models),
        ]
    )


def chat_request() -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", "hello"),))


@pytest.mark.parametrize(
    ("body", "media"),
    [
        (b"<html>bad gateway</html>", "text/html"),
        (b'{"choices": [{"message": {"cont', None),
        (b'{"choices": []}', None),
        (b'{"unexpected": true}', None),
    ],
)
async def test_garbage_chat_bodies_give_a_clear_backend_error(body, media):
    with BackgroundServer(app(body, media=media or "application/json")) as server:
        client = OpenAIChatClient(server.url, model="m", retry=FAST)
        started = time.perf_counter()
        with pytest.raises(BackendError) as info:
            await client.chat(chat_request())
        await client.aclose()
    assert time.perf_counter() - started < 10
    assert server.url in str(info.value)


@pytest.mark.slow
async def test_a_slow_server_times_out_with_the_url_named():
    with BackgroundServer(app(b"{}", delay_s=5.0)) as server:
        client = OpenAIChatClient(
            server.url, model="m", retry=FAST, timeouts=Timeouts(request_s=0.3, connect_s=0.3)
        )
        started = time.perf_counter()
        with pytest.raises(BackendError) as info:
            await client.chat(chat_request())
        elapsed = time.perf_counter() - started
        await client.aclose()
    assert elapsed < 4  # two attempts of 0.3 s, not the server's 5 s
    assert server.url in str(info.value)


async def test_image_bytes_that_are_not_an_image_are_refused():
    body = b'{"data": [{"b64_json": "' + base64.b64encode(b"definitely not a png") + b'"}]}'
    with BackgroundServer(app(body)) as server:
        client = OmniImageClient(server.url, model="m", retry=FAST)
        with pytest.raises(BackendError) as info:
            await client.generate(ImageRequest(prompt="x", width=16, height=16))
        await client.aclose()
    assert server.url in str(info.value)


async def test_a_trajectory_meeting_a_garbage_server_is_recorded_as_failed():
    with BackgroundServer(app(b"not json at all", media="text/plain")) as server:
        planner = OpenAIChatClient(server.url, model="m", retry=FAST)
        painter = CountingPainter()
        context = ReasonerContext(
            backends=Backends(
                planner=planner,
                reflector=ScriptedChat(["x"]),
                decomposer=ScriptedChat(["x"]),
                generator=painter,
                editor=painter,
            ),
            mode_policy=FixedModePolicy("reflect"),
            stop_policy=FollowReflectionStopPolicy(),
        )
        result = await asyncio.wait_for(Runner(context).run_one(Task(prompt="p")), timeout=30)
        await planner.aclose()
    assert result.status == "failed"
    assert server.url in result.error and result.error.startswith("plan:")
    assert [s.node for s in result.steps] == ["plan", "stop"]
    assert painter.calls == []


def test_loopback_servers_listen_as_tcp_so_responses_are_not_delayed():
    # proto 0 made asyncio skip TCP_NODELAY on accepted connections: +40 ms per response.
    import socket

    from nodes.backends.servers.http_common import free_socket

    sock = free_socket()
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
