"""ShapeWorld: the embedded, simulated backend set (a world of coloured shapes).

Every role the graph needs, in-process and in milliseconds, with no GPU and no model: a planner,
a reflector and a decomposer (chat models), a generator and an editor (image models) and a
GenEval-style judge. The understanding side reads only pixels, the generator and editor make
realistic mistakes whose rate grows with prompt complexity, and every choice is seeded::

    sw = make_shapeworld()
    image = await sw.generator.generate(ImageRequest(prompt="two red circles above a blue star"))
    verdict = await sw.judge.judge(image, "two red circles above a blue star")

Only Pillow, numpy and pydantic are imported here (never torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from nodes.backends.shapeworld.checker import ShapeWorldChecker
from nodes.backends.shapeworld.config import ShapeWorldConfig
from nodes.backends.shapeworld.decomposer import ShapeWorldDecomposer
from nodes.backends.shapeworld.editor import ShapeWorldEditor
from nodes.backends.shapeworld.generator import ShapeWorldGenerator
from nodes.backends.shapeworld.grammar import parse_prompt
from nodes.backends.shapeworld.planner import ShapeWorldPlanner
from nodes.backends.shapeworld.prompts import (
    CATEGORIES,
    Category,
    PromptItem,
    fixed_prompt_set,
    sample_prompt,
)
from nodes.backends.shapeworld.reflector import ShapeWorldReflector
from nodes.backends.shapeworld.spec import PromptParseError, SceneSpec, complexity, describe


@dataclass(frozen=True)
class ShapeWorldBackends:
    """One ShapeWorld backend per role (attribute names match the graph's roles)."""

    planner: ShapeWorldPlanner
    reflector: ShapeWorldReflector
    decomposer: ShapeWorldDecomposer
    generator: ShapeWorldGenerator
    editor: ShapeWorldEditor
    judge: ShapeWorldChecker


def make_shapeworld(config: ShapeWorldConfig | None = None) -> ShapeWorldBackends:
    config = config or ShapeWorldConfig()
    return ShapeWorldBackends(
        planner=ShapeWorldPlanner(),
        reflector=ShapeWorldReflector(config),
        decomposer=ShapeWorldDecomposer(config),
        generator=ShapeWorldGenerator(config),
        editor=ShapeWorldEditor(config),
        judge=ShapeWorldChecker(config),
    )


__all__ = [
    "CATEGORIES",
    "Category",
    "PromptItem",
    "PromptParseError",
    "SceneSpec",
    "ShapeWorldBackends",
    "ShapeWorldChecker",
    "ShapeWorldConfig",
    "ShapeWorldDecomposer",
    "ShapeWorldEditor",
    "ShapeWorldGenerator",
    "ShapeWorldPlanner",
    "ShapeWorldReflector",
    "complexity",
    "describe",
    "fixed_prompt_set",
    "make_shapeworld",
    "parse_prompt",
    "sample_prompt",
]
