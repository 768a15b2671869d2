"""Tree-RL on ShapeWorld: does stage-wise GRPO teach the stop policy when to stop?

    PYTHONPATH=. python benchmarks/tree_rl.py [--iterations 4] [--starts 32] [-G 8]
                                              [--perfect-share 0.15] [--weighting room]

Records a reflect-mode run with a 50/50 stop policy (90 prompts × 2 samples), then trains a
fresh learned stop policy with Tree-RL (``training.tree``): per iteration, ``--starts`` start
states of the reflect-refine stage drawn from that run (``--weighting uniform``, the default:
as R3's released code, each a perfect one with probability 0.15, else a uniform imperfect one;
``room``: exactly 15% perfect, the rest ∝ 1 − V̂, as BENCHMARKS.md's table was made), G
forks each with the current version, GRPO on the per-fork-point groups with reward C_j.
Evaluates reflect-always on held-out prompts (seed 999, 108 prompts × 2 samples) with R3's rule
(stop exactly on "No further edit needed"), the 50/50 policy, and the trained one (sampling and
greedy). Budget 2 correction rounds, 128 px, as the router benchmark.
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
from benchmarks.learning import BUDGET, SETTINGS
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy, UniformStopPolicy
from policies.stop import LearnedStopPolicy
from storage.store import TrajectoryStore
from training.decisions.sampling import collect, shapeworld_policy_context
from training.decisions.trainer import GRPOConfig, GRPOTrainer
from training.tree import stage_config, stage_start_states, tree_iterations


async def evaluate(stop_policy: Any) -> tuple[float, float, float]:
    context = shapeworld_policy_context(
        FixedModePolicy("reflect"), stop_policy=stop_policy, settings=SETTINGS
    )
    results = await Runner(context, budget=BUDGET, keep_steps=False).run(
        shapeworld_tasks(12, 2, seed=999)
    )
    n = len(results)
    return (
        sum(r.correct for r in results) / n,
        sum(r.score or 0.0 for r in results) / n,
        sum(r.image_count for r in results) / n,
    )


async def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    store = TrajectoryStore(f"sqlite:///{Path(tempfile.mkdtemp()) / 'tree.db'}")
    parent, _ = await collect(
        store,
        shapeworld_tasks(10, 2, seed=1),
        mode="reflect",
        stop_policy=UniformStopPolicy(0.5),
        budget=BUDGET,
        settings=SETTINGS,
    )
    starts = stage_start_states(store, parent)
    trainer = GRPOTrainer(LearnedStopPolicy(seed=0), stage_config(GRPOConfig(seed=0)))
    policy, log = await tree_iterations(
        store,
        trainer,
        parent,
        iterations=args.iterations,
        starts=args.starts,
        group_size=args.group_size,
        perfect_share=args.perfect_share,
        weighting=args.weighting,
        settings=SETTINGS,
    )
    trained_s = time.perf_counter() - started
    print(
        f"parent run: {len(starts)} reflect-refine start states "
        f"({sum(s.perfect for s in starts)} perfect); {args.iterations} iterations × "
        f"{args.starts} starts × G={args.group_size}: {trained_s:.0f} s"
    )
    print("| iteration | behaviour | starts (perfect) | mean C | groups used |")
    print("|---|---|---|---|---|")
    for index, it in enumerate(log):
        print(
            f"| {index} | {it.behaviour} | {it.starts} ({it.perfect_starts}) "
            f"| {it.metrics['reward_mean']:.3f} | {it.metrics['groups_used']:.0f} |"
        )
    print("\n| stop policy (reflect always) | accuracy | mean V | mean images |")
    print("|---|---|---|---|")
    for name, stop_policy in (
        ("R3 rule: stop on the stop phrase", FollowReflectionStopPolicy()),
        ("50/50 (the parent run's)", UniformStopPolicy(0.5)),
        (f"Tree-RL {policy.name}@{policy.version}, sampling", policy),
        (f"Tree-RL {policy.name}@{policy.version}, greedy", policy.clone(greedy=True)),
    ):
        accuracy, score, images = await evaluate(stop_policy)
        print(f"| {name} | {accuracy:.3f} | {score:.3f} | {images:.2f} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--starts", type=int, default=32)
    parser.add_argument("--group-size", "-G", type=int, default=8)
    parser.add_argument("--perfect-share", type=float, default=0.15)
    parser.add_argument("--weighting", choices=("uniform", "room"), default="uniform")
    asyncio.run(main(parser.parse_args()))
