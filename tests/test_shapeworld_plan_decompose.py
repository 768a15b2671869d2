"""ShapeWorld's planner and decomposer, and executing a decomposition step by step."""

from __future__ import annotations

import pytest

from nodes.backends.base import ChatModel, ChatRequest, EditRequest, ImageRequest
from nodes.backends.shapeworld import (
    CATEGORIES,
    ShapeWorldChecker,
    ShapeWorldConfig,
    fixed_prompt_set,
    make_shapeworld,
    parse_prompt,
)
from nodes.backends.shapeworld.instructions import Add, Draw, parse_instruction
from nodes.formats import parse_subtasks


async def ask(model: ChatModel, prompt: str) -> str:
    return (await model.chat(ChatRequest(messages=(), fields={"prompt": prompt}))).text


async def test_decomposition_is_one_group_per_step_with_cumulative_expectations() -> None:
    sw = make_shapeworld()
    prompt = "two red circles above three blue squares"
    steps, well_formed = parse_subtasks(await ask(sw.decomposer, prompt))
    assert well_formed
    assert [(s.instruction, s.expect) for s in steps] == [
        ("Draw two red circles at the top.", "two red circles"),
        ("Add three blue squares below the red circles.", prompt),
    ]


@pytest.mark.parametrize("category", CATEGORIES)
async def test_executing_the_steps_without_noise_gives_a_correct_image(category: str) -> None:
    sw = make_shapeworld(ShapeWorldConfig.noiseless())
    checker = ShapeWorldChecker()
    items = [i for i in fixed_prompt_set(4, seed=9) if i.category == category]
    for seed, item in enumerate(items):
        steps, well_formed = parse_subtasks(await ask(sw.decomposer, item.text))
        assert well_formed and len(steps) == len(parse_prompt(item.text).groups)
        assert isinstance(parse_instruction(steps[0].instruction), Draw)
        assert all(isinstance(parse_instruction(s.instruction), Add) for s in steps[1:])
        assert parse_prompt(steps[-1].expect) == parse_prompt(item.text)
        image = await sw.generator.generate(ImageRequest(prompt=steps[0].instruction, seed=seed))
        for i, step in enumerate(steps):
            if i:
                image = await sw.editor.edit(EditRequest(image, step.instruction, seed=seed))
            verdict = checker.judge_sync(image, step.expect)
            assert verdict.correct, (item.text, step, verdict.detail)
        assert checker.judge_sync(image, item.text).correct


async def test_unparseable_prompts_pass_through() -> None:
    sw = make_shapeworld()
    steps, well_formed = parse_subtasks(await ask(sw.decomposer, "a cat on a mat"))
    assert well_formed and [(s.instruction, s.expect) for s in steps] == [
        ("a cat on a mat", "a cat on a mat")
    ]
    assert await ask(sw.planner, "a cat on a mat") == "a cat on a mat"


async def test_planner_blueprint_is_drawable_and_deterministic() -> None:
    sw = make_shapeworld(ShapeWorldConfig.noiseless())
    prompt = "a yellow star to the left of two purple diamonds"
    blueprint = await ask(sw.planner, prompt)
    assert blueprint == (
        "Blueprint: a yellow star to the left of two purple diamonds. Layout: the yellow star on "
        "the left; the purple diamonds on the right; no two shapes touch."
    )
    assert blueprint == await ask(sw.planner, prompt)
    image = await sw.generator.generate(ImageRequest(prompt=blueprint, seed=3))
    assert ShapeWorldChecker().judge_sync(image, prompt).correct
