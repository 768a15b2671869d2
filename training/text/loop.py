"""One on-policy GRPO round of a text LoRA policy: sample (recorded) → reward → read groups →
train → save and register the new version.

The round, end to end (``tests/test_training_lora.py`` runs it on a tiny random-weight LM)::

    run_id = await collect(client, store, prompts, group_size=8)     # sample + record
    score_run(store, run_id, target_fraction(target_ids))            # rewards, into the store
    groups = read_groups(store, run_id)                              # read back: ids, log-probs
    trainer = LoRATrainer(model_dir)
    result = trainer.train(groups)                                   # GRPO on the LoRA only
    path = save_version(trainer, store, adapter_dir, result.metrics) # peft layout, registered
    await client.load_adapter("policy-v1", str(path))                # served at run time
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.result import TrainResult
from training.text.groups import TextGroup, read_groups
from training.text.rewards import TextReward, score_run
from training.text.sampling import DEFAULT_SYSTEM, collect
from training.text.trainer import LoRATrainer
from training.versions import save_version

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


@dataclass
class RoundResult:
    run_id: str
    groups: list[TextGroup]
    result: TrainResult
    path: Path
    """Where the new version's adapter was saved."""


async def grpo_round(
    sampler: Any,
    store: TrajectoryStore,
    trainer: LoRATrainer,
    prompts: Sequence[str],
    reward: TextReward,
    adapter_dir: str | Path,
    *,
    group_size: int = 8,
    max_tokens: int = 16,
    seed: int = 0,
    system: str = DEFAULT_SYSTEM,
    name: str | None = None,
) -> RoundResult:
    """Sample from ``sampler`` (the served policy being trained: the base model first, then the
    adapter the previous round saved, loaded on the server), record, reward, train, and save
    the new version to ``adapter_dir``, registered in the store. Loading it on the server is
    the caller's move (the path is as the server sees it):
    ``await client.load_adapter(name, path, inplace=True)``."""
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
    groups = read_groups(store, run_id)
    result = trainer.train(groups)  # CPU/GPU-bound; blocks this event loop while it runs
    if not result.history:
        raise ValueError(
            "no group carried a learning signal (the rewards within every group are equal): "
            "nothing was trained or saved"
        )
    path = save_version(trainer, store, adapter_dir, {**result.metrics, "run": run_id})
    return RoundResult(run_id, groups, result, path)
