"""What a ShapeWorld prompt means: object groups and the spatial relations between them.

A :class:`SceneSpec` is the parsed form of a prompt ("two red circles above three blue squares"):
ordered groups (count, optional size, optional colour, shape) and relations between *adjacent*
groups: neighbours in the list, not to be confused with the relation "next to" (shapes adjacent
on the canvas). Keeping relations adjacent makes :func:`describe` and the parser exact inverses,
which is what lets the checker, reflector and decomposer exchange plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodes.backends.shapeworld.vocab import (
    ALL_RELATIONS,
    CANONICAL_NUMBERS,
    COLOURS,
    MAX_COUNT,
    RELATION_PHRASES,
    SHAPES,
    SIZES,
)

MAX_GROUPS = 5
"""Most groups one scene may hold (more would not fit a 256x256 canvas legibly)."""
MAX_OBJECTS = 24
"""Most objects one scene may hold, over all groups."""

# complexity() weights: each object beyond the first of a group adds COUNT_WEIGHT, each relation
# RELATION_WEIGHT, each coloured group beyond the first BINDING_WEIGHT (colours to keep apart),
# each sized group SIZE_WEIGHT (one more attribute to bind; zero for prompts without sizes).
COUNT_WEIGHT = 0.5
RELATION_WEIGHT = 1.0
BINDING_WEIGHT = 0.75
SIZE_WEIGHT = 0.25


class PromptParseError(ValueError):
    """Text is outside the ShapeWorld grammar (the message says where and why)."""


@dataclass(frozen=True)
class Group:
    """``count`` objects of one shape; ``colour`` None means any colour, ``size`` None the
    ordinary size ('big' and 'small' are absolute, see ``sizes``)."""

    count: int
    shape: str
    colour: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class Relation:
    """Group ``subject`` stands in ``relation`` ("left of", ...) to group ``object``."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class SceneSpec:
    groups: tuple[Group, ...]
    relations: tuple[Relation, ...] = ()

    def relation_between(self, first: int, second: int) -> str | None:
        """The relation of ``first`` to ``second`` as written, or None."""
        for rel in self.relations:
            if (rel.subject, rel.object) == (first, second):
                return rel.relation
        return None

    @property
    def total_objects(self) -> int:
        return sum(g.count for g in self.groups)


def validate(spec: SceneSpec) -> SceneSpec:
    """Return ``spec`` if it is a scene the grammar can express; raise PromptParseError if not."""
    if not 1 <= len(spec.groups) <= MAX_GROUPS:
        raise PromptParseError(f"a scene holds 1 to {MAX_GROUPS} groups, not {len(spec.groups)}")
    for g in spec.groups:
        if g.shape not in SHAPES:
            raise PromptParseError(f"unknown shape {g.shape!r}; shapes are {', '.join(SHAPES)}")
        if g.colour is not None and g.colour not in COLOURS:
            raise PromptParseError(f"unknown colour {g.colour!r}; colours are {', '.join(COLOURS)}")
        if g.size is not None and g.size not in SIZES:
            raise PromptParseError(f"unknown size {g.size!r}; sizes are {', '.join(SIZES)}")
        if not 1 <= g.count <= MAX_COUNT:
            raise PromptParseError(f"counts run from 1 to {MAX_COUNT}, not {g.count}")
    if spec.total_objects > MAX_OBJECTS:
        raise PromptParseError(f"at most {MAX_OBJECTS} objects in a scene")
    seen: set[tuple[str | None, str]] = set()
    for g in spec.groups:
        # A colour-free group counts every object of its shape, so it cannot share the shape with
        # another group without the two counts becoming ambiguous.
        clash = (g.colour, g.shape) in seen or (None, g.shape) in seen
        clash = clash or (g.colour is None and any(s == g.shape for _, s in seen))
        if clash:
            raise PromptParseError(f"two groups of {plural(g.shape)} that cannot be told apart")
        seen.add((g.colour, g.shape))
    for i, rel in enumerate(spec.relations):
        if rel.relation not in ALL_RELATIONS:
            raise PromptParseError(f"unknown relation {rel.relation!r}")
        if rel.object != rel.subject + 1 or not 0 <= rel.subject < len(spec.groups) - 1:
            raise PromptParseError("relations must join adjacent groups, in order")
        if i and spec.relations[i - 1].subject >= rel.subject:
            raise PromptParseError("relations must be listed in group order, one per pair")
    return spec


def plural(shape: str) -> str:
    return f"{shape}s"


def shape_word(shape: str, count: int) -> str:
    return shape if count == 1 else plural(shape)


def group_phrase(group: Group) -> str:
    """'two red circles', 'an orange star', 'a square', 'a big red circle'."""
    words = (group.size, group.colour, shape_word(group.shape, group.count))
    noun = " ".join(w for w in words if w)
    if group.count == 1:
        return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    return f"{CANONICAL_NUMBERS[group.count]} {noun}"


def reference_phrase(colour: str | None, shape: str, count: int = 2) -> str:
    """A definite reference to existing objects: 'the red circles', 'the square'."""
    return " ".join(w for w in ("the", colour, shape_word(shape, count)) if w)


def describe(spec: SceneSpec) -> str:
    """The canonical text of a scene; ``parse_prompt(describe(s)) == s``."""
    pieces = [group_phrase(spec.groups[0])]
    list_joins = [i for i in range(1, len(spec.groups)) if spec.relation_between(i - 1, i) is None]
    for i in range(1, len(spec.groups)):
        rel = spec.relation_between(i - 1, i)
        if rel is not None:
            joiner = f" {RELATION_PHRASES[rel]} "
        else:
            joiner = " and " if i == list_joins[-1] else ", "
        pieces.append(joiner + group_phrase(spec.groups[i]))
    return "".join(pieces)


def complexity(spec: SceneSpec) -> float:
    """How hard the scene is to draw in one go: 1.0 for a single object, growing with counts,
    relations and the number of colours to bind. The generator's error rate grows with it."""
    objects = sum(1 + COUNT_WEIGHT * (g.count - 1) for g in spec.groups)
    coloured = sum(1 for g in spec.groups if g.colour is not None)
    sized = sum(1 for g in spec.groups if g.size is not None)
    binding = BINDING_WEIGHT * max(0, coloured - 1) + SIZE_WEIGHT * sized
    return objects + RELATION_WEIGHT * len(spec.relations) + binding
