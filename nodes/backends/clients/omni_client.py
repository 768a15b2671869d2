"""``OmniImageClient``: image generation and editing over the vLLM-Omni image API.

``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart form data, the
image as a PNG file), both answering ``{"data": [{"b64_json": ...}]}``. Served by
``vllm serve <model> --omni`` and by Atelier's ``atelier serve image``.

A diffusion LoRA is chosen per request (:meth:`OmniImageClient.with_adapter`): vLLM-Omni's
``lora`` field, ``{"name", "local_path", "scale"}`` (a JSON string in edit forms). vLLM-Omni
loads ``local_path`` (as the *server* sees it) on demand; newer releases refuse request-level
paths and take only the name of an adapter registered at start-up (``--dynamic-lora``), so the
path is optional. ``atelier serve image`` honours the field when it names the adapter it has
loaded (``/v1/load_lora_adapter``, :meth:`OmniImageClient.load_adapter` on every replica) at
scale 1, and refuses it otherwise. A backends file says which of the two a server is (an
``omni`` backend's ``adapter_mode``, ``nodes.backends.config``): ``load`` loads the version on
every replica first and then names it per request; ``request`` only names it per request.

:class:`TracedOmniImageClient` also asks for each generation's Flow-GRPO transitions
(``return_transitions``). That is **an extension of Atelier's own image server only**
(``atelier serve image`` with a flow-matching pipeline such as SD3): vLLM-Omni ignores the
field, and the traced client then fails with an error saying so rather than return an image
without transitions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from nodes.backends.base import EditRequest, ImageRequest
from nodes.backends.clients.pool import RetryPolicy, ServerPool, Strategy, Timeouts
from nodes.backends.wire import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    WireFormatError,
    decode_b64_image,
    format_size,
    image_to_png,
)


@dataclass(frozen=True)
class OmniLora:
    """A per-request diffusion LoRA, as vLLM-Omni's ``lora`` request field names one.

    Field names from vLLM-Omni's ``parse_lora_request``
    (``vllm_omni/entrypoints/openai/utils.py``; the images API's ``lora`` field is documented in
    ``vllm_omni/entrypoints/openai/protocol/images.py``): ``name``, ``local_path`` (also
    accepted as ``path``), ``scale``.
    """

    name: str
    path: str | None = None
    """The adapter directory as the server sees it; None: an adapter the server registered."""
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a diffusion LoRA needs a name")

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "scale": self.scale}
        if self.path is not None:
            body["local_path"] = self.path
        return body

    @property
    def label(self) -> str:
        """How a step's ``models`` names it: the name, with the scale when it is not 1."""
        return self.name if self.scale == 1.0 else f"{self.name}*{self.scale:g}"


class OmniImageClient:
    """An :class:`~nodes.backends.base.ImageGenerator` and :class:`ImageEditor` over HTTP.

    ``extra_body``: more fields for every request (e.g. ``guidance_scale``,
    ``negative_prompt``), passed through as the server documents them.
    ``edit_size``: ``"input"`` asks for the input image's size on edits, ``"auto"`` lets the
    server choose. ``adapter`` / ``adapter_path`` / ``adapter_scale``: a diffusion LoRA sent
    with every request (:class:`OmniLora`); :attr:`model_id`, which the draw and refine steps
    record, then names it.
    """

    def __init__(
        self,
        urls: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
        adapter: str | None = None,
        adapter_path: str | None = None,
        adapter_scale: float = 1.0,
        token: str | None = None,
        strategy: Strategy = "least_inflight",
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        extra_body: Mapping[str, Any] | None = None,
        edit_size: Literal["input", "auto"] = "input",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        pool: ServerPool | None = None,
    ) -> None:
        if pool is None:
            if urls is None:
                raise ValueError(f"{type(self).__name__} needs urls or a pool")
            pool = ServerPool(urls, token=token, strategy=strategy, retry=retry, timeouts=timeouts)
        if adapter is None and adapter_path is not None:
            raise ValueError("adapter_path needs an adapter name")
        self.pool = pool
        self.model = model
        self.lora = None if adapter is None else OmniLora(adapter, adapter_path, adapter_scale)
        self.extra_body = dict(extra_body or {})
        if "lora" in self.extra_body:
            raise ValueError("give the diffusion LoRA as adapter=..., not in extra_body")
        self.edit_size = edit_size
        self.max_pixels = max_pixels

    @property
    def model_id(self) -> str:
        if self.lora is not None:
            return self.lora.label
        return self.model or "omni-image"

    def with_adapter(
        self, adapter: str | None, path: str | None = None, *, scale: float = 1.0
    ) -> OmniImageClient:
        """The same servers and connections, sending diffusion LoRA ``adapter`` (loaded from
        ``path`` as the server sees it, or registered there under that name) at ``scale`` with
        every request (None = the base model)."""
        return type(self)(
            model=self.model,
            adapter=adapter,
            adapter_path=path if adapter is not None else None,
            adapter_scale=scale,
            extra_body=self.extra_body,
            edit_size=self.edit_size,
            max_pixels=self.max_pixels,
            pool=self.pool,
        )

    async def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load diffusion LoRA ``name`` from ``path`` (as the *server* sees it) on every server
        of the pool, as the one adapter each applies (``atelier serve image``'s
        ``/v1/load_lora_adapter``; vLLM-Omni has no such endpoint: it takes the per-request
        field alone). ``inplace`` replaces an adapter already loaded under that name."""
        payload: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            payload["load_inplace"] = True
        await self.pool.broadcast(
            "load_lora_adapter", "POST", "/v1/load_lora_adapter", json=payload
        )

    async def unload_adapter(self, name: str) -> None:
        await self.pool.broadcast(
            "unload_lora_adapter", "POST", "/v1/unload_lora_adapter", json={"lora_name": name}
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def generate(self, request: ImageRequest) -> Image.Image:
        body = await self.pool.post_json(
            "images.generations", "/v1/images/generations", self._generation_payload(request)
        )
        return self._first_image(body, "images.generations")

    def _generation_payload(self, request: ImageRequest, **extension: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "prompt": request.prompt,
            "size": format_size(request.width, request.height),
            "seed": request.seed,
            "n": 1,
            "response_format": "b64_json",
            **self.extra_body,
            **extension,
        }
        if self.model:
            payload["model"] = self.model
        if request.steps is not None:
            payload["num_inference_steps"] = request.steps
        if self.lora is not None:
            payload["lora"] = self.lora.payload()
        return payload

    async def edit(self, request: EditRequest) -> Image.Image:
        form: dict[str, Any] = {
            "prompt": request.instruction,
            "seed": str(request.seed),
            "n": "1",
            "response_format": "b64_json",
            "output_format": "png",
            **{k: _form_value(v) for k, v in self.extra_body.items()},
        }
        if self.model:
            form["model"] = self.model
        if self.edit_size == "input":
            form["size"] = format_size(*request.image.size)
        if request.steps is not None:
            form["num_inference_steps"] = str(request.steps)
        if self.lora is not None:  # vLLM-Omni's edit form takes the object as a JSON string
            form["lora"] = json.dumps(self.lora.payload())
        files = {"image": ("image.png", image_to_png(request.image), "image/png")}
        response = await self.pool.request(
            "images.edits", "POST", "/v1/images/edits", data=form, files=files
        )
        try:
            body = response.json()
        except ValueError as error:
            raise WireFormatError(
                f"images.edits response from {response.request.url} is not JSON: {error}"
            ) from None
        return self._first_image(body, "images.edits")

    def _first_image(self, body: Any, kind: str) -> Image.Image:
        try:
            b64 = body["data"][0]["b64_json"]
        except (KeyError, IndexError, TypeError):
            raise WireFormatError(
                f"{kind} response from {self.pool.urls} has no data[0].b64_json"
            ) from None
        try:
            return decode_b64_image(b64, self.max_pixels)
        except ImageDecodeError as error:
            raise WireFormatError(f"{kind} response from {self.pool.urls}: {error}") from None


class TracedOmniImageClient(OmniImageClient):
    """An :class:`OmniImageClient` that asks for each generation's Flow-GRPO transitions
    (``return_transitions``): a :class:`~nodes.backends.base.TracedImageModel`, so the draw
    node records them.

    ``return_transitions`` is an extension of **Atelier's own image server only** (``atelier
    serve image``, flow-matching pipelines such as SD3); vLLM-Omni does not return transitions,
    and a generation through this client then fails with a :class:`WireFormatError` that says
    so (never an image without its transitions). Edits over HTTP come back without
    transitions (the server traces generations only)."""

    async def generate_traced(self, request: ImageRequest) -> Any:
        """The image and its stochastic transitions (an Atelier server extension)."""
        from nodes.backends.flow.transitions import TracedImage, transition_from_json

        payload = self._generation_payload(request, return_transitions=True)
        body = await self.pool.post_json("images.generations", "/v1/images/generations", payload)
        image = self._first_image(body, "images.generations")
        items = body["data"][0].get("transitions")
        if not items:
            raise WireFormatError(
                f"images.generations response from {self.pool.urls} has no transitions: "
                "return_transitions is an extension of Atelier's own image server (atelier "
                "serve image, with a flow-matching pipeline such as SD3); vLLM-Omni does not "
                "return transitions. Serve the model with atelier serve image, or set "
                "traced = false for this backend"
            )
        try:
            transitions = tuple(transition_from_json(item) for item in items)
        except (KeyError, TypeError, ValueError) as error:
            raise WireFormatError(
                f"images.generations response from {self.pool.urls} has invalid "
                f"data[0].transitions: {type(error).__name__}: {error}"
            ) from None
        return TracedImage(image, transitions)

    async def edit_traced(self, request: EditRequest) -> Any:
        from nodes.backends.flow.transitions import TracedImage

        return TracedImage(await self.edit(request), ())


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
