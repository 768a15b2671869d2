"""GRPO for LoRA text policies: sample from a chat server, record, train a peft adapter, save it.

The loop, end to end (``tests/test_training_lora.py`` runs it on a tiny random-weight LM)::

    run_id = await collect(client, store, prompts, group_size=8)     # sample + record
    score_run(store, run_id, target_fraction(target_ids))            # rewards, into the store
    groups = load_groups(store, run_id)                              # read back: ids, log-probs
    trainer = LoRATrainer(model_dir)
    trainer.train(groups)                                            # GRPO on the LoRA only
    trainer.save(adapter_dir)                                        # peft layout, safetensors
    await client.load_adapter("policy-v1", str(adapter_dir))         # served at run time

1. ``collect`` samples ``group_size`` completions per prompt with temperature 1 and top-p 1 (so
   the server's raw log-probs are exactly the sampling policy's) and records each as a
   one-step trajectory (node ``planner``) through :class:`storage.recorder.SQLRecorder`: the
   generation's token ids and log-probs are stored bit-exact. The prompts of one group share a
   ``group_id``; the chat's system prompt goes into the run's config.
2. A reward is any function of a completion's text and token ids; ``target_fraction`` (the
   share of tokens from a chosen token set) is measurable even on random weights.
3. ``load_groups`` builds GRPO groups from the STORED token ids and sampling log-probs (never
   re-tokenised text) and the stored rewards.
4. ``LoRATrainer`` recomputes log-probs of those ids by teacher forcing under base + LoRA. The
   prompt ids come from :meth:`TransformersLM.encode`, the very code the ``lm`` server runs to
   build a prompt (chat template with the generation prompt, tokenised without special tokens),
   so position ``len(prompt) - 1 + j`` of the forward pass predicts completion token ``j``, as
   it did when the server sampled it. Before the first update the ratio is 1 up to float
   rounding (``TrainStats.first_max_abs_log_ratio``), which checks that alignment.
5. ``training.grpo.grpo_loss`` + AdamW on the LoRA parameters only (the base is frozen).
6. ``save`` writes ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's layout), which
   the ``lm`` server and vLLM load by path.

Served elsewhere (vLLM), the prompt ids are the same only if the server applies the same chat
template and tokenizer; the first-step ratio is the check.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.grpo import AdvantageScale, LossType, group_advantages, grpo_loss

DEFAULT_SYSTEM = "You are a planner. Write a short plan for the picture."
DEFAULT_REWARD = "lora_target"
# Every linear layer, ``lm_head`` included: with small tied embeddings (random-weight test
# models) the final RMSNorm bounds how far the other layers alone can move any logit.
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
)  # fmt: skip

Reward = Callable[[str, Sequence[int]], float]
"""A reward of one completion: ``reward(text, token_ids)``."""


# --- 1. sampling and recording ------------------------------------------------------------------


def prompt_messages(prompt: str, system: str = DEFAULT_SYSTEM) -> list[Any]:
    """The chat a completion answers: a system turn and the prompt as the user turn."""
    from nodes.backends.base import ChatMessage

    return [ChatMessage("system", system), ChatMessage("user", prompt)]


async def collect(
    client: Any,
    store: Any,
    prompts: Sequence[str],
    *,
    group_size: int = 8,
    max_tokens: int = 16,
    system: str = DEFAULT_SYSTEM,
    seed: int = 0,
    name: str | None = None,
) -> str:
    """Sample ``group_size`` completions of every prompt from ``client`` (a chat model with
    token ids and log-probs, e.g. ``OpenAIChatClient``) concurrently, and record each as a
    one-step trajectory in ``store``. Returns the run id."""
    from agent_graph.ids import time_ordered_id
    from agent_graph.recording import StepRecord
    from nodes.backends.base import SamplingParams
    from nodes.common import NodeTrace, call_chat, derive_seed
    from nodes.state import ReasonerState, Task
    from storage.recorder import SQLRecorder

    config = {"kind": "lora-sampling", "system": system, "max_tokens": max_tokens, "seed": seed}
    run = store.create_run(name or "lora-sampling", config)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, logprobs=True)
    group_tag = uuid.uuid4().hex[:8]

    async def sample(recorder: Any, index: int, prompt: str, k: int) -> None:
        task = Task(
            prompt=prompt,
            group_id=f"{group_tag}-{index}",
            sample_index=k,
            seed=derive_seed(seed, index, k),
        )
        state = ReasonerState(trajectory_id=time_ordered_id(), task=task)
        await recorder.start_trajectory(state)
        trace = NodeTrace()
        started_at, started = time.time(), time.perf_counter()
        await call_chat(
            client, "planner", prompt_messages(prompt, system), sampling, task.seed, trace
        )
        await recorder.record_step(
            StepRecord(
                trajectory_id=state.trajectory_id,
                seq=0,
                node="planner",
                started_at=started_at,
                latency_s=time.perf_counter() - started,
                state_before=state.model_dump(mode="json"),
                update={"step_count": 1},
                trace=trace,
            )
        )
        await recorder.finish_trajectory(state.trajectory_id, "succeeded", state, None)

    async with SQLRecorder(store, run.id) as recorder:
        await asyncio.gather(
            *(
                sample(recorder, i, prompt, k)
                for i, prompt in enumerate(prompts)
                for k in range(group_size)
            )
        )
    return run.id


# --- 2. rewards -----------------------------------------------------------------------------------


def target_fraction(target_ids: Iterable[int], stop_ids: Iterable[int] = ()) -> Reward:
    """Reward: the share of a completion's tokens (stop tokens excluded) in ``target_ids``."""
    targets, stops = frozenset(target_ids), frozenset(stop_ids)

    def reward(text: str, token_ids: Sequence[int]) -> float:
        ids = [t for t in token_ids if t not in stops]
        return sum(t in targets for t in ids) / len(ids) if ids else 0.0

    return reward


def _generation(trajectory_id: str, steps: Sequence[Any]) -> Any:
    """The trajectory's sampled completion (its first step's first generation)."""
    if not steps or not steps[0].generations:
        raise ValueError(f"trajectory {trajectory_id} has no recorded generation")
    return steps[0].generations[0]


def score_run(store: Any, run_id: str, reward: Reward, name: str = DEFAULT_REWARD) -> int:
    """Compute ``reward`` of every recorded completion of the run and store it as the
    trajectory reward ``name``; returns how many were scored."""
    from storage.store import RewardInput
    from training.groups import batches

    rows = []
    for batch in batches(store.trajectories(run=run_id)):
        steps_of = store.steps_many([summary.id for summary in batch])
        for summary in batch:
            generation = _generation(summary.id, steps_of[summary.id])
            value = float(reward(generation.text, generation.token_ids))
            rows.append(RewardInput(summary.id, name, value, source="training.lora"))
    store.add_rewards(rows)
    return len(rows)


# --- 3. groups from the store ---------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    trajectory_id: str
    text: str
    token_ids: tuple[int, ...]
    """Exactly as sampled and stored."""
    logprobs: tuple[float, ...]
    """The sampling-time log-prob of each token (π_old)."""
    reward: float


@dataclass(frozen=True)
class TextGroup:
    """Completions of one prompt (a GRPO group); ``messages`` is the chat they answer."""

    group_id: str
    prompt: str
    messages: tuple[Any, ...]
    completions: tuple[Completion, ...]


def load_groups(store: Any, run_id: str, reward: str = DEFAULT_REWARD) -> list[TextGroup]:
    """The run's GRPO groups, read back from the store: stored token ids and log-probs, and the
    stored reward ``reward``. The chat is rebuilt from the prompt and the run's system prompt."""
    system = store.run(run_id).config.get("system", DEFAULT_SYSTEM)
    groups = []
    for group_id, members in store.groups(run=run_id).items():
        completions = []
        steps_of = store.steps_many([member.id for member in members])
        for member in members:
            generation = _generation(member.id, steps_of[member.id])
            if len(generation.logprobs) != len(generation.token_ids):
                raise ValueError(f"trajectory {member.id}: no sampling log-probs stored")
            if reward not in member.rewards:
                raise KeyError(f"trajectory {member.id} has no reward {reward!r}")
            completions.append(
                Completion(
                    member.id,
                    generation.text,
                    tuple(generation.token_ids),
                    tuple(generation.logprobs),
                    float(member.rewards[reward]),
                )
            )
        prompt = members[0].prompt
        groups.append(
            TextGroup(group_id, prompt, tuple(prompt_messages(prompt, system)), tuple(completions))
        )
    return groups


def best_completions(groups: Sequence[TextGroup]) -> list[tuple[TextGroup, Completion]]:
    """The highest-reward completion of each group."""
    return [(g, max(g.completions, key=lambda c: c.reward)) for g in groups]


# --- 4-6. the trainer -----------------------------------------------------------------------------


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


@dataclass
class TrainStats:
    """What one :meth:`LoRATrainer.train` call did."""

    steps: int = 0
    first_max_abs_log_ratio: float = math.nan
    """max |log π_θ − log π_old| over the call's first minibatch, before its update: ≈ 0 when
    the samples came from the policy being trained (the base model in the first round, the
    served adapter after) and the forward pass sees exactly the tokens the server sampled."""
    first_ratio_mean: float = math.nan
    groups_used: int = 0
    groups_zero_variance: int = 0
    reward_mean: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)


class LoRATrainer:
    """The base model (frozen) + a trainable peft LoRA adapter, on its own copy of the model."""

    def __init__(
        self, model_dir: str | Path, config: LoRAConfig | None = None, *, device: str = "cpu"
    ) -> None:
        from peft import LoraConfig, get_peft_model

        from nodes.backends.engines.transformers_lm import TransformersLM

        self.config = cfg = config or LoRAConfig()
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
        from nodes.backends.lm_types import LMRequest, PromptMessage

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

    def train(self, groups: Sequence[TextGroup]) -> TrainStats:
        """GRPO on ``groups`` (``epochs`` passes of shuffled minibatches)."""
        cfg = self.config
        stats = TrainStats()
        if not groups:
            return stats
        sizes = {len(g.completions) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"groups must have equal sizes, got {sorted(sizes)}")
        rewards = torch.tensor([[c.reward for c in g.completions] for g in groups])
        advantages, zero = group_advantages(rewards, scale=cfg.advantage_scale)
        rows = []  # (prompt ids, completion ids, old log-probs, advantage)
        for group, adv, is_zero in zip(groups, advantages.tolist(), zero.tolist(), strict=True):
            if is_zero:
                continue
            prompt = self.prompt_ids(group.messages)
            for completion, a in zip(group.completions, adv, strict=True):
                if completion.token_ids:
                    rows.append((prompt, completion.token_ids, completion.logprobs, a))
        stats.groups_zero_variance = int(zero.sum())
        stats.groups_used = len(groups) - stats.groups_zero_variance
        stats.reward_mean = float(rewards.mean())
        shuffler = torch.Generator().manual_seed(cfg.seed + self.steps)
        for _ in range(cfg.epochs if rows else 0):
            order = torch.randperm(len(rows), generator=shuffler).tolist()
            for start in range(0, len(order), cfg.minibatch_size):
                self._step([rows[i] for i in order[start : start + cfg.minibatch_size]], stats)
        return stats

    def _step(self, batch: list[tuple[Any, Any, Any, float]], stats: TrainStats) -> None:
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
        if stats.steps == 0:
            stats.first_max_abs_log_ratio = float(((logp - old).abs() * mask).max().detach())
            stats.first_ratio_mean = metrics["ratio_mean"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, cfg.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        stats.steps += 1
        stats.history.append({"loss": loss.item(), "grad_norm": norm.item(), **metrics})

    def save(self, directory: str | Path) -> Path:
        """The adapter in peft's layout: ``adapter_model.safetensors`` + ``adapter_config.json``."""
        path = Path(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # Only the LoRA matrices: the (frozen, tied) embedding stays the base model's.
            self.model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
        return path


# --- one iteration --------------------------------------------------------------------------------


@dataclass
class RoundResult:
    run_id: str
    groups: list[TextGroup]
    stats: TrainStats
    adapter_dir: Path


async def grpo_round(
    sampler: Any,
    store: Any,
    trainer: LoRATrainer,
    prompts: Sequence[str],
    reward: Reward,
    adapter_dir: str | Path,
    *,
    group_size: int = 8,
    max_tokens: int = 16,
    seed: int = 0,
    system: str = DEFAULT_SYSTEM,
    name: str | None = None,
) -> RoundResult:
    """Sample from ``sampler`` (the served policy being trained: the base model first, then the
    adapter the previous round saved, loaded on the server), record, reward, train, and save the
    new adapter to ``adapter_dir``. Loading it on the server is the caller's move (the path is
    as the server sees it): ``await client.load_adapter(name, path, inplace=True)``."""
    run_id = await collect(
        sampler,
        store,
        prompts,
        group_size=group_size,
        max_tokens=max_tokens,
        system=system,
        seed=seed,
        name=name,
    )
    score_run(store, run_id, reward)
    groups = load_groups(store, run_id)
    stats = trainer.train(groups)  # CPU/GPU-bound; blocks this event loop while it runs
    path = trainer.save(adapter_dir)
    return RoundResult(run_id, groups, stats, path)
