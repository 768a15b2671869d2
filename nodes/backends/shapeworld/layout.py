"""Where objects go: non-overlapping placement inside an area, honouring relations.

Objects are placed on a jittered grid of cells inside an area, skipping cells that come too close
to objects already on the canvas; when the area is too small the objects shrink, and what still
does not fit is left out (a real model would crowd or drop objects too). A group "next to"
another is placed in a block of cells flush against it (:func:`beside_areas`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nodes.backends.shapeworld.geometry import (
    Rect,
    boxes_overlap,
    centre_of,
    relation_holds,
    union_box,
)
from nodes.backends.shapeworld.render import Box, PlacedObject, Scene
from nodes.backends.shapeworld.sizes import drawn_size_range
from nodes.backends.shapeworld.spec import Group, SceneSpec
from nodes.backends.shapeworld.vocab import NEXT_TO


@dataclass(frozen=True)
class Region:
    """A named part of the canvas: 'left'/'right' and/or 'top'/'bottom' (None = whole span)."""

    horizontal: str | None = None
    vertical: str | None = None


def region_area(region: Region | None, width: int, height: int) -> Rect:
    x0, x1 = {"left": (0, width / 2), "right": (width / 2, width)}.get(
        region.horizontal if region else None, (0, width)
    )
    y0, y1 = {"top": (0, height / 2), "bottom": (height / 2, height)}.get(
        region.vertical if region else None, (0, height)
    )
    return Rect(x0, y0, x1, y1)


def scene_size_range(
    total_objects: int, width: int, height: int, bounds: tuple[int, int] = (20, 56)
) -> tuple[int, int]:
    """Object sizes for a fresh scene: a lone object is drawn big, a crowd small. ``bounds``
    (for a 256 canvas) clamp the range; everything scales with the canvas."""
    lo, hi = (40, 56) if total_objects <= 1 else (30, 46) if total_objects <= 3 else (22, 34)
    if total_objects > 8:
        lo, hi = 20, 28
    lo, hi = min(max(lo, bounds[0]), bounds[1]), min(max(hi, bounds[0]), bounds[1])
    scale = min(width, height) / 256
    return max(12, round(lo * scale)), max(12, round(hi * scale))


def group_size_range(
    group: Group, width: int, height: int, ordinary: tuple[int, int]
) -> tuple[int, int]:
    """The sizes to draw ``group`` at: its size word's band, else the scene's ``ordinary`` range."""
    return drawn_size_range(group.size, width, height) if group.size else ordinary


def group_regions(spec: SceneSpec) -> list[Region | None]:
    """A region per group that makes every relation hold: related groups are ranked along the
    relation's axis (a chain "A left of B above C" puts A left, B right and top, C right and
    bottom); groups with no relation get the whole canvas. "A next to B" ranks A left of B, which
    leaves B room on A's right, where :func:`layout_scene` puts it."""
    n = len(spec.groups)
    col, row = [0] * n, [0] * n
    chain = [0] * n
    for i in range(1, n):
        relation = spec.relation_between(i - 1, i)
        if relation is None:
            chain[i] = chain[i - 1] + 1
            continue
        chain[i] = chain[i - 1]
        col[i] = col[i - 1] + {"left of": 1, "right of": -1, NEXT_TO: 1}.get(relation, 0)
        row[i] = row[i - 1] + {"above": 1, "below": -1}.get(relation, 0)
    regions: list[Region | None] = []
    for i in range(n):
        members = [j for j in range(n) if chain[j] == chain[i]]
        cols, rows = [col[j] for j in members], [row[j] for j in members]
        regions.append(
            Region(
                _side(col[i], min(cols), max(cols), ("left", "right")),
                _side(row[i], min(rows), max(rows), ("top", "bottom")),
            )
            if len(members) > 1
            else None
        )
    return regions


def _side(rank: int, low: int, high: int, names: tuple[str, str]) -> str | None:
    # Two halves are enough: a longer chain along one axis ("A left of B left of C") gives the
    # middle group no half and relies on placement order; rare in the grammar's categories.
    if low == high or low < rank < high:
        return None
    return names[0] if rank == low else names[1]


def place_objects(
    items: Sequence[tuple[str, str]],
    area: Rect,
    obstacles: Sequence[Box],
    rng: random.Random,
    sizes: tuple[int, int],
    gap: int,
    prefer: tuple[float, float] | None = None,
) -> list[PlacedObject]:
    """Place (shape, colour) ``items`` inside ``area`` clear of ``obstacles`` and each other.

    With ``prefer``, cells nearest that point are taken first (to keep a group together);
    otherwise cells are taken in random order. Returns fewer objects than asked when even the
    smallest size does not fit.
    """
    lo, hi = sizes
    best: list[PlacedObject] = []
    for top in _shrinking(lo, hi):
        placed = _try_place(items, area, obstacles, rng, (min(lo, top), top), gap, prefer)
        if len(placed) == len(items):
            return placed
        if len(placed) > len(best):
            best = placed
    return best


def place_first_fitting(
    items: Sequence[tuple[str, str]],
    targets: Sequence[tuple[Rect, tuple[float, float] | None]],
    obstacles: Sequence[Box],
    rng: random.Random,
    sizes: tuple[int, int],
    gap: int,
    accept: Callable[[list[PlacedObject]], bool] | None = None,
    strict: bool = False,
) -> list[PlacedObject]:
    """The first complete placement, over ``targets`` (area, point to cluster at) in turn, that
    ``accept`` approves; failing that, the largest placement found (or nothing, when ``strict``)."""
    best: list[PlacedObject] = []
    for area, prefer in targets:
        if area.width <= 0 or area.height <= 0:
            continue
        placed = place_objects(items, area, obstacles, rng, sizes, gap, prefer)
        if len(placed) == len(items) and (accept is None or accept(placed)):
            return placed
        if not strict and len(placed) > len(best):
            best = placed
    return best


def beside_areas(
    reference: Sequence[Box], canvas: Rect, gap: int, pitch: int, count: int
) -> list[tuple[Rect, tuple[float, float]]]:
    """Where ``count`` objects go to stand next to the ``reference`` objects, best first, each
    with the point to cluster at (the reference's edge, level with its centre).

    First a block of cells flush against the reference group, level with its centre, on the
    roomier side and then the other. The block is a whole number of cells (``pitch`` = object
    side + gap) wide and tall, so the placement grid has no slack to drift in: the objects land
    between ``gap`` and ``gap`` + the size jitter away, within ``geometry.adjacent``'s reach.
    Then full-height strips on either side, for when the block is taken.
    """
    x0, _, x1, _ = union_box(reference)
    _, cy = centre_of(reference)
    rows_fit = max(1, int((canvas.height - gap) // pitch))
    cols = -(-count // rows_fit)
    rows = -(-count // cols)
    # One pixel over the exact fit, so float rounding never costs the grid a column or a row.
    width, height = cols * pitch + gap + 1, min(rows * pitch + gap + 1, canvas.height)
    top = min(max(cy - height / 2, canvas.y0), canvas.y1 - height)
    right = (Rect(x1, top, min(x1 + width, canvas.x1), top + height), (float(x1), cy))
    left = (Rect(max(x0 - width, canvas.x0), top, x0, top + height), (float(x0), cy))
    sides = [right, left] if canvas.x1 - x1 >= x0 - canvas.x0 else [left, right]
    strips = [(Rect(area.x0, canvas.y0, area.x1, canvas.y1), point) for area, point in sides]
    return [*sides, *strips]


def _shrinking(lo: int, hi: int) -> list[int]:
    tops = [hi]
    while tops[-1] > lo:
        tops.append(max(lo, int(tops[-1] * 0.85)))
    return [*tops, max(12, int(lo * 0.8))]


def _try_place(
    items: Sequence[tuple[str, str]],
    area: Rect,
    obstacles: Sequence[Box],
    rng: random.Random,
    sizes: tuple[int, int],
    gap: int,
    prefer: tuple[float, float] | None,
) -> list[PlacedObject]:
    lo, hi = sizes
    pitch = hi + gap
    inner = Rect(area.x0 + gap / 2, area.y0 + gap / 2, area.x1 - gap / 2, area.y1 - gap / 2)
    cols, rows = int(inner.width // pitch), int(inner.height // pitch)
    if cols * rows == 0:
        return []
    ox = inner.x0 + rng.uniform(0, inner.width - cols * pitch)
    oy = inner.y0 + rng.uniform(0, inner.height - rows * pitch)
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    if prefer is not None:
        px, py = prefer
        # Nearest cells first, with a little noise so clusters are not all the same blob.
        noise = {cell: rng.uniform(0, pitch * 0.75) for cell in cells}
        cells.sort(
            key=lambda cell: (
                (
                    (ox + (cell[0] + 0.5) * pitch - px) ** 2
                    + (oy + (cell[1] + 0.5) * pitch - py) ** 2
                )
                ** 0.5
                + noise[cell]
            )
        )
    placed: list[PlacedObject] = []
    taken: list[Box] = list(obstacles)
    for c, r in cells:
        if len(placed) == len(items):
            break
        shape, colour = items[len(placed)]
        size = rng.randint(lo, hi)
        # Jitter the object inside its cell, keeping gap/2 clear on every side.
        x0 = int(ox + c * pitch + gap / 2 + rng.randint(0, hi - size))
        y0 = int(oy + r * pitch + gap / 2 + rng.randint(0, hi - size))
        obj = PlacedObject(shape, colour, x0 + size // 2, y0 + size // 2, size)
        if any(boxes_overlap(obj.box, box, gap) for box in taken):
            continue
        placed.append(obj)
        taken.append(obj.box)
    return placed


def layout_scene(
    spec: SceneSpec,
    width: int,
    height: int,
    rng: random.Random,
    gap: int,
    regions: Sequence[Region | None] | None = None,
    attempts: int = 4,
    size_bounds: tuple[int, int] = (20, 56),
    threshold: float = 0.1,
) -> Scene:
    """Place every group of ``spec`` (all colours given) so that its relations hold.

    Groups with a region cluster around the region's centre, which keeps related groups clearly
    apart along the relation's axis; the rest spread over the canvas. A group "next to" the one
    before it goes flush against that group instead (:func:`beside_areas`). Sized groups are
    drawn in their size word's band, the rest at the scene's ordinary size. Layouts that still
    break a relation (crowded canvases) are redrawn up to ``attempts`` times.
    """
    if any(g.colour is None for g in spec.groups):
        raise ValueError("layout_scene needs a colour for every group")
    regions = list(regions) if regions is not None else group_regions(spec)
    ordinary = scene_size_range(spec.total_objects, width, height, size_bounds)
    canvas = Rect(0, 0, width, height)
    scene = Scene(width, height)
    for _ in range(attempts):
        placed: list[list[PlacedObject]] = []
        for i, (group, region) in enumerate(zip(spec.groups, regions, strict=True)):
            obstacles = [o.box for objs in placed for o in objs]
            items = [(group.shape, group.colour or "")] * group.count
            sizes = group_size_range(group, width, height, ordinary)
            partner = placed[i - 1] if i and spec.relation_between(i - 1, i) == NEXT_TO else []
            if partner:
                targets = beside_areas(
                    [o.box for o in partner], canvas, gap, sizes[1] + gap, len(items)
                )
                placed.append(place_first_fitting(items, targets, obstacles, rng, sizes, gap))
                continue
            area = region_area(region, width, height)
            prefer = None if region is None else ((area.x0 + area.x1) / 2, (area.y0 + area.y1) / 2)
            placed.append(place_objects(items, area, obstacles, rng, sizes, gap, prefer))
        scene = Scene(width, height, tuple(o for objs in placed for o in objs))
        if all(
            relation_holds(
                [o.box for o in placed[r.subject]],
                [o.box for o in placed[r.object]],
                r.relation,
                threshold,
            )
            for r in spec.relations
        ):
            break
    return scene


def relation_area(relation: str, reference: Sequence[Box], canvas: Rect, gap: int) -> Rect:
    """The part of the canvas beyond the ``reference`` objects in the direction of ``relation``
    (what "to the left of the red circles" points at)."""
    x0, y0, x1, y1 = union_box(reference)
    if relation == "left of":
        return Rect(canvas.x0, canvas.y0, x0 - gap, canvas.y1)
    if relation == "right of":
        return Rect(x1 + gap, canvas.y0, canvas.x1, canvas.y1)
    if relation == "above":
        return Rect(canvas.x0, canvas.y0, canvas.x1, y0 - gap)
    return Rect(canvas.x0, y1 + gap, canvas.x1, canvas.y1)


def relaxed_relation_area(relation: str, reference: Sequence[Box], canvas: Rect) -> Rect:
    """Beyond the reference group's centre rather than its edge (when the strict area is full)."""
    cx, cy = centre_of(reference)
    return {
        "left of": Rect(canvas.x0, canvas.y0, cx, canvas.y1),
        "right of": Rect(cx, canvas.y0, canvas.x1, canvas.y1),
        "above": Rect(canvas.x0, canvas.y0, canvas.x1, cy),
        "below": Rect(canvas.x0, cy, canvas.x1, canvas.y1),
    }[relation]


def relation_anchor(relation: str, reference: Sequence[Box], size: int) -> tuple[float, float]:
    """The point just beyond the reference group: new objects cluster there, aligned with it."""
    x0, y0, x1, y1 = union_box(reference)
    cx, cy = centre_of(reference)
    return {
        "left of": (x0 - size, cy),
        "right of": (x1 + size, cy),
        "above": (cx, y0 - size),
        "below": (cx, y1 + size),
    }[relation]
