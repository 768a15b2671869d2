"""GRPO on a peft LoRA adapter of a text or vision-language model, from stored completions
(``training.text.groups``).

``LoRATrainer`` recomputes the log-probs of the stored completion ids by teacher forcing under
base + LoRA, after exactly the prompt the server saw, built by the server's own engine
(:class:`~nodes.backends.engines.transformers_lm.TransformersLM`):

- the prompt ids: each member's stored ``prompt_token_ids`` when the server returned them, else
  its stored request ``messages`` encoded by :meth:`TransformersLM.encode` (chat template with
  the generation prompt, tokenised without special tokens);
- the images (vision-language models): the request's images read back from the store's image
  store (exact PNG bytes, decoded losslessly) and put through the model's processor by
  :meth:`TransformersLM.encode` — the server's code path, so the pixel values, the expanded image
  tokens and the modality types are the server's. When the stored prompt ids differ from that
  rendering (another server's chat template), the stored ids win and the images go through
  :meth:`TransformersLM.encode_ids`, after checking they hold as many image tokens;
- the positions: :meth:`TransformersLM.batch_inputs`, as the server builds them (multimodal
  rotary positions for the Qwen2-VL family).

Position ``len(prompt) - 1 + j`` of the forward pass then predicts completion token ``j``, as it
did when the server sampled it. A completion that contains an image placeholder id (a sampled
``<image>``, which the server embedded as a plain token) cannot be teacher-forced the same way:
it is skipped and counted (``members_skipped``).

Before the first update every row's recomputed log-probs are compared with the stored ones; a
difference above the drift bound (``LoRAConfig.max_logprob_drift``, by default
:data:`DEFAULT_DRIFT` of the dtype) stops training with a ``ValueError`` naming the trajectory,
the step, the first differing completion position and both values (wrong prompt, image, model,
dtype or adapter). That check, and the GRPO ratio itself, assume the stored log-probs are the
sampling policy's: the ``lm`` server (and vLLM by default) returns the raw model's log-probs,
before temperature, top-p, top-k and repetition penalty, so they are π_old only when the
request sampled untransformed (temperature 1, top-p 1, no top-k, no repetition penalty). A
member whose stored ``sampling`` says otherwise is refused unless ``require_raw_sampling`` is
off.

Precision: ``dtype="bfloat16"`` loads the base model in bf16 while peft keeps the LoRA weights
(and so AdamW's state) in float32: bf16's 8-bit mantissa would round an update of lr × ~1 on a
weight of ~1e-2 to nothing. Serve the base model in the same dtype (``atelier serve lm --dtype
bfloat16``): its log-probs are the ones compared.

The loss is ``training.grpo.grpo_loss`` (k3 KL with ``beta`` to the reference, the base model
with the adapter disabled), minimised with AdamW on the LoRA parameters only (the base is
frozen); minibatches are split into micro-batches by a token budget and their gradients
accumulated. ``save`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's
layout), which the ``lm`` server and vLLM load by path. In a vision-language model only the
language model's layers (and top-level heads such as ``lm_head`` when named) get a LoRA:
vLLM serves LoRA on the language backbone of multimodal models, not on the vision tower.

Under a process group (``torchrun``, ``training.distributed``) every rank reads the same groups
and builds the same minibatches; each rank encodes, checks and forwards only its own groups'
rows, weighted by their share of the global minibatch, and the LoRA gradients are summed over
the ranks before the update: the update, and the step metrics, are the single-process ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from nodes.backends.lm_types import LMRequest, PromptMessage
from nodes.backends.wire import IMAGE_REF_PART
from policies.weights import next_version, write_new_directory
from training.distributed import STEP_SUMS, DataParallel
from training.grpo import (
    grpo_loss,
    microbatch_weight,
    ragged_group_advantages,
)
from training.result import FIRST_STEP_KEY, TrainResult, step_summary
from training.text.config import DEFAULT_DRIFT, LoRAConfig
from training.text.config import LORA_TARGETS as LORA_TARGETS  # re-exported: tests, callers
from training.text.groups import TextGroup, TextMember, message_image_refs

if TYPE_CHECKING:
    from PIL import Image

    from nodes.backends.engines.transformers_lm import Encoded, TransformersLM

log = logging.getLogger(__name__)


StepCallback = Callable[[int, int, dict[str, float]], None]
"""``on_step(index, total, metrics)``: optimizer step ``index`` (from 1) of ``total`` is done."""


class Row(NamedTuple):
    """One completion to train on: what the server saw and sampled, and its advantage."""

    prompt: Sequence[int]
    completion: Sequence[int]
    old: Sequence[float]
    """The stored sampling log-probs (π_old)."""
    advantage: float
    extras: Mapping[str, torch.Tensor] | None = None
    """The prompt's other model inputs (``pixel_values``, ...; per-token ones span the prompt)."""
    ref: Sequence[float] | None = None
    """The completion's log-probs under the reference (``beta`` > 0): computed once per
    ``train`` call, as the reference never changes (else every step recomputes them)."""


RAW_SAMPLING = {"temperature": (1.0,), "top_p": (1.0,), "top_k": (-1, 0), "min_p": (0.0,)}
"""Sampling fields (None or absent: off) and the values under which a sampled token's raw
log-prob is its sampling log-prob; ``repetition_penalty`` must be absent or 1 too."""


def check_raw_sampling(member: TextMember) -> None:
    """Refuse a member whose stored sampling transformed the distribution (its stored raw
    log-probs are then not π_old)."""
    sampling = member.sampling or {}
    fields = {**RAW_SAMPLING, "repetition_penalty": (1.0,)}
    for name, allowed in fields.items():
        value = sampling.get(name)
        if value is not None and value not in allowed:
            raise ValueError(
                f"trajectory {member.trajectory_id} (step {member.step_seq}) was sampled with "
                f"{name}={value!r}: the server's log-probs are the raw model's (before "
                "temperature, top-p, top-k, repetition penalty), so they are the sampling "
                "policy's only at temperature 1, top-p 1 and no top-k or penalty; sample with "
                "those, or set LoRAConfig.require_raw_sampling=False to train anyway"
            )


def prompt_message(message: Any, images: Mapping[str, Image.Image] | None = None) -> PromptMessage:
    """A ``ChatMessage`` or a stored request message (OpenAI shape) as the engine's prompt
    turn, parts in order as the ``lm`` server parses them; an ``image_ref`` part becomes its
    image from ``images`` (by ref)."""
    if not isinstance(message, dict):
        return PromptMessage.from_chat(message)
    content = message.get("content")
    if content is None:
        return PromptMessage(message["role"], ())
    if isinstance(content, str):
        return PromptMessage(message["role"], (content,))
    parts: list[str | Image.Image] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(str(part.get("text", "")))
        elif kind == IMAGE_REF_PART and images is not None and part.get("ref") in images:
            parts.append(images[part["ref"]])
        elif kind == IMAGE_REF_PART:
            raise ValueError(f"stored image {part.get('ref')} was not given")
        else:  # an image_url part (pixels in the record) is never stored; nothing else exists
            raise ValueError(f"a stored {kind!r} part: not a stored request's part")
    return PromptMessage(message["role"], tuple(parts))


def lora_target_modules(engine: TransformersLM, names: Sequence[str]) -> list[str]:
    """The modules to put a LoRA on. A text model: ``names`` as given (peft matches the last
    component). A vision-language model: the full names of the modules so named inside its
    language model, or outside the multimodal base model (``lm_head``) — never the vision
    tower's or the projector's (its CLIP tower has ``q_proj`` too)."""
    if not engine.is_vlm:
        return list(names)
    model = engine.model
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    base = prefix.split(".")[0]
    wanted = set(names)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.rsplit(".", 1)[-1] in wanted
        and (name.startswith(prefix + ".") or name.split(".")[0] != base)
    ]
    if not found:
        raise ValueError(f"no linear layer named {sorted(wanted)} in {engine.model_dir}'s LM")
    return found


def _with_completion(prompt: Encoded, completion: Sequence[int]) -> Encoded:
    """``prompt`` followed by ``completion`` ids (teacher forcing). Per-token inputs (modality
    types) are extended with 0, a text token's value: the server fed the sampled tokens back as
    text, and placeholder ids in a completion are skipped before this."""
    from nodes.backends.engines.transformers_lm import Encoded

    length, extra = len(prompt.input_ids), len(completion)
    extras = {}
    for key, value in prompt.extras.items():
        if value.dim() == 2 and tuple(value.shape) == (1, length):
            value = torch.cat([value, value.new_zeros((1, extra))], dim=1)
        extras[key] = value
    return Encoded([*prompt.input_ids, *completion], extras)


ON_POLICY: Any = object()
"""``LoRATrainer.train(sampled_with=...)``'s default: the groups were sampled by the trainer's
own current weights."""


class LoRATrainer:
    """The base model (frozen) + a trainable peft LoRA adapter, on its own copy of the model.

    ``name`` / ``version`` are the adapter's identity as a policy; every ``train`` call that
    takes an optimizer step makes the next version. ``adapter``: a saved version's directory
    (peft layout, safetensors) to go on training from, with its own rank, scale and target
    modules."""

    def __init__(
        self,
        model_dir: str | Path,
        config: LoRAConfig | None = None,
        *,
        device: str = "cpu",
        name: str = "planner",
        version: str = "0",
        adapter: str | Path | None = None,
    ) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        from nodes.backends.engines.transformers_lm import TransformersLM

        self.config = cfg = config or LoRAConfig()
        if cfg.dtype not in DEFAULT_DRIFT:
            raise ValueError(f"dtype must be one of {sorted(DEFAULT_DRIFT)}, not {cfg.dtype!r}")
        self.name, self.version = name, version
        self.model_dir = str(model_dir)
        # The server's engine class: the same chat template, processor, tokenisation and
        # positions of prompts.
        self.engine = TransformersLM(model_dir, device=device, dtype=cfg.dtype)
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=0.0,
            target_modules=lora_target_modules(self.engine, cfg.target_modules),
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls an API deprecated in v6
            # LoRA on the tied ``lm_head`` changes the output layer only, not the input embedding.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            torch.manual_seed(cfg.seed)  # LoRA's A matrices are random (B starts at 0)
            # autocast_adapter_dtype (peft's default): LoRA weights in float32 on a bf16 base.
            if adapter is None:
                self.model = get_peft_model(self.engine.model, lora, autocast_adapter_dtype=True)
            else:  # a saved version goes on training: its own rank, scale and targets
                self.model = PeftModel.from_pretrained(
                    self.engine.model, str(adapter), is_trainable=True, autocast_adapter_dtype=True
                )
        self.parent = None if adapter is None else str(adapter)
        """The adapter directory training started from (None: a fresh LoRA)."""
        self.model.eval()  # no dropout anywhere: log-probs match the server's
        if cfg.gradient_checkpointing:
            self._enable_checkpointing()
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.placeholders = self.engine.placeholder_ids()
        """Image/video placeholder ids: a completion holding one is skipped (see the module)."""
        self.steps = 0
        """Optimizer steps taken so far (over every ``train`` call)."""
        self.reference_weights: list[torch.Tensor] | None = None
        """The KL reference's adapter weights (:meth:`set_reference`); None: the base model."""
        self.reference_version: str | None = None
        if cfg.kl_reference == "initial":
            self.set_reference()

    def _enable_checkpointing(self) -> None:
        """Checkpoint every decoder layer (non-reentrant: the frozen base's inputs need no
        gradient). transformers checkpoints a layer only while it is in training mode, so
        exactly those layers are switched to it, not their submodules: every dropout stays in
        eval mode and the log-probs stay the server's."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        base = self.engine.model
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5.x's new name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise ValueError(f"{self.model_dir}: no layer supports gradient checkpointing")
        for layer in layers:
            layer.training = True

    # --- prompts -------------------------------------------------------------------------------

    def prompt_ids(self, messages: Sequence[Any]) -> list[int]:
        """The prompt's token ids exactly as the ``lm`` server builds them for a chat:
        ``ChatMessage``s, or stored request messages (OpenAI shape, text parts only)."""
        request = LMRequest(messages=[prompt_message(m) for m in messages], max_tokens=0)
        return list(self.engine.encode(request).input_ids)

    def member_prompt_ids(self, group: TextGroup, member: TextMember) -> list[int]:
        """The prompt ids the server saw for ``member``: its stored prompt ids, else its stored
        messages (else the group's) encoded as the server does."""
        return self.member_inputs(group, member)[0]

    def member_inputs(
        self, group: TextGroup, member: TextMember
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """The model inputs of the prompt the server saw for ``member``: its ids (stored, else
        its messages — else the group's — encoded as the server does) and the other inputs the
        processor makes (``pixel_values`` of its stored images, modality types, ...)."""
        messages = member.messages if member.messages is not None else group.messages
        refs = message_image_refs(messages)
        stored = None if member.prompt_token_ids is None else list(member.prompt_token_ids)
        where = f"trajectory {member.trajectory_id} (step {member.step_seq})"
        if refs and not self.engine.is_vlm:
            raise ValueError(
                f"{where}: its request has {len(refs)} images, {self.model_dir} is a text model"
            )
        if not refs:
            ids = stored if stored is not None else self.prompt_ids(messages)
            # A VLM's processor may give text prompts per-token inputs too (modality types).
            extras = self.engine.encode_ids(ids).extras if self.engine.is_vlm else {}
            return ids, extras
        images = member.load_images()
        request = LMRequest(messages=[prompt_message(m, images) for m in messages], max_tokens=0)
        encoded = self.engine.encode(request)
        if stored is None or stored == encoded.input_ids:
            return list(encoded.input_ids), dict(encoded.extras)
        # The server rendered the prompt otherwise (another chat template, e.g. vLLM's): its
        # ids are what it saw; the images are the same, through the same processor.
        mine = sum(1 for t in encoded.input_ids if t in self.placeholders)
        theirs = sum(1 for t in stored if t in self.placeholders)
        if mine != theirs:
            raise ValueError(
                f"{where}: its stored prompt ids hold {theirs} image placeholder tokens, but its "
                f"{len(refs)} stored images make {mine} through {self.model_dir}'s processor: "
                "the server saw other images, another image size or another model"
            )
        own = self.engine.encode_ids(stored, [images[ref] for ref in refs])
        return list(own.input_ids), dict(own.extras)

    # --- log-probs -----------------------------------------------------------------------------

    def logprobs(self, rows: Sequence[Sequence[Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs of each row's completion ids after its prompt: rows are
        (prompt ids, completion ids) or (prompt ids, completion ids, the prompt's other model
        inputs). Returns ([B, T] log-probs, [B, T] mask), right-padded to the longest
        completion."""
        from nodes.backends.engines.transformers_lm import Encoded

        device = self.engine.device
        pairs = [(list(r[0]), list(r[1]), _extras(r)) for r in rows]
        encoded = [_with_completion(Encoded(p, dict(x)), c) for p, c, x in pairs]
        inputs = self.engine.batch_inputs(encoded, left_pad=False)
        logits = self.model(**inputs, use_cache=False).logits
        steps = max(len(c) for _, c, _ in pairs)
        out = torch.zeros((len(rows), steps), dtype=torch.float32, device=device)
        mask = torch.zeros((len(rows), steps), dtype=torch.float32, device=device)
        for i, (prompt, completion, _) in enumerate(pairs):
            if not completion:
                continue
            start = len(prompt) - 1  # logits at position t predict token t + 1
            # float32 before the softmax, as the server does with its (maybe bf16) logits
            step_logits = logits[i, start : start + len(completion)].float()
            targets = torch.tensor(completion, device=device)
            chosen = torch.log_softmax(step_logits, -1).gather(1, targets[:, None])[:, 0]
            out[i, : len(completion)] = chosen
            mask[i, : len(completion)] = 1.0
        return out, mask

    def set_reference(self) -> None:
        """Make the adapter's weights now the KL reference (e.g. the SFT version GRPO starts
        from), instead of the base model with the adapter disabled — which, after SFT of a
        model that did not know the role, is a policy GRPO should not be pulled towards."""
        self.reference_weights = [p.detach().clone() for p in self.parameters]
        self.reference_version = self.version

    def reference_logprobs(self, batch: Sequence[Sequence[Any]]) -> torch.Tensor:
        """The rows' log-probs under the reference: the adapter as :meth:`set_reference` froze
        it, else the base model with the adapter disabled."""
        rows = [_row(r) for r in batch]
        inputs = [(r.prompt, r.completion, r.extras) for r in rows]
        if self.reference_weights is None:
            with torch.no_grad(), self.model.disable_adapter():
                return self.logprobs(inputs)[0]
        with torch.no_grad():
            current = [p.detach().clone() for p in self.parameters]
            try:
                for param, frozen in zip(self.parameters, self.reference_weights, strict=True):
                    param.copy_(frozen)
                return self.logprobs(inputs)[0]
            finally:
                for param, now in zip(self.parameters, current, strict=True):
                    param.copy_(now)

    # --- training ------------------------------------------------------------------------------

    def with_reference(self, rows: Sequence[Row]) -> list[Row]:
        """``rows`` with their reference log-probs, computed in minibatch-sized chunks."""
        out: list[Row] = []
        for start in range(0, len(rows), max(1, self.config.minibatch_size)):
            chunk = rows[start : start + self.config.minibatch_size]
            ref = self.reference_logprobs(chunk)
            for i, row in enumerate(chunk):
                out.append(row._replace(ref=ref[i, : len(row.completion)].tolist()))
        return out

    def train(
        self,
        groups: Sequence[TextGroup],
        on_step: StepCallback | None = None,
        *,
        sampled_with: Any = ON_POLICY,
    ) -> TrainResult:
        """GRPO on ``groups`` (``epochs`` passes of shuffled minibatches); the metrics add
        ``first_ratio_mean``, the mean ratio of the first minibatch before its update, and
        ``members_skipped`` (completions holding an image placeholder id). ``member_rewards``
        holds, per member, its group and the reward and advantage it was trained with (a
        zero-variance group's members too: advantage 0, not trained on). ``on_step(index, total,
        metrics)`` is called after every optimizer step (e.g. a progress bar).

        ``sampled_with``: the weights the groups were sampled with, under which the stored
        log-probs are checked (:meth:`sampled_weights`): the trainer's own (on-policy, the
        default), an older version's adapter directory, or None for the base model — what an
        asynchronous loop trains on (the ratio is then π_θ / π_old of that older policy, PPO's
        off-policy correction, and ``first_ratio_mean`` is not 1)."""
        cfg = self.config
        metrics: dict[str, float] = {
            "groups": float(len(groups)),
            "groups_used": 0.0,
            "groups_zero_variance": 0.0,
            "members_skipped": 0.0,
            "reward_mean": math.nan,
            "first_ratio_mean": math.nan,
            **step_summary([]),
        }
        if not groups:
            return TrainResult(self.version, metrics)
        rewards = [[m.reward for m in g.members] for g in groups]  # groups may differ in size
        advantages, zero = ragged_group_advantages(rewards, scale=cfg.advantage_scale)
        used: dict[str, tuple[str, dict[str, float]]] = {}
        rows: list[Row] = []
        owners: list[TextMember] = []  # the member of each row, for errors
        skipped = 0
        parallel = DataParallel.current()
        mine: list[int] = []  # the rows this rank encodes and computes (all on one process)
        # An unreadable image or a drift on one rank's rows stops every rank.
        with parallel.together():
            for index, (group, adv, is_zero) in enumerate(
                zip(groups, advantages, zero, strict=True)
            ):
                for member, a in zip(group.members, adv.tolist(), strict=True):
                    used[member.trajectory_id] = (
                        group.group_id,
                        {"reward": float(member.reward), "advantage": float(a)},
                    )
                if is_zero:
                    continue
                # One encoding per distinct stored input (a group's members usually share it).
                encoded: dict[str, tuple[list[int], dict[str, torch.Tensor]]] = {}
                for member, a in zip(group.members, adv.tolist(), strict=True):
                    if not member.token_ids:
                        continue
                    if cfg.require_raw_sampling:
                        check_raw_sampling(member)
                    if self.placeholders.intersection(member.token_ids):
                        skipped += 1
                        log.warning(
                            "trajectory %s (step %d): the completion holds an image placeholder id "
                            "(embedded as text by the server, as an image by a training forward "
                            "pass): skipped",
                            member.trajectory_id,
                            member.step_seq,
                        )
                        continue
                    if not parallel.owns(index):  # another rank's: its completion's length counts
                        rows.append(Row((), member.token_ids, member.logprobs, a))
                        owners.append(member)
                        continue
                    key = json.dumps([member.messages, member.prompt_token_ids], default=str)
                    if key not in encoded:
                        encoded[key] = self.member_inputs(group, member)
                    prompt, extras = encoded[key]
                    mine.append(len(rows))
                    rows.append(Row(prompt, member.token_ids, member.logprobs, a, extras))
                    owners.append(member)
            with self.sampled_weights(sampled_with):
                self.check_alignment([rows[i] for i in mine], [owners[i] for i in mine])
            if cfg.beta and mine:
                for i, row in zip(mine, self.with_reference([rows[i] for i in mine]), strict=True):
                    rows[i] = row
        metrics["groups_zero_variance"] = float(sum(zero))
        metrics["groups_used"] = float(len(groups) - sum(zero))
        metrics["members_skipped"] = float(skipped)
        metrics["reward_mean"] = math.fsum(r for rs in rewards for r in rs) / sum(map(len, rewards))
        history: list[dict[str, float]] = []
        shuffler = torch.Generator().manual_seed(cfg.seed + self.steps)
        owned = set(mine)
        per_epoch = math.ceil(len(rows) / cfg.minibatch_size)
        total = per_epoch * cfg.epochs
        for _ in range(cfg.epochs if rows else 0):
            order = torch.randperm(len(rows), generator=shuffler).tolist()
            for start in range(0, len(order), cfg.minibatch_size):
                picked = order[start : start + cfg.minibatch_size]
                batch = [rows[i] for i in picked]
                local = [rows[i] for i in picked if i in owned]
                history.append(self._step(batch, local, parallel))
                if on_step is not None:
                    on_step(len(history), total, history[-1])
        metrics.update(step_summary(history))
        if history:  # no optimizer step (every group zero-variance): the same version
            metrics["first_ratio_mean"] = history[0]["ratio_mean"]
            self.version = next_version(self.version)
        return TrainResult(self.version, metrics, history, member_rewards=used)

    @contextlib.contextmanager
    def sampled_weights(self, sampled_with: Any = ON_POLICY) -> Iterator[None]:
        """The model as it sampled: unchanged (``ON_POLICY``), the base model with the adapter
        disabled (None), or the LoRA weights of the adapter directory ``sampled_with`` swapped
        in (the trainer's own restored after, optimizer state untouched)."""
        if sampled_with is ON_POLICY:
            yield
            return
        if sampled_with is None:
            with self.model.disable_adapter():
                yield
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(sampled_with) / "adapter_model.safetensors"
        with torch.no_grad():
            current = [p.detach().clone() for p in self.parameters]
            try:
                loaded = set_peft_model_state_dict(self.model, load_file(str(path)))
                wrong = [k for k in loaded.missing_keys if "lora_" in k] + list(
                    loaded.unexpected_keys
                )
                if wrong:
                    raise ValueError(
                        f"{sampled_with}: not an adapter of this trainer's shape ({wrong[0]})"
                    )
                yield
            finally:
                for param, now in zip(self.parameters, current, strict=True):
                    param.copy_(now)

    def check_alignment(self, rows: Sequence[Sequence[Any]], owners: Sequence[TextMember]) -> float:
        """Recompute every row's log-probs under the current weights (no update) and compare
        them with the stored ones; raise ``ValueError`` at the first row whose largest
        difference exceeds the drift bound. Returns the largest difference."""
        bound = self.config.drift_bound
        worst = 0.0
        size = max(1, self.config.minibatch_size)
        checked = [_row(r) for r in rows]
        with torch.no_grad():
            for start in range(0, len(checked), size):
                batch = checked[start : start + size]
                logp, _ = self.logprobs([(r.prompt, r.completion, r.extras) for r in batch])
                for i, row in enumerate(batch):
                    stored = row.old
                    recomputed = logp[i, : len(row.completion)].double().cpu()
                    delta = (recomputed - torch.tensor(stored, dtype=torch.float64)).abs()
                    worst = max(worst, float(delta.max()))
                    if float(delta.max()) > bound:
                        j = int(torch.nonzero(delta > bound)[0])
                        member = owners[start + i]
                        hint = (
                            " (a difference this close to the bound may be rounding alone on a "
                            "sharp model: --max-logprob-drift raises the bound)"
                            if float(delta[j]) < 10 * bound
                            else ""
                        )
                        raise ValueError(
                            f"trajectory {member.trajectory_id} (step {member.step_seq}): the "
                            f"recomputed log-prob of completion token {j} is "
                            f"{float(recomputed[j]):.6f}, the stored one {float(stored[j]):.6f} "
                            f"(|diff| {float(delta[j]):.2e} > max_logprob_drift {bound:g}): the "
                            "trainer does not see the prompt, images, model, dtype or adapter "
                            f"the server sampled with{hint}"
                        )
        return worst

    def microbatches(self, batch: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """``batch`` in consecutive micro-batches of at most ``max_tokens_per_forward`` padded
        tokens (a row longer than the budget goes alone)."""
        budget = self.config.max_tokens_per_forward
        if budget is None:
            return [list(batch)]
        parts: list[list[Any]] = [[]]
        width = 0
        for row in batch:
            length = len(row[0]) + len(row[1])
            if parts[-1] and max(width, length) * (len(parts[-1]) + 1) > budget:
                parts.append([])
                width = 0
            parts[-1].append(row)
            width = max(width, length)
        return parts

    def _step(
        self,
        batch: Sequence[Sequence[Any]],
        local: Sequence[Sequence[Any]] | None = None,
        parallel: DataParallel | None = None,
    ) -> dict[str, float]:
        """One optimizer step on the minibatch ``batch``, of which this rank computes the
        ``local`` rows (default: all), weighted by their share of ``batch``; the gradients and
        metrics are summed over ``parallel``'s ranks before the update."""
        cfg = self.config
        parallel = parallel or DataParallel()
        started = time.perf_counter()
        full = [_row(r) for r in batch]
        mine = full if local is None else [_row(r) for r in local]
        longest = max(len(r.completion) for r in full)
        total_tokens = sum(len(r.completion) for r in full)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        drift = 0.0
        for rows in self.microbatches(mine) if mine else []:
            logp, mask = self.logprobs([(r.prompt, r.completion, r.extras) for r in rows])
            old = torch.zeros_like(logp)
            for i, row in enumerate(rows):
                old[i, : len(row.old)] = torch.tensor(row.old, dtype=old.dtype)
            advantages = torch.tensor([r.advantage for r in rows], dtype=logp.dtype)
            loss, metrics = grpo_loss(
                logp,
                old,
                advantages,
                mask,
                eps_low=cfg.eps_low,
                eps_high=cfg.eps_high,
                beta=cfg.beta,
                ref_logprobs=self._reference(rows, logp) if cfg.beta else None,
                loss_type=cfg.loss_type,
                max_completion_length=longest,
            )
            tokens = sum(len(r.completion) for r in rows)
            weight = microbatch_weight(cfg.loss_type, len(rows), tokens, len(full), total_tokens)
            (loss * weight).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.item() * weight
            for key, value in metrics.items():  # token means: weighted by the tokens
                totals[key] = totals.get(key, 0.0) + value * tokens / total_tokens
            drift = max(drift, float(((logp - old).abs() * mask).max().detach()))
        seen = sum(len(r.prompt) + len(r.completion) for r in mine)
        totals = parallel.sum({**totals, "seen": seen}, STEP_SUMS)
        parallel.all_reduce_gradients(self.parameters)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, cfg.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        drift = parallel.max(drift)
        speed = totals.pop("seen") / (time.perf_counter() - started)
        return {**totals, "grad_norm": norm.item(), "tokens_per_s": speed, FIRST_STEP_KEY: drift}

    def _reference(self, rows: Sequence[Row], logp: torch.Tensor) -> torch.Tensor:
        """The rows' reference log-probs shaped like ``logp``: stored ones, else computed."""
        if any(r.ref is None for r in rows):
            return self.reference_logprobs(rows)
        ref = torch.zeros_like(logp)
        for i, row in enumerate(rows):
            ref[i, : len(row.ref)] = torch.tensor(row.ref, dtype=ref.dtype)
        return ref

    def save(self, directory: str | Path) -> Path:
        """The adapter in peft's layout, ``adapter_model.safetensors`` + ``adapter_config.json``,
        written atomically into the new ``directory``."""

        def write(path: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # Only the LoRA matrices: the (frozen, tied) embedding stays the base model's.
                self.model.save_pretrained(
                    path, safe_serialization=True, save_embedding_layers=False
                )

        return write_new_directory(directory, write)

    def save_checkpoint(self, directory: str | Path) -> Path:
        """What :meth:`save` leaves out and an exact continuation needs, into the new
        ``directory`` (atomic): the AdamW moments, the step count and the KL reference's
        weights. :meth:`restore_checkpoint` on a trainer built from the saved version
        (``adapter=``) then trains as if it had never stopped."""
        from policies.weights import save_weights

        state = self.optimizer.state_dict()
        tensors = {
            f"opt.{index}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
            for index, slot in state["state"].items()
            for key, value in slot.items()
        }
        for index, weight in enumerate(self.reference_weights or []):
            tensors[f"ref.{index}"] = weight
        meta = {
            "class": "lora-trainer-state",
            "steps": self.steps,
            "param_groups": state["param_groups"],
            "reference_version": self.reference_version,
            "has_reference": self.reference_weights is not None,
        }
        return save_weights(directory, tensors, meta)

    def restore_checkpoint(self, directory: str | Path) -> None:
        """Load :meth:`save_checkpoint`'s state into this trainer (built on the same adapter)."""
        from policies.weights import load_weights

        tensors, meta = load_weights(directory)
        if meta.get("class") != "lora-trainer-state":
            raise ValueError(f"{directory} is not a LoRA trainer checkpoint")
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                index, name = key.removeprefix("opt.").split(".", 1)
                slots.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        self.steps = int(meta["steps"])
        if meta["has_reference"]:
            count = sum(key.startswith("ref.") for key in tensors)
            self.reference_weights = [
                tensors[f"ref.{i}"].to(self.parameters[i].device) for i in range(count)
            ]
            self.reference_version = meta["reference_version"]
        else:
            self.reference_weights, self.reference_version = None, None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "text-lora",
            "algorithm": "grpo",
            "optimizer_steps": self.steps,
            "base_model": self.model_dir,
            "parent": self.parent,
            "kl_reference": (
                "base" if self.reference_version is None else f"adapter@{self.reference_version}"
            ),
            "dtype": self.config.dtype,
            "config": self.config.model_dump(mode="json"),
        }


def _extras(row: Sequence[Any]) -> Mapping[str, torch.Tensor]:
    """A row's prompt inputs besides the ids: a :class:`Row`'s ``extras``, a triple's third."""
    if isinstance(row, Row):
        return row.extras or {}
    return (row[2] if len(row) > 2 else None) or {}


def _row(row: Sequence[Any]) -> Row:
    """A :class:`Row`, or a plain (prompt, completion, old log-probs, advantage[, extras])."""
    return row if isinstance(row, Row) else Row(*row)
