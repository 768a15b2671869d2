"""``OpenAIChatClient``: a chat model behind the OpenAI chat API as vLLM serves it.

Works against vLLM (``vllm serve ...``) and Atelier's own ``atelier serve lm``; nothing in it is
specific to a model family. Sampling returns token ids and their log-probs; ``score_text``
returns the log-probs of a *given* text (vLLM's ``prompt_logprobs``, two requests);
``next_token_logprobs`` the top-k first tokens of the reply by id (one request: what the yes/no
judge reads when each answer is one token); LoRA adapters are
selected by model name and loaded or unloaded at run time on every server of the pool.

vLLM notes: ``return_token_ids`` needs vLLM >= 0.10.2 (older: ``legacy_token_ids=True``, which
reads ids from ``return_tokens_as_token_ids``); ``score_text`` uses ``prompt_logprobs`` (the old
V0 engine refuses it with prefix caching on: serve with ``--no-enable-prefix-caching`` there);
runtime LoRA needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``.

Every sampling field the stored log-probs depend on is sent with each chat request
(:data:`PINNED_SAMPLING`): vLLM fills any sampling field a request omits from the model's
``generation_config.json`` (Qwen2.5-VL-7B ships ``top_k=1``, ``repetition_penalty=1.05``: all
samples of a group would be identical and the log-probs would not be the behaviour policy's).
Fields the caller leaves unset go out neutral (``top_k=-1``, ``min_p=0``,
``repetition_penalty=1``); ``extra_body`` overrides any of them. Starting vLLM with
``--generation-config vllm`` (vLLM's neutral defaults) is still advisable for other clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from nodes.backends.base import (
    ChatMessage,
    ChatRequest,
    NextTokenLogprobs,
    ScoredText,
    TextCompletion,
)
from nodes.backends.clients.pool import RetryPolicy, ServerPool, Strategy, Timeouts
from nodes.backends.wire import (
    WireFormatError,
    common_prefix_length,
    messages_payload,
    parse_chat_completion,
    parse_next_token_logprobs,
    prompt_token_logprobs,
    scoring_messages,
    text_span,
)

CHAT_PATH = "/v1/chat/completions"
PINNED_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")
"""The fields vLLM takes from the model's ``generation_config.json`` when a request omits them
(``ModelConfig.get_diff_sampling_param`` in ``vllm/config/model.py``: ``repetition_penalty``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, and ``max_new_tokens`` as ``max_tokens``;
``ChatCompletionRequest.to_sampling_params`` applies them to omitted fields). Every chat request
sends each of them."""
NEUTRAL_SAMPLING: dict[str, Any] = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
"""What the optional ones are sent as when the caller leaves them unset: vLLM's "off" values.
``top_k=-1`` rather than 0: every vLLM version accepts -1 as off (recent ones also take 0, old
ones refuse it), and so does ``atelier serve lm``."""
_NOT_SAMPLING = frozenset({"model", "messages"})


class OpenAIChatClient:
    """A :class:`~nodes.backends.base.ScoringChatModel` over HTTP.

    ``urls``: one or more base URLs of equivalent servers (``http://host:8000``; a trailing
    ``/v1`` is accepted). ``model``: the served model name (None: ask ``/v1/models`` once).
    ``adapter``: a LoRA adapter name to request instead of the base model.
    ``legacy_token_ids``: also ask for ``return_tokens_as_token_ids`` (vLLM < 0.10.2 has no
    ``return_token_ids``; ids are then read from the log-prob tokens).
    """

    def __init__(
        self,
        urls: Sequence[str] | str | None = None,
        *,
        model: str | None = None,
        adapter: str | None = None,
        token: str | None = None,
        strategy: Strategy = "least_inflight",
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        extra_body: Mapping[str, Any] | None = None,
        legacy_token_ids: bool = False,
        pool: ServerPool | None = None,
    ) -> None:
        if pool is None:
            if urls is None:
                raise ValueError("OpenAIChatClient needs urls or a pool")
            pool = ServerPool(urls, token=token, strategy=strategy, retry=retry, timeouts=timeouts)
        self.pool = pool
        self.model = model
        self.adapter = adapter
        self.extra_body = dict(extra_body or {})
        self.legacy_token_ids = legacy_token_ids

    @property
    def model_id(self) -> str:
        return self.adapter or self.model or "openai-chat"

    def with_adapter(self, adapter: str | None) -> OpenAIChatClient:
        """The same servers and connections, requesting LoRA adapter ``adapter`` (None = base)."""
        return OpenAIChatClient(
            model=self.model,
            adapter=adapter,
            extra_body=self.extra_body,
            legacy_token_ids=self.legacy_token_ids,
            pool=self.pool,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    # --- the ChatModel protocol --------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> TextCompletion:
        sampling = request.sampling
        payload: dict[str, Any] = {
            "model": await self._model_name(),
            "messages": messages_payload(request.messages),
            # Every field vLLM would otherwise take from generation_config.json (PINNED_SAMPLING),
            # neutral unless set; extra_body, spread last, wins over all of them.
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            **NEUTRAL_SAMPLING,
            **{
                key: value
                for key in ("top_k", "repetition_penalty")
                if (value := getattr(sampling, key)) is not None
            },
            "max_tokens": sampling.max_tokens,
            "logprobs": sampling.logprobs,
            "return_token_ids": True,
            **self.extra_body,
        }
        if sampling.seed is not None:
            payload["seed"] = sampling.seed
        if request.response_format is not None:
            payload["response_format"] = dict(request.response_format)
        if self.legacy_token_ids:
            payload["return_tokens_as_token_ids"] = True
        body = await self.pool.post_json("chat", CHAT_PATH, payload)
        # What was sent besides the model and the (base64-laden) messages, for the step record.
        sent = {k: v for k, v in payload.items() if k not in _NOT_SAMPLING}
        try:
            return parse_chat_completion(body, payload["model"], sampling=sent)
        except (WireFormatError, KeyError, TypeError, ValueError) as error:
            raise WireFormatError(f"chat response from {self.pool.urls}: {error}") from None

    async def score_text(
        self, messages: Sequence[ChatMessage], text: str, image: Image.Image | None = None
    ) -> ScoredText:
        """Log-probs of ``text`` as the assistant's reply, from vLLM's ``prompt_logprobs``.

        Two requests (sent together, one token generated each): the conversation with the text
        in a final assistant turn (``continue_final_message``, ``prompt_logprobs``), and the same
        conversation with only the generation prompt. Their ``prompt_token_ids`` agree up to
        where the text starts, so the text's tokens are found by token ids, never by
        re-tokenising, and image placeholder tokens (part of the shared prefix) are excluded.
        """
        context = scoring_messages(messages, image)
        model = await self._model_name()
        base = {
            "model": model,
            "max_tokens": 1,
            "temperature": 0.0,
            "return_token_ids": True,
            **self.extra_body,
        }
        full_payload = {
            **base,
            "messages": messages_payload([*context, ChatMessage("assistant", text)]),
            "add_generation_prompt": False,
            "continue_final_message": True,
            "prompt_logprobs": 1,
        }
        prefix_payload = {
            **base,
            "messages": messages_payload(context),
            "add_generation_prompt": True,
        }
        full, prefix = await asyncio.gather(
            self.pool.post_json("score_text", CHAT_PATH, full_payload),
            self.pool.post_json("score_text", CHAT_PATH, prefix_payload),
        )
        ids, logprobs = prompt_token_logprobs(full)
        prefix_ids = prefix.get("prompt_token_ids")
        if prefix_ids is None:
            raise WireFormatError("score_text: the server did not return prompt_token_ids")
        start = text_span(ids, prefix_ids)
        scored = logprobs[start:]
        if any(lp is None for lp in scored):
            raise WireFormatError("score_text: a text token has no prompt log-prob")
        return ScoredText(
            token_ids=tuple(ids[start:]),
            logprobs=tuple(float(lp) for lp in scored),  # type: ignore[arg-type]
            model=str(full.get("model") or model),
            at_generation_start=common_prefix_length(ids, prefix_ids) == len(prefix_ids),
        )

    async def next_token_logprobs(
        self, messages: Sequence[ChatMessage], k: int
    ) -> NextTokenLogprobs:
        """The ``k`` most likely first tokens of the reply to ``messages``, by token id, in one
        request: ``max_tokens=1``, ``logprobs``, ``top_logprobs=k`` (vLLM refuses k above its
        ``--max-logprobs``, 20 by default) and ``return_tokens_as_token_ids`` (the tokens come
        back as ``"token_id:<id>"``, so they are matched by id, never by their text). Greedy,
        with every field of :data:`PINNED_SAMPLING` neutral, so the log-probs are the raw ones
        whatever the server's logprobs mode; ``extra_body`` cannot override these fields."""
        payload: dict[str, Any] = {
            **self.extra_body,
            "model": await self._model_name(),
            "messages": messages_payload(messages),
            "temperature": 0.0,
            "top_p": 1.0,
            **NEUTRAL_SAMPLING,
            "max_tokens": 1,
            "seed": 0,
            "logprobs": True,
            "top_logprobs": k,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        body = await self.pool.post_json("next_token_logprobs", CHAT_PATH, payload)
        return parse_next_token_logprobs(body, payload["model"])

    # --- LoRA adapters and models ------------------------------------------------------------

    async def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load LoRA adapter ``name`` from ``path`` (as the *server* sees it) on every server.

        vLLM needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``.
        ``inplace`` replaces an adapter already loaded under that name.
        """
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

    async def models(self) -> list[str]:
        body = await self.pool.get_json("models", "/v1/models")
        return [str(m["id"]) for m in body.get("data", [])]

    async def _model_name(self) -> str:
        if self.adapter:
            return self.adapter
        if not self.model:  # ask once; a concurrent duplicate ask is harmless
            names = await self.models()
            if not names:
                raise WireFormatError(f"{self.pool.urls} serve no model")
            self.model = names[0]
        return self.model
