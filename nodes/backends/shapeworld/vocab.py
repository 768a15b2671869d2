"""ShapeWorld's vocabulary: shapes, palette colours, sizes, number words, relations, regions.

The shapes were chosen for how reliably the pixel detector tells them apart by fill ratio and row
widths (see ``detect``). The palette colours sit far apart in RGB (and far from greys) so a
nearest-colour lookup still works on resized or JPEG-compressed images.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 0),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

BACKGROUND: tuple[int, int, int] = (255, 255, 255)

NUMBER_WORDS: dict[str, int] = {
    "a": 1,
    "an": 1,
    "one": 1,
    "single": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}
CANONICAL_NUMBERS: dict[int, str] = {
    1: "a",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
}
MAX_COUNT = 12
"""Largest count the grammar accepts in one group (prompt sampling stays within 1-8)."""

SIZES: tuple[str, ...] = ("big", "small")
"""Size words a group may carry; a group without one is drawn at the scene's ordinary size."""
SIZE_SYNONYMS: dict[str, str] = {"large": "big"}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""GenEval's directional relations (the ones prompt sampling draws from)."""
NEXT_TO = "next to"
"""Adjacency, on either side: symmetric, and not sampled by the prompt categories (see
``geometry.adjacent`` for the rule)."""
ALL_RELATIONS: tuple[str, ...] = (*RELATIONS, NEXT_TO)
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "next to": "next to",
}
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
    "next to": "next to",
}
"""Canonical surface form of each relation."""

RELATION_SYNONYMS: dict[tuple[str, ...], str] = {
    ("to", "the", "left", "of"): "left of",
    ("on", "the", "left", "of"): "left of",
    ("at", "the", "left", "of"): "left of",
    ("left", "of"): "left of",
    ("to", "the", "right", "of"): "right of",
    ("on", "the", "right", "of"): "right of",
    ("at", "the", "right", "of"): "right of",
    ("right", "of"): "right of",
    ("on", "top", "of"): "above",
    ("above",): "above",
    ("over",): "above",
    ("below",): "below",
    ("under",): "below",
    ("underneath",): "below",
    ("beneath",): "below",
    ("next", "to"): "next to",
    ("beside",): "next to",
}
"""Token sequences read as a relation; longest match wins."""

COLOUR_SYNONYMS: dict[str, str] = {"violet": "purple"}
SHAPE_SYNONYMS: dict[str, str] = {"rhombus": "diamond", "rhombuses": "diamond"}
