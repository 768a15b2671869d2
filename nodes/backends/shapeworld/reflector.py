"""ShapeWorld's reflection model (R3's reflect role), reasoning from the pixels it is shown.

It reads the target from ``request.fields["target"]`` (the user prompt or a decomposition step's
``expect``) and the image from the last message's last image, detects the shapes, and answers in
R3's format: ``<think>The target description is: .... The current image shows: .... ...</think>``
then the stop phrase, or exactly one edit instruction fixing the most important discrepancy (see
``corrections``).

Noise, all configurable: it sometimes miscounts a big group by one, overlooks every problem (says
stop), asks for an edit on a matching image, gets the instruction slightly wrong (more often when
the image has many problems), or breaks the output format -- so the graph's
handling of each of these is exercised for real.
"""

from __future__ import annotations

import random
from dataclasses import replace

from PIL import Image

from nodes.backends.base import BackendError, ChatRequest, TextCompletion
from nodes.backends.shapeworld.checker import detect_objects, read_target
from nodes.backends.shapeworld.config import ShapeWorldConfig
from nodes.backends.shapeworld.corrections import (
    Discrepancy,
    discrepancies,
    relation_summary,
    size_summary,
)
from nodes.backends.shapeworld.detect import DetectedObject
from nodes.backends.shapeworld.evaluate import members, summarise
from nodes.backends.shapeworld.instructions import (
    Add,
    Anchor,
    Instruction,
    Move,
    Recolour,
    Remove,
    Resize,
    format_instruction,
)
from nodes.backends.shapeworld.seeding import image_digest, rng_for
from nodes.backends.shapeworld.spec import PromptParseError, SceneSpec, shape_word
from nodes.backends.shapeworld.vocab import COLOURS, MAX_COUNT
from nodes.formats import STOP_PHRASE, format_reflection

_PERPENDICULAR = {
    "left of": "above",
    "right of": "below",
    "above": "right of",
    "below": "left of",
    "next to": "above",
}


def last_image(request: ChatRequest) -> Image.Image:
    for message in reversed(request.messages):
        if message.images:
            return message.images[-1]
    raise BackendError("the reflector needs an image in the conversation")


class ShapeWorldReflector:
    def __init__(
        self, config: ShapeWorldConfig | None = None, model_id: str = "shapeworld-reflector"
    ):
        self.config = config or ShapeWorldConfig()
        self.model_id = model_id

    async def chat(self, request: ChatRequest) -> TextCompletion:
        target = request.fields.get("target") or request.fields.get("prompt")
        if not target:
            raise BackendError(f"{self.model_id} needs fields['target'] (the text to check)")
        text = self.reflect(target, last_image(request), request.sampling.seed)
        return TextCompletion(text=text, model=self.model_id)

    def reflect(self, target: str, image: Image.Image, seed: int | None = 0) -> str:
        rng = rng_for(seed, "reflect", target, image_digest(image))
        described = target.strip().rstrip(".")
        try:
            spec = read_target(target)
        except PromptParseError:
            thought = f"The target description is: {described}. I cannot relate it to shapes."
            return self._emit(thought, None, rng)
        objects = self._perceive(spec, detect_objects(image, self.config), rng)
        threshold, side = self.config.position_threshold, min(image.size)
        shows = "; ".join(
            [
                summarise(objects),
                *size_summary(spec, objects, side),
                *relation_summary(spec, objects, threshold),
            ]
        )
        thought = f"The target description is: {described}. The current image shows: {shows}."
        issues = discrepancies(spec, objects, threshold, canvas_side=side)
        if issues and rng.random() < self.config.reflector_miss_rate:
            issues = []
        elif not issues and rng.random() < self.config.reflector_false_alarm_rate:
            group = spec.groups[0]
            noun = " ".join(w for w in (group.colour, shape_word(group.shape, 2)) if w)
            issues = [Discrepancy(f"There should be more {noun}.", Add(replace(group, count=1)))]
        if not issues:
            return self._emit(f"{thought} The image matches the target description.", None, rng)
        fix = issues[0].fix
        confusion = self.config.reflector_confusion_rate * (len(issues) - 1)
        if rng.random() < self.config.reflector_off_rate + confusion:
            fix = _slightly_off(fix, rng)
        reasons = " ".join(issue.explanation for issue in issues)
        return self._emit(f"{thought} {reasons}", format_instruction(fix), rng)

    def _perceive(
        self, spec: SceneSpec, objects: list[DetectedObject], rng: random.Random
    ) -> list[DetectedObject]:
        """What the reflector believes it sees: the detections, except that a big group is now
        and then counted one short or one over."""
        seen = list(objects)
        for group in spec.groups:
            mine = members(group, seen)
            if rng.random() < self.config.reflector_count_noise * max(0, len(mine) - 3):
                victim = rng.choice(mine)
                if rng.random() < 0.5:
                    seen.remove(victim)
                else:
                    seen.append(victim)
        return seen

    def _emit(self, thought: str, instruction: str | None, rng: random.Random) -> str:
        if rng.random() >= self.config.reflector_malformed_rate:
            return format_reflection(thought, instruction)
        tail = f"{STOP_PHRASE}." if instruction is None else instruction
        # The ways real models break R3's format; parse_reflection flags each as not well-formed.
        return rng.choice(
            [
                f"<think>{thought}{tail}",  # never closes the think block
                tail,  # no think block
                f"<think></think>{tail}",  # empty reasoning
                f"<think>{thought}</think>{tail}\n{tail}",  # more than one line of instructions
            ]
        )


def _slightly_off(fix: Instruction, rng: random.Random) -> Instruction:
    """The right kind of edit with one detail wrong (a count, a colour, a size or a
    direction)."""
    if isinstance(fix, Add):
        group = fix.group
        if group.colour and rng.random() < 0.5:
            colour = rng.choice([c for c in COLOURS if c != group.colour])
            return replace(fix, group=replace(group, colour=colour))
        return replace(fix, group=replace(group, count=_other_count(group.count, rng)))
    if isinstance(fix, Remove):
        count = fix.target.count or 1
        return replace(fix, target=replace(fix.target, count=_other_count(count, rng)))
    if isinstance(fix, Recolour):
        return replace(fix, colour=rng.choice([c for c in COLOURS if c != fix.colour]))
    if isinstance(fix, Resize):
        return replace(fix, size="small" if fix.size == "big" else "big")
    if isinstance(fix, Move) and fix.anchor.relation:
        anchor = Anchor(_PERPENDICULAR[fix.anchor.relation], fix.anchor.reference)
        return replace(fix, anchor=anchor)
    return fix


def _other_count(count: int, rng: random.Random) -> int:
    if count <= 1:
        return 2
    return min(MAX_COUNT, count + rng.choice((-1, 1)))
