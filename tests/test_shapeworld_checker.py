"""ShapeWorld's GenEval-style checker: V = fraction of criteria passed, from pixels only."""

from __future__ import annotations

import pytest

from nodes.backends.base import BackendError, ImageRequest, Judge
from nodes.backends.shapeworld import (
    ShapeWorldChecker,
    ShapeWorldConfig,
    ShapeWorldGenerator,
    fixed_prompt_set,
)
from nodes.backends.shapeworld.render import PlacedObject, Scene, render


def scene(*objects: tuple[str, str, int, int]) -> Scene:
    """Objects as (shape, colour, x, y), 32 px each."""
    return Scene(256, 256, tuple(PlacedObject(s, c, x, y, 32) for s, c, x, y in objects))


async def test_faithful_renders_score_one() -> None:
    config = ShapeWorldConfig.noiseless()
    generator, checker = ShapeWorldGenerator(config), ShapeWorldChecker(config)
    assert isinstance(checker, Judge)
    for seed, item in enumerate(fixed_prompt_set(8, seed=3)):
        image = await generator.generate(ImageRequest(prompt=item.text, seed=seed))
        verdict = await checker.judge(image, item.text)
        assert verdict.correct and verdict.score == 1.0, (item.text, verdict.detail)
        assert all(verdict.criteria.values())


@pytest.mark.parametrize(
    ("prompt", "objects", "score", "failed"),
    [
        # One red circle missing: its count fails; colours and the square's count pass.
        (
            "two red circles and a blue square",
            [("circle", "red", 40, 40), ("square", "blue", 200, 200)],
            3 / 4,
            {"count: two red circles"},
        ),
        # Colours swapped: both counts and both colour criteria fail.
        (
            "a red circle and a blue square",
            [("circle", "blue", 40, 40), ("square", "red", 200, 200)],
            0.0,
            {
                "count: a red circle",
                "count: a blue square",
                "colour: circles are red",
                "colour: squares are blue",
            },
        ),
        # Relation reversed: only the position criterion fails.
        (
            "a red circle to the left of a blue square",
            [("circle", "red", 200, 128), ("square", "blue", 50, 128)],
            4 / 5,
            {"position: the red circle to the left of the blue square"},
        ),
        # An extra circle of another colour: the count holds, the colour criterion does not.
        (
            "three red circles",
            [
                ("circle", "red", 40, 40),
                ("circle", "red", 120, 40),
                ("circle", "red", 200, 40),
                ("circle", "green", 120, 200),
            ],
            1 / 2,
            {"colour: circles are red"},
        ),
        # Colour-free counting: one criterion, any colours, exact count.
        (
            "four triangles",
            [("triangle", c, x, 100) for c, x in (("red", 30), ("blue", 90), ("green", 150))],
            0.0,
            {"count: four triangles"},
        ),
        # Shapes the prompt does not mention are ignored.
        ("a star", [("star", "orange", 60, 60), ("square", "red", 180, 180)], 1.0, set()),
        # Too close to call: a relation needs GenEval's margin.
        (
            "a yellow star above a purple diamond",
            [("star", "yellow", 60, 120), ("diamond", "purple", 110, 123)],
            4 / 5,
            {"position: the yellow star above the purple diamond"},
        ),
    ],
)
async def test_known_errors_give_the_exact_score(
    prompt: str, objects: list[tuple[str, str, int, int]], score: float, failed: set[str]
) -> None:
    verdict = await ShapeWorldChecker().judge(render(scene(*objects)), prompt)
    assert verdict.score == pytest.approx(score)
    assert verdict.correct == (score == 1.0)
    assert {name for name, ok in verdict.criteria.items() if not ok} == failed
    for name in failed:
        assert f"FAIL {name}" in verdict.detail


async def test_groups_are_judged_by_centroid() -> None:
    # Two circles spread out, but as a group clearly above the squares.
    image = render(
        scene(
            ("circle", "red", 40, 40),
            ("circle", "red", 210, 70),
            ("square", "blue", 100, 200),
            ("square", "blue", 160, 210),
        )
    )
    verdict = await ShapeWorldChecker().judge(image, "two red circles above two blue squares")
    assert verdict.correct


async def test_accepts_a_drawing_instruction_and_rejects_other_text() -> None:
    image = render(scene(("circle", "red", 40, 40), ("circle", "red", 120, 40)))
    verdict = await ShapeWorldChecker().judge(image, "Draw two red circles at the top.")
    assert verdict.correct
    with pytest.raises(BackendError, match="cannot read"):
        await ShapeWorldChecker().judge(image, "a cat on a mat")
