"""Small helpers every node uses: seeds, timed model calls, and the step trace."""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

from nodes.backends.base import ChatMessage, ChatModel, ChatRequest, SamplingParams
from nodes.backends.flow.transitions import DiffusionTransition
from nodes.backends.wire import message_record, sampling_payload
from nodes.state import ImageRecord
from storage.images import encode_png, image_ref

TRACE_KEY = "trace"
"""Key of a node's update under which it reports its :class:`NodeTrace`; the recording
wrapper removes it before the update reaches the graph state."""


@dataclass(frozen=True)
class Generation:
    """One text a model produced in a step, with what training needs to reuse it: the request
    as sent and the prompt's token ids, so a trainer never re-renders or re-tokenises."""

    role: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    model: str
    latency_s: float
    messages: list[dict[str, Any]] | None = None
    """The chat messages as sent (OpenAI shape, :func:`~nodes.backends.wire.message_record`):
    image parts are ``{"type": "image_ref", "ref": <sha256>}``, never pixels."""
    sampling: dict[str, Any] | None = None
    """The request's other fields as sent (temperature, top_p, max_tokens, seed, ...)."""
    prompt_token_ids: tuple[int, ...] | None = None
    """The prompt's token ids as the model saw them, when the backend returns them."""


@dataclass
class NodeTrace:
    """What a step did beyond its state update: texts sampled, images read and written."""

    generations: list[Generation] = field(default_factory=list)
    images_in: list[str] = field(default_factory=list)
    images_out: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    """Ids of every model called, texts and images alike."""
    transitions: list[DiffusionTransition] = field(default_factory=list)
    """Stochastic denoising steps of the images made (traced generators only; Flow-GRPO)."""


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (never Python's salted ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def step_rng(seed: int, step: int, salt: str) -> random.Random:
    return random.Random(derive_seed(seed, step, salt))


async def call_chat(
    model: ChatModel,
    role: str,
    messages: list[ChatMessage],
    sampling: SamplingParams,
    seed: int,
    trace: NodeTrace,
    *,
    fields: dict[str, str] | None = None,
    response_format: dict | None = None,
) -> Generation:
    request = ChatRequest(
        messages=tuple(messages),
        sampling=replace(sampling, seed=seed),
        response_format=response_format,
        fields=fields or {},
    )
    started = time.perf_counter()
    completion = await model.chat(request)
    latency_s = time.perf_counter() - started
    sent = completion.sampling
    prompt_ids = completion.prompt_token_ids
    generation = Generation(
        role=role,
        text=completion.text,
        token_ids=tuple(completion.token_ids),
        logprobs=tuple(completion.logprobs),
        model=completion.model or model.model_id,
        latency_s=latency_s,
        messages=[message_record(m, _image_refs(m)) for m in request.messages],
        sampling=dict(sent) if sent is not None else sampling_payload(request.sampling),
        prompt_token_ids=None if prompt_ids is None else tuple(prompt_ids),
    )
    trace.generations.append(generation)
    trace.models.append(generation.model)
    return generation


def _image_refs(message: ChatMessage) -> tuple[str, ...]:
    """The store references of a message's images: the caller's when it gave them, else the
    sha256 of each image's PNG, as the image store would name it (the step then names an image
    that is stored only if the node stored it)."""
    if not message.images or len(message.image_refs) == len(message.images):
        return message.image_refs
    return tuple(image_ref(encode_png(image)) for image in message.images)


async def save_image(
    runtime_context: Any, state: Any, image: Any, node: str, instruction: str, trace: NodeTrace
) -> Any:
    """Put an image in the store, optionally score it against the task prompt, and trace it."""
    ref = runtime_context.images.put(image)
    trace.images_out.append(ref)
    score = None
    judge = runtime_context.backends.judge
    if judge is not None and runtime_context.settings.score_images:
        judgement = await judge.judge(image, state.task.prompt)
        score = float(judgement.score)
    return ImageRecord(ref=ref, node=node, instruction=instruction, score=score)
