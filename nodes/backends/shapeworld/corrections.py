"""From what the image shows to what to do about it: the reflector's diagnosis.

:func:`discrepancies` compares the detected objects with the target description and lists what is
wrong, most important first, each with the one edit instruction that fixes it:

1. objects of a group's shape in a colour the prompt does not give it, while the group is short:
   recolour them ("Change the blue circles to red.") -- fixes a swapped binding in one edit
2. a group missing entirely: add it, next to the group it relates to ("Add three blue squares
   below the red circles.")
3. a group short of objects: add the difference ("Add a red circle.")
4. a group with too many: remove the surplus ("Remove one red circle.")
5. objects of a mentioned shape in an unwanted colour: remove them ("Remove the green circles.")
6. a sized group with members of another size: resize the group ("Make the red circle big.")
7. a relation that does not hold: move the subject group ("Move the red circles to the left of
   the blue squares.", "Move the blue circle next to the red square.")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from nodes.backends.shapeworld.detect import DetectedObject
from nodes.backends.shapeworld.evaluate import allowed_colours, members
from nodes.backends.shapeworld.geometry import observed_relation, relation_holds
from nodes.backends.shapeworld.instructions import (
    Add,
    Anchor,
    Instruction,
    Move,
    Recolour,
    Remove,
    Resize,
    Selector,
)
from nodes.backends.shapeworld.sizes import CANVAS, size_class
from nodes.backends.shapeworld.spec import (
    Group,
    SceneSpec,
    group_phrase,
    shape_word,
)
from nodes.backends.shapeworld.vocab import CANONICAL_NUMBERS, INVERSE_RELATION, RELATION_PHRASES


@dataclass(frozen=True)
class Discrepancy:
    explanation: str
    """One sentence for the reflection's reasoning."""
    fix: Instruction


def _number(n: int) -> str:
    return "one" if n == 1 else CANONICAL_NUMBERS.get(n, str(n))


def _anchor_for(spec: SceneSpec, index: int, objects: Sequence[DetectedObject]) -> Anchor:
    """Place a missing group relative to a related group that is present, if any."""
    for rel in spec.relations:
        if index in (rel.subject, rel.object):
            other = rel.object if rel.subject == index else rel.subject
            relation = rel.relation if rel.subject == index else INVERSE_RELATION[rel.relation]
            partner = spec.groups[other]
            if members(partner, objects):
                return Anchor(
                    relation, Selector(partner.shape, partner.colour, None, partner.count > 1)
                )
    return Anchor()


def size_discrepancy(
    group: Group, found: Sequence[DetectedObject], canvas_side: int
) -> Discrepancy | None:
    """A sized group some of whose members are another size: resize them all (those already
    right stay in their band), or None when every member is right or there is none."""
    wrong = [c for c in (size_class(o.bbox, canvas_side) for o in found) if c != group.size]
    if not group.size or not wrong:
        return None
    n = len(found)
    return Discrepancy(
        f"The {_noun(group, n)} {_is(n)} {_size_word(wrong[0])}, not {group.size}.",
        Resize(Selector(group.shape, group.colour, None, n > 1), group.size),
    )


def discrepancies(
    spec: SceneSpec,
    objects: Sequence[DetectedObject],
    threshold: float = 0.1,
    canvas_side: int = CANVAS,
) -> list[Discrepancy]:
    """What is wrong, most important first (see above); ``canvas_side`` is the image's shorter
    side, which size words scale with."""
    found = [members(g, objects) for g in spec.groups]
    short = [g.count - len(f) for g, f in zip(spec.groups, found, strict=True)]
    # Objects of a mentioned shape whose colour the prompt never gives that shape.
    strays: dict[str, Counter[str]] = {}
    for shape in dict.fromkeys(g.shape for g in spec.groups):
        if allowed_colours(spec, shape):
            colours = allowed_colours(spec, shape)
            strays[shape] = Counter(
                o.colour for o in objects if o.shape == shape and o.colour not in colours
            )
    out: list[Discrepancy] = []
    handled: set[int] = set()  # groups whose shortfall a recolour already covers
    for i, group in enumerate(spec.groups):
        pool = strays.get(group.shape)
        if short[i] <= 0 or not group.colour or not pool:
            continue
        colour, available = pool.most_common(1)[0]
        n = min(short[i], available)
        target = Selector(group.shape, colour, None if n == available else n, available > 1)
        out.append(
            Discrepancy(
                f"There {_is(available)} {_number(available)} {colour} "
                f"{shape_word(group.shape, available)} where {group_phrase(group)} "
                f"{_is(group.count)} wanted.",
                Recolour(target, group.colour),
            )
        )
        pool[colour] -= n
        if pool[colour] <= 0:
            del pool[colour]
        handled.add(i)
    for i, group in enumerate(spec.groups):
        if not found[i] and i not in handled:
            out.append(
                Discrepancy(
                    f"There are no {_noun(group, 2)}.", Add(group, _anchor_for(spec, i, objects))
                )
            )
    for i, group in enumerate(spec.groups):
        if found[i] and short[i] > 0 and i not in handled:
            have = len(found[i])
            out.append(
                Discrepancy(
                    f"There {_is(have)} only {_number(have)} {_noun(group, have)}, "
                    f"not {_number(group.count)}.",
                    Add(Group(short[i], group.shape, group.colour)),
                )
            )
    for i, group in enumerate(spec.groups):
        if short[i] < 0:
            out.append(
                Discrepancy(
                    f"There are {_number(len(found[i]))} {_noun(group, 2)}, "
                    f"not {_number(group.count)}.",
                    Remove(Selector(group.shape, group.colour, -short[i])),
                )
            )
    for shape, pool in strays.items():
        for colour, n in pool.items():
            out.append(
                Discrepancy(
                    f"The {colour} {shape_word(shape, n)} should not be there.",
                    Remove(Selector(shape, colour, None, n > 1)),
                )
            )
    for i, group in enumerate(spec.groups):
        resize = size_discrepancy(group, found[i], canvas_side)
        if resize is not None:
            out.append(resize)
    for rel in spec.relations:
        a, b = spec.groups[rel.subject], spec.groups[rel.object]
        boxes_a = [o.bbox for o in found[rel.subject]]
        boxes_b = [o.bbox for o in found[rel.object]]
        if boxes_a and boxes_b and not relation_holds(boxes_a, boxes_b, rel.relation, threshold):
            seen = observed_relation(boxes_a, boxes_b, threshold)
            where = RELATION_PHRASES[seen] if seen else "not clearly placed relative to"
            out.append(
                Discrepancy(
                    f"The {_noun(a, a.count)} {_is(a.count)} {where} the {_noun(b, b.count)}, "
                    f"not {RELATION_PHRASES[rel.relation]} {'it' if b.count == 1 else 'them'}.",
                    Move(
                        Selector(a.shape, a.colour, None, a.count > 1),
                        Anchor(rel.relation, Selector(b.shape, b.colour, None, b.count > 1)),
                    ),
                )
            )
    return out


def _size_word(size_class: str) -> str:
    return "medium-sized" if size_class == "medium" else size_class


def _is(count: int) -> str:
    return "is" if count == 1 else "are"


def _noun(group: Group, count: int) -> str:
    return " ".join(w for w in (group.colour, shape_word(group.shape, count)) if w)


def size_summary(
    spec: SceneSpec, objects: Sequence[DetectedObject], canvas_side: int = CANVAS
) -> list[str]:
    """How big the sized groups actually are: 'the red circle is big' (nothing for prompts
    without size words, so their reflections read as before)."""
    out = []
    for group in spec.groups:
        found = members(group, objects)
        if group.size and found:
            classes = dict.fromkeys(size_class(o.bbox, canvas_side) for o in found)
            seen = " and ".join(_size_word(c) for c in classes)
            out.append(f"the {_noun(group, len(found))} {_is(len(found))} {seen}")
    return out


def relation_summary(
    spec: SceneSpec, objects: Sequence[DetectedObject], threshold: float = 0.1
) -> list[str]:
    """How the related groups actually stand: 'the red circles are above the blue squares'."""
    out = []
    for rel in spec.relations:
        a, b = spec.groups[rel.subject], spec.groups[rel.object]
        boxes_a = [o.bbox for o in members(a, objects)]
        boxes_b = [o.bbox for o in members(b, objects)]
        if boxes_a and boxes_b:
            seen = observed_relation(boxes_a, boxes_b, threshold)
            where = RELATION_PHRASES[seen] if seen else "next to"
            out.append(
                f"the {_noun(a, len(boxes_a))} {'are' if len(boxes_a) > 1 else 'is'} {where} "
                f"the {_noun(b, len(boxes_b))}"
            )
    return out
