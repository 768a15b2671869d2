"""The reasoner's state: typed, serialisable, pixel-free.

Every field survives ``model_dump(mode="json")`` and back, so any step can be stored, replayed
and forked. Images are sha256 references into an image store. List fields that grow (images,
reflections, decisions) use an append reducer: a node returns only its new items.

This module is the graph's shared vocabulary: nodes import it, so it imports nothing of
Atelier's but the text formats.
"""

from __future__ import annotations

import operator
import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nodes.formats import SubTask

MAX_PROMPT_CHARS = 4000
"""Longest prompt accepted. Text models have finite context; a clear error beats truncation."""

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""C0 control characters other than tab and newlines (and DEL)."""


class Mode(str, Enum):
    DIRECT = "direct"
    REFLECT = "reflect"
    DECOMPOSE = "decompose"


class StopReason(str, Enum):
    DONE = "done"
    """Direct mode: one image, nothing more to do."""
    ACCEPTED = "accepted"
    """The stop policy accepted the image after a reflection."""
    BUDGET = "budget"
    """The round or image budget ran out."""
    ERROR = "error"
    """A node failed; ``ReasonerState.error`` says why."""


class Budget(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_rounds: int = Field(4, ge=0, le=64)
    """Most correction rounds (reflect → refine). R3 evaluates with 4; gains saturate at 4–5."""
    max_images: int = Field(12, ge=1, le=256)
    """Most images one trajectory may produce (draws + edits)."""


class Task(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str
    input_images: tuple[str, ...] = ()
    """References of input images (editing tasks); not used by ShapeWorld."""
    group_id: str = ""
    """Trajectories of one prompt sampled together form a GRPO group."""
    sample_index: int = Field(0, ge=0)
    seed: int = 0
    category: str | None = None
    """Optional label (e.g. a ShapeWorld category) for reporting."""

    @field_validator("prompt")
    @classmethod
    def _prompt_is_usable(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
            )
        bad = _CONTROL_RE.search(prompt)
        if bad:
            # NUL cannot even be stored by PostgreSQL; the others are never meant as text.
            raise ValueError(f"prompt contains the control character {bad.group()!r}")
        return prompt


class ImageRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    ref: str
    """sha256 of the PNG bytes in the image store."""
    node: str
    """The node that made it (draw, refine, ...)."""
    instruction: str
    """The text it was made from: a blueprint, a sub-task, an edit instruction."""
    score: float | None = None
    """The judge's V against the task prompt, when the graph scores every image."""


class Reflection(BaseModel):
    model_config = ConfigDict(frozen=True)

    image_index: int
    """Position in ``ReasonerState.images`` of the image reflected on."""
    image_ref: str
    target: str
    """The text the image was checked against (the prompt, or a sub-task's expectation)."""
    text: str
    thought: str
    instruction: str
    stop_phrase: bool
    """The model said "No further edit needed"."""
    well_formed: bool
    accept: bool
    """The stop policy's decision: True = stop correcting this image."""


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["mode", "stop"]
    action: str
    log_prob: float
    policy: str
    version: str
    step: int
    """The state's step counter when the decision was taken."""


class FinalJudgement(BaseModel):
    """The judge's verdict on the trajectory's final image (the stop node asks for it), kept in
    the state; a backend's verdict on any image is ``nodes.backends.base.Judgement``."""

    model_config = ConfigDict(frozen=True)

    score: float
    correct: bool
    criteria: dict[str, bool] = {}
    model: str = ""


class ReasonerState(BaseModel):
    """State of one trajectory. Subclass it to add fields for your own nodes."""

    trajectory_id: str = ""
    task: Task
    budget: Budget = Budget()
    mode: Mode | None = None
    blueprint: str | None = None
    subtasks: list[SubTask] = []
    subtasks_well_formed: bool | None = None
    subtasks_done: int = 0
    """Sub-tasks whose instruction has been drawn or edited in (decompose mode)."""
    images: Annotated[list[ImageRecord], operator.add] = []
    reflections: Annotated[list[Reflection], operator.add] = []
    decisions: Annotated[list[Decision], operator.add] = []
    rounds: int = 0
    """Correction rounds used (edits made, or reflections retried, in answer to a reflection)."""
    step_count: int = 0
    """Node steps taken so far; the recording wrapper increments it."""
    stop_reason: StopReason | None = None
    error: str | None = None
    final_image: str | None = None
    judgement: FinalJudgement | None = None

    @property
    def current_image(self) -> ImageRecord | None:
        return self.images[-1] if self.images else None

    @property
    def image_budget_left(self) -> bool:
        return len(self.images) < self.budget.max_images

    @property
    def correction_budget_left(self) -> bool:
        return self.rounds < self.budget.max_rounds and self.image_budget_left
