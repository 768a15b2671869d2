"""ShapeWorld prompt grammar, instruction grammar and prompt sets."""

from __future__ import annotations

import random

import pytest

from nodes.backends.shapeworld import (
    CATEGORIES,
    PromptParseError,
    complexity,
    describe,
    fixed_prompt_set,
    parse_prompt,
)
from nodes.backends.shapeworld.instructions import (
    Add,
    Anchor,
    Draw,
    Move,
    Recolour,
    Remove,
    Selector,
    format_instruction,
    parse_instruction,
)
from nodes.backends.shapeworld.layout import Region
from nodes.backends.shapeworld.prompts import sample_spec
from nodes.backends.shapeworld.spec import Group, Relation, SceneSpec


@pytest.mark.parametrize("category", CATEGORIES)
def test_describe_parse_round_trip_for_every_category(category: str) -> None:
    rng = random.Random(category)
    for _ in range(200):
        spec = sample_spec(category, rng)
        text = describe(spec)
        assert parse_prompt(text) == spec, text
        assert describe(parse_prompt(text)) == text


def test_round_trip_of_relation_chains_and_mixed_joiners() -> None:
    spec = SceneSpec(
        (Group(2, "circle", "red"), Group(3, "triangle", "green"), Group(1, "star", "yellow")),
        (Relation(0, "left of", 1), Relation(1, "above", 2)),
    )
    text = describe(spec)
    assert text == "two red circles to the left of three green triangles above a yellow star"
    assert parse_prompt(text) == spec
    mixed = SceneSpec(
        (Group(1, "circle", "orange"), Group(1, "square"), Group(4, "diamond", "blue")),
        (Relation(0, "below", 1),),
    )
    assert describe(mixed) == "an orange circle below a square and four blue diamonds"
    assert parse_prompt(describe(mixed)) == mixed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A photo of TWO red Circles.", SceneSpec((Group(2, "circle", "red"),))),
        ("  3   green   triangle  ", SceneSpec((Group(3, "triangle", "green"),))),
        ("a stars", SceneSpec((Group(1, "star"),))),
        (
            "two red circles,three green triangles, and a yellow star!",
            SceneSpec(
                (
                    Group(2, "circle", "red"),
                    Group(3, "triangle", "green"),
                    Group(1, "star", "yellow"),
                )
            ),
        ),
        (
            "one violet rhombus on top of 2 blue squares",
            SceneSpec(
                (Group(1, "diamond", "purple"), Group(2, "square", "blue")),
                (Relation(0, "above", 1),),
            ),
        ),
        (
            "a red circle left of a blue square",
            SceneSpec(
                (Group(1, "circle", "red"), Group(1, "square", "blue")),
                (Relation(0, "left of", 1),),
            ),
        ),
        (
            "an image of a square underneath an orange star",
            SceneSpec((Group(1, "square"), Group(1, "star", "orange")), (Relation(0, "below", 1),)),
        ),
    ],
)
def test_parsing_is_tolerant(text: str, expected: SceneSpec) -> None:
    assert parse_prompt(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("a red hexagon", "shape"),
        ("red circles", "count"),
        ("a red circle near a blue square", "relation"),
        ("thirteen circles", "count"),
        ("20 circles", "1 to 12"),
        ("two circles and a red circle", "cannot be told apart"),
        ("a red circle and a red circle", "cannot be told apart"),
        ("a cat", "expected a shape (circle, square, triangle, star, diamond) at 'cat'"),
    ],
)
def test_text_outside_the_grammar_raises_a_clear_error(text: str, fragment: str) -> None:
    with pytest.raises(PromptParseError) as info:
        parse_prompt(text)
    assert fragment in str(info.value)


def test_fixed_prompt_set_is_balanced_deterministic_and_seeded() -> None:
    items = fixed_prompt_set(24, seed=0)
    assert len(items) == 24 * len(CATEGORIES) >= 200
    assert items == fixed_prompt_set(24, seed=0)
    assert items != fixed_prompt_set(24, seed=1)
    for category in CATEGORIES:
        texts = [i.text for i in items if i.category == category]
        assert len(texts) == 24
        # Distinct wherever the category has enough prompts (single_object has only five,
        # two_objects twenty ordered pairs of shapes).
        assert len(set(texts)) == {"single_object": 5, "two_objects": 20}.get(category, 24)
        for text in texts:
            parse_prompt(text)


def test_complexity_orders_categories() -> None:
    mean = {}
    for category in CATEGORIES:
        rng = random.Random(7)
        mean[category] = sum(complexity(sample_spec(category, rng)) for _ in range(200)) / 200
    assert mean["single_object"] == mean["colors"] == 1.0
    assert mean["two_objects"] < mean["attribute_binding"] < mean["position"]
    assert mean["position"] < mean["position_count"] < mean["multi_count"]


@pytest.mark.parametrize(
    "instruction",
    [
        Draw(SceneSpec((Group(2, "circle", "red"),)), Region(None, "top")),
        Draw(SceneSpec((Group(1, "star"),))),
        Add(Group(3, "triangle", "green"), Anchor("right of", Selector("circle", "red"))),
        Add(Group(1, "square", "blue"), Anchor(region=Region("left", "bottom"))),
        Add(Group(2, "diamond")),
        Remove(Selector("circle", "red", 1)),
        Remove(Selector("square", "blue")),
        Recolour(Selector("circle", "blue", 2), "red"),
        Recolour(Selector("star", None), "orange"),
        Move(Selector("circle", "red"), Anchor("below", Selector("square", "blue"))),
        Move(Selector("star", "yellow"), Anchor(region=Region("right"))),
    ],
)
def test_instruction_round_trip(instruction: object) -> None:
    text = format_instruction(instruction)  # type: ignore[arg-type]
    assert parse_instruction(text) == instruction, text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Add one more red circle", Add(Group(1, "circle", "red"))),
        ("please add another star.", Add(Group(1, "star"))),
        ("Make the blue circles red", Recolour(Selector("circle", "blue"), "red")),
        ("change the colour of the star to yellow", Recolour(Selector("star"), "yellow")),
        ("Delete all the green squares", Remove(Selector("square", "green"))),
        ("remove two of the red circles", Remove(Selector("circle", "red", 2))),
        ("draw a photo of three stars", Draw(SceneSpec((Group(3, "star"),)))),
        (
            "Move the red circle to the left of the blue square",
            Move(Selector("circle", "red"), Anchor("left of", Selector("square", "blue"))),
        ),
    ],
)
def test_instruction_parsing_is_tolerant(text: str, expected: object) -> None:
    assert parse_instruction(text) == expected


@pytest.mark.parametrize(
    "text", ["", "Jump around", "Add circles", "Move the red circle", "Change the circle"]
)
def test_bad_instructions_raise(text: str) -> None:
    with pytest.raises(PromptParseError):
        parse_instruction(text)
