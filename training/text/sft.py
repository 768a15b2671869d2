"""SFT of a text policy from stored trajectories, with SAIR's selective loss masking.

The Self-Adaptive Interleaved Reasoner (SAIR) teaches the reasoning syntax by SFT on
trajectories its escalation pipeline produced (direct → up to 3 self-reflection rounds →
multi-step), and computes the loss only on chosen outputs: failed intermediate images and texts
are context, never targets. Here a trajectory's targets are chosen from its recorded steps,
within the stage that succeeded (``ReasonerState.stage`` in escalate mode, else the mode):

========== ==================================================================================
direct     the plan and the verdict that accepted its image
reflect    the last diagnosis and instruction (the rejecting reflection whose edit produced the
           accepted image: the direct stage's verdict when one round fixed it) and the verdict
           that accepted it; the plan too when the first image was accepted (a reflect-mode
           trajectory that needed no edit)
decompose  the decomposition (every sub-task) and each verdict on a sub-task's image, plus any
           diagnosis whose edit fixed a sub-task's image; the plan in decompose mode (escalate
           mode's plan belongs to its failed direct stage)
========== ==================================================================================

Never targets: the stages before the one that succeeded (the direct draw's plan and its
rejection, the reflect rounds that did not fix the image), rejections whose edit did not fix
the image, unusable reflections, anything of a trajectory that did not succeed. The graph's
prompts decide what of them a target sees as context: ``plan`` and ``decompose`` see the task
prompt only, ``reflect`` the text it checks against and the current image — which, after an
edit, is the failed image edited (``nodes/prompts.py``).

One :class:`SFTExample` is one chosen generation: exactly the prompt the server saw (its stored
prompt ids, else its stored request messages, encoded by the trainer as the server encodes
them) and the stored completion ids as the targets, never re-tokenised text. Its loss masks
every prompt token and the padding (:func:`sft_loss`); a generation not chosen is never a row.

``read_sft_examples`` and :func:`select_targets` import no torch; :func:`sft_loss` and
:func:`train_sft` import it when called.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from training.reading import batches, run_list
from training.result import TrainResult, step_summary
from training.text.groups import TextGroup, TextMember

if TYPE_CHECKING:
    import torch

    from storage.images import ImageStore
    from storage.records import StepInfo, TrajectoryDetail
    from storage.store import TrajectoryStore
    from training.text.trainer import LoRATrainer

TEXT_NODES: tuple[str, ...] = ("plan", "reflect", "decompose")
"""The nodes whose generations are text policies' outputs (SFT targets when chosen)."""

Role = Literal["plan", "verdict", "diagnosis", "subtasks"]
"""Why a generation is a target: the blueprint; a reflection accepting an image; a rejection
whose instruction produced an accepted image; the decomposition."""

SUCCESS_STOPS = frozenset({"accepted", "done"})
"""Stop reasons meaning the graph itself judged the final image right (``correct_only=False``)."""


@dataclass(frozen=True)
class SFTTarget:
    """A step of a stored trajectory whose generations are SFT targets."""

    step_seq: int
    node: str
    stage: str
    """The stage that succeeded (``direct``, ``reflect``, ``decompose``; outside escalate
    mode, the trajectory's mode): the kind of example this is, in SAIR's terms."""
    role: Role


@dataclass(frozen=True)
class SFTExample:
    """One chosen generation: the prompt the server saw and the stored completion ids."""

    trajectory_id: str
    step_seq: int
    node: str
    stage: str
    role: Role
    text: str
    target_ids: tuple[int, ...]
    """The completion's token ids exactly as stored (the loss targets)."""
    messages: tuple[dict[str, Any], ...] | None
    """The request's chat messages exactly as sent (None: recorded before schema version 4)."""
    prompt_token_ids: tuple[int, ...] | None
    """The prompt ids as the server encoded them (None when it did not return them)."""
    position: int = 0
    """The generation's position in its step."""
    target_source: Literal["stored", "encoded"] = "stored"
    """``encoded``: the backend returned text only (a rule-based role) and the caller's
    ``encode_missing`` made the ids; never used when ids were stored."""

    def member(self, image_store: ImageStore | None = None) -> TextMember:
        """The example as a GRPO group member (reward 0, no sampling log-probs): what the
        trainer's prompt builders take; ``image_store`` holds its request's images."""
        return TextMember(
            trajectory_id=self.trajectory_id,
            text=self.text,
            token_ids=self.target_ids,
            logprobs=(),
            reward=0.0,
            step_seq=self.step_seq,
            messages=self.messages,
            prompt_token_ids=self.prompt_token_ids,
            image_store=image_store,
        )


def step_stage(step: StepInfo, mode: str | None = None) -> str | None:
    """The stage a stored step belongs to: the escalate stage its state before names (``plan``,
    which opens the first stage, names it in its update), else the trajectory's mode."""
    before, update = step.state_before or {}, step.update or {}
    stage = before.get("stage") or update.get("stage")
    return stage or before.get("mode") or update.get("mode") or mode


def succeeded(detail: TrajectoryDetail, *, correct_only: bool = True) -> bool:
    """Did the trajectory end well: the judge said correct (``correct_only``), or the graph
    itself accepted its final image (the reflector's verdict, or direct mode's one draw)."""
    if detail.status != "succeeded":
        return False
    if correct_only:
        return detail.correct is True
    return (detail.final_state or {}).get("stop_reason") in SUCCESS_STOPS


def winning_stage(detail: TrajectoryDetail) -> str | None:
    """The stage the trajectory ended in: escalate mode's last stage, else its mode."""
    final = detail.final_state or {}
    return final.get("stage") or final.get("mode") or detail.mode


def select_targets(
    detail: TrajectoryDetail,
    *,
    correct_only: bool = True,
    nodes: Sequence[str] = TEXT_NODES,
) -> list[SFTTarget]:
    """The steps of ``detail`` (``store.trajectory(id)``) whose generations are SFT targets,
    in order (see the module docstring for the rule); ``[]`` unless the trajectory
    :func:`succeeded`. Decided from the recorded steps and the final state alone."""
    if not succeeded(detail, correct_only=correct_only):
        return []
    final = detail.final_state or {}
    images = final.get("images") or []
    winner = winning_stage(detail)
    mode = final.get("mode") or detail.mode
    # An image is right if a verdict accepted it; the final one also if the trajectory passed.
    accepted = {int(r["image_index"]) for r in final.get("reflections") or () if r.get("accept")}
    right = accepted | ({len(images) - 1} if images else set())
    steps = sorted(detail.steps, key=lambda s: s.seq)
    targets = []
    for index, step in enumerate(steps):
        if step.node not in nodes or step.error is not None:
            continue
        following = steps[index + 1] if index + 1 < len(steps) else None
        role = _role(step, following, right)
        if role is None:
            continue
        # An earlier stage failed: its outputs are context, except the rejection whose edit
        # opened the winning stage and fixed the image at once (SAIR's last diagnosis
        # E_{K-1}, R_{K-1} for K = 2: the direct stage's verdict).
        opened_winner = role == "diagnosis" and step_stage(following, mode) == winner
        if step_stage(step, mode) != winner and not opened_winner:
            continue
        targets.append(SFTTarget(step.seq, step.node, winner, role))
    return targets


def _role(step: StepInfo, following: StepInfo | None, right: set[int]) -> Role | None:
    """The step's role as a target of the succeeding stage, or None for a failed attempt."""
    if step.node == "decompose":
        return "subtasks"
    if step.node == "plan":
        # The blueprint is drawn on the direct and reflect paths: it failed if its image did
        # (the path's first image; in escalate mode the plan is always the direct stage's).
        # On the decompose path the sub-tasks are drawn instead, so it did not fail.
        if _step_path(step) == "decompose":
            return "plan"
        return "plan" if 0 in right else None
    reflections = (step.update or {}).get("reflections") or ()
    if step.node != "reflect" or not reflections:
        return None
    reflection = reflections[0]
    if reflection.get("accept"):
        return "verdict"
    if not reflection.get("instruction"):
        return None  # unusable output: never imitated
    # The diagnosis fixed the image iff the edit it asked for (the next step, a correction)
    # made an image that turned out right.
    made = _correction_image(following)
    if made is not None and made in right:
        return "diagnosis"
    return None


def _step_path(step: StepInfo) -> str | None:
    """The path (mode, or escalate stage) the step ran on, as the graph routed it."""
    before, update = step.state_before or {}, step.update or {}
    mode = update.get("mode") or before.get("mode")
    if mode == "escalate":
        return before.get("stage") or update.get("stage")
    return mode


def _correction_image(step: StepInfo | None) -> int | None:
    """Index of the image a correction step made (None if ``step`` is not a correction)."""
    if step is None or step.node != "refine" or step.error is not None:
        return None
    update = step.update or {}
    if "subtasks_done" in update or not update.get("images"):
        return None  # a sub-task's edit, not a correction
    return len((step.state_before or {}).get("images") or ())


def read_sft_examples(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    *,
    nodes: Sequence[str] = TEXT_NODES,
    status: str | None = "succeeded",
    correct_only: bool = True,
    stages: Sequence[str] | None = None,
    encode_missing: Callable[[str], Sequence[int]] | None = None,
) -> list[SFTExample]:
    """The SFT examples of the runs' trajectories (of ``status``; None: any), in run and
    trajectory order: every generation of every step :func:`select_targets` chooses among
    ``nodes``, from trajectories whose succeeding stage is in ``stages`` (None: any).

    Each example carries the stored completion ids as targets and the stored request (messages
    and, when the server returned them, prompt ids). A generation stored without completion
    ids (a rule-based role returns text only) raises ``ValueError`` unless ``encode_missing``
    is given to encode its text (e.g. the student's tokenizer); stored ids always win. A
    generation without a stored request raises ``ValueError`` (recorded before schema 4)."""
    wanted = None if stages is None else set(stages)
    examples: list[SFTExample] = []
    for run_id in run_list(run_ids):
        ids = [s.id for s in store.trajectories(run=run_id, status=status, limit=None)]
        for chunk in batches(ids):
            details = store.trajectory_details(chunk)
            for trajectory_id in chunk:
                detail = details[trajectory_id]
                if wanted is not None and winning_stage(detail) not in wanted:
                    continue
                steps = {s.seq: s for s in detail.steps}
                for target in select_targets(detail, correct_only=correct_only, nodes=nodes):
                    for generation in steps[target.step_seq].generations:
                        examples.append(_example(trajectory_id, target, generation, encode_missing))
    return examples


def _example(
    trajectory_id: str,
    target: SFTTarget,
    generation: Any,
    encode_missing: Callable[[str], Sequence[int]] | None,
) -> SFTExample:
    where = f"trajectory {trajectory_id} step {target.step_seq} ({target.node})"
    if generation.messages is None:
        raise ValueError(
            f"{where}: no stored request (recorded before schema version 4); record the run "
            "again to train on it"
        )
    ids: tuple[int, ...] = tuple(generation.token_ids)
    source: Literal["stored", "encoded"] = "stored"
    if not ids and generation.text:
        if encode_missing is None:
            raise ValueError(
                f"{where}: the backend stored text but no completion token ids (a rule-based "
                "role?); pass encode_missing=<the student's encoder> to train on its text"
            )
        ids, source = tuple(int(i) for i in encode_missing(generation.text)), "encoded"
    prompt_ids = generation.prompt_token_ids
    return SFTExample(
        trajectory_id=trajectory_id,
        step_seq=target.step_seq,
        node=target.node,
        stage=target.stage,
        role=target.role,
        text=generation.text,
        target_ids=ids,
        messages=tuple(generation.messages),
        prompt_token_ids=None if prompt_ids is None else tuple(prompt_ids),
        position=generation.position,
        target_source=source,
    )


# --- the loss and the training loop (torch) ------------------------------------------------


def sft_loss(logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the target tokens (SAIR's masked AR-NLL).

    ``logprobs`` [B, T]: each position's log-prob of its token; ``target_mask`` [B, T]: 1 on
    target tokens, 0 on context and padding. Masked positions are selected away (not
    multiplied by 0), so they get exactly zero gradient even where their log-prob is -inf."""
    import torch

    mask = target_mask.bool()
    count = int(mask.sum())
    if count == 0:
        raise ValueError("sft_loss: no target token in the batch")
    chosen = torch.where(mask, logprobs, logprobs.new_zeros(()))
    return -chosen.sum() / count


def example_rows(
    trainer: LoRATrainer, examples: Sequence[SFTExample], image_store: ImageStore | None = None
) -> list[tuple[list[int], list[int], dict[str, Any]]]:
    """(prompt ids, target ids, the prompt's other model inputs) per example, the prompt as the
    GRPO path builds it (``trainer.member_inputs``): the stored prompt ids, else the stored
    messages encoded as the server encodes them, with the pixels of the request's images from
    ``image_store`` (once per distinct request)."""
    encoded: dict[str, tuple[list[int], dict[str, Any]]] = {}
    rows = []
    for example in examples:
        if not example.target_ids:
            raise ValueError(
                f"trajectory {example.trajectory_id} step {example.step_seq}: no target ids"
            )
        key = json.dumps([example.prompt_token_ids, example.messages], default=str)
        if key not in encoded:
            member = example.member(image_store)
            group = TextGroup(example.trajectory_id, "", example.messages or (), (member,))
            ids, extras = trainer.member_inputs(group, member)
            encoded[key] = (list(ids), dict(extras))
        prompt, extras = encoded[key]
        rows.append((prompt, list(example.target_ids), extras))
    return rows


def train_sft(
    trainer: LoRATrainer,
    examples: Sequence[SFTExample],
    *,
    epochs: int = 3,
    minibatch_size: int = 16,
    max_grad_norm: float | None = None,
    seed: int = 0,
    image_store: ImageStore | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """SFT of ``trainer``'s LoRA adapter on ``examples``: ``epochs`` passes of shuffled
    minibatches, each one AdamW step (the trainer's optimizer) on :func:`sft_loss` over the
    minibatch's target tokens, split into the trainer's micro-batches
    (``LoRAConfig.max_tokens_per_forward``) with gradient accumulation. The version becomes the
    next one, as a GRPO ``train`` call makes it. Metrics: ``examples``, ``target_tokens``,
    ``steps``, the means of ``loss``, ``grad_norm`` and ``tokens_per_s`` over the steps, and
    ``first_loss`` / ``last_loss`` (the first and last step's loss, before its update).

    Uses only the trainer's public pieces: ``member_prompt_ids``, ``logprobs``, ``microbatches``,
    ``parameters``, ``optimizer``, ``config.max_grad_norm``, ``steps`` and ``version``."""
    import torch

    from policies.weights import next_version  # imports torch

    if epochs < 0 or minibatch_size < 1:
        raise ValueError("epochs must be >= 0 and minibatch_size >= 1")
    clip = trainer.config.max_grad_norm if max_grad_norm is None else max_grad_norm
    rows = example_rows(trainer, examples, image_store)
    metrics: dict[str, float] = {
        "examples": float(len(rows)),
        "target_tokens": float(sum(len(row[1]) for row in rows)),
        "first_loss": math.nan,
        "last_loss": math.nan,
        **step_summary([]),
    }
    if not rows:
        return TrainResult(trainer.version, metrics)
    history: list[dict[str, float]] = []
    shuffler = torch.Generator().manual_seed(seed + trainer.steps)
    total = math.ceil(len(rows) / minibatch_size) * epochs
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=shuffler).tolist()
        for start in range(0, len(order), minibatch_size):
            batch = [rows[i] for i in order[start : start + minibatch_size]]
            history.append(_sft_step(trainer, batch, clip))
            if on_step is not None:
                on_step(len(history), total, history[-1])
    metrics.update(step_summary(history))
    if history:
        metrics["first_loss"] = history[0]["loss"]
        metrics["last_loss"] = history[-1]["loss"]
        trainer.version = next_version(trainer.version)
    return TrainResult(trainer.version, metrics, history)


def _sft_step(
    trainer: LoRATrainer, batch: Sequence[tuple[list[int], list[int], dict[str, Any]]], clip: float
) -> dict[str, float]:
    """One optimizer step on a minibatch: the token mean over all its targets, accumulated
    over micro-batches each weighted by its share of the target tokens."""
    import torch

    from training.text.trainer import Row

    started = time.perf_counter()
    total = sum(len(c) for _, c, _ in batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss_value = 0.0
    # ``microbatches`` takes the GRPO rows (prompt, completion, old log-probs, advantage,
    # extras) and reads only their lengths.
    for part in trainer.microbatches([Row(p, c, (), 0.0, x) for p, c, x in batch]):
        logp, mask = trainer.logprobs([(r.prompt, r.completion, r.extras) for r in part])
        weight = sum(len(r.completion) for r in part) / total
        loss = sft_loss(logp, mask) * weight
        loss.backward()
        loss_value += float(loss.detach())
    norm = torch.nn.utils.clip_grad_norm_(trainer.parameters, clip)
    trainer.optimizer.step()
    trainer.steps += 1
    elapsed = max(time.perf_counter() - started, 1e-9)
    return {"loss": loss_value, "grad_norm": float(norm), "tokens_per_s": total / elapsed}


def target_counts(examples: Sequence[SFTExample]) -> Mapping[tuple[str, str], int]:
    """How many examples per (stage, role): a summary to print before training."""
    counts: dict[tuple[str, str], int] = {}
    for example in examples:
        key = (example.stage, example.role)
        counts[key] = counts.get(key, 0) + 1
    return counts
