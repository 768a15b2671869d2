"""Orchestration overhead: per-node-step time with no-op backends.

    python benchmarks/overhead.py [--trajectories 1000] [--edits 2] [--repeats 3]
                                  [--concurrency 64] [--pg]   # --pg: also PostgreSQL
                                  [--no-freeze]  # leave start-up objects to the collector

Side by side in one run, interleaved, medians of ``--repeats``:
- a bare LangGraph graph of the same topology (TypedDict state, functions that return the same
  kind of updates, no policies, no image store, no recording wrapper), with plain sync routers
  (which LangGraph runs in its thread pool) and with async ones (run inline, as AtelierGraph
  runs its routers): the latter is the floor the ratios use;
- Atelier's reasoner with no-op backends (answer at once; 8×8 images), recording off;
- the same, recording every step into SQLite (WAL, group commit) and optionally PostgreSQL.
Targets: Atelier without recording ≤ 1.3× bare LangGraph; recording adds ≤ 20%.

Like the ``atelier`` commands that run graphs, the benchmark freezes the start-up heap
(``agent_graph.heap``) before the first run, for every configuration alike; ``--no-freeze``
measures without (full collections then walk every imported module's objects).
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, TypedDict

from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.noop import NoopChat, NoopJudge, NoopPainter, NoopReflector
from nodes.context import Backends, ReasonerContext
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy

CONCURRENCY = 64


def context(edits: int, images, recorder=None) -> ReasonerContext:
    painter = NoopPainter()
    backends = Backends(
        planner=NoopChat("a blueprint"),
        reflector=NoopReflector(edits),
        decomposer=NoopChat("{}"),
        generator=painter,
        editor=painter,
        judge=NoopJudge(),
    )
    kwargs = {"images": images} if images is not None else {}
    return ReasonerContext(
        backends=backends,
        mode_policy=FixedModePolicy("reflect"),
        stop_policy=FollowReflectionStopPolicy(),
        recorder=recorder,
        **kwargs,
    )


async def run_bare(n: int, edits: int, async_routers: bool = False) -> tuple[float, int]:
    """The same path (plan, draw, (reflect, refine) × edits, reflect, stop) in bare LangGraph."""
    graph = bare_graph(async_routers)
    limiter = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> int:
        async with limiter:
            state = await graph.ainvoke(
                {
                    "prompt": f"prompt {i}",
                    "edits": edits,
                    "images": [],
                    "reflections": [],
                    "steps": 0,
                }
            )
            return state["steps"]

    started = time.perf_counter()
    steps = await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started, sum(steps)


class BareState(TypedDict):
    prompt: str
    edits: int
    blueprint: str
    images: Annotated[list, operator.add]
    reflections: Annotated[list, operator.add]
    steps: int


def bare_graph(async_routers: bool = False):
    from langgraph.graph import END, START, StateGraph

    async def plan(state: BareState) -> dict:
        return {"blueprint": state["prompt"], "steps": state["steps"] + 1}

    async def draw(state: BareState) -> dict:
        return {"images": ["image-0"], "steps": state["steps"] + 1}

    async def reflect(state: BareState) -> dict:
        done = len(state["images"]) > state["edits"]
        return {"reflections": ["stop" if done else "edit"], "steps": state["steps"] + 1}

    async def refine(state: BareState) -> dict:
        return {"images": [f"image-{len(state['images'])}"], "steps": state["steps"] + 1}

    async def stop(state: BareState) -> dict:
        return {"steps": state["steps"] + 1}

    graph = StateGraph(BareState)
    for node in (plan, draw, reflect, refine, stop):
        graph.add_node(node)

    def to(route):
        # Plain sync routers are what LangGraph users write; LangGraph runs them in its thread
        # pool. AtelierGraph runs its routers inline, so the strict baseline does too.
        if not async_routers:
            return route

        async def inline(state: BareState) -> str:
            return route(state)

        return inline

    # The same conditional edges as the reasoner (a router reads the state after each node).
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", to(lambda s: "draw"), ["draw"])
    graph.add_conditional_edges("draw", to(lambda s: "reflect"), ["reflect"])
    graph.add_conditional_edges(
        "reflect",
        to(lambda s: "stop" if s["reflections"][-1] == "stop" else "refine"),
        ["refine", "stop"],
    )
    graph.add_conditional_edges("refine", to(lambda s: "reflect"), ["reflect"])
    graph.add_edge("stop", END)
    return graph.compile()


async def run_once(n: int, edits: int, url: str | None) -> tuple[float, int]:
    tasks = make_group_tasks([f"prompt {i}" for i in range(n // 4)], 4, seed=1)
    if url == "bare":
        return await run_bare(n, edits)
    if url == "bare-async":
        return await run_bare(n, edits, async_routers=True)
    if url is None:
        runner = Runner(context(edits, None), concurrency=CONCURRENCY, keep_steps=False)
        started = time.perf_counter()
        results = await runner.run(tasks)
        elapsed = time.perf_counter() - started
    else:
        from storage.recorder import SQLRecorder
        from storage.store import TrajectoryStore

        store = TrajectoryStore(url)
        run = store.create_run("overhead")
        started = time.perf_counter()
        async with SQLRecorder(store, run.id) as recorder:
            runner = Runner(
                context(edits, store, recorder), concurrency=CONCURRENCY, keep_steps=False
            )
            results = await runner.run(tasks)
        elapsed = time.perf_counter() - started
        store.close()
    steps = sum(r.state.step_count for r in results)
    assert all(r.status == "succeeded" for r in results)
    return elapsed, steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trajectories", type=int, default=2000)
    parser.add_argument("--edits", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--pg", action="store_true", help="also record into PostgreSQL")
    parser.add_argument("--no-freeze", action="store_true", help="do not gc.freeze() first")
    args = parser.parse_args()
    globals()["CONCURRENCY"] = args.concurrency

    tmp = Path(tempfile.mkdtemp(prefix="atelier-overhead-"))
    configs: dict[str, object] = {
        "bare LangGraph": "bare",
        "bare LangGraph, async routers": "bare-async",
        "Atelier, no recording": None,
        "Atelier + SQLite": "sqlite",
    }
    pg = None
    if args.pg:
        from tests.pg import PostgresServer  # the test suite's private-cluster helper

        pg = PostgresServer()  # fsync off: measures the recorder, not the disk
        pg.start()
        configs["Atelier + PostgreSQL"] = "pg"
    timings: dict[str, list[float]] = {name: [] for name in configs}
    import langgraph.graph  # noqa: F401 - imported before freezing, as the CLI has it by then

    import storage.recorder  # noqa: F401

    if not args.no_freeze:
        from agent_graph.heap import freeze_startup_heap

        freeze_startup_heap()
    steps_per_run = 0
    for repeat in range(args.repeats):
        for name, kind in configs.items():
            if kind == "sqlite":
                url = f"sqlite:///{tmp}/r{repeat}.db"
            elif kind == "pg":
                url = pg.create_database()
            else:
                url = kind
            elapsed, steps = asyncio.run(run_once(args.trajectories, args.edits, url))
            timings[name].append(elapsed / steps * 1e6)
            steps_per_run = steps
    if pg is not None:
        pg.stop()
    bare = statistics.median(timings["bare LangGraph, async routers"])  # the stricter floor
    base = statistics.median(timings["Atelier, no recording"])
    print(
        f"{args.trajectories} trajectories, {steps_per_run} steps per run, median of {args.repeats}"
    )
    print("| configuration | µs per step | steps/s | × bare (async routers) | × unrecorded |")
    print("|---|---|---|---|---|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.0f} | {1e6 / median:.0f} | {median / bare:.2f} | "
            f"{median / base:.2f} |"
        )


if __name__ == "__main__":
    main()
