"""In-process text models: ``LMService`` (a :class:`~nodes.backends.engines.service.ModelService`
around a transformers engine) and ``InProcessChatModel``.

``InProcessChatModel`` implements :class:`~nodes.backends.base.ScoringChatModel` without HTTP:
concurrent graph calls are batched exactly as the ``lm`` server batches HTTP requests (the
server is a thin wrapper around the same :class:`LMService`). torch and transformers are
imported only when a service is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from nodes.backends.base import (
    ChatMessage,
    ChatRequest,
    NextTokenLogprobs,
    ScoredText,
    TextCompletion,
)
from nodes.backends.engines.service import ModelService
from nodes.backends.lm_types import LMRequest, LMResult, PromptMessage
from nodes.backends.wire import (
    common_prefix_length,
    sampling_payload,
    scoring_messages,
    text_span,
)


class LMService(ModelService[LMRequest, LMResult]):
    """One loaded text model (:class:`~nodes.backends.engines.transformers_lm.TransformersLM`)
    served to concurrent callers in dynamic batches."""

    MAX_BATCH = 8
    MAX_WAIT_MS = 5.0
    THREAD_NAME = "atelier-lm"

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        max_batch: int | None = None,
        max_wait_ms: float | None = None,
        torch_threads: int | None = None,
    ) -> LMService:
        from nodes.backends.engines.transformers_lm import TransformersLM

        engine = TransformersLM(model_dir, name=name, device=device, dtype=dtype)
        return cls(
            engine, max_batch=max_batch, max_wait_ms=max_wait_ms, torch_threads=torch_threads
        )

    async def encode_ids(self, request: LMRequest) -> list[int]:
        """The prompt's token ids (no forward pass), on the model's worker thread."""
        encoded = await self.call(self.engine.encode, request)
        return list(encoded.input_ids)

    def models(self) -> list[str]:
        return [self.name, *self.engine.adapters]


class InProcessChatModel:
    """A chat model in this process; ``adapter`` selects a loaded LoRA adapter by name."""

    def __init__(self, service: LMService, *, adapter: str | None = None) -> None:
        self.service = service
        self.adapter = adapter

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> InProcessChatModel:
        return cls(LMService.from_pretrained(model_dir, **kwargs))

    @property
    def model_id(self) -> str:
        return self.adapter or self.service.name

    def with_adapter(self, adapter: str | None) -> InProcessChatModel:
        return InProcessChatModel(self.service, adapter=adapter)

    async def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        await self.service.load_adapter(name, path, inplace=inplace)

    async def unload_adapter(self, name: str) -> None:
        await self.service.unload_adapter(name)

    async def chat(self, request: ChatRequest) -> TextCompletion:
        sampling = request.sampling
        result = await self.service.run(
            LMRequest(
                messages=[PromptMessage.from_chat(m) for m in request.messages],
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                repetition_penalty=sampling.repetition_penalty,
                seed=sampling.seed,
                adapter=self.adapter,
                response_format=request.response_format,
            )
        )
        return TextCompletion(
            text=result.text,
            token_ids=tuple(result.token_ids),
            logprobs=tuple(result.logprobs) if sampling.logprobs else (),
            model=self.model_id,
            finish_reason=result.finish_reason,
            prompt_token_ids=tuple(result.prompt_token_ids),
            sampling=sampling_payload(sampling),
        )

    async def score_text(
        self, messages: Sequence[ChatMessage], text: str, image: Image.Image | None = None
    ) -> ScoredText:
        """As the HTTP client does it: prompt log-probs of the conversation with ``text`` in
        the assistant turn, and the text's tokens found against the generation prompt."""
        context = [PromptMessage.from_chat(m) for m in scoring_messages(messages, image)]
        full = await self.service.run(
            LMRequest(
                messages=[*context, PromptMessage("assistant", (text,))],
                add_generation_prompt=False,
                continue_final_message=True,
                max_tokens=0,
                prompt_logprobs=0,
                adapter=self.adapter,
            )
        )
        prefix_ids = await self.service.encode_ids(LMRequest(messages=context, max_tokens=0))
        start = text_span(full.prompt_token_ids, prefix_ids)
        ids = full.prompt_token_ids[start:]
        logprobs = [
            full.prompt_token_logprob(pos) for pos in range(start, len(full.prompt_token_ids))
        ]
        return ScoredText(
            token_ids=tuple(ids),
            logprobs=tuple(float(lp) for lp in logprobs if lp is not None),
            model=self.model_id,
            at_generation_start=(
                common_prefix_length(full.prompt_token_ids, prefix_ids) == len(prefix_ids)
            ),
        )

    async def next_token_logprobs(
        self, messages: Sequence[ChatMessage], k: int
    ) -> NextTokenLogprobs:
        """The ``k`` most likely first tokens of the reply to ``messages`` (raw log-probs, one
        greedy step), as the HTTP client's one request gets them."""
        result = await self.service.run(
            LMRequest(
                messages=[PromptMessage.from_chat(m) for m in messages],
                max_tokens=1,
                temperature=0.0,
                top_logprobs=k,
                adapter=self.adapter,
            )
        )
        if not result.top_logprobs:
            raise ValueError("the model generated no token to read log-probs from")
        return NextTokenLogprobs(
            logprobs={token: lp.logprob for token, lp in result.top_logprobs[0].items()},
            prompt_token_ids=tuple(result.prompt_token_ids),
            model=self.model_id,
        )
