"""Settings a backends config fixes for a backend or a role, applied around any backend.

The graph asks every chat role with one :class:`~nodes.backends.base.SamplingParams` and every
image at one size (``GraphSettings``); a config knows better for its models: a tiny model with a
512-token context wants a small ``max_tokens``, a model trained at 512×512 wants that size. The
wrappers here replace those fields of each request and delegate everything else (``pool``,
``service``, LoRA loading, ...) to the backend they wrap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from PIL import Image

from nodes.backends.base import (
    ChatMessage,
    ChatRequest,
    EditRequest,
    ImageRequest,
    ScoredText,
    TextCompletion,
    TracedImageModel,
)

_OWN_DECLARATIONS = frozenset({"generate_traced", "edit_traced"})
"""Methods a wrapper never borrows from what it wraps: whether it is a
:class:`~nodes.backends.base.TracedImageModel` is its own declaration (and a borrowed traced
method would skip the wrapper's overrides)."""


class _Delegating:
    """Attributes this wrapper does not define are the wrapped backend's."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name in _OWN_DECLARATIONS:  # "inner" not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def model_id(self) -> str:
        return str(self.inner.model_id)


class SampledChatModel(_Delegating):
    """A chat model whose requests take ``overrides`` (``max_tokens``, ``temperature``,
    ``top_p``, ``top_k``, ``repetition_penalty``) in place of what the node asked for; the
    node's per-call seed is kept, so runs stay reproducible."""

    def __init__(self, inner: Any, overrides: Mapping[str, Any]) -> None:
        self.inner = inner
        self.overrides = dict(overrides)

    async def chat(self, request: ChatRequest) -> TextCompletion:
        sampling = replace(request.sampling, **self.overrides)
        return await self.inner.chat(replace(request, sampling=sampling))

    async def score_text(
        self, messages: Sequence[ChatMessage], text: str, image: Image.Image | None = None
    ) -> ScoredText:
        return await self.inner.score_text(messages, text, image)

    def with_adapter(self, adapter: str | None) -> SampledChatModel:
        return SampledChatModel(self.inner.with_adapter(adapter), self.overrides)


class SizedImageModel(_Delegating):
    """An image generator/editor that draws at ``size`` (width, height) whatever size the graph
    asks for, and uses ``steps`` when the graph leaves the step count to the backend. Edits keep
    the input image's size, as every editor does."""

    def __init__(
        self, inner: Any, *, size: tuple[int, int] | None = None, steps: int | None = None
    ) -> None:
        self.inner = inner
        self.size = size
        self.steps = steps

    def _generation(self, request: ImageRequest) -> ImageRequest:
        width, height = self.size or (request.width, request.height)
        steps = request.steps if request.steps is not None else self.steps
        return replace(request, width=width, height=height, steps=steps)

    def _edit(self, request: EditRequest) -> EditRequest:
        return replace(request, steps=request.steps if request.steps is not None else self.steps)

    async def generate(self, request: ImageRequest) -> Image.Image:
        return await self.inner.generate(self._generation(request))

    async def edit(self, request: EditRequest) -> Image.Image:
        return await self.inner.edit(self._edit(request))


class SizedTracedImageModel(SizedImageModel):
    """A :class:`SizedImageModel` around a :class:`~nodes.backends.base.TracedImageModel`, and
    one itself: its traced draws and edits take the same size and steps."""

    async def generate_traced(self, request: ImageRequest) -> Any:
        return await self.inner.generate_traced(self._generation(request))

    async def edit_traced(self, request: EditRequest) -> Any:
        return await self.inner.edit_traced(self._edit(request))


def sized_image_model(
    inner: Any, *, size: tuple[int, int] | None = None, steps: int | None = None
) -> SizedImageModel:
    """``inner`` drawing at ``size`` with default ``steps``; traced when ``inner`` is."""
    wrapper = SizedTracedImageModel if isinstance(inner, TracedImageModel) else SizedImageModel
    return wrapper(inner, size=size, steps=steps)
