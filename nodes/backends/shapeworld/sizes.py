"""What "big" and "small" mean in pixels: the sizes they are drawn at and the sizes they pass at.

A size word is absolute, not relative to the other shapes: "a big red circle" alone on the canvas
is checkable, and GenEval-style scoring stays one independent criterion per group. Everything is
set for a 256-pixel canvas and scales with the image's shorter side, as the other drawing sizes
do (``layout.scene_size_range``).

The bands leave a margin on both sides of each threshold, so a clean render is judged by what was
asked and a resized or JPEG'd one (whose detected boxes grow or shrink by a pixel) still is:

- big: drawn 64-76 px, passes at 58 px or more. The ordinary size tops out at 56 (a lone
  object), so an ignored "big" always fails.
- small: drawn 16-22 px, passes at 26 px or less (the detector reads every shape reliably from
  12 px up). The ordinary size of up to three objects starts at 30, so an ignored "small"
  fails there (crowds of four or more are drawn from 20-22 px up, and may pass).

An object may shrink below its band when its area is crowded (see ``layout.place_objects``), so a
big group that does not fit is drawn, and judged, too small -- a realistic failure.
"""

from __future__ import annotations

from nodes.backends.shapeworld.render import Box

CANVAS = 256
"""The canvas side the pixel figures below are set for."""
DRAWN: dict[str, tuple[int, int]] = {"big": (64, 76), "small": (16, 22)}
"""Object side range each size word is drawn at."""
BIG_AT_LEAST = 58
"""Smallest object side that passes as big."""
SMALL_AT_MOST = 26
"""Largest object side that passes as small."""
SMALLEST_DRAWN = 12
"""No object is drawn smaller than this, on any canvas (the detector's floor, as elsewhere)."""


def _scaled(pixels: int, canvas_side: int) -> int:
    return round(pixels * canvas_side / CANVAS)


def drawn_size_range(size: str, width: int, height: int) -> tuple[int, int]:
    """The object side range to draw ``size`` ('big' or 'small') at on this canvas."""
    lo, hi = DRAWN[size]
    side = min(width, height)
    return max(SMALLEST_DRAWN, _scaled(lo, side)), max(SMALLEST_DRAWN, _scaled(hi, side))


def object_side(box: Box) -> int:
    """Side of the square an object fills: its longer box side (a star is less tall than wide)."""
    return max(box[2] - box[0], box[3] - box[1])


def size_class(box: Box, canvas_side: int) -> str:
    """'big', 'small', or 'medium' (neither) for an object's box on a canvas of that side."""
    side = object_side(box)
    if side >= _scaled(BIG_AT_LEAST, canvas_side):
        return "big"
    if side <= _scaled(SMALL_AT_MOST, canvas_side):
        return "small"
    return "medium"
