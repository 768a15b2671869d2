"""Policy version numbers that are free both in the store and on disk.

A saved policy version is never overwritten. Before any rollout, a training command reserves
the versions it will produce (the trainer numbers them ``next_version`` after the initial one):
a fresh policy is relabelled to the first number whose successors are all free; a policy loaded
with ``--init`` keeps its identity, so a collision is refused before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from policies.weights import next_version


class VersionTaken(ValueError):
    """A version a training run would produce already exists (store or disk)."""


def taken_versions(store: Any, name: str, save_dir: str | Path | None) -> dict[str, str]:
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
