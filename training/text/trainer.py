"""GRPO on a peft LoRA adapter of a text model, from stored completions (``training.text.groups``).

``LoRATrainer`` recomputes the log-probs of the stored completion ids by teacher forcing under
base + LoRA. The prompt ids come from :meth:`TransformersLM.encode`, the very code the ``lm``
server runs to build a prompt (chat template with the generation prompt, tokenised without
special tokens), so position ``len(prompt) - 1 + j`` of the forward pass predicts completion
token ``j``, as it did when the server sampled it. Before the first update the ratio is 1 up
to float rounding (``first_max_abs_log_ratio`` in the metrics), which checks that alignment.
The loss is ``training.grpo.grpo_loss``, minimised with AdamW on the LoRA parameters only (the
base is frozen). ``save`` writes ``adapter_model.safetensors`` + ``adapter_config.json``
(peft's layout), which the ``lm`` server and vLLM load by path.

Served elsewhere (vLLM), the prompt ids are the same only if the server applies the same chat
template and tokenizer; the first-step ratio is the check.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.backends.lm_types import LMRequest, PromptMessage
from policies.weights import next_version, write_new_directory
from training.grpo import AdvantageScale, LossType, group_advantages, grpo_loss
from training.result import FIRST_STEP_KEY, TrainResult, step_summary
from training.text.groups import TextGroup

# Every linear layer, ``lm_head`` included: with small tied embeddings (random-weight test
# models) the final RMSNorm bounds how far the other layers alone can move any logit.
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
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
    """Completions per optimizer step."""
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_type: LossType = "token_mean"
    advantage_scale: AdvantageScale = "group"
    max_grad_norm: float = 1.0
    seed: int = 0


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
        """The prompt's token ids exactly as the ``lm`` server builds them for a chat."""
        request = LMRequest(messages=[PromptMessage.from_chat(m) for m in messages], max_tokens=0)
        return list(self.engine.encode(request).input_ids)

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
        sizes = {len(g.members) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"groups must have equal sizes, got {sorted(sizes)}")
        rewards = torch.tensor([[m.reward for m in g.members] for g in groups])
        advantages, zero = group_advantages(rewards, scale=cfg.advantage_scale)
        rows = []  # (prompt ids, completion ids, old log-probs, advantage)
        for group, adv, is_zero in zip(groups, advantages.tolist(), zero.tolist(), strict=True):
            if is_zero:
                continue
            prompt = self.prompt_ids(group.messages)
            for member, a in zip(group.members, adv, strict=True):
                if member.token_ids:
                    rows.append((prompt, member.token_ids, member.logprobs, a))
        metrics["groups_zero_variance"] = float(int(zero.sum()))
        metrics["groups_used"] = float(len(groups) - int(zero.sum()))
        metrics["reward_mean"] = float(rewards.mean())
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

    def _step(self, batch: list[tuple[Any, Any, Any, float]]) -> dict[str, float]:
        cfg = self.config
        logp, mask = self.logprobs([(p, c) for p, c, _, _ in batch])
        old = torch.zeros_like(logp)
        for i, (_, _, stored, _) in enumerate(batch):
            old[i, : len(stored)] = torch.tensor(stored, dtype=old.dtype)
        advantages = torch.tensor([a for *_, a in batch], dtype=logp.dtype)
        loss, metrics = grpo_loss(
            logp,
            old,
            advantages,
            mask,
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            loss_type=cfg.loss_type,
        )
        drift = float(((logp - old).abs() * mask).max().detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, cfg.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        return {"loss": loss.item(), "grad_norm": norm.item(), **metrics, FIRST_STEP_KEY: drift}

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
