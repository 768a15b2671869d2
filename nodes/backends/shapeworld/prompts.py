"""Prompt categories (GenEval / GenEval++-like) and seeded prompt sampling.

Categories, with an example each:

- ``single_object``: "a circle" (any colour, as GenEval's single_object)
- ``colors``: "a red circle"
- ``two_objects``: "a circle and a square" (two shapes, any colours, as GenEval's two_object)
- ``counting``: "five triangles" (2-8, any colour: counting alone is tested)
- ``color_count``: "three red circles" (2-8, the colour is part of what is counted)
- ``attribute_binding``: "a red circle and a blue square" (colours a generator tends to swap)
- ``position``: "a red circle to the left of a blue square"
- ``position_count``: "two red circles above three blue squares" (1-4 each, one of them >= 2)
- ``multi_count``: "two red circles, three green triangles and a yellow star" (3-4 groups, 1-4
  each, two or more groups of 2+; distinct shapes and colours)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from nodes.backends.shapeworld.seeding import rng_for
from nodes.backends.shapeworld.spec import Group, Relation, SceneSpec, describe, validate
from nodes.backends.shapeworld.vocab import COLOURS, RELATIONS, SHAPES


class Category(str, Enum):
    SINGLE_OBJECT = "single_object"
    COLORS = "colors"
    TWO_OBJECTS = "two_objects"
    COUNTING = "counting"
    COLOR_COUNT = "color_count"
    ATTRIBUTE_BINDING = "attribute_binding"
    POSITION = "position"
    POSITION_COUNT = "position_count"
    MULTI_COUNT = "multi_count"


CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)


@dataclass(frozen=True)
class PromptItem:
    text: str
    category: str


def _single_object(rng: random.Random) -> SceneSpec:
    return SceneSpec((Group(1, rng.choice(SHAPES)),))


def _colors(rng: random.Random) -> SceneSpec:
    return SceneSpec((Group(1, rng.choice(SHAPES), rng.choice(COLOURS)),))


def _two_objects(rng: random.Random) -> SceneSpec:
    first, second = rng.sample(SHAPES, 2)
    return SceneSpec((Group(1, first), Group(1, second)))


def _counting(rng: random.Random) -> SceneSpec:
    return SceneSpec((Group(rng.randint(2, 8), rng.choice(SHAPES)),))


def _color_count(rng: random.Random) -> SceneSpec:
    return SceneSpec((Group(rng.randint(2, 8), rng.choice(SHAPES), rng.choice(COLOURS)),))


def _two_coloured(rng: random.Random, counts: tuple[int, int]) -> tuple[Group, Group]:
    shapes = rng.sample(SHAPES, 2)
    colours = rng.sample(COLOURS, 2)
    return Group(counts[0], shapes[0], colours[0]), Group(counts[1], shapes[1], colours[1])


def _attribute_binding(rng: random.Random) -> SceneSpec:
    return SceneSpec(_two_coloured(rng, (1, 1)))


def _position(rng: random.Random) -> SceneSpec:
    return SceneSpec(_two_coloured(rng, (1, 1)), (Relation(0, rng.choice(RELATIONS), 1),))


def _position_count(rng: random.Random) -> SceneSpec:
    counts = (rng.randint(1, 4), rng.randint(2, 4))
    if rng.random() < 0.5:
        counts = counts[::-1]
    return SceneSpec(_two_coloured(rng, counts), (Relation(0, rng.choice(RELATIONS), 1),))


def _multi_count(rng: random.Random) -> SceneSpec:
    n = rng.choice((3, 4))
    counts = [rng.randint(2, 4), rng.randint(2, 4)] + [rng.randint(1, 4) for _ in range(n - 2)]
    rng.shuffle(counts)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(COLOURS, n)
    return SceneSpec(tuple(Group(c, s, k) for c, s, k in zip(counts, shapes, colours, strict=True)))


_SAMPLERS: dict[str, Callable[[random.Random], SceneSpec]] = {
    Category.SINGLE_OBJECT: _single_object,
    Category.COLORS: _colors,
    Category.TWO_OBJECTS: _two_objects,
    Category.COUNTING: _counting,
    Category.COLOR_COUNT: _color_count,
    Category.ATTRIBUTE_BINDING: _attribute_binding,
    Category.POSITION: _position,
    Category.POSITION_COUNT: _position_count,
    Category.MULTI_COUNT: _multi_count,
}


def sample_spec(category: str, rng: random.Random) -> SceneSpec:
    """A random scene of ``category`` (a :class:`Category` or its value)."""
    try:
        sampler = _SAMPLERS[Category(category)]
    except ValueError:
        raise ValueError(f"unknown category {category!r}; categories: {CATEGORIES}") from None
    return validate(sampler(rng))


def sample_prompt(category: str, rng: random.Random) -> str:
    return describe(sample_spec(category, rng))


def fixed_prompt_set(per_category: int, seed: int) -> list[PromptItem]:
    """``per_category`` prompts of every category, in category order; same arguments, same list.

    Prompts within a category are distinct while the category has enough of them
    (single_object has only 5, colors 30); after that they repeat, so every category keeps its
    weight in averages.
    """
    items: list[PromptItem] = []
    for category in CATEGORIES:
        rng = rng_for(seed, "fixed_prompt_set", category)
        chosen: list[str] = []
        for _ in range(per_category * 50):
            if len(chosen) == per_category:
                break
            text = sample_prompt(category, rng)
            if text not in chosen:
                chosen.append(text)
        distinct = list(chosen)
        while distinct and len(chosen) < per_category:
            chosen.append(distinct[len(chosen) % len(distinct)])
        items.extend(PromptItem(text, category) for text in chosen)
    return items
