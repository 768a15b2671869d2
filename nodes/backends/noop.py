"""Backends that answer at once with fixed outputs: for measuring the framework's own cost.

``NoopBackends`` makes every role instantaneous (a tiny fixed image, a fixed text), so a run's
time is the graph's, the nodes' and the recorder's, nothing else. The reflector asks for
``edits`` corrections, then says the stop phrase, so the loop length is known.
"""

from __future__ import annotations

import asyncio

from PIL import Image

from nodes.backends.base import ChatRequest, EditRequest, ImageRequest, Judgement, TextCompletion
from nodes.formats import format_reflection


class NoopChat:
    def __init__(self, text: str, model_id: str = "noop-chat", latency_s: float = 0.0) -> None:
        self.text = text
        self.model_id = model_id
        self.latency_s = latency_s

    async def chat(self, request: ChatRequest) -> TextCompletion:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return TextCompletion(
            text=self.text, token_ids=(1, 2, 3), logprobs=(-0.1, -0.2, -0.3), model=self.model_id
        )


class NoopReflector:
    """Asks for ``edits`` corrections per target, then stops."""

    model_id = "noop-reflector"

    def __init__(self, edits: int = 1, latency_s: float = 0.0) -> None:
        self.edits = edits
        self.latency_s = latency_s

    async def chat(self, request: ChatRequest) -> TextCompletion:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        # NoopPainter counts edits in the red channel of the image it is shown.
        edits_made = request.messages[-1].images[-1].getpixel((0, 0))[0]
        done = edits_made >= self.edits
        text = format_reflection("checked", None if done else "Add one red circle.")
        return TextCompletion(
            text=text, token_ids=(1, 2), logprobs=(-0.5, -0.5), model=self.model_id
        )


class NoopPainter:
    """Generator and editor: an 8×8 image whose red channel counts the edits made so far."""

    model_id = "noop-painter"

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s

    async def generate(self, request: ImageRequest) -> Image.Image:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return Image.new("RGB", (8, 8), (0, request.seed % 256, 0))

    async def edit(self, request: EditRequest) -> Image.Image:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        red, green, _ = request.image.getpixel((0, 0))
        return Image.new("RGB", (8, 8), (red + 1, green, 0))


class NoopJudge:
    model_id = "noop-judge"

    async def judge(self, image: Image.Image, text: str) -> Judgement:
        return Judgement(score=1.0, correct=True)
