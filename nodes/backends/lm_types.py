"""Plain request/result types of Atelier's text-model engine (no torch: shared by the engine,
the in-process backend and the ``lm`` server)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from nodes.backends.base import BackendError, ChatMessage


class InvalidRequest(BackendError, ValueError):
    """The request cannot be served as given (HTTP 400)."""


class UnknownModel(BackendError, KeyError):
    """No base model or LoRA adapter of that name is loaded (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class PromptMessage:
    """One chat turn as the engine sees it: ordered text and image parts."""

    role: str
    parts: tuple[str | Image.Image, ...]

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @classmethod
    def from_chat(cls, message: ChatMessage) -> PromptMessage:
        """Images first, then the text (the same order the HTTP clients send)."""
        parts: tuple[str | Image.Image, ...] = tuple(message.images)
        if message.text or not parts:
            parts = (*parts, message.text)
        return cls(message.role, parts)


@dataclass(frozen=True)
class LMRequest:
    messages: Sequence[PromptMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    max_tokens: int = 256
    """New tokens to sample at most (0: score the prompt only)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    """Sample from the k most likely tokens only (None: all)."""
    repetition_penalty: float | None = None
    """vLLM's (and transformers'): logits of tokens already in the prompt or the output are
    divided by it when positive, multiplied when negative (None or 1: off)."""
    seed: int | None = None
    top_logprobs: int = 0
    """Also return this many most likely tokens at each sampled position."""
    prompt_logprobs: int | None = None
    """None: no prompt log-probs; k >= 0: each prompt token's log-prob plus the top k."""
    adapter: str | None = None
    """LoRA adapter to run with (None: the base model)."""
    response_format: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    rank: int
    decoded: str


@dataclass
class LMResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Raw (unprocessed) log-prob of each sampled token, as vLLM's default ``raw_logprobs``."""
    top_logprobs: list[dict[int, TokenLogprob]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, TokenLogprob] | None] | None = None
    """Per prompt position: ``None`` for the first; else the prompt token (+ top k)."""
    text: str = ""
    finish_reason: str = "stop"
    decoded_tokens: list[str] = field(default_factory=list)

    def prompt_token_logprob(self, position: int) -> float | None:
        assert self.prompt_logprobs is not None
        entry = self.prompt_logprobs[position]
        if entry is None:
            return None
        return entry[self.prompt_token_ids[position]].logprob
