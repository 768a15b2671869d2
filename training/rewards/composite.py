"""Seed 002's composite reward and its intra-group complexity penalty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

ComplexityForm = Literal["scale", "margin"]


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
    counts, near, fewest = _near_best(rewards, image_counts, eps)
    return [
        r * fewest / n if is_near else r
        for r, n, is_near in zip(rewards, counts, near, strict=True)
    ]


def margin_complexity_penalty(
    rewards: Sequence[float], image_counts: Sequence[int], eps: float
) -> list[float]:
    """Order-preserving variant: scale the near-best members' *margin* over the rest.

        near   = { i : R_i >= max_j R_j − eps },   N* = min_{i ∈ near} N_img_i
        b      = max_{j ∉ near} R_j   (0 when every member is near-best)
        R'_i   = b + (R_i − b) · N* / N_img_i   for i ∈ near;   R'_i = R_i otherwise

    Seed 002's form (:func:`complexity_penalty`) scales the whole reward, so a near-best member
    with twice the images falls to half its reward, possibly below a member that was not near
    the best (a right 2-image answer 1.0 → 0.5, under a wrong 1-image answer scoring 0.67):
    the penalty then teaches "cheap and wrong beats right". Here a near-best member never falls
    to or below a member outside the near-best set (R'_i > b, since R_i > b), so the ranking of
    better against worse answers is kept and only ties (within eps) are broken by images; when
    every member is near-best (b = 0) it is seed 002's form.
    """
    counts, near, fewest = _near_best(rewards, image_counts, eps)
    others = [r for r, is_near in zip(rewards, near, strict=True) if not is_near]
    base = max(others) if others else 0.0
    return [
        base + (r - base) * fewest / n if is_near else r
        for r, n, is_near in zip(rewards, counts, near, strict=True)
    ]


def apply_complexity_penalty(
    rewards: Sequence[float],
    image_counts: Sequence[int],
    eps: float,
    form: ComplexityForm = "scale",
) -> list[float]:
    """The penalty by name: "scale" (seed 002 as stated) or "margin" (order-preserving)."""
    if form == "scale":
        return complexity_penalty(rewards, image_counts, eps)
    if form == "margin":
        return margin_complexity_penalty(rewards, image_counts, eps)
    raise ValueError(f"complexity penalty form must be 'scale' or 'margin', not {form!r}")


def _near_best(
    rewards: Sequence[float], image_counts: Sequence[int], eps: float
) -> tuple[list[int], list[bool], int]:
    """(image counts with 0 read as 1, near-best flags, N*) for both penalty forms."""
    if len(rewards) != len(image_counts):
        raise ValueError("one image count per reward")
    if eps < 0:
        raise ValueError("eps must be >= 0")
    if not rewards:
        return [], [], 1
    counts = [max(1, int(n)) for n in image_counts]
    threshold = max(rewards) - eps
    near = [r >= threshold for r in rewards]
    fewest = min(n for n, is_near in zip(counts, near, strict=True) if is_near)
    return counts, near, fewest
