"""``FlowImageModel``: an image generator and editor whose images come with their Flow-GRPO
transitions (the draw and refine nodes record them), in this process, in dynamic batches.

It is a :class:`~nodes.backends.base.TracedImageModel`: the nodes call its ``generate_traced``
/ ``edit_traced`` and record the transitions; its plain ``generate`` / ``edit`` return the same
images without the record. Edits are image-to-image with the same components (the input image
is encoded, noised to ``σ`` at ``strength`` of the schedule, and denoised under the instruction
as prompt), which is what a flow-matching edit policy samples.

:class:`FlowImageEngine` is the one traced-sampling path: ``FlowImageModel`` serves it, and the
diffusers engine behind ``atelier serve image`` hands it the ``return_transitions`` requests.
Both fill what a request leaves open with the same defaults (:data:`TRACED_STEPS`,
:data:`TRACED_GUIDANCE`, :data:`EDIT_STRENGTH`).

A diffusion LoRA (``policies.diffusion_lora``) is loaded at start (``lora_dir``) or at run time
(:meth:`FlowImageModel.load_adapter`, what a backends file's image-role ``adapter`` does): one
active adapter, applied to every image, whose name each transition records.
:meth:`FlowImageModel.with_adapter` is the role's view, whose ``model_id`` (what the draw and
refine steps record) names that adapter and which refuses to sample when another is active.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from nodes.backends.abandon import Abandoned
from nodes.backends.base import EditRequest, ImageRequest
from nodes.backends.engines.service import ModelService
from nodes.backends.flow.transitions import TracedImage

TRACED_STEPS = 10
"""Denoising steps of a traced sample when neither the request nor the model sets them:
Flow-GRPO samples SD3.5 with 10 steps while training."""
TRACED_GUIDANCE = 4.5
"""Classifier-free guidance scale of a traced sample when the request sets none: Flow-GRPO's
CFG 4.5 for SD3.5 (a guidance-distilled Flux takes it as its guidance embedding instead)."""
EDIT_STRENGTH = 0.8
"""How much of the schedule a traced edit runs (img2img strength): it enters at step
``steps − int(steps · strength)``."""


@dataclass(frozen=True)
class FlowJob:
    """One traced image to sample; jobs with equal :meth:`group_key` share a sampler call."""

    kind: str  # "generate" | "edit"
    prompt: str
    size: tuple[int, int]
    seed: int
    steps: int = TRACED_STEPS
    guidance_scale: float = TRACED_GUIDANCE
    negative_prompt: str = ""
    strength: float = 1.0
    image: Image.Image | None = None
    noise_level: float | None = None
    """The SDE's noise level for this job (None: the sampler's own ``SDEConfig``)."""

    @classmethod
    def of(
        cls,
        kind: str,
        prompt: str,
        size: tuple[int, int],
        seed: int,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        edit_strength: float = EDIT_STRENGTH,
        image: Image.Image | None = None,
        noise_level: float | None = None,
    ) -> FlowJob:
        """A job with the documented defaults wherever the request left a value open (None,
        or 0 steps)."""
        return cls(
            kind,
            prompt,
            size,
            seed,
            steps or TRACED_STEPS,
            TRACED_GUIDANCE if guidance_scale is None else guidance_scale,
            negative_prompt or "",
            edit_strength if kind == "edit" else 1.0,
            image.convert("RGB") if image is not None else None,
            noise_level,
        )

    def group_key(self) -> tuple[object, ...]:
        return (
            self.kind, self.size, self.steps, self.guidance_scale, self.negative_prompt,
            self.strength, self.noise_level,
        )  # fmt: skip


def load_pipeline(model_dir: str | Path, *, device: str = "cpu", dtype: str = "auto") -> Any:
    """A saved diffusers pipeline, with optional components its index lists as absent (e.g. SD3
    without T5) passed as None — ``from_pretrained`` refuses them otherwise."""
    from diffusers import DiffusionPipeline

    from nodes.backends.engines.transformers_lm import resolve_device, resolve_dtype

    kwargs: dict[str, Any] = absent_components(model_dir)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype != "auto":
        kwargs["torch_dtype"] = torch_dtype
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), **kwargs)
    pipe.to(resolve_device(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def absent_components(model_dir: str | Path) -> dict[str, None]:
    import json

    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {
        name: None
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and value[:1] == [None]
    }


def flow_model(pipe: Any, name: str) -> Any:
    """The :class:`~nodes.backends.flow.sampler.FlowModel` adapter for ``pipe``."""
    from nodes.backends.flow.flux import FLUX_PIPELINES, FluxFlow
    from nodes.backends.flow.sampler import SD3Flow

    family = type(pipe).__name__
    if family.startswith("StableDiffusion3"):
        return SD3Flow(pipe, name)
    if family in FLUX_PIPELINES:
        return FluxFlow(pipe, name)
    raise ValueError(
        "traced (Flow-GRPO) sampling supports StableDiffusion3 pipelines and "
        f"{' / '.join(FLUX_PIPELINES)}, not {family}"
    )


def run_traced(sampler: Any, jobs: Sequence[FlowJob]) -> list[TracedImage]:
    """One sampler call for jobs sharing a group key; sizes rounded up to what the model takes
    and the images resized back to the requested size."""
    from nodes.backends.flow.sampler import SampleJob

    first = jobs[0]
    width, height = first.size
    multiple = sampler.model.size_multiple()
    run_w, run_h = _round_up(width, multiple), _round_up(height, multiple)
    sde_config = sampler.sde
    if first.noise_level is not None:
        sde_config = replace(sde_config, noise_level=first.noise_level)
    traced = sampler.sample(
        [SampleJob(job.prompt, job.seed, job.image) for job in jobs],
        width=run_w,
        height=run_h,
        steps=first.steps,
        guidance_scale=first.guidance_scale,
        negative_prompt=first.negative_prompt,
        strength=first.strength,
        sde_config=sde_config,
    )
    return [
        TracedImage(
            t.image
            if t.image.size == (width, height)  # type: ignore[attr-defined]
            else t.image.resize((width, height), Image.Resampling.LANCZOS),  # type: ignore[attr-defined]
            t.transitions,
        )
        for t in traced
    ]


class FlowImageEngine:
    """A flow-matching pipeline with a :class:`FlowSampler` (batches by group key)."""

    def __init__(
        self, pipe: Any, *, name: str, sde_config: Any = None, lora: str | None = None
    ) -> None:
        from nodes.backends.flow.sampler import FlowSampler

        self.pipe = pipe
        self.name = name
        self.sampler = FlowSampler(flow_model(pipe, name), sde_config)
        self.sampler.lora = lora
        self.adapters: dict[str, str] = {}
        """The LoRA loaded at run time (name -> path; one at most), as ``load_adapter`` put it."""
        self._peft_names: dict[str, str] = {}
        self._loads = 0

    def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load a diffusion LoRA into the transformer as the one active adapter, recorded as
        ``name`` by every transition from now on. The new adapter loads beside the old one,
        dropped only once the new one is in: a failed load (a ``ValueError`` saying why)
        leaves the model as it was. Runs on the service's thread (between batches)."""
        import warnings

        from policies.diffusion_lora import AdapterError, load_lora

        if name in self.adapters and not inplace:
            raise ValueError(f"the LoRA adapter {name!r} has already been loaded")
        model = self.pipe.transformer
        self._loads += 1
        peft_name = f"served{self._loads}"  # peft names must be valid module keys
        previous = list(getattr(model, "peft_config", None) or {})
        try:
            with warnings.catch_warnings():  # loading beside the active adapter is the point
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                warnings.filterwarnings("ignore", "Adapter .* was active", UserWarning)
                load_lora(model, path, adapter_name=peft_name)
        except AdapterError as error:  # load_lora removed what it added
            if previous:
                model.set_adapter(previous[-1])
            raise ValueError(str(error)) from None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Adapter .* was active", UserWarning)
            for old in previous:  # one active diffusion LoRA: the start-up one too
                model.delete_adapters(old)
        self.adapters = {name: path}
        self._peft_names = {name: peft_name}
        self.sampler.lora = name

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"the LoRA adapter {name!r} is not loaded")
        self.pipe.transformer.delete_adapters(self._peft_names.pop(name))
        del self.adapters[name]
        self.sampler.lora = None

    @staticmethod
    def batch_key(job: FlowJob) -> tuple[object, ...]:
        """Jobs that share a sampler call (:class:`ModelService` batches them apart)."""
        return job.group_key()

    def run_batch(self, jobs: Sequence[FlowJob]) -> list[TracedImage | BaseException]:
        results: list[TracedImage | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple[object, ...], list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.group_key(), []).append(index)
        for indices in groups.values():
            try:
                outputs: Sequence[TracedImage | BaseException] = run_traced(
                    self.sampler, [jobs[i] for i in indices]
                )
            except Abandoned:
                raise  # nobody waits for any of this batch: stop now
            except Exception as error:
                outputs = [error] * len(indices)
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        return [r if r is not None else RuntimeError("job was not served") for r in results]


class FlowImageModel:
    """:class:`~nodes.backends.base.ImageGenerator`, ``ImageEditor`` and
    :class:`~nodes.backends.base.TracedImageModel`: a :class:`FlowImageEngine` served in
    dynamic batches. ``default_steps`` / ``guidance_scale`` / ``negative_prompt`` /
    ``edit_strength`` fill what a request leaves open."""

    def __init__(
        self,
        engine: FlowImageEngine,
        *,
        default_steps: int = TRACED_STEPS,
        guidance_scale: float = TRACED_GUIDANCE,
        negative_prompt: str = "",
        edit_strength: float = EDIT_STRENGTH,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        torch_threads: int | None = None,
    ) -> None:
        self.engine = engine
        self.default_steps = default_steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.edit_strength = edit_strength
        self.service: ModelService[FlowJob, TracedImage] = ModelService(
            engine,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            torch_threads=torch_threads,
            thread_name="atelier-flow",
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        sde_config: Any = None,
        lora_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> FlowImageModel:
        pipe = load_pipeline(model_dir, device=device, dtype=dtype)
        lora = None
        if lora_dir is not None:
            from policies.diffusion_lora import load_lora

            lora = load_lora(pipe.transformer, lora_dir).label
        engine = FlowImageEngine(
            pipe, name=name or str(model_dir), sde_config=sde_config, lora=lora
        )
        return cls(engine, **kwargs)

    @property
    def model_id(self) -> str:
        return self.engine.name

    @property
    def active_lora(self) -> str | None:
        """The name the transitions record now (the loaded LoRA; None: the base model)."""
        return self.engine.sampler.lora

    async def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load the diffusion LoRA at ``path`` as the active adapter, named ``name``."""
        await self.service.load_adapter(name, path, inplace=inplace)

    async def unload_adapter(self, name: str) -> None:
        await self.service.unload_adapter(name)

    def with_adapter(self, adapter: str | None) -> Any:
        """This model, sampling as diffusion LoRA ``adapter`` (loaded with :meth:`load_adapter`;
        None: this model as is): its ``model_id`` names the adapter, and a request while another
        one is active fails rather than record images under the wrong name."""
        return self if adapter is None else FlowAdapterView(self, adapter)

    def _job(self, kind: str, prompt: str, size: tuple[int, int], seed: int, steps: int | None,
             image: Image.Image | None = None) -> FlowJob:  # fmt: skip
        return FlowJob.of(
            kind,
            prompt,
            size,
            seed,
            steps=steps or self.default_steps,
            guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt,
            edit_strength=self.edit_strength,
            image=image,
        )

    async def generate_traced(self, request: ImageRequest) -> TracedImage:
        job = self._job(
            "generate", request.prompt, (request.width, request.height), request.seed, request.steps
        )
        return await self.service.run(job)

    async def edit_traced(self, request: EditRequest) -> TracedImage:
        job = self._job(
            "edit", request.instruction, request.image.size, request.seed, request.steps,
            request.image,
        )  # fmt: skip
        return await self.service.run(job)

    async def generate(self, request: ImageRequest) -> Image.Image:
        return (await self.generate_traced(request)).image  # type: ignore[return-value]

    async def edit(self, request: EditRequest) -> Image.Image:
        return (await self.edit_traced(request)).image  # type: ignore[return-value]

    def close(self) -> None:
        self.service.close()


class FlowAdapterView:
    """A :class:`FlowImageModel` as one role sees it when its backends file names a diffusion
    LoRA: the same model and batches, named by the adapter."""

    def __init__(self, model: FlowImageModel, adapter: str) -> None:
        self.model = model
        self.adapter = adapter

    @property
    def model_id(self) -> str:
        return self.adapter

    def _check(self) -> None:
        active = self.model.active_lora
        if active != self.adapter:
            raise RuntimeError(
                f"diffusion LoRA {self.adapter!r} is not the one loaded in {self.model.model_id} "
                f"({active or 'none'}): load it first (ConfiguredBackends.load_adapters)"
            )

    async def generate_traced(self, request: ImageRequest) -> TracedImage:
        self._check()
        return await self.model.generate_traced(request)

    async def edit_traced(self, request: EditRequest) -> TracedImage:
        self._check()
        return await self.model.edit_traced(request)

    async def generate(self, request: ImageRequest) -> Image.Image:
        return (await self.generate_traced(request)).image  # type: ignore[return-value]

    async def edit(self, request: EditRequest) -> Image.Image:
        return (await self.edit_traced(request)).image  # type: ignore[return-value]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
