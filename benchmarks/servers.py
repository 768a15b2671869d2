"""Throughput of Atelier's own model servers, and the cost of its HTTP chat client.

    PYTHONPATH=. python benchmarks/servers.py [--requests 48] [--repeats 3] [--threads 1]

Builds the tiny random-weight models (``atelier tiny-models``: Qwen2 LM, Stable Diffusion)
once into a temporary directory, then prints Markdown tables, in one run:

(a) ``lm`` server: requests/s and generated tokens/s at client concurrency 1, 8, 32, with
    dynamic batching (``max_batch`` 32, ``max_wait_ms`` 5) and without (``max_batch`` 1);
(b) ``image`` server: images/s at concurrency 1, 8, 32, batched and not (64×64, 2 steps);
(c) client overhead: ``OpenAIChatClient.chat`` against a raw ``httpx.AsyncClient.post`` of the
    same JSON, both against a trivial Starlette endpoint answering a fixed chat completion (so
    only the client's own cost differs); median µs per call and the ratio.

Servers run in this process (uvicorn on a background thread, ``BackgroundServer``, with
TCP_NODELAY set as ``atelier serve`` has it: see :func:`serve`), each model
worker with ``--threads`` intra-op torch threads (1 by default: tiny models are fastest on one
thread, and the machine this was written for has 2 cores). The load generator shares the
process (and the GIL) with the servers, so absolute numbers are a lower bound; the batched
versus unbatched comparison runs interleaved under the same conditions. Figures are medians over
``--repeats`` runs of ``--requests`` requests each (``--requests // 2`` images per run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

CONCURRENCY = (1, 8, 32)
LM_MAX_TOKENS = 16
IMAGE_SIZE = "64x64"
IMAGE_STEPS = 2
BATCHED = {"max_batch": 32, "max_wait_ms": 5.0}
UNBATCHED = {"max_batch": 1, "max_wait_ms": 0.0}
OVERHEAD_CALLS = 1000
FIXED_COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "bench",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "two red circles"},
            "logprobs": {
                "content": [
                    {"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []}
                    for t in ("two", " red", " circles")
                ]
            },
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": [11, 12, 13],
        }
    ],
    "usage": {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11},
    "prompt_logprobs": None,
}


# --- servers ---------------------------------------------------------------------------------


def build_models(root: Path) -> dict[str, Path]:
    from nodes.backends.engines.tiny_models import build_lm, build_sd

    return {"lm": build_lm(root / "lm"), "sd": build_sd(root / "sd")}


def serve(app: Any) -> Any:
    """``BackgroundServer(app)``, started, with TCP_NODELAY on its listening socket (accepted
    connections inherit it on Linux). ``free_socket`` makes the socket with ``proto=0``, so
    asyncio does not set TCP_NODELAY itself and every response stalls ~40 ms on delayed ACKs;
    ``atelier serve`` (``uvicorn.run(host, port)``) is not affected, and this measures that."""
    import socket

    from nodes.backends.servers.http_common import BackgroundServer

    server = BackgroundServer(app)
    server.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server.start()


def start_lm(model: Path, threads: int, batching: dict[str, Any]) -> Any:
    from nodes.backends.engines.lm_inprocess import LMService
    from nodes.backends.servers.lm_server import create_lm_app

    service = LMService.from_pretrained(model, name="tiny-lm", torch_threads=threads, **batching)
    return serve(create_lm_app(service))


def start_image(model: Path, threads: int, batching: dict[str, Any]) -> Any:
    from nodes.backends.engines.image_inprocess import ImageService
    from nodes.backends.servers.image_server import create_image_app

    service = ImageService.from_pretrained(
        model, name="tiny-sd", default_steps=IMAGE_STEPS, torch_threads=threads, **batching
    )
    return serve(create_image_app(service))


# --- load ------------------------------------------------------------------------------------


def lm_payload(i: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "draw two red circles left of a blue square"}],
        "max_tokens": LM_MAX_TOKENS,
        "temperature": 1.0,
        "seed": i,
    }


def image_payload(i: int) -> dict[str, Any]:
    return {"prompt": "a red circle", "size": IMAGE_SIZE, "seed": i}


async def load(
    http: httpx.AsyncClient, url: str, payload: Any, n: int, concurrency: int
) -> tuple[float, list[Any]]:
    """Send ``n`` requests, at most ``concurrency`` in flight: (seconds, response bodies)."""
    limiter = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with limiter:
            response = await http.post(url, json=payload(i))
            response.raise_for_status()
            return response.json()

    start = time.perf_counter()
    bodies = await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - start, list(bodies)


async def mean_batch(http: httpx.AsyncClient, base: str, before: dict[str, Any]) -> float:
    after = (await http.get(base + "/stats")).json()
    sizes = after["batch_sizes"][len(before["batch_sizes"]) :]
    return sum(sizes) / len(sizes) if sizes else 0.0


async def throughput(
    servers: dict[str, Any], path: str, payload: Any, n: int, repeats: int, tokens: bool
) -> list[tuple[str, int, float, float, float]]:
    """(mode, concurrency, requests/s, tokens/s, mean batch size), medians over repeats; the
    modes run interleaved so both see the same machine."""
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        for server in servers.values():  # warm-up: first-call allocations, connections
            await load(http, server.url + path, payload, 4, 4)
        for concurrency in CONCURRENCY:
            for _ in range(repeats):
                for mode, server in servers.items():
                    before = (await http.get(server.url + "/stats")).json()
                    seconds, bodies = await load(http, server.url + path, payload, n, concurrency)
                    generated = (
                        sum(b["usage"]["completion_tokens"] for b in bodies) if tokens else 0
                    )
                    batch = await mean_batch(http, server.url, before)
                    results.setdefault((mode, concurrency), []).append(
                        (n / seconds, generated / seconds, batch)
                    )
    rows = []
    for (mode, concurrency), runs in results.items():
        rows.append(
            (
                mode,
                concurrency,
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
                statistics.median(r[2] for r in runs),
            )
        )
    rows.sort(key=lambda r: (r[0] != "batched", r[1]))
    return rows


# --- client overhead -------------------------------------------------------------------------


def fixed_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body = json.dumps(FIXED_COMPLETION).encode()

    async def chat(request: Request) -> Response:
        await request.body()
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def client_overhead(url: str, calls: int, repeats: int) -> tuple[float, float]:
    """Median µs per call: (``OpenAIChatClient.chat``, raw ``httpx.AsyncClient.post``)."""
    from nodes.backends.base import ChatMessage, ChatRequest
    from nodes.backends.clients.openai_client import OpenAIChatClient
    from nodes.backends.wire import messages_payload

    request = ChatRequest((ChatMessage("user", "draw two red circles"),))
    sampling = request.sampling
    payload = {  # what OpenAIChatClient.chat sends for this request
        "model": "bench",
        "messages": messages_payload(request.messages),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "logprobs": sampling.logprobs,
        "return_token_ids": True,
    }
    client = OpenAIChatClient(url, model="bench")
    client_times: list[float] = []
    raw_times: list[float] = []
    async with httpx.AsyncClient(timeout=30) as http:

        async def raw() -> None:
            response = await http.post(url + "/v1/chat/completions", json=payload)
            response.raise_for_status()
            response.json()

        for _ in range(50):  # warm-up both
            await client.chat(request)
            await raw()
        for _ in range(repeats):
            for call, times in ((lambda: client.chat(request), client_times), (raw, raw_times)):
                for _ in range(calls):
                    start = time.perf_counter_ns()
                    await call()
                    times.append((time.perf_counter_ns() - start) / 1000)
    await client.aclose()
    return statistics.median(client_times), statistics.median(raw_times)


# --- main ------------------------------------------------------------------------------------


def table(title: str, unit: str, rows: list[tuple[str, int, float, float, float]]) -> str:
    tokens = unit == "requests/s"
    header = f"| server | concurrency | {unit} |" + (" tokens/s |" if tokens else "")
    header += " mean batch |"
    lines = [f"**{title}**", "", header, "|" + "---|" * (header.count("|") - 1)]
    for mode, concurrency, rate, token_rate, batch in rows:
        cells = [mode, str(concurrency), f"{rate:.1f}"]
        if tokens:
            cells.append(f"{token_rate:.0f}")
        cells.append(f"{batch:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per run (default 48)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model worker")
    parser.add_argument("--calls", type=int, default=OVERHEAD_CALLS, help="client calls per run")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as scratch:
        models = build_models(Path(scratch))
        print(f"tiny models built in {time.perf_counter() - started:.1f} s")
        mode_settings = (("batched", BATCHED), ("unbatched", UNBATCHED))

        lm = {mode: start_lm(models["lm"], args.threads, s) for mode, s in mode_settings}
        lm_rows = asyncio.run(
            throughput(lm, "/v1/chat/completions", lm_payload, args.requests, args.repeats, True)
        )
        for server in lm.values():
            server.stop()

        image = {mode: start_image(models["sd"], args.threads, s) for mode, s in mode_settings}
        image_rows = asyncio.run(
            throughput(
                image,
                "/v1/images/generations",
                image_payload,
                max(args.requests // 2, 1),
                args.repeats,
                False,
            )
        )
        for server in image.values():
            server.stop()

    fixed = serve(fixed_app())
    client_us, raw_us = asyncio.run(client_overhead(fixed.url, args.calls, args.repeats))
    fixed.stop()

    batched, unbatched = BATCHED["max_batch"], UNBATCHED["max_batch"]
    settings = (
        f"batched: max_batch {batched}, max_wait_ms {BATCHED['max_wait_ms']:g}; "
        f"unbatched: max_batch {unbatched}; torch threads {args.threads} per server"
    )
    print()
    print(
        table(
            f"(a) lm server, tiny Qwen2, max_tokens {LM_MAX_TOKENS} ({settings})",
            "requests/s",
            lm_rows,
        )
    )
    print()
    print(
        table(
            f"(b) image server, tiny SD {IMAGE_SIZE}, {IMAGE_STEPS} steps ({settings})",
            "images/s",
            image_rows,
        )
    )
    print()
    print("**(c) client overhead per call (trivial Starlette endpoint, fixed completion)**")
    print()
    print("| client | median µs/call |")
    print("|---|---|")
    print(f"| `OpenAIChatClient.chat` | {client_us:.0f} |")
    print(f"| raw `httpx.AsyncClient.post` + `.json()` | {raw_us:.0f} |")
    print(f"| ratio (client / raw) | {client_us / raw_us:.2f}× (+{client_us - raw_us:.0f} µs) |")
    print()
    print(
        f"{args.requests} requests ({max(args.requests // 2, 1)} images) per run, "
        f"{args.repeats} repeats, {args.calls} client calls per run; "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
