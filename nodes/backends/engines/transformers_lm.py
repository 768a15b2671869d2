"""``TransformersLM``: a chat model run in-process with ``transformers`` (the engine behind the
in-process backend and ``atelier serve lm``).

Loads a model directory either as a vision-language model (``AutoProcessor`` +
``AutoModelForImageTextToText``, when its config has a ``vision_config``) or as a text model
(``AutoTokenizer`` + ``AutoModelForCausalLM``). ``run_batch`` serves many requests in one padded
forward pass and a batched decoding loop with a KV cache:

- each row samples with its own temperature, top-p, top-k, repetition penalty and seeded
  ``torch.Generator``, so a seeded request gets the same tokens whatever it is batched with (up
  to float rounding);
- ``max_tokens`` beyond what the context leaves after the prompt is clamped to fit (one warning
  line per requested value); a prompt that alone fills the context is an :class:`InvalidRequest`;
- log-probs are the model's raw ones (``log_softmax`` of the logits, before temperature/top-p),
  as vLLM returns by default; the stop token is part of the ids and log-probs, not the text;
- prompt log-probs come from the same forward pass (vLLM's ``prompt_logprobs``);
- LoRA adapters (peft) are loaded by name; rows are grouped by adapter within a batch. A load
  that fails leaves the model exactly as it was (the partly injected adapter is removed).

Supported: causal LMs, LLaVA-style VLMs (image features scattered at image tokens, standard
1-D positions) and Qwen2-VL-style VLMs (multimodal rotary positions from the model's own
``get_rope_index``). Without torchvision, a processor whose video processor needs it (Qwen2-VL
family in transformers 5.x) is built from its image processor and tokenizer alone
(:func:`load_processor`): images work, videos cannot be served anyway.

:meth:`TransformersLM.encode` (a request's prompt through the chat template and the processor),
:meth:`TransformersLM.encode_ids` (stored prompt ids with their images) and
:meth:`TransformersLM.batch_inputs` (padded model inputs with each row's positions) are the one
place a prompt becomes model inputs: the server's generation and the LoRA trainer's teacher
forcing (``training.text.trainer``) both go through them, so both see the same pixels, image
tokens and positions.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.backends.abandon import Abandoned, cancelled_items, raise_if_abandoned
from nodes.backends.lm_types import (
    InvalidRequest,
    LMRequest,
    LMResult,
    PromptMessage,
    TokenLogprob,
    UnknownModel,
)
from nodes.backends.model_dirs import adapter_dir_problem

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    input_ids: list[int]
    extras: dict[str, torch.Tensor]
    """Model inputs besides the ids (``pixel_values``, ...); per-token ones have shape (1, L)."""
    max_tokens: int = 0
    """New tokens to sample at most: the request's, clamped to what the context leaves."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> Any:
    if dtype == "auto":
        return "auto"
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


class TransformersLM:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        max_model_len: int | None = None,
    ) -> None:
        from transformers import AutoConfig

        self.model_dir = str(model_dir)
        self.name = name or self.model_dir
        self.device = resolve_device(device)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.is_vlm = getattr(config, "vision_config", None) is not None
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
        if self.is_vlm:
            from transformers import AutoModelForImageTextToText

            self.processor: Any = load_processor(self.model_dir)
            self.tokenizer: Any = self.processor.tokenizer
            self.model: Any = AutoModelForImageTextToText.from_pretrained(self.model_dir, **kwargs)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        self.model.to(self.device)
        self.model.eval()
        self.adapters: dict[str, str] = {}
        """LoRA adapters loaded: served name -> path."""
        self._peft_names: dict[str, str] = {}
        """Served name -> the adapter's name inside peft (``adapter<n>``: peft names must be
        valid module keys, and a replacement loads beside the adapter it replaces)."""
        self._loads = 0
        self._clamp_warned: set[int] = set()
        self.max_model_len = max_model_len or _max_positions(config)
        self.stop_ids = self._stop_ids()
        self.pad_id = self._pad_id()
        params = inspect.signature(self.model.forward).parameters
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._decoded: dict[int, str] = {}

    # --- prompts -------------------------------------------------------------------------------

    def render(self, request: LMRequest) -> str:
        """The prompt text from the chat template (vLLM: ``apply_chat_template``)."""
        if request.continue_final_message and request.add_generation_prompt:
            raise InvalidRequest(
                "add_generation_prompt and continue_final_message cannot both be true"
            )
        if request.continue_final_message and (
            not request.messages or request.messages[-1].role != "assistant"
        ):
            raise InvalidRequest("continue_final_message needs a final assistant message")
        owner = self.processor if self.is_vlm else self.tokenizer
        conversation = [self._template_message(m) for m in request.messages]
        try:
            return owner.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
            )
        except (ValueError, TypeError, KeyError) as error:  # template errors, jinja errors
            raise InvalidRequest(f"the chat template failed: {error}") from None
        except Exception as error:
            if type(error).__module__.startswith("jinja2"):
                raise InvalidRequest(f"the chat template failed: {error}") from None
            raise

    def _template_message(self, message: PromptMessage) -> dict[str, Any]:
        if not self.is_vlm:
            if message.images:
                raise InvalidRequest(f"model {self.name} is a text model: it takes no images")
            return {"role": message.role, "content": message.text}
        content = [
            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
            for p in message.parts
        ]
        return {"role": message.role, "content": content}

    def encode(self, request: LMRequest) -> Encoded:
        text = self.render(request)
        images = [img.convert("RGB") for m in request.messages for img in m.images]
        if self.is_vlm:
            batch = self.processor(
                text=[text],
                images=images or None,
                return_tensors="pt",
                add_special_tokens=False,
            )
        else:
            batch = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        ids = batch["input_ids"][0].tolist()
        extras = {
            k: v
            for k, v in batch.items()
            if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)
        }
        return Encoded(ids, extras, self.fit_max_tokens(len(ids), request.max_tokens))

    def encode_ids(self, input_ids: Sequence[int], images: Sequence[Any] = ()) -> Encoded:
        """A prompt that is already ids (a server's stored ``prompt_token_ids``, image
        placeholders expanded) with its images, in prompt order: the model inputs :meth:`encode`
        gives when its own rendering yields these ids. The images go through the processor's
        image path (``processor(images=...)``, the same call :meth:`encode` makes with the
        text), and per-token modality types are the processor's own for these ids."""
        ids = [int(i) for i in input_ids]
        extras: dict[str, torch.Tensor] = {}
        if images:
            if not self.is_vlm:
                raise InvalidRequest(f"model {self.name} is a text model: it takes no images")
            batch = self.processor(
                images=[img.convert("RGB") for img in images], return_tensors="pt"
            )
            extras = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if self.is_vlm and getattr(self.processor, "return_mm_token_type_ids", False):
            types = self.processor.create_mm_token_type_ids([ids])
            extras["mm_token_type_ids"] = torch.tensor(types, dtype=torch.long)
        return Encoded(ids, extras)

    def placeholder_ids(self) -> set[int]:
        """The ids the processor expands an image (or video) into; empty for a text model."""
        if not self.is_vlm:
            return set()
        found: set[int] = set()
        for name in ("image_token_ids", "video_token_ids"):
            found.update(i for i in getattr(self.processor, name, None) or () if i is not None)
        for name in ("image_token_id", "video_token_id"):
            value = getattr(self.processor, name, None)
            if isinstance(value, int):
                found.add(value)
        return found

    def batch_inputs(
        self, encoded: Sequence[Encoded], *, left_pad: bool = True
    ) -> dict[str, torch.Tensor]:
        """One padded forward pass's inputs for ``encoded``: ``input_ids``, ``attention_mask``,
        ``position_ids`` and the processor's other outputs (:meth:`_batch_extras`), on the
        model's device. The server pads on the left (every row continues at the end), a trainer
        on the right; either way a row's positions are its own: 0, 1, ... over its tokens, or
        the model's multimodal rotary positions where it has them (Qwen2-VL family)."""
        rows = len(encoded)
        width = max(len(e.input_ids) for e in encoded)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for row, enc in enumerate(encoded):
            span = _span(len(enc.input_ids), width, left_pad)
            input_ids[row, span] = torch.tensor(enc.input_ids, dtype=torch.long)
            mask[row, span] = 1
        extras = self._batch_extras(encoded, width, left_pad=left_pad)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = self._positions(input_ids, mask, extras)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **extras}

    def _positions(
        self, input_ids: torch.Tensor, mask: torch.Tensor, extras: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """[B, L] positions counting each row's real tokens; [3, B, L] multimodal rotary
        positions from the model's ``get_rope_index`` for the Qwen2-VL family (image tokens
        get 2-D grid positions: counting them 0, 1, ... is another model than the one trained,
        and than the one vLLM serves)."""
        rope_index = getattr(getattr(self.model, "model", None), "get_rope_index", None)
        types = extras.get("mm_token_type_ids")
        if rope_index is not None and types is not None:
            positions, _ = rope_index(
                input_ids,
                image_grid_thw=extras.get("image_grid_thw"),
                video_grid_thw=extras.get("video_grid_thw"),
                attention_mask=mask,
                mm_token_type_ids=types,
            )
            return positions
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def fit_max_tokens(self, prompt_tokens: int, max_tokens: int) -> int:
        """``max_tokens`` clamped to the room the context leaves after the prompt (a warning
        line the first time each requested value is clamped); an :class:`InvalidRequest` when
        the prompt alone leaves no room."""
        room = self.max_model_len - prompt_tokens
        if room < 0:
            raise InvalidRequest(
                f"the prompt ({prompt_tokens} tokens) is longer than the model's context "
                f"({self.max_model_len} tokens)"
            )
        if room == 0 and max_tokens > 0:
            raise InvalidRequest(
                f"the prompt ({prompt_tokens} tokens) fills the model's context "
                f"({self.max_model_len} tokens): no room to generate"
            )
        if max_tokens <= room:
            return max_tokens
        if max_tokens not in self._clamp_warned:
            self._clamp_warned.add(max_tokens)
            log.warning(
                "max_tokens %d does not fit %s's context of %d tokens after a %d-token prompt: "
                "generating at most %d (ask for fewer to silence this)",
                max_tokens,
                self.name,
                self.max_model_len,
                prompt_tokens,
                room,
            )
        return room

    def decode_token(self, token_id: int) -> str:
        text = self._decoded.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._decoded[token_id] = text
        return text

    # --- LoRA adapters -------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load the peft LoRA adapter at ``path`` as ``name`` (``inplace``: replacing the one
        of that name). Any failure is an :class:`InvalidRequest` saying why, and leaves the
        model exactly as it was: the base model and every loaded adapter answer as before."""
        if name == self.name:
            raise InvalidRequest(f"{name!r} is the base model's name")
        if name in self.adapters and not inplace:
            raise InvalidRequest(f"the LoRA adapter {name!r} has already been loaded")
        problem = adapter_dir_problem(path)
        if problem:
            raise InvalidRequest(problem)
        self._loads += 1
        peft_name = f"adapter{self._loads}"
        try:
            info = self._peft_load(peft_name, path)
            _check_adapter_weights(info, peft_name)
        except Exception as error:  # peft/transformers/safetensors raise many kinds
            self._forget_peft_adapter(peft_name)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InvalidRequest(
                f"could not load LoRA adapter {name!r} from {path}: "
                f"{reason or type(error).__name__}"
            ) from None
        finally:
            self.model.eval()
        if name in self.adapters:  # inplace: the new weights are in; drop the old ones
            self._forget_peft_adapter(self._peft_names[name])
        self.adapters[name] = path
        self._peft_names[name] = peft_name

    def _peft_load(self, peft_name: str, path: str) -> Any:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists other adapters' keys
        try:
            with warnings.catch_warnings():  # several adapters side by side is the point
                warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
                # Mismatched shapes come back in the loading info (checked after), rather than
                # as a RuntimeError pointing at a report that was just silenced.
                return self.model.load_adapter(
                    path, adapter_name=peft_name, ignore_mismatched_sizes=True
                )
        finally:
            hf_logging.set_verbosity(verbosity)

    def _forget_peft_adapter(self, peft_name: str) -> None:
        """Remove a (possibly half-loaded) adapter from the model, whatever state it is in."""
        if peft_name in (getattr(self.model, "peft_config", None) or {}):
            with warnings.catch_warnings():  # "adapterN was active ...": batches set their own
                warnings.filterwarnings("ignore", "Adapter .* was active", UserWarning)
                self.model.delete_adapter(peft_name)
        if not getattr(self.model, "peft_config", None):
            # A load that failed before peft registered anything may still have set the flag.
            self.model._hf_peft_config_loaded = False

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownModel(f"the LoRA adapter {name!r} is not loaded")
        self._forget_peft_adapter(self._peft_names.pop(name))
        del self.adapters[name]

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        if adapter is not None and adapter not in self.adapters:
            raise UnknownModel(f"the model {adapter!r} does not exist")
        if not self.adapters:
            yield
            return
        if adapter is None:
            self.model.disable_adapters()
        else:
            self.model.enable_adapters()
            self.model.set_adapter(self._peft_names[adapter])
        try:
            yield
        finally:
            if adapter is None:
                self.model.enable_adapters()

    # --- batches -------------------------------------------------------------------------------

    @staticmethod
    def batch_key(request: LMRequest) -> str | None:
        """Requests that share a forward pass: one adapter (or the base model) per batch."""
        return request.adapter

    def run_batch(self, requests: Sequence[LMRequest]) -> list[LMResult | BaseException]:
        """Serve ``requests`` together; a request's own error is returned in its place."""
        results: list[LMResult | BaseException | None] = [None] * len(requests)
        groups: dict[str | None, list[tuple[int, Encoded]]] = {}
        for index, request in enumerate(requests):
            try:
                if request.adapter is not None and request.adapter not in self.adapters:
                    raise UnknownModel(f"the model {request.adapter!r} does not exist")
                encoded = self.encode(request)
            except (InvalidRequest, UnknownModel, ValueError) as error:
                results[index] = error
                continue  # before any group exists for it: no group is ever empty
            groups.setdefault(request.adapter, []).append((index, encoded))
        for adapter, items in groups.items():
            try:
                with self.using(adapter):
                    outputs = self._generate(
                        [requests[i] for i, _ in items],
                        [enc for _, enc in items],
                        batch_rows=[i for i, _ in items],
                    )
            except Abandoned:
                raise  # nobody waits for any of this batch: stop now
            except Exception as error:
                log.exception("batch of %d failed", len(items))
                outputs = [error] * len(items)
            for (index, _), output in zip(items, outputs, strict=True):
                results[index] = output
        return [r if r is not None else RuntimeError("request was not served") for r in results]

    @torch.inference_mode()
    def _generate(
        self,
        requests: Sequence[LMRequest],
        encoded: Sequence[Encoded],
        batch_rows: Sequence[int] = (),
    ) -> list[LMResult | BaseException]:
        """``batch_rows``: each request's position in the served batch, so that a request whose
        caller has gone stops generating (finish reason ``abort``, as vLLM) while the others go
        on (:func:`~nodes.backends.abandon.cancelled_items`)."""
        device = self.device
        rows = len(requests)
        lengths = [len(e.input_ids) for e in encoded]
        width = max(lengths)
        inputs = self.batch_inputs(encoded, left_pad=True)
        mask, positions = inputs["attention_mask"], inputs["position_ids"]
        wants_prompt = any(r.prompt_logprobs is not None for r in requests)
        keep = {} if wants_prompt or not self._takes_logits_to_keep else {"logits_to_keep": 1}
        out = self.model(**inputs, use_cache=True, **keep)
        results = [LMResult(prompt_token_ids=list(e.input_ids)) for e in encoded]
        if wants_prompt:
            for row, request in enumerate(requests):
                if request.prompt_logprobs is not None:
                    results[row].prompt_logprobs = self._prompt_logprobs(
                        out.logits[row, width - lengths[row] :],
                        encoded[row].input_ids,
                        request.prompt_logprobs,
                    )
        last = out.logits[:, -1, :]
        cache = out.past_key_values
        generators = [_generator(r.seed, device) for r in requests]
        limits = [e.max_tokens for e in encoded]
        # Tokens seen so far per row, for the repetition penalty: the prompt's once, then each
        # sampled token as it comes (not rebuilt from the prompt at every step).
        seen = [
            set(e.input_ids) if _penalises(r.repetition_penalty) else set()
            for e, r in zip(encoded, requests, strict=True)
        ]
        finished = [limit <= 0 for limit in limits]
        for row, limit in enumerate(limits):
            if limit <= 0:
                results[row].finish_reason = "length"
        steps = max(limits, default=0)
        for _step in range(steps):
            raise_if_abandoned()
            gone = cancelled_items()
            for row, position in enumerate(batch_rows):
                if not finished[row] and position < len(gone) and gone[position]:
                    finished[row] = True
                    results[row].finish_reason = "abort"
            if all(finished):
                break
            raw = torch.log_softmax(last.float(), dim=-1)
            next_tokens = torch.full((rows, 1), self.pad_id, dtype=torch.long, device=device)
            for row, request in enumerate(requests):
                if finished[row]:
                    continue
                logits = _penalised(last[row], request.repetition_penalty, seen[row])
                token = _sample(
                    logits, request.temperature, request.top_p, generators[row], request.top_k
                )
                result = results[row]
                result.token_ids.append(token)
                if _penalises(request.repetition_penalty):
                    seen[row].add(token)
                result.logprobs.append(float(raw[row, token]))
                if request.top_logprobs:
                    result.top_logprobs.append(self._top(raw[row], request.top_logprobs))
                next_tokens[row, 0] = token
                if token in self.stop_ids:
                    finished[row] = True
                    result.finish_reason = "stop"
                elif len(result.token_ids) >= limits[row]:
                    finished[row] = True
                    result.finish_reason = "length"
            if all(finished):
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], 1)
            positions = _next_positions(positions)
            out = self.model(
                input_ids=next_tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            last = out.logits[:, -1, :]
        for result in results:
            ids = result.token_ids
            visible = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
            result.text = self.tokenizer.decode(visible, skip_special_tokens=True)
            result.decoded_tokens = [self.decode_token(t) for t in ids]
        return list(results)

    def _batch_extras(
        self, encoded: Sequence[Encoded], width: int, *, left_pad: bool = True
    ) -> dict[str, torch.Tensor]:
        """Batch the processor's other outputs: per-token ones (shape (1, L), present for every
        row, e.g. modality type ids) are padded like the ids; the rest (e.g. ``pixel_values``,
        one entry per image) are concatenated in prompt order."""
        batch: dict[str, torch.Tensor] = {}
        for key in sorted({k for e in encoded for k in e.extras}):
            rows = [(e, e.extras[key]) for e in encoded if key in e.extras]
            per_token = len(rows) == len(encoded) and all(
                v.dim() == 2 and tuple(v.shape) == (1, len(e.input_ids)) for e, v in rows
            )
            if per_token:
                tensor = torch.zeros((len(rows), width), dtype=rows[0][1].dtype)
                for row, (e, value) in enumerate(rows):
                    tensor[row, _span(len(e.input_ids), width, left_pad)] = value[0]
            else:
                tensor = torch.cat([value for _, value in rows], dim=0)
            if tensor.is_floating_point():
                tensor = tensor.to(self.model.dtype)
            batch[key] = tensor.to(self.device)
        return batch

    def _prompt_logprobs(
        self, logits: torch.Tensor, ids: Sequence[int], top: int
    ) -> list[dict[int, TokenLogprob] | None]:
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = torch.tensor(ids[1:], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        ranks = (logprobs > chosen[:, None]).sum(-1) + 1
        entries: list[dict[int, TokenLogprob] | None] = [None]
        chosen_list, ranks_list = chosen.tolist(), ranks.tolist()
        tops = torch.topk(logprobs, top, dim=-1) if top > 0 else None
        for pos, token in enumerate(ids[1:]):
            entry = {
                token: TokenLogprob(chosen_list[pos], ranks_list[pos], self.decode_token(token))
            }
            if tops is not None:
                for rank, (value, tid) in enumerate(
                    zip(tops.values[pos].tolist(), tops.indices[pos].tolist(), strict=True), 1
                ):
                    entry.setdefault(tid, TokenLogprob(value, rank, self.decode_token(tid)))
            entries.append(entry)
        return entries

    def _top(self, raw: torch.Tensor, k: int) -> dict[int, TokenLogprob]:
        values, indices = torch.topk(raw, k)
        return {
            int(t): TokenLogprob(float(v), rank, self.decode_token(int(t)))
            for rank, (v, t) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), 1)
        }

    # --- setup helpers -------------------------------------------------------------------------

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0


def _span(length: int, width: int, left_pad: bool) -> slice:
    """Where a row of ``length`` tokens sits in a batch ``width`` wide."""
    return slice(width - length, width) if left_pad else slice(0, length)


def _next_positions(positions: torch.Tensor) -> torch.Tensor:
    """The positions of the next token of each (left-padded) row: one past the last. For
    multimodal rotary positions [3, B, L], one past the row's largest (a text token after an
    image continues after the image's whole grid, as the model's own generation does)."""
    if positions.dim() == 3:
        return (positions.amax(dim=(0, 2), keepdim=True) + 1).expand(3, -1, -1)
    return positions[:, -1:] + 1


def load_processor(model_dir: str | Path) -> Any:
    """The model's processor (``AutoProcessor``). A processor that also loads a video processor
    needing torchvision (the Qwen2-VL family in transformers 5.x) is, without torchvision, built
    from its image processor and tokenizer alone: the same class, the same image and text code,
    no videos."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        processor = _image_only_processor(model_dir)
        if processor is None:
            raise
        log.info("%s: no torchvision, so its processor serves images only", model_dir)
        return processor


def _image_only_processor(model_dir: str | Path) -> Any:
    """The model's processor class without its video processor, or None when the class
    does not take exactly (image processor, tokenizer, video processor)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    config = AutoConfig.from_pretrained(model_dir)
    base = PROCESSOR_MAPPING.get(type(config), None)
    if base is None or base.get_attributes() != ["image_processor", "tokenizer", "video_processor"]:
        return None

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        # ProcessorMixin reads its sub-processors from __init__'s signature: no video_processor.
        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None
        ) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{base.__name__}ImageOnly"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ImageOnlyProcessor(
        image_processor=AutoImageProcessor.from_pretrained(model_dir),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def _check_adapter_weights(info: Any, peft_name: str) -> None:
    """Refuse an adapter whose file does not fill the LoRA weights peft made for it (a LoRA
    for another architecture loads "successfully" as a silent no-op otherwise)."""
    marker = f".{peft_name}."
    mismatched = sorted(k for k in getattr(info, "mismatched_keys", ()) if marker in k[0])
    if mismatched:
        key, given, wanted = mismatched[0]
        raise ValueError(
            f"{len(mismatched)} LoRA weights have the wrong shape for this model, e.g. "
            f"{key.replace(marker, '.')}: {tuple(given)} in the file, {tuple(wanted)} expected"
        )
    missing = sorted(k for k in getattr(info, "missing_keys", ()) if marker in k)
    if missing:
        raise ValueError(
            f"its weights do not match this model: {len(missing)} LoRA weights are missing "
            f"from the file, e.g. {missing[0].replace(marker, '.')} (an adapter for another "
            "model?)"
        )


def _max_positions(config: Any) -> int:
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", 0) or 32768)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (2**64))
    return generator


def _penalises(penalty: float | None) -> bool:
    return penalty is not None and penalty != 1.0


def _penalised(logits: torch.Tensor, penalty: float | None, seen_ids: set[int]) -> torch.Tensor:
    """The repetition penalty over every token seen so far (prompt and output), as vLLM and
    transformers apply it; the log-probs returned stay the raw ones."""
    if not _penalises(penalty):
        return logits
    seen = torch.tensor(sorted(seen_ids), device=logits.device)
    logits = logits.float().clone()
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


SAMPLING_EPS = 1e-5
"""A temperature below this samples greedily, as in vLLM (dividing by 1e-300 overflows)."""


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    gen: torch.Generator,
    top_k: int | None = None,
) -> int:
    if temperature < SAMPLING_EPS:
        return int(torch.argmax(logits))
    logits = logits.float()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs >= top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def json_validity(text: str) -> bool:
    """Best-effort structured output: does the text parse as JSON? (No constrained decoding.)"""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
