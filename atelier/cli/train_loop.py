"""``atelier train --config BACKENDS --prompts FILE --policy P --iterations N``: on-policy GRPO
through the configured servers (``training.online``), for a decision policy (router, stop) or a
text/VLM node's LoRA (plan, reflect, decompose). Each iteration rolls out with the version the
previous one trained, deployed as a run deploys it (``--router`` / ``--stop``, or the role's
adapter loaded on every replica of its backend); ``--resume`` continues a killed loop.

argparse only at import; torch and the trainers load when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.cli.errors import CliError

if TYPE_CHECKING:
    from policies.deployed import DeployedVersion
    from storage.store import RewardInput, TrajectoryStore
    from training.result import TrainResult

NODE_ROLES = {"plan": "planner", "reflect": "reflector", "decompose": "decomposer"}
"""The graph role whose model each text policy is."""


def add_loop_options(train: argparse.ArgumentParser) -> None:
    group = train.add_argument_group(
        "on-policy loop (--config)",
        "roll out the prompts through the backends file's servers, store the runs and their "
        "rewards, train, save and register a new version, deploy it (a text policy's adapter is "
        "loaded on every replica of its role's backend), and repeat; the store holds the loop's "
        "whole state, so a killed loop continues with --resume",
    )
    group.add_argument(
        "--prompts",
        type=Path,
        help="a text file, one prompt per line (default: ShapeWorld's fixed prompt set, "
        "--per-category per category)",
    )
    group.add_argument(
        "--prompts-per-iteration",
        type=int,
        metavar="K",
        help="prompts each iteration rolls out, taken in order and cycling (default: all)",
    )
    group.add_argument(
        "--loop",
        metavar="NAME",
        help="the loop's name in the store (default: train-POLICY); --resume finds it by this",
    )
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the loop of this name where it stopped (same options)",
    )
    group.add_argument(
        "--mode",
        choices=("auto", "direct", "reflect", "decompose", "escalate", "random"),
        help="the built-in router the rollouts use while a text or stop policy trains "
        "(default: the file's [policies] router, else auto)",
    )
    group.add_argument(
        "--concurrency", type=int, default=64, help="trajectories in flight (default: 64)"
    )


def check_loop_args(args: argparse.Namespace) -> None:
    if args.config is None:
        loop_only = [
            flag
            for flag, value in (
                ("--prompts", args.prompts),
                ("--prompts-per-iteration", args.prompts_per_iteration),
                ("--loop", args.loop),
                ("--mode", args.mode),
                ("--resume", args.resume or None),
            )
            if value is not None
        ]
        if loop_only:
            raise CliError(f"{loop_only[0]} belongs to the on-policy loop: give --config FILE")
        return
    from atelier.cli.train_image import IMAGE_POLICIES
    from atelier.cli.train_text import TEXT_POLICIES

    args.policy = args.policy or "router"
    if args.policy not in ("router", "stop", *TEXT_POLICIES, *IMAGE_POLICIES):
        raise CliError(f"--config trains no --policy {args.policy}")
    if args.tree_stage == "reflect_refine":
        raise CliError("--tree-stage reflect_refine forks stored runs: give --run, not --config")
    if args.tree_stage == "r3":
        if args.policy not in ("plan", "draw"):
            raise CliError(
                "--tree-stage r3 trains a reason-stage policy: --policy plan (its LoRA) or "
                "draw (Flow-GRPO)"
            )
        if args.resume:
            raise CliError(
                "--tree-stage r3 cannot --resume yet: start a new alternation (--loop) with "
                "--init from its newest plan version"
            )
        if args.reward_weights != (1.0, 0.0, 0.0):
            raise CliError("--reward-weights do not apply to --tree-stage r3 (R3's stage rewards)")
        if args.starts < 1 or not 0.0 <= args.perfect_share <= 1.0:
            raise CliError("--starts must be at least 1 and --perfect-share in [0, 1]")
    if args.mode is not None and args.policy == "router":
        raise CliError(
            "--mode names a built-in router; --policy router trains one (leave --mode out)"
        )
    if args.sft:
        raise CliError("--sft imitates recorded runs: give --run, not --config")
    if args.max_staleness is not None:
        if not args.workers:
            raise CliError(
                "--max-staleness with --config: rollout workers sample the loop; add --workers "
                "and start `atelier worker LOOP` processes"
            )
        if args.max_staleness < 0:
            raise CliError("--max-staleness must be >= 0")
        if args.resume or args.tree_stage is not None:
            raise CliError(
                "--max-staleness: an asynchronous loop neither resumes nor alternates R3 stages "
                "(start another --loop, with --init from a version to continue from)"
            )
    elif args.workers:
        raise CliError("--workers samples an asynchronous loop: give --max-staleness K too")
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    if args.prompts_per_iteration is not None and args.prompts_per_iteration < 1:
        raise CliError("--prompts-per-iteration must be at least 1")
    if not args.config.is_file():
        raise CliError(f"--config {args.config}: no such file")


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts is None:
        from nodes.backends.shapeworld import fixed_prompt_set

        return [item.text for item in fixed_prompt_set(args.per_category, seed=args.seed)]
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read --prompts {args.prompts}: {exc}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise CliError(f"--prompts {args.prompts} holds no prompt")
    return prompts


def _signature(args: argparse.Namespace, prompts: Sequence[str]) -> dict[str, Any]:
    """The options that define the loop (a resume must give the same; --iterations may grow)."""
    import hashlib

    from atelier.cli.train_image import IMAGE_POLICIES
    from atelier.cli.train_text import TEXT_POLICIES

    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    signature: dict[str, Any] = {
        "policy": args.policy,
        "config": str(args.config.resolve()),
        "prompts_sha256": digest,
        "prompts_per_iteration": args.prompts_per_iteration,
        "group_size": args.group_size,
        "seed": args.seed,
        "max_rounds": args.max_rounds,
        "mode": args.mode,
        "penalty": args.penalty,
        "image_cost": args.image_cost,
        "reward_weights": list(args.reward_weights),
        "reward_source": args.reward_source,
        "init": str(args.init.resolve()) if args.init is not None else None,
        "out": str(args.out.resolve()),
    }
    if args.policy in TEXT_POLICIES:
        from atelier.cli.train_text import lora_config

        signature["model"] = str(args.model.resolve())
        signature["lora"] = lora_config(args).model_dump(mode="json")
    if args.policy in IMAGE_POLICIES:
        from atelier.cli.train_loop_image import flow_signature

        signature.update(flow_signature(args))
    return signature


class DecisionLoopPolicy:
    """The router or stop policy: deployed with ``--router`` / ``--stop``, trained in-process."""

    def __init__(self, args: argparse.Namespace, kind: str) -> None:
        self.args, self.kind = args, kind
        self.name = kind
        self.trainer: Any = None
        self.source: Any = None
        self.judge: Any = None
        self.outcome = "checker"
        self.prepared = False

    def deployment(self, version: DeployedVersion | None) -> dict[str, Any]:
        return {"router" if self.kind == "router" else "stop": version.path} if version else {}

    def start(self, version: DeployedVersion | None, checkpoint: Path | None) -> None:
        from policies.weights import load_policy
        from training.decisions.trainer import GRPOTrainer

        config = self._config()
        if checkpoint is not None:
            self.trainer = GRPOTrainer.resume(checkpoint, config)
        else:
            assert version is not None  # a decision loop always starts from a saved version
            self.trainer = GRPOTrainer(load_policy(version.path), config)

    def _config(self) -> Any:
        from atelier.cli.train import _config

        return _config(self.args, self.outcome)

    @property
    def version(self) -> str:
        return self.trainer.version

    def prepare(self, store: TrajectoryStore, run_id: str) -> None:
        """The reward source of runs recorded with the file (checker, judge or gvu)."""
        from atelier.cli.train import run_reward_source

        self.source, self.judge = run_reward_source(self.args, store, [run_id])
        self.outcome = self.source.name if self.source is not None else "checker"
        self.trainer.config.outcome_reward = self.outcome
        self.prepared = True

    async def score(self, store: TrajectoryStore, run_id: str) -> None:
        from atelier.cli.train import _score_runs, run_analyzer

        if not self.prepared:
            self.prepare(store, run_id)
        analyzer = None
        if self.args.reward_weights[2] > 0:
            analyzer = run_analyzer(store, [run_id], self.judge)
        await _score_runs(store, [run_id], self.source, analyzer)

    def groups(
        self, store: TrajectoryStore, run_id: str, behaviour: DeployedVersion | None
    ) -> list[Any]:
        from training.decisions.groups import read_groups
        from training.decisions.rewards import FORMAT, store_member_rewards

        kind = "mode" if self.kind == "router" else "stop"
        assert behaviour is not None
        groups = read_groups(store, run_id, kind, policy=behaviour.name, version=behaviour.version)
        store_member_rewards(store, groups, (self.outcome, FORMAT))  # R_o, R_f before use
        return groups

    def train(self, groups: Sequence[Any]) -> TrainResult:
        return self.trainer.train(groups)

    def trained_rows(
        self, result: TrainResult, groups: Sequence[Any], run_id: str
    ) -> list[RewardInput]:
        from training.decisions.rewards import TRAINED
        from training.rewards.record import trained_reward_rows

        return trained_reward_rows(
            result,
            self.trainer.name,
            {"run": run_id},
            names=TRAINED,
            source="training.decisions.trainer",
        )

    def save(
        self,
        store: TrajectoryStore,
        directory: Path,
        metadata: dict[str, Any],
        rows: Sequence[RewardInput],
    ) -> Path:
        from training.rewards.sources import describe_source
        from training.versions import save_version

        extra = {"penalty": self.args.penalty, "reward_source": describe_source(self.source)}
        return save_version(self.trainer, store, directory, {**metadata, **extra}, rewards=rows)

    def save_checkpoint(self, directory: Path) -> None:
        from policies.weights import write_new_directory

        write_new_directory(directory, self.trainer.save_checkpoint)

    def initial(self, store: TrajectoryStore, loop: str) -> DeployedVersion:
        """``--init``, or the loop's saved untrained start (saved now on a first start)."""
        from policies.deployed import VersionError, resolve_version
        from training.online import loop_versions

        if self.args.init is not None:
            try:
                return resolve_version(self.args.init, self.kind, store, what="--init")
            except VersionError as exc:
                raise CliError(str(exc)) from None
        known = loop_versions(store, self.name, loop)
        if -1 in known:
            return known[-1]
        from atelier.cli.train import _reserved_policy
        from training.decisions.trainer import GRPOTrainer
        from training.versions import save_version

        trainer = GRPOTrainer(_reserved_policy(self.args, store, self.args.iterations + 1))
        directory = self.args.out / f"{trainer.name}-{trainer.version}"
        metadata = {"algorithm": "initial (untrained)", "loop": loop, "loop_iteration": -1}
        path = save_version(trainer, store, directory, {**metadata, "loop_kind": self.kind})
        return resolve_version(path, self.kind, store, what="the loop's initial policy")


class TextLoopPolicy:
    """A text/VLM node's LoRA: deployed as its role's adapter, loaded on every replica."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node = args.policy
        self.role = NODE_ROLES[args.policy]
        self.name = args.lora_name or args.policy
        self.trainer: Any = None
        self.start_version = "0"
        self.analyzer: Any = None
        self.judge: Any = None
        self.behaviour: DeployedVersion | None = None

    def deployment(self, version: DeployedVersion | None) -> dict[str, Any]:
        return {"adapters": {self.role: version.path}} if version is not None else {}

    def start(self, version: DeployedVersion | None, checkpoint: Path | None) -> None:
        from atelier.cli.train_text import lora_config
        from training.text.trainer import LoRATrainer

        try:
            self.trainer = LoRATrainer(
                self.args.model,
                lora_config(self.args),
                device=self.args.device,
                name=self.name,
                version=version.version or "0" if version is not None else self.start_version,
                adapter=version.path if version is not None else None,
            )
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot load --model {self.args.model}: {exc}") from None
        if checkpoint is not None:
            self.trainer.restore_checkpoint(checkpoint)

    @property
    def version(self) -> str:
        return self.trainer.version

    async def score(self, store: TrajectoryStore, run_id: str) -> None:
        from atelier.cli.train_text import _analyzer_and_judge
        from training.text.rewards import store_text_rewards

        if self.analyzer is None:
            self.analyzer, self.judge = _analyzer_and_judge(store, [run_id])
        penalty = self.args.penalty != "none"
        try:
            await store_text_rewards(
                store,
                [run_id],
                self.analyzer,
                judge=self.judge,
                weights=self.args.reward_weights,
                complexity_eps=0.05 if penalty else None,
                complexity_form=self.args.penalty if penalty else "scale",
                complexity_cost=self.args.image_cost,
            )
        except Exception as exc:  # a judge or analyzer server down, a prompt it refuses
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise CliError(
                f"scoring run {run_id[:12]} (the analyzer's R_s and the judge's V) failed: "
                f"{reason[:300]}; the run is stored: fix the cause and --resume"
            ) from None

    @property
    def reward(self) -> str:
        from training.text.rewards import node_reward

        return self.args.reward or node_reward(self.node, penalty=self.args.penalty != "none")

    def groups(
        self, store: TrajectoryStore, run_id: str, behaviour: DeployedVersion | None
    ) -> list[Any]:
        from training.text.groups import read_node_groups

        self.behaviour = behaviour  # the weights the groups' log-probs came from (train)
        try:
            return read_node_groups(store, [run_id], node=self.node, reward=self.reward)
        except (KeyError, ValueError) as exc:
            raise CliError(str(exc.args[0]) if exc.args else str(exc)) from None

    def train(self, groups: Sequence[Any]) -> TrainResult:
        try:
            return self.trainer.train(groups, sampled_with=self._sampled_with())
        except ValueError as exc:  # the alignment check: not what the server saw
            raise CliError(str(exc)) from None

    def _sampled_with(self) -> Any:
        """What sampled the groups, as ``LoRATrainer.train(sampled_with=)`` takes it: the
        trainer's own weights (on-policy), or — an asynchronous loop training on a run an older
        version sampled — that version's adapter directory, or None for the base model."""
        from training.text.trainer import ON_POLICY

        behaviour = self.behaviour
        if behaviour is None:  # the base model: on-policy while the LoRA is fresh (B = 0)
            fresh = self.trainer.steps == 0 and self.trainer.parent is None
            return ON_POLICY if fresh else None
        return ON_POLICY if behaviour.version == self.trainer.version else behaviour.path

    def trained_rows(
        self, result: TrainResult, groups: Sequence[Any], run_id: str
    ) -> list[RewardInput]:
        from training.rewards.record import trained_reward_rows

        steps = {m.trajectory_id: m.step_seq for g in groups for m in g.members}
        return trained_reward_rows(
            result,
            self.trainer.name,
            {"runs": [run_id]},
            source="training.text.trainer",
            prefix="lora_",
            steps=steps,
        )

    def save(
        self,
        store: TrajectoryStore,
        directory: Path,
        metadata: dict[str, Any],
        rows: Sequence[RewardInput],
    ) -> Path:
        from training.versions import save_version

        extra = {"reward": self.reward, "policy_node": self.node, "loop_kind": "adapter"}
        return save_version(self.trainer, store, directory, {**metadata, **extra}, rewards=rows)

    def save_checkpoint(self, directory: Path) -> None:
        self.trainer.save_checkpoint(directory)

    def initial(self, store: TrajectoryStore, loop: str) -> DeployedVersion | None:
        """``--init`` (a registered adapter version), else the base model; the fresh adapter's
        version numbered so that the versions the loop saves are free."""
        from policies.deployed import VersionError, resolve_version
        from training.online import start_version

        if self.args.init is not None:
            try:
                version = resolve_version(self.args.init, "adapter", store, what="--init")
            except VersionError as exc:
                raise CliError(str(exc)) from None
            if version.version is None or version.name != self.name:
                raise CliError(
                    f"--init {self.args.init} is not a version of {self.name!r} registered in "
                    "the store"
                )
            return version
        self.start_version = start_version(
            store, self.name, loop, self.args.out, self.args.iterations
        )
        return None


def _check_config(args: argparse.Namespace, policy: Any) -> None:
    """The file loads, and a text policy's role is served by a model that takes adapters and
    names no adapter of its own (the loop would not know which version it samples)."""
    from nodes.backends.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    from atelier.cli.train_loop_image import FlowLoopPolicy, check_flow_config

    if isinstance(policy, FlowLoopPolicy):
        check_flow_config(args, config, policy)
    if isinstance(policy, TextLoopPolicy):
        spec = config.role(policy.role)
        kind = config.backends[spec.backend].kind if spec is not None else None
        if kind not in ("openai", "inprocess-lm"):
            raise CliError(
                f"--policy {args.policy} trains the {policy.role} role's model, but "
                f"{args.config} serves it with {kind or 'nothing'}: put roles.{policy.role} on "
                "an openai or inprocess-lm backend (a model that returns log-probs)"
            )
        if spec is not None and spec.adapter and args.init is None:
            raise CliError(
                f"{args.config}: roles.{policy.role} names adapter {spec.adapter}; the loop "
                "deploys the versions it trains there: give the one to start from as --init "
                "(or remove it from the file to start from the base model)"
            )


def train_loop(args: argparse.Namespace, store: TrajectoryStore, board: Any) -> int:
    from atelier.cli.train import _run_table
    from atelier.cli.train_image import IMAGE_POLICIES
    from atelier.cli.train_loop_image import build_flow_loop_policy
    from atelier.cli.train_text import TEXT_POLICIES
    from nodes.backends.config import ConfigError
    from nodes.state import Budget
    from policies.deployed import VersionError
    from training.online import LoopError, LoopSpec
    from training.versions import VersionTaken

    prompts = _prompts(args)
    policy: Any
    if args.policy in IMAGE_POLICIES:
        policy = build_flow_loop_policy(args)
    elif args.policy in TEXT_POLICIES:
        policy = TextLoopPolicy(args)
    else:
        policy = DecisionLoopPolicy(args, args.policy)
    _check_config(args, policy)
    name = args.loop or f"{'r3' if args.tree_stage == 'r3' else 'train'}-{policy.name}"
    spec = LoopSpec(
        name=name,
        backends_config=args.config.resolve(),
        prompts=prompts,
        iterations=args.iterations,
        group_size=args.group_size,
        prompts_per_iteration=args.prompts_per_iteration,
        seed=args.seed,
        budget=Budget(max_rounds=args.max_rounds),
        concurrency=args.concurrency,
        mode=args.mode,
        save_dir=args.out,
        signature=_signature(args, prompts),
    )
    if args.policy in (*TEXT_POLICIES, *IMAGE_POLICIES):  # a decision policy needs neither
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if args.policy in IMAGE_POLICIES:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    initial = policy.initial(store, name)
    header = ["| iteration | behaviour | run | mean V | accuracy | images | trained |"]

    def show(entry: Any) -> None:
        if header:
            print(header.pop())
            print("|---|---|---|---|---|---|---|")
        score, accuracy, images, _ = _run_table(store, entry.run_id)
        trained = entry.trained or "no update (no group carried a signal)"
        if entry.resumed and entry.trained:
            trained += " (done before)"
        print(
            f"| {entry.index} | {entry.behaviour} | {entry.run_id[:8]} | {score:.3f} | "
            f"{accuracy:.2f} | {images:.2f} | {trained} |",
            flush=True,
        )
        if board is not None:
            board.scalars(entry.index, entry.metrics, "train")
            board.scalars(entry.index, {"mean_V": score, "accuracy": accuracy}, "rollout")

    def say(line: str) -> None:
        print(f"atelier: {line}", file=sys.stderr)

    if args.tree_stage == "r3":
        return _alternate(args, store, spec, policy, initial, show_round)
    if args.max_staleness is not None:
        return _train_async(args, store, spec, policy, initial, show)
    start_version = getattr(policy, "start_version", None)
    try:
        log = asyncio.run(
            _iterate(store, spec, policy, initial, args.resume, show, say, start_version)
        )
    except (LoopError, ConfigError, VersionError, VersionTaken, FileExistsError) as exc:
        raise CliError(str(exc)) from None
    from atelier.cli.curves import print_iterations

    print_iterations(store, [(e.run_id, e.trained, e.metrics) for e in log])
    last = next((e.trained for e in reversed(log) if e.trained), None)
    print(f"loop {name}: {len(log)} iterations; newest version {last or 'none'}", file=sys.stderr)
    return 0


async def _iterate(
    store: Any,
    spec: Any,
    policy: Any,
    initial: Any,
    resume: bool,
    show: Any,
    say: Any,
    start_version: str | None,
) -> list[Any]:
    from training.online import online_iterations

    return await online_iterations(
        store,
        spec,
        policy,
        initial,
        resume=resume,
        on_iteration=show,
        say=say,
        # recorded in every run of the loop: --resume numbers a fresh adapter the same way
        extra_loop={"start_version": start_version} if start_version is not None else None,
    )


def _train_async(
    args: argparse.Namespace, store: Any, spec: Any, policy: Any, initial: Any, show: Any
) -> int:
    """``--max-staleness K --workers``: the loop's batches sampled by rollout workers while it
    trains (``training.online_async``)."""
    from atelier.cli.common import safe_url
    from nodes.backends.config import ConfigError
    from policies.deployed import VersionError
    from training.online import LoopError
    from training.online_async import online_async
    from training.versions import VersionTaken

    def announce(loop: Any) -> None:
        print(
            f"training loop {loop.name}: start rollout workers with `atelier worker {loop.name} "
            f"--db {safe_url(store.url)}` (one or many, on any machine sharing the store and "
            "reaching the servers)",
            flush=True,
        )

    def shown(entry: Any) -> None:
        show(entry)
        skipped = f", skipped {len(entry.skipped)} staler runs" if entry.skipped else ""
        print(
            f"  staleness {entry.staleness}{skipped}; {entry.wall_s:.2f} s since the last step, "
            f"{entry.wait_s:.2f} s waiting for samples",
            flush=True,
        )

    start_version = getattr(policy, "start_version", None)
    work = online_async(
        store,
        spec,
        policy,
        initial,
        max_staleness=args.max_staleness,
        on_loop=announce,
        on_iteration=shown,
        extra_loop={"start_version": start_version} if start_version is not None else None,
    )
    try:
        log = asyncio.run(work)
    except (LoopError, ConfigError, VersionError, VersionTaken, FileExistsError) as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"atelier: interrupted — loop {spec.name} ended; its workers leave", file=sys.stderr)
        return 130
    last = next((e.trained for e in reversed(log) if e.trained), None)
    print(f"loop {spec.name}: {len(log)} steps; newest version {last or 'none'}", file=sys.stderr)
    return 0


def show_round(entry: Any) -> None:
    reason = entry.reason_trained or "no update"
    forks = ", ".join(run[:8] for run in entry.fork_runs)
    print(
        f"| {entry.index} | {entry.run_id[:8]} | {entry.reason_behaviour} → {reason} | "
        f"{entry.stop_behaviour} → {entry.stop_trained} | {forks} |",
        flush=True,
    )


def _alternate(
    args: argparse.Namespace,
    store: TrajectoryStore,
    spec: Any,
    reason: Any,
    initial: Any,
    show: Any,
) -> int:
    """``--tree-stage r3``: R3's alternation (``training.r3``), the stop policy starting fresh
    (saved as the alternation's untrained ``stop@N``, as the loop saves a fresh router)."""
    import copy

    from nodes.backends.config import ConfigError
    from policies.deployed import VersionError
    from policies.weights import load_policy
    from training.decisions.trainer import GRPOTrainer
    from training.r3 import r3_rounds
    from training.tree import stage_config
    from training.versions import VersionTaken

    taken = [r for r in store.runs() if (r.config.get("r3") or {}).get("name") == spec.name]
    if taken:
        raise CliError(
            f"an R3 alternation named {spec.name!r} is in the store ({len(taken)} round(s)); "
            "give another --loop"
        )
    stop_args = copy.copy(args)
    stop_args.init, stop_args.policy = None, "stop"
    stop = DecisionLoopPolicy(stop_args, "stop")
    stop_initial = stop.initial(store, spec.name)
    stop_trainer = GRPOTrainer(load_policy(stop_initial.path), stage_config(stop._config()))
    print(f"| round | run | reason stage ({args.policy}) | reflect-refine (stop) | fork runs |")
    print("|---|---|---|---|---|")
    try:
        log = asyncio.run(
            r3_rounds(
                store,
                spec,
                reason,
                initial,
                stop_trainer,
                stop_initial,
                tree_iterations_per_round=1,
                starts=args.starts,
                tree_group_size=args.group_size,
                perfect_share=args.perfect_share,
                weighting=args.start_weighting,
                on_round=show,
            )
        )
    except (ConfigError, VersionError, VersionTaken, FileExistsError, ValueError) as exc:
        raise CliError(str(exc)) from None
    last = log[-1] if log else None
    if last is not None:
        newest = last.reason_trained or last.reason_behaviour
        print(
            f"alternation {spec.name}: {len(log)} rounds; newest {newest} and {last.stop_trained}",
            file=sys.stderr,
        )
    return 0
