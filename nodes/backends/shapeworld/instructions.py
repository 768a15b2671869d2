"""Drawing and edit instructions: the language between reflector/decomposer and generator/editor.

Grammar (canonical forms first; verbs and phrasing are tolerated more widely)::

    draw     := "Draw" scene [region]                  "Draw two red circles on the left."
    add      := "Add" group [anchor]                   "Add three green triangles to the right
                                                        of the red circles."
    remove   := "Remove" selector                      "Remove one red circle." /
                                                        "Remove the blue squares."
    recolour := "Change" selector "to" colour          "Change two blue circles to red."
    resize   := "Make" selector size                   "Make the red circle big."
    move     := "Move" selector anchor                 "Move the red circles above the blue
                                                        squares." / "Move the star to the left."
    selector := "the" [colour] shape                   (all of them)
              | count [colour] shape                   (that many of them)
    anchor   := relation "the" [colour] shape          (relative to existing objects)
              | region
    region   := "on the left" | "on the right" | "at the top" | "at the bottom"
              | "at the top left" | ... ("to the ..." when moving)

Groups in draw and add take a size word as prompts do ("Add a small blue square").
Also read: add/put/place/insert, another/more ("Add one more red circle"), delete/erase,
recolour/make/turn/paint ("Make the blue circles red"), "change the colour of X to Y",
resize/scale and comparatives ("Make the red circle bigger", "Resize the squares to small").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nodes.backends.shapeworld.grammar import Cursor, tokenize
from nodes.backends.shapeworld.layout import Region
from nodes.backends.shapeworld.spec import (
    Group,
    PromptParseError,
    SceneSpec,
    describe,
    group_phrase,
    reference_phrase,
    shape_word,
    validate,
)
from nodes.backends.shapeworld.vocab import CANONICAL_NUMBERS, RELATION_PHRASES


class InstructionParseError(PromptParseError):
    """Text is not an instruction ShapeWorld's generator or editor understands."""


@dataclass(frozen=True)
class Selector:
    """Existing objects an instruction refers to; ``count`` None means all that match."""

    shape: str
    colour: str | None = None
    count: int | None = None
    plural: bool = field(default=True, compare=False)
    """Say 'the circles' rather than 'the circle' (wording only; equal selectors may differ)."""

    def matches(self, shape: str, colour: str) -> bool:
        return shape == self.shape and self.colour in (None, colour)


@dataclass(frozen=True)
class Anchor:
    """Where new or moved objects go: relative to existing objects, or a region (or anywhere)."""

    relation: str | None = None
    reference: Selector | None = None
    region: Region | None = None


@dataclass(frozen=True)
class Draw:
    spec: SceneSpec
    region: Region | None = None


@dataclass(frozen=True)
class Add:
    group: Group
    anchor: Anchor = Anchor()


@dataclass(frozen=True)
class Remove:
    target: Selector


@dataclass(frozen=True)
class Recolour:
    target: Selector
    colour: str


@dataclass(frozen=True)
class Move:
    target: Selector
    anchor: Anchor


@dataclass(frozen=True)
class Resize:
    target: Selector
    size: str
    """'big' or 'small' (see ``sizes``)."""


Instruction = Draw | Add | Remove | Recolour | Move | Resize

_DRAW_VERBS = ("draw", "generate", "create", "render", "show", "depict", "make", "paint")
_ADD_VERBS = ("add", "put", "place", "insert", "include")
_REMOVE_VERBS = ("remove", "delete", "erase", "drop")
_RECOLOUR_VERBS = ("change", "recolour", "recolor", "colour", "color", "make", "turn", "paint")
_MOVE_VERBS = ("move", "shift", "relocate")
_RESIZE_VERBS = ("make", "resize", "scale")
_COMPARATIVES = {"bigger": "big", "larger": "big", "smaller": "small"}
_REGION_WORDS = {
    "left": ("horizontal", "left"),
    "right": ("horizontal", "right"),
    "top": ("vertical", "top"),
    "upper": ("vertical", "top"),
    "bottom": ("vertical", "bottom"),
    "lower": ("vertical", "bottom"),
    "centre": (None, None),
    "center": (None, None),
    "middle": (None, None),
}
_REGION_TAIL = ("half", "side", "corner", "part", "edge")
_REGION_PREPOSITIONS = ("on", "at", "in", "to", "towards", "toward")


# ---------------------------------------------------------------------------------- formatting


def region_phrase(region: Region, moving: bool = False) -> str:
    """'on the left', 'at the top', 'at the top left' ('to the ...' for a move)."""
    words = " ".join(w for w in (region.vertical, region.horizontal) if w) or "centre"
    if moving:
        return f"to the {words}"
    return f"on the {words}" if region.vertical is None and region.horizontal else f"at the {words}"


def selector_phrase(selector: Selector) -> str:
    if selector.count is None:
        return reference_phrase(selector.colour, selector.shape, 2 if selector.plural else 1)
    noun = shape_word(selector.shape, selector.count)
    number = "one" if selector.count == 1 else CANONICAL_NUMBERS[selector.count]
    return " ".join(w for w in (number, selector.colour, noun) if w)


def anchor_phrase(anchor: Anchor, moving: bool = False) -> str:
    if anchor.relation is not None and anchor.reference is not None:
        return f"{RELATION_PHRASES[anchor.relation]} {selector_phrase(anchor.reference)}"
    if anchor.region is not None:
        return region_phrase(anchor.region, moving)
    return ""


def format_instruction(instruction: Instruction) -> str:
    """The canonical text; ``parse_instruction(format_instruction(i)) == i``."""
    match instruction:
        case Draw(spec, region):
            tail = f" {region_phrase(region)}" if region else ""
            text = f"Draw {describe(spec)}{tail}"
        case Add(group, anchor):
            tail = anchor_phrase(anchor)
            text = f"Add {group_phrase(group)}{' ' + tail if tail else ''}"
        case Remove(target):
            text = f"Remove {selector_phrase(target)}"
        case Recolour(target, colour):
            text = f"Change {selector_phrase(target)} to {colour}"
        case Move(target, anchor):
            text = f"Move {selector_phrase(target)} {anchor_phrase(anchor, moving=True)}"
        case Resize(target, size):
            text = f"Make {selector_phrase(target)} {size}"
    return text + "."


# ------------------------------------------------------------------------------------- parsing


def parse_instruction(text: str) -> Instruction:
    """Parse a drawing or edit instruction; raise :class:`InstructionParseError` otherwise."""
    tokens = tokenize(text)
    while tokens and tokens[0] in ("please", "now", "then", "next", "finally", ","):
        tokens = tokens[1:]
    if not tokens:
        raise InstructionParseError(f"cannot read {text!r}: no instruction")
    verb = tokens[0]
    readers = []
    if verb in _RECOLOUR_VERBS:
        readers.append(_recolour)
    if verb in _DRAW_VERBS:
        readers.append(_draw)
    if verb in _ADD_VERBS:
        readers.append(_add)
    if verb in _REMOVE_VERBS:
        readers.append(_remove)
    if verb in _MOVE_VERBS:
        readers.append(_move)
    if verb in _RESIZE_VERBS:
        readers.append(_resize)  # last: "make" is read as a recolour or a draw first
    if not readers:
        raise InstructionParseError(
            f"cannot read {text!r}: an instruction starts with draw, add, remove, change or move"
        )
    errors: list[PromptParseError] = []
    for reader in readers:
        cursor = Cursor(tokens, text)
        cursor.pos = 1
        try:
            instruction = reader(cursor)
            if not cursor.done():
                raise cursor.error("the end of the instruction")
            return instruction
        except PromptParseError as error:
            errors.append(error)
    raise InstructionParseError(str(errors[0]))


def _draw(cursor: Cursor) -> Draw:
    cursor.take_any((("a", "photo", "of"), ("an", "image", "of"), ("a", "picture", "of")))
    spec = cursor.scene(stop=_REGION_PREPOSITIONS)
    return Draw(spec, _region(cursor) if not cursor.done() else None)


def _add(cursor: Cursor) -> Add:
    count = 1 if cursor.take("another") else cursor.count()
    if count is None:
        raise cursor.error("a count ('a', 'two', ...)")
    cursor.take("more")
    size, colour = cursor.attributes()
    shape = cursor.shape()
    if shape is None:
        raise cursor.error("a shape")
    group = validate(SceneSpec((Group(count, shape, colour, size),))).groups[0]
    return Add(group, _anchor(cursor) if not cursor.done() else Anchor())


def _remove(cursor: Cursor) -> Remove:
    return Remove(_selector(cursor))


def _recolour(cursor: Cursor) -> Recolour:
    if cursor.take("the", "colour", "of") or cursor.take("the", "color", "of"):
        pass
    target = _selector(cursor)
    if not cursor.take("to"):
        cursor.take("into")
    colour = cursor.colour()
    if colour is None:
        raise cursor.error("a colour")
    while cursor.take("ones") or cursor.take("instead"):
        pass
    return Recolour(target, colour)


def _move(cursor: Cursor) -> Move:
    target = _selector(cursor)
    if cursor.done():
        raise cursor.error("where to move them")
    return Move(target, _anchor(cursor))


def _resize(cursor: Cursor) -> Resize:
    target = _selector(cursor)
    cursor.take_any((("to",), ("into",), ("be",)))
    word = cursor.peek()
    size = _COMPARATIVES.get(word) if word else None
    if size is not None:
        cursor.pos += 1
    else:
        size = cursor.size()
    if size is None:
        raise cursor.error("a size (big, small)")
    return Resize(target, size)


def _selector(cursor: Cursor) -> Selector:
    count: int | None = None
    if cursor.take("all", "the") or cursor.take("all") or cursor.take("the"):
        pass
    else:
        count = cursor.count()
        if count is None:
            raise cursor.error("'the' or a count")
        cursor.take("of", "the")
    colour = cursor.colour()
    shape = cursor.shape()
    if shape is None:
        raise cursor.error("a shape")
    return Selector(shape, colour, count, _said_plural(cursor, shape))


def _said_plural(cursor: Cursor, shape: str) -> bool:
    return cursor.tokens[cursor.pos - 1] != shape


def _anchor(cursor: Cursor) -> Anchor:
    relation = cursor.relation()
    if relation is not None:
        if not (cursor.take("all", "the") or cursor.take("the")):
            cursor.count()
        colour = cursor.colour()
        shape = cursor.shape()
        if shape is None:
            raise cursor.error("the shape the new objects relate to")
        return Anchor(relation, Selector(shape, colour, plural=_said_plural(cursor, shape)))
    return Anchor(region=_region(cursor))


def _region(cursor: Cursor) -> Region:
    if cursor.peek() not in _REGION_PREPOSITIONS:
        raise cursor.error("a place ('on the left', 'at the top', ...)")
    cursor.pos += 1
    cursor.take("the")
    sides: dict[str, str] = {}
    while cursor.peek() in _REGION_WORDS:
        axis, side = _REGION_WORDS[cursor.tokens[cursor.pos]]
        cursor.pos += 1
        if axis is not None:
            sides[axis] = side
    if cursor.pos == 0 or cursor.tokens[cursor.pos - 1] not in _REGION_WORDS:
        raise cursor.error("left, right, top, bottom or centre")
    while cursor.peek() in _REGION_TAIL:
        cursor.pos += 1
    cursor.take_any((("of", "the", "image"), ("of", "the", "canvas"), ("of", "the", "picture")))
    return Region(sides.get("horizontal"), sides.get("vertical"))
