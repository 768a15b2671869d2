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
    ESCALATE = "escalate"
    """SAIR's data pipeline as one trajectory: direct, then reflect for up to
    ``Budget.escalate_rounds`` rounds, then decompose from a fresh canvas if the reflector still
    rejects the image. ``ReasonerState.stage`` says which of the three paths runs now. A fixed
    mode (``--mode escalate``), never one the learned router samples."""


STAGES: tuple[Mode, ...] = (Mode.DIRECT, Mode.REFLECT, Mode.DECOMPOSE)
"""The stages of escalate mode, in the order it escalates through them."""


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
    escalate_rounds: int = Field(3, ge=0, le=64)
    """Escalate mode: correction rounds of its reflect stage before it decomposes (SAIR
    uses 3), also capped by ``max_rounds``. Its decompose stage has ``max_rounds`` of its own."""


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
    """The model said "No further edit needed": its answer, its first or its last sentence is
    the stop phrase (``nodes.formats.says_stop``, the one rule for every caller)."""
    well_formed: bool
    accept: bool
    """The stop policy's decision: True = stop correcting this image."""


class StageStart(BaseModel):
    """Where one stage of an escalate trajectory begins: what belongs to it is everything from
    here to the next stage's start."""

    model_config = ConfigDict(frozen=True)

    stage: Mode
    step: int
    """``step_count`` of the stage's first step (the stage's steps are those from here on)."""
    image_index: int
    """Position in ``ReasonerState.images`` of the stage's first image (earlier ones are
    context: the failed attempts of earlier stages)."""
    reflection_index: int
    """Position in ``ReasonerState.reflections`` of the stage's first reflection."""


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
    stage: Mode | None = None
    """Escalate mode only: the path running now (direct, reflect or decompose); None otherwise.
    A step belongs to the stage its ``state_before`` names (``plan`` opens the first stage);
    the reflection whose verdict escalates switches it, so the next step is the new stage's."""
    stages: list[StageStart] = []
    """Escalate mode only: every stage begun so far, in order (the last is ``stage``). A plain
    field, replaced whole by the node that opens a stage (not appended by a reducer, so stored
    states replay as before)."""
    blueprint: str | None = None
    subtasks: list[SubTask] = []
    subtasks_well_formed: bool | None = None
    subtasks_done: int = 0
    """Sub-tasks whose instruction has been drawn or edited in (decompose mode)."""
    images: Annotated[list[ImageRecord], operator.add] = []
    reflections: Annotated[list[Reflection], operator.add] = []
    decisions: Annotated[list[Decision], operator.add] = []
    rounds: int = 0
    """Correction rounds used (edits made, or reflections retried, in answer to a reflection);
    in escalate mode, within the current stage (the decompose stage starts again from 0)."""
    step_count: int = 0
    """Node steps taken so far; the recording wrapper increments it."""
    stop_reason: StopReason | None = None
    error: str | None = None
    final_image: str | None = None
    judgement: FinalJudgement | None = None

    @field_validator("stage")
    @classmethod
    def _stage_is_a_path(cls, stage: Mode | None) -> Mode | None:
        if stage is not None and stage not in STAGES:
            raise ValueError("escalate is a mode, not a stage: one of direct, reflect, decompose")
        return stage

    @property
    def current_image(self) -> ImageRecord | None:
        return self.images[-1] if self.images else None

    @property
    def image_budget_left(self) -> bool:
        return len(self.images) < self.budget.max_images

    @property
    def path(self) -> Mode | None:
        """The path the graph follows now: the mode, or in escalate mode the current stage."""
        return self.stage if self.mode == Mode.ESCALATE else self.mode

    @property
    def round_limit(self) -> int:
        """Correction rounds the current path may use: ``max_rounds``, or before escalate
        mode's decompose stage, ``min(max_rounds, escalate_rounds)``."""
        if self.mode == Mode.ESCALATE and self.stage != Mode.DECOMPOSE:
            return min(self.budget.max_rounds, self.budget.escalate_rounds)
        return self.budget.max_rounds

    @property
    def correction_budget_left(self) -> bool:
        return self.rounds < self.round_limit and self.image_budget_left
