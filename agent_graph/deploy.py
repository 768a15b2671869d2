"""What a run runs with, and what its config records of it: its backends (ShapeWorld or a
backends file) and its decision policies (a built-in mode policy, or trained versions).

:func:`deploy` resolves it for a new run, in this order of precedence:

- the router: ``router=`` (``--router``), else ``mode=`` (``--mode``, a built-in policy), else the
  backends file's ``[policies] router``, else the built-in ``auto``; ``router=`` and ``mode=``
  together are refused (two routers for one run);
- the stop policy: ``stop=`` (``--stop``), else the file's ``[policies] stop``, else
  ``FollowReflectionStopPolicy``;
- adapters: ``adapters=`` (``{role: version}``, a training loop deploying what it just trained),
  else the file's roles; loaded on every server before the run starts.

The run's config records each version by ``name@version`` and directory (``policies`` and
``policy_paths``, ``adapters`` and ``adapter_paths``). :func:`redeploy` rebuilds a recorded run's
deployment for ``resume``: the recorded versions, loaded from the recorded directories (each
checked to still hold that version), never the file's ``[policies]`` again; a ``router=`` or
``stop=`` that differs from what the run recorded is refused, and so is a backends file whose
adapters no longer match the recorded ones — continuing a run with another version would mix
versions in one run silently. Roles whose adapter ``adapters=`` replaced are recorded
(``adapter_overrides``), and :func:`redeploy` gives them their recorded versions again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.context import Backends, GraphSettings, ReasonerContext
from policies.deployed import (
    DeployedVersion,
    VersionError,
    is_version_name,
    load_decision_policy,
    resolve_version,
)

Ref = str | Path | DeployedVersion
"""A version reference: ``name@version``, a saved version's directory, or one resolved already."""


@dataclass
class Deployment:
    """The backends and policies of one run (see the module doc)."""

    mode: str | None
    """The built-in mode policy (None when ``router`` is a trained version)."""
    router: DeployedVersion | None
    stop: DeployedVersion | None
    backends: Any = None
    """A :class:`~nodes.backends.config.ConfiguredBackends` (None: ShapeWorld)."""
    loaded: dict[str, Any] | None = None
    """The trained policies, once loaded (``router``, ``stop``)."""
    overrides: tuple[str, ...] = ()
    """Roles whose adapter was given in code (``deploy(adapters=...)``), not by the file."""

    def policies(self) -> dict[str, Any]:
        """The trained router and stop policies, loaded once (torch) and checked to still be
        the versions resolved."""
        if self.loaded is None:
            versions = (("router", self.router), ("stop", self.stop))
            self.loaded = {k: load_decision_policy(v) for k, v in versions if v is not None}
        return self.loaded

    def record(self) -> dict[str, Any]:
        """The run-config keys naming the versions (nothing when none is used)."""
        record: dict[str, Any] = {}
        policies = {k: v for k, v in (("router", self.router), ("stop", self.stop)) if v}
        if policies:
            record["policies"] = {kind: v.label for kind, v in policies.items()}
            record["policy_paths"] = {kind: v.path for kind, v in policies.items()}
        adapters = self.backends.versions.adapters if self.backends is not None else {}
        if adapters:
            record["adapters"] = {role: v.label for role, v in adapters.items()}
            record["adapter_paths"] = {role: v.path for role, v in adapters.items()}
        if self.overrides:
            record["adapter_overrides"] = list(self.overrides)
        return record

    def context(
        self, images: Any, recorder: Any = None, settings: GraphSettings | None = None
    ) -> ReasonerContext:
        """A context over these backends with these policies (loaded now: torch for a trained
        version)."""
        from agent_graph.presets import builtin_mode_policy
        from policies.simple import FollowReflectionStopPolicy

        if self.backends is None:
            from agent_graph.presets import shapeworld_backends

            backends = shapeworld_backends()
        else:
            backends = Backends(**self.backends.roles)
        trained = self.policies()
        return ReasonerContext(
            backends=backends,
            mode_policy=trained.get("router") or builtin_mode_policy(self.mode or "auto"),
            stop_policy=trained.get("stop") or FollowReflectionStopPolicy(),
            images=images,
            settings=settings or GraphSettings(),
            recorder=recorder,
        )

    async def aclose(self) -> None:
        """Close the backends this deployment built (a no-op on ShapeWorld)."""
        if self.backends is not None:
            await self.backends.aclose()

    async def load_adapters(self) -> None:
        """Load the adapter versions on their servers (a no-op without any)."""
        if self.backends is not None:
            await self.backends.load_adapters()


def resolve(ref: Ref | None, kind: str, store: Any, what: str | None = None) -> Any:
    """``ref`` as a :class:`DeployedVersion` of ``kind`` (None stays None)."""
    if ref is None or isinstance(ref, DeployedVersion):
        if ref is not None and ref.kind != kind:
            raise VersionError(f"{what or '--' + kind} {ref.label}: a {ref.kind}, not a {kind}")
        return ref
    return resolve_version(ref, kind, store, what=what)


async def deploy(
    store: Any,
    *,
    backends_config: str | Path | None = None,
    mode: str | None = None,
    router: Ref | None = None,
    stop: Ref | None = None,
    adapters: dict[str, Ref] | None = None,
) -> Deployment:
    """A new run's deployment (precedence in the module doc), versions resolved against
    ``store`` (None: paths only) and loaded, adapters loaded on their servers. A bad reference
    is a ``VersionError``, a bad file a ``ConfigError``, both one line. ``adapters``
    (``{role: name@version or a directory}``) replace the file's adapters of those roles."""
    if mode is not None and router is not None:
        raise VersionError(
            f"--mode {mode} and --router name two routers: give one (--router replaces the "
            "built-in mode policy)"
        )
    router_version = resolve(router, "router", store)
    stop_version = resolve(stop, "stop", store)
    backends = None
    if adapters and backends_config is None:
        raise VersionError("adapters= replace a backends file's role adapters: give the file")
    if backends_config is not None:
        backends = _configure(backends_config, store, adapters or {})
        if router_version is None and mode is None:
            router_version = backends.versions.router
        if stop_version is None:
            stop_version = backends.versions.stop
    deployment = Deployment(
        mode=None if router_version is not None else (mode or "auto"),
        router=router_version,
        stop=stop_version,
        backends=backends,
        overrides=tuple(sorted(adapters or {})),
    )
    deployment.policies()  # loadable now, not only at the first decision
    await deployment.load_adapters()
    return deployment


def _configure(path: str | Path, store: Any, adapters: dict[str, Ref]) -> Any:
    """The file's backends, with ``adapters`` replacing its roles' adapters."""
    from nodes.backends.config import configure_backends, load_config, with_role_adapters

    if not adapters:
        return configure_backends(path, store)
    refs = {
        role: ref.path if isinstance(ref, DeployedVersion) else str(ref)
        for role, ref in adapters.items()
    }
    refs = {r: ref if is_version_name(ref) else str(Path(ref).resolve()) for r, ref in refs.items()}
    config = with_role_adapters(load_config(path), refs, str(path))
    return configure_backends(config, store, source=str(path))


def recorded_versions(config: dict[str, Any], key: str, paths: str, kind: str) -> dict[str, Any]:
    """``{slot: DeployedVersion}`` a run's config records under ``key`` / ``paths``."""
    labels, where = config.get(key) or {}, config.get(paths) or {}
    versions = {}
    for slot, label in labels.items():
        if slot not in where:
            raise VersionError(f"the run records {key}.{slot} = {label} without its directory")
        name, at, version = str(label).partition("@")
        versions[slot] = DeployedVersion(
            kind if kind != "policy" else slot, name, version if at else None, str(where[slot])
        )
    return versions


def check_resume_options(
    store: Any,
    run_config: dict[str, Any],
    *,
    router: Ref | None = None,
    stop: Ref | None = None,
    run_name: str = "this run",
) -> None:
    """Refuse a ``router=`` / ``stop=`` other than the version the run recorded (a
    ``VersionError`` naming both); the recorded one given again is fine."""
    recorded = recorded_versions(run_config, "policies", "policy_paths", "policy")
    for kind, given in (("router", router), ("stop", stop)):
        if given is None:
            continue
        wanted = resolve(given, kind, store)
        had = recorded.get(kind)
        if had is None:
            used = (
                f"the built-in mode policy {run_config.get('mode', 'auto')!r}"
                if kind == "router"
                else "the built-in stop policy (following the reflection)"
            )
            raise VersionError(
                f"--{kind} {wanted.label}: {run_name} was recorded with {used}; resuming it "
                f"with {wanted.label} would mix policies in one run (start a new run instead)"
            )
        if (had.label, Path(had.path)) != (wanted.label, Path(wanted.path)):
            raise VersionError(
                f"--{kind} {wanted.label} ({wanted.path}): {run_name} was recorded with "
                f"{had.label} ({had.path}); resume continues with the recorded version (leave "
                f"--{kind} out, or start a new run)"
            )


async def redeploy(
    store: Any, run_config: dict[str, Any], *, run_name: str = "this run"
) -> Deployment:
    """The deployment a recorded run was started with (see the module doc): the recorded
    versions, from their recorded directories; the backends file's adapters checked against
    the recorded ones, and loaded again."""
    recorded = recorded_versions(run_config, "policies", "policy_paths", "policy")
    backends = None
    world = run_config.get("world")
    if world == "config":
        overridden = run_config.get("adapter_overrides") or []
        paths = run_config.get("adapter_paths") or {}
        missing = [role for role in overridden if role not in paths]
        if missing:
            raise VersionError(f"the run records no adapter directory for role {missing[0]}")
        given: dict[str, Ref] = {role: paths[role] for role in overridden}
        backends = _configure(run_config["backends_config"], store, given)
        _check_adapters(run_config, backends, run_name)
    elif world != "shapeworld":
        raise ValueError(f"this run used world {world!r}, which this version cannot rebuild")
    deployment = Deployment(
        mode=None if "router" in recorded else run_config.get("mode", "auto"),
        router=recorded.get("router"),
        stop=recorded.get("stop"),
        backends=backends,
    )
    deployment.policies()  # still there, still the versions recorded
    await deployment.load_adapters()
    return deployment


def _check_adapters(run_config: dict[str, Any], backends: Any, run_name: str) -> None:
    recorded = {
        role: (v.label, Path(v.path))
        for role, v in recorded_versions(run_config, "adapters", "adapter_paths", "adapter").items()
    }
    now = {role: (v.label, Path(v.path)) for role, v in backends.versions.adapters.items()}
    if recorded == now:
        return
    role = sorted(set(recorded) | set(now), key=lambda r: (recorded.get(r) == now.get(r), r))[0]
    was = recorded[role][0] if role in recorded else "no adapter version"
    is_ = now[role][0] if role in now else "no adapter version"
    raise VersionError(
        f"{run_config['backends_config']}: roles.{role}.adapter now names {is_}, but {run_name} "
        f"was recorded with {was}; resume continues with the versions recorded (restore the "
        "file, or start a new run)"
    )
