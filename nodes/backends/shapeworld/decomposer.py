"""ShapeWorld's decomposer: prompt -> ordered sub-tasks, one object group per step.

Step 1 draws the first group (in the part of the canvas the full layout gives it, so later groups
have room on the right side of it); each later step adds one group, placed relative to the group
before it when the prompt relates them. Each step's ``expect`` is the cumulative description the
image should satisfy after it, so it can be checked and reflected on like a prompt::

    "two red circles above three blue squares" ->
      1. Draw two red circles at the top.                  expect: two red circles
      2. Add three blue squares below the red circles.     expect: two red circles above three
                                                                   blue squares

A prompt outside the grammar becomes a single step whose instruction is the prompt itself (the
generator will then report why it cannot draw it).
"""

from __future__ import annotations

from nodes.backends.base import ChatRequest, TextCompletion
from nodes.backends.shapeworld.grammar import parse_prompt
from nodes.backends.shapeworld.instructions import (
    Add,
    Anchor,
    Draw,
    Selector,
    format_instruction,
)
from nodes.backends.shapeworld.layout import group_regions
from nodes.backends.shapeworld.planner import prompt_of
from nodes.backends.shapeworld.spec import PromptParseError, SceneSpec, describe
from nodes.backends.shapeworld.vocab import INVERSE_RELATION
from nodes.formats import SubTask, format_subtasks


def decompose(spec: SceneSpec) -> list[SubTask]:
    steps = []
    first_region = group_regions(spec)[0]
    for i, group in enumerate(spec.groups):
        so_far = SceneSpec(spec.groups[: i + 1], tuple(r for r in spec.relations if r.object <= i))
        if i == 0:
            instruction = Draw(SceneSpec((group,)), first_region)
        else:
            relation = spec.relation_between(i - 1, i)
            previous = spec.groups[i - 1]
            anchor = (
                Anchor(
                    INVERSE_RELATION[relation],
                    Selector(previous.shape, previous.colour, plural=previous.count > 1),
                )
                if relation
                else Anchor()
            )
            instruction = Add(group, anchor)
        steps.append(SubTask(format_instruction(instruction), describe(so_far)))
    return steps


class ShapeWorldDecomposer:
    def __init__(self, model_id: str = "shapeworld-decomposer"):
        self.model_id = model_id

    async def chat(self, request: ChatRequest) -> TextCompletion:
        prompt = prompt_of(request)
        try:
            steps = decompose(parse_prompt(prompt))
        except PromptParseError:
            steps = [SubTask(prompt, prompt)]
        return TextCompletion(text=format_subtasks(steps), model=self.model_id)
