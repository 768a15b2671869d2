"""In-process image models: ``ImageService`` (a
:class:`~nodes.backends.engines.service.ModelService` around a diffusers engine) and
``InProcessImageModel`` (an :class:`~nodes.backends.base.ImageGenerator` and
:class:`~nodes.backends.base.ImageEditor` without HTTP; the ``image`` server wraps the same
service). diffusers is imported only when a service is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from nodes.backends.base import EditRequest, ImageRequest
from nodes.backends.engines.service import ModelService
from nodes.backends.image_types import ImageJob


class ImageService(ModelService[ImageJob, Any]):
    """One loaded image model (generation and/or editing: a
    :class:`~nodes.backends.engines.diffusers_image.DiffusersImageEngine`) in dynamic batches.
    A job answers an image, or for a traced job (``ImageJob.traced``) a
    :class:`~nodes.backends.flow.transitions.TracedImage`."""

    MAX_BATCH = 4
    MAX_WAIT_MS = 10.0
    THREAD_NAME = "atelier-image"

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None,
        *,
        edit_model_dir: str | Path | None = None,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        default_steps: int | None = None,
        max_batch: int | None = None,
        max_wait_ms: float | None = None,
        torch_threads: int | None = None,
    ) -> ImageService:
        from nodes.backends.engines.diffusers_image import DiffusersImageEngine

        engine = DiffusersImageEngine(
            model_dir,
            edit_model_dir=edit_model_dir,
            name=name,
            device=device,
            dtype=dtype,
            default_steps=default_steps,
        )
        return cls(
            engine, max_batch=max_batch, max_wait_ms=max_wait_ms, torch_threads=torch_threads
        )

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "generate": bool(self.engine.can_generate),
            "edit": bool(self.engine.can_edit),
        }


class InProcessImageModel:
    """Generates and edits in this process. ``edit`` keeps the input image's size."""

    def __init__(self, service: ImageService) -> None:
        self.service = service

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None, **kwargs: Any) -> InProcessImageModel:
        return cls(ImageService.from_pretrained(model_dir, **kwargs))

    @property
    def model_id(self) -> str:
        return self.service.name

    async def generate(self, request: ImageRequest) -> Image.Image:
        return await self.service.run(
            ImageJob(
                "generate",
                request.prompt,
                (request.width, request.height),
                seed=request.seed,
                steps=request.steps,
            )
        )

    async def edit(self, request: EditRequest) -> Image.Image:
        return await self.service.run(
            ImageJob(
                "edit",
                request.instruction,
                request.image.size,
                seed=request.seed,
                steps=request.steps,
                image=request.image,
            )
        )
