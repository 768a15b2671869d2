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

``ShapeWorldConfig.decomposer_merge_rate`` makes the plan coarser at random (seeded by the
request): the first two groups are drawn in one step ("Draw two red circles above three blue
squares."), one image fewer, at the generator's higher error rate for the larger scene. The
default 0 is the fixed one-group-per-step rule; a mixture gives a learned decomposer both
granularities to imitate, and GRPO the choice between them.
"""

from __future__ import annotations

from nodes.backends.base import ChatRequest, TextCompletion
from nodes.backends.shapeworld.config import ShapeWorldConfig
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
from nodes.backends.shapeworld.seeding import rng_for
from nodes.backends.shapeworld.spec import PromptParseError, SceneSpec, describe
from nodes.backends.shapeworld.vocab import INVERSE_RELATION
from nodes.formats import SubTask, format_subtasks


def decompose(spec: SceneSpec, first_groups: int = 1) -> list[SubTask]:
    """One step per group; with ``first_groups`` k > 1 the first step draws the first k groups
    (with their relations) at once, and each later group is added as usual."""
    if first_groups > 1:
        k = min(first_groups, len(spec.groups))
        head = SceneSpec(spec.groups[:k], tuple(r for r in spec.relations if r.object < k))
        merged = SubTask(format_instruction(Draw(head, None)), describe(head))
        return [merged, *decompose(spec)[k:]]
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
    def __init__(
        self, config: ShapeWorldConfig | None = None, model_id: str = "shapeworld-decomposer"
    ):
        self.config = config or ShapeWorldConfig()
        self.model_id = model_id

    async def chat(self, request: ChatRequest) -> TextCompletion:
        prompt = prompt_of(request)
        rate = self.config.decomposer_merge_rate
        merge = rate > 0 and rng_for(request.sampling.seed, "decompose", prompt).random() < rate
        try:
            steps = decompose(parse_prompt(prompt), first_groups=2 if merge else 1)
        except PromptParseError:
            steps = [SubTask(prompt, prompt)]
        return TextCompletion(text=format_subtasks(steps), model=self.model_id)
