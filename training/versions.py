"""Policy versions: numbers free in the store and on disk, and saving one (never overwriting).

A saved policy version is never overwritten. Before any rollout, a training command reserves
the versions it will produce (the trainer numbers them ``next_version`` after the initial one):
a fresh policy is relabelled to the first number whose successors are all free; a policy loaded
with ``--init`` keeps its identity, so a collision is refused before any work.

:func:`save_version` is the one way every kind's trainer (decision policies, text LoRA
adapters, diffusion LoRAs) saves a version: it refuses a version the store has or a directory
that exists before writing anything, lets the trainer write the files atomically, registers
the version in the store's ``policy_versions``, and removes the files again if registering
fails, so the store and the files agree.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policies.weights import next_version

if TYPE_CHECKING:
    from storage.store import RewardInput, TrajectoryStore
    from training.result import Trainer


class VersionTaken(ValueError):
    """A version a training run would produce already exists (store or disk)."""


def taken_versions(
    store: TrajectoryStore, name: str, save_dir: str | Path | None
) -> dict[str, str]:
    """version -> where it is taken (the store, or a directory ``<save_dir>/<name>-<version>``)."""
    taken: dict[str, str] = {}
    if save_dir is not None and Path(save_dir).is_dir():
        prefix = f"{name}-"
        for entry in Path(save_dir).iterdir():
            if entry.name.startswith(prefix) and not entry.name.startswith("."):
                taken[entry.name.removeprefix(prefix)] = str(entry)
    for info in store.policy_versions(name=name):
        taken[info.version] = f"the store {store.url}"
    return taken


def produced_versions(version: str, count: int) -> list[str]:
    """The ``count`` versions a trainer starting at ``version`` produces, in order."""
    versions = []
    for _ in range(count):
        version = next_version(version)
        versions.append(version)
    return versions


def reserve_versions(policy: Any, taken: dict[str, str], count: int, *, loaded: bool) -> Any:
    """``policy``, relabelled if fresh, such that it and its next ``count`` versions are free.

    A loaded policy (``loaded=True``) is what it is: if a version it would produce is taken,
    raise :class:`VersionTaken` naming it, so the user learns before any rollout runs.
    """
    if loaded:
        for version in produced_versions(policy.version, count):
            if version in taken:
                raise VersionTaken(
                    f"{policy.name}@{version}, which training from {policy.name}@"
                    f"{policy.version} would save, already exists in {taken[version]}; "
                    "start from the newest version or pass another --out and --db"
                )
        return policy
    version = policy.version
    while version in taken or any(v in taken for v in produced_versions(version, count)):
        version = next_version(version)
    return policy if version == policy.version else policy.clone(version=version)


def save_version(
    trainer: Trainer[Any],
    store: TrajectoryStore,
    directory: str | Path,
    metadata: Mapping[str, Any] | None = None,
    *,
    rewards: Iterable[RewardInput] = (),
) -> Path:
    """Save the trainer's weights as ``trainer.name@trainer.version`` into the new
    ``directory`` and register the version in the store, with ``trainer.describe()`` and
    ``metadata`` (e.g. the ``TrainResult.metrics``; a non-finite number is stored as null),
    and ``rewards`` (``training.rewards.record.trained_reward_rows``) in the same transaction.

    Never overwrites: a version already in the store, or an existing ``directory``, raises
    (:class:`VersionTaken`, ``FileExistsError``) before anything is written. If registering
    fails, the files are removed again.

    In a data-parallel job (``training.distributed``) rank 0 alone saves and registers; the
    other ranks write nothing, wait for it, and get the same path (or its exception's
    ``PeerFailed``).
    """
    from training.distributed import DataParallel

    parallel = DataParallel.current()
    with parallel.together():  # a failure on rank 0 raises on every rank
        if parallel.is_main:
            return _save_version(trainer, store, directory, metadata, rewards)
    return Path(directory)  # another rank of a data-parallel job: rank 0 saved it


def _save_version(
    trainer: Trainer[Any],
    store: TrajectoryStore,
    directory: str | Path,
    metadata: Mapping[str, Any] | None,
    rewards: Iterable[RewardInput],
) -> Path:
    name, version = trainer.name, trainer.version
    if store.policy_versions(name=name, version=version):
        raise VersionTaken(
            f"{name}@{version} is already in the store {store.url}: "
            "a saved policy version is never overwritten"
        )
    if Path(directory).exists():
        raise FileExistsError(
            f"{directory} already exists: a saved policy version is never overwritten"
        )
    path = trainer.save(directory)
    try:
        store.register_policy_version(
            name,
            version,
            path=str(Path(path).resolve()),  # absolute: other processes read it from anywhere
            metadata=_json({**trainer.describe(), **(metadata or {})}),
            rewards=rewards,
        )
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _json(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` as plain JSON (tuples as lists; nan and ±inf, which JSON lacks, as null)."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.loads(json.dumps(finite(dict(metadata))))
