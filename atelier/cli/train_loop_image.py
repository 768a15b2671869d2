"""``atelier train --config BACKENDS --policy draw|refine``: on-policy Flow-GRPO through a
backends file (``training.online``'s loop, with a diffusion LoRA as the policy).

Each iteration rolls out with the version the previous one trained loaded as the generator's
(draw) or the editor's (refine) ``adapter``: into a traced ``inprocess-image`` backend's flow
model, or on every replica of an ``omni`` backend served by ``atelier serve image`` (traced),
so every draw or refine step records its denoising transitions under that version's
``name@version``. Then R3's stage reward is stored (``reason_image`` of the first draw,
``refinement`` C_j of a refine: ``atelier.cli.train_image``'s rewards), the node's image groups
are read back and checked to be sampled by the version deployed (Flow-GRPO's ratio is 1 at the
first step only then), ``FlowGRPOTrainer`` trains the LoRA it kept from the previous iteration,
and the version is saved and registered with what each member was trained with.

Refine needs the in-process backend: ``atelier serve image`` traces generations only.

argparse only at import; torch and diffusers load when the loop runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.cli.errors import CliError
from atelier.cli.train_image import IMAGE_POLICIES, ROLES, STAGE_REWARDS

if TYPE_CHECKING:
    from policies.deployed import DeployedVersion
    from storage.store import RewardInput, TrajectoryStore
    from training.images.groups import ImageGroup
    from training.result import TrainResult


class FlowLoopPolicy:
    """A diffusion LoRA (draw or refine): deployed as its image role's adapter, trained with
    Flow-GRPO in this process (a :class:`training.online.LoopPolicy`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from atelier.cli.train_image import _config

        self.args = args
        self.node: str = args.policy
        self.role = ROLES[args.policy]
        self.name: str = args.lora_name or args.policy
        self.reward: str = args.reward or STAGE_REWARDS[args.policy]
        self.config = _config(args)
        self.trainer: Any = None
        self.start_version = "0"
        """The fresh LoRA's version (``initial`` numbers it so the loop's versions are free)."""
        self.judge: Any = None
        self.analyzer: Any = None
        self.layers: list[dict[str, Any]] = []
        """What each member of the last ``train`` call is trained with (``_member_rewards``)."""
        self.sampled_by: list[str] = []

    def deployment(self, version: DeployedVersion | None) -> dict[str, Any]:
        return {"adapters": {self.role: version.path}} if version is not None else {}

    def start(self, version: DeployedVersion | None, checkpoint: Path | None) -> None:
        from atelier.cli.train_image import flow_trainer

        self.trainer = flow_trainer(
            self.args,
            self.config,
            str(self.args.model),
            self.name,
            version.version if version is not None else self.start_version,
            version.path if version is not None else None,
            init_what=version.label if version is not None else "--init",
        )
        if checkpoint is not None:
            try:
                self.trainer.restore_checkpoint(checkpoint)
            except (OSError, ValueError, KeyError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise CliError(f"the loop's trainer state {checkpoint}: {reason[:300]}") from None

    @property
    def version(self) -> str:
        return self.trainer.version

    async def score(self, store: TrajectoryStore, run_id: str) -> None:
        """R3's stage reward of the run's steps (idempotent: a stored row is not stored
        again); another ``--reward`` is read as stored."""
        from atelier.cli.train import run_analyzer, run_judge
        from atelier.cli.train_image import store_stage_rewards

        if self.reward not in STAGE_REWARDS.values():
            return
        if self.judge is None:  # built once: a backends file's judge holds clients
            self.judge = run_judge(store, [run_id])
            self.analyzer = run_analyzer(store, [run_id], self.judge)
        await store_stage_rewards(self.args, store, [run_id], self.judge, self.analyzer)

    def groups(
        self, store: TrajectoryStore, run_id: str, behaviour: DeployedVersion | None
    ) -> list[ImageGroup]:
        """The run's image groups of this node, checked to be sampled by ``behaviour``; none
        when no group carries a learning signal (the loop then trains nothing)."""
        from atelier.cli.train_image import _has_transitions
        from training.images.groups import read_groups

        groups = read_groups(store, [run_id], reward=self.reward, node=self.node)
        if not groups and not _has_transitions(store, [run_id], self.node):
            if not _ran(store, run_id, self.node):  # e.g. every first image was accepted
                return []
            raise CliError(
                f"run {run_id[:12]}: no {self.node} step recorded denoising transitions: put "
                f"roles.{self.role} on a traced image backend (inprocess-image with traced = "
                "true, or omni with traced = true against `atelier serve image`)"
            )
        expected = behaviour.label if behaviour is not None else None
        sampled = {t.lora for g in groups for m in g.members for t in m.transitions}
        if sampled - {expected}:
            named = ", ".join(sorted(str(s or "the base model") for s in sampled))
            raise CliError(
                f"run {run_id[:12]}: the {self.node} steps were sampled by {named}, not the "
                f"deployed {expected or 'base model'}: the {self.role} role's backend applies "
                "another LoRA (a backend lora, or a server that loaded one itself)"
            )
        self.sampled_by = sorted(str(s or "base") for s in sampled)
        if all(len({m.reward for m in g.members}) == 1 for g in groups):
            return []  # no learning signal: no new version
        return groups

    def train(self, groups: Sequence[ImageGroup]) -> TrainResult:
        from atelier.cli.train_image import _member_rewards

        models = {t.model for g in groups for m in g.members for t in m.transitions}
        if len(models) == 1:  # the version's base_model names what sampled it
            self.trainer.sampler.model.name = models.pop()
        self.layers = _member_rewards(list(groups), self.config)
        return self.trainer.train(groups)

    def trained_rows(
        self, result: TrainResult, groups: Sequence[ImageGroup], run_id: str
    ) -> list[RewardInput]:
        from atelier.cli.train_image import _trained_rows

        return _trained_rows(result, self.trainer.name, self.layers, [run_id])

    def save(
        self,
        store: TrajectoryStore,
        directory: Path,
        metadata: dict[str, Any],
        rows: Sequence[RewardInput],
    ) -> Path:
        from training.versions import save_version

        extra = {
            "reward": self.reward,
            "policy_node": self.node,
            "sampled_by": self.sampled_by,
            "config": vars(self.config),
            "loop_kind": "diffusion-lora",
        }
        return save_version(self.trainer, store, directory, {**metadata, **extra}, rewards=rows)

    def save_checkpoint(self, directory: Path) -> None:
        self.trainer.save_checkpoint(directory)

    def initial(self, store: TrajectoryStore, loop: str) -> DeployedVersion | None:
        """``--init`` (a registered diffusion LoRA version of this policy), else the base model;
        the fresh LoRA's version numbered so that the versions the loop saves are free (and, on
        a resume, as the loop's first run recorded it)."""
        from policies.deployed import VersionError, resolve_version
        from training.online import start_version

        if self.args.init is not None:
            try:
                version = resolve_version(self.args.init, "diffusion-lora", store, what="--init")
            except VersionError as exc:
                raise CliError(str(exc)) from None
            registered = store.policy_versions(name=version.name, version=version.version or "")
            if version.name != self.name or not registered:
                raise CliError(
                    f"--init {self.args.init} is not a version of {self.name!r} registered in "
                    "the store"
                )
            return version
        self.start_version = start_version(
            store, self.name, loop, self.args.out, self.args.iterations
        )
        return None


def _ran(store: TrajectoryStore, run_id: str, node: str) -> bool:
    """Whether any trajectory of the run took a ``node`` step."""
    from training.reading import batches

    ids = [t.id for t in store.trajectories(run=run_id, limit=None)]
    return any(
        step.node == node
        for batch in batches(ids)
        for steps in store.steps_many(batch).values()
        for step in steps
    )


def build_flow_loop_policy(args: argparse.Namespace) -> FlowLoopPolicy:
    """The loop's policy for ``--policy draw|refine``, its options checked first (one line)."""
    from atelier.cli.train_image import check_flow_args

    if args.policy not in IMAGE_POLICIES:
        raise CliError(f"--policy {args.policy} is not a diffusion policy (draw or refine)")
    check_flow_args(args)
    return FlowLoopPolicy(args)


def check_flow_config(args: argparse.Namespace, config: Any, policy: FlowLoopPolicy) -> None:
    """The backends file (``config``, loaded) lets the loop deploy and record ``policy``: its
    role is on a traced image backend that takes a diffusion LoRA, names none of its own
    (the loop would not know which version it samples), and shares no one-adapter backend with
    a role that would be sampled by it unnamed."""
    from nodes.backends.config import (
        ConfigError,
        InProcessImageBackend,
        OmniBackend,
        with_role_adapters,
    )

    role, where = policy.role, args.config
    spec = config.role(role)
    backend = config.backends[spec.backend] if spec is not None else None
    traced = isinstance(backend, (InProcessImageBackend, OmniBackend)) and backend.traced
    if not traced:
        kind = f"{backend.kind} (untraced)" if backend is not None else "nothing"
        raise CliError(
            f"--policy {policy.node} trains the {role} role's diffusion LoRA, but {where} serves "
            f"it with {kind}: put roles.{role} on an inprocess-image backend with traced = true "
            "(a flow model such as SD3), or an omni backend with traced = true against "
            "`atelier serve image`"
        )
    assert spec is not None
    if isinstance(backend, OmniBackend):
        if policy.node == "refine":
            raise CliError(
                f"--policy refine: {where} puts roles.editor on omni backend {spec.backend!r}, "
                "and `atelier serve image` traces generations only (edits come back without "
                "transitions): put roles.editor on an inprocess-image backend with traced = true"
            )
        if not backend.loads_adapters:
            raise CliError(
                f"{where}: backends.{spec.backend}.adapter_mode = 'request', but the loop loads "
                "each version on the traced servers (atelier serve image): set adapter_mode = "
                "'load' or leave it out"
            )
    if isinstance(backend, InProcessImageBackend) and backend.lora is not None:
        raise CliError(
            f"{where}: backends.{spec.backend}.lora is {backend.lora}; the loop deploys the "
            "versions it trains there: give the one to start from as --init (registered), or "
            "remove it to start from the base model"
        )
    if spec.adapter and args.init is None:
        raise CliError(
            f"{where}: roles.{role} names adapter {spec.adapter}; the loop deploys the versions "
            "it trains there: give the one to start from as --init (or remove it from the file "
            "to start from the base model)"
        )
    try:  # the role with a version deployed: another role unnamed on its one-adapter backend
        with_role_adapters(config, {role: f"{policy.name}@{policy.start_version}"}, str(where))
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def flow_signature(args: argparse.Namespace) -> dict[str, Any]:
    """The loop-defining options of a diffusion policy (added to the loop's signature)."""
    from atelier.cli.train_image import flow_values

    return {"model": str(args.model.resolve()), "flow": flow_values(args), "reward": args.reward}
