"""ShapeWorld's planner (the reason/plan role): prompt -> a blueprint the generator reads.

The blueprint is the canonical description plus an explicit layout, e.g.
``Blueprint: two red circles above three blue squares. Layout: the red circles at the top; the
blue squares at the bottom; no two shapes touch.`` The generator reads the description and
counts the layout as reasoning (a slightly lower error hazard). Deterministic: a plan does not
depend on the seed. A prompt outside the grammar is returned unchanged, so the generator reports
the parse error itself.
"""

from __future__ import annotations

from nodes.backends.base import ChatRequest, TextCompletion
from nodes.backends.shapeworld.grammar import parse_prompt
from nodes.backends.shapeworld.instructions import region_phrase
from nodes.backends.shapeworld.layout import group_regions
from nodes.backends.shapeworld.spec import (
    PromptParseError,
    SceneSpec,
    describe,
    reference_phrase,
)


def blueprint(spec: SceneSpec) -> str:
    parts = [
        f"{reference_phrase(g.colour, g.shape, g.count)} "
        f"{region_phrase(region) if region else 'anywhere on the canvas'}"
        for g, region in zip(spec.groups, group_regions(spec), strict=True)
    ]
    return f"Blueprint: {describe(spec)}. Layout: {'; '.join(parts)}; no two shapes touch."


def prompt_of(request: ChatRequest) -> str:
    """The user's prompt: ``fields["prompt"]``, else the last user message's text."""
    if request.fields.get("prompt"):
        return request.fields["prompt"]
    for message in reversed(request.messages):
        if message.role == "user":
            return message.text
    return ""


class ShapeWorldPlanner:
    def __init__(self, model_id: str = "shapeworld-planner"):
        self.model_id = model_id

    async def chat(self, request: ChatRequest) -> TextCompletion:
        prompt = prompt_of(request)
        try:
            text = blueprint(parse_prompt(prompt))
        except PromptParseError:
            text = prompt
        return TextCompletion(text=text, model=self.model_id)
