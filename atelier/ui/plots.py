"""Line charts as inline SVG, drawn on the server: no script, no plotting library, nothing to
fetch (the pages' Content-Security-Policy allows neither).

:func:`line_chart` draws one or more series over integer x values (training iterations); points
that are missing or not finite break the line. Every label is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

PALETTE = ("#4f46e5", "#c0362c", "#1a7f37", "#9a6700", "#0f766e", "#7c3aed", "#b45309")


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float | None]]
    """(x, y); y None or not finite: no point there."""


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high == low:
        return [low]
    step = (high - low) / count
    return [low + i * step for i in range(count + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def line_chart(title: str, series: Sequence[Series], *, width: int = 420, height: int = 180) -> str:
    """An SVG chart of ``series`` (one colour each, with a legend when there are several);
    a chart with no finite point says so instead of drawing axes."""
    left, right, top, bottom = 48, 12, 26, 28
    points = [(x, y) for s in series for x, y in s.points if _finite(y)]
    head = f'<text class="chart-title" x="{left}" y="16">{html.escape(title)}</text>'
    if not points:
        return (
            f'<svg class="chart" role="img" aria-label="{html.escape(title)}: no data" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">{head}'
            f'<text class="chart-empty" x="{left}" y="{height // 2}">no data</text></svg>'
        )
    xs = [x for s in series for x, _ in s.points]
    x_low, x_high = min(xs), max(xs)
    y_low = min(y for _, y in points)
    y_high = max(y for _, y in points)
    if y_high == y_low:  # a flat line sits in the middle, with room around it
        pad = abs(y_low) * 0.1 or 1.0
        y_low, y_high = y_low - pad, y_high + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (0.5 if x_high == x_low else (x - x_low) / (x_high - x_low)) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    parts = [head]
    for tick in _ticks(y_low, y_high):
        y = py(tick)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">'
            f"{_fmt(tick)}</text>"
        )
    for x in sorted(set(xs)):
        parts.append(
            f'<text class="tick" x="{px(x):.1f}" y="{height - 10}" text-anchor="middle">'
            f"{_fmt(x)}</text>"
        )
    for index, one in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in one.points:
            if _finite(y):
                runs[-1].append((px(x), py(float(y))))  # type: ignore[arg-type]
            elif runs[-1]:
                runs.append([])
        for segment in runs:
            if len(segment) > 1:
                coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in segment)
                parts.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
                )
            for x, y in segment:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
        if len(series) > 1:
            lx = left + 8 + index * 110
            parts.append(
                f'<rect x="{lx}" y="{top - 2}" width="10" height="3" fill="{colour}"/>'
                f'<text class="legend" x="{lx + 14}" y="{top + 2}">'
                f"{html.escape(one.name)}</text>"
            )
    label = html.escape(f"{title}: " + ", ".join(s.name for s in series))
    return (
        f'<svg class="chart" role="img" aria-label="{label}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'
    )
