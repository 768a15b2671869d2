"""Data-parallel training over ``torch.distributed``: N processes (``torchrun``), one update.

Launch any training script, or ``atelier train --run ...``, under ``torchrun``::

    torchrun --nproc_per_node 8 -m atelier.cli train --run RUN --policy reflect --model M ...

Each process calls :func:`init_from_env` (the CLI does), which joins the process group that
torchrun's environment describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``): NCCL when CUDA is there (each process on ``cuda:LOCAL_RANK``), gloo on CPU.
The trainers (``GRPOTrainer``, ``LoRATrainer``) then find it by themselves
(:meth:`DataParallel.current`): ``trainer.train(groups)`` is the same call, and gives the same
update as one process training on the same groups.

**How the work is split.** Every rank reads the same groups from the store in the same order
(the store is the source: nothing is sent between ranks but gradients and a few numbers). The
cheap bookkeeping — rewards, advantages (a "batch" advantage scale needs every reward), which
members become rows, the shuffled minibatches, each row's completion length — is done by every
rank over *all* groups, so every rank knows each minibatch's global size, token count and
longest completion without communication. The expensive work — encoding prompts and images,
the alignment check, reference log-probs, forward and backward — is done by each rank only for
the rows of its own groups (group ``i`` belongs to rank ``i % world_size``, :meth:`owns`). Each
rank weights its rows' loss by their share of the *global* minibatch
(``training.grpo.microbatch_weight``: local tokens / global tokens for ``token_mean``, local rows
/ global rows for ``sequence_mean`` and ``dr_grpo``, with the global longest completion), so
the gradients, summed over ranks (:meth:`all_reduce_gradients`), are the single-process
minibatch's gradient: the same sum, in another order. Clipping and AdamW then run on every
rank on identical gradients, so the replicas stay equal. A rank with no row in a minibatch
still takes part with zero gradients, so uneven shards neither hang nor bias the update. Step
metrics (loss, KL, ratio, clip fractions, max |log ratio|) are reduced the same way
(:meth:`sum`, :meth:`max`), so every rank — rank 0 reports — holds the global values.

**Why explicit all-reduce, not ``DistributedDataParallel``.** DDP would average gradients
(dividing by the world size, which the global weighting above already does exactly), expects
every rank to run the same number of forward passes (a rank without rows in a minibatch would
hang its reducer, and micro-batch accumulation needs ``no_sync``), and wraps the model (peft's
``save_pretrained``, ``disable_adapter`` and the decision policies' ``clone``/``save`` would go
through ``.module``). One flattened all-reduce per optimizer step after accumulation keeps the
trainers' code paths as they are; what it gives up is DDP's overlap of communication with the
backward pass, which does not matter for LoRA-sized gradients (megabytes).

**Why DDP-style replication, not FSDP.** With a LoRA (or a decision policy) the trainable
parameters, their gradients and AdamW's moments are tiny; the frozen base model is the memory,
and a replica of it per GPU in bf16 fits up to ~30B on an 80 GB card (72B needs tensor or
pipeline parallelism of the frozen base — or FSDP — before data parallelism). Sharding tiny
trainable state would save nothing and add an all-gather per layer per forward. Full
fine-tuning is where FSDP (``torch.distributed.fsdp.fully_shard``) pays: parameters, gradients
and optimizer state sharded across ranks. What would change: the model wrapped by
``fully_shard`` per decoder layer before the optimizer is built; gradients reduce-scattered by
FSDP itself (this module's :meth:`all_reduce_gradients` not called; the loss weighting stays,
as FSDP also sums then divides by the world size, so weights would be multiplied by it);
``clip_grad_norm_`` over DTensor shards; the reference log-probs (``disable_adapter``) replaced
by a frozen sharded copy; and saving through a gathered full state dict on rank 0.

Rank 0 alone writes: ``training.versions.save_version`` saves and registers on rank 0 only
(the others wait, and raise if it fails); callers guard their other writes with
:func:`is_main`. An exception on one rank inside :meth:`DataParallel.together` is raised on
every rank (its own message on the rank that failed), so no rank waits forever in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

STEP_SUMS = ("loss", "clip_low", "clip_high", "ratio_mean", "kl")
"""A step's metrics that are sums of the ranks' shares: the loss, and ``grpo_loss``'s token
means, each rank's weighted by its tokens' share of the minibatch."""


class PeerFailed(RuntimeError):
    """Another rank raised inside :meth:`DataParallel.together`: its log says why."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel job (rank 0 of 1 without a process group)."""

    rank: int = 0
    """This process's index among the ranks (0: the one that writes and reports)."""
    world_size: int = 1
    """Processes training together; 1: every operation below is a no-op."""
    device: str = "cpu"
    """Where collective tensors live: ``cuda:LOCAL_RANK`` for NCCL, the CPU for gloo."""

    @classmethod
    def current(cls) -> DataParallel:
        """The initialised default process group's rank and size, else a single process."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        device = "cpu"
        if dist.get_backend() == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def active(self) -> bool:
        """More than one process: shard and reduce."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- the shard -----------------------------------------------------------------------------

    def owns(self, group_index: int) -> bool:
        """Whether this rank computes group ``group_index`` (the index in the list of groups
        every rank read in the same order): round-robin, so any count of groups splits with at
        most one group of difference between ranks."""
        return group_index % self.world_size == self.rank

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (by index, as :meth:`owns`)."""
        return [item for index, item in enumerate(items) if self.owns(index)]

    # --- reductions ----------------------------------------------------------------------------

    def all_reduce_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Sum every trainable parameter's gradient over the ranks, in place, in one flattened
        all-reduce per dtype. A rank whose rows gave a parameter no gradient sends zeros; a
        parameter no rank gave a gradient keeps ``grad = None``, as one process would leave it
        (AdamW then skips it: no moment update, no weight decay)."""
        if not self.active:
            return
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in parameters:
            if param.requires_grad:
                buckets.setdefault(param.dtype, []).append(param)
        for dtype in sorted(buckets, key=str):  # the same order on every rank
            params = buckets[dtype]
            pieces = [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.device)
                for p in params
            ]
            has_grad = [1.0 if p.grad is not None else 0.0 for p in params]
            pieces.append(torch.tensor(has_grad, dtype=dtype, device=self.device))
            flat = torch.cat(pieces)
            torch.distributed.all_reduce(flat)
            offset = 0
            for param in params:
                size = param.numel()
                summed = flat[offset : offset + size].view_as(param).to(param.device)
                offset += size
                param.grad = summed.clone() if param.grad is None else param.grad.copy_(summed)
            for param, given in zip(params, flat[offset:].tolist(), strict=True):
                if given == 0.0:
                    param.grad = None

    def sum(self, values: Mapping[str, float], keys: Iterable[str] = ()) -> dict[str, float]:
        """``values`` summed over the ranks (float64), key by key; a key in ``keys`` that a
        rank lacks counts as 0 there (every rank must pass the same key set)."""
        names = sorted({*values, *keys})
        if not self.active:
            return {name: float(values.get(name, 0.0)) for name in names}
        tensor = torch.tensor(
            [float(values.get(name, 0.0)) for name in names],
            dtype=torch.float64,
            device=self.device,
        )
        torch.distributed.all_reduce(tensor)
        return dict(zip(names, tensor.tolist(), strict=True))

    def max(self, value: float) -> float:
        """The largest of every rank's ``value``."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run the block on every rank and agree on the outcome: if any rank raised, every rank
        raises (the failed rank its own exception, the others :class:`PeerFailed`), so none is
        left waiting in the next collective. The block must not itself use collectives when it
        can raise on some ranks only."""
        if not self.active:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:  # re-raised below, on every rank
            error = exc
        failed = self.max(1.0 if error is not None else 0.0)
        if error is not None:
            raise error
        if failed:
            raise PeerFailed(f"rank {self.rank}: another rank failed (its output says why)")


def init_from_env(backend: str | None = None) -> DataParallel:
    """Join the process group torchrun's environment describes (``WORLD_SIZE`` > 1), once;
    without it (a plain ``python`` run) a single process. ``backend``: NCCL when CUDA is
    available (each process then uses ``cuda:LOCAL_RANK``), else gloo."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend)
    return DataParallel.current()


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: str) -> str:
    """``device`` for this process: a plain ``cuda`` (or ``auto`` with CUDA) under a
    multi-process job becomes ``cuda:LOCAL_RANK``; anything else is kept."""
    if DataParallel.current().active and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return device


def is_main() -> bool:
    """Whether this process writes files and store rows and prints: rank 0, or no group."""
    return DataParallel.current().is_main


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
