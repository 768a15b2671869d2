"""ShapeWorld's generator: parses three prompt forms, errs more on harder prompts, is seeded."""

from __future__ import annotations

import pytest

from nodes.backends.base import BackendError, ImageGenerator, ImageRequest
from nodes.backends.shapeworld import (
    ShapeWorldChecker,
    ShapeWorldConfig,
    ShapeWorldGenerator,
    parse_prompt,
)
from nodes.backends.shapeworld.detect import detect
from nodes.backends.shapeworld.errors import hazard

SIMPLE = "a red circle"
MIDDLE = "five triangles"
COMPLEX = "two red circles, three green triangles, four yellow stars and a blue square"


def accuracy(prompt: str, seeds: range, config: ShapeWorldConfig | None = None) -> float:
    generator, checker = ShapeWorldGenerator(config), ShapeWorldChecker(config)
    right = 0
    for seed in seeds:
        image = generator.generate_sync(ImageRequest(prompt=prompt, seed=seed))
        right += checker.judge_sync(image, prompt).correct
    return right / len(seeds)


def test_error_rate_grows_with_complexity() -> None:
    simple, middle, complex_ = (accuracy(p, range(120)) for p in (SIMPLE, MIDDLE, COMPLEX))
    # Expected from the hazard (Poisson with rate 0.03, 0.95, 5.4): ~0.97, ~0.39, ~0.005.
    assert simple >= 0.9
    assert 0.25 <= middle <= 0.65
    assert complex_ <= 0.2
    assert simple > middle > complex_


def test_noiseless_generator_is_always_right() -> None:
    assert accuracy(COMPLEX, range(30), ShapeWorldConfig.noiseless()) == 1.0


def test_blueprint_lowers_the_hazard_modestly() -> None:
    config = ShapeWorldConfig()
    spec = parse_prompt(COMPLEX)
    plain, planned = hazard(spec, config), hazard(spec, config, blueprint=True)
    assert planned == pytest.approx(plain * config.blueprint_hazard_scale)
    assert 0.5 * plain < planned < plain


@pytest.mark.parametrize(
    "prompt",
    [
        "two red circles above three blue squares",
        "Blueprint: two red circles above three blue squares. Layout: the red circles at the "
        "top; the blue squares at the bottom; no two shapes touch.",
        "Draw two red circles above three blue squares.",
    ],
)
async def test_reads_prompt_blueprint_and_instruction(prompt: str) -> None:
    generator = ShapeWorldGenerator(ShapeWorldConfig.noiseless())
    assert isinstance(generator, ImageGenerator)
    image = await generator.generate(ImageRequest(prompt=prompt, seed=1))
    verdict = ShapeWorldChecker().judge_sync(image, "two red circles above three blue squares")
    assert verdict.correct, verdict.detail


async def test_instruction_region_is_honoured() -> None:
    generator = ShapeWorldGenerator(ShapeWorldConfig.noiseless())
    image = await generator.generate(ImageRequest(prompt="Draw three stars on the left.", seed=4))
    found = detect(image)
    assert len(found) == 3 and all(o.bbox[2] <= 128 for o in found)


async def test_unreadable_prompt_raises_backend_error() -> None:
    with pytest.raises(BackendError, match="cannot draw 'a cat on a mat'"):
        await ShapeWorldGenerator().generate(ImageRequest(prompt="a cat on a mat"))


async def test_same_request_same_bytes_and_seeds_differ() -> None:
    request = ImageRequest(prompt=COMPLEX, seed=11)
    first = await ShapeWorldGenerator().generate(request)
    again = await ShapeWorldGenerator().generate(request)
    assert first.tobytes() == again.tobytes()
    others = [
        (await ShapeWorldGenerator().generate(ImageRequest(prompt=COMPLEX, seed=s))).tobytes()
        for s in range(12, 16)
    ]
    assert len({first.tobytes(), *others}) == 5


async def test_image_size_follows_the_request() -> None:
    generator = ShapeWorldGenerator(ShapeWorldConfig.noiseless())
    image = await generator.generate(
        ImageRequest(prompt="three blue diamonds", width=384, height=192, seed=2)
    )
    assert image.size == (384, 192)
    assert ShapeWorldChecker().judge_sync(image, "three blue diamonds").correct
