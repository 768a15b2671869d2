"""ShapeWorld's text-to-image model: parse, make realistic mistakes, lay out, render.

It reads three forms of prompt:

- a scene description, the user's prompt: "two red circles above three blue squares"
- a planner blueprint: "Blueprint: <description>. Layout: <free text>" (the layout is advisory:
  placement comes from the description's relations; its presence lowers the error hazard by
  ``blueprint_hazard_scale``, as R3's reasoning stage helps a little)
- a drawing instruction, a decomposition's first step: "Draw two red circles at the top."
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image

from nodes.backends.base import BackendError, ImageRequest
from nodes.backends.shapeworld.config import ShapeWorldConfig
from nodes.backends.shapeworld.errors import DrawPlan, plan_drawing
from nodes.backends.shapeworld.grammar import parse_prompt
from nodes.backends.shapeworld.instructions import Add, Draw, parse_instruction
from nodes.backends.shapeworld.layout import Region, group_regions, layout_scene
from nodes.backends.shapeworld.render import Scene, render
from nodes.backends.shapeworld.seeding import rng_for
from nodes.backends.shapeworld.spec import PromptParseError, Relation, SceneSpec

_LAYOUT_RE = re.compile(r"\blayout\s*:", re.IGNORECASE)
_BLUEPRINT_RE = re.compile(r"^\s*blueprint\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class DrawingTarget:
    spec: SceneSpec
    region: Region | None = None
    """Where the whole drawing should go ("Draw ... on the left"); None = anywhere."""
    blueprint: bool = False
    """The prompt came with a planner's layout."""


def read_drawing_prompt(text: str) -> DrawingTarget:
    """Read any of the three prompt forms; raise PromptParseError when none fits."""
    body, blueprint = text, False
    parts = _LAYOUT_RE.split(text, maxsplit=1)
    if len(parts) == 2:
        body, blueprint = parts[0], True
    body = _BLUEPRINT_RE.sub("", body)
    first_sentence = next((s for s in re.split(r"[.!?\n]", body) if s.strip()), body)
    error: PromptParseError | None = None
    for candidate in dict.fromkeys((body, first_sentence)):
        try:
            return DrawingTarget(parse_prompt(candidate), None, blueprint)
        except PromptParseError as e:
            error = error or e
        try:
            instruction = parse_instruction(candidate)
        except PromptParseError:
            continue
        if isinstance(instruction, Draw):
            return DrawingTarget(instruction.spec, instruction.region, blueprint)
        if isinstance(instruction, Add):
            return DrawingTarget(SceneSpec((instruction.group,)), instruction.anchor.region)
    assert error is not None
    raise error


def scene_for(
    plan: DrawPlan,
    region: Region | None,
    width: int,
    height: int,
    rng: random.Random,
    config: ShapeWorldConfig,
) -> Scene:
    """Lay out the plan's groups (skipping left-out ones), honouring its (possibly wrong)
    relations; groups without a relation go to the requested region."""
    regions = group_regions(SceneSpec(tuple(plan.groups), tuple(plan.relations)))
    regions = [r if r is not None else region for r in regions]
    kept = [i for i, g in enumerate(plan.groups) if g.count > 0]
    index = {old: new for new, old in enumerate(kept)}
    relations = tuple(
        Relation(index[r.subject], r.relation, index[r.object])
        for r in plan.relations
        if r.subject in index and r.object in index
    )
    spec = SceneSpec(tuple(plan.groups[i] for i in kept), relations)
    scale = min(width, height) / 256
    return layout_scene(
        spec,
        width,
        height,
        rng,
        gap=max(2, round(config.gap * scale)),
        regions=[regions[i] for i in kept],
        size_bounds=(config.size_min, config.size_max),
        threshold=config.position_threshold,
    )


class ShapeWorldGenerator:
    def __init__(
        self, config: ShapeWorldConfig | None = None, model_id: str = "shapeworld-generator"
    ):
        self.config = config or ShapeWorldConfig()
        self.model_id = model_id

    async def generate(self, request: ImageRequest) -> Image.Image:
        return self.generate_sync(request)

    def generate_sync(self, request: ImageRequest) -> Image.Image:
        try:
            target = read_drawing_prompt(request.prompt)
        except PromptParseError as error:
            raise BackendError(
                f"{self.model_id} cannot draw {request.prompt!r}: {error}"
            ) from error
        rng = rng_for(request.seed, "generate", request.prompt, f"{request.width}x{request.height}")
        plan = plan_drawing(target.spec, rng, self.config, target.blueprint)
        scene = scene_for(plan, target.region, request.width, request.height, rng, self.config)
        return render(scene)
