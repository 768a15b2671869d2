"""The Self-Adaptive Interleaved Reasoner's (SAIR) composite reward and its intra-group
complexity penalty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

ComplexityForm = Literal["scale", "margin", "linear"]


def stepwise_reward(step_scores: Sequence[float]) -> float:
    """R_s = (1/T) Σ_t Analyzer(text_t): the mean judge score of the T intermediate texts.

    Stored as ``stepwise`` (each text's score on its step, R_s on the trajectory) by
    ``training.rewards.stepwise.store_stepwise_rewards``, from an analyzer's calls."""
    if not step_scores:
        raise ValueError("step-wise reward of no intermediate texts is undefined")
    return sum(step_scores) / len(step_scores)


def composite_reward(
    outcome: float,
    format_: float = 0.0,
    stepwise: float = 0.0,
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0),
) -> float:
    """R = a1·R_o + a2·R_f + a3·R_s. SAIR does not publish the a's; the default keeps the
    outcome alone."""
    a1, a2, a3 = weights
    return a1 * outcome + a2 * format_ + a3 * stepwise


def complexity_penalty(
    rewards: Sequence[float], image_counts: Sequence[int], eps: float
) -> list[float]:
    """Intra-group complexity penalty ("win with the fewest images", SAIR):

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

    SAIR's form (:func:`complexity_penalty`) scales the whole reward, so a near-best member
    with twice the images falls to half its reward, possibly below a member that was not near
    the best (a right 2-image answer 1.0 → 0.5, under a wrong 1-image answer scoring 0.67):
    the penalty then teaches "cheap and wrong beats right". Here a near-best member never falls
    to or below a member outside the near-best set (R'_i > b, since R_i > b), so the ranking of
    better against worse answers is kept and only ties (within eps) are broken by images; when
    every member is near-best (b = 0) it is SAIR's form.
    """
    counts, near, fewest = _near_best(rewards, image_counts, eps)
    others = [r for r, is_near in zip(rewards, near, strict=True) if not is_near]
    base = max(others) if others else 0.0
    return [
        base + (r - base) * fewest / n if is_near else r
        for r, n, is_near in zip(rewards, counts, near, strict=True)
    ]


def linear_complexity_penalty(
    rewards: Sequence[float], image_counts: Sequence[int], cost: float
) -> list[float]:
    """A price per image, for every member (not SAIR's; a Lagrangian form):

        N_min = min_j N_img_j,    R'_i = R_i − λ · (N_img_i − N_min)

    Within a group the −λ·N_min shift is common to all members, so GRPO's advantages see
    R_i − λ·N_img_i: the policy maximises E[R] − λ·E[N_img] per prompt, which puts it on the
    best-accuracy-for-its-images frontier, at the point where one more image buys λ of reward.
    The near-best forms instead compare each member with the cheapest winner *of its group*,
    so a mode that is sometimes right cheaply (reflect accepting a lucky first image) beats one
    that is nearly always right with one image more. The best cheapest member keeps R; no
    member falls more than λ·(N_max − N_min). Unlike "margin" it may rank a right answer
    below a wrong one, when the extra images cost more than the score they bought: that is
    the trade λ prices.
    """
    if len(rewards) != len(image_counts):
        raise ValueError("one image count per reward")
    if cost < 0:
        raise ValueError("the cost per image must be >= 0")
    if not rewards:
        return []
    counts = [max(1, int(n)) for n in image_counts]
    fewest = min(counts)
    return [r - cost * (n - fewest) for r, n in zip(rewards, counts, strict=True)]


def apply_complexity_penalty(
    rewards: Sequence[float],
    image_counts: Sequence[int],
    eps: float,
    form: ComplexityForm = "scale",
    cost: float = 0.1,
) -> list[float]:
    """The penalty by name: "scale" (SAIR as stated) or "margin" (order-preserving), both
    with near-best margin ``eps``; or "linear", with ``cost`` λ per image."""
    if form == "scale":
        return complexity_penalty(rewards, image_counts, eps)
    if form == "margin":
        return margin_complexity_penalty(rewards, image_counts, eps)
    if form == "linear":
        return linear_complexity_penalty(rewards, image_counts, cost)
    raise ValueError(f"complexity penalty form must be scale, margin or linear, not {form!r}")


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
