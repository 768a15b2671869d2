"""GenEval-style criteria: does a list of detected objects satisfy a scene description?

Criteria, in order:

- ``count: <group>`` for every group: exactly that many objects of the shape (and colour, when
  given). A miscount, a missing group, or an extra object of the group's colour fails it.
- ``colour: <shapes> are <colours>`` for every shape that has a coloured group: there is at
  least one such object and all of them have a colour the prompt gives that shape. This is the
  colour-binding check; it also catches extra objects of a mentioned shape in another colour.
- ``size: <group> is big|small`` for every group with a size word: there is at least one member
  and every member's size passes for that word on this canvas (``sizes.size_class``). Groups
  without a size word get no size criterion, so such prompts are judged as they always were.
- ``position: <group> <relation> <group>`` for every relation: GenEval's centroid rule
  (:func:`relation_holds`) on the two groups' detected members; for "next to", adjacency on
  either side (:func:`geometry.adjacent`).

Objects of shapes the description does not mention are ignored, as GenEval does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from nodes.backends.shapeworld.detect import DetectedObject
from nodes.backends.shapeworld.geometry import observed_relation, relation_holds
from nodes.backends.shapeworld.sizes import CANVAS, object_side, size_class
from nodes.backends.shapeworld.spec import (
    Group,
    SceneSpec,
    group_phrase,
    plural,
    reference_phrase,
)
from nodes.backends.shapeworld.vocab import CANONICAL_NUMBERS, NEXT_TO, RELATION_PHRASES


@dataclass(frozen=True)
class Criterion:
    name: str
    passed: bool
    observed: str
    """What the image shows for this criterion ("found 2")."""


def members(group: Group, objects: Sequence[DetectedObject]) -> list[DetectedObject]:
    """The detected objects that count towards ``group``."""
    return [o for o in objects if o.shape == group.shape and group.colour in (None, o.colour)]


def allowed_colours(spec: SceneSpec, shape: str) -> list[str]:
    """The colours the description gives ``shape``, in order (empty when colour is free)."""
    return [g.colour for g in spec.groups if g.shape == shape and g.colour is not None]


def size_criterion(group: Group, objects: Sequence[DetectedObject], canvas_side: int) -> Criterion:
    """Whether every member of a sized ``group`` passes for its size word (and one exists)."""
    found = members(group, objects)
    passed = bool(found) and all(size_class(o.bbox, canvas_side) == group.size for o in found)
    observed = ", ".join(f"{object_side(o.bbox)} px" for o in found) or "none"
    verb = "is" if group.count == 1 else "are"
    name = f"size: {reference_phrase(group.colour, group.shape, group.count)} {verb} {group.size}"
    return Criterion(name, passed, observed)


def evaluate(
    spec: SceneSpec,
    objects: Sequence[DetectedObject],
    threshold: float = 0.1,
    canvas_side: int = CANVAS,
) -> list[Criterion]:
    """The criteria above; ``canvas_side`` is the image's shorter side (size words scale with
    it)."""
    criteria = []
    for group in spec.groups:
        found = len(members(group, objects))
        criteria.append(
            Criterion(f"count: {group_phrase(group)}", found == group.count, f"found {found}")
        )
    for shape in dict.fromkeys(g.shape for g in spec.groups):
        colours = allowed_colours(spec, shape)
        if not colours:
            continue
        seen = [o.colour for o in objects if o.shape == shape]
        passed = bool(seen) and all(c in colours for c in seen)
        observed = ", ".join(f"{n} {c}" for c, n in Counter(seen).items()) or "none"
        criteria.append(
            Criterion(f"colour: {plural(shape)} are {' or '.join(colours)}", passed, observed)
        )
    criteria += [size_criterion(g, objects, canvas_side) for g in spec.groups if g.size]
    for rel in spec.relations:
        a, b = spec.groups[rel.subject], spec.groups[rel.object]
        boxes_a = [o.bbox for o in members(a, objects)]
        boxes_b = [o.bbox for o in members(b, objects)]
        seen_rel = observed_relation(boxes_a, boxes_b, threshold) if boxes_a and boxes_b else None
        name = (
            f"position: {reference_phrase(a.colour, a.shape, a.count)} "
            f"{RELATION_PHRASES[rel.relation]} {reference_phrase(b.colour, b.shape, b.count)}"
        )
        holds = relation_holds(boxes_a, boxes_b, rel.relation, threshold)
        observed = RELATION_PHRASES[seen_rel] if seen_rel else "unclear"
        if rel.relation == NEXT_TO:
            observed = "next to" if holds else f"not next to ({observed})"
        criteria.append(Criterion(name, holds, observed))
    return criteria


def summarise(objects: Sequence[DetectedObject]) -> str:
    """What the image shows, by colour and shape: 'two blue circles and a red square'."""
    counts = Counter((o.colour, o.shape) for o in objects)
    if not counts:
        return "an empty canvas"
    phrases = []
    for (colour, shape), n in counts.items():
        noun = f"{colour} {shape if n == 1 else plural(shape)}"
        phrases.append(
            f"{'an' if colour[0] in 'aeiou' else 'a'} {noun}"
            if n == 1
            else f"{CANONICAL_NUMBERS.get(n, str(n))} {noun}"
        )
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
