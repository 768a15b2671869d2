"""``atelier serve lm``: a transformers chat model behind the OpenAI chat API as vLLM serves it.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /stats``
(batch sizes), ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

Chat fields honoured: ``model`` (base or LoRA adapter name), ``messages`` (text and base64
``image_url`` data-URL parts; remote URLs are refused), ``temperature``, ``top_p``, ``top_k``
(-1 or 0: off), ``repetition_penalty``, ``min_p`` (0 only: there is no min-p filter here, so
another value is a 400, not ignored), ``max_tokens`` / ``max_completion_tokens`` (clamped to
what the model's context leaves after the prompt; a prompt that alone fills it is a 400),
``seed``, ``logprobs``, ``top_logprobs`` (at most 20, vLLM's default ``--max-logprobs``),
``prompt_logprobs``, ``return_token_ids``, ``return_tokens_as_token_ids`` (log-prob tokens,
the top ones included, spelled ``"token_id:<id>"``), ``add_generation_prompt``,
``continue_final_message``, ``response_format``.
``response_format`` is best effort: decoding is not constrained; the model's text is returned
as produced and ``choices[0].structured_output`` says whether it parsed as JSON. Not
supported: ``n > 1``, streaming, tools, stop strings.

A LoRA load that fails is a 400 with the reason and changes nothing (the base model and the
other adapters answer as before); unloading an adapter that is not loaded is a 404.
``runtime_lora=False`` (``--no-runtime-lora``) leaves both endpoints out, as vLLM does without
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``.

Bounded work (:class:`~nodes.backends.servers.http_common.ServerLimits`): prompt characters
(checked before tokenising; by default 32 per token of the model's context), images and decoded
pixels per request, ``max_tokens``, the deadline (504); a full queue is a 503 with
``Retry-After``; a request whose client disconnects stops between generated tokens.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodes.backends.engines.lm_inprocess import LMService
from nodes.backends.lm_types import (
    InvalidRequest,
    LMRequest,
    LMResult,
    PromptMessage,
    TokenLogprob,
    UnknownModel,
)
from nodes.backends.servers.http_common import (
    HTTPError,
    LoraBody,
    ServerLimits,
    base_app,
    bound_service,
    check_adapter_path,
    guard,
    prompt_chars_check,
    read_json,
    run_bounded,
    without_path,
)
from nodes.backends.wire import ImageDecodeError, decode_b64_image

CHARS_PER_TOKEN = 32
"""The default prompt limit is this many characters per token of the model's context: far
above what any tokeniser packs into one token, so a prompt that fits is never refused."""


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=1e6, allow_inf_nan=False)
    """vLLM takes any positive value (and any temperature); far outside these bounds the
    scaled float32 logits overflow to inf or NaN and sampling fails for the whole batch, so
    such values are refused here."""
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    response_format: dict[str, Any] | None = None
    n: int = 1
    stream: bool = False


def create_lm_app(
    service: LMService,
    *,
    token: str | None = None,
    limits: ServerLimits | None = None,
    default_max_tokens: int = 256,
    max_tokens_limit: int = 4096,
    runtime_lora: bool = True,
) -> Any:
    """The ASGI app (guarded by the token and size limits) serving ``service``.
    ``limits`` bound the service's queue and each batch's run time; ``runtime_lora=False``
    leaves out ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (404)."""
    limits = limits or ServerLimits()
    bound_service(service, limits)
    context = int(getattr(service.engine, "max_model_len", 0) or 0)
    prompt_limit = limits.max_prompt_chars or (CHARS_PER_TOKEN * context if context else None)
    app = base_app("Atelier lm server", service)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [_model_card(service.name, created, root=str(service.engine.model_dir))]
        data += [
            _model_card(name, created, root=path, parent=service.name)
            for name, path in service.engine.adapters.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = _validate(ChatBody, await read_json(request))
        lm_request = _lm_request(
            body, service, limits, default_max_tokens, max_tokens_limit, prompt_limit
        )
        try:
            result = await run_bounded(request, service.run(lm_request), limits)
        except HTTPError:
            raise
        except UnknownModel as error:
            raise HTTPError(404, str(error), "not_found_error") from None
        except (InvalidRequest, ValueError) as error:
            raise HTTPError(400, str(error)) from None
        except Exception as error:
            raise HTTPError(500, f"{type(error).__name__}: {error}", "internal_error") from None
        return _chat_response(body, lm_request, result, service.engine)

    async def load_lora(request: Request) -> PlainTextResponse:
        body = _validate(LoraBody, await read_json(request))
        if not body.lora_path:
            raise HTTPError(400, "lora_path is required")
        check_adapter_path(body.lora_path)
        try:
            await service.load_adapter(body.lora_name, body.lora_path, inplace=body.load_inplace)
        except (InvalidRequest, ValueError) as error:
            raise HTTPError(400, without_path(str(error), body.lora_path)) from None
        except Exception as error:  # the engine rolled the model back; say what happened
            message = without_path(f"{type(error).__name__}: {error}", body.lora_path)
            raise HTTPError(500, message, "internal_error") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora(request: Request) -> PlainTextResponse:
        body = _validate(LoraBody, await read_json(request))
        try:
            await service.unload_adapter(body.lora_name)
        except UnknownModel as error:
            raise HTTPError(404, str(error), "not_found_error") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    if runtime_lora:
        app.post("/v1/load_lora_adapter")(load_lora)
        app.post("/v1/unload_lora_adapter")(unload_lora)
    return guard(app, token, limits)


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()
        )
        raise HTTPError(400, f"invalid request: {problems}") from None


def _model_card(name: str, created: int, *, root: str, parent: str | None = None) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "atelier",
        "root": root,
        "parent": parent,
    }


def _lm_request(
    body: ChatBody,
    service: LMService,
    limits: ServerLimits,
    default_max_tokens: int,
    max_tokens_limit: int,
    prompt_limit: int | None = None,
) -> LMRequest:
    if body.n != 1:
        raise HTTPError(400, "only n = 1 is supported")
    if body.stream:
        raise HTTPError(400, "streaming is not supported")
    if body.min_p:  # OpenAIChatClient always sends min_p (0 = off, accepted)
        raise HTTPError(400, f"min_p {body.min_p} is not supported (only 0, off)")
    adapter: str | None = None
    if body.model is not None and body.model != service.name:
        if body.model not in service.engine.adapters:
            raise HTTPError(404, f"The model `{body.model}` does not exist.", "not_found_error")
        adapter = body.model
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    if max_tokens > max_tokens_limit:
        raise HTTPError(400, f"max_tokens {max_tokens} exceeds this server's {max_tokens_limit}")
    messages = _messages(body.messages, limits)
    prompt_chars_check(
        sum(len(part) for m in messages for part in m.parts if isinstance(part, str)),
        prompt_limit,
    )
    return LMRequest(
        messages=messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k if body.top_k and body.top_k > 0 else None,  # vLLM: -1 / 0 = off
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
        prompt_logprobs=body.prompt_logprobs,
        adapter=adapter,
        response_format=body.response_format,
    )


def _messages(raw: list[dict[str, Any]], limits: ServerLimits) -> list[PromptMessage]:
    messages: list[PromptMessage] = []
    images = 0
    pixels_left = limits.max_request_pixels
    for index, message in enumerate(raw):
        role = message.get("role")
        if not isinstance(role, str):
            raise HTTPError(400, f"messages[{index}].role must be a string")
        content = message.get("content")
        parts: list[Any] = []
        if content is None:
            pass
        elif isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                where = f"messages[{index}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    images += 1
                    if images > limits.max_images_per_request:
                        raise HTTPError(
                            400, f"more than {limits.max_images_per_request} images in a request"
                        )
                    image = _image(part.get("image_url"), where, limits, pixels_left)
                    pixels_left -= image.size[0] * image.size[1]
                    parts.append(image)
                else:
                    raise HTTPError(400, f"{where}: unsupported content part type {kind!r}")
        else:
            raise HTTPError(400, f"messages[{index}].content must be a string or a list")
        messages.append(PromptMessage(role, tuple(parts)))
    return messages


def _image(value: Any, where: str, limits: ServerLimits, pixels_left: int) -> Any:
    """The part's image, decoded only if it fits the per-image limit and what is left of the
    request's pixel budget (checked from the header, before the pixels are decoded)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.startswith("data:"):
        raise HTTPError(400, f"{where}: images must be base64 data URLs (no remote fetching)")
    limit = min(limits.max_image_pixels, pixels_left)
    try:
        return decode_b64_image(url, max(limit, 0))
    except ImageDecodeError as error:
        if limit < limits.max_image_pixels and str(error).startswith("image is "):
            raise HTTPError(
                400,
                f"{where}: the request's images exceed this server's limit of "
                f"{limits.max_request_pixels} decoded pixels per request ({error})",
            ) from None
        raise HTTPError(400, f"{where}: {error}") from None


def _finite(value: float) -> float:
    """JSON has no -inf: clamp like vLLM does (-9999.0)."""
    return max(value, -9999.0)


def _logprob_entry(token_id: int, value: float, decoded: str, as_id: bool) -> dict[str, Any]:
    """vLLM's shape; ``as_id`` (``return_tokens_as_token_ids``): the token is its id."""
    token = f"token_id:{token_id}" if as_id else decoded
    return {"token": token, "logprob": _finite(value), "bytes": list(token.encode("utf-8"))}


def _chat_response(body: ChatBody, request: LMRequest, result: LMResult, engine: Any) -> dict:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": None,
        "finish_reason": result.finish_reason,
        "stop_reason": None,
    }
    if body.logprobs:
        content = []
        for position, (token, value) in enumerate(
            zip(result.token_ids, result.logprobs, strict=True)
        ):
            as_id = body.return_tokens_as_token_ids
            entry = _logprob_entry(token, value, result.decoded_tokens[position], as_id)
            tops = result.top_logprobs[position] if result.top_logprobs else {}
            entry["top_logprobs"] = [
                _logprob_entry(t, lp.logprob, lp.decoded, as_id) for t, lp in tops.items()
            ]
            content.append(entry)
        choice["logprobs"] = {"content": content}
    if body.return_token_ids:
        choice["token_ids"] = list(result.token_ids)
    if request.response_format is not None and request.response_format.get("type") in (
        "json_schema",
        "json_object",
    ):
        from nodes.backends.engines.transformers_lm import json_validity

        choice["structured_output"] = {
            "type": request.response_format["type"],
            "constrained": False,
            "valid_json": json_validity(result.text),
        }
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.adapter or engine.name,
        "choices": [choice],
        "usage": {
            "prompt_tokens": len(result.prompt_token_ids),
            "completion_tokens": len(result.token_ids),
            "total_tokens": len(result.prompt_token_ids) + len(result.token_ids),
        },
        "prompt_logprobs": None,
    }
    if result.prompt_logprobs is not None:
        response["prompt_logprobs"] = [
            None if entry is None else {str(t): _prompt_entry(lp) for t, lp in entry.items()}
            for entry in result.prompt_logprobs
        ]
    if body.return_token_ids:
        response["prompt_token_ids"] = list(result.prompt_token_ids)
    return response


def _prompt_entry(value: TokenLogprob) -> dict[str, Any]:
    return {"logprob": _finite(value.logprob), "rank": value.rank, "decoded_token": value.decoded}
