"""Rollout workers: trajectories/s with 1, 2, 4 ``atelier worker`` processes sampling one run.

    PYTHONPATH=. python benchmarks/rollout_workers.py [--workers 1,2,4] [--trajectories 400]
        [--latency-ms 50] [--concurrency 8] [--batch 8]

A private PostgreSQL 15 server (``tests/pg.py``: initdb into a temporary folder, fsync off) holds
the store; a separate process serves the loopback model server of ``benchmarks/concurrency.py``
(``tests/fake_servers.py``: the OpenAI chat and vLLM-Omni image APIs answering every call after
``--latency-ms``). Per worker count, a fresh database gets one run of ``--trajectories``
reflect-mode trajectories (plan, draw, reflect, stop: 3 model calls each, so a worker's ideal
rate is ``concurrency / (3 × latency)``) registered with ``rollout --register-only``'s code;
then that many ``atelier worker`` processes sample it, each with ``--concurrency`` trajectories
in flight, and the run's rate is measured two ways:

* ``wall``: trajectories / (spawn of the workers → the last one's exit), start-up included;
* ``sampling``: trajectories / (the run's first recorded step → its last finish), from the store.

Worker count 0 is the baseline: one plain ``atelier rollout`` process, same trajectories, same
concurrency, no claims. ``× 1`` is the sampling rate over one worker's.

On a machine with fewer cores than workers (and the model server and PostgreSQL beside them),
the rate stops growing once the CPUs are busy: the table says how far it scales here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, timeout_s: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the model server at {url} did not come up")
        time.sleep(0.1)


def register(url: str, config: Path, trajectories: int) -> str:
    from agent_graph.rollout import rollout
    from agent_graph.runner import make_group_tasks
    from storage.store import TrajectoryStore

    tasks = make_group_tasks([f"prompt {i}" for i in range(trajectories)], 1, seed=0)
    with TrajectoryStore(url) as store:
        outcome = asyncio.run(
            rollout(store, tasks, mode="reflect", backends_config=config, register_only=True)
        )
    return outcome.run_id


def sampling_seconds(url: str, run_id: str) -> float:
    from sqlalchemy import text

    from storage.store import TrajectoryStore

    with TrajectoryStore(url) as store, store.db.read() as conn:
        first = conn.scalar(
            text(
                "SELECT min(s.started_at) FROM steps s JOIN trajectories t "
                "ON t.id = s.trajectory_id WHERE t.run_id = :r"
            ),
            {"r": run_id},
        )
        last = conn.scalar(
            text("SELECT max(finished_at) FROM trajectories WHERE run_id = :r"), {"r": run_id}
        )
        left = store.count_trajectories(run=run_id, status="succeeded")
    return (last - first).total_seconds(), left


def run_level(url: str, config: Path, workers: int, args: argparse.Namespace) -> dict:
    """``workers`` worker processes on a registered run; 0: one plain ``atelier rollout``
    process sampling the same trajectories (no claims), the baseline."""
    atelier = [sys.executable, "-m", "atelier.cli"]
    if workers:
        run_id = register(url, config, args.trajectories)
        command = [*atelier, "worker", run_id, "--db", url, "--lease", "30"]
        command += ["--concurrency", str(args.concurrency), "--batch", str(args.batch)]
    else:
        prompts = config.with_name("prompts.txt")
        prompts.write_text("".join(f"prompt {i}\n" for i in range(args.trajectories)))
        run_id = uuid.uuid4().hex
        command = [*atelier, "rollout", "--prompts", str(prompts), "-G", "1", "--mode"]
        command += ["reflect", "--config", str(config), "--db", url, "--name", run_id]
        command += ["--concurrency", str(args.concurrency)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(max(workers, 1))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker failed ({proc.returncode}): {err.decode()[-2000:]}")
    wall = time.perf_counter() - started
    if not workers:
        from storage.store import TrajectoryStore

        with TrajectoryStore(url) as store:
            run_id = store.resolve_run(run_id).id
    sampling, succeeded = sampling_seconds(url, run_id)
    return {
        "workers": workers,
        "succeeded": succeeded,
        "wall_s": wall,
        "wall_rate": args.trajectories / wall,
        "sampling_s": sampling,
        "sampling_rate": args.trajectories / sampling,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers",
        default="0,1,2,4",
        help="worker counts; 0 = one plain `atelier rollout` process (default: 0,1,2,4)",
    )
    parser.add_argument("--trajectories", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=8, help="per worker (default: 8)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    levels = [int(n) for n in args.workers.split(",")]

    from tests.faults_common import write_backends_config
    from tests.pg import PostgresServer, missing_reason

    reason = missing_reason()
    if reason is not None:
        sys.exit(f"rollout_workers: needs PostgreSQL: {reason}")
    port = free_port()
    serve = ["--port", str(port), "--latency-ms", str(args.latency_ms)]
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_servers", *serve],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    pg = PostgresServer()
    try:
        pg.start()
        model_url = f"http://127.0.0.1:{port}"
        wait_for(model_url)
        config = write_backends_config(
            Path(tempfile.mkdtemp(prefix="atelier-workers-")) / "servers.toml",
            model_url,
            timeout_s=60,
        )
        rows = [run_level(pg.create_database(), config, n, args) for n in levels]
    finally:
        server.terminate()
        server.wait(timeout=10)
        pg.stop()

    ideal = args.concurrency / (3 * args.latency_ms / 1000)
    print(
        f"\n{args.trajectories} reflect-mode trajectories per run, {args.latency_ms:g} ms per "
        f"model call, {args.concurrency} in flight per worker (ideal {ideal:.0f} traj/s per "
        f"worker), PostgreSQL 15, {os.cpu_count()} CPUs\n"
    )
    print("| workers | succeeded | wall s | traj/s (wall) | sampling s | traj/s (sampling) | × 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = next((r["sampling_rate"] for r in rows if r["workers"] == 1), rows[0]["sampling_rate"])
    for r in rows:
        print(
            f"| {r['workers'] or 'rollout'} | {r['succeeded']} | {r['wall_s']:.1f} | "
            f"{r['wall_rate']:.1f} | "
            f"{r['sampling_s']:.1f} | {r['sampling_rate']:.1f} | "
            f"{r['sampling_rate'] / base:.2f} |"
        )


if __name__ == "__main__":
    main()
