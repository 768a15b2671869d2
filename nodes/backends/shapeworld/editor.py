"""ShapeWorld's instruction-based image editor, working on the pixels it is given.

It detects the objects in the input image, applies one instruction (see ``instructions`` for the
grammar) to them and repaints only what changes: removed objects are painted over with the
background, recoloured ones repainted in place, resized ones redrawn around their centre (or as
near it as there is room), new or moved ones drawn into free space. Untouched objects keep their
exact pixels.

Like a real editor it is imperfect: with probability ``edit_failure_rate`` (plus
``edit_failure_per_object`` for each object touched beyond the first, plus
``recolour_failure_rate`` (also for a resize) / ``move_failure_rate`` for those harder kinds of
edit: changing what is there fails more often than adding into free space, plus
``edit_failure_per_scene_object`` for each object in the image) nothing changes, and an edit
touching several objects sometimes touches one fewer (``edit_partial_rate``). An instruction it
cannot read, or one naming objects that are not there, returns the image unchanged: a real
editor would do something useless rather than fail, and the next reflection will notice.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from nodes.backends.base import EditRequest
from nodes.backends.shapeworld.config import ShapeWorldConfig
from nodes.backends.shapeworld.detect import (
    DetectedObject,
    Runs,
    detect_with_runs,
    scaled_min_area,
)
from nodes.backends.shapeworld.geometry import Rect, boxes_overlap, centre_of, relation_holds
from nodes.backends.shapeworld.instructions import (
    Add,
    Anchor,
    Draw,
    Instruction,
    Move,
    Recolour,
    Remove,
    Resize,
    Selector,
    parse_instruction,
)
from nodes.backends.shapeworld.layout import (
    Region,
    beside_areas,
    place_first_fitting,
    place_objects,
    region_area,
    relation_anchor,
    relation_area,
    relaxed_relation_area,
    scene_size_range,
)
from nodes.backends.shapeworld.render import Box, PlacedObject, draw_object
from nodes.backends.shapeworld.seeding import image_digest, rng_for
from nodes.backends.shapeworld.sizes import drawn_size_range
from nodes.backends.shapeworld.spec import PromptParseError
from nodes.backends.shapeworld.vocab import BACKGROUND, COLOURS, INVERSE_RELATION, NEXT_TO, PALETTE

_OPPOSITE_SIDE = {
    "left of": Region("left"),
    "right of": Region("right"),
    "above": Region(None, "top"),
    "below": Region(None, "bottom"),
}
"""Where the subject of a relation goes when the two groups are laid out again from scratch."""


@dataclass
class Canvas:
    """The image being edited: its pixels, and the objects detected in it before the edit."""

    pixels: np.ndarray
    objects: list[DetectedObject]
    runs: Runs
    gap: int

    @property
    def bounds(self) -> Rect:
        return Rect(0, 0, self.pixels.shape[1], self.pixels.shape[0])

    def select(self, selector: Selector | None) -> list[int]:
        if selector is None:
            return []
        return [i for i, o in enumerate(self.objects) if selector.matches(o.shape, o.colour)]

    def paint(self, index: int, colour: tuple[int, int, int]) -> None:
        self.pixels[self.runs.mask(index, self.pixels.shape[:2])] = colour

    def image_with(self, new: Sequence[PlacedObject]) -> Image.Image:
        image = Image.fromarray(self.pixels)
        draw = ImageDraw.Draw(image)
        for obj in new:
            draw_object(draw, obj)
        return image


class ShapeWorldEditor:
    def __init__(self, config: ShapeWorldConfig | None = None, model_id: str = "shapeworld-editor"):
        self.config = config or ShapeWorldConfig()
        self.model_id = model_id

    async def edit(self, request: EditRequest) -> Image.Image:
        return self.edit_sync(request)

    def edit_sync(self, request: EditRequest) -> Image.Image:
        image = request.image.convert("RGB")
        try:
            instruction = parse_instruction(request.instruction)
        except PromptParseError:
            return image.copy()
        rng = rng_for(request.seed, "edit", request.instruction, image_digest(image))
        return self.apply(image, instruction, rng)

    def apply(
        self, image: Image.Image, instruction: Instruction, rng: random.Random
    ) -> Image.Image:
        """Apply a parsed instruction (with this editor's failure model)."""
        if isinstance(instruction, Draw):
            # A drawing instruction adds its groups one after another, each relative to the last.
            for i, group in enumerate(instruction.spec.groups):
                relation = instruction.spec.relation_between(i - 1, i) if i else None
                previous = instruction.spec.groups[i - 1] if i else None
                anchor = (
                    Anchor(
                        INVERSE_RELATION[relation], Selector(previous.shape, previous.colour, None)
                    )
                    if relation and previous
                    else Anchor(region=instruction.region)
                )
                image = self.apply(image, Add(group, anchor), rng)
            return image
        scale = min(image.size) / 256
        objects, runs = detect_with_runs(
            image,
            self.config.colour_tolerance,
            scaled_min_area(self.config.min_area, image.size),
        )
        canvas = Canvas(np.array(image), objects, runs, max(2, round(self.config.gap * scale)))
        if isinstance(instruction, Add):
            return self._add(canvas, instruction, rng)
        if isinstance(instruction, Remove | Recolour):
            return self._remove_or_recolour(canvas, instruction, rng)
        if isinstance(instruction, Resize):
            return self._resize(canvas, instruction, rng)
        return self._move(canvas, instruction, rng)

    def _how_many(self, canvas: Canvas, wanted: int, rng: random.Random, extra: float = 0.0) -> int:
        """How many of ``wanted`` object changes the edit actually makes (0 = it failed);
        ``extra`` is the added failure chance of the kind of edit."""
        config = self.config
        failure = config.edit_failure_rate + extra
        failure += config.edit_failure_per_object * max(0, wanted - 1)
        failure += config.edit_failure_per_scene_object * len(canvas.objects)
        if rng.random() < failure:
            return 0
        if wanted >= 2 and rng.random() < self.config.edit_partial_rate:
            return wanted - 1
        return wanted

    def _sizes(self, canvas: Canvas, like: Sequence[int], extra: int) -> tuple[int, int]:
        """New objects match the size of ``like`` (or of everything present)."""
        pool = [canvas.objects[i].size for i in like] or [o.size for o in canvas.objects]
        height, width = canvas.pixels.shape[:2]
        if not pool:
            bounds = (self.config.size_min, self.config.size_max)
            return scene_size_range(extra, width, height, bounds)
        middle = int(statistics.median(pool))
        return max(12, middle - 2), max(12, middle + 2)

    def _add(self, canvas: Canvas, instruction: Add, rng: random.Random) -> Image.Image:
        group = instruction.group
        n = self._how_many(canvas, group.count, rng)
        if n == 0:
            return canvas.image_with(())
        colour = group.colour or _usual_colour(canvas, group.shape) or rng.choice(COLOURS)
        kin = canvas.select(Selector(group.shape, colour))
        if group.size:
            height, width = canvas.pixels.shape[:2]
            sizes = drawn_size_range(group.size, width, height)
        else:
            sizes = self._sizes(canvas, kin, len(canvas.objects) + n)
        anchor = instruction.anchor
        targets = _targets(canvas, anchor, kin, sizes[1], count=n)
        obstacles = [o.bbox for o in canvas.objects]
        reference = [canvas.objects[i].bbox for i in canvas.select(anchor.reference)]
        accept = _satisfies(anchor, reference, self.config.position_threshold)
        items = [(group.shape, colour)] * n
        placed = place_first_fitting(items, targets, obstacles, rng, sizes, canvas.gap, accept)
        return canvas.image_with(placed)

    def _resize(self, canvas: Canvas, instruction: Resize, rng: random.Random) -> Image.Image:
        """Redraw the chosen objects in the new size's band, centred where they were; one that
        no longer fits there is nudged as little as there is room for (else put anywhere free,
        else left as it was)."""
        matches = canvas.select(instruction.target)
        wanted = min(instruction.target.count or len(matches), len(matches))
        extra = self.config.recolour_failure_rate
        chosen = rng.sample(matches, self._how_many(canvas, wanted, rng, extra)) if matches else []
        height, width = canvas.pixels.shape[:2]
        sizes = drawn_size_range(instruction.size, width, height)
        obstacles = [o.bbox for i, o in enumerate(canvas.objects) if i not in chosen]
        placed: list[PlacedObject] = []
        for i in chosen:
            old = canvas.objects[i]
            obj = _nudged(old, rng.randint(*sizes), canvas.bounds, obstacles, canvas.gap)
            if obj is None:
                item = [(old.shape, old.colour)]
                anywhere = place_objects(
                    item, canvas.bounds, obstacles, rng, sizes, canvas.gap, old.centre
                )
                obj = anywhere[0] if anywhere else None
            if obj is None:
                obstacles.append(old.bbox)  # it stays as it was: keep clear of it
                continue
            canvas.paint(i, BACKGROUND)
            placed.append(obj)
            obstacles.append(obj.box)
        return canvas.image_with(placed)

    def _remove_or_recolour(
        self, canvas: Canvas, instruction: Remove | Recolour, rng: random.Random
    ) -> Image.Image:
        matches = canvas.select(instruction.target)
        wanted = min(instruction.target.count or len(matches), len(matches))
        recolour = isinstance(instruction, Recolour)
        extra = self.config.recolour_failure_rate if recolour else 0.0
        chosen = rng.sample(matches, self._how_many(canvas, wanted, rng, extra)) if matches else []
        colour = PALETTE[instruction.colour] if recolour else BACKGROUND
        for i in chosen:
            canvas.paint(i, colour)
        return canvas.image_with(())

    def _move(self, canvas: Canvas, instruction: Move, rng: random.Random) -> Image.Image:
        matches = canvas.select(instruction.target)
        wanted = min(instruction.target.count or len(matches), len(matches))
        n = self._how_many(canvas, wanted, rng, self.config.move_failure_rate) if matches else 0
        if n == 0:
            return canvas.image_with(())
        moving = rng.sample(matches, n)
        anchor = instruction.anchor
        reference = [i for i in canvas.select(anchor.reference) if i not in moving]
        if anchor.relation is not None and not reference:
            return canvas.image_with(())  # nothing to move them next to
        staying = [i for i in range(len(canvas.objects)) if i not in moving]
        items = [(canvas.objects[i].shape, canvas.objects[i].colour) for i in moving]
        sizes = self._sizes(canvas, moving, n)
        obstacles = [canvas.objects[i].bbox for i in staying]
        targets = _targets(canvas, anchor, [], sizes[1], moving=moving, count=n)
        boxes = [canvas.objects[i].bbox for i in reference]
        accept = _satisfies(anchor, boxes, self.config.position_threshold)
        placed = place_first_fitting(
            items, targets, obstacles, rng, sizes, canvas.gap, accept, strict=True
        )
        if len(placed) == n:
            for i in moving:
                canvas.paint(i, BACKGROUND)
            return canvas.image_with(placed)
        if anchor.relation is None or anchor.relation == NEXT_TO:
            # No region to fall back on (none given, or "next to" with both sides of the
            # reference taken): leave the picture as it is; the next reflection will see it.
            return canvas.image_with(())
        # No room beyond the reference objects: lay both groups out again, each in its half
        # (as a model would redraw that part of the picture).
        return self._rearrange(canvas, moving, reference, anchor.relation, rng, sizes)

    def _rearrange(
        self,
        canvas: Canvas,
        moving: list[int],
        reference: list[int],
        relation: str,
        rng: random.Random,
        sizes: tuple[int, int],
    ) -> Image.Image:
        height, width = canvas.pixels.shape[:2]
        others = [o.bbox for i, o in enumerate(canvas.objects) if i not in moving + reference]
        placed: list[PlacedObject] = []
        for indices, side in (
            (moving, _OPPOSITE_SIDE[relation]),
            (reference, _OPPOSITE_SIDE[INVERSE_RELATION[relation]]),
        ):
            area = region_area(side, width, height)
            items = [(canvas.objects[i].shape, canvas.objects[i].colour) for i in indices]
            centre = ((area.x0 + area.x1) / 2, (area.y0 + area.y1) / 2)
            obstacles = others + [p.box for p in placed]
            group = place_objects(items, area, obstacles, rng, sizes, canvas.gap, centre)
            if len(group) < len(items):
                return canvas.image_with(())
            placed += group
        for i in moving + reference:
            canvas.paint(i, BACKGROUND)
        return canvas.image_with(placed)


def _usual_colour(canvas: Canvas, shape: str) -> str | None:
    colours = Counter(o.colour for o in canvas.objects if o.shape == shape)
    return colours.most_common(1)[0][0] if colours else None


_NUDGES = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))
"""Directions a resized object may be nudged in when it no longer fits around its centre."""


def _nudged(
    old: DetectedObject, size: int, bounds: Rect, obstacles: Sequence[Box], gap: int
) -> PlacedObject | None:
    """``old`` redrawn at ``size`` around its centre, or shifted the least distance (in steps of
    ``gap``, along the axes and diagonals) that keeps it on the canvas and ``gap`` clear of the
    ``obstacles``; None when no such shift exists."""
    x0, y0, x1, y1 = old.bbox
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    reach = int(max(bounds.width, bounds.height))
    for distance in range(0, reach, gap):
        for dx, dy in _NUDGES if distance else ((0, 0),):
            obj = PlacedObject(old.shape, old.colour, cx + dx * distance, cy + dy * distance, size)
            if _fits(obj.box, bounds, obstacles, gap):
                return obj
    return None


def _fits(box: Box, bounds: Rect, obstacles: Sequence[Box], gap: int) -> bool:
    inside = box[0] >= bounds.x0 and box[1] >= bounds.y0
    inside = inside and box[2] <= bounds.x1 and box[3] <= bounds.y1
    return inside and not any(boxes_overlap(box, other, gap) for other in obstacles)


def _targets(
    canvas: Canvas,
    anchor: Anchor,
    kin: Sequence[int],
    size: int,
    moving: Sequence[int] = (),
    count: int = 1,
) -> list[tuple[Rect, tuple[float, float] | None]]:
    """Areas to try in turn, each with the point new objects should cluster around. Objects
    being ``moving`` are not landmarks; ``count`` objects are to be placed."""
    bounds = canvas.bounds
    reference = [canvas.objects[i].bbox for i in canvas.select(anchor.reference) if i not in moving]
    if anchor.relation == NEXT_TO and reference:
        return list(beside_areas(reference, bounds, canvas.gap, size + canvas.gap, count))
    if anchor.relation is not None and reference:
        point = relation_anchor(anchor.relation, reference, size)
        return [
            (relation_area(anchor.relation, reference, bounds, canvas.gap), point),
            (relaxed_relation_area(anchor.relation, reference, bounds), point),
        ] + ([] if moving else [(bounds, point)])
    if anchor.region is not None:
        area = region_area(anchor.region, int(bounds.x1), int(bounds.y1))
        return [(area, ((area.x0 + area.x1) / 2, (area.y0 + area.y1) / 2)), (bounds, None)]
    if kin and not moving:
        # More of an existing group: keep them together.
        return [(bounds, centre_of([canvas.objects[i].bbox for i in kin]))]
    return [(bounds, None)]


def _satisfies(
    anchor: Anchor, reference: Sequence[Box], threshold: float
) -> Callable[[list[PlacedObject]], bool] | None:
    """A check that placed objects stand in the anchor's relation to ``reference``, if any."""
    relation = anchor.relation
    if relation is None or not reference:
        return None
    return lambda placed: relation_holds([p.box for p in placed], reference, relation, threshold)
