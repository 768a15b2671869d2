"""``atelier train --policy plan|reflect|decompose``: a text/VLM node policy's LoRA, from runs.

GRPO (default): the runs' rewards are computed and stored first (R3's stage rewards per step,
the analyzer's R_s, SAIR's composite and complexity penalty: ``training.text.rewards``), the
node's GRPO groups are read back from the store (``read_node_groups``: the G completions the
node sampled for one input, with the ids, log-probs and prompt the server saw), the adapter is
trained and saved as a new registered version, and each member's reward and advantage are
stored with it. ``--sft``: supervised fine-tuning on the runs' chosen outputs with SAIR's
selective masking (``training.text.sft``).

Every ``LoRAConfig`` field is an option here, built from the config itself (type, choices,
one-line doc, default), so the two cannot drift apart. argparse only at import (the config
module imports no torch).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.store import TrajectoryStore
    from training.result import TrainResult
    from training.tensorboard import TensorBoardLog

TEXT_POLICIES = ("plan", "reflect", "decompose")
SFT_EPOCHS = 3
"""Passes over the examples with --sft when --epochs is not given (--epochs defaults to GRPO's
μ, which is another quantity)."""

RENAMED = {"r": "lora-r", "alpha": "lora-alpha"}
"""LoRAConfig fields whose option name would be unclear on its own."""
SHARED = ("seed",)
"""LoRAConfig fields set from ``atelier train``'s own option of that name."""


def _option_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """(the value type, extra argparse keywords) of a config field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _option_type(args[0])
    if origin is typing.Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin is tuple:
        return (lambda text: tuple(p.strip() for p in text.split(",") if p.strip())), {
            "metavar": "A,B,..."
        }
    if annotation is bool:
        return bool, {"action": argparse.BooleanOptionalAction}
    return annotation, {}


def add_lora_options(train: argparse.ArgumentParser) -> None:
    """The text policies' options: the model, SFT, and one option per ``LoRAConfig`` field."""
    from training.text.config import LoRAConfig

    group = train.add_argument_group(
        "text and vision-language policies (--policy plan|reflect|decompose, with --run)",
        "train the node's LoRA adapter on the runs' recorded generations",
    )
    group.add_argument("--model", type=Path, help="the base model directory the server ran")
    group.add_argument(
        "--sft",
        action="store_true",
        help="supervised fine-tuning on the runs' chosen outputs (SAIR's selective masking) "
        "instead of GRPO",
    )
    group.add_argument(
        "--reward",
        help="the stored reward to train on (default: plan reason_text, reflect reflection, "
        "decompose sair_penalised, or sair with --penalty none)",
    )
    group.add_argument(
        "--name", help="the adapter's policy name (default: the node's name)", dest="lora_name"
    )
    hints = typing.get_type_hints(LoRAConfig)
    for name, field in LoRAConfig.model_fields.items():
        if name in SHARED:
            continue
        kind, extra = _option_type(hints[name])
        doc = re.sub(r":\w+:`([^`]*)`", r"\1", " ".join((field.description or "").split()))
        doc = doc.replace("``", "").rstrip(".")
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(default)
        keywords: dict[str, Any] = {"dest": f"lora_{name}", "default": None, **extra}
        if kind is not bool:
            keywords["type"] = kind
            keywords.setdefault("metavar", {int: "N", float: "X"}.get(kind))
        flag = "--" + RENAMED.get(name, name.replace("_", "-"))
        group.add_argument(flag, help=f"{doc} (default: {default})", **keywords)


def lora_config(args: argparse.Namespace) -> Any:
    """The ``LoRAConfig`` of the given options; a bad value is one ``CliError`` line."""
    from pydantic import ValidationError

    from atelier.cli.errors import CliError
    from training.text.config import LoRAConfig

    given = {
        name: getattr(args, f"lora_{name}")
        for name in LoRAConfig.model_fields
        if name not in SHARED and getattr(args, f"lora_{name}", None) is not None
    }
    try:
        return LoRAConfig(**given, seed=args.seed)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        flag = "--" + RENAMED.get(field, field.replace("_", "-"))
        raise CliError(f"{flag}: {error['msg']} (got {error.get('input')!r})") from None


def check_text_args(args: argparse.Namespace) -> None:
    """Refuse what does not apply to a text policy, before anything is loaded."""
    from atelier.cli.errors import CliError

    if args.run is None:
        raise CliError(
            f"--policy {args.policy} trains from recorded runs: give them with --run "
            "(record them with `atelier rollout --config BACKENDS.toml`, the node's role "
            "served by a model that returns log-probs)"
        )
    if args.tree_stage is not None:
        raise CliError(f"--tree-stage trains the stop policy, not --policy {args.policy}")
    check_model_args(args)


def check_model_args(args: argparse.Namespace) -> None:
    """--model (the base model the servers run), --init (a saved adapter) and the LoRA options,
    checked before the store or a model is opened."""
    from atelier.cli.errors import CliError

    if args.model is None:
        raise CliError(f"--policy {args.policy} needs --model, the base model directory")
    if not args.model.is_dir():
        raise CliError(f"--model {args.model}: no such model directory")
    if args.init is not None and not (args.init / "adapter_config.json").is_file():
        raise CliError(f"--init {args.init} is not a saved adapter (no adapter_config.json)")
    lora_config(args)  # a bad hyperparameter fails here


def _analyzer_and_judge(store: TrajectoryStore, runs: list[str]) -> tuple[Any, Any]:
    """The runs' analyzer (R_s) and judge (V of images the run did not score against the
    prompt), rebuilt from what the runs were recorded with."""
    from atelier.cli.train import run_analyzer, run_judge

    judge = run_judge(store, runs)  # built once: a backends file's judge holds clients
    return run_analyzer(store, runs, judge), judge


def _version(args: argparse.Namespace, store: TrajectoryStore, name: str) -> str:
    """The version the adapter has now: the ``--init`` version's (registered in the store by
    its path), else a fresh one numbered so that the version this command saves is free."""
    from atelier.cli.errors import CliError
    from policies.weights import next_version
    from training.versions import taken_versions

    taken = taken_versions(store, name, args.out)
    if args.init is not None:
        wanted = args.init.resolve()
        for info in store.policy_versions(name=name):
            if info.path and Path(info.path).resolve() == wanted:
                if next_version(info.version) in taken:
                    raise CliError(
                        f"{name}@{next_version(info.version)}, which training from "
                        f"{name}@{info.version} would save, already exists in "
                        f"{taken[next_version(info.version)]}; start from the newest version"
                    )
                return info.version
        raise CliError(f"--init {args.init} is not a version of {name!r} registered in the store")
    version = "0"
    while next_version(version) in taken:
        version = next_version(version)
    return version


def train_text(
    args: argparse.Namespace, store: TrajectoryStore, board: TensorBoardLog | None
) -> int:
    from atelier.cli.common import resolve_run
    from atelier.cli.errors import CliError
    from training.distributed import local_device
    from training.text.trainer import LoRATrainer
    from training.versions import save_version

    config = lora_config(args)
    runs = [resolve_run(store, ref).id for ref in args.run]
    name = args.lora_name or args.policy
    version = _version(args, store, name)
    if not args.sft:  # read (and refuse) before the model loads
        data, describe = _grpo_groups(args, store, runs)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the command prints its own progress
    try:
        trainer = LoRATrainer(
            args.model,
            config,
            name=name,
            version=version,
            adapter=args.init,
            device=local_device(args.device),  # torchrun: each rank its own GPU
        )
    except (OSError, ValueError) as exc:  # not a model directory, a broken adapter
        raise CliError(f"cannot load --model {args.model}: {exc}") from None
    if args.sft:
        data, describe = _sft_data(args, store, runs, trainer)
    with _StepLog(board) as progress:
        try:
            result = _fit(args, trainer, data, progress, store)
        except ValueError as exc:  # the alignment check: not what the server saw
            raise CliError(str(exc)) from None
    rows: list[Any] = []
    if not args.sft:
        if not result.history:
            raise CliError(
                f"no {args.policy} group carried a learning signal (the rewards within every "
                "group are equal): nothing was trained or saved"
            )
        from training.rewards.record import trained_reward_rows

        steps = {m.trajectory_id: m.step_seq for g in data for m in g.members}
        rows = trained_reward_rows(
            result,
            trainer.name,
            {"runs": runs},
            source="training.text.trainer",
            prefix="lora_",
            steps=steps,
        )
    path = args.out / f"{trainer.name}-{trainer.version}"
    metadata = {**result.metrics, "runs": runs, **describe}
    save_version(trainer, store, path, metadata, rewards=rows)  # one transaction
    _print_summary(result, f"{trainer.name}@{trainer.version}", describe)
    print(f"saved {path}")
    print(
        f"serve it: atelier serve lm --model {args.model} --lora {trainer.name}={path.resolve()}",
        file=sys.stderr,
    )
    return 0


def _grpo_groups(
    args: argparse.Namespace, store: TrajectoryStore, runs: list[str]
) -> tuple[list[Any], dict[str, Any]]:
    from atelier.cli.errors import CliError
    from training.distributed import DataParallel
    from training.text.groups import read_node_groups
    from training.text.rewards import node_reward, store_text_rewards

    analyzer, judge = _analyzer_and_judge(store, runs)
    penalty = args.penalty != "none"
    parallel = DataParallel.current()
    with parallel.together():  # torchrun: rank 0 stores the rewards, every rank reads them
        if parallel.is_main:
            asyncio.run(
                store_text_rewards(
                    store,
                    runs,
                    analyzer,
                    judge=judge,
                    weights=args.reward_weights,
                    complexity_eps=0.05 if penalty else None,
                    complexity_form=args.penalty if penalty else "scale",
                    complexity_cost=args.image_cost,
                )
            )
    reward = args.reward or node_reward(args.policy, penalty=penalty)
    try:
        groups = read_node_groups(store, runs, node=args.policy, reward=reward)
    except (KeyError, ValueError) as exc:
        raise CliError(str(exc.args[0]) if exc.args else str(exc)) from None
    if not groups:
        raise CliError(
            f"no {args.policy} groups of 2 or more completions in {', '.join(args.run)}: record "
            f"runs whose {args.policy} role is a served model returning log-probs (temperature "
            "1), with -G 2 or more"
        )
    return groups, {"reward": reward, "policy_node": args.policy}


def _sft_data(
    args: argparse.Namespace, store: TrajectoryStore, runs: list[str], trainer: Any
) -> tuple[list[Any], dict[str, Any]]:
    """The runs' chosen outputs of the node. A rule-based role (ShapeWorld's) stores text and
    no token ids: its text is encoded with the student's tokenizer, then the end-of-turn
    token, as the student would have sampled it (stored ids always win)."""
    from atelier.cli.errors import CliError
    from training.text.sft import read_sft_examples

    tokenizer = trainer.engine.tokenizer

    def encode(text: str) -> list[int]:
        return [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]

    try:
        examples = read_sft_examples(store, runs, nodes=(args.policy,), encode_missing=encode)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not examples:
        raise CliError(
            f"no {args.policy} outputs to imitate in {', '.join(args.run)} (SFT takes the chosen "
            "outputs of succeeded trajectories)"
        )
    return examples, {"algorithm": "sft", "policy_node": args.policy}


def _fit(
    args: argparse.Namespace, trainer: Any, data: list[Any], progress: Any, store: Any
) -> TrainResult:
    if args.sft:
        from training.text.sft import train_sft

        config = trainer.config
        return train_sft(
            trainer,
            data,
            epochs=config.epochs if args.lora_epochs is not None else SFT_EPOCHS,
            minibatch_size=config.minibatch_size,
            seed=config.seed,
            image_store=store,
            on_step=progress.step,
        )
    return trainer.train(data, on_step=progress.step)


class _StepLog:
    """A live progress bar over the optimizer steps and one metrics line per step (stderr),
    and the steps' scalars in TensorBoard when asked."""

    KEYS = (
        ("loss", "loss"),
        ("kl", "kl"),
        ("ratio", "ratio_mean"),
        ("clip_lo", "clip_low"),
        ("clip_hi", "clip_high"),
        ("grad", "grad_norm"),
        ("tok/s", "tokens_per_s"),
    )

    def __init__(self, board: TensorBoardLog | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.board = board
        self.console = Console(stderr=True, soft_wrap=True)  # one line per step, unwrapped
        self.progress = Progress(
            "optimizer steps",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task: Any = None

    def __enter__(self) -> _StepLog:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def step(self, index: int, total: int, metrics: dict[str, float]) -> None:
        if self.task is None:
            self.task = self.progress.add_task("train", total=total)
        self.progress.update(self.task, completed=index, total=total)
        shown = " ".join(
            f"{label} {metrics[key]:.4g}" for label, key in self.KEYS if key in metrics
        )
        self.console.print(f"step {index}/{total}: {shown}", highlight=False)
        if self.board is not None:
            self.board.scalars(index, metrics, "train")


def _print_summary(result: TrainResult, version: str, describe: dict[str, Any]) -> None:
    """The final table: what the call did, one metric per row."""
    print(f"| {version} | {describe.get('algorithm', 'grpo')} |")
    print("|---|---|")
    for key, value in sorted(result.metrics.items()):
        print(f"| {key} | {value:.4g} |")
