"""Seed 002's composite reward and its intra-group complexity penalty."""

from __future__ import annotations

from collections.abc import Sequence


def stepwise_reward(step_scores: Sequence[float]) -> float:
    """R_s = (1/T) Σ_t Analyzer(text_t): the mean judge score of the T intermediate texts."""
    if not step_scores:
        raise ValueError("step-wise reward of no intermediate texts is undefined")
    return sum(step_scores) / len(step_scores)


def composite_reward(
    outcome: float,
    format_: float = 0.0,
    stepwise: float = 0.0,
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0),
) -> float:
    """R = a1·R_o + a2·R_f + a3·R_s. Seed 002 does not publish the a's; the default keeps the
    outcome alone."""
    a1, a2, a3 = weights
    return a1 * outcome + a2 * format_ + a3 * stepwise


def complexity_penalty(
    rewards: Sequence[float], image_counts: Sequence[int], eps: float
) -> list[float]:
    """Intra-group complexity penalty ("win with the fewest images", seed 002):

        near   = { i : R_i >= max_j R_j − eps }
        N*     = min_{i ∈ near} N_img_i
        R'_i   = R_i · N* / N_img_i   for i ∈ near;   R'_i = R_i otherwise

    An image count below 1 (a trajectory that failed before drawing) counts as 1.
    """
    if len(rewards) != len(image_counts):
        raise ValueError("one image count per reward")
    if not rewards:
        return []
    if eps < 0:
        raise ValueError("eps must be >= 0")
    counts = [max(1, int(n)) for n in image_counts]
    threshold = max(rewards) - eps
    near = [r >= threshold for r in rewards]
    fewest = min(n for n, is_near in zip(counts, near, strict=True) if is_near)
    return [
        r * fewest / n if is_near else r
        for r, n, is_near in zip(rewards, counts, near, strict=True)
    ]
