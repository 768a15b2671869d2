"""``atelier train --policy draw|refine``: Flow-GRPO on a diffusion LoRA, from recorded runs.

The runs must have been recorded with a traced image backend (an ``inprocess-image`` backend
with ``traced = true``, or an ``omni`` one against ``atelier serve image`` with ``traced =
true``), so that every draw and refine step stored its denoising transitions. The command

1. computes and stores R3's stage rewards of the runs (``training.text.rewards
   .store_text_rewards``, which every text policy's training stores too): ``reason_image`` on
   the first draw after the blueprint (V of the image it made, against the prompt) and
   ``refinement`` on each refine that carried out a reflection's edit (C_j = V − V̂, or
   1[stop phrase] on a perfect image); storing again adds no row;
2. reads the node's image groups back (``training.images.groups.read_groups``: a step's own
   reward wins over the trajectory's);
3. trains the LoRA with ``FlowGRPOTrainer`` on the pipeline at ``--model`` (from ``--init``
   when given), saves it as a new registered version and stores what each member was trained
   with (``flow_reward``, ``flow_advantage`` on its step).

argparse only at import; torch and diffusers load when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.store import TrajectoryStore
    from training.images.groups import ImageGroup
    from training.result import TrainResult
    from training.tensorboard import TensorBoardLog

IMAGE_POLICIES = ("draw", "refine")
STAGE_REWARDS = {"draw": "reason_image", "refine": "refinement"}
"""The stored reward each image policy trains on (R3: V of the first draw, C_j of a refine);
the names ``training.text.rewards`` stores them under."""
ROLES = {"draw": "generator", "refine": "editor"}
"""The backends-file role whose images a node's steps record."""
TRAINED_PREFIX = "flow_"
"""Prefix of the rows saying what each member was trained with (``flow_reward``, ...)."""
SOURCE = "training.images.trainer"
FLOW_PIPELINES = ("StableDiffusion3", "Flux")
"""Pipeline classes (``model_index.json``'s ``_class_name`` prefixes) Flow-GRPO samples, as
``nodes.backends.engines.flow_image.flow_model`` takes them (which checks again on load)."""


@dataclass(frozen=True)
class FlowOption:
    field: str
    """The ``FlowGRPOConfig`` field."""
    flag: str
    kind: type
    default: Any
    """``FlowGRPOConfig``'s default (a test keeps the two equal: the config imports torch)."""
    bound: str
    """``>=1`` (an integer), ``>=0`` or ``>0`` (a finite float), or ``choice``."""
    help: str


FLOW_OPTIONS = (
    FlowOption("r", "--flow-r", int, 32, ">=1", "LoRA rank"),
    FlowOption("alpha", "--flow-alpha", int, 64, ">=1", "LoRA alpha"),
    FlowOption("lr", "--flow-lr", float, 3e-4, ">=0", "AdamW learning rate"),
    FlowOption(
        "beta",
        "--flow-beta",
        float,
        0.04,
        ">=0",
        "weight of the KL to the base model (the LoRA disabled)",
    ),
    FlowOption(
        "clip_range",
        "--flow-clip-range",
        float,
        1e-4,
        ">0",
        "ε of the clipped ratio (log-probs are per-element means: it stays near 1)",
    ),
    FlowOption("adv_clip", "--flow-adv-clip", float, 5.0, ">0", "advantages are clipped to ±this"),
    FlowOption(
        "advantage_scale",
        "--flow-advantage-scale",
        str,
        "group",
        "choice",
        "group (GRPO), batch, or none (Dr. GRPO: no std division)",
    ),
    FlowOption("epochs", "--flow-epochs", int, 1, ">=1", "passes over the transitions"),
    FlowOption("minibatch_size", "--flow-minibatch", int, 8, ">=1", "transitions per step"),
    FlowOption("weight_decay", "--flow-weight-decay", float, 1e-4, ">=0", "AdamW weight decay"),
    FlowOption("max_grad_norm", "--flow-max-grad-norm", float, 1.0, ">0", "gradient norm clipping"),
)
ADVANTAGE_SCALES = ("group", "batch", "none")


def add_flow_options(train: argparse.ArgumentParser) -> None:
    """The image policies' options: one per ``FlowGRPOConfig`` field that matters."""
    group = train.add_argument_group(
        "diffusion policies (--policy draw|refine, with --run and --model)",
        "Flow-GRPO on the LoRA of the image model the runs sampled with (a traced image "
        "backend records the denoising transitions it trains on); --model is the diffusers "
        "pipeline directory, --init a saved diffusion LoRA version, --reward and --name as "
        "for the text policies (default reward: draw reason_image, refine refinement); the "
        "defaults below are Flow-GRPO's (Liu et al. 2025) where it sets them",
    )
    for option in FLOW_OPTIONS:
        keywords: dict[str, Any] = {"dest": f"flow_{option.field}", "default": None}
        if option.bound == "choice":
            keywords["choices"] = ADVANTAGE_SCALES
        else:
            keywords["type"] = option.kind
            keywords["metavar"] = "N" if option.kind is int else "X"
        help_text = f"{option.help} (default: {option.default})"
        group.add_argument(option.flag, help=help_text, **keywords)


def flow_values(args: argparse.Namespace) -> dict[str, Any]:
    """The ``FlowGRPOConfig`` fields given on the command line; a bad value is one line."""
    from atelier.cli.errors import CliError

    given: dict[str, Any] = {}
    for option in FLOW_OPTIONS:
        value = getattr(args, f"flow_{option.field}", None)
        if value is None:
            continue
        if _out_of_bounds(option.bound, value):
            needs = "an integer >= 1" if option.bound == ">=1" else f"finite and {option.bound}"
            raise CliError(f"{option.flag} must be {needs}, not {value}")
        given[option.field] = value
    return given


def _out_of_bounds(bound: str, value: Any) -> bool:
    if bound == ">=1":
        return value < 1
    if bound == ">=0":
        return not math.isfinite(value) or value < 0
    if bound == ">0":
        return not math.isfinite(value) or value <= 0
    return False  # a choice: argparse checked it


def refuse_flow_options(args: argparse.Namespace) -> None:
    """--flow-* train a diffusion policy: refuse them for any other policy."""
    from atelier.cli.errors import CliError

    given = [o.flag for o in FLOW_OPTIONS if getattr(args, f"flow_{o.field}", None) is not None]
    if given and args.policy not in IMAGE_POLICIES:
        raise CliError(f"{', '.join(given)}: the Flow-GRPO options train --policy draw or refine")


def check_image_args(args: argparse.Namespace) -> None:
    """Refuse what does not apply to an image policy, before the store or a model opens."""
    from atelier.cli.errors import CliError

    policy = args.policy
    if args.run is None:
        raise CliError(
            f"--policy {policy} trains from recorded runs: give them with --run (record them "
            f"with `atelier rollout --config BACKENDS.toml`, the {ROLES[policy]} role on a traced "
            "image backend)"
        )
    if args.tree_stage is not None:
        raise CliError(f"--tree-stage trains the stop policy, not --policy {policy}")
    check_flow_args(args)


def check_flow_args(args: argparse.Namespace) -> None:
    """What any Flow-GRPO training of ``--policy draw|refine`` needs, from recorded runs or in
    the on-policy loop: no text-policy or reward-source option, the packages, a flow-matching
    ``--model``, a readable ``--init``, valid ``--flow-*`` values."""
    from importlib.util import find_spec

    from atelier.cli.errors import CliError

    policy = args.policy
    text_only = [name for name, value in vars(args).items() if name.startswith("lora_") and value]
    text_only = [
        f"--{n.removeprefix('lora_').replace('_', '-')}" for n in text_only if n != "lora_name"
    ]
    if args.sft:
        text_only.insert(0, "--sft")
    if text_only:
        raise CliError(
            f"{', '.join(text_only)}: text-policy options; --policy {policy} takes the "
            "--flow-* options"
        )
    sourced = [args.reward_source, args.gvu_instruction, args.judge_top_logprobs]
    if any(value is not None for value in sourced) and (
        policy != "draw" or args.run is None or args.reward is not None
    ):
        raise CliError(
            f"the reward source options score the final images of recorded runs: they apply "
            f"to --policy draw with --run and without --reward (--policy {policy} trains on "
            f"R3's stage reward {STAGE_REWARDS[policy]}, or --reward NAME)"
        )
    missing = [name for name in ("torch", "diffusers", "peft") if find_spec(name) is None]
    if missing:
        raise CliError(f"--policy {policy} needs {', '.join(missing)}: pip install -e '.[models]'")
    _check_model(args.model, policy)
    if args.init is not None:
        init_label(args.init)
    flow_values(args)


def _check_model(model: Path | None, policy: str) -> None:
    from atelier.cli.errors import CliError

    if model is None:
        raise CliError(
            f"--policy {policy} needs --model, the diffusers pipeline directory the runs "
            "sampled with"
        )
    if not model.is_dir():
        raise CliError(f"--model {model}: no such model directory")
    index = model / "model_index.json"
    try:
        family = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        raise CliError(
            f"--model {model} is not a diffusers pipeline directory (no readable model_index.json)"
        ) from None
    if not family.startswith(FLOW_PIPELINES):
        raise CliError(
            f"--model {model} is a {family or 'pipeline of no class'}, not a flow-matching "
            "pipeline (Flow-GRPO trains StableDiffusion3 and Flux pipelines)"
        )


def init_label(init: Path) -> tuple[str, str]:
    """(name, version) of a saved diffusion LoRA version, read from its files (no torch)."""
    from atelier.cli.errors import CliError
    from policies.diffusion_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, POLICY_FILE

    def refuse(why: str) -> CliError:
        return CliError(f"--init {init} is not a saved diffusion LoRA ({why})")

    if not init.is_dir():
        raise refuse("no such directory")
    for needed in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, POLICY_FILE):
        if not (init / needed).is_file():
            raise refuse(f"no {needed}")
    try:
        meta = json.loads((init / POLICY_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise refuse(f"{POLICY_FILE}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise refuse(f"{POLICY_FILE} says format {found!r}, not {FORMAT!r}")
    return str(meta.get("name", init.name)), str(meta.get("version", "0"))


def train_image(
    args: argparse.Namespace, store: TrajectoryStore, board: TensorBoardLog | None
) -> int:
    from atelier.cli.common import resolve_run

    runs = [resolve_run(store, ref).id for ref in args.run]
    name = args.lora_name or args.policy
    version = _version(args, store, name)
    reward = args.reward or STAGE_REWARDS[args.policy]
    source = _final_image_source(args, store, runs)
    if source is not None:  # R_o of the final image (GvU, the VLM judge), stored first
        reward = source.name
    elif reward in STAGE_REWARDS.values():  # computed and stored before the groups read it
        _store_stage_rewards(args, store, runs)
    groups = _groups(args, store, runs, reward)
    config = _config(args)
    trained = _member_rewards(groups, config)
    sampled_by = sorted(
        {t.lora or "base" for g in groups for m in g.members for t in m.transitions}
    )
    trainer = _trainer(args, groups, config, name, version)
    _note_off_policy(trainer, sampled_by, args.init is not None)
    print(f"training {trainer.name}@{trainer.version} on {len(groups)} groups", file=sys.stderr)
    result = trainer.train(groups)
    _log_steps(result, board)
    path = args.out / f"{trainer.name}-{trainer.version}"
    describe = {"reward": reward, "policy_node": args.policy, "sampled_by": sampled_by}
    if source is not None:
        from training.rewards.sources import describe_source

        describe["reward_source"] = describe_source(source)
    metadata = {**result.metrics, "runs": runs, **describe, "config": vars(config)}
    from training.versions import save_version

    rows = _trained_rows(result, trainer.name, trained, runs)
    save_version(trainer, store, path, metadata, rewards=rows)
    _print_summary(result, f"{trainer.name}@{trainer.version}", reward)
    print(f"saved {path}")
    print(
        f"serve it: atelier serve image --model {args.model} --lora "
        f'{trainer.name}@{trainer.version}={path.resolve()} (or lora = "{path.resolve()}" on '
        "a traced inprocess-image backend of a backends file)",
        file=sys.stderr,
    )
    return 0


def _version(args: argparse.Namespace, store: TrajectoryStore, name: str) -> str:
    """The version the LoRA has now: ``--init``'s (its own file says), else a fresh one
    numbered so that the version this command saves is free (as the text policies')."""
    from atelier.cli.errors import CliError
    from policies.weights import next_version
    from training.versions import taken_versions

    taken = taken_versions(store, name, args.out)
    if args.init is None:
        version = "0"
        while next_version(version) in taken:
            version = next_version(version)
        return version
    init_name, version = init_label(args.init)
    if init_name != name:
        raise CliError(
            f"--init {args.init} is {init_name}@{version}, not a version of {name!r} (give "
            f"--name {init_name} to continue it)"
        )
    if next_version(version) in taken:
        raise CliError(
            f"{name}@{next_version(version)}, which training from {name}@{version} would save, "
            f"already exists in {taken[next_version(version)]}; start from the newest version "
            "or pass another --out and --db"
        )
    return version


def _store_stage_rewards(args: argparse.Namespace, store: TrajectoryStore, runs: list[str]) -> None:
    """R3's stage rewards of the runs, stored as the text policies' training stores them (the
    same rows, so neither stores a row the other did): V of the images from the store, or the
    runs' judge where the store holds none."""
    from atelier.cli.train import run_analyzer, run_judge

    judge = run_judge(store, runs)  # built once: a backends file's judge holds clients
    asyncio.run(store_stage_rewards(args, store, runs, judge, run_analyzer(store, runs, judge)))


async def store_stage_rewards(
    args: argparse.Namespace, store: TrajectoryStore, runs: list[str], judge: Any, analyzer: Any
) -> None:
    """:func:`_store_stage_rewards` with the runs' judge and analyzer given (the on-policy loop
    builds them once), in the caller's event loop."""
    from atelier.cli.errors import CliError
    from training.text.rewards import store_text_rewards

    penalty = args.penalty != "none"
    try:
        await store_text_rewards(
            store,
            runs,
            analyzer,
            judge=judge,
            weights=args.reward_weights,
            complexity_eps=0.05 if penalty else None,
            complexity_form=args.penalty if penalty else "scale",
            complexity_cost=args.image_cost,
        )
    except ValueError as exc:  # a V neither stored nor computable
        raise CliError(str(exc)) from None


def _final_image_source(args: argparse.Namespace, store: TrajectoryStore, runs: list[str]) -> Any:
    """With ``--reward-source judge|gvu`` (``--policy draw``): the source, after every run's
    final images were scored with it and stored (``training.rewards.sources``; what was scored
    the same way before is kept). A draw member then gets its trajectory's value: the draw's
    own image in direct mode, the refined final image otherwise. None: the stage reward."""
    if args.reward_source is None:
        return None
    from atelier.cli.train import _score_runs, run_reward_source

    source, _ = run_reward_source(args, store, runs)
    if source is not None:
        asyncio.run(_score_runs(store, runs, source, None))
    return source


def _groups(
    args: argparse.Namespace, store: TrajectoryStore, runs: list[str], reward: str
) -> list[ImageGroup]:
    """The node's image groups, each with a learning signal; else one line saying why not."""
    from atelier.cli.errors import CliError
    from training.images.groups import read_groups

    node, named = args.policy, ", ".join(args.run)
    groups = read_groups(store, runs, reward=reward, node=node)
    if not groups:
        if not _has_transitions(store, runs, node):
            raise CliError(
                f"{named}: no {node} step recorded denoising transitions: record runs with a "
                f"traced image backend: the {ROLES[node]} role on an inprocess-image backend "
                "with traced = true (a flow model, e.g. SD3), or on an omni backend with traced "
                "= true against `atelier serve image`"
                + (" (refine steps: --mode reflect)" if node == "refine" else "")
            )
        raise CliError(
            f"no {node} groups of 2 or more succeeded members with transitions and a stored "
            f"{reward} reward in {named}: record -G 2 or more samples per prompt"
        )
    if all(len({m.reward for m in g.members}) == 1 for g in groups):
        raise CliError(
            f"every {node} group in {named} has equal {reward} rewards: no learning signal "
            "(record more samples per prompt, or other prompts)"
        )
    return groups


def _has_transitions(store: TrajectoryStore, runs: list[str], node: str) -> bool:
    """Whether any ``node`` step of the runs stored transitions (read only to explain an empty
    result: which of the two reasons it is)."""
    from storage.diffusion import load_transitions
    from training.reading import batches

    for run_id in runs:
        ids = [t.id for t in store.trajectories(run=run_id, limit=None)]
        for batch in batches(ids):
            steps = [
                (tid, step.seq)
                for tid, found in store.steps_many(batch).items()
                for step in found
                if step.node == node
            ]
            if steps and load_transitions(store.db, steps):
                return True
    return False


def _config(args: argparse.Namespace) -> Any:
    from training.images.trainer import FlowGRPOConfig

    return FlowGRPOConfig(**flow_values(args), seed=args.seed)


def _trainer(
    args: argparse.Namespace, groups: list[ImageGroup], config: Any, name: str, version: str
) -> Any:
    """The pipeline at ``--model`` with a trainable LoRA (fresh, or ``--init``'s)."""
    models = {t.model for g in groups for m in g.members for t in m.transitions}
    # The name the transitions recorded, so the version's base_model says what sampled them.
    model = models.pop() if len(models) == 1 else str(args.model)
    return flow_trainer(args, config, model, name, version, args.init)


def flow_trainer(
    args: argparse.Namespace,
    config: Any,
    model: str,
    name: str,
    version: str | None,
    init: str | Path | None,
    init_what: str = "--init",
) -> Any:
    """A ``FlowGRPOTrainer`` on the pipeline at ``--model`` (``model``: the name its
    transitions record), with a fresh LoRA or the one saved at ``init`` (named ``init_what``
    in a message); one line on failure."""
    from atelier.cli.errors import CliError
    from nodes.backends.engines.flow_image import load_pipeline
    from policies.diffusion_lora import AdapterError
    from training.images.trainer import FlowGRPOTrainer

    try:  # on the CPU, as the text policies: the trainer keeps the stored log-probs there
        pipe = load_pipeline(args.model, device=args.device)
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(f"cannot load --model {args.model}: {_one_line(exc)}") from None
    try:
        return FlowGRPOTrainer(
            pipe, config, model=model, name=name, version=version, init_lora=init
        )
    except AdapterError as exc:
        raise CliError(f"{init_what} {init}: {_one_line(exc)}") from None
    except ValueError as exc:  # flow_model: not a pipeline the sampler takes
        raise CliError(f"--model {args.model}: {_one_line(exc)}") from None


def _note_off_policy(trainer: Any, sampled_by: list[str], loaded: bool) -> None:
    """Flow-GRPO's ratio is 1 at the first step only when the runs were sampled by the policy
    being trained: say so when they were not (it trains on, off-policy)."""
    start = f"{trainer.name}@{trainer.version}"
    same = {start} if loaded else {"base", start}
    if not set(sampled_by) <= same:
        print(
            f"atelier: note: the runs were sampled by {', '.join(sampled_by)}, not {start}: "
            "off-policy (first_max_abs_log_ratio says how far)",
            file=sys.stderr,
        )


def _member_rewards(groups: list[ImageGroup], config: Any) -> list[dict[str, Any]]:
    """What each member is trained with — its reward and advantage, computed as
    ``FlowGRPOTrainer.train`` does (a zero-variance group's: advantage 0, not trained on) — as
    layers of ``{trajectory id: (group id, values, step seq)}`` with one member per trajectory
    each (a trajectory's refines over several rounds are members of one group)."""
    import torch

    from training.flow_grpo import flow_advantages

    layers: list[dict[str, Any]] = []
    for group in groups:
        rewards = torch.tensor([m.reward for m in group.members], dtype=torch.float32)
        advantages, zero = flow_advantages(
            rewards, scale=config.advantage_scale, clip=config.adv_clip
        )
        depth: Counter[str] = Counter()
        for member, advantage in zip(group.members, advantages.tolist(), strict=True):
            values = {"reward": member.reward, "advantage": 0.0 if bool(zero) else advantage}
            index = depth[member.trajectory_id]
            depth[member.trajectory_id] += 1
            while len(layers) <= index:
                layers.append({})
            layers[index][member.trajectory_id] = (group.group_id, values, member.step_seq)
    return layers


def _trained_rows(
    result: TrainResult,
    policy: str,
    layers: list[dict[str, Any]],
    runs: list[str],
) -> list[Any]:
    """What each member was trained with, as rows ``save_version`` stores with the version
    (one transaction: a killed save leaves both or neither)."""
    from training.result import TrainResult
    from training.rewards.record import trained_reward_rows

    rows: list[Any] = []
    for layer in layers:
        members = {tid: (group, values) for tid, (group, values, _) in layer.items()}
        rows += trained_reward_rows(
            TrainResult(result.version, member_rewards=members),
            policy,
            {"runs": runs},
            source=SOURCE,
            prefix=TRAINED_PREFIX,
            steps={tid: seq for tid, (_, _, seq) in layer.items()},
        )
    return rows


STEP_KEYS = (
    ("loss", "loss"),
    ("kl", "kl"),
    ("ratio", "ratio_mean"),
    ("clip", "clip_fraction"),
    ("grad", "grad_norm"),
)


def _log_steps(result: TrainResult, board: TensorBoardLog | None) -> None:
    """One metrics line per optimizer step (stderr), and the steps' scalars in TensorBoard."""
    total = len(result.history)
    for index, row in enumerate(result.history, start=1):
        shown = " ".join(f"{label} {row[key]:.4g}" for label, key in STEP_KEYS if key in row)
        print(f"step {index}/{total}: {shown}", file=sys.stderr)
        if board is not None:
            board.scalars(index, row, "train")


def _print_summary(result: TrainResult, version: str, reward: str) -> None:
    """The final table: what the call did, one metric per row."""
    print(f"| {version} | flow-grpo on {reward} |")
    print("|---|---|")
    for key, value in sorted(result.metrics.items()):
        print(f"| {key} | {value:.4g} |")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__
