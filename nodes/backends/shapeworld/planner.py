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
from nodes.backends.shapeworld.layout import Region, group_regions
from nodes.backends.shapeworld.spec import (
    Group,
    PromptParseError,
    SceneSpec,
    describe,
    reference_phrase,
    shape_word,
)
from nodes.backends.shapeworld.vocab import NEXT_TO


def blueprint(spec: SceneSpec) -> str:
    regions = group_regions(spec)
    parts = [
        f"{_sized_reference(g)} {_where(spec, i, r)}"
        for i, (g, r) in enumerate(zip(spec.groups, regions, strict=True))
    ]
    return f"Blueprint: {describe(spec)}. Layout: {'; '.join(parts)}; no two shapes touch."


def _sized_reference(group: Group) -> str:
    """'the red circles', 'the big red circle' (the size word is part of what to draw)."""
    words = ("the", group.size, group.colour, shape_word(group.shape, group.count))
    return " ".join(w for w in words if w)


def _where(spec: SceneSpec, index: int, region: Region | None) -> str:
    # A group next to the one before it is drawn flush beside it, not in its half of the canvas
    # (see layout_scene), so the blueprint says so.
    if index and spec.relation_between(index - 1, index) == NEXT_TO:
        previous = spec.groups[index - 1]
        return f"beside {reference_phrase(previous.colour, previous.shape, previous.count)}"
    return region_phrase(region) if region else "anywhere on the canvas"


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
