"""A served tiny LM learns ShapeWorld's decomposer role: LoRA SFT on the rule-based role's
recorded outputs, then GRPO from graph runs with stored stage-wise rewards.

Everything is the product's own path, on CPU, offline:

1. **Base model.** A random-weight Qwen2 (hidden 128, 4 layers, ~0.7M parameters) whose BPE
   tokenizer is trained on ShapeWorld's language (``tiny_models.build_role_lm``): it knows the
   words, not the role.
2. **Teacher data.** The graph runs in decompose mode on ShapeWorld, its decomposer the
   rule-based one with ``decomposer_merge_rate`` 0.5 (half its plans draw the first two groups
   in one step), every step recorded in a SQLite store.
3. **SFT** (``training.text.sft``): the recorded decompositions of succeeded, correct
   trajectories are the targets (SAIR's selective masking: nothing else is), encoded with the
   student's tokenizer (the teacher is not a model, so it stored text, not ids); one LoRA
   (r 64) saved as version ``decompose@1`` and registered.
4. **Serving.** ``atelier serve lm --model BASE --lora decompose=ADAPTER`` on loopback; the graph
   now runs with that server as its decomposer (``examples``-style backends file: the other
   roles stay ShapeWorld), sampling G = 8 plans per prompt at temperature 1 with log-probs.
5. **GRPO iterations.** Each: a recorded rollout of the training prompts → the run's rewards
   computed and stored (``store_text_rewards``: R_o from the checker, the analyzer's R_s,
   SAIR's composite and complexity penalty) → the decompose node's groups read back from the
   store (stored prompt ids, completion ids and log-probs: the ratio is 1 before the first
   update) → ``LoRATrainer.train`` (started from ``decompose@1`` with its own optimizer, as
   ``atelier train --init`` does; μ = 4 full-batch steps: see :data:`GRPO_LR` for why) → a new
   registered version → loaded into the server (``/v1/load_lora_adapter``, in place) before
   the next rollout.
6. **Evaluation** on held-out prompts (another prompt seed), several sampling seeds each: the
   rule-based decomposer (always one group per step), the SFT-only adapter, the SFT + GRPO
   adapter. Role success (a correct final image through a well-formed decomposition: the
   decomposer's own success), accuracy (the checker's verdict on the final image, also after
   the graph's fallback for a malformed plan), images per prompt and well-formed plans, per
   category; the noise is the standard deviation over evaluation seeds.

Why this role: the rule-based decomposer splits every prompt into one step per group whatever
it costs; the complexity penalty pays for fewer images, and whether drawing two groups at once
is worth its higher error rate depends on the prompt (two plain objects: yes; colour bindings
or counts in relations: less so). A learned decomposer can choose per prompt; a fixed rule
cannot.

    PYTHONPATH=. .venv/bin/python benchmarks/learn_decomposer.py            # ~13 min, 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/learn_decomposer.py --quick    # ~3 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_graph.presets import shapeworld_context
from agent_graph.rollout import rollout
from agent_graph.runner import make_group_tasks
from nodes.backends.shapeworld import ShapeWorldChecker, ShapeWorldConfig, fixed_prompt_set
from nodes.backends.shapeworld.analyzer import ShapeWorldAnalyzer
from nodes.backends.shapeworld.decomposer import decompose
from nodes.backends.shapeworld.grammar import parse_prompt
from nodes.backends.shapeworld.prompts import sample_prompt
from nodes.formats import format_subtasks
from nodes.prompts import DECOMPOSE_SYSTEM
from storage.store import TrajectoryStore

CATEGORIES = ("two_objects", "attribute_binding", "position", "position_count")
MAX_TOKENS = 64
GRPO_LR = 3e-4
"""AdamW's learning rate for GRPO (SFT's is 3e-3). Measured on one iteration's 256 samples
from the SFT version (sum of log-probs of each sample before and after the update): 16 steps
of 16 completions at 1e-4 already lowered the positive-advantage samples (-0.1 nats, the
negative ones -3.1), at 1e-3 by 15 nats (negative ones 29) — every sampled plan pushed down,
the freed mass going to malformed text, the collapse seen at lr >= 1e-3 (with plain SGD too, so
not an Adam artefact: the gradients of small minibatches, dominated by the low-probability
tokens of the negative samples). Four full-batch steps at 3e-4 raised the positive samples
(+0.4) and lowered the negative ones (-5.9); that is the configuration used."""
GRPO_EPOCHS = 4
"""GRPO's μ: passes over each iteration's batch, each clipped against the sampling policy."""
GRPO_MINIBATCH = 256
"""Completions per GRPO step: the whole iteration (32 prompts × G = 8), one step per epoch."""
TOKENS_PER_FORWARD = 4096
"""Micro-batches of a full-batch step (the same gradient; 2.6× faster on this CPU than one
256-row forward pass)."""
BETA = 0.0
"""Weight of the k3 KL to the SFT version. 0 here: with 0.04 (DeepSeekMath's) and lr 1e-3 the
policy still collapsed (the k3 KL averaged 42 per token over the first iteration)."""
DRIFT = 1e-3
"""The alignment check's bound: this small, sharp model's two passes (the server's cached,
left-padded decoding and the trainer's one teacher-forced pass) differ by up to ~1.4e-4 in
float32 from rounding alone, above the 1e-4 default (measured; see training/text/config.py)."""
REWARD_WEIGHTS = (1.0, 1.0, 0.5)
"""SAIR's a1, a2, a3: the checker's outcome, the format reward (the decomposition is valid
JSON steps) and half the analyzer's score of the decomposition (R_s: is every step's
expectation the prompt's next groups, its instruction the right draw or add), a dense signal
for the copying a student gets wrong. R_f matters: a malformed plan makes the decompose node
fall back to one step, the whole prompt, and the reflect loop after it is accurate and cheap in
ShapeWorld, so without R_f a policy that collapsed to malformed text scored better than the SFT
policy (measured: every held-out plan malformed, accuracy 0.87 against 0.75; BENCHMARKS.md)."""


@dataclass
class Settings:
    sft_prompts: int  # per category
    sft_epochs: int
    train_prompts: int  # per category, per GRPO iteration
    iterations: int
    group_size: int
    eval_prompts: int  # per category
    eval_seeds: int


FULL = Settings(600, 4, 8, 24, 8, 144, 5)
QUICK = Settings(400, 4, 2, 2, 4, 8, 2)


def corpus() -> list[str]:
    """What the base model's tokenizer is trained on: ShapeWorld's language (prompts and the
    decomposition format), not the role's input→output mapping."""
    rng = random.Random(12345)
    texts = [DECOMPOSE_SYSTEM]
    for _ in range(200):
        for category in CATEGORIES:
            prompt = sample_prompt(category, rng)
            texts.append(prompt)
            texts.append(format_subtasks(decompose(parse_prompt(prompt), rng.choice((1, 2)))))
    return texts


def tasks_for(per_category: int, group_size: int, seed: int, prompt_seed: int) -> list[Any]:
    items = [
        i for i in fixed_prompt_set(per_category, seed=prompt_seed) if i.category in CATEGORIES
    ]
    return make_group_tasks([i.text for i in items], group_size, seed, [i.category for i in items])


def sft_tasks(per_category: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    prompts = [(sample_prompt(c, rng), c) for _ in range(per_category) for c in CATEGORIES]
    return make_group_tasks([p for p, _ in prompts], 1, seed, [c for _, c in prompts])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backends_file(directory: Path, url: str) -> Path:
    """ShapeWorld for every role but the decomposer, the served adapter ``decompose``."""
    path = directory / "served-decomposer.toml"
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.lm]\nkind = "openai"\nurls = ["{url}"]\nmodel = "decompose"\n'
        "timeout_s = 120\nretries = 1\n\n"
        f"[backends.lm.sampling]\nmax_tokens = {MAX_TOKENS}\ntemperature = 1.0\ntop_p = 1.0\n\n"
        '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "lm"\n'
        'generator = "world"\neditor = "world"\njudge = "world"\n'
    )
    return path


def summarise(results: list[Any]) -> dict[str, tuple[float, ...]]:
    """category (and "all") -> (accuracy, images per prompt, share of well-formed plans, role
    success). Role success: the final image is correct *and* the decomposition was well
    formed — the decomposer's own success. Accuracy alone also counts the trajectories the graph
    rescued from a malformed plan (it falls back to one step, the whole prompt, and the reflect
    loop after it is accurate in ShapeWorld: 0.84-0.89 of them end correct, measured)."""
    by: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for r in results:
        correct = 1.0 if (r.score or 0.0) >= 1.0 else 0.0
        images = len(r.state.images) if r.state is not None else 0
        formed = 1.0 if r.state is not None and r.state.subtasks_well_formed else 0.0
        row = (correct, images, formed, correct * formed)
        by[r.task.category].append(row)
        by["all"].append(row)
    return {
        c: tuple(statistics.fmean(v[k] for v in rows) for k in range(4)) for c, rows in by.items()
    }


class Server:
    """``atelier serve lm`` for the base model with the adapter ``decompose`` loaded."""

    def __init__(self, model: Path, adapter: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        command = [
            sys.executable, "-m", "atelier.cli", "serve", "lm", "--model", str(model),
            "--port", str(self.port), "--lora", f"decompose={adapter}", "--torch-threads", "1",
            "--max-batch", "16", "--max-wait-ms", "10", "--log-level", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the lm server exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the lm server did not start in 120 s")

    async def load(self, path: Path) -> None:
        from nodes.backends.clients.openai_client import OpenAIChatClient

        client = OpenAIChatClient(self.url, model="decompose")
        try:
            await client.load_adapter("decompose", str(path), inplace=True)
        finally:
            await client.aclose()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def evaluate(
    store: TrajectoryStore, settings: Settings, backends: Path | None, name: str
) -> list[dict[str, tuple[float, float]]]:
    """One summary per evaluation seed, on the held-out prompts (prompt seed 99)."""
    out = []
    for seed in range(settings.eval_seeds):
        tasks = tasks_for(settings.eval_prompts, 1, 1000 + seed, prompt_seed=99)
        if backends is None:
            context = shapeworld_context("decompose")
            done = await rollout(store, tasks, context=context, name=f"{name}-eval{seed}")
        else:
            done = await rollout(
                store, tasks, backends_config=backends, mode="decompose", name=f"{name}-eval{seed}"
            )
        out.append(summarise(done.results))
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from nodes.backends.engines.tiny_models import build_role_lm
    from training.rewards import store_trained_rewards
    from training.text.groups import read_node_groups
    from training.text.rewards import node_reward, store_text_rewards
    from training.text.sft import read_sft_examples, train_sft
    from training.text.trainer import LoRAConfig, LoRATrainer
    from training.versions import save_version

    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    if args.iterations is not None:
        settings.iterations = args.iterations
    work = Path(args.out or tempfile.mkdtemp(prefix="learn-decomposer-"))
    work.mkdir(parents=True, exist_ok=True)
    store = TrajectoryStore(f"sqlite:///{work / 'runs.db'}")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 1-2. the base model; the rule-based teacher's recorded runs
    if args.sft_from:  # a previous run's base model and SFT version (for GRPO experiments)
        base, sft_path = Path(args.sft_from) / "base", Path(args.sft_from) / "decompose-1"
    else:
        base, sft_path = (
            build_role_lm(work / "base", corpus(), seed=args.seed),
            work / "decompose-1",
        )
        teacher = shapeworld_context(
            "decompose", config=ShapeWorldConfig(decomposer_merge_rate=0.5)
        )
        recorded = await rollout(
            store, sft_tasks(settings.sft_prompts, args.seed), context=teacher, name="teacher"
        )
        timings["teacher_rollout_s"] = time.perf_counter() - started

        # 3. SFT with selective masking: only the decompositions of correct trajectories
        config = LoRAConfig(
            r=64, alpha=64, lr=3e-3, epochs=2, minibatch_size=16, seed=args.seed,
            max_logprob_drift=DRIFT,
        )  # fmt: skip
        sft_trainer = LoRATrainer(base, config, name="decompose", version="0")
        tokenizer = sft_trainer.engine.tokenizer

        def encode(text: str) -> list[int]:  # what the student would have sampled: text, EOS
            return [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]

        examples = read_sft_examples(
            store, recorded.run_id, nodes=("decompose",), encode_missing=encode
        )
        torch.set_num_threads(2)  # no server runs yet
        sft = train_sft(sft_trainer, examples, epochs=settings.sft_epochs, minibatch_size=32)
        torch.set_num_threads(1)
        save_version(sft_trainer, store, sft_path, sft.metrics)
        timings["sft_s"] = time.perf_counter() - started - timings["teacher_rollout_s"]
        print(
            f"SFT: {len(examples)} examples, loss {sft.metrics['first_loss']:.3f} -> "
            f"{sft.metrics['last_loss']:.3f}, {sft.metrics['steps']:.0f} steps",
            file=sys.stderr,
        )
        del sft_trainer

    # GRPO goes on from the saved SFT version with a trainer and optimizer of its own, as
    # `atelier train --init decompose-1` does (SFT's AdamW moments are not GRPO's).
    grpo = LoRAConfig(
        lr=args.grpo_lr,
        beta=args.beta,
        epochs=args.grpo_epochs,
        minibatch_size=args.grpo_minibatch,
        max_tokens_per_forward=TOKENS_PER_FORWARD,
        seed=args.seed,
        loss_type="sequence_mean",
        max_logprob_drift=DRIFT,
        kl_reference="initial",
    )  # fmt: skip  (the KL, if any, to the SFT version, not to the random base)
    trainer = LoRATrainer(base, grpo, name="decompose", version="1", adapter=sft_path)
    timings["setup_s"] = time.perf_counter() - started

    # 4-5. serve the SFT adapter; GRPO iterations from recorded graph runs
    server = Server(base, sft_path, work / "server.log")
    results: dict[str, Any] = {"settings": settings.__dict__, "iterations": []}
    try:
        backends = backends_file(work, server.url)
        sft_only = await evaluate(store, settings, backends, "sft")
        for iteration in range(settings.iterations):
            t0 = time.perf_counter()
            tasks = tasks_for(
                settings.train_prompts, settings.group_size, 10 * iteration + args.seed,
                prompt_seed=1 + iteration,
            )  # fmt: skip
            run = await rollout(
                store, tasks, backends_config=backends, mode="decompose", name=f"grpo-{iteration}"
            )
            await store_text_rewards(
                store,
                run.run_id,
                ShapeWorldAnalyzer(),
                judge=ShapeWorldChecker(),
                weights=REWARD_WEIGHTS,
                complexity_eps=0.05,
                complexity_form="margin",
            )
            groups = read_node_groups(
                store, run.run_id, node="decompose", reward=node_reward("decompose")
            )
            torch.set_num_threads(2)  # the server is idle while the trainer works
            result = trainer.train(groups)
            torch.set_num_threads(1)
            store_trained_rewards(  # each member's reward and advantage, on its decompose step
                store,
                result,
                trainer.name,
                {"run": run.run_id},
                source="training.text.trainer",
                prefix="lora_",
                steps={m.trajectory_id: m.step_seq for g in groups for m in g.members},
            )
            path = save_version(
                trainer, store, work / f"decompose-{trainer.version}", result.metrics
            )
            await server.load(path)
            summary = summarise(run.results)["all"]
            row = {
                "iteration": iteration,
                "groups": len(groups),
                "reward_mean": result.metrics["reward_mean"],
                "first_ratio_mean": result.metrics["first_ratio_mean"],
                "first_max_abs_log_ratio": result.metrics["first_max_abs_log_ratio"],
                "kl": result.metrics.get("kl", 0.0),
                "rollout_accuracy": summary[0],
                "rollout_images": summary[1],
                "rollout_well_formed": summary[2],
                "rollout_role_success": summary[3],
                "seconds": time.perf_counter() - t0,
            }
            results["iterations"].append(row)
            print(json.dumps(row), file=sys.stderr)
        trained = await evaluate(store, settings, backends, "grpo")
    finally:
        server.close()
    rule = await evaluate(store, settings, None, "rule")
    results["eval"] = {"rule-based": rule, "SFT only": sft_only, "SFT + GRPO": trained}
    timings["total_s"] = time.perf_counter() - started
    results["timings"] = timings
    store.close()
    return results


def table(results: dict[str, Any]) -> str:
    """Role success, accuracy, images per prompt and well-formed plans per category, mean ± std
    over the evaluation seeds."""
    lines = [
        "| decomposer | category | role success | accuracy | images / prompt | well-formed plans |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values: list[float], digits: int) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"

    for name, runs in results["eval"].items():
        for category in (*CATEGORIES, "all"):
            acc, img, formed, role = ([r[category][k] for r in runs] for k in range(4))
            lines.append(
                f"| {name} | {category} | {cell(role, 3)} | {cell(acc, 3)} | {cell(img, 2)} "
                f"| {cell(formed, 2)} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller version (~3 min)")
    parser.add_argument("--iterations", type=int, help="GRPO iterations (default 24; quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--grpo-lr", type=float, default=GRPO_LR, help=f"GRPO's learning rate (default {GRPO_LR})"
    )
    parser.add_argument(
        "--grpo-epochs", type=int, default=GRPO_EPOCHS, help=f"GRPO's μ (default {GRPO_EPOCHS})"
    )
    parser.add_argument(
        "--grpo-minibatch",
        type=int,
        default=GRPO_MINIBATCH,
        help=f"completions per GRPO step (default {GRPO_MINIBATCH})",
    )
    parser.add_argument(
        "--beta", type=float, default=BETA, help=f"KL weight, to the SFT version (default {BETA})"
    )
    parser.add_argument("--out", help="working folder (default: a new temporary one)")
    parser.add_argument(
        "--sft-from", help="a previous run's --out folder: reuse its base model and SFT version"
    )
    parser.add_argument("--json", help="also write the results as JSON here")
    options = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    found = asyncio.run(main(options))
    if options.json:
        Path(options.json).write_text(json.dumps(found, indent=1))
    print(table(found))
    print(f"\n{found['timings']}")
