"""Cost of recording: per-step time of the reasoner with no-op backends, recording off vs on.

    python benchmarks/recording_overhead.py [--trajectories 2000] [--edits 2] [--repeats 3]
                                            [--pg]   # also PostgreSQL (needs initdb/pg_ctl)

No-op backends answer at once, so the time is the graph's own (LangGraph, the nodes, pydantic
state) plus, when on, the recorder's (SQLite WAL via group commit; images are 8×8 PNGs). Each
configuration runs ``--repeats`` times, interleaved; the table shows medians and the ratio.
Target (issue 3): recording adds ≤ 20% to the per-step time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from agent_graph.context import Backends, ReasonerContext
from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.noop import NoopChat, NoopJudge, NoopPainter, NoopReflector
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
        router=FixedModePolicy("reflect"),
        stopper=FollowReflectionStopPolicy(),
        recorder=recorder,
        **kwargs,
    )


async def run_once(n: int, edits: int, url: str | None) -> tuple[float, int]:
    tasks = make_group_tasks([f"prompt {i}" for i in range(n // 4)], 4, seed=1)
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
    args = parser.parse_args()
    globals()["CONCURRENCY"] = args.concurrency

    tmp = Path(tempfile.mkdtemp(prefix="atelier-overhead-"))
    configs: dict[str, object] = {"no recording": None, "SQLite": "sqlite"}
    pg = None
    if args.pg:
        from tests.pg import PostgresServer  # the test suite's private-cluster helper

        pg = PostgresServer()  # fsync off: measures the recorder, not the disk
        pg.start()
        configs["PostgreSQL"] = "pg"
    timings: dict[str, list[float]] = {name: [] for name in configs}
    steps_per_run = 0
    for repeat in range(args.repeats):
        for name, kind in configs.items():
            if kind == "sqlite":
                url = f"sqlite:///{tmp}/r{repeat}.db"
            elif kind == "pg":
                url = pg.create_database()
            else:
                url = None
            elapsed, steps = asyncio.run(run_once(args.trajectories, args.edits, url))
            timings[name].append(elapsed / steps * 1e6)
            steps_per_run = steps
    if pg is not None:
        pg.stop()
    base = statistics.median(timings["no recording"])
    print(
        f"{args.trajectories} trajectories, {steps_per_run} steps per run, median of {args.repeats}"
    )
    print("| configuration | µs per step | steps/s | ratio to no recording |")
    print("|---|---|---|---|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {1e6 / median:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
