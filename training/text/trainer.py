"""GRPO on a peft LoRA adapter of a text model, from stored completions (``training.text.groups``).

``LoRATrainer`` recomputes the log-probs of the stored completion ids by teacher forcing under
base + LoRA, after exactly the prompt the server saw: each member's stored ``prompt_token_ids``
when the server returned them, else its stored request ``messages`` encoded by
:meth:`TransformersLM.encode`, the very code the ``lm`` server runs to build a prompt (chat
template with the generation prompt, tokenised without special tokens), so position
``len(prompt) - 1 + j`` of the forward pass predicts completion token ``j``, as it did when the
server sampled it.

Before the first update every row's recomputed log-probs are compared with the stored ones; a
difference above ``LoRAConfig.max_logprob_drift`` stops training with a ``ValueError`` naming
the trajectory, the first differing completion position and both values (wrong prompt, model or
adapter). That check, and the GRPO ratio itself, assume the stored log-probs are the sampling
policy's: the ``lm`` server (and vLLM by default) returns the raw model's log-probs, before
temperature, top-p, top-k and repetition penalty, so they are π_old only when the request
sampled untransformed (temperature 1, top-p 1, no top-k, no repetition penalty). A member whose
stored ``sampling`` says otherwise is refused unless ``require_raw_sampling`` is off.

The loss is ``training.grpo.grpo_loss``, minimised with AdamW on the LoRA parameters only (the
base is frozen). ``save`` writes ``adapter_model.safetensors`` + ``adapter_config.json``
(peft's layout), which the ``lm`` server and vLLM load by path.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.backends.lm_types import LMRequest, PromptMessage
from policies.weights import next_version, write_new_directory
from training.grpo import (
    AdvantageScale,
    LossType,
    grpo_loss,
    microbatch_weight,
    ragged_group_advantages,
)
from training.result import FIRST_STEP_KEY, TrainResult, step_summary
from training.text.groups import TextGroup, TextMember

# Every linear layer of the decoder: the modules vLLM loads LoRA weights for. Not ``lm_head``:
# vLLM refuses an adapter with LoRA weights on it ("unsupported LoRA weight"), so an adapter
# that trains it could be served by ``atelier serve lm`` but not by vLLM.
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = LORA_TARGETS
    lr: float = 1e-2
    """AdamW learning rate (a tiny model; billion-parameter runs use ~1e-5)."""
    weight_decay: float = 0.0
    epochs: int = 8
    """Passes over the batch (GRPO's μ); every one is clipped against the stored π_old."""
    minibatch_size: int = 16
    max_tokens_per_forward: int | None = None
    """Micro-batches: at most this many tokens (rows × the longest prompt + completion) per
    forward pass; a minibatch's micro-batches accumulate their gradients into one update, the
    same as one pass. None: the whole minibatch in one pass."""
    """Completions per optimizer step."""
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_type: LossType = "token_mean"
    advantage_scale: AdvantageScale = "group"
    max_grad_norm: float = 1.0
    beta: float = 0.0
    """Weight of the k3 KL to the reference, the base model with the adapter disabled
    (DeepSeekMath's GRPO: 0.04; DAPO and Dr. GRPO: 0, the default)."""
    seed: int = 0
    max_logprob_drift: float = 1e-4
    """Largest |recomputed - stored| completion log-prob allowed before the first update; above
    it training stops (the trainer does not see what the server saw)."""
    require_raw_sampling: bool = True
    """Refuse members sampled with temperature != 1, top-p < 1, top-k or a repetition penalty:
    the stored (raw) log-probs are then not the sampling policy's, and the ratio is biased."""


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


def prompt_message(message: Any) -> PromptMessage:
    """A ``ChatMessage`` or a stored request message (OpenAI shape) as the engine's prompt
    turn, parts in order as the ``lm`` server parses them."""
    if not isinstance(message, dict):
        return PromptMessage.from_chat(message)
    content = message.get("content")
    if content is None:
        return PromptMessage(message["role"], ())
    if isinstance(content, str):
        return PromptMessage(message["role"], (content,))
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ValueError(
                f"a stored {part.get('type')!r} part: LoRATrainer trains text models only"
            )
        parts.append(str(part.get("text", "")))
    return PromptMessage(message["role"], tuple(parts))


class LoRATrainer:
    """The base model (frozen) + a trainable peft LoRA adapter, on its own copy of the model.

    ``name`` / ``version`` are the adapter's identity as a policy; every ``train`` call with
    groups makes the next version."""

    def __init__(
        self,
        model_dir: str | Path,
        config: LoRAConfig | None = None,
        *,
        device: str = "cpu",
        name: str = "planner",
        version: str = "0",
    ) -> None:
        from peft import LoraConfig, get_peft_model

        from nodes.backends.engines.transformers_lm import TransformersLM

        self.config = cfg = config or LoRAConfig()
        self.name, self.version = name, version
        self.model_dir = str(model_dir)
        # The server's engine class: the same chat template and tokenisation of prompts.
        self.engine = TransformersLM(model_dir, device=device, dtype="float32")
        if self.engine.is_vlm:
            raise ValueError("LoRATrainer trains text models only")
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=0.0,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings(), torch.random.fork_rng():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls an API deprecated in v6
            # LoRA on the tied ``lm_head`` changes the output layer only, not the input embedding.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            torch.manual_seed(cfg.seed)  # LoRA's A matrices are random (B starts at 0)
            self.model = get_peft_model(self.engine.model, lora)
        self.model.eval()  # no dropout anywhere: log-probs match the server's
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.steps = 0
        """Optimizer steps taken so far (over every ``train`` call)."""

    def prompt_ids(self, messages: Sequence[Any]) -> list[int]:
        """The prompt's token ids exactly as the ``lm`` server builds them for a chat:
        ``ChatMessage``s, or stored request messages (OpenAI shape, text parts only)."""
        request = LMRequest(messages=[prompt_message(m) for m in messages], max_tokens=0)
        return list(self.engine.encode(request).input_ids)

    def member_prompt_ids(self, group: TextGroup, member: TextMember) -> list[int]:
        """The prompt the server saw for ``member``: its stored prompt ids, else its stored
        messages (else the group's) encoded as the server does."""
        if member.prompt_token_ids is not None:
            return list(member.prompt_token_ids)
        return self.prompt_ids(member.messages if member.messages is not None else group.messages)

    def logprobs(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probs of each row's completion ids after its prompt ids.
        Returns ([B, T] log-probs, [B, T] mask), right-padded to the longest completion."""
        device = self.engine.device
        lengths = [len(p) + len(c) for p, c in rows]
        width, steps = max(lengths), max(len(c) for _, c in rows)
        ids = torch.full((len(rows), width), self.engine.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (prompt, completion) in enumerate(rows):
            ids[i, : lengths[i]] = torch.tensor([*prompt, *completion])
            attention[i, : lengths[i]] = 1
        logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        out = torch.zeros((len(rows), steps), dtype=torch.float32, device=device)
        mask = torch.zeros((len(rows), steps), dtype=torch.float32, device=device)
        for i, (prompt, completion) in enumerate(rows):
            if not completion:
                continue
            start = len(prompt) - 1  # logits at position t predict token t + 1
            step_logits = logits[i, start : start + len(completion)].float()
            targets = torch.tensor(completion, device=device)
            chosen = torch.log_softmax(step_logits, -1).gather(1, targets[:, None])[:, 0]
            out[i, : len(completion)] = chosen
            mask[i, : len(completion)] = 1.0
        return out, mask

    def train(self, groups: Sequence[TextGroup]) -> TrainResult:
        """GRPO on ``groups`` (``epochs`` passes of shuffled minibatches); the metrics add
        ``first_ratio_mean``, the mean ratio of the first minibatch before its update."""
        cfg = self.config
        metrics: dict[str, float] = {
            "groups": float(len(groups)),
            "groups_used": 0.0,
            "groups_zero_variance": 0.0,
            "reward_mean": math.nan,
            "first_ratio_mean": math.nan,
            **step_summary([]),
        }
        if not groups:
            return TrainResult(self.version, metrics)
        rewards = [[m.reward for m in g.members] for g in groups]  # groups may differ in size
        advantages, zero = ragged_group_advantages(rewards, scale=cfg.advantage_scale)
        rows = []  # (prompt ids, completion ids, old log-probs, advantage)
        owners = []  # the member of each row, for errors
        for group, adv, is_zero in zip(groups, advantages, zero, strict=True):
            if is_zero:
                continue
            encoded: dict[str, list[int]] = {}  # one encoding per distinct stored input
            for member, a in zip(group.members, adv.tolist(), strict=True):
                if not member.token_ids:
                    continue
                if cfg.require_raw_sampling:
                    check_raw_sampling(member)
                if member.prompt_token_ids is not None:
                    prompt = list(member.prompt_token_ids)
                else:
                    key = json.dumps(member.messages, sort_keys=True, default=str)
                    if key not in encoded:
                        encoded[key] = self.member_prompt_ids(group, member)
                    prompt = encoded[key]
                rows.append((prompt, member.token_ids, member.logprobs, a))
                owners.append(member)
        self.check_alignment(rows, owners)
        metrics["groups_zero_variance"] = float(sum(zero))
        metrics["groups_used"] = float(len(groups) - sum(zero))
        metrics["reward_mean"] = math.fsum(r for rs in rewards for r in rs) / sum(map(len, rewards))
        history: list[dict[str, float]] = []
        shuffler = torch.Generator().manual_seed(cfg.seed + self.steps)
        for _ in range(cfg.epochs if rows else 0):
            order = torch.randperm(len(rows), generator=shuffler).tolist()
            for start in range(0, len(order), cfg.minibatch_size):
                batch = [rows[i] for i in order[start : start + cfg.minibatch_size]]
                history.append(self._step(batch))
        metrics.update(step_summary(history))
        if history:
            metrics["first_ratio_mean"] = history[0]["ratio_mean"]
        self.version = next_version(self.version)
        return TrainResult(self.version, metrics, history)

    def check_alignment(
        self, rows: Sequence[tuple[Any, Any, Any, float]], owners: Sequence[TextMember]
    ) -> float:
        """Recompute every row's log-probs under the current weights (no update) and compare
        them with the stored ones; raise ``ValueError`` at the first row whose largest
        difference exceeds ``max_logprob_drift``. Returns the largest difference."""
        worst = 0.0
        size = max(1, self.config.minibatch_size)
        with torch.no_grad():
            for start in range(0, len(rows), size):
                batch = rows[start : start + size]
                logp, _ = self.logprobs([(p, c) for p, c, _, _ in batch])
                for i, (_, completion, stored, _) in enumerate(batch):
                    recomputed = logp[i, : len(completion)].double().cpu()
                    delta = (recomputed - torch.tensor(stored, dtype=torch.float64)).abs()
                    worst = max(worst, float(delta.max()))
                    if float(delta.max()) > self.config.max_logprob_drift:
                        j = int(torch.nonzero(delta > self.config.max_logprob_drift)[0])
                        member = owners[start + i]
                        raise ValueError(
                            f"trajectory {member.trajectory_id} (step {member.step_seq}): the "
                            f"recomputed log-prob of completion token {j} is "
                            f"{float(recomputed[j]):.6f}, the stored one {float(stored[j]):.6f} "
                            f"(|diff| {float(delta[j]):.2e} > max_logprob_drift "
                            f"{self.config.max_logprob_drift:g}): the trainer does not see the "
                            "prompt, model or adapter the server sampled with"
                        )
        return worst

    def reference_logprobs(self, batch: Sequence[tuple[Any, Any, Any, float]]) -> torch.Tensor:
        """The rows' log-probs under the reference: the base model, the adapter disabled."""
        with torch.no_grad(), self.model.disable_adapter():
            return self.logprobs([(p, c) for p, c, _, _ in batch])[0]

    def microbatches(
        self, batch: Sequence[tuple[Any, Any, Any, float]]
    ) -> list[list[tuple[Any, Any, Any, float]]]:
        """``batch`` in consecutive micro-batches of at most ``max_tokens_per_forward`` padded
        tokens (a row longer than the budget goes alone)."""
        budget = self.config.max_tokens_per_forward
        if budget is None:
            return [list(batch)]
        parts: list[list[tuple[Any, Any, Any, float]]] = [[]]
        width = 0
        for row in batch:
            length = len(row[0]) + len(row[1])
            if parts[-1] and max(width, length) * (len(parts[-1]) + 1) > budget:
                parts.append([])
                width = 0
            parts[-1].append(row)
            width = max(width, length)
        return parts

    def _step(self, batch: list[tuple[Any, Any, Any, float]]) -> dict[str, float]:
        cfg = self.config
        longest = max(len(c) for _, c, _, _ in batch)
        total_tokens = sum(len(c) for _, c, _, _ in batch)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        drift = 0.0
        for rows in self.microbatches(batch):
            logp, mask = self.logprobs([(p, c) for p, c, _, _ in rows])
            old = torch.zeros_like(logp)
            for i, (_, _, stored, _) in enumerate(rows):
                old[i, : len(stored)] = torch.tensor(stored, dtype=old.dtype)
            advantages = torch.tensor([a for *_, a in rows], dtype=logp.dtype)
            loss, metrics = grpo_loss(
                logp,
                old,
                advantages,
                mask,
                eps_low=cfg.eps_low,
                eps_high=cfg.eps_high,
                beta=cfg.beta,
                ref_logprobs=self.reference_logprobs(rows) if cfg.beta else None,
                loss_type=cfg.loss_type,
                max_completion_length=longest,
            )
            tokens = sum(len(c) for _, c, _, _ in rows)
            weight = microbatch_weight(cfg.loss_type, len(rows), tokens, len(batch), total_tokens)
            (loss * weight).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.item() * weight
            for key, value in metrics.items():  # token means: weighted by the tokens
                totals[key] = totals.get(key, 0.0) + value * tokens / total_tokens
            drift = max(drift, float(((logp - old).abs() * mask).max().detach()))
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, cfg.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        return {**totals, "grad_norm": norm.item(), FIRST_STEP_KEY: drift}

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

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "text-lora",
            "algorithm": "grpo",
            "optimizer_steps": self.steps,
            "base_model": self.model_dir,
        }
