"""Learning on ShapeWorld: does a GRPO-trained router win with fewer images?

    PYTHONPATH=. python benchmarks/learning.py [--iterations 5] [--per-category 10] [-G 8]
                                               [--eval-per-category 12] [--samples 2]

Trains two routers from the uniform router's rollouts with the same seeds — with seed 002's
complexity penalty and without it — then evaluates every policy on a held-out prompt set
(different seed): the three fixed modes, the uniform and rule-based routers, and both GRPO
routers (sampling, as deployed). Reward = checker score V; budget 2 correction rounds (R3 trains
with short reflect-refine chains); 128 px images (scores and image counts match 256 px).
Targets (issue 5): the penalised router's accuracy within 0.02 of the best fixed mode with
≤ 70% of that mode's images; the penalty lowers mean images versus the unpenalised router.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from agent_graph.context import GraphSettings
from agent_graph.runner import Runner, make_group_tasks
from agent_graph.state import Budget
from nodes.backends.shapeworld import fixed_prompt_set
from policies.router import RouterPolicy
from policies.simple import FixedModePolicy, RuleBasedModePolicy, UniformModePolicy
from storage.store import TrajectoryStore
from training.collect import shapeworld_policy_context
from training.loop import grpo_iterations
from training.trainer import GRPOConfig, GRPOTrainer

SETTINGS = GraphSettings(width=128, height=128)
BUDGET = Budget(max_rounds=2)


def tasks_for(per_category: int, group_size: int, seed: int):
    items = fixed_prompt_set(per_category, seed=seed)
    return make_group_tasks(
        [i.text for i in items], group_size, seed=seed, categories=[i.category for i in items]
    )


async def train(penalty: float | None, args: argparse.Namespace, workdir: Path):
    store = TrajectoryStore(f"sqlite:///{workdir / f'train-{penalty}.db'}")
    batches = [
        tasks_for(args.per_category, args.group_size, seed=1 + k) for k in range(args.iterations)
    ]
    trainer = GRPOTrainer(RouterPolicy(seed=0), GRPOConfig(seed=0, complexity_eps=penalty))
    policy, _ = await grpo_iterations(
        store,
        trainer,
        batches,
        first_behaviour=UniformModePolicy(),
        budget=BUDGET,
        settings=SETTINGS,
    )
    store.close()
    return policy


async def evaluate(router, args: argparse.Namespace) -> tuple[float, float, float, dict]:
    tasks = tasks_for(args.eval_per_category, args.samples, seed=999)
    context = shapeworld_policy_context(router, settings=SETTINGS)
    results = await Runner(context, budget=BUDGET, keep_steps=False).run(tasks)
    n = len(results)
    modes = {m: sum(r.mode == m for r in results) / n for m in ("direct", "reflect", "decompose")}
    return (
        sum(r.correct for r in results) / n,
        sum(r.score or 0 for r in results) / n,
        sum(r.image_count for r in results) / n,
        modes,
    )


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="atelier-learning-"))
    started = time.perf_counter()
    with_penalty = await train(0.05, args, workdir)
    without_penalty = await train(None, args, workdir)
    trained_s = time.perf_counter() - started
    policies = {
        "direct only": FixedModePolicy("direct"),
        "reflect always": FixedModePolicy("reflect"),
        "decompose always": FixedModePolicy("decompose"),
        "uniform router": UniformModePolicy(),
        "rule-based router": RuleBasedModePolicy(),
        "GRPO router, no penalty": without_penalty,
        "GRPO router, complexity penalty": with_penalty,
    }
    rows = {name: await evaluate(policy, args) for name, policy in policies.items()}
    print(
        f"training: {args.iterations} iterations × {args.per_category * 9} prompts × "
        f"G={args.group_size}, {trained_s:.0f} s for both routers; held-out: "
        f"{args.eval_per_category * 9} prompts × {args.samples} samples"
    )
    print("| policy | accuracy | mean V | mean images | direct / reflect / decompose |")
    print("|---|---|---|---|---|")
    for name, (accuracy, score, images, modes) in rows.items():
        mix = " / ".join(f"{modes[m]:.2f}" for m in ("direct", "reflect", "decompose"))
        print(f"| {name} | {accuracy:.3f} | {score:.3f} | {images:.2f} | {mix} |")
    fixed = {k: v for k, v in rows.items() if k.endswith(("only", "always"))}
    best_name, best = max(fixed.items(), key=lambda kv: kv[1][0])
    ours = rows["GRPO router, complexity penalty"]
    print(f"\nbest fixed mode: {best_name} (accuracy {best[0]:.3f}, {best[2]:.2f} images)")
    print(
        f"penalised router: accuracy gap {best[0] - ours[0]:+.3f} (target ≤ 0.02), images "
        f"{ours[2] / best[2]:.0%} of it (target ≤ 70%); penalty changes images "
        f"{rows['GRPO router, no penalty'][2]:.2f} → {ours[2]:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--per-category", type=int, default=10)
    parser.add_argument("--group-size", "-G", type=int, default=8)
    parser.add_argument("--eval-per-category", type=int, default=12)
    parser.add_argument("--samples", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
