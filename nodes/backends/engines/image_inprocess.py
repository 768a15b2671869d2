"""In-process image models: ``ImageService`` (engine + dynamic batcher) and
``InProcessImageModel`` (an :class:`~nodes.backends.base.ImageGenerator` and
:class:`~nodes.backends.base.ImageEditor` without HTTP; the ``image`` server wraps the same
service). diffusers is imported only when a service is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from nodes.backends.base import EditRequest, ImageRequest
from nodes.backends.engines.batching import DynamicBatcher, model_batcher
from nodes.backends.image_types import ImageJob


class ImageService:
    """One loaded image model (generation and/or editing) served in dynamic batches."""

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int = 4,
        max_wait_ms: float = 10.0,
        torch_threads: int | None = None,
    ) -> None:
        self.engine = engine
        self.batcher: DynamicBatcher[ImageJob, Image.Image] = model_batcher(
            engine.run_batch,
            name="atelier-image",
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            torch_threads=torch_threads,
        )

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
        max_batch: int = 4,
        max_wait_ms: float = 10.0,
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

    @property
    def name(self) -> str:
        return str(self.engine.name)

    async def run(self, job: ImageJob) -> Image.Image:
        return await self.batcher.submit(job)

    async def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load a diffusion LoRA between batches (the model's worker thread)."""
        await self.batcher.run_exclusive(_load_adapter, self.engine, name, path, inplace)

    async def unload_adapter(self, name: str) -> None:
        await self.batcher.run_exclusive(self.engine.unload_adapter, name)

    async def run_traced(self, job: ImageJob, noise_level: float | None = None) -> Any:
        """The image with its Flow-GRPO transitions (one job, between batches)."""
        return await self.batcher.run_exclusive(self.engine.run_traced, job, noise_level)

    def stats(self) -> dict[str, Any]:
        return {
            "adapters": list(getattr(self.engine, "adapters", {})),
            "model": self.name,
            "generate": bool(self.engine.can_generate),
            "edit": bool(self.engine.can_edit),
            **self.batcher.stats(),
        }

    def close(self) -> None:
        self.batcher.close()


def _load_adapter(engine: Any, name: str, path: str, inplace: bool) -> None:
    engine.load_adapter(name, path, inplace=inplace)


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
