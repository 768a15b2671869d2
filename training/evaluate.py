"""Evaluate routers on ShapeWorld prompts without recording: reward, images, mode mix.

The reward is the checker score with the Self-Adaptive Interleaved Reasoner's (SAIR) complexity
penalty. The penalty is relative to a group, so *which* group matters when routers are compared:

- :func:`evaluate_router` applies it within each prompt's own ``samples`` trajectories. A
  router that always decomposes is then never penalised (no cheaper winner is in its group):
  this number alone does not say whether a router picks cheap modes.
- :func:`compare_routers` runs two routers on the same tasks (same seeds: common random
  numbers, so differences come from the mode choices) and applies the penalty within the pooled
  group of both routers' trajectories of a prompt: a head-to-head under the training reward.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent_graph.runner import Runner, TrajectoryResult, make_group_tasks
from nodes.context import GraphSettings
from nodes.state import Budget
from policies.base import MODES, ModeObservation, ModePolicy
from training.decisions.sampling import shapeworld_policy_context
from training.rewards import complexity_penalty


@dataclass
class RouterReport:
    reward: float
    """Mean penalised reward (the GRPO objective) over every trajectory."""
    score: float
    """Mean checker score."""
    images: float
    """Mean images per trajectory."""
    mode_mix: dict[str, dict[str, float]] = field(default_factory=dict)
    """category -> mode -> share of trajectories."""
    reward_by_category: dict[str, float] = field(default_factory=dict)
    trajectories: int = 0


def penalised_rewards(results: Sequence[TrajectoryResult], eps: float | None) -> list[float]:
    """Checker score of each result, with the complexity penalty within its task group."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_group[r.task.group_id].append(i)
    rewards = [r.score if r.score is not None else 0.0 for r in results]
    if eps is None:
        return rewards
    out = list(rewards)
    for members in by_group.values():
        shaped = complexity_penalty(
            [rewards[i] for i in members], [results[i].image_count for i in members], eps
        )
        for i, value in zip(members, shaped, strict=True):
            out[i] = value
    return out


def report(results: Sequence[TrajectoryResult], eps: float | None = 0.05) -> RouterReport:
    rewards = penalised_rewards(results, eps)
    modes: dict[str, Counter[str]] = defaultdict(Counter)
    by_category: dict[str, list[float]] = defaultdict(list)
    for r, value in zip(results, rewards, strict=True):
        category = r.task.category or "?"
        modes[category][r.mode or "?"] += 1
        by_category[category].append(value)
    n = max(len(results), 1)
    return RouterReport(
        reward=sum(rewards) / n,
        score=sum(r.score or 0.0 for r in results) / n,
        images=sum(r.image_count for r in results) / n,
        mode_mix={
            c: {m: counts[m] / sum(counts.values()) for m in MODES} for c, counts in modes.items()
        },
        reward_by_category={c: sum(v) / len(v) for c, v in by_category.items()},
        trajectories=len(results),
    )


async def _run(
    router: ModePolicy,
    prompts: Sequence[Any],
    samples: int,
    seed: int,
    budget: Budget | None,
    settings: GraphSettings | None,
    concurrency: int,
) -> list[TrajectoryResult]:
    tasks = make_group_tasks(
        [p.text for p in prompts], samples, seed=seed, categories=[p.category for p in prompts]
    )
    ctx = shapeworld_policy_context(router, settings=settings)
    runner = Runner(ctx, concurrency=concurrency, budget=budget, keep_steps=False)
    return await runner.run(tasks)


async def evaluate_router(
    router: ModePolicy,
    prompts: Sequence[Any],
    *,
    samples: int = 4,
    seed: int = 0,
    complexity_eps: float | None = 0.05,
    budget: Budget | None = None,
    settings: GraphSettings | None = None,
    concurrency: int = 64,
) -> RouterReport:
    """Run each prompt (``PromptItem``s: text + category) ``samples`` times with ``router``;
    the penalty is applied within each prompt's own samples."""
    results = await _run(router, prompts, samples, seed, budget, settings, concurrency)
    return report(results, complexity_eps)


@dataclass
class Comparison:
    reward_a: float
    """Mean penalised reward of router A's trajectories, penalty over the pooled group."""
    reward_b: float
    report_a: RouterReport
    """A on its own (penalty within its own samples), with score, images and mode mix."""
    report_b: RouterReport
    difference_stderr: float = 0.0
    """Standard error of reward_b − reward_a, paired over prompts (each prompt's mean
    difference is one observation)."""

    @property
    def difference(self) -> float:
        return self.reward_b - self.reward_a


async def compare_routers(
    router_a: ModePolicy,
    router_b: ModePolicy,
    prompts: Sequence[Any],
    *,
    samples: int = 4,
    seed: int = 0,
    complexity_eps: float | None = 0.05,
    budget: Budget | None = None,
    settings: GraphSettings | None = None,
    concurrency: int = 64,
) -> Comparison:
    """Head-to-head: both routers on the same tasks; for each prompt, the penalty is applied
    over the 2·``samples`` trajectories of both; returns each router's mean."""
    runs = [
        await _run(r, prompts, samples, seed, budget, settings, concurrency)
        for r in (router_a, router_b)
    ]
    pooled = penalised_rewards([*runs[0], *runs[1]], complexity_eps)
    n = len(runs[0])
    per_prompt: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i, (r, value) in enumerate(zip([*runs[0], *runs[1]], pooled, strict=True)):
        per_prompt[r.task.group_id][i >= n] += value / samples
    diffs = [b - a for a, b in per_prompt.values()]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
    return Comparison(
        reward_a=sum(pooled[:n]) / max(n, 1),
        reward_b=sum(pooled[n:]) / max(len(runs[1]), 1),
        report_a=report(runs[0], complexity_eps),
        report_b=report(runs[1], complexity_eps),
        difference_stderr=(var / len(diffs)) ** 0.5,
    )


def mode_probabilities(router: Any, prompts: Sequence[Any]) -> dict[str, dict[str, float]]:
    """category -> mode -> mean of the router's probability of the mode over the prompts (a
    learned router's ``probabilities``: exact, no sampling noise)."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(MODES, 0.0))
    counts: Counter[str] = Counter()
    for p in prompts:
        probs = router.probabilities(ModeObservation(p.text))
        for mode in MODES:
            sums[p.category][mode] += probs[mode]
        counts[p.category] += 1
    return {c: {m: v / counts[c] for m, v in modes.items()} for c, modes in sums.items()}


def oracle_accuracy(options: Sequence[Sequence[tuple[float, float]]], images: float) -> float:
    """The best mean accuracy any mode choice reaches with at most ``images`` mean images.

    ``options[u]`` lists, for unit u (a prompt category, or a single prompt), each fixed mode's
    measured (accuracy, mean images) on it; units weigh equally. A router may mix modes on a
    unit, so this is the linear relaxation of a multiple-choice knapsack:

        max Σ_u Σ_m x_um acc_um   s.t.   Σ_u Σ_m x_um img_um ≤ images · |U|,
                                         Σ_m x_um = 1,  x ≥ 0

    solved exactly by starting every unit at its cheapest option and buying the steps of each
    unit's upper convex hull in order of accuracy gained per image. An upper bound for routers
    that see no more than a unit's identity (when a unit's numbers are measured on the very
    samples, the in-sample max is optimistic too). Returns nan if even the cheapest options
    need more images.
    """
    accuracy = spent = 0.0
    steps: list[tuple[float, float, float]] = []  # (gain per image, gain, images)
    for unit in options:
        hull: list[tuple[float, float]] = []  # (images, accuracy), accuracy increasing
        for acc, img in sorted(set(unit), key=lambda o: (o[1], -o[0])):
            if hull and acc <= hull[-1][1]:
                continue  # costs at least as much, gains nothing
            while len(hull) >= 2:
                (i1, a1), (i2, a2) = hull[-2], hull[-1]
                if (a2 - a1) * (img - i1) <= (acc - a1) * (i2 - i1):
                    hull.pop()  # the middle point is under the chord: never worth buying
                else:
                    break
            hull.append((img, acc))
        spent += hull[0][0]
        accuracy += hull[0][1]
        for (i1, a1), (i2, a2) in itertools.pairwise(hull):
            steps.append(((a2 - a1) / (i2 - i1), a2 - a1, i2 - i1))
    budget = images * len(options)
    if spent > budget + 1e-12:
        return float("nan")
    for _, gain, cost in sorted(steps, reverse=True):
        if spent >= budget:
            break
        share = min(1.0, (budget - spent) / cost)
        accuracy += share * gain
        spent += share * cost
    return accuracy / len(options)
