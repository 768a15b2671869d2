"""Backend protocols: the only way nodes reach a model.

Every model a node calls sits behind one of these small async protocols, so the same node runs
against ShapeWorld (simulated, in-process), Atelier's own HTTP servers, or vLLM on a GPU. The
request/response types are plain frozen dataclasses: cheap to build, easy to log, and free of
any transport detail.

Roles: the graph's context names one backend per role (planner, reflector, decomposer: chat
models; generator; editor; optional judge). One object may serve several roles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class SamplingParams:
    """How a chat model samples. Defaults follow common vLLM usage for RL rollouts."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    """New tokens at most. Atelier's engines clamp it to what the model's context leaves after
    the prompt; a config's ``sampling.max_tokens`` sets it per backend or role."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (-1 or 0: all; None: all — the HTTP chat
    client then sends -1, since vLLM would take an omitted one from the model's
    ``generation_config.json``)."""
    repetition_penalty: float | None = None
    """Penalise tokens already seen (> 1 discourages repeats; None: off — sent as 1)."""
    seed: int | None = None
    """Per-request seed; the nodes derive it from the trajectory seed so runs are reproducible."""
    logprobs: bool = True
    """Ask for the sampled tokens' log-probs (needed to train on the output later)."""


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    text: str
    images: tuple[Image.Image, ...] = ()
    image_refs: tuple[str, ...] = ()
    """The image store's references of ``images``, in the same order, when the caller has them
    (the node read the image from the store): the step's record names the images by these
    instead of hashing the pixels again. Never sent to a model."""


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = SamplingParams()
    response_format: Mapping[str, Any] | None = None
    """A JSON schema (OpenAI ``response_format`` shape) for structured outputs, or None."""
    fields: Mapping[str, str] = field(default_factory=dict)
    """The structured values the node's prompt template was filled with (e.g. ``prompt``,
    ``target``). Remote clients ignore them: the model reads the rendered messages. Simulated
    backends read them instead of parsing prose; they carry no information the messages lack."""


@dataclass(frozen=True)
class TextCompletion:
    text: str
    token_ids: tuple[int, ...] = ()
    """Sampled token ids, exactly as the server produced them (never re-tokenised)."""
    logprobs: tuple[float, ...] = ()
    """Sampling-time log-prob of each token in ``token_ids`` (same length, or empty)."""
    model: str = ""
    finish_reason: str = "stop"
    prompt_token_ids: tuple[int, ...] | None = None
    """The prompt's token ids as the server encoded it (vLLM's top-level ``prompt_token_ids``
    with ``return_token_ids``), None when the backend does not say."""
    sampling: Mapping[str, Any] | None = None
    """Every request field the backend sent besides the model and the messages (sampling
    parameters, ``logprobs``, ``response_format``...), exactly as sent; None: the backend does
    not say (the step records the :class:`SamplingParams` it asked for instead)."""


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    width: int = 256
    height: int = 256
    seed: int = 0
    steps: int | None = None


@dataclass(frozen=True)
class EditRequest:
    image: Image.Image
    instruction: str
    seed: int = 0
    steps: int | None = None


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one image against one text. ``score`` is V in [0, 1]."""

    score: float
    correct: bool
    criteria: Mapping[str, bool] = field(default_factory=dict)
    detail: str = ""


@runtime_checkable
class ChatModel(Protocol):
    """A text or vision-language model behind a chat API."""

    model_id: str

    async def chat(self, request: ChatRequest) -> TextCompletion: ...


@dataclass(frozen=True)
class ScoredText:
    """Log-probs of a *given* text under a chat model (teacher forcing), token by token."""

    token_ids: tuple[int, ...]
    """The text's tokens as the model tokenised it in context (image tokens never included)."""
    logprobs: tuple[float, ...]
    """``log p(token_j | messages, image, tokens_<j)`` for each token (same length)."""
    model: str = ""
    at_generation_start: bool | None = None
    """True when the text's tokens follow the generation prompt's tokens exactly (the
    conversation with only the assistant header, no token merged across the boundary): the
    text's first token is then the first token a chat request for the same messages generates.
    False when they do not; None when the backend does not say."""

    @property
    def mean_logprob(self) -> float:
        """Mean per-token log-prob; ``exp`` of it is GvU's geometric-mean probability."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


@runtime_checkable
class ScoringChatModel(ChatModel, Protocol):
    """A chat model that can also score a given text (what the GvU intrinsic reward needs).

    Kept apart from :class:`ChatModel` so simulated chat models (ShapeWorld, scripted tests)
    remain chat models without it; every real backend (HTTP clients, in-process) has both.
    """

    async def score_text(
        self, messages: Sequence[ChatMessage], text: str, image: Image.Image | None = None
    ) -> ScoredText:
        """Log-probs of ``text`` as the assistant's reply to ``messages``; ``image``, when
        given, is attached to the last user message (a new user turn if there is none)."""
        ...


@dataclass(frozen=True)
class NextTokenLogprobs:
    """The most likely first tokens of the assistant's reply to a conversation."""

    logprobs: Mapping[int, float]
    """Token id → ``log p(token | messages)`` at the first generated position, for the k most
    likely tokens (raw log-probs: no temperature, penalty or truncation applied)."""
    prompt_token_ids: tuple[int, ...] | None = None
    """The prompt's token ids as the backend encoded it, when it says."""
    model: str = ""


@runtime_checkable
class NextTokenScorer(Protocol):
    """A chat model that returns the top-k log-probs of its first generated token in one call
    (vLLM: ``max_tokens=1``, ``logprobs``, ``top_logprobs=k``). A yes/no judge reads both
    answers from one such call when each answer is one token (``nodes.backends.vlm_judge``)."""

    model_id: str

    async def next_token_logprobs(
        self, messages: Sequence[ChatMessage], k: int
    ) -> NextTokenLogprobs: ...


@runtime_checkable
class ImageGenerator(Protocol):
    model_id: str

    async def generate(self, request: ImageRequest) -> Image.Image: ...


@runtime_checkable
class ImageEditor(Protocol):
    model_id: str

    async def edit(self, request: EditRequest) -> Image.Image: ...


@runtime_checkable
class TracedImageModel(Protocol):
    """An image model that returns, with each image, the stochastic denoising transitions that
    produced it (``nodes.backends.flow.transitions.TracedImage``), for Flow-GRPO.

    The one way a node learns that a model records transitions: the draw and refine nodes call
    the traced methods of a backend that ``isinstance(backend, TracedImageModel)``, and record
    the transitions with the step. So a backend has these methods only when it really traces
    (``FlowImageModel``, ``TracedOmniImageClient``; a wrapper only around a traced backend)."""

    model_id: str

    async def generate_traced(self, request: ImageRequest) -> Any: ...

    async def edit_traced(self, request: EditRequest) -> Any: ...


@runtime_checkable
class Judge(Protocol):
    """Scores an image against a text (GenEval-style checker, VLM yes-probability, ...)."""

    model_id: str

    async def judge(self, image: Image.Image, text: str) -> Judgement: ...


class BackendError(RuntimeError):
    """A backend could not answer. Nodes turn it into a recorded failure, never a crash."""


class BackendUnavailable(BackendError):
    """No server answered (connection errors, timeouts, 5xx) after every retry."""

    def __init__(self, message: str, *, url: str = "", kind: str = "", status: int | None = None):
        super().__init__(message)
        self.url = url
        self.kind = kind
        self.status = status


class BackendRequestError(BackendError):
    """A server refused the request (4xx): retrying the same request cannot help."""

    def __init__(self, message: str, *, url: str = "", kind: str = "", status: int | None = None):
        super().__init__(message)
        self.url = url
        self.kind = kind
        self.status = status
