"""Concurrency: trajectories/s against loopback model servers with a fixed latency per call.

    PYTHONPATH=. python benchmarks/concurrency.py [--latency-ms 50] [--levels 1,8,64,256,512]
                                                  [--record]   # also record into SQLite

A separate process serves the OpenAI chat API and the vLLM-Omni image API, answering every call
after ``--latency-ms`` (a tiny PNG for images; "No further edit needed" for reflections). The
reasoner runs in reflect mode through the real HTTP clients: plan, draw, reflect, stop = 3 model
calls, so a trajectory's ideal duration is 3 × latency and the ideal rate at concurrency c is
c / (3 × latency). Efficiency = achieved / ideal. Peak memory per 1,000 in-flight trajectories is
the growth of the process's peak RSS at the highest level, scaled.
Target (issue 6): efficiency ≥ 90% up to 256 concurrent trajectories on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import resource
import socket
import subprocess
import sys
import tempfile
import time
from typing import Annotated, TypedDict


def serve(port: int, latency_s: float) -> None:
    # The fake server the fault tests use; with edit_percent 0 every reflection says the stop
    # phrase, so a reflect-mode trajectory is plan, draw, reflect: 3 calls.
    from tests.fake_servers import serve as serve_fake

    serve_fake(port, latency_s, edit_percent=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_level(url: str, concurrency: int, trajectories: int, record_dir: str | None):
    from agent_graph.runner import Runner, make_group_tasks
    from nodes.backends.clients.omni_client import OmniImageClient
    from nodes.backends.clients.openai_client import OpenAIChatClient
    from nodes.backends.clients.pool import Timeouts
    from nodes.context import Backends, GraphSettings, ReasonerContext
    from policies.simple import FixedModePolicy, FollowReflectionStopPolicy

    chat = OpenAIChatClient(url, model="m", timeouts=Timeouts(request_s=60))
    painter = OmniImageClient(url, model="m", timeouts=Timeouts(request_s=60))
    backends = Backends(
        planner=chat, reflector=chat, decomposer=chat, generator=painter, editor=painter
    )
    context = ReasonerContext(
        backends=backends,
        mode_policy=FixedModePolicy("reflect"),
        stop_policy=FollowReflectionStopPolicy(),
        settings=GraphSettings(width=8, height=8, score_images=False),
    )
    tasks = make_group_tasks([f"prompt {i}" for i in range(trajectories)], 1, seed=0)
    recorder_cm = None
    if record_dir is not None:
        from storage.recorder import SQLRecorder
        from storage.store import TrajectoryStore

        store = TrajectoryStore(f"sqlite:///{record_dir}/c{concurrency}.db")
        run = store.create_run("concurrency")
        recorder_cm = SQLRecorder(store, run.id)
        recorder = await recorder_cm.__aenter__()
        from dataclasses import replace

        context = replace(context, images=store, recorder=recorder)
    started = time.perf_counter()
    results = await Runner(context, concurrency=concurrency, keep_steps=False).run(tasks)
    elapsed = time.perf_counter() - started
    if recorder_cm is not None:
        await recorder_cm.__aexit__(None, None, None)
    await chat.aclose()
    await painter.aclose()
    failed = sum(r.status != "succeeded" for r in results)
    return len(results) / elapsed, failed


class BareState(TypedDict):
    prompt: str
    seed: int
    blueprint: str
    images: Annotated[list, operator.add]
    reflections: Annotated[list, operator.add]


async def run_bare_level(url: str, concurrency: int, trajectories: int, http: bool):
    """The same path (plan, draw, reflect, stop) as a bare LangGraph graph: dict state, nodes
    that make the same three HTTP calls with plain httpx (``http``) or only sleep the latency
    (the LangGraph floor). The ceiling any LangGraph runner on this machine can reach."""
    import base64
    import itertools

    import httpx
    from langgraph.graph import END, START, StateGraph

    latency = LATENCY_S
    clients = [
        httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=8), timeout=60)
        for _ in range(max(1, -(-concurrency // 8)))
    ]  # several small pools, as ServerPool does (one big httpcore pool scans all connections)
    turn = itertools.cycle(clients)

    async def post(path: str, payload: dict) -> dict:
        if not http:
            await asyncio.sleep(latency)
            return {}
        response = await next(turn).post(path, json=payload)
        response.raise_for_status()
        return response.json()

    async def plan(state: BareState) -> dict:
        body = {
            "model": "m",
            "seed": state["seed"],
            "messages": [{"role": "user", "content": state["prompt"]}],
        }
        answer = await post("/v1/chat/completions", body)
        return {"blueprint": str(answer.get("choices", [{}])[0].get("message", {}))}

    async def draw(state: BareState) -> dict:
        body = {
            "model": "m",
            "prompt": state["blueprint"],
            "size": "8x8",
            "seed": state["seed"],
            "response_format": "b64_json",
        }
        answer = await post("/v1/images/generations", body)
        data = answer.get("data", [{"b64_json": ""}])[0]["b64_json"]
        return {"images": [base64.b64decode(data)]}

    async def reflect(state: BareState) -> dict:
        image = base64.b64encode(state["images"][-1]).decode()
        content = [
            {"type": "text", "text": state["prompt"]},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ]
        body = {
            "model": "m",
            "seed": state["seed"],
            "messages": [{"role": "user", "content": content}],
        }
        answer = await post("/v1/chat/completions", body)
        return {"reflections": [str(answer)]}

    async def stop(state: BareState) -> dict:
        return {}

    builder = StateGraph(BareState)
    for node in (plan, draw, reflect, stop):
        builder.add_node(node)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "draw")
    builder.add_edge("draw", "reflect")
    builder.add_edge("reflect", "stop")
    builder.add_edge("stop", END)
    graph = builder.compile()
    limiter = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            await graph.ainvoke(
                {"prompt": f"prompt {i}", "seed": i, "images": [], "reflections": []}
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(trajectories)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.aclose()
    return trajectories / elapsed


LATENCY_S = 0.05


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--levels", default="1,8,64,256,512")
    parser.add_argument(
        "--rounds",
        type=float,
        default=6,
        help="trajectories per level = rounds × concurrency (at least 20)",
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    globals()["LATENCY_S"] = latency
    if args.serve:
        serve(args.serve, latency)
        return
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--latency-ms", str(args.latency_ms)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(100):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        record_dir = tempfile.mkdtemp(prefix="atelier-conc-") if args.record else None
        levels = [int(x) for x in args.levels.split(",")]
        print(
            f"latency {args.latency_ms:.0f} ms per call, 3 calls per trajectory"
            + (", recording into SQLite" if args.record else "")
        )
        print(
            "| concurrency | trajectories | Atelier traj/s | ideal | efficiency | failed "
            "| bare LangGraph + httpx: traj/s (efficiency) | bare LangGraph, sleep only "
            "| Atelier ÷ bare + httpx |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for level in levels:
            n = max(20, int(args.rounds * level))
            # Peak RSS is a high-water mark: its growth during the top level (after the lower
            # levels warmed imports and caches) is what that many trajectories in flight cost.
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rate, failed = asyncio.run(run_level(url, level, n, record_dir))
            rss_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
            bare_http = asyncio.run(run_bare_level(url, level, n, http=True))
            bare_sleep = asyncio.run(run_bare_level(url, level, n, http=False))
            ideal = level / (3 * latency)
            print(
                f"| {level} | {n} | {rate:.1f} | {ideal:.1f} | {rate / ideal:.0%} | {failed} "
                f"| {bare_http:.1f} ({bare_http / ideal:.0%}) "
                f"| {bare_sleep:.1f} ({bare_sleep / ideal:.0%}) | {rate / bare_http:.2f} |"
            )
        peak_mb = rss_growth_kb / 1024
        print(
            f"\npeak RSS growth {peak_mb:.0f} MB at {levels[-1]} in flight → "
            f"{peak_mb * 1000 / levels[-1]:.0f} MB per 1,000 in-flight trajectories"
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
