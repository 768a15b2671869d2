"""ShapeWorld's analyzer (SAIR's judge of intermediate texts), built on the checker.

Deterministic, and reading only what a judge could: the prompt, the text, and the image's
pixels. Each kind of text scores in [0, 1]:

- **plan** (a blueprint): 1 if its description parses to exactly the prompt's scene (the part
  the generator draws from; the layout is advisory), else 0.
- **reflect** (a reflection on an image, checked against its target): 0 when its verdict is
  wrong — the stop phrase on an image the checker fails, or an edit asked of an image the
  checker passes (a false alarm). On a failing image an instruction scores 1 when it is the fix
  of a real discrepancy (``corrections.discrepancies``, what the image really gets wrong),
  0.5 when it is none of those fixes but a flawless editor carrying it out raises the checker
  score (it helps, in other words than the fix), and 0 otherwise (unreadable, or it fixes
  nothing: a wrong count, colour or direction). The stop phrase on a passing image scores 1.
- **decompose** (sub-tasks as JSON): 0 unless the plan is well formed and the last step's
  expectation is the prompt's scene; then the share of *sound* steps. A step is sound when its
  expectation is the prompt's first k groups (with their relations) for a k larger than the
  step before's, and its instruction draws (first step) or adds exactly those new groups — an
  ``Add`` of one group placed as the prompt relates it to the group before, or a ``Draw`` of
  the new groups.

Format is not judged here: the format reward R_f does that. Only Pillow and numpy (no torch).
"""

from __future__ import annotations

from PIL import Image

from nodes.backends.protocols import Analysis
from nodes.backends.shapeworld.checker import ShapeWorldChecker, detect_objects, read_target
from nodes.backends.shapeworld.config import ShapeWorldConfig
from nodes.backends.shapeworld.corrections import discrepancies
from nodes.backends.shapeworld.editor import ShapeWorldEditor
from nodes.backends.shapeworld.generator import read_drawing_prompt
from nodes.backends.shapeworld.grammar import parse_prompt
from nodes.backends.shapeworld.instructions import (
    Add,
    Draw,
    Instruction,
    Selector,
    parse_instruction,
)
from nodes.backends.shapeworld.seeding import image_digest, rng_for
from nodes.backends.shapeworld.spec import PromptParseError, SceneSpec
from nodes.backends.shapeworld.vocab import INVERSE_RELATION
from nodes.formats import parse_reflection, parse_subtasks

HELPS = 0.5
"""Score of an instruction that is no discrepancy's fix but still raises the checker score."""


def prefix_scene(spec: SceneSpec, k: int) -> SceneSpec:
    """The scene of ``spec``'s first ``k`` groups with the relations among them."""
    return SceneSpec(spec.groups[:k], tuple(r for r in spec.relations if r.object < k))


def plan_score(prompt: str, text: str) -> Analysis:
    """1 if the blueprint's description is the prompt's scene, else 0."""
    try:
        wanted = parse_prompt(prompt)
    except PromptParseError:
        return Analysis(0.0, "the prompt is outside ShapeWorld's grammar")
    try:
        planned = read_drawing_prompt(text).spec
    except PromptParseError:
        return Analysis(0.0, "the blueprint describes no scene")
    if planned != wanted:
        return Analysis(0.0, "the blueprint describes another scene than the prompt")
    return Analysis(1.0, "the blueprint describes the prompt's scene")


def step_soundness(
    prompt: SceneSpec, instruction: str, expect: str, done: int
) -> tuple[bool, int, str]:
    """Whether one sub-task is sound after ``done`` of the prompt's groups, the groups done
    after it, and why not (see the module doc)."""
    try:
        expected = read_target(expect)
    except PromptParseError:
        return False, done, "its expectation is no scene"
    k = len(expected.groups)
    if k <= done or k > len(prompt.groups) or expected != prefix_scene(prompt, k):
        return False, done, "its expectation is not the prompt's next groups"
    try:
        parsed = parse_instruction(instruction)
    except PromptParseError:
        return False, done, "its instruction is unreadable"
    new = prompt.groups[done:k]
    if isinstance(parsed, Draw):
        ok = parsed.spec.groups == new and (done > 0 or parsed.spec == expected)
        return ok, k if ok else done, "" if ok else "it draws other groups"
    if isinstance(parsed, Add) and done > 0 and len(new) == 1:
        relation = prompt.relation_between(done - 1, done)
        before = prompt.groups[done - 1]
        placed = relation is None or (
            parsed.anchor.relation == INVERSE_RELATION[relation]
            and parsed.anchor.reference == Selector(before.shape, before.colour)
        )
        ok = parsed.group == new[0] and placed
        return ok, k if ok else done, "" if ok else "it adds another group or places it wrong"
    return False, done, "it neither draws nor adds the next groups"


def decomposition_score(prompt: str, text: str) -> Analysis:
    """0 unless well formed and ending on the prompt's scene; then the share of sound steps."""
    try:
        wanted = parse_prompt(prompt)
    except PromptParseError:
        return Analysis(0.0, "the prompt is outside ShapeWorld's grammar")
    steps, well_formed = parse_subtasks(text)
    if not well_formed:
        return Analysis(0.0, "the sub-tasks are not a well-formed plan")
    try:
        last = read_target(steps[-1].expect)
    except PromptParseError:
        last = None
    if last != wanted:
        return Analysis(0.0, "the last step does not expect the prompt's scene")
    parts, done, why = [], 0, []
    for index, step in enumerate(steps):
        sound, done, reason = step_soundness(wanted, step.instruction, step.expect, done)
        parts.append(1.0 if sound else 0.0)
        if not sound:
            why.append(f"step {index + 1}: {reason}")
    score = sum(parts) / len(parts)
    reason = "; ".join(why) or "every step adds the prompt's next groups"
    return Analysis(score, reason, tuple(parts))


class ShapeWorldAnalyzer:
    """The analyzer role in ShapeWorld (see the module doc). ``config`` should be the world's
    (the detector's tolerances and the relation margin are the checker's)."""

    def __init__(
        self, config: ShapeWorldConfig | None = None, model_id: str = "shapeworld-analyzer"
    ) -> None:
        self.config = config or ShapeWorldConfig()
        self.model_id = model_id
        self.checker = ShapeWorldChecker(self.config)
        # A flawless editor (same detection, no failure model): what an instruction would do.
        self.editor = ShapeWorldEditor(
            ShapeWorldConfig.noiseless(
                **self.config.model_dump(
                    include={
                        "size_min",
                        "size_max",
                        "gap",
                        "colour_tolerance",
                        "min_area",
                        "position_threshold",
                    }
                )
            )
        )

    async def analyze(
        self,
        prompt: str,
        node: str,
        text: str,
        image: Image.Image | None = None,
        *,
        target: str | None = None,
    ) -> Analysis:
        return self.analyze_sync(prompt, node, text, image, target=target)

    def analyze_sync(
        self,
        prompt: str,
        node: str,
        text: str,
        image: Image.Image | None = None,
        *,
        target: str | None = None,
    ) -> Analysis:
        if node == "plan":
            return plan_score(prompt, text)
        if node == "decompose":
            return decomposition_score(prompt, text)
        if node == "reflect":
            if image is None:
                raise ValueError("a reflection is analysed against the image it looked at")
            return self.reflection_score(target or prompt, text, image)
        raise ValueError(f"ShapeWorld's analyzer reads plan, decompose and reflect, not {node!r}")

    def reflection_score(self, target: str, text: str, image: Image.Image) -> Analysis:
        """Is the reflection's verdict on ``image`` right, and does its instruction fix a real
        discrepancy (see the module doc)?"""
        try:
            spec = read_target(target)
        except PromptParseError:
            return Analysis(0.0, "the target is outside ShapeWorld's grammar")
        image = image.convert("RGB")
        before = self.checker.judge_sync(image, target)
        reflection = parse_reflection(text)
        if before.correct:
            if reflection.stop:
                return Analysis(1.0, "stopped on an image that matches the target")
            return Analysis(0.0, "asked for an edit of an image that matches the target")
        if reflection.stop:
            return Analysis(0.0, "stopped on an image that does not match the target")
        try:
            instruction = parse_instruction(reflection.instruction)
        except PromptParseError:
            return Analysis(0.0, "the instruction is unreadable")
        objects = detect_objects(image, self.config)
        fixes = [
            d.fix
            for d in discrepancies(
                spec, objects, self.config.position_threshold, canvas_side=min(image.size)
            )
        ]
        if instruction in fixes:  # equal as edits (a selector's wording is not compared)
            return Analysis(1.0, "the instruction fixes a real discrepancy")
        if self._helps(image, instruction, target, text, before.score):
            return Analysis(HELPS, "the instruction is no discrepancy's fix but improves the image")
        return Analysis(0.0, "the instruction fixes no real discrepancy")

    def _helps(
        self, image: Image.Image, instruction: Instruction, target: str, text: str, score: float
    ) -> bool:
        """Would a flawless editor's result of ``instruction`` score higher? (Seeded by the
        text and the pixels, so the answer never changes.)"""
        rng = rng_for(0, "analyze", text, image_digest(image))
        edited = self.editor.apply(image, instruction, rng)
        return self.checker.judge_sync(edited, target).score > score
