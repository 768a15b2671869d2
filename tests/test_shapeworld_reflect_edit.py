"""ShapeWorld's reflector and editor, alone and closing the draw-see-edit loop together."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nodes.backends.base import (
    BackendError,
    ChatMessage,
    ChatModel,
    ChatRequest,
    EditRequest,
    ImageEditor,
    ImageRequest,
    SamplingParams,
)
from nodes.backends.shapeworld import (
    ShapeWorldChecker,
    ShapeWorldConfig,
    ShapeWorldEditor,
    ShapeWorldGenerator,
    ShapeWorldReflector,
    fixed_prompt_set,
)
from nodes.backends.shapeworld.detect import detect
from nodes.backends.shapeworld.instructions import parse_instruction
from nodes.formats import parse_reflection

NOISELESS = ShapeWorldConfig.noiseless()
PROMPT = "three red circles above two blue squares"


def draw(prompt: str, seed: int = 0) -> Image.Image:
    return ShapeWorldGenerator(NOISELESS).generate_sync(ImageRequest(prompt=prompt, seed=seed))


def edit(image: Image.Image, instruction: str, seed: int = 0, config=NOISELESS) -> Image.Image:
    return ShapeWorldEditor(config).edit_sync(EditRequest(image, instruction, seed))


async def reflect(
    target: str, image: Image.Image, seed: int = 0, config: ShapeWorldConfig = NOISELESS
) -> str:
    request = ChatRequest(
        messages=(ChatMessage("user", "Does the image match?", (image,)),),
        sampling=SamplingParams(seed=seed),
        fields={"target": target},
    )
    completion = await ShapeWorldReflector(config).chat(request)
    assert completion.model == "shapeworld-reflector"
    assert completion.token_ids == () and completion.logprobs == ()
    return completion.text


async def test_reflector_stops_on_correct_images() -> None:
    assert isinstance(ShapeWorldReflector(), ChatModel)
    for seed, item in enumerate(fixed_prompt_set(4, seed=5)):
        text = await reflect(item.text, draw(item.text, seed), seed)
        parsed = parse_reflection(text)
        assert parsed.stop and parsed.well_formed, text
        assert parsed.thought.startswith(f"The target description is: {item.text}.")
        assert "The current image shows:" in parsed.thought


@pytest.mark.parametrize(
    ("injection", "expected_fix"),
    [
        ("Remove one red circle.", "Add a red circle."),
        ("Add a red circle.", "Remove one red circle."),
        ("Change one red circle to green.", "Change the green circle to red."),
        ("Remove the blue squares.", "Add two blue squares below the red circles."),
        ("Add an orange circle.", "Remove the orange circle."),
        ("Move the red circles below the blue squares.", "Move the red circles above the blue"),
    ],
)
async def test_one_injected_error_is_fixed_in_one_round(injection: str, expected_fix: str) -> None:
    checker = ShapeWorldChecker()
    for seed in range(6):
        broken = edit(draw(PROMPT, seed), injection, seed)
        assert not checker.judge_sync(broken, PROMPT).correct
        parsed = parse_reflection(await reflect(PROMPT, broken, seed))
        assert parsed.well_formed and not parsed.stop
        assert parsed.instruction.startswith(expected_fix), parsed.instruction
        fixed = edit(broken, parsed.instruction, seed)
        verdict = checker.judge_sync(fixed, PROMPT)
        assert verdict.correct, (seed, parsed.instruction, verdict.detail)


async def test_swapped_colours_take_two_recolours() -> None:
    prompt = "two red circles and three blue squares"
    checker = ShapeWorldChecker()
    for seed in range(5):
        image = edit(draw(prompt, seed), "Change the red circles to blue.", seed)
        image = edit(image, "Change the blue squares to red.", seed)
        assert checker.judge_sync(image, prompt).score == 0.0
        instructions = []
        for _ in range(2):
            instructions.append(parse_reflection(await reflect(prompt, image, seed)).instruction)
            image = edit(image, instructions[-1], seed)
        assert instructions == [
            "Change the blue circles to red.",
            "Change the red squares to blue.",
        ]
        assert checker.judge_sync(image, prompt).correct


async def test_malformed_outputs_are_reported_as_such() -> None:
    image = edit(draw(PROMPT), "Remove one red circle.")
    always = ShapeWorldConfig.noiseless(reflector_malformed_rate=1.0)
    for seed in range(30):
        for target in (PROMPT, "two red circles above two blue squares"):
            assert not parse_reflection(await reflect(target, image, seed, always)).well_formed
    default = [
        parse_reflection(await reflect(PROMPT, image, s, ShapeWorldConfig())) for s in range(200)
    ]
    malformed = sum(not p.well_formed for p in default) / len(default)
    assert 0 < malformed < 0.1  # the default rate is 3%


async def test_noise_rates_show_up() -> None:
    broken = edit(draw(PROMPT), "Remove one red circle.")
    missing = ShapeWorldConfig.noiseless(reflector_miss_rate=1.0)
    assert parse_reflection(await reflect(PROMPT, broken, 1, missing)).stop
    off = ShapeWorldConfig.noiseless(reflector_off_rate=1.0)
    instruction = parse_reflection(await reflect(PROMPT, broken, 1, off)).instruction
    assert instruction != "Add a red circle."
    parse_instruction(instruction)  # off, yet still an instruction the editor reads
    alarm = ShapeWorldConfig.noiseless(reflector_false_alarm_rate=1.0)
    assert not parse_reflection(await reflect(PROMPT, draw(PROMPT), 1, alarm)).stop


async def test_reflector_is_deterministic_and_needs_an_image() -> None:
    broken = edit(draw(PROMPT), "Remove one red circle.")
    config = ShapeWorldConfig(reflector_off_rate=0.5)
    texts = [await reflect(PROMPT, broken, s, config) for s in range(20)]
    assert texts == [await reflect(PROMPT, broken, s, config) for s in range(20)]
    assert len(set(texts)) > 1
    request = ChatRequest(messages=(ChatMessage("user", "hi"),), fields={"target": PROMPT})
    with pytest.raises(BackendError, match="image"):
        await ShapeWorldReflector().chat(request)


async def test_editor_keeps_untouched_pixels_and_is_deterministic() -> None:
    assert isinstance(ShapeWorldEditor(), ImageEditor)
    image = draw(PROMPT, 3)
    edited = edit(image, "Add a green star to the right of the blue squares.", 3)
    before, after = np.asarray(image), np.asarray(edited)
    ink = (before != 255).any(axis=-1)
    assert (before[ink] == after[ink]).all()
    assert sum(o.shape == "star" and o.colour == "green" for o in detect(edited)) == 1
    assert (
        edited.tobytes()
        == edit(image, "Add a green star to the right of the blue squares.", 3).tobytes()
    )


async def test_editor_failure_modes() -> None:
    image = draw(PROMPT, 2)
    unreadable = await ShapeWorldEditor().edit(EditRequest(image, "make it prettier", seed=1))
    assert unreadable.tobytes() == image.tobytes()
    broken = ShapeWorldConfig.noiseless(edit_failure_rate=1.0)
    assert edit(image, "Add two stars.", 1, broken).tobytes() == image.tobytes()
    partial = ShapeWorldConfig.noiseless(edit_partial_rate=1.0)
    stars = [o for o in detect(edit(image, "Add three stars.", 1, partial)) if o.shape == "star"]
    assert len(stars) == 2
    # Bigger edits fail more often: 8% + 1%/object in the image, + 4% per extra object.
    default = ShapeWorldConfig()
    instructions = {1: "Add a yellow diamond.", 6: "Add six yellow diamonds."}
    failed = {
        n: sum(edit(image, text, s, default).tobytes() == image.tobytes() for s in range(300)) / 300
        for n, text in instructions.items()
    }
    assert 0.05 < failed[1] < 0.25
    assert failed[6] > failed[1] + 0.1
