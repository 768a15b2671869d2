"""Plain job types of Atelier's image engine (no torch: shared by the engine, the in-process
backend and the ``image`` server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

from nodes.backends.base import BackendError


class ImageUnsupported(BackendError, ValueError):
    """The loaded model cannot do that (e.g. generate with an edit-only model): HTTP 400."""


@dataclass(frozen=True)
class ImageJob:
    kind: Literal["generate", "edit"]
    prompt: str
    size: tuple[int, int]
    """(width, height) of the image to return."""
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    image: Image.Image | None = None
    """The image to edit (edits only)."""
    traced: bool = False
    """Sample with the Flow-GRPO SDE sampler and answer the image with its transitions
    (``nodes.backends.flow.transitions.TracedImage``) instead of the image alone."""
    noise_level: float | None = None
    """The SDE's noise level of a traced job (None: the sampler's default)."""

    def group_key(self) -> tuple[object, ...]:
        """Jobs with equal keys run in one pipeline (or traced sampler) call."""
        return (
            self.kind, self.size, self.steps, self.guidance_scale, self.negative_prompt,
            self.traced, self.noise_level,
        )  # fmt: skip
