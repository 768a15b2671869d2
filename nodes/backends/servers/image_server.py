"""``atelier serve image``: a diffusers model behind the vLLM-Omni image API.

- ``POST /v1/images/generations`` (JSON): ``prompt``, ``size`` ("WxH"), ``seed``, ``n`` (≤ 4),
  ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``;
- ``POST /v1/images/edits`` (multipart form data, like vLLM-Omni and OpenAI): one ``image``
  file, ``prompt``, ``size`` ("WxH" or "auto" = the input's size), ``seed``, ``n``,
  ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``; a JSON body with ``image``
  as base64 (or a data URL) is accepted too;
- answers ``{"data": [{"b64_json": <PNG>}], "size": "WxH", "output_format": "png"}``;
- ``GET /v1/models``, ``GET /health``, ``GET /stats`` (batch sizes);
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (``lora_name``, ``lora_path``):
  a diffusion LoRA in peft's layout (``policies.diffusion_lora``) becomes, or stops being, the
  active adapter of every request;
- ``return_transitions: true`` on a generation (SD3 pipelines): Flow-GRPO's SDE sampling, each
  image with its stochastic transitions (``nodes.backends.flow``; latents base64 safetensors).
  An Atelier extension: vLLM-Omni has no such field;
- ``lora`` (vLLM-Omni's per-request diffusion LoRA, ``{name, local_path, scale}``; a JSON
  string in edit forms): this server applies its one loaded adapter to every request, so the
  field is honoured when it names that adapter (at scale 1, with its path if one is given) and
  is a 400 otherwise, never ignored.

Uploaded images are decoded with the decompression-bomb guard (400 beyond the pixel limit or
when the bytes are not an image); bodies beyond the size limit are answered 413.

Bounded work (:class:`~nodes.backends.servers.http_common.ServerLimits`): the output size
(by default the model's native resolution on CPU and twice its side on an accelerator:
see :func:`default_output_pixels`),
``num_inference_steps`` (≤ 100 and the scheduler's training steps), ``n``, the prompt's
characters, and the deadline; a full queue is a 503 with ``Retry-After``; a request whose
client disconnects or whose deadline passes stops between denoising steps.
``runtime_lora=False`` (``--no-runtime-lora``) leaves out the LoRA endpoints.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodes.backends.engines.batching import DeadlineExceeded, Overloaded
from nodes.backends.engines.image_inprocess import ImageService
from nodes.backends.image_types import ImageJob, ImageUnsupported
from nodes.backends.servers.http_common import (
    HTTPError,
    LoraBody,
    ServerLimits,
    base_app,
    bound_service,
    check_adapter_path,
    gather_all_or_none,
    guard,
    prompt_chars_check,
    read_json,
    run_bounded,
    without_path,
)
from nodes.backends.wire import (
    ImageDecodeError,
    decode_b64_bytes,
    decode_image,
    format_size,
    image_to_b64,
    parse_size,
    peek_size,
)

MAX_N = 16
"""The largest ``n`` the request model takes; the server's own limit is
``ServerLimits.max_images_per_generation`` (default 4)."""
MAX_PROMPT_CHARS = 16_384
"""Default prompt limit (characters): text encoders truncate far sooner (CLIP at 77 tokens,
T5 at 256 or 512), so more is only tokenising cost."""
DEFAULT_NATIVE_SIDE = 512
"""The native side assumed for a pipeline that does not say (SD 1.x)."""


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = Field(None, ge=1, le=100_000)
    guidance_scale: float | None = Field(None, ge=-100, le=100, allow_inf_nan=False)
    negative_prompt: str | None = None
    response_format: str = "b64_json"
    output_format: str = "png"
    return_transitions: bool = False
    """Atelier extension: sample with the Flow-GRPO SDE step and return each image's
    stochastic transitions (latents as base64 safetensors) under ``data[i].transitions``."""
    noise_level: float | None = Field(None, ge=0.0, le=5.0, allow_inf_nan=False)
    """The SDE's noise level for ``return_transitions`` (default 0.7)."""
    lora: Any = None
    """vLLM-Omni's per-request LoRA (an object, or its JSON text): see :func:`_check_lora`."""


class EditBody(GenerationBody):
    image: str | None = None
    """JSON edits only: base64 PNG/JPEG, or a data URL."""


def default_output_pixels(service: ImageService) -> int:
    """The output limit when the deployer sets none: the model's native resolution squared on
    CPU (a tiny SD at its native 256² already takes minutes per 20 steps on one core), twice it
    per side on an accelerator (1024² → 2048² for SD3, SDXL and Flux)."""
    engine = service.engine
    device = getattr(engine, "device", None)
    on_cpu = getattr(device, "type", str(device or "cpu")) == "cpu"
    side = native_side(engine) or DEFAULT_NATIVE_SIDE
    return side * side if on_cpu else 4 * side * side


def native_side(engine: Any) -> int | None:
    """The side of the image the pipeline draws by default (``default_sample_size`` or the
    denoiser's ``sample_size``, times the VAE's scale factor), or None when it says nothing."""
    pipe = getattr(engine, "generator_pipe", None) or getattr(engine, "edit_pipe", None)
    if pipe is None:
        return None
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(pipe, "default_sample_size", None) or getattr(
        getattr(denoiser, "config", None), "sample_size", None
    )
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, (list, tuple)):
        sample = max(sample)
    if not isinstance(sample, int) or not isinstance(scale, int):
        return None
    return sample * scale


def create_image_app(
    service: ImageService,
    *,
    token: str | None = None,
    limits: ServerLimits | None = None,
    default_size: tuple[int, int] | None = None,
    runtime_lora: bool = True,
) -> Any:
    """The ASGI app (guarded by the token and size limits) serving ``service``.
    ``limits`` bound the service's queue and each batch's run time; ``runtime_lora=False``
    leaves out ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (404).
    ``default_size``: the size of a request that gives none (None: the model's native size,
    512x512 when it says none); a ``ValueError`` when it is beyond the output limit (every
    such request would be refused)."""
    limits = limits or ServerLimits()
    bound_service(service, limits)
    output_pixels = limits.max_output_pixels or default_output_pixels(service)
    if default_size is None:
        side = native_side(service.engine) or DEFAULT_NATIVE_SIDE
        default_size = (side, side)
    if default_size[0] * default_size[1] > output_pixels:
        raise ValueError(
            f"the default size {format_size(*default_size)} is beyond the output limit of "
            f"{output_pixels} pixels (e.g. {_square(output_pixels)})"
        )
    prompt_limit = limits.max_prompt_chars or MAX_PROMPT_CHARS
    max_steps = min(limits.max_steps, _scheduler_steps(service.engine))
    app = base_app("Atelier image server", service)

    def check(body: GenerationBody) -> None:
        prompt_chars_check(len(body.prompt) + len(body.negative_prompt or ""), prompt_limit)
        if body.n > limits.max_images_per_generation:
            raise HTTPError(
                400, f"n {body.n} exceeds this server's limit of {limits.max_images_per_generation}"
            )
        steps = body.num_inference_steps
        if steps is not None and steps > max_steps:
            raise HTTPError(
                400, f"num_inference_steps {steps} exceeds this server's limit of {max_steps}"
            )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": service.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "atelier",
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> dict[str, Any]:
        body = _validate(GenerationBody, await read_json(request))
        check(body)
        _check_lora(body.lora, service)
        size = _size(body.size, default_size, output_pixels)
        jobs = [
            ImageJob(
                "generate",
                body.prompt,
                size,
                seed=seed,
                steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale,
                negative_prompt=body.negative_prompt,
                traced=body.return_transitions,
                noise_level=body.noise_level if body.return_transitions else None,
            )
            for seed in _seeds(body.seed, body.n)
        ]
        if body.return_transitions:
            return await run_bounded(request, _answer_traced(service, jobs, size), limits)
        return await run_bounded(request, _answer(service, jobs, body, size), limits)

    async def load_lora(request: Request) -> PlainTextResponse:
        """A diffusion LoRA (peft layout) becomes the active adapter of every request; a load
        that fails leaves the active adapter as it was."""
        body = _lora_body(await read_json(request))
        if not body.lora_path:
            raise HTTPError(400, "lora_path is required")
        check_adapter_path(body.lora_path)
        try:
            await service.load_adapter(body.lora_name, body.lora_path, inplace=body.load_inplace)
        except ValueError as error:
            raise HTTPError(400, without_path(str(error), body.lora_path)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora(request: Request) -> PlainTextResponse:
        body = _lora_body(await read_json(request))
        try:
            await service.unload_adapter(body.lora_name)
        except KeyError as error:
            raise HTTPError(404, str(error.args[0]), "not_found_error") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    if runtime_lora:
        app.post("/v1/load_lora_adapter")(load_lora)
        app.post("/v1/unload_lora_adapter")(unload_lora)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            body = _validate(EditBody, await read_json(request))
            if not body.image:
                raise HTTPError(400, "field 'image' is required")
            try:
                data = decode_b64_bytes(body.image)
            except ImageDecodeError as error:
                raise HTTPError(400, f"image: {error}") from None
        else:
            body, data = await _edit_form(request, limits)
        check(body)
        _check_lora(body.lora, service)
        auto = body.size in (None, "", "auto")
        if not auto:
            size = _size(body.size, default_size, output_pixels)
        limit = min(limits.max_image_pixels, limits.max_request_pixels)
        try:
            width, height = peek_size(data)  # from the header: nothing decoded yet
            if auto and output_pixels < width * height <= limit:  # beyond: the bomb guard
                raise HTTPError(
                    400,
                    f"size 'auto' would edit at the input's {format_size(width, height)}, "
                    f"beyond this server's output limit of {output_pixels} pixels: give a "
                    "smaller size",
                )
            image = decode_image(data, limit)
        except ImageDecodeError as error:
            raise HTTPError(400, f"image: {error}") from None
        if auto:
            size = image.size
        jobs = [
            ImageJob(
                "edit",
                body.prompt,
                size,
                seed=seed,
                steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale,
                negative_prompt=body.negative_prompt,
                image=image,
            )
            for seed in _seeds(body.seed, body.n)
        ]
        return await run_bounded(request, _answer(service, jobs, body, size), limits)

    return guard(app, token, limits)


def _scheduler_steps(engine: Any) -> int:
    """The most inference steps the pipelines' schedulers can take: their training steps less
    ``steps_offset`` (DDIM with offset 1 asked for 1000 of 1000 steps indexes timestep 1000 of
    0..999, an IndexError deep inside diffusers)."""
    limits = []
    for pipe in (getattr(engine, "generator_pipe", None), getattr(engine, "edit_pipe", None)):
        config = getattr(getattr(pipe, "scheduler", None), "config", None) or {}
        if config.get("num_train_timesteps"):
            limits.append(int(config["num_train_timesteps"]) - int(config.get("steps_offset") or 0))
    return min(limits, default=1000)


async def _edit_form(request: Request, limits: ServerLimits) -> tuple[EditBody, bytes]:
    """The edit's fields and its one image's bytes (decoded by the caller, once the limits that
    apply to it are known)."""
    try:
        form = await request.form(max_files=limits.max_images_per_request, max_fields=64)
    except HTTPError:
        raise
    except Exception as error:  # malformed multipart
        raise HTTPError(400, f"could not read the form: {error}") from None
    uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and hasattr(v, "read")]
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    if not uploads:
        raise HTTPError(400, "field 'image' (a file) is required")
    if len(uploads) > 1:
        raise HTTPError(400, "this server edits one image per request")
    data = await uploads[0].read()
    return _validate(EditBody, fields), data


def _check_lora(value: Any, service: ImageService) -> None:
    """Accept vLLM-Omni's per-request ``lora`` only when it asks for what this server does
    anyway: its one loaded adapter (``/v1/load_lora_adapter``) at scale 1 (and, when a path
    is given, that adapter's path). Anything else is a 400 saying why."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise HTTPError(400, "lora: not a JSON object") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise HTTPError(400, "lora must be an object with a name")
    name = value["name"]
    loaded = dict(getattr(service.engine, "adapters", None) or {})
    if name not in loaded:
        raise HTTPError(
            400,
            f"lora {name!r} is not loaded here: this server applies its one loaded adapter "
            f"({', '.join(map(repr, loaded)) or 'none'}) to every request; load it with "
            "POST /v1/load_lora_adapter",
        )
    path = next((value[k] for k in ("local_path", "path", "lora_path") if value.get(k)), None)
    if path is not None and not _same_path(str(path), loaded[name]):
        raise HTTPError(400, f"lora {name!r} is loaded here from another path than {path!r}")
    scale = value.get("scale")
    if scale is not None and scale != 1:
        raise HTTPError(400, f"lora scale {scale!r} is not supported here (only 1)")


def _same_path(given: str, loaded: str) -> bool:
    try:
        return Path(given).resolve() == Path(loaded).resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long: not the loaded adapter
        return False


def _lora_body(data: Any) -> LoraBody:
    try:
        return LoraBody.model_validate(data)
    except ValidationError as error:
        raise HTTPError(400, f"invalid request: {error.errors()[0]['msg']}") from None


async def _answer_traced(
    service: ImageService, jobs: list[ImageJob], size: tuple[int, int]
) -> dict[str, Any]:
    from nodes.backends.flow.transitions import transition_to_json

    try:
        traced = await gather_all_or_none(*(service.run(job) for job in jobs))
    except (Overloaded, DeadlineExceeded):
        raise  # run_bounded answers them (503, 504)
    except (ImageUnsupported, ValueError) as error:
        raise HTTPError(400, str(error)) from None
    except Exception as error:
        raise HTTPError(500, f"{type(error).__name__}: {error}", "internal_error") from None
    encoded = await asyncio.to_thread(lambda: [image_to_b64(t.image) for t in traced])
    return {
        "created": int(time.time()),
        "data": [
            {"b64_json": b64, "transitions": [transition_to_json(x) for x in t.transitions]}
            for b64, t in zip(encoded, traced, strict=True)
        ],
        "output_format": "png",
        "size": format_size(*size),
    }


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        body = model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()
        )
        raise HTTPError(400, f"invalid request: {problems}") from None
    if body.response_format != "b64_json":
        raise HTTPError(400, "only response_format 'b64_json' is supported")
    if body.output_format.lower() != "png":
        raise HTTPError(400, "only output_format 'png' is supported")
    return body


def _size(value: str | None, default: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    if value in (None, "", "auto"):
        width, height = default
    else:
        try:
            width, height = parse_size(value)
        except ValueError as error:
            raise HTTPError(400, str(error)) from None
    if width * height > max_pixels:
        raise HTTPError(
            400,
            f"size {format_size(width, height)} exceeds this server's limit of {max_pixels} "
            f"pixels (width × height, e.g. {_square(max_pixels)})",
        )
    return width, height


def _square(pixels: int) -> str:
    side = int(pixels**0.5)
    return format_size(side, side)


def _seeds(seed: int | None, n: int) -> list[int]:
    base = random.randrange(2**63) if seed is None else seed
    return [base + i for i in range(n)]


async def _answer(
    service: ImageService, jobs: list[ImageJob], body: GenerationBody, size: tuple[int, int]
) -> dict[str, Any]:
    try:
        images = await gather_all_or_none(*(service.run(job) for job in jobs))
    except (Overloaded, DeadlineExceeded):
        raise  # run_bounded answers them (503, 504)
    except ImageUnsupported as error:
        raise HTTPError(400, str(error)) from None
    except Exception as error:
        raise HTTPError(500, f"{type(error).__name__}: {error}", "internal_error") from None
    encoded = await asyncio.to_thread(lambda: [image_to_b64(img) for img in images])
    return {
        "created": int(time.time()),
        "data": [{"b64_json": b64, "url": None, "revised_prompt": None} for b64 in encoded],
        "output_format": "png",
        "size": format_size(*size),
    }
