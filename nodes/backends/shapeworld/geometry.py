"""Rectangles, overlap tests, and the tests of a spatial relation between two groups: GenEval's
for the four directions, and adjacency for "next to"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nodes.backends.shapeworld.render import Box
from nodes.backends.shapeworld.sizes import object_side
from nodes.backends.shapeworld.vocab import NEXT_TO

NEXT_TO_REACH = 1.0
"""Largest horizontal gap between two adjacent groups, in mean object sides (see ``adjacent``)."""


@dataclass(frozen=True)
class Rect:
    """An area of the canvas, (x0, y0) inclusive to (x1, y1) exclusive."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


def boxes_overlap(a: Box, b: Box, gap: int = 0) -> bool:
    """True when ``a`` and ``b`` come closer than ``gap`` pixels."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def union_box(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def centre_of(boxes: Sequence[Box]) -> tuple[float, float]:
    """Mean of the box centres."""
    xs = [(b[0] + b[2] - 1) / 2 for b in boxes]
    ys = [(b[1] + b[3] - 1) / 2 for b in boxes]
    return sum(xs) / len(xs), sum(ys) / len(ys)


def relation_holds(
    subject: Sequence[Box], reference: Sequence[Box], relation: str, threshold: float = 0.1
) -> bool:
    """Whether the ``subject`` group stands in ``relation`` to the ``reference`` group.

    GenEval's rule, applied to groups: compare the mean centres; shrink the offset by
    ``threshold`` x the summed mean object sizes (so touching neighbours are not "left of" each
    other); the relation holds when its direction carries more than half of the remaining offset.
    An empty group satisfies nothing. "next to" is :func:`adjacent`.
    """
    if not subject or not reference:
        return False
    if relation == NEXT_TO:
        return adjacent(subject, reference, threshold)
    (ax, ay), (bx, by) = centre_of(subject), centre_of(reference)
    widths = [sum(b[2] - b[0] for b in g) / len(g) for g in (subject, reference)]
    heights = [sum(b[3] - b[1] for b in g) / len(g) for g in (subject, reference)]
    dx, dy = ax - bx, ay - by
    norm = (dx * dx + dy * dy) ** 0.5
    rx = max(abs(dx) - threshold * sum(widths), 0.0) * (1 if dx >= 0 else -1)
    ry = max(abs(dy) - threshold * sum(heights), 0.0) * (1 if dy >= 0 else -1)
    if norm == 0 or (abs(rx) < 1e-3 and abs(ry) < 1e-3):
        return False
    rx, ry = rx / norm, ry / norm
    return {
        "left of": rx < -0.5,
        "right of": rx > 0.5,
        "above": ry < -0.5,
        "below": ry > 0.5,
    }[relation]


def adjacent(subject: Sequence[Box], reference: Sequence[Box], threshold: float = 0.1) -> bool:
    """Whether the two groups are next to each other, the subject on either side.

    Adjacent means side by side and close, which takes three tests:

    - side by side: "left of" or "right of" holds by GenEval's rule, so one shape above the other
      is not next to it, however close;
    - level: the groups' bounding boxes share at least one row, so a diagonal neighbour is not;
    - close: the horizontal gap between the groups' bounding boxes is at most ``NEXT_TO_REACH``
      mean object sides, i.e. nothing of their size would fit between them.
    """
    if not subject or not reference:
        return False
    if not (
        relation_holds(subject, reference, "left of", threshold)
        or relation_holds(subject, reference, "right of", threshold)
    ):
        return False
    a, b = union_box(subject), union_box(reference)
    if a[1] >= b[3] or b[1] >= a[3]:
        return False
    gap = max(a[0] - b[2], b[0] - a[2], 0)
    sides = [sum(object_side(box) for box in g) / len(g) for g in (subject, reference)]
    return gap <= NEXT_TO_REACH * sum(sides) / 2


def observed_relation(
    subject: Sequence[Box], reference: Sequence[Box], threshold: float = 0.1
) -> str | None:
    """The relation that holds most clearly between two groups, or None (too close to call)."""
    holding = [
        r
        for r in ("left of", "right of", "above", "below")
        if relation_holds(subject, reference, r, threshold)
    ]
    if not holding:
        return None
    (ax, ay), (bx, by) = centre_of(subject), centre_of(reference)
    horizontal = abs(ax - bx) >= abs(ay - by)
    preferred = [r for r in holding if (r in ("left of", "right of")) == horizontal]
    return (preferred or holding)[0]
