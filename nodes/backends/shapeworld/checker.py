"""ShapeWorld's judge: GenEval-style scoring of an image against a text, from pixels alone."""

from __future__ import annotations

from PIL import Image

from nodes.backends.base import BackendError, Judgement
from nodes.backends.shapeworld.config import ShapeWorldConfig
from nodes.backends.shapeworld.detect import DetectedObject, detect, scaled_min_area
from nodes.backends.shapeworld.evaluate import evaluate
from nodes.backends.shapeworld.grammar import parse_prompt
from nodes.backends.shapeworld.instructions import Draw, parse_instruction
from nodes.backends.shapeworld.spec import PromptParseError, SceneSpec


def read_target(text: str) -> SceneSpec:
    """A description ("two red circles") or a drawing instruction ("Draw two red circles.")."""
    try:
        return parse_prompt(text)
    except PromptParseError as error:
        try:
            instruction = parse_instruction(text)
        except PromptParseError:
            raise error from None
        if isinstance(instruction, Draw):
            return instruction.spec
        raise error from None


def detect_objects(image: Image.Image, config: ShapeWorldConfig) -> list[DetectedObject]:
    return detect(image, config.colour_tolerance, scaled_min_area(config.min_area, image.size))


class ShapeWorldChecker:
    """``score`` = fraction of criteria passed; ``correct`` = all passed (see ``evaluate``)."""

    def __init__(
        self, config: ShapeWorldConfig | None = None, model_id: str = "shapeworld-checker"
    ):
        self.config = config or ShapeWorldConfig()
        self.model_id = model_id

    async def judge(self, image: Image.Image, text: str) -> Judgement:
        return self.judge_sync(image, text)

    def judge_sync(self, image: Image.Image, text: str) -> Judgement:
        try:
            spec = read_target(text)
        except PromptParseError as error:
            raise BackendError(f"{self.model_id}: {error}") from error
        criteria = evaluate(
            spec,
            detect_objects(image, self.config),
            self.config.position_threshold,
            canvas_side=min(image.size),
        )
        passed = sum(c.passed for c in criteria)
        detail = "; ".join(
            f"{'pass' if c.passed else 'FAIL'} {c.name} ({c.observed})" for c in criteria
        )
        return Judgement(
            score=passed / len(criteria),
            correct=passed == len(criteria),
            criteria={c.name: c.passed for c in criteria},
            detail=detail,
        )
