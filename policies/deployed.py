"""Trained versions put back into service: resolve ``name@version`` or a directory to a saved
version, and load a decision policy from it.

A reference (``--router``, ``--stop``, a backends file's ``[policies]`` table or a role's
``adapter``) is either

- ``name@version`` (no ``/``): a version registered in the store by ``atelier train``
  (``store.policy_versions``); its directory is the one the registry names; or
- a path to a saved version's directory (``atelier-policies/router-3``): a decision policy's
  own ``config.json`` names it (``router@3``); an adapter directory is named by the store's
  registry when it registers that path, else by its own ``atelier_policy.json`` (a diffusion
  LoRA, ``policies.diffusion_lora``), else by the directory's name.

Every way a reference can be wrong is a :class:`VersionError` whose message names what was
given and why it cannot be used (one line: the command line prints it as is). Loading a
decision policy checks that the directory still holds the version it was resolved as, so the
decisions it records name exactly the registered version. Only :func:`load_decision_policy`
imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["router", "stop", "adapter", "diffusion-lora"]
DECISION_KINDS: tuple[str, ...] = ("router", "stop")
"""Decision-policy kinds (``config.json``'s ``class``, as ``policies.weights`` saves them)."""
ADAPTER_KINDS: tuple[str, ...] = ("adapter", "diffusion-lora")
"""LoRA kinds: a text/VLM adapter (peft), a diffusion LoRA (peft + ``atelier_policy.json``)."""

_KIND_WORDS = {
    "router": "a router (mode policy)",
    "stop": "a stop policy",
    "adapter": "a text/VLM LoRA adapter",
    "diffusion-lora": "a diffusion LoRA",
}
_POLICY_CONFIG = "config.json"
_POLICY_FORMAT = "atelier-policy/1"  # policies.weights.FORMAT, without importing torch
_ADAPTER_CONFIG = "adapter_config.json"
_DIFFUSION_FILE = "atelier_policy.json"  # policies.diffusion_lora.POLICY_FILE


class VersionError(ValueError):
    """A version reference that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class DeployedVersion:
    """A resolved reference: which version, where its files are."""

    kind: str
    name: str
    version: str | None
    """None only for an adapter directory the store does not register."""
    path: str
    """The version's directory, absolute."""

    @property
    def label(self) -> str:
        """``name@version`` (an unregistered adapter directory: its name)."""
        return f"{self.name}@{self.version}" if self.version is not None else self.name


def is_version_name(ref: str) -> bool:
    """Whether ``ref`` is spelled ``name@version`` (a registry lookup) rather than a path."""
    return "@" in ref and "/" not in ref and "\\" not in ref and not ref.startswith(("~", "."))


def resolve_version(
    ref: str | Path, kind: str, store: Any = None, *, what: str | None = None
) -> DeployedVersion:
    """The saved version ``ref`` names, checked to be a ``kind`` (router, stop, adapter,
    diffusion-lora).

    ``store``: a ``TrajectoryStore`` (needed for ``name@version``; with a path, it names an
    adapter directory and cross-checks a decision policy's identity). ``what``: how the
    message names the reference (default ``--router`` / ``--stop`` / ``adapter``)."""
    if kind not in (*DECISION_KINDS, *ADAPTER_KINDS):
        raise ValueError(f"unknown version kind {kind!r}")
    text = str(ref).strip()
    where = f"{what or (f'--{kind}' if kind in DECISION_KINDS else 'adapter')} {text}"
    if not text:
        raise VersionError(f"{where}: empty; give name@version or a saved version's directory")
    if isinstance(ref, str) and is_version_name(text):
        name, _, version = text.partition("@")
        if not name or not version:
            raise VersionError(f"{where}: write name@version, e.g. {kind}@1")
        path = _registered_path(where, name, version, store)
        return _checked(where, kind, name, version, path, store)
    path = Path(text).expanduser()
    if not path.is_dir():
        problem = "no such file or directory" if not path.exists() else "not a directory"
        raise VersionError(
            f"{where}: {problem} (give name@version, registered in the store, or the "
            "directory of a saved version)"
        )
    return _checked(where, kind, None, None, str(path.resolve()), store)


def _registered_path(where: str, name: str, version: str, store: Any) -> str:
    if store is None:
        raise VersionError(
            f"{where}: name@version is looked up in a store, and none is given here (pass "
            "--db, or the version's directory)"
        )
    found = store.policy_versions(name=name, version=version)
    if not found:
        known = [info.version for info in store.policy_versions(name=name)]
        listed = (
            f"registered {name} versions: {', '.join(known)}"
            if known
            else f"no version of {name!r} is registered there"
        )
        raise VersionError(f"{where}: not registered in the store {store.url} ({listed})")
    info = found[0]
    if not info.path:
        raise VersionError(f"{where}: registered in the store without a directory")
    path = Path(info.path)
    if not path.is_dir():
        raise VersionError(f"{where}: its directory {info.path} (from the store) does not exist")
    return str(path.resolve())


def _checked(
    where: str, kind: str, name: str | None, version: str | None, path: str, store: Any
) -> DeployedVersion:
    """The version at ``path``, checked to hold a ``kind``; ``name``/``version``: what the
    registry calls it (None: a path was given)."""
    held = _held_kind(where, Path(path))
    if held != kind:
        label = f"{name}@{version}" if name is not None else path
        raise VersionError(f"{where}: {label} holds {_KIND_WORDS[held]}, not {_KIND_WORDS[kind]}")
    if kind == "diffusion-lora":
        return _diffusion_lora(where, name, version, path, store)
    if kind == "adapter":
        if name is None:  # a directory: the registry names it if it registers that path
            name, version = _adapter_identity(path, store)
        return DeployedVersion(kind, name, version, path)
    config = _policy_config(where, Path(path))
    own = (str(config.get("name")), str(config.get("version")))
    if name is not None and own != (name, version):
        raise VersionError(
            f"{where}: its directory {path} holds {own[0]}@{own[1]}, not the registered "
            f"{name}@{version}"
        )
    if name is None and store is not None:
        for info in store.policy_versions(name=own[0], version=own[1]):
            if info.path and Path(info.path).resolve() != Path(path):
                raise VersionError(
                    f"{where}: holds {own[0]}@{own[1]}, but the store {store.url} registers "
                    f"{own[0]}@{own[1]} at {info.path}: two different directories would record "
                    "decisions under one version (give name@version)"
                )
    return DeployedVersion(kind, own[0], own[1], path)


def _held_kind(where: str, path: Path) -> str:
    """What the directory holds: router, stop (a saved decision policy), adapter (a peft text
    or VLM adapter) or diffusion-lora."""
    if (path / _DIFFUSION_FILE).is_file():
        return "diffusion-lora"
    if (path / _ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / _POLICY_CONFIG).is_file():
        held = _policy_config(where, path).get("class")
        if held in DECISION_KINDS:
            return str(held)
        raise VersionError(f"{where}: {path} holds a policy of unknown class {held!r}")
    raise VersionError(
        f"{where}: {path} is not a saved version (no {_POLICY_CONFIG} of a decision policy, no "
        f"{_ADAPTER_CONFIG} of a LoRA adapter)"
    )


def _policy_config(where: str, path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / _POLICY_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise VersionError(f"{where}: cannot read {path / _POLICY_CONFIG}: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != _POLICY_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise VersionError(
            f"{where}: {path} is not a saved Atelier policy version (format {found!r})"
        )
    return config


def _diffusion_lora(
    where: str, name: str | None, version: str | None, path: str, store: Any
) -> DeployedVersion:
    """A diffusion LoRA names itself (``atelier_policy.json``): the registry's name must be the
    one its files hold, so the transitions sampled under it name exactly the registered version;
    a directory the registry does not hold is named by its file."""
    try:
        own_meta = json.loads((Path(path) / _DIFFUSION_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise VersionError(f"{where}: cannot read {Path(path) / _DIFFUSION_FILE}: {exc}") from None
    if not isinstance(own_meta, dict):
        raise VersionError(f"{where}: {Path(path) / _DIFFUSION_FILE} is not a JSON object")
    own = (str(own_meta.get("name", Path(path).name)), str(own_meta.get("version", "0")))
    if name is None:
        registered = _adapter_identity(path, store)
        if registered[1] is None:
            for info in store.policy_versions(name=own[0], version=own[1]) if store else ():
                if info.path and Path(info.path).resolve() != Path(path):
                    raise VersionError(
                        f"{where}: holds {own[0]}@{own[1]}, but the store {store.url} registers "
                        f"{own[0]}@{own[1]} at {info.path}: two different directories would "
                        "record images under one version (give name@version)"
                    )
            return DeployedVersion("diffusion-lora", own[0], own[1], path)
        name, version = registered
    if own != (name, version):
        raise VersionError(
            f"{where}: its directory {path} holds {own[0]}@{own[1]}, not the registered "
            f"{name}@{version}"
        )
    return DeployedVersion("diffusion-lora", name, version, path)


def _adapter_identity(path: str, store: Any) -> tuple[str, str | None]:
    if store is not None:
        for info in store.policy_versions():
            if info.path and Path(info.path).resolve() == Path(path):
                return info.name, info.version
    return Path(path).name, None


def load_decision_policy(deployed: DeployedVersion) -> Any:
    """The learned router or stop policy saved at ``deployed.path``, checked to still be
    ``deployed.label`` (a run resumed later loads exactly the version it recorded)."""
    if deployed.kind not in DECISION_KINDS:
        raise ValueError(f"{deployed.label} is {_KIND_WORDS[deployed.kind]}, not a decision policy")
    from policies.weights import load_policy

    where = f"{deployed.kind} {deployed.label}"
    path = Path(deployed.path)
    if not path.is_dir():
        raise VersionError(f"{where}: its directory {path} does not exist")
    held = _held_kind(where, path)
    if held != deployed.kind:
        raise VersionError(f"{where}: {path} now holds {_KIND_WORDS[held]}")
    try:
        policy = load_policy(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # corrupt weights or config
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VersionError(f"{where}: cannot load {path}: {reason}") from None
    if f"{policy.name}@{policy.version}" != deployed.label:
        raise VersionError(f"{where}: {path} now holds {policy.name}@{policy.version}")
    return policy
