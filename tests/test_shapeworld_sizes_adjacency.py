"""ShapeWorld's size words (big/large, small) and "next to": parsed, drawn, checked, repaired."""

from __future__ import annotations

import pytest
from PIL import Image

from nodes.backends.base import ChatRequest, EditRequest, ImageRequest
from nodes.backends.shapeworld import (
    ShapeWorldChecker,
    ShapeWorldConfig,
    ShapeWorldEditor,
    ShapeWorldGenerator,
    ShapeWorldReflector,
    describe,
    make_shapeworld,
    parse_prompt,
)
from nodes.backends.shapeworld.detect import DetectedObject, detect
from nodes.backends.shapeworld.geometry import adjacent
from nodes.backends.shapeworld.instructions import (
    Add,
    Anchor,
    Move,
    Resize,
    Selector,
    format_instruction,
    parse_instruction,
)
from nodes.backends.shapeworld.render import PlacedObject, Scene, render
from nodes.backends.shapeworld.spec import Group, Relation, SceneSpec
from nodes.formats import parse_reflection, parse_subtasks

NOISELESS = ShapeWorldConfig.noiseless()
SIZED = "a big red circle and a small blue square"
BESIDE = "a blue circle next to a red square"


def scene(*objects: tuple[str, str, int, int, int]) -> Image.Image:
    """Render objects given as (shape, colour, x, y, size)."""
    return render(Scene(256, 256, tuple(PlacedObject(*o) for o in objects)))


def draw(prompt: str, seed: int) -> Image.Image:
    return ShapeWorldGenerator(NOISELESS).generate_sync(ImageRequest(prompt=prompt, seed=seed))


def one(objects: list[DetectedObject], shape: str) -> DetectedObject:
    [found] = [o for o in objects if o.shape == shape]
    return found


def failed(image: Image.Image, prompt: str) -> set[str]:
    verdict = ShapeWorldChecker().judge_sync(image, prompt)
    return {name for name, ok in verdict.criteria.items() if not ok}


async def repair(image: Image.Image, prompt: str, seed: int) -> tuple[str, Image.Image]:
    """One reflect-then-edit round without noise: the instruction and the edited image."""
    text = ShapeWorldReflector(NOISELESS).reflect(prompt, image, seed)
    instruction = parse_reflection(text).instruction
    edited = await ShapeWorldEditor(NOISELESS).edit(EditRequest(image, instruction, seed))
    return instruction, edited


# ------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            SIZED,
            SceneSpec((Group(1, "circle", "red", "big"), Group(1, "square", "blue", "small"))),
        ),
        (
            BESIDE,
            SceneSpec(
                (Group(1, "circle", "blue"), Group(1, "square", "red")),
                (Relation(0, "next to", 1),),
            ),
        ),
        # Synonyms and the other word order read the same; the canonical text uses big/next to.
        ("two LARGE stars beside 3 small squares", None),
        ("a red big circle", SceneSpec((Group(1, "circle", "red", "big"),))),
    ],
)
def test_size_words_and_next_to_parse_and_round_trip(text: str, expected: SceneSpec | None) -> None:
    spec = parse_prompt(text)
    if expected is not None:
        assert spec == expected
    assert parse_prompt(describe(spec)) == spec
    assert "large" not in describe(spec) and "beside" not in describe(spec)


def test_unknown_size_words_still_fail_to_parse() -> None:
    with pytest.raises(ValueError, match="shape"):
        parse_prompt("a huge red circle")


@pytest.mark.parametrize(
    "instruction",
    [
        Resize(Selector("circle", "red", plural=False), "big"),
        Resize(Selector("square", None), "small"),
        Add(Group(2, "star", "green", "small"), Anchor("next to", Selector("circle", "red"))),
        Move(Selector("circle", "blue", plural=False), Anchor("next to", Selector("square"))),
    ],
)
def test_new_instructions_round_trip(instruction: object) -> None:
    text = format_instruction(instruction)  # type: ignore[arg-type]
    assert parse_instruction(text) == instruction, text


def test_resize_reads_comparatives_and_recolour_still_wins_on_colours() -> None:
    assert parse_instruction("Make the red circle bigger") == Resize(
        Selector("circle", "red"), "big"
    )
    assert parse_instruction("resize the squares to small") == Resize(Selector("square"), "small")
    assert format_instruction(parse_instruction("Make the blue circles red")).startswith("Change")


# ------------------------------------------------------------------------------------ drawing


def test_generator_draws_big_shapes_big_and_small_shapes_small() -> None:
    checker = ShapeWorldChecker()
    for seed in range(10):
        image = draw(SIZED, seed)
        objects = detect(image)
        circle, square = one(objects, "circle"), one(objects, "square")
        # Measurably: the big circle is more than twice as wide as the small square.
        assert circle.size > 2 * square.size, (seed, circle.size, square.size)
        verdict = checker.judge_sync(image, SIZED)
        assert verdict.correct, verdict.detail
        assert {"size: the red circle is big", "size: the blue square is small"} <= set(
            verdict.criteria
        )


def test_size_words_scale_with_the_canvas() -> None:
    request = ImageRequest(prompt="a small red circle and a big blue square", width=512, height=512)
    image = ShapeWorldGenerator(NOISELESS).generate_sync(request)
    objects = detect(image)
    assert one(objects, "square").size > 100 > 2 * one(objects, "circle").size
    assert ShapeWorldChecker().judge_sync(image, request.prompt).correct


def test_generator_lays_out_next_to_adjacently() -> None:
    checker = ShapeWorldChecker()
    for prompt in (BESIDE, "two red circles next to three blue squares"):
        for seed in range(10):
            image = draw(prompt, seed)
            verdict = checker.judge_sync(image, prompt)
            assert verdict.correct, (prompt, seed, verdict.detail)


# ------------------------------------------------------------------------------------ checking


@pytest.mark.parametrize(
    ("circle_size", "square_size", "failures"),
    [
        (64, 20, set()),
        # Swapped sizes: both size criteria fail, counts and colours still pass.
        (20, 64, {"size: the red circle is big", "size: the blue square is small"}),
        # An ordinary size is neither big nor small.
        (40, 40, {"size: the red circle is big", "size: the blue square is small"}),
        (40, 20, {"size: the red circle is big"}),
    ],
)
def test_checker_judges_size_words(circle_size: int, square_size: int, failures: set[str]) -> None:
    image = scene(("circle", "red", 60, 60, circle_size), ("square", "blue", 190, 190, square_size))
    assert failed(image, SIZED) == failures
    verdict = ShapeWorldChecker().judge_sync(image, SIZED)
    assert verdict.score == pytest.approx((6 - len(failures)) / 6)


def test_prompts_without_size_words_get_no_size_criterion() -> None:
    image = scene(("circle", "red", 60, 60, 20), ("square", "blue", 190, 190, 64))
    verdict = ShapeWorldChecker().judge_sync(image, "a red circle and a blue square")
    assert verdict.correct and not any(name.startswith("size") for name in verdict.criteria)


@pytest.mark.parametrize(
    ("circle_x", "circle_y", "square_x", "square_y", "holds"),
    [
        (100, 128, 140, 128, True),  # circle on the left, 8 px apart
        (160, 128, 120, 128, True),  # circle on the right
        (100, 120, 140, 140, True),  # a little out of line, still level and side by side
        (40, 128, 210, 128, False),  # same row, far apart
        (128, 80, 128, 120, False),  # one above the other, touching distance
        (100, 80, 140, 130, False),  # diagonal: no shared row
    ],
)
def test_checker_judges_next_to(
    circle_x: int, circle_y: int, square_x: int, square_y: int, holds: bool
) -> None:
    image = scene(
        ("circle", "blue", circle_x, circle_y, 32), ("square", "red", square_x, square_y, 32)
    )
    criterion = "position: the blue circle next to the red square"
    assert failed(image, BESIDE) == (set() if holds else {criterion})
    boxes = [o.bbox for o in detect(image)]
    assert adjacent(boxes[:1], boxes[1:]) == adjacent(boxes[1:], boxes[:1]) == holds


# ------------------------------------------------------------------------ reflection and edits


async def test_swapped_sizes_are_seen_and_repaired() -> None:
    swapped = scene(("circle", "red", 70, 70, 20), ("square", "blue", 180, 180, 64))
    thought = parse_reflection(ShapeWorldReflector(NOISELESS).reflect(SIZED, swapped)).thought
    assert "the red circle is small; the blue square is big" in thought
    assert "The red circle is small, not big. The blue square is big, not small." in thought
    for seed in range(4):
        image = swapped
        instruction, image = await repair(image, SIZED, seed)
        assert instruction in ("Make the red circle big.", "Make the blue square small.")
        instruction, image = await repair(image, SIZED, seed)
        assert instruction.startswith("Make the ")
        assert ShapeWorldChecker().judge_sync(image, SIZED).correct


async def test_a_resize_without_room_nudges_the_object_as_little_as_it_can() -> None:
    # The circle grows from 30 px to big with the square 10 px to its right: it cannot stay
    # centred, so it shifts left, level, to within one nudge (the gap, 6 px) of the square.
    image = scene(("circle", "red", 100, 128, 30), ("square", "blue", 145, 128, 40))
    for seed in range(4):
        edited = await ShapeWorldEditor(NOISELESS).edit(
            EditRequest(image, "Make the red circle big.", seed)
        )
        circle, square = one(detect(edited), "circle"), one(detect(edited), "square")
        assert square.bbox == (125, 108, 165, 148)  # untouched
        assert circle.size >= 64 and circle.centre[1] == pytest.approx(128, abs=1)
        assert 6 <= square.bbox[0] - circle.bbox[2] < 12


@pytest.mark.parametrize(("circle", "square"), [((30, 128), (220, 128)), ((128, 40), (128, 200))])
async def test_groups_apart_are_moved_next_to_each_other(
    circle: tuple[int, int], square: tuple[int, int]
) -> None:
    for seed in range(4):
        image = scene(("circle", "blue", *circle, 32), ("square", "red", *square, 32))
        assert failed(image, BESIDE) == {"position: the blue circle next to the red square"}
        instruction, image = await repair(image, BESIDE, seed)
        assert instruction == "Move the blue circle next to the red square."
        assert ShapeWorldChecker().judge_sync(image, BESIDE).correct


def test_the_generators_mistakes_on_the_new_words_are_visible() -> None:
    # Always at least one mistake, and only of the kinds the new words add: an ignored size
    # word (the single groups), or "next to" drawn stacked (BESIDE has no size word).
    only = {
        "size_weight": 1.0,
        "position_weight": 1.0,
        "miscount_weight": 0.0,
        "binding_weight": 0.0,
        "missing_weight": 0.0,
        "wrong_colour_weight": 0.0,
        "base_hazard": 30.0,
    }
    generator = ShapeWorldGenerator(ShapeWorldConfig.noiseless(**only))
    for prompt in ("a big red circle", "a small blue square", BESIDE):
        for seed in range(5):
            image = generator.generate_sync(ImageRequest(prompt=prompt, seed=seed))
            assert not ShapeWorldChecker().judge_sync(image, prompt).correct, (prompt, seed)


async def test_plan_and_decomposition_handle_the_new_words() -> None:
    sw = make_shapeworld(NOISELESS)
    prompt = "a big blue circle next to two small red squares"
    request = ChatRequest(messages=(), fields={"prompt": prompt})
    blueprint = (await sw.planner.chat(request)).text
    assert blueprint == (
        f"Blueprint: {prompt}. Layout: the big blue circle on the left; the small red squares "
        "beside the blue circle; no two shapes touch."
    )
    steps, well_formed = parse_subtasks((await sw.decomposer.chat(request)).text)
    assert well_formed and [s.instruction for s in steps] == [
        "Draw a big blue circle on the left.",
        "Add two small red squares next to the blue circle.",
    ]
    for seed in range(4):
        image = await sw.generator.generate(ImageRequest(prompt=blueprint, seed=seed))
        assert sw.judge.judge_sync(image, prompt).correct
        image = await sw.generator.generate(ImageRequest(prompt=steps[0].instruction, seed=seed))
        image = await sw.editor.edit(EditRequest(image, steps[1].instruction, seed))
        verdict = sw.judge.judge_sync(image, prompt)
        assert verdict.correct, (seed, verdict.detail)
