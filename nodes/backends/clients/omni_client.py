"""``OmniImageClient``: image generation and editing over the vLLM-Omni image API.

``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart form data, the
image as a PNG file), both answering ``{"data": [{"b64_json": ...}]}``. Served by
``vllm serve <model> --omni`` and by Atelier's ``atelier serve image``;
:class:`TracedOmniImageClient` also asks the latter for each image's Flow-GRPO transitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


class OmniImageClient:
    """An :class:`~nodes.backends.base.ImageGenerator` and :class:`ImageEditor` over HTTP.

    ``extra_body``: more fields for every request (e.g. ``guidance_scale``,
    ``negative_prompt``), passed through as the server documents them.
    ``edit_size``: ``"input"`` asks for the input image's size on edits, ``"auto"`` lets the
    server choose.
    """

    def __init__(
        self,
        urls: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
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
                raise ValueError("OmniImageClient needs urls or a pool")
            pool = ServerPool(urls, token=token, strategy=strategy, retry=retry, timeouts=timeouts)
        self.pool = pool
        self.model = model
        self.extra_body = dict(extra_body or {})
        self.edit_size = edit_size
        self.max_pixels = max_pixels

    @property
    def model_id(self) -> str:
        return self.model or "omni-image"

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
    """An :class:`OmniImageClient` that asks ``atelier serve image`` for each generation's
    Flow-GRPO transitions (``return_transitions``): a
    :class:`~nodes.backends.base.TracedImageModel`, so the draw node records them. Edits over
    HTTP come back without transitions (the server traces generations only)."""

    async def generate_traced(self, request: ImageRequest) -> Any:
        """The image and its stochastic transitions (an Atelier server extension)."""
        from nodes.backends.flow.transitions import TracedImage, transition_from_json

        payload = self._generation_payload(request, return_transitions=True)
        body = await self.pool.post_json("images.generations", "/v1/images/generations", payload)
        image = self._first_image(body, "images.generations")
        try:
            items = body["data"][0]["transitions"]
            transitions = tuple(transition_from_json(item) for item in items)
        except (KeyError, TypeError, ValueError) as error:
            raise WireFormatError(
                f"images.generations response from {self.pool.urls} has no valid "
                f"data[0].transitions (is it an Atelier image server?): {error}"
            ) from None
        return TracedImage(image, transitions)

    async def edit_traced(self, request: EditRequest) -> Any:
        from nodes.backends.flow.transitions import TracedImage

        return TracedImage(await self.edit(request), ())


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
