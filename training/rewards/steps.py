"""What a stored trajectory's steps say, read once for the per-step rewards.

:func:`trace` turns a ``TrajectoryDetail`` into its images (in order, each with the judge score
the graph recorded, and whether it was a correction of a reflection) and its intermediate texts
(each with its step, and for a reflection the image it looked at and the target it checked
against). :class:`ImageScores` gives V of an image against a text: the score the graph stored
when the text is the task prompt (the graph scores every image against the prompt), else the
judge's, called once per (image, text) and cached.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodes.backends.base import BackendError
from nodes.backends.protocols import ANALYZED_NODES

if TYPE_CHECKING:
    from nodes.backends.base import Judge
    from storage.images import ImageStore
    from storage.records import StepInfo, TrajectoryDetail

FINISHED = ("succeeded", "failed")
"""Trajectories whose rewards are final (a running or incomplete one may still change)."""

STORED = "stored"
"""``v_source`` of a V the graph recorded with the image (``ImageRecord.score``)."""


@dataclass(frozen=True)
class MadeImage:
    index: int
    """Position in the state's ``images`` (what ``Reflection.image_index`` refers to)."""
    ref: str
    node: str
    instruction: str
    score: float | None
    """The judge's V against the task prompt as the graph recorded it (None: not scored)."""
    seq: int | None
    """The step that made it (None: inherited from before the trajectory's first step)."""
    correction: bool
    """Made by a refine answering a reflection (not carrying out a sub-task)."""


@dataclass(frozen=True)
class TextOutput:
    """An intermediate text: a blueprint, a decomposition or a reflection."""

    seq: int
    node: str
    text: str
    image_index: int | None = None
    """Reflections: the image reflected on."""
    target: str | None = None
    """Reflections: what the image was checked against (the prompt or a sub-task's expect)."""
    stop_phrase: bool = False
    well_formed: bool = False
    correction: MadeImage | None = None
    """Reflections: the image the next step made by carrying out this reflection's edit."""


@dataclass(frozen=True)
class TrajectoryTrace:
    trajectory_id: str
    prompt: str
    images: tuple[MadeImage, ...]
    texts: tuple[TextOutput, ...]

    def first_image_after(self, seq: int) -> MadeImage | None:
        """The first image made by a step after ``seq`` (R3's I_1 after the blueprint)."""
        return next((i for i in self.images if i.seq is not None and i.seq > seq), None)


def _text_of(step: StepInfo) -> str | None:
    for generation in step.generations:
        if generation.position == 0:
            return generation.text
    return step.text


def trace(detail: TrajectoryDetail, nodes: Sequence[str] = ANALYZED_NODES) -> TrajectoryTrace:
    """The images and the intermediate texts (of ``nodes``) of a stored trajectory."""
    steps = sorted(detail.steps, key=lambda s: s.seq)
    inherited = (steps[0].state_before.get("images") or []) if steps else []
    images = [_image(i, raw, None, False) for i, raw in enumerate(inherited)]
    made_by: dict[int, list[MadeImage]] = {}
    for step in steps:
        correction = step.node == "refine" and "rounds" in step.update
        for raw in step.update.get("images") or ():
            image = _image(len(images), raw, step.seq, correction)
            images.append(image)
            made_by.setdefault(step.seq, []).append(image)
    texts = []
    for index, step in enumerate(steps):
        if step.node not in nodes:
            continue
        reflections = step.update.get("reflections") or ()
        if step.node == "reflect":
            if not reflections:  # it failed before reflecting: no text to score
                continue
            reflection = reflections[0]
            following = steps[index + 1] if index + 1 < len(steps) else None
            made = made_by.get(following.seq, []) if following is not None else []
            correction = made[0] if made and made[0].correction else None
            texts.append(
                TextOutput(
                    step.seq,
                    step.node,
                    reflection["text"],
                    int(reflection["image_index"]),
                    reflection["target"],
                    bool(reflection["stop_phrase"]),
                    bool(reflection["well_formed"]),
                    correction,
                )
            )
            continue
        text = _text_of(step)
        if text is not None and step.error is None:
            texts.append(TextOutput(step.seq, step.node, text))
    return TrajectoryTrace(detail.id, detail.prompt, tuple(images), tuple(texts))


def _image(index: int, raw: dict[str, Any], seq: int | None, correction: bool) -> MadeImage:
    score = raw.get("score")
    return MadeImage(
        index,
        raw["ref"],
        raw.get("node", ""),
        raw.get("instruction", ""),
        None if score is None else float(score),
        seq,
        correction,
    )


class ImageScores:
    """V of (image, text): stored when the text is the prompt and the graph scored the image,
    else ``judge``'s (``None``: such a V raises ``ValueError``). Cached per (image, text)."""

    def __init__(self, images: ImageStore, judge: Judge | None = None) -> None:
        self.images = images
        self.judge = judge
        self._known: dict[tuple[str, str], tuple[float, str]] = {}

    def remember(self, traces: Iterable[TrajectoryTrace]) -> None:
        """Note the scores the graph stored with each trace's images (against its prompt)."""
        for found in traces:
            for image in found.images:
                if image.score is not None:
                    self._known.setdefault((image.ref, found.prompt), (image.score, STORED))

    def known(self, ref: str, text: str) -> tuple[float, str] | None:
        return self._known.get((ref, text))

    async def score(self, ref: str, text: str) -> tuple[float, str]:
        """(V, where it came from: :data:`STORED` or ``judge:<model id>``)."""
        found = self._known.get((ref, text))
        if found is not None:
            return found
        if self.judge is None:
            raise ValueError(
                f"V of image {ref[:12]} against {text!r} is not stored (the graph scores images "
                "against the task prompt only, and only with GraphSettings.score_images); pass "
                "a judge to compute it"
            )
        try:
            verdict = await self.judge.judge(self.images.get(ref), text)
        except BackendError:
            # The text is no description a judge can read (a learned decomposer's garbled
            # sub-task target): no image can match it, V = 0, and the source says why.
            found = (0.0, f"judge:{self.judge.model_id}:unreadable")
        else:
            found = (float(verdict.score), f"judge:{self.judge.model_id}")
        self._known[(ref, text)] = found
        return found
