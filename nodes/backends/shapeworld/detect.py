"""Finding the shapes in an image from its pixels alone.

Pipeline, all vectorised over the image: each pixel -> nearest palette colour (a 32^3 lookup
table, so near-palette pixels of a resized or JPEG'd image still count) -> horizontal runs of one
colour -> runs joined across rows (8-connectivity) into components by label propagation ->
shape from the component's geometry. Only the runs (a few hundred) are ever iterated, never the
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from nodes.backends.shapeworld.render import Box
from nodes.backends.shapeworld.vocab import COLOURS, PALETTE

_QUANT = 3
"""Bits dropped per channel for the lookup table (8 -> 5 bits: 32768 entries)."""

# Shape features: the fill ratio (area / bounding-box area: square 1.0, circle ~0.79, triangle
# and diamond ~0.5, star ~0.34) and the width of the rows at 25%, 50% and 75% of the height
# relative to the box width (triangle ~.27/.54/.77 widening downwards; diamond ~.5/.95/.5; star
# ~.17/.68/.5, thin at the top). The thresholds sit midway between the shapes, measured on clean
# renders and on JPEG'd ones (which blur the star's notches, raising its fill towards 0.55).
_SQUARE_FILL = 0.9
_SQUARE_FILL_BLURRED = 0.8
_SQUARE_ROWS = 0.91
_CIRCLE_FILL = 0.65
_STAR_FILL = 0.45
_STAR_TOP_ROW = 0.35
_TRIANGLE_WIDENING = 0.08


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    colour: str
    centre: tuple[float, float]
    """Centre of the bounding box, (x, y)."""
    bbox: Box
    """(x0, y0, x1, y1), exclusive ends."""
    area: int

    @property
    def size(self) -> int:
        """Side of the square the shape fills (as :class:`PlacedObject.size`)."""
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])


@dataclass(frozen=True, eq=False)
class Runs:
    """Horizontal runs of one palette colour, row-major, with the object each belongs to."""

    row: np.ndarray
    start: np.ndarray
    end: np.ndarray
    """Exclusive."""
    object_index: np.ndarray
    """Index into the detected objects, or -1 for runs of discarded (too small) components."""

    def mask(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        """Boolean (height, width) mask of the pixels of detected object ``index``."""
        mask = np.zeros(shape, dtype=bool)
        mine = self.object_index == index
        for r, s, e in zip(self.row[mine], self.start[mine], self.end[mine], strict=True):
            mask[r, s:e] = True
        return mask


@lru_cache(maxsize=8)
def _colour_table(tolerance: float) -> np.ndarray:
    """Quantised RGB -> 1 + palette index of the nearest colour within ``tolerance``, else 0."""
    levels = (np.arange(256 >> _QUANT) << _QUANT) + (1 << (_QUANT - 1))
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    palette = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)
    dist = np.linalg.norm(grid[:, None, :] - palette[None, :, :], axis=-1)
    nearest = dist.argmin(axis=1)
    table = np.where(dist.min(axis=1) <= tolerance, nearest + 1, 0).astype(np.uint8)
    table.flags.writeable = False
    return table


def colour_labels(image: Image.Image, tolerance: float = 100.0) -> np.ndarray:
    """(height, width) uint8: 0 for no palette colour, else 1 + index into ``COLOURS``."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8) >> _QUANT
    bits = 8 - _QUANT
    index = (rgb[..., 0].astype(np.int32) << (2 * bits)) | (rgb[..., 1].astype(np.int32) << bits)
    index |= rgb[..., 2]
    return _colour_table(tolerance)[index]


def _find_runs(labels: np.ndarray) -> tuple[np.ndarray, ...]:
    height, width = labels.shape
    padded = np.zeros((height, width + 2), dtype=np.uint8)
    padded[:, 1:-1] = labels
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])
    values = np.zeros(len(rows), dtype=np.uint8)
    inside = cols < width
    values[inside] = labels[rows[inside], cols[inside]]
    # A change into a colour starts a run; the next change in row-major order (always in the same
    # row, thanks to the zero padding) ends it.
    starts = np.nonzero(values)[0]
    return rows[starts], cols[starts], cols[starts + 1], values[starts]


def _components(
    row: np.ndarray, start: np.ndarray, end: np.ndarray, value: np.ndarray
) -> np.ndarray:
    """Component id per run: runs of one colour on adjacent rows that touch (8-connected)."""
    n = len(row)
    stride = int(end.max(initial=0)) + 2
    end_keys = row * stride + end
    start_keys = row * stride + start
    # Runs on row r+1 touching run i form a contiguous slice [lo, hi) of the row-major order.
    lo = np.searchsorted(end_keys, (row + 1) * stride + start, side="left")
    hi = np.searchsorted(start_keys, (row + 1) * stride + end, side="right")
    counts = np.maximum(hi - lo, 0)
    first = np.repeat(np.arange(n), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    second = np.repeat(lo, counts) + offsets
    same = value[first] == value[second]
    first, second = first[same], second[same]
    labels = np.arange(n)
    while True:
        # Min-label propagation along the edges, then pointer jumping to shortcut long chains.
        low = np.minimum(labels[first], labels[second])
        new = labels.copy()
        np.minimum.at(new, first, low)
        np.minimum.at(new, second, low)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


def _classify(fill: float, upper: float, middle: float, lower: float) -> str:
    if fill >= _SQUARE_FILL or (fill >= _SQUARE_FILL_BLURRED and min(upper, lower) >= _SQUARE_ROWS):
        return "square"
    if fill >= _CIRCLE_FILL:
        return "circle"
    if lower > middle + _TRIANGLE_WIDENING:
        return "triangle"
    if fill < _STAR_FILL or upper < _STAR_TOP_ROW:
        return "star"
    return "diamond"


def _row_widths(
    fraction: float,
    row: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    component: np.ndarray,
    box: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Per component: extent of its row at ``fraction`` of its height, over its box width."""
    x0, y0, x1, y1 = box
    k = len(x0)
    target = y0 + np.floor(fraction * (y1 - y0 - 1) + 0.5).astype(np.int64)
    on = row == target[component]
    lo = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(lo, component[on], start[on])
    hi = np.zeros(k, dtype=np.int64)
    np.maximum.at(hi, component[on], end[on])
    return np.maximum(hi - lo, 0) / (x1 - x0)


def detect_with_runs(
    image: Image.Image, tolerance: float = 100.0, min_area: int = 40
) -> tuple[list[DetectedObject], Runs]:
    """Detected objects (row-major order of their first pixel) and the runs that make them up."""
    row, start, end, value = _find_runs(colour_labels(image, tolerance))
    if len(row) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return [], Runs(empty, empty, empty, empty)
    component = _components(row, start, end, value)
    roots, component = np.unique(component, return_inverse=True)
    k = len(roots)
    length = end - start
    area = np.bincount(component, weights=length, minlength=k)
    x0 = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(x0, component, start)
    x1 = np.zeros(k, dtype=np.int64)
    np.maximum.at(x1, component, end)
    y0 = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(y0, component, row)
    y1 = np.zeros(k, dtype=np.int64)
    np.maximum.at(y1, component, row + 1)
    boxes = (x0, y0, x1, y1)
    upper, middle, lower = (
        _row_widths(f, row, start, end, component, boxes) for f in (0.25, 0.5, 0.75)
    )
    colour = np.zeros(k, dtype=np.uint8)
    colour[component] = value
    objects: list[DetectedObject] = []
    object_index = np.full(k, -1)
    for c in range(k):
        if area[c] < min_area:
            continue
        box = (int(x0[c]), int(y0[c]), int(x1[c]), int(y1[c]))
        fill = area[c] / ((box[2] - box[0]) * (box[3] - box[1]))
        object_index[c] = len(objects)
        objects.append(
            DetectedObject(
                shape=_classify(fill, upper[c], middle[c], lower[c]),
                colour=COLOURS[colour[c] - 1],
                centre=((box[0] + box[2] - 1) / 2, (box[1] + box[3] - 1) / 2),
                bbox=box,
                area=int(area[c]),
            )
        )
    return objects, Runs(row, start, end, object_index[component])


def detect(
    image: Image.Image, tolerance: float = 100.0, min_area: int = 40
) -> list[DetectedObject]:
    """The palette-coloured shapes in ``image``; anything else in it is ignored."""
    return detect_with_runs(image, tolerance, min_area)[0]


def scaled_min_area(min_area: int, size: tuple[int, int]) -> int:
    """``min_area`` is set for a 256x256 canvas; scale it with the image's area."""
    return max(4, round(min_area * size[0] * size[1] / (256 * 256)))
