"""Training curves in the terminal: one sparkline per metric of a training series.

::

    reward         ▂▃▅▆█  0.412 → 0.781 (5 iterations)
    accuracy       ▁▃▄▆█  0.250 → 0.625 (5 iterations)
    loss           █▅▃▂▁  0.031 → -0.004 (5 iterations)

``atelier runs --curves`` prints every training series the store holds
(``storage.analysis.training_series``); ``atelier train`` prints those of the iterations it
just ran. Rollout figures (reward = the run's mean judge score V, accuracy, images) come from
the run each iteration trained on; the rest from the trainer's metrics.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from storage.analysis import TrainingPoint, TrainingSeries
    from storage.store import TrajectoryStore

BARS = "▁▂▃▄▅▆▇█"
FLAT = BARS[3]
"""A constant series: a flat line in the middle."""


def sparkline(values: Sequence[float | None]) -> str:
    """One block character per value, scaled between the finite values' min and max; a
    non-finite (or None) value is a space; a constant series is a flat middle line."""
    finite = [v for v in values if _finite(v)]
    if not finite:
        return " " * len(values)
    low, high = min(finite), max(finite)
    line = []
    for value in values:
        if not _finite(value):
            line.append(" ")
        elif high == low:
            line.append(FLAT)
        else:
            level = round((value - low) / (high - low) * (len(BARS) - 1))  # type: ignore[operator]
            line.append(BARS[level])
    return "".join(line)


CURVES: tuple[tuple[str, Callable[[TrainingPoint], float | None]], ...] = (
    ("reward", lambda p: p.rollout.mean_score if p.rollout else None),
    ("accuracy", lambda p: p.rollout.accuracy if p.rollout else None),
    ("images", lambda p: p.rollout.mean_images if p.rollout else None),
    ("loss", lambda p: p.metrics.get("loss")),
    ("kl", lambda p: p.metrics.get("kl")),
    ("clip fraction", lambda p: p.clip_fraction),
)
"""The curves shown, in order: a curve with no finite value is left out."""


def curve_lines(points: Sequence[TrainingPoint]) -> list[str]:
    """One line per curve the points have: name, sparkline, first → last value, count."""
    width = max(len(name) for name, _ in CURVES)
    lines = []
    for name, value_of in CURVES:
        values = [value_of(point) for point in points]
        finite = [v for v in values if _finite(v)]
        if not finite:
            continue
        count = len(points)
        span = f"{_number(finite[0])} → {_number(finite[-1])}"
        noun = "iteration" if count == 1 else "iterations"
        lines.append(f"{name:<{width}}  {sparkline(values)}  {span} ({count} {noun})")
    return lines


def print_series(series: Sequence[TrainingSeries], file: TextIO | None = None) -> None:
    """Every series: its label, then its curves indented (or a line saying there are none)."""
    out = file or sys.stdout
    if not series:
        print("no training series in this store (atelier train records them)", file=out)
        return
    for index, one in enumerate(series):
        if index:
            print(file=out)
        print(f"{one.label}  [{one.key}]", file=out)
        lines = curve_lines(one.points) or ["(no metric recorded)"]
        for line in lines:
            print(f"  {line}", file=out)


def print_iterations(
    store: TrajectoryStore,
    iterations: Sequence[tuple[str, str | None, dict[str, float]]],
    file: TextIO | None = None,
) -> None:
    """The curves of iterations just run: (run id, trained version or None, metrics) each."""
    points = iteration_points(store, iterations)
    if not points:
        return
    out = file or sys.stdout
    print(file=out)
    for line in curve_lines(points):
        print(line, file=out)


def iteration_points(
    store: TrajectoryStore, iterations: Sequence[tuple[str, str | None, dict[str, float]]]
) -> list[TrainingPoint]:
    """Training points of a trainer's log (every iteration, whether it saved a version or not),
    each with its run's summary."""
    from storage.analysis import TrainingPoint, run_summaries

    summaries = run_summaries(store, [run_id for run_id, _, _ in iterations])
    points = []
    for index, (run_id, trained, metrics) in enumerate(iterations):
        rollout = summaries.get(run_id)
        if rollout is None:
            continue
        finite = {k: float(v) for k, v in metrics.items() if _finite(v)}
        points.append(
            TrainingPoint(index, trained or "", rollout.run.created_at, run_id, finite, rollout)
        )
    return points


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: float) -> str:
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:.2e}"
