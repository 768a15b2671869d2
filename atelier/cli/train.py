"""``atelier train``: GRPO on node policies, from stored runs or on-policy in ShapeWorld.

argparse only at import; torch and the trainer load when the command runs.

Training from stored runs (``--run``, GRPO of router, stop or a text/VLM LoRA) is data-parallel
under ``torchrun`` (``training.distributed``)::

    torchrun --nproc_per_node 8 -m atelier.cli train --run RUN --policy reflect --model M ...

Every rank reads the same groups; rank 0 alone stores the rewards (the others wait), prints,
writes TensorBoard, and saves and registers the version; the other ranks are quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_graph.heap import freeze_startup_heap
from atelier.cli.train_image import (
    IMAGE_POLICIES,
    add_flow_options,
    check_flow_args,
    check_image_args,
    refuse_flow_options,
    train_image,
)
from atelier.cli.train_loop import add_loop_options, check_loop_args, train_loop
from atelier.cli.train_text import (
    TEXT_POLICIES,
    add_lora_options,
    check_model_args,
    check_text_args,
    train_text,
)

if TYPE_CHECKING:
    from storage.store import TrajectoryStore
    from training.decisions.trainer import GRPOConfig
    from training.tensorboard import TensorBoardLog

POLICIES = ("router", "stop", *TEXT_POLICIES, *IMAGE_POLICIES)


def add_train_parser(commands: Any, add_db: Any) -> argparse.ArgumentParser:
    train = commands.add_parser(
        "train",
        help="train a node policy with GRPO (from stored runs, or on-policy in ShapeWorld)",
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", action="append", help="stored run(s) to train from (repeatable)")
    source.add_argument("--world", choices=("shapeworld",), help="roll out, train, repeat")
    source.add_argument(
        "--config",
        type=Path,
        metavar="BACKENDS",
        help="roll out through this backends file's servers, train, deploy the new version, "
        "repeat (see the on-policy loop options)",
    )
    train.add_argument(
        "--policy",
        choices=POLICIES,
        help="policy to train: router, stop (decision policies), the LoRA of a text/VLM node: "
        "plan, reflect, decompose, or the diffusion LoRA of draw, refine (Flow-GRPO); the "
        "LoRAs need --model; default: router; stop with --tree-stage reflect_refine",
    )
    train.add_argument(
        "--init", type=Path, help="start from this saved policy version (a directory)"
    )
    train.add_argument("--iterations", type=int, default=4, help="on-policy iterations")
    train.add_argument(
        "--max-staleness",
        type=int,
        metavar="K",
        help="asynchronous GRPO: sample with the newest version while training on samples at "
        "most K versions old (AReaL's bound; 0 = synchronous). With --config (any policy), "
        "rollout workers sample (--workers); with --world shapeworld --policy router, this "
        "process samples (only the learned router: no uniform first iteration)",
    )
    train.add_argument(
        "--workers",
        action="store_true",
        help="with --config and --max-staleness: sample nothing here; `atelier worker LOOP` "
        "processes (one or many machines, the same --db) sample each iteration's run with the "
        "newest version, while this process trains",
    )
    train.add_argument("--per-category", type=int, default=6, help="prompts per category")
    train.add_argument("--group-size", "-G", type=int, default=8, help="samples per prompt")
    train.add_argument("--max-rounds", type=int, default=2, help="correction rounds in rollouts")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--penalty",
        choices=("scale", "margin", "linear", "none"),
        default="scale",
        help="complexity penalty: scale = the Self-Adaptive Interleaved Reasoner's (SAIR) form "
        "(default), margin = order-preserving, linear = a price per image (--image-cost), none",
    )
    train.add_argument(
        "--image-cost", type=float, default=0.1, help="λ per image for --penalty linear"
    )
    train.add_argument(
        "--reward-weights",
        default="1,0,0",
        metavar="A1,A2,A3",
        help="R = a1·R_o + a2·R_f + a3·R_s: weights of the outcome (the judge's score), the "
        "format reward and the step-wise reward R_s (an analyzer's mean score of the "
        "trajectory's plan, decomposition and reflections, stored as 'stepwise'; ShapeWorld's "
        "analyzer is checker-based, a backends file's is its VLM judge). SAIR publishes no "
        "weights; default 1,0,0",
    )
    rewards = train.add_argument_group(
        "reward source (router, stop, draw)",
        "R_o of decision-policy training; judge and gvu score every final image with the VLM "
        "of the runs' backends file ([rewards] backend, else its judge role) and store the "
        "values (vlm_yes, gvu) before training; the file's [rewards] table sets the defaults",
    )
    rewards.add_argument(
        "--reward-source",
        choices=("checker", "judge", "gvu"),
        help="checker = the judge score each run stored, judge = the VLM's P(yes), gvu = "
        "GvU's geometric-mean prompt-token probability given the image (default: [rewards] "
        "source, else checker)",
    )
    rewards.add_argument(
        "--gvu-instruction",
        metavar="TEXT",
        help="gvu: the user turn the prompt answers (default: [rewards] instruction, else "
        "'Describe this image.')",
    )
    rewards.add_argument(
        "--judge-top-logprobs",
        type=int,
        metavar="K",
        help="judge: top-k log-probs read per answer, 0 = exact two-request path (default: "
        "[rewards] top_logprobs, else 20)",
    )
    tree = train.add_argument_group(
        "Tree-RL (R3)",
        "with --run: fork G continuations from stored stage start states, on the backends the "
        "runs were recorded with, and train the stage's policy on per-fork-point groups with "
        "R3's stage rewards",
    )
    tree.add_argument(
        "--tree-stage",
        choices=("reflect_refine", "r3"),
        help="train this stage (reflect_refine: the stop policy, reward C_j, with --run); r3 "
        "(with --config and --policy plan): R3's alternation, per round the reason stage (the "
        "plan LoRA, G samples per prompt) then Tree-RL of the stop policy from that round's "
        "reason-stage results",
    )
    tree.add_argument("--starts", type=int, default=32, help="start states drawn per iteration")
    tree.add_argument(
        "--perfect-share",
        type=float,
        default=0.15,
        help="chance that a start state is drawn from already-perfect ones (R3: 0.15)",
    )
    tree.add_argument(
        "--start-weighting",
        choices=("uniform", "room"),
        default="uniform",
        help="how imperfect start states are drawn: uniform (R3's released code) or room (∝ 1 − V̂)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=Path("atelier-policies"),
        help="where policy versions are saved (default: atelier-policies/)",
    )
    train.add_argument(
        "--device",
        default="auto",
        help="where a text or image policy trains: cpu, cuda, cuda:1, auto (default: cuda "
        "when torch sees one)",
    )
    train.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="also write the training scalars as TensorBoard event files under DIR",
    )
    add_lora_options(train)
    add_flow_options(train)
    add_loop_options(train)
    add_db(train)
    train.set_defaults(handler=cmd_train)
    return train


def _initial_policy(args: argparse.Namespace) -> Any:
    from atelier.cli.errors import CliError
    from policies.weights import load_policy

    if args.init is not None:  # cmd_train has checked that the directory exists
        try:
            return load_policy(args.init)
        except (OSError, ValueError, KeyError) as exc:  # missing/corrupt config or weights
            raise CliError(f"--init {args.init} is not a saved policy version: {exc}") from None
    if args.policy == "router":
        from policies.mode import LearnedModePolicy

        return LearnedModePolicy(seed=args.seed)
    from policies.stop import LearnedStopPolicy

    return LearnedStopPolicy(seed=args.seed)


def _reserved_policy(args: argparse.Namespace, store: TrajectoryStore, count: int) -> Any:
    """The initial policy, numbered so that the ``count`` versions this command saves are free
    in the store and under ``--out`` (checked before any rollout: nothing is overwritten)."""
    from atelier.cli.errors import CliError
    from training.versions import VersionTaken, reserve_versions, taken_versions

    policy = _initial_policy(args)
    taken = taken_versions(store, policy.name, args.out)
    try:
        return reserve_versions(policy, taken, count, loaded=args.init is not None)
    except VersionTaken as exc:
        raise CliError(str(exc)) from None


def _reward_weights(text: str) -> tuple[float, float, float]:
    from atelier.cli.errors import CliError

    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or any(w < 0 or not math.isfinite(w) for w in weights) or not any(weights):
        raise CliError(f"--reward-weights takes three weights >= 0, not all 0 (a1,a2,a3): {text!r}")
    return weights  # type: ignore[return-value]


def run_analyzer(store: TrajectoryStore, runs: list[str], judge: Any = None) -> Any:
    """The analyzer of the runs' intermediate texts (R_s), matching their judge (given, else
    rebuilt: ``run_judge``): ShapeWorld's checker-based one where the judge is ShapeWorld's
    checker, the VLM judge's model where it is a VLM judge."""
    from atelier.cli.errors import CliError
    from nodes.backends.shapeworld import ShapeWorldChecker

    judge = judge if judge is not None else run_judge(store, runs)

    if isinstance(judge, ShapeWorldChecker):
        from nodes.backends.shapeworld.analyzer import ShapeWorldAnalyzer

        return ShapeWorldAnalyzer(judge.config)
    model = getattr(judge, "model", None)
    if model is not None and hasattr(model, "score_text"):
        from training.rewards.analyzer import VLMAnalyzer

        return VLMAnalyzer(model)
    raise CliError(
        f"the runs' judge ({type(judge).__name__}) is neither ShapeWorld's checker nor a VLM "
        "judge, so there is no analyzer for R_s (SAIR's step-wise reward)"
    )


def _recorded_backends(store: TrajectoryStore, runs: list[str]) -> tuple[Any, Any]:
    """(world, backends file) the runs were recorded with: one kind for all of them."""
    from atelier.cli.errors import CliError

    configs = [store.run(run_id).config for run_id in runs]
    recorded = {(config.get("world"), config.get("backends_config")) for config in configs}
    if len(recorded) > 1:
        raise CliError("the runs were recorded with different backends; train on one kind")
    return recorded.pop()


def _run_config(path: str, run_id: str) -> Any:
    from atelier.cli.errors import CliError
    from nodes.backends.config import load_config

    try:
        return load_config(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot rebuild the judge of run {run_id} from {path}: {exc}") from None


def _reward_backends(config: Any, path: str, run_id: str) -> tuple[Any, Any]:
    from atelier.cli.errors import CliError
    from nodes.backends.config import build_reward_backends

    try:
        return build_reward_backends(config)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot rebuild the judge of run {run_id} from {path}: {exc}") from None


def run_judge(store: TrajectoryStore, runs: list[str]) -> Any:
    """The judge the runs were recorded with (ShapeWorld's checker, or a backends file's)."""
    from atelier.cli.errors import CliError

    world, path = _recorded_backends(store, runs)
    run_id = runs[0]
    if world == "shapeworld":
        from nodes.backends.shapeworld import ShapeWorldChecker

        return ShapeWorldChecker()
    if world == "config":
        return _reward_backends(_run_config(path, run_id), path, run_id)[0]
    raise CliError(
        f"run {run_id} was recorded with backends given in code; compute and store its rewards "
        "from Python (training.rewards, training.text.rewards) and train there"
    )


def _no_vlm(kind: str, where: str) -> Any:
    from atelier.cli.errors import CliError

    return CliError(
        f"--reward-source {kind} scores images with a VLM, and {where}: train on runs recorded "
        "with a backends file (atelier rollout --config FILE) whose judge role, or [rewards] "
        "backend, is an openai or inprocess-lm backend"
    )


def _source_kind(args: argparse.Namespace, default: str = "checker") -> str:
    """The reward source's kind (the command line's over ``default``: the file's), its options
    checked against it."""
    from atelier.cli.errors import CliError

    kind = args.reward_source or default
    if args.gvu_instruction is not None and kind != "gvu":
        raise CliError(f"--gvu-instruction applies to --reward-source gvu, not {kind}")
    if args.judge_top_logprobs is not None and kind != "judge":
        raise CliError(f"--judge-top-logprobs applies to --reward-source judge, not {kind}")
    return kind


def run_reward_source(
    args: argparse.Namespace, store: TrajectoryStore, runs: list[str]
) -> tuple[Any, Any]:
    """(the source R_o is scored with, the runs' judge if it was built): the source is None
    for ``checker`` (the judge score each run stored); ``judge`` and ``gvu`` score with the VLM
    of the runs' backends file: its ``[rewards]`` backend, else its judge role's."""
    from nodes.backends.config import RewardsSpec

    world, path = _recorded_backends(store, runs)
    config = _run_config(path, runs[0]) if world == "config" else None
    spec = (config.rewards if config is not None else None) or RewardsSpec()
    kind = _source_kind(args, spec.source)
    if kind == "checker":
        return None, None
    if config is None:
        recorded = "ShapeWorld (no VLM)" if world == "shapeworld" else "backends given in code"
        raise _no_vlm(kind, f"run {runs[0]} was recorded on {recorded}")
    judge, model = _reward_backends(config, path, runs[0])
    vlm = model if model is not None else getattr(judge, "model", None)
    if vlm is None:
        role = "is ShapeWorld's checker" if judge is not None else "is absent"
        raise _no_vlm(kind, f"{path} names no [rewards] backend and its judge role {role}")
    from training.rewards.sources import build_reward_source

    options: dict[str, Any] = {}
    if kind == "gvu":
        instruction = args.gvu_instruction or spec.instruction
        options = {"instruction": instruction} if instruction else {}
    else:
        top = args.judge_top_logprobs
        top = spec.top_logprobs if top is None else top
        options = {"top_logprobs": top} if top is not None else {}
        # The judge role as configured, unless another backend or option is asked for.
        model = vlm if model is not None or options else None
    return build_reward_source(kind, judge=judge, model=model, **options), judge


async def _score_runs(store: TrajectoryStore, runs: list[str], source: Any, analyzer: Any) -> None:
    """R_s (with an analyzer) and R_o under the source's name (with a source) of every run,
    stored before the groups read their rewards."""
    from atelier.cli.errors import CliError

    if analyzer is not None:
        from training.rewards import store_stepwise_rewards

        await store_stepwise_rewards(store, runs, analyzer)
    if source is None:
        return
    from training.rewards.sources import score_final_images

    for run_id in runs:
        try:
            await score_final_images(store, run_id, source)
        except Exception as exc:  # a server down, a model that cannot score: one line
            reason = " ".join(str(exc).split()) or type(exc).__name__
            model = getattr(source, "model_id", source.name)
            raise CliError(
                f"scoring the final images of run {run_id} with {source.name} ({model}) "
                f"failed: {reason[:300]}"
            ) from None


def _config(args: argparse.Namespace, outcome: str = "checker") -> GRPOConfig:
    from training.decisions.trainer import GRPOConfig

    common = {"seed": args.seed, "reward_weights": args.reward_weights, "outcome_reward": outcome}
    if args.penalty == "none":
        return GRPOConfig(**common, complexity_eps=None)
    return GRPOConfig(**common, complexity_form=args.penalty, complexity_cost=args.image_cost)


def _run_table(store: TrajectoryStore, run_id: str) -> tuple[float, float, float, str]:
    rows = store.trajectories(run=run_id)
    n = max(len(rows), 1)
    modes = Counter(r.mode or "?" for r in rows)
    mix = " ".join(f"{m[:3]} {modes[m] / n:.2f}" for m in ("direct", "reflect", "decompose"))
    return (
        sum(r.score or 0.0 for r in rows) / n,
        sum(bool(r.correct) for r in rows) / n,
        sum(r.image_count for r in rows) / n,
        mix,
    )


def _mode_shares(store: TrajectoryStore, run_id: str) -> dict[str, float]:
    rows = store.trajectories(run=run_id)
    modes = Counter(r.mode or "?" for r in rows)
    return {f"share_{m}": modes[m] / max(len(rows), 1) for m in ("direct", "reflect", "decompose")}


def cmd_train(args: argparse.Namespace) -> int:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _cmd_train(args)
    _check_data_parallel(args)
    from contextlib import redirect_stderr, redirect_stdout

    from training.distributed import init_from_env, shutdown

    try:
        if init_from_env().is_main:
            return _cmd_train(args)
        with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
            return _cmd_train(args)
    finally:
        shutdown()


def _check_data_parallel(args: argparse.Namespace) -> None:
    """Under torchrun: only what trains data-parallel (GRPO from stored runs) is accepted."""
    from atelier.cli.errors import CliError

    given = [
        flag
        for flag, on in (
            ("--world", args.world is not None),
            ("--config", args.config is not None),
            ("--tree-stage", args.tree_stage is not None),
            ("--sft", args.sft),
            (f"--policy {args.policy}", args.policy in IMAGE_POLICIES),
        )
        if on
    ]
    if given:
        raise CliError(
            f"{', '.join(given)}: not data-parallel yet; under torchrun, atelier train trains "
            "router, stop or a text policy with GRPO from stored runs (--run)"
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from atelier.cli.common import open_store
    from atelier.cli.errors import CliError

    for name in ("iterations", "per_category", "group_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_cost < 0:
        raise CliError("--image-cost must be >= 0")
    args.reward_weights = _reward_weights(args.reward_weights)
    if args.judge_top_logprobs is not None and args.judge_top_logprobs < 0:
        raise CliError("--judge-top-logprobs must be >= 0")
    sourced = [
        f"--{name.replace('_', '-')}"
        for name in ("reward_source", "gvu_instruction", "judge_top_logprobs")
        if getattr(args, name) is not None
    ]
    if sourced and (args.policy in TEXT_POLICIES or args.tree_stage is not None):
        raise CliError(
            f"{', '.join(sourced)}: the reward source is R_o of router, stop and draw training, "
            "not of --tree-stage or a text policy"
        )
    if args.world is not None and (source := _source_kind(args)) != "checker":
        raise _no_vlm(source, "--world shapeworld rolls out on ShapeWorld (no VLM)")
    if args.policy not in (*TEXT_POLICIES, *IMAGE_POLICIES):
        given = [name for name, value in vars(args).items() if name.startswith("lora_") and value]
        if args.sft or args.model is not None or args.reward is not None or given:
            raise CliError(
                "--model, --sft, --reward and the LoRA options train a text or image policy: "
                "give --policy plan, reflect, decompose, draw or refine"
            )
    if args.tree_stage == "r3" and args.config is None:
        raise CliError("--tree-stage r3 alternates stages through a backends file: give --config")
    if args.policy in (*TEXT_POLICIES, *IMAGE_POLICIES):
        _check_device(args.device)
    check_loop_args(args)
    if args.config is not None:
        if args.policy in TEXT_POLICIES:
            check_model_args(args)
        if args.policy in IMAGE_POLICIES:
            check_flow_args(args)
        else:
            refuse_flow_options(args)
        board = _tensorboard(args)
        store = open_store(args, must_exist=False)
        try:
            return train_loop(args, store, board)
        finally:
            if board is not None:
                board.close()
    refuse_flow_options(args)
    if args.policy in IMAGE_POLICIES:
        check_image_args(args)
        board = _tensorboard(args)
        store = open_store(args)
        from training.versions import VersionTaken

        try:
            return train_image(args, store, board)
        except (VersionTaken, FileExistsError) as exc:
            raise CliError(str(exc)) from None
        finally:
            if board is not None:
                board.close()
    if args.policy in TEXT_POLICIES:
        check_text_args(args)
        board = _tensorboard(args)
        store = open_store(args)
        from training.versions import VersionTaken

        try:
            return train_text(args, store, board)
        except (VersionTaken, FileExistsError) as exc:
            raise CliError(str(exc)) from None
        finally:
            if board is not None:
                board.close()
    if args.tree_stage is not None and args.reward_weights != (1.0, 0.0, 0.0):
        message = "a stage trains on its R3 stage reward alone"
        raise CliError(f"--reward-weights do not apply to --tree-stage ({message})")
    if args.tree_stage is not None:
        if args.run is None:
            raise CliError("--tree-stage forks stored states: give the stored run(s) with --run")
        if args.policy == "router":
            raise CliError("the reflect_refine stage trains the stop policy, not the router")
        if args.starts < 1 or not 0.0 <= args.perfect_share <= 1.0:
            raise CliError("--starts must be at least 1 and --perfect-share in [0, 1]")
        args.policy = "stop"
    if args.init is not None and not args.init.is_dir():
        raise CliError(f"--init {args.init}: no such policy directory")
    args.policy = args.policy or "router"
    if args.max_staleness is not None:
        if args.world is None or args.policy != "router" or args.init is not None:
            raise CliError(
                "--max-staleness: in this process, asynchronous GRPO trains a fresh router in "
                "ShapeWorld (--world shapeworld --policy router, without --init); any policy "
                "with rollout workers: --config FILE --max-staleness K --workers"
            )
        if args.max_staleness < 0 or args.reward_weights[2] > 0:
            raise CliError("--max-staleness must be >= 0 (and a3 of --reward-weights 0)")
    if args.workers:
        raise CliError(
            "--workers: rollout workers sample a loop over a backends file: give --config FILE "
            "--max-staleness K (ShapeWorld's: examples/configs/shapeworld.toml)"
        )
    kind = "mode" if args.policy == "router" else "stop"
    board = _tensorboard(args)
    store = open_store(args, must_exist=args.world is None)
    from training.versions import VersionTaken

    try:
        return _train(args, store, kind, board)
    except (VersionTaken, FileExistsError) as exc:  # another process saved the same version
        raise CliError(str(exc)) from None
    finally:
        if board is not None:
            board.close()


def _check_device(device: str) -> None:
    """``--device`` names a device torch has here (one line otherwise, before any model)."""
    from atelier.cli.errors import CliError

    if device == "auto":
        return
    import torch

    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise CliError(f"--device {device}: not a device (cpu, cuda, cuda:1, auto)") from None
    if wanted.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (wanted.index or 0) >= count:
            seen = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise CliError(f"--device {device}: torch sees {seen} here (use --device cpu)")


def _tensorboard(args: argparse.Namespace) -> TensorBoardLog | None:
    from training.distributed import is_main

    if args.tensorboard is None or not is_main():  # rank 0 alone writes (torchrun)
        return None
    from atelier.cli.errors import CliError
    from training.tensorboard import TensorBoardLog, TensorBoardUnavailable

    try:
        return TensorBoardLog(args.tensorboard)
    except TensorBoardUnavailable as exc:
        raise CliError(str(exc)) from None


def _train(
    args: argparse.Namespace, store: TrajectoryStore, kind: str, board: TensorBoardLog | None
) -> int:
    from atelier.cli.common import resolve_run
    from atelier.cli.errors import CliError

    if args.tree_stage is not None:
        return _train_tree(args, store, board)
    from training.decisions.trainer import GRPOTrainer
    from training.versions import save_version

    if args.run:
        from training.decisions.groups import read_groups
        from training.decisions.rewards import FORMAT, OUTCOME, TRAINED, store_member_rewards
        from training.distributed import DataParallel
        from training.rewards.record import trained_reward_rows
        from training.rewards.sources import describe_source

        parallel = DataParallel.current()  # torchrun: rank 0 stores, every rank reads

        runs = [resolve_run(store, ref).id for ref in args.run]
        source, judge = run_reward_source(args, store, runs)
        outcome = OUTCOME if source is None else source.name
        trainer = GRPOTrainer(_reserved_policy(args, store, 1), _config(args, outcome))
        # R_s and R_o (a source's) stored before the groups read their rewards
        analyzer = run_analyzer(store, runs, judge) if args.reward_weights[2] > 0 else None
        with parallel.together():
            if parallel.is_main and (analyzer is not None or source is not None):
                asyncio.run(_score_runs(store, runs, source, analyzer))
        groups = read_groups(store, runs, kind)
        if not groups:
            raise CliError(f"no {kind} decision groups of 2 or more in {', '.join(args.run)}")
        with parallel.together():
            if parallel.is_main:  # R_o, R_f: stored before use
                store_member_rewards(store, groups, (outcome, FORMAT))
        result = trainer.train(groups)
        if not result.history:
            raise CliError(
                f"no {kind} group carried a learning signal (the rewards within every group "
                "are equal): nothing was trained or saved"
            )
        rows = trained_reward_rows(
            result, trainer.name, {"runs": runs}, names=TRAINED, source="training.decisions.trainer"
        )
        if board is not None:
            board.scalars(0, result.metrics, "train")
        path = args.out / f"{trainer.name}-{trainer.version}"
        metadata = {"penalty": args.penalty, "reward_source": describe_source(source)}
        save_version(trainer, store, path, {**result.metrics, **metadata}, rewards=rows)
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(result.metrics.items()))
        print(f"trained {trainer.name}@{trainer.version} on {len(groups)} groups: {metrics}")
        print(f"saved {path}")
        return 0

    from agent_graph.runner import make_group_tasks
    from nodes.backends.shapeworld import fixed_prompt_set
    from nodes.state import Budget
    from policies.simple import UniformModePolicy, UniformStopPolicy
    from training.decisions.loop import grpo_iterations

    batches = []
    for iteration in range(args.iterations):
        items = fixed_prompt_set(args.per_category, seed=args.seed + iteration)
        batches.append(
            make_group_tasks(
                [i.text for i in items],
                args.group_size,
                seed=args.seed + iteration,
                categories=[i.category for i in items],
            )
        )
    if args.max_staleness is not None:
        return _train_async(args, store, batches)
    explore = UniformModePolicy() if kind == "mode" else UniformStopPolicy()
    trainer = GRPOTrainer(_reserved_policy(args, store, args.iterations), _config(args))

    def logged(index: int, iteration: Any) -> None:
        if board is None:
            return
        score, accuracy, images, _ = _run_table(store, iteration.run_id)
        board.scalars(index, iteration.metrics, "train")
        rollout = {"mean_V": score, "accuracy": accuracy, "mean_images": images}
        rollout.update(_mode_shares(store, iteration.run_id))
        board.scalars(index, rollout, "rollout")

    freeze_startup_heap()
    policy, log = asyncio.run(
        grpo_iterations(
            store,
            trainer,
            batches,
            kind=kind,
            first_behaviour=explore,
            budget=Budget(max_rounds=args.max_rounds),
            save_dir=args.out,
            on_iteration=logged,
            analyzer=_shapeworld_analyzer() if args.reward_weights[2] > 0 else None,
        )
    )
    print("| iteration | behaviour | mean V | accuracy | images | mode mix | trained |")
    print("|---|---|---|---|---|---|---|")
    for index, iteration in enumerate(log):
        score, accuracy, images, mix = _run_table(store, iteration.run_id)
        print(
            f"| {index} | {iteration.behaviour} | {score:.3f} | {accuracy:.2f} | {images:.2f} "
            f"| {mix} | {iteration.trained} |"
        )
    from atelier.cli.curves import print_iterations

    print_iterations(store, [(it.run_id, it.trained, it.metrics) for it in log])
    _say_final(policy, args.out)
    return 0


def _train_async(args: argparse.Namespace, store: TrajectoryStore, batches: list) -> int:
    """``--max-staleness K``: the router's asynchronous loop, one batch per trainer step."""
    from nodes.state import Budget
    from training.decisions.async_loop import AsyncConfig, async_grpo
    from training.decisions.trainer import GRPOTrainer

    trainer = GRPOTrainer(_reserved_policy(args, store, args.iterations), _config(args))
    config = AsyncConfig(
        max_staleness=args.max_staleness,
        groups_per_step=len({t.group_id for t in batches[0]}),
        iterations=args.iterations,
        name=f"async-{trainer.name}-{trainer.version}",  # its own runs only: versions are free
    )
    freeze_startup_heap()
    policy, log = asyncio.run(
        async_grpo(
            store,
            trainer,
            batches,
            args.out,
            config,
            group_size=args.group_size,
            budget=Budget(max_rounds=args.max_rounds),
        )
    )
    print("| iteration | trained from | staleness: groups | skipped | wall s | trained |")
    print("|---|---|---|---|---|---|")
    for it in log:
        stale = " ".join(f"{k}: {n}" for k, n in it.staleness.items())
        print(
            f"| {it.index} | {it.start} | {stale} | {len(it.skipped)} | {it.wall_s:.2f} "
            f"| {it.trained} |"
        )
    _say_final(policy, args.out)
    return 0


def _shapeworld_analyzer() -> Any:
    from nodes.backends.shapeworld.analyzer import ShapeWorldAnalyzer

    return ShapeWorldAnalyzer()


def _train_tree(
    args: argparse.Namespace, store: TrajectoryStore, board: TensorBoardLog | None = None
) -> int:
    from atelier.cli.common import resolve_run
    from atelier.cli.errors import CliError
    from nodes.backends.config import ConfigError
    from policies.deployed import VersionError
    from training.decisions.trainer import GRPOTrainer
    from training.tree import parent_backends, stage_config, stage_start_states, tree_iterations

    runs = [resolve_run(store, ref).id for ref in args.run]
    try:  # the forks run on the runs' own backends: one kind, rebuildable from their config
        parent_backends(store, runs)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not stage_start_states(store, runs, args.tree_stage):
        raise CliError(f"no {args.tree_stage} start states in {', '.join(args.run)}")
    policy = _reserved_policy(args, store, args.iterations)
    trainer = GRPOTrainer(policy, stage_config(_config(args), args.tree_stage))
    freeze_startup_heap()
    try:
        policy, log = asyncio.run(
            tree_iterations(
                store,
                trainer,
                runs,
                stage=args.tree_stage,
                iterations=args.iterations,
                starts=args.starts,
                group_size=args.group_size,
                perfect_share=args.perfect_share,
                weighting=args.start_weighting,
                seed=args.seed,
                save_dir=args.out,
            )
        )
    except (ConfigError, VersionError) as exc:  # the backends file or its adapters changed
        raise CliError(str(exc)) from None
    if board is not None:
        for index, it in enumerate(log):
            board.scalars(index, {**it.metrics, "starts": it.starts}, "tree")
    print(
        "| iteration | behaviour | fork run | starts (perfect) | groups used | mean C | trained |"
    )
    print("|---|---|---|---|---|---|---|")
    for index, it in enumerate(log):
        print(
            f"| {index} | {it.behaviour} | {it.run_id[:8]} | {it.starts} ({it.perfect_starts}) "
            f"| {it.metrics.get('groups_used', 0):.0f} | {it.metrics['reward_mean']:.3f} "
            f"| {it.trained} |"
        )
    from atelier.cli.curves import print_iterations

    print_iterations(store, [(it.run_id, it.trained, it.metrics) for it in log])
    _say_final(policy, args.out)
    return 0


def _say_final(policy: Any, out: Path) -> None:
    """Where the last version is — or that no iteration made one (no group carried a signal)."""
    path = out / f"{policy.name}-{policy.version}"
    where = f"saved as {path}" if path.is_dir() else "not trained: no group carried a signal"
    print(f"final policy {policy.name}@{policy.version} {where}", file=sys.stderr)
