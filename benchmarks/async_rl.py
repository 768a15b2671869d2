"""Asynchronous GRPO on ShapeWorld: synchronous (K = 0) against K = 1 and K = 2, side by side.

    PYTHONPATH=. python benchmarks/async_rl.py [--iterations 4] [--per-category 2] [-G 4]
                                               [--staleness 0,1,2] [--train-delay 0]
                                               [--eval-per-category 4] [--samples 2]

Each K trains a fresh router (same seed) with ``training.decisions.async_loop.async_grpo`` on
the same task batches, one batch per trainer step: every K samples and trains on the same
number of trajectories (the sampler's throttle keeps every group within K, so none is
skipped). Per iteration it prints the wall time (from the previous version's registration to
this one's), the time the trainer waited for groups, the staleness of the groups it trained on,
and the held-out accuracy (share of correct trajectories, ``TrajectoryResult.correct``) and
mean images of the version made, evaluated after all loops on held-out prompts (seed 999), so
the evaluation takes no time from the loops.

``--train-delay S`` adds S seconds of *simulated* trainer latency to every step (a sleep in the
trainer's thread, standing for a GPU step that leaves the CPUs free). On a CPU-only machine the
router's real update takes a fraction of a second beside the rollouts, so without it K > 0 has
little to overlap; with it, K > 0 hides the trainer's time behind sampling.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_graph.presets import shapeworld_tasks
from agent_graph.runner import Runner
from nodes.context import GraphSettings
from nodes.state import Budget
from policies.mode import LearnedModePolicy
from policies.weights import load_policy
from storage.store import TrajectoryStore
from training.decisions.async_loop import AsyncConfig, AsyncIteration, async_grpo
from training.decisions.sampling import shapeworld_policy_context
from training.decisions.trainer import GRPOConfig, GRPOTrainer

SETTINGS = GraphSettings(width=128, height=128)
BUDGET = Budget(max_rounds=2)


class DelayedTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose every ``train`` first sleeps ``delay`` seconds (simulated)."""

    def __init__(self, policy: Any, config: GRPOConfig, delay: float) -> None:
        super().__init__(policy, config)
        self.delay = delay

    def train(self, groups):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        return super().train(groups)


async def train(k: int, args: argparse.Namespace, workdir: Path) -> tuple[float, list, Any]:
    store = TrajectoryStore(f"sqlite:///{workdir / f'k{k}.db'}")
    batches = [
        shapeworld_tasks(args.per_category, args.group_size, seed=1 + i)
        for i in range(args.iterations)
    ]
    groups = len({t.group_id for t in batches[0]})
    trainer = DelayedTrainer(LearnedModePolicy(seed=0), GRPOConfig(seed=0), args.train_delay)
    cfg = AsyncConfig(max_staleness=k, groups_per_step=groups, iterations=args.iterations)
    start = time.perf_counter()
    _, log = await async_grpo(
        store,
        trainer,
        batches,
        workdir / f"k{k}",
        cfg,
        group_size=args.group_size,
        budget=BUDGET,
        settings=SETTINGS,
    )
    return time.perf_counter() - start, log, store


async def held_out(path: str, args: argparse.Namespace) -> tuple[float, float]:
    tasks = shapeworld_tasks(args.eval_per_category, args.samples, seed=999)
    context = shapeworld_policy_context(load_policy(path), settings=SETTINGS)
    results = await Runner(context, budget=BUDGET, keep_steps=False).run(tasks)
    n = len(results)
    return sum(r.correct for r in results) / n, sum(r.image_count for r in results) / n


def staleness(it: AsyncIteration) -> str:
    return " ".join(f"{s}:{n}" for s, n in it.staleness.items())


async def main(args: argparse.Namespace) -> None:
    ks = [int(k) for k in args.staleness.split(",")]
    per_batch = args.per_category * 9 * args.group_size
    print(
        f"ShapeWorld router GRPO: {args.iterations} iterations × {per_batch} trajectories "
        f"(9 categories × {args.per_category} prompts × G={args.group_size}); held-out "
        f"{args.eval_per_category * 9} prompts × {args.samples} samples; simulated trainer "
        f"latency {args.train_delay:g} s per step"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = {k: await train(k, args, Path(tmp)) for k in ks}
        print(
            f"\n{'K':>2} {'iter':>4} {'version':>9} {'wall s':>7} {'wait s':>7} "
            f"{'staleness':>10} {'skipped':>7} {'accuracy':>8} {'images':>6}"
        )
        for k, (total, log, store) in runs.items():
            paths = {v.version: v.path for v in store.policy_versions(name="router")}
            acc, img = await held_out(paths["0"], args)
            blank = f"{'':>7} {'':>7} {'':>10} {'':>7}"
            print(f"{k:>2} {'-':>4} {'router@0':>9} {blank} {acc:8.3f} {img:6.2f}")
            for it in log:
                acc, img = await held_out(paths[it.trained.split("@")[1]], args)
                print(
                    f"{k:>2} {it.index:>4} {it.trained:>9} {it.wall_s:7.2f} {it.wait_s:7.2f} "
                    f"{staleness(it):>10} {len(it.skipped):>7} {acc:8.3f} {img:6.2f}"
                )
            trained = sum(len(it.used) for it in log)
            print(
                f"{k:>2} total {total:.2f} s, {total / max(len(log), 1):.2f} s/iteration, "
                f"{trained} groups trained, {sum(len(it.skipped) for it in log)} skipped"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("-G", "--group-size", type=int, default=4)
    parser.add_argument("--staleness", default="0,1,2", help="comma-separated values of K")
    parser.add_argument("--train-delay", type=float, default=0.0, help="simulated, seconds")
    parser.add_argument("--eval-per-category", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
