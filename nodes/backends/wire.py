"""The wire format shared by Atelier's clients and servers: OpenAI chat as vLLM serves it, and
the vLLM-Omni image API. Pure functions over JSON-able dicts and PIL images (no HTTP, no torch).

Chat (``POST /v1/chat/completions``):

- images travel as base64 PNG data URLs in OpenAI content parts
  (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``), before the text;
- ``logprobs: true`` + ``return_token_ids: true`` give the sampled tokens' ids in
  ``choices[0].token_ids`` and their log-probs in ``choices[0].logprobs.content[*].logprob``;
  ``return_token_ids`` also gives the prompt's ids in the top-level ``prompt_token_ids``
  (vLLM's ``ChatCompletionResponse``; ``/v1/completions`` has them per choice);
- ``prompt_logprobs: k`` gives a top-level ``prompt_logprobs`` list (first entry ``null``) of
  ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` dicts holding the prompt token itself
  (plus the top k), and ``return_token_ids`` adds the top-level ``prompt_token_ids``.

Images (vLLM-Omni): ``/v1/images/generations`` takes JSON (``prompt``, ``size`` "WxH", ``seed``,
``num_inference_steps``, ``n``); ``/v1/images/edits`` takes multipart form data (``image`` file,
``prompt``, ``size``, ``seed``, ``num_inference_steps``); both answer ``data[i].b64_json``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from nodes.backends.base import (
    BackendError,
    ChatMessage,
    NextTokenLogprobs,
    SamplingParams,
    TextCompletion,
)

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image (width × height) a server or client decodes: a decompression-bomb guard."""


class ImageDecodeError(ValueError):
    """Bytes that are not an image we accept (broken, unsupported, or too many pixels)."""


class WireFormatError(BackendError):
    """A response that does not have the shape the protocol promises."""


# --- images ---------------------------------------------------------------------------------


def image_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_to_b64(image: Image.Image) -> str:
    return base64.b64encode(image_to_png(image)).decode("ascii")


def image_to_data_url(image: Image.Image) -> str:
    return f"data:image/png;base64,{image_to_b64(image)}"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes, refusing decompression bombs *before* the pixels are decoded.

    The header is read first (``Image.open`` is lazy) and ``width × height`` checked against
    ``max_pixels``; Pillow's own bomb guard and any decoding error become
    :class:`ImageDecodeError` with a message a client can act on.
    """
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {max_pixels} pixels (decompression-bomb guard)"
                )
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"image rejected by the decompression-bomb guard: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"could not decode image: {error}") from None
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    return image


def decode_b64_image(text: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode base64 (optionally a ``data:`` URL) into an image, with the bomb guard."""
    return decode_image(decode_b64_bytes(text), max_pixels)


def decode_b64_bytes(text: str) -> bytes:
    """The bytes of base64 text or a base64 ``data:`` URL (:class:`ImageDecodeError` if not)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ImageDecodeError("only base64 data URLs are supported for images")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageDecodeError(f"image is not valid base64: {error}") from None


def peek_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the image's header, without decoding its pixels."""
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image rejected by the decompression-bomb guard: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"could not decode image: {error}") from None


_SIZE_NUMBER = re.compile("[0-9]{1,6}")


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` → ``(W, H)``; a :class:`ValueError` naming the bad value otherwise. Only
    ASCII digits, at most 6 of them (``str.isdigit`` would also take "٣" and "²")."""
    width, sep, height = size.lower().partition("x")
    if not sep or not _SIZE_NUMBER.fullmatch(width) or not _SIZE_NUMBER.fullmatch(height):
        raise ValueError(f"invalid size {size[:40]!r}: expected 'WIDTHxHEIGHT', e.g. '512x512'")
    w, h = int(width), int(height)
    if w < 1 or h < 1:
        raise ValueError(f"invalid size {size!r}: width and height must be positive")
    return w, h


def format_size(width: int, height: int) -> str:
    return f"{width}x{height}"


# --- chat requests --------------------------------------------------------------------------


IMAGE_REF_PART = "image_ref"
"""Type of the content part that stands for an image in a *recorded* request:
``{"type": "image_ref", "ref": "<sha256 of the PNG in the image store>"}``."""


def message_payload(message: ChatMessage) -> dict[str, Any]:
    """One :class:`ChatMessage` as an OpenAI chat message (images first, then the text)."""
    if not message.images:
        return {"role": message.role, "content": message.text}
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_to_data_url(image)}}
        for image in message.images
    ]
    if message.text:
        parts.append({"type": "text", "text": message.text})
    return {"role": message.role, "content": parts}


def messages_payload(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    return [message_payload(m) for m in messages]


def message_record(message: ChatMessage, image_refs: Sequence[str] = ()) -> dict[str, Any]:
    """:func:`message_payload`'s message as a step records it: the same roles, parts and order,
    each image part an :data:`IMAGE_REF_PART` naming the stored image (never its bytes)."""
    if not message.images:
        return {"role": message.role, "content": message.text}
    if len(image_refs) != len(message.images):
        raise ValueError(f"{len(message.images)} images but {len(image_refs)} image refs")
    parts: list[dict[str, Any]] = [{"type": IMAGE_REF_PART, "ref": ref} for ref in image_refs]
    if message.text:
        parts.append({"type": "text", "text": message.text})
    return {"role": message.role, "content": parts}


def sampling_payload(sampling: SamplingParams) -> dict[str, Any]:
    """The request fields :class:`SamplingParams` stands for, named as vLLM names them; the
    optional ones only when set (what an in-process model runs with, and what a step records
    for a backend that does not report what it sent)."""
    fields: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "logprobs": sampling.logprobs,
    }
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if sampling.top_k is not None:
        fields["top_k"] = sampling.top_k
    if sampling.repetition_penalty is not None:
        fields["repetition_penalty"] = sampling.repetition_penalty
    return fields


def attach_image(messages: Sequence[ChatMessage], image: Image.Image | None) -> list[ChatMessage]:
    """``messages`` with ``image`` added to the last user message (or a new user turn)."""
    out = list(messages)
    if image is None:
        return out
    for index in range(len(out) - 1, -1, -1):
        if out[index].role == "user":
            m = out[index]
            out[index] = ChatMessage(m.role, m.text, (*m.images, image))
            return out
    out.append(ChatMessage("user", "", (image,)))
    return out


def scoring_messages(
    messages: Sequence[ChatMessage], image: Image.Image | None
) -> list[ChatMessage]:
    """The conversation ``score_text`` conditions on (the text goes in a final assistant turn)."""
    out = attach_image(messages, image)
    if not out:
        raise ValueError("score_text needs at least one message to condition on")
    if out[-1].role == "assistant":
        raise ValueError("score_text: the messages must not end with an assistant turn")
    return out


# --- chat responses -------------------------------------------------------------------------


def _first_choice(body: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise WireFormatError("chat response has no choices")
    return choices[0]


def _token_ids_from_logprob_tokens(content: Sequence[Mapping[str, Any]]) -> list[int] | None:
    """vLLM's ``return_tokens_as_token_ids`` spells each token ``"token_id:<id>"``."""
    ids = []
    for entry in content:
        token = str(entry.get("token", ""))
        if not token.startswith("token_id:"):
            return None
        ids.append(int(token.removeprefix("token_id:")))
    return ids


def parse_chat_completion(
    body: Mapping[str, Any], model: str = "", *, sampling: Mapping[str, Any] | None = None
) -> TextCompletion:
    """A chat completion response → :class:`TextCompletion` (ids and log-probs aligned);
    ``sampling``: the request's fields as sent (see :attr:`TextCompletion.sampling`)."""
    choice = _first_choice(body)
    message = choice.get("message") or {}
    text = message.get("content") or ""
    content = ((choice.get("logprobs") or {}).get("content")) or []
    logprobs = tuple(float(entry["logprob"]) for entry in content)
    ids = choice.get("token_ids")
    if ids is None:
        ids = _token_ids_from_logprob_tokens(content) or []
    token_ids = tuple(int(i) for i in ids)
    if logprobs and len(logprobs) != len(token_ids):
        raise WireFormatError(
            f"chat response has {len(token_ids)} token ids but {len(logprobs)} log-probs"
        )
    prompt_ids = body.get("prompt_token_ids")
    if prompt_ids is None:  # vLLM's /v1/completions puts them on the choice
        prompt_ids = choice.get("prompt_token_ids")
    return TextCompletion(
        text=text,
        token_ids=token_ids,
        logprobs=logprobs,
        model=str(body.get("model") or model),
        finish_reason=str(choice.get("finish_reason") or "stop"),
        prompt_token_ids=None if prompt_ids is None else tuple(int(i) for i in prompt_ids),
        sampling=sampling,
    )


def parse_next_token_logprobs(body: Mapping[str, Any], model: str = "") -> NextTokenLogprobs:
    """A one-token chat completion asked with ``top_logprobs`` and
    ``return_tokens_as_token_ids`` → token id → log-prob at the first generated position (the
    sampled token and its top alternatives). A token not spelled ``"token_id:<id>"`` (a server
    that ignores ``return_tokens_as_token_ids``) is a :class:`WireFormatError`."""
    choice = _first_choice(body)
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        raise WireFormatError("the chat response has no log-probs for its first token")
    first = content[0]
    entries = [first, *(first.get("top_logprobs") or ())]
    ids = _token_ids_from_logprob_tokens(entries)
    if ids is None:
        raise WireFormatError(
            "the server did not return token ids in top_logprobs "
            '(return_tokens_as_token_ids: tokens should read "token_id:<id>")'
        )
    logprobs = {token: float(entry["logprob"]) for token, entry in zip(ids, entries, strict=True)}
    prompt_ids = body.get("prompt_token_ids")
    if prompt_ids is None:
        prompt_ids = choice.get("prompt_token_ids")
    return NextTokenLogprobs(
        logprobs=logprobs,
        prompt_token_ids=None if prompt_ids is None else tuple(int(i) for i in prompt_ids),
        model=str(body.get("model") or model),
    )


def prompt_token_logprobs(body: Mapping[str, Any]) -> tuple[list[int], list[float | None]]:
    """(``prompt_token_ids``, log-prob of each prompt token; ``None`` for the first)."""
    ids = body.get("prompt_token_ids")
    entries = body.get("prompt_logprobs")
    if ids is None or entries is None:  # some servers put them on the choice
        choice = _first_choice(body)
        ids = ids if ids is not None else choice.get("prompt_token_ids")
        entries = entries if entries is not None else choice.get("prompt_logprobs")
    if ids is None or entries is None:
        raise WireFormatError(
            "response lacks prompt_token_ids / prompt_logprobs (is this a vLLM-compatible "
            "server? the request must set return_token_ids and prompt_logprobs)"
        )
    if len(ids) != len(entries):
        raise WireFormatError(f"{len(ids)} prompt token ids but {len(entries)} prompt log-probs")
    logprobs: list[float | None] = []
    for token_id, entry in zip(ids, entries, strict=True):
        if entry is None:
            logprobs.append(None)
            continue
        record = entry.get(str(token_id), entry.get(token_id))  # JSON keys are strings
        if record is None:
            raise WireFormatError(f"prompt_logprobs entry lacks the prompt token {token_id}")
        value = record["logprob"] if isinstance(record, Mapping) else record
        logprobs.append(float(value))
    return [int(i) for i in ids], logprobs


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def text_span(full_ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
    """Where the scored text starts in ``full_ids`` (the prompt with the text in the assistant
    turn), given ``prefix_ids`` (the same conversation with only the generation prompt).

    Everything the two share is context (system, user turn, image placeholder tokens, the
    assistant header); what follows is the text. A token merged across the boundary counts as
    the text's (it carries text characters).
    """
    start = common_prefix_length(full_ids, prefix_ids)
    if start >= len(full_ids):
        raise WireFormatError("the scored text produced no tokens after the prompt")
    return max(start, 1)  # position 0 has no log-prob
