"""Scripted model backends for graph tests: each role answers from a list of canned outputs.

They stand in for a model whose exact output a test must control (a malformed reflection, a
stop phrase at round 3); everything else in the graph — LangGraph, the nodes, the policies, the
image store, the recording wrapper — runs for real.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from nodes.backends.base import ChatRequest, EditRequest, ImageRequest, Judgement, TextCompletion


class ScriptedChat:
    def __init__(self, outputs: Sequence[str], model_id: str = "scripted-chat") -> None:
        self.outputs = list(outputs)
        self.requests: list[ChatRequest] = []
        self.model_id = model_id

    async def chat(self, request: ChatRequest) -> TextCompletion:
        self.requests.append(request)
        text = self.outputs[min(len(self.requests), len(self.outputs)) - 1]
        ids = tuple(range(1, len(text.split()) + 1))
        return TextCompletion(
            text=text, token_ids=ids, logprobs=tuple(-0.5 for _ in ids), model=self.model_id
        )


class CountingPainter:
    """Generator/editor whose images encode how many times it has painted (distinct bytes)."""

    model_id = "counting-painter"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _image(self) -> Image.Image:
        shade = (len(self.calls) * 37) % 256
        return Image.new("RGB", (8, 8), (shade, 255 - shade, 0))

    async def generate(self, request: ImageRequest) -> Image.Image:
        self.calls.append(f"generate:{request.prompt}")
        return self._image()

    async def edit(self, request: EditRequest) -> Image.Image:
        self.calls.append(f"edit:{request.instruction}")
        return self._image()


class FixedJudge:
    model_id = "fixed-judge"

    def __init__(self, score: float = 0.5) -> None:
        self.score = score

    async def judge(self, image: Image.Image, text: str) -> Judgement:
        return Judgement(score=self.score, correct=self.score >= 1.0)
