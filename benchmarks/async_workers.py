"""Asynchronous GRPO across processes: rollout workers sample while the trainer trains.

    PYTHONPATH=. python benchmarks/async_workers.py [--workers 2] [--iterations 6]
        [--per-category 2] [-G 4] [--staleness 0,1,2] [--train-delay 1]
        [--eval-per-category 10] [--samples 4] [--policy router|decompose]

The ShapeWorld router through ``examples/configs/shapeworld.toml``, trained by the CLI's own
loop policy (``atelier.cli.train_loop.DecisionLoopPolicy``, as ``atelier train --config``
builds it) on the same iterations' tasks in every row, side by side in one run:

- ``sync, in-process``: the synchronous loop (``training.online.online_iterations``) sampling in
  the trainer's process;
- ``K = 0, 1, 2``: ``training.online_async.online_async`` with ``--workers`` ``atelier worker
  LOOP`` processes sampling (K = 0: synchronous, sampling moved to the workers).

``--train-delay S`` adds S seconds of *simulated* trainer latency to every step (a sleep in the
trainer's thread, standing for a GPU step that leaves the CPUs to the workers); the router's
real update is a fraction of a second. Per step: wall time since the previous step, time the
trainer waited for a complete run, the staleness trained on; per version: held-out accuracy and
mean images (ShapeWorld's checker, evaluated after all loops on held-out prompts, seed 999).
Workers start when each loop opens, so the first step includes their start-up; ``steady``
averages the steps after it.

``--policy decompose`` trains the decomposer's LoRA instead, on the tiny random-weight text LM
served by one ``atelier serve lm`` process (built by ``atelier tiny-models`` in a temporary
folder; ShapeWorld draws), the rollouts in ``--mode decompose``: real sampling on the server and
a real LoRA step in the trainer, both on this machine's CPUs. Each new version is hot-loaded on
the server by the first worker that starts a run naming it. The accuracy column is then the
share of correct trajectories in the run each step trained on (the tiny LM writes noise: the
column shows the plumbing, not learning).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from agent_graph.presets import shapeworld_tasks
from agent_graph.runner import Runner
from atelier.cli.app import build_parser
from atelier.cli.train import _reward_weights
from atelier.cli.train_loop import DecisionLoopPolicy, TextLoopPolicy
from nodes.backends.shapeworld import fixed_prompt_set
from nodes.state import Budget
from policies.weights import load_policy
from storage.store import TrajectoryStore
from training.decisions.sampling import shapeworld_policy_context
from training.online import LoopSpec, online_iterations
from training.online_async import online_async

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "shapeworld.toml"
BUDGET = Budget(max_rounds=2)


class DelayedRouter(DecisionLoopPolicy):
    """The CLI's router loop policy whose every ``train`` first sleeps (simulated latency)."""

    def __init__(self, args: argparse.Namespace, delay: float) -> None:
        super().__init__(args, "router")
        self.delay = delay

    def train(self, groups: Any) -> Any:
        time.sleep(self.delay)
        return super().train(groups)


class DelayedText(TextLoopPolicy):
    """The CLI's text loop policy whose every ``train`` first sleeps (simulated latency)."""

    def __init__(self, args: argparse.Namespace, delay: float) -> None:
        super().__init__(args)
        self.delay = delay

    def train(self, groups: Any) -> Any:
        time.sleep(self.delay)
        return super().train(groups)


@contextlib.contextmanager
def served_text_lm(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """Tiny models built in ``workdir``, the text LM served by ``atelier serve lm`` on a free
    loopback port; (backends file, model directory)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    atelier = [sys.executable, "-m", "atelier.cli"]
    subprocess.run([*atelier, "tiny-models", str(workdir / "tiny")], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = workdir / "tiny" / "lm"
    serve = ["serve", "lm", "--model", str(model), "--port", str(port), "--torch-threads", "1"]
    server = subprocess.Popen(
        [*atelier, *serve, "--max-batch", "16"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("atelier serve lm did not start")
            time.sleep(0.5)
        config = workdir / "served.toml"
        config.write_text(
            '[backends.world]\nkind = "shapeworld"\n\n'
            f'[backends.lm]\nkind = "openai"\nurls = ["http://127.0.0.1:{port}"]\n'
            "timeout_s = 120\n\n"
            "[backends.lm.sampling]\nmax_tokens = 12\ntemperature = 1.0\ntop_p = 1.0\n\n"
            '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "lm"\n'
            'generator = "world"\neditor = "world"\njudge = "world"\n'
        )
        yield config, model
    finally:
        server.terminate()
        server.wait(timeout=30)


def setup(args: argparse.Namespace, workdir: Path, label: str) -> tuple[Any, LoopSpec, Any]:
    options = ["--policy", args.policy, "--out", str(workdir / label), "--seed", "0"]
    config = CONFIG
    if args.policy != "router":
        config, model = args.served
        options += ["--model", str(model), "--mode", "decompose", "--epochs", "1"]
        options += ["--minibatch-size", "16", "--lr", "1e-2"]
    cli = build_parser().parse_args(["train", "--config", str(config), *options])
    cli.reward_weights = _reward_weights(cli.reward_weights)
    per_iteration = 9 * args.per_category
    items = fixed_prompt_set(args.per_category * args.iterations, seed=0)
    spec = LoopSpec(
        name=f"bench-{label}",
        backends_config=config,
        prompts=[i.text for i in items],
        iterations=args.iterations,
        group_size=args.group_size,
        prompts_per_iteration=per_iteration,
        budget=BUDGET,
        save_dir=workdir / label,
        mode=cli.mode,
    )
    if args.policy == "router":
        return DelayedRouter(cli, args.train_delay), spec, cli
    return DelayedText(cli, args.train_delay), spec, cli


async def train(args: argparse.Namespace, workdir: Path, k: int | None) -> tuple[float, list, Any]:
    """One loop: k None = synchronous in-process; else asynchronous with worker processes."""
    label = "sync" if k is None else f"k{k}"
    store = TrajectoryStore(f"sqlite:///{workdir / f'{label}.db'}")
    policy, spec, _ = setup(args, workdir, label)
    initial = policy.initial(store, spec.name)
    workers: list[subprocess.Popen] = []

    def start_workers(loop: Any) -> None:
        command = [sys.executable, "-m", "atelier.cli", "worker", loop.name, "--db", store.url]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for _ in range(args.workers):
            workers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))

    start = time.perf_counter()
    ends: list[float] = [start]  # the synchronous loop's step times, from its callback
    if k is None:
        log = await online_iterations(
            store, spec, policy, initial, on_iteration=lambda _: ends.append(time.perf_counter())
        )
        for it, (a, b) in zip(log, itertools.pairwise(ends), strict=True):
            it.wall_s = b - a  # (it waits for no one: sampling is part of its step)
    else:
        log = await online_async(
            store, spec, policy, initial, max_staleness=k, poll_s=0.1, on_loop=start_workers
        )
    total = time.perf_counter() - start
    for proc in workers:
        if proc.wait(timeout=120) != 0:
            raise SystemExit(f"a worker failed (exit {proc.returncode})")
    return total, log, store


async def held_out(path: str, args: argparse.Namespace) -> tuple[float, float]:
    tasks = shapeworld_tasks(args.eval_per_category, args.samples, seed=999)
    context = shapeworld_policy_context(load_policy(path))
    results = await Runner(context, budget=BUDGET, keep_steps=False).run(tasks)
    n = len(results)
    return sum(r.correct for r in results) / n, sum(r.image_count for r in results) / n


def run_accuracy(store: TrajectoryStore, run_id: str) -> tuple[float, float]:
    """(share correct, mean images) of a recorded run."""
    runs = store.trajectories(run=run_id, limit=None)
    correct = sum(bool(t.correct) for t in runs) / len(runs)
    return correct, sum(t.image_count for t in runs) / len(runs)


async def main(args: argparse.Namespace) -> None:
    if args.policy != "router":
        with tempfile.TemporaryDirectory() as tmp, served_text_lm(Path(tmp)) as served:
            args.served = served
            await report(args)
        return
    await report(args)


async def report(args: argparse.Namespace) -> None:
    ks: list[int | None] = [None, *(int(k) for k in args.staleness.split(","))]
    per_step = args.per_category * 9 * args.group_size
    print(
        f"ShapeWorld {args.policy} GRPO: {args.iterations} steps × {per_step} "
        f"trajectories (9 categories × {args.per_category} prompts × G={args.group_size}); "
        f"{args.workers} worker processes for K rows; simulated trainer latency "
        f"{args.train_delay:g} s per step; {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = {k: await train(args, Path(tmp), k) for k in ks}
        print(
            f"\n{'loop':>6} {'step':>4} {'trained':>9} {'wall s':>7} {'wait s':>7} "
            f"{'stale':>5} {'accuracy':>8} {'images':>6}"
        )
        for k, (total, log, store) in runs.items():
            name = "sync" if k is None else f"K={k}"
            if args.policy == "router":  # held-out accuracy of each version
                paths = {v.version: v.path for v in store.policy_versions(name="router")}
                acc, img = await held_out(paths["0"], args)
                blank = f"{'':>7} {'':>7} {'':>5}"
                print(f"{name:>6} {'-':>4} {'router@0':>9} {blank} {acc:8.3f} {img:6.2f}")
            for it in log:
                if args.policy == "router":
                    acc, img = await held_out(paths[it.trained.split("@")[1]], args)
                else:  # the run it trained on
                    acc, img = run_accuracy(store, it.run_id)
                wall = getattr(it, "wall_s", float("nan"))
                wait = getattr(it, "wait_s", float("nan"))
                stale = getattr(it, "staleness", 0)
                trained = it.trained or "-"
                print(
                    f"{name:>6} {it.index:>4} {trained:>9} {wall:7.2f} {wait:7.2f} "
                    f"{stale:>5} {acc:8.3f} {img:6.2f}"
                )
            skipped = sum(len(getattr(it, "skipped", [])) for it in log)
            steady = [it.wall_s for it in log[1:]]
            steady_s = f", steady {sum(steady) / len(steady):.2f} s/step" if steady else ""
            print(
                f"{name:>6} total {total:.2f} s, {total / max(len(log), 1):.2f} s/step"
                f"{steady_s}, {len(log)} steps, {skipped} runs skipped as stale"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("-G", "--group-size", type=int, default=4)
    parser.add_argument("--staleness", default="0,1,2", help="comma-separated values of K")
    parser.add_argument("--train-delay", type=float, default=1.0, help="simulated, seconds")
    parser.add_argument("--eval-per-category", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--policy", choices=("router", "decompose"), default="router")
    asyncio.run(main(parser.parse_args()))
