"""``DiffusersImageEngine``: text-to-image and image editing with ``diffusers`` pipelines (the
engine behind the in-process image backend and ``atelier serve image``).

``model_dir`` is a saved pipeline (``model_index.json``). It serves generations when it is a
text-to-image pipeline, edits when it is an editing one (InstructPix2Pix, img2img, Kontext,
Qwen-Image-Edit, ... judged by the pipeline class name). ``edit_model_dir`` adds a separate
editing pipeline; without one, a text-to-image model edits through the image-to-image variant
of the same weights (``AutoPipelineForImage2Image.from_pipe``: no extra memory).

``run_batch`` groups jobs with the same kind, size, steps and guidance into one pipeline call,
with one seeded ``torch.Generator`` per image. Sizes are rounded up to what the pipeline accepts
and the result resized to exactly the requested size. Traced jobs (``ImageJob.traced``: the
server's ``return_transitions``) go, grouped the same way, to the Flow-GRPO sampler over the
same pipeline (:class:`~nodes.backends.engines.flow_image.FlowImageEngine`, SD3 and Flux).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nodes.backends.abandon import Abandoned, raise_if_abandoned
from nodes.backends.engines.transformers_lm import resolve_device, resolve_dtype
from nodes.backends.image_types import ImageJob, ImageUnsupported

log = logging.getLogger(__name__)

EDIT_PIPELINE_HINTS = ("Img2Img", "InstructPix2Pix", "Edit", "Kontext", "Inpaint", "ImageToImage")


def is_edit_pipeline(pipe: Any) -> bool:
    return any(hint in type(pipe).__name__ for hint in EDIT_PIPELINE_HINTS)


class DiffusersImageEngine:
    def __init__(
        self,
        model_dir: str | Path | None,
        *,
        edit_model_dir: str | Path | None = None,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        default_steps: int | None = None,
    ) -> None:
        from diffusers import DiffusionPipeline

        if model_dir is None and edit_model_dir is None:
            raise ValueError("an image engine needs a model directory")
        self.device = resolve_device(device)
        self.default_steps = default_steps
        kwargs: dict[str, Any] = {}
        torch_dtype = resolve_dtype(dtype)
        if torch_dtype != "auto":
            kwargs["torch_dtype"] = torch_dtype
        self.generator_pipe: Any = None
        self.edit_pipe: Any = None
        self.adapters: dict[str, str] = {}
        """Diffusion LoRA adapters loaded (name -> path); the last loaded is active."""
        self._peft_names: dict[str, str] = {}
        """Served name -> the adapter's name inside peft (``adapter<n>``)."""
        self._loads = 0
        self._traced: dict[str, Any] = {}
        """Kind ("generate" / "edit") -> the traced sampler over that kind's pipeline."""
        if model_dir is not None:
            from nodes.backends.engines.flow_image import absent_components  # e.g. SD3 without T5

            pipe = DiffusionPipeline.from_pretrained(
                str(model_dir), **kwargs, **absent_components(model_dir)
            )
            pipe = self._prepare(pipe)
            if is_edit_pipeline(pipe):
                self.edit_pipe = pipe
            else:
                self.generator_pipe = pipe
        if edit_model_dir is not None:
            self.edit_pipe = self._prepare(
                DiffusionPipeline.from_pretrained(str(edit_model_dir), **kwargs)
            )
        elif self.edit_pipe is None and self.generator_pipe is not None:
            try:
                from diffusers import AutoPipelineForImage2Image

                self.edit_pipe = self._prepare(
                    AutoPipelineForImage2Image.from_pipe(self.generator_pipe)
                )
            except (ValueError, KeyError) as error:  # no image-to-image variant
                log.warning("no edit pipeline for %s: %s", model_dir, error)
        self.name = name or str(model_dir or edit_model_dir)

    def _prepare(self, pipe: Any) -> Any:
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- diffusion LoRA adapters --------------------------------------------------------------

    def _policy_model(self) -> Any:
        pipe = self.generator_pipe or self.edit_pipe
        model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if model is None:
            raise ImageUnsupported(f"{self.name} has no transformer or UNet to put a LoRA on")
        return model

    def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load a diffusion LoRA (peft layout, ``policies.diffusion_lora``) and make it the one
        active adapter (the edit pipeline shares the weights, so it applies to edits too).

        The new adapter loads beside the active one, which is dropped only once the new one is
        in: a load that fails (a ``ValueError`` saying why) leaves the model exactly as it was.
        """
        from policies.diffusion_lora import AdapterError, load_lora

        model = self._policy_model()
        if name in self.adapters and not inplace:
            raise ValueError(f"the LoRA adapter {name!r} has already been loaded")
        self._loads += 1
        peft_name = f"adapter{self._loads}"  # peft names must be valid module keys
        previous = dict(self._peft_names)
        try:
            with warnings.catch_warnings():  # loading beside the active adapter is the point
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                warnings.filterwarnings("ignore", "Adapter .* was active", UserWarning)
                load_lora(model, path, adapter_name=peft_name)
        except Exception as error:  # AdapterError rolls back itself; anything else may not
            self._forget_peft_adapter(model, peft_name)
            for kept in previous.values():
                model.set_adapter(kept)
            if isinstance(error, AdapterError):
                raise ValueError(str(error)) from None
            raise ValueError(
                f"could not load LoRA adapter {name!r} from {path}: {type(error).__name__}: {error}"
            ) from None
        for old in previous.values():  # one active diffusion LoRA at a time
            self._forget_peft_adapter(model, old)
        self.adapters = {name: path}
        self._peft_names = {name: peft_name}
        for traced in self._traced.values():  # the transitions name the active adapter
            traced.sampler.lora = name

    @staticmethod
    def _forget_peft_adapter(model: Any, peft_name: str) -> None:
        if peft_name in (getattr(model, "peft_config", None) or {}):
            with warnings.catch_warnings():  # the active adapter is set explicitly after
                warnings.filterwarnings("ignore", "Adapter .* was active", UserWarning)
                model.delete_adapters(peft_name)

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"the LoRA adapter {name!r} is not loaded")
        self._forget_peft_adapter(self._policy_model(), self._peft_names.pop(name))
        del self.adapters[name]
        for traced in self._traced.values():
            traced.sampler.lora = None

    @staticmethod
    def batch_key(job: ImageJob) -> tuple[object, ...]:
        """Jobs that share a pipeline call (:class:`ModelService` batches them apart)."""
        return job.group_key()

    @property
    def can_generate(self) -> bool:
        return self.generator_pipe is not None

    @property
    def can_edit(self) -> bool:
        return self.edit_pipe is not None

    def run_batch(self, jobs: Sequence[ImageJob]) -> list[Image.Image | BaseException]:
        results: list[Image.Image | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, job in enumerate(jobs):
            if job.kind == "generate" and not self.can_generate:
                results[index] = ImageUnsupported(f"{self.name} cannot generate from text")
                continue
            if job.kind == "edit" and not self.can_edit:
                results[index] = ImageUnsupported(f"{self.name} cannot edit images")
                continue
            groups.setdefault(job.group_key(), []).append(index)
        for indices in groups.values():
            batch = [jobs[i] for i in indices]
            try:
                images = self._run_traced(batch) if batch[0].traced else self._run(batch)
            except Abandoned:
                raise  # nobody waits for any of this batch: stop now
            except Exception as error:
                log.exception("image batch of %d failed", len(batch))
                images = [error] * len(batch)
            for index, image in zip(indices, images, strict=True):
                results[index] = image
        return [r if r is not None else RuntimeError("job was not served") for r in results]

    def _run_traced(self, jobs: Sequence[ImageJob]) -> Sequence[Any]:
        """Traced jobs (one group) through the one traced-sampling path,
        :class:`~nodes.backends.engines.flow_image.FlowImageEngine`: each image with its
        Flow-GRPO transitions. Steps the request leaves open are this engine's
        ``default_steps``, anything else open the traced defaults."""
        from nodes.backends.engines.flow_image import FlowImageEngine, FlowJob

        kind = jobs[0].kind
        traced = self._traced.get(kind)
        if traced is None:
            pipe = self.generator_pipe if kind == "generate" else self.edit_pipe
            lora = next(iter(self.adapters), None)
            traced = self._traced[kind] = FlowImageEngine(pipe, name=self.name, lora=lora)
        return traced.run_batch(
            [
                FlowJob.of(
                    job.kind,
                    job.prompt,
                    job.size,
                    job.seed,
                    steps=job.steps or self.default_steps,
                    guidance_scale=job.guidance_scale,
                    negative_prompt=job.negative_prompt,
                    image=job.image,
                    noise_level=job.noise_level,
                )
                for job in jobs
            ]
        )

    @torch.inference_mode()
    def _run(self, jobs: Sequence[ImageJob]) -> list[Image.Image | BaseException]:
        first = jobs[0]
        pipe = self.generator_pipe if first.kind == "generate" else self.edit_pipe
        params = inspect.signature(pipe.__call__).parameters
        width, height = first.size
        multiple = _size_multiple(pipe)
        run_w, run_h = _round_up(width, multiple), _round_up(height, multiple)
        kwargs: dict[str, Any] = {
            "prompt": [job.prompt for job in jobs],
            "generator": [torch.Generator(device="cpu").manual_seed(j.seed % 2**64) for j in jobs],
            "output_type": "pil",
        }
        steps = first.steps or self.default_steps
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if "callback_on_step_end" in params:  # stop between denoising steps when abandoned
            kwargs["callback_on_step_end"] = _stop_if_abandoned
        if first.guidance_scale is not None and "guidance_scale" in params:
            kwargs["guidance_scale"] = first.guidance_scale
        if first.negative_prompt is not None and "negative_prompt" in params:
            kwargs["negative_prompt"] = [first.negative_prompt] * len(jobs)
        if first.kind == "generate":
            if "width" in params and "height" in params:
                kwargs["width"], kwargs["height"] = run_w, run_h
        else:
            kwargs["image"] = [
                job.image.convert("RGB").resize((run_w, run_h), Image.Resampling.LANCZOS)
                if job.image is not None and job.image.size != (run_w, run_h)
                else job.image.convert("RGB")  # type: ignore[union-attr]
                for job in jobs
            ]
            if "width" in params and "height" in params:
                kwargs["width"], kwargs["height"] = run_w, run_h
        images = pipe(**kwargs).images
        return [
            img
            if img.size == (width, height)
            else img.resize((width, height), Image.Resampling.LANCZOS)
            for img in images
        ]


def _stop_if_abandoned(
    pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """diffusers' ``callback_on_step_end``: raising here leaves the denoising loop."""
    raise_if_abandoned()
    return callback_kwargs


def _size_multiple(pipe: Any) -> int:
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return max(8, factor * 2)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
