"""Data-parallel training (``training.distributed``): two gloo processes on the CPU train on the
same groups as one process — a decision policy (``GRPOTrainer``, three loss types), a LoRA on
the tiny LM (``LoRATrainer``) and a LoRA on the tiny SD3 (``FlowGRPOTrainer``) — and end with
the same parameters and the same step metrics; rank 1 writes no file and no store row; an odd
number of groups (uneven shards, minibatches where one rank has no row) changes nothing; and
``torchrun -m atelier.cli -- train --run ...`` saves what ``atelier train`` saves.

Tolerances: the ranks sum the same per-row gradients as one process, in another order (each
rank's rows first), so parameters differ by float rounding only. Decision policies train in
float64: 1e-9 absolute. The LoRA trains in float32, and each rank's forward pass sees a smaller,
otherwise padded batch than one process's (other matmul blockings): ~1e-7 relative in each
gradient, so each step's loss and gradient norm (of the summed gradient) agree within 1e-5
relative (seen: 1e-6). AdamW divides by the root of the second moment, so an element whose
first moment is near 0 turns that rounding into a visible part of a step: the weights agree
within lr / 20 = 5e-4 absolute after six steps (seen: 1e-4 on one element of 512, 1e-6 typical),
while the B matrices move by more than 1e-2.
"""

from __future__ import annotations

import math
import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from policies.base import StopObservation
from policies.stop import LearnedStopPolicy
from policies.weights import load_policy
from training.decisions.groups import DecisionGroup, DecisionMember, DecisionRecord
from training.decisions.trainer import GRPOConfig, GRPOTrainer
from training.distributed import DataParallel, init_from_env, shutdown

WORLD = 2
LOSS_TYPES = ("token_mean", "sequence_mean", "dr_grpo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, port: int, work: Any, args: tuple[Any, ...]) -> None:
    """One rank: torchrun's environment, the process group, ``work(rank, *args)``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    parallel = init_from_env()
    assert (parallel.rank, parallel.world_size, parallel.active) == (rank, WORLD, True)
    try:
        work(rank, *args)
    finally:
        shutdown()


def _spawn(work: Any, *args: Any) -> None:
    torch.multiprocessing.spawn(_entry, args=(_free_port(), work, args), nprocs=WORLD)


def test_a_single_process_is_rank_0_of_1():
    parallel = DataParallel.current()
    assert (parallel.rank, parallel.world_size, parallel.active, parallel.is_main) == (
        0,
        1,
        False,
        True,
    )
    assert parallel.shard([1, 2, 3]) == [1, 2, 3]
    assert parallel.sum({"a": 1.5}, ("b",)) == {"a": 1.5, "b": 0.0}
    with pytest.raises(ValueError), parallel.together():  # no agreement needed: raised as is
        raise ValueError("x")


def test_shards_cover_every_group_once_and_differ_by_at_most_one():
    items = list(range(7))
    shards = [DataParallel(rank, 3).shard(items) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == items
    assert [len(s) for s in shards] == [3, 2, 2]


# --- decision policies --------------------------------------------------------------------------


def _obs(stop_phrase: bool, turn: int) -> StopObservation:
    text = "<think>ok</think>No further edit needed." if stop_phrase else "<think>x</think>Add."
    return StopObservation("p", "p", text, stop_phrase, True, turn, 4, 1, (0.5,))


def _stop_groups(count: int) -> list[DecisionGroup]:
    """``count`` groups of 4 members with 1-3 stop decisions each (ragged rows)."""
    rng = random.Random(7)
    groups = []
    for g in range(count):
        members = []
        for i in range(4):
            decisions = tuple(
                DecisionRecord(
                    "stop",
                    rng.choice(["stop", "continue"]),
                    math.log(0.5),
                    "stop",
                    "0",
                    j,
                    j,
                    _obs(rng.random() < 0.5, j),
                )
                for j in range(rng.randint(1, 3))
            )
            reward = {"checker": rng.random()}
            members.append(
                DecisionMember(f"t{g}-{i}", i, "succeeded", "reflect", 1, reward, decisions)
            )
        groups.append(DecisionGroup("run", f"g{g}", "p", None, "stop", tuple(members)))
    return groups


def _decision_config(loss_type: str) -> GRPOConfig:
    # 12 rows: minibatches of 5, 5 and 2 (sequence_mean: 11 and 1, a rank with no row)
    size = 11 if loss_type == "sequence_mean" else 5
    return GRPOConfig(
        lr=0.05, epochs=2, minibatch_size=size, beta=0.04, loss_type=loss_type, complexity_eps=None
    )


def _train_decisions(start: Path, loss_type: str) -> tuple[GRPOTrainer, Any]:
    trainer = GRPOTrainer(load_policy(start), _decision_config(loss_type))
    return trainer, trainer.train(_stop_groups(3))


def _decision_worker(rank: int, root: Path) -> None:
    from storage.store import TrajectoryStore
    from training.versions import save_version

    out: dict[str, Any] = {}
    for loss_type in LOSS_TYPES:
        trainer, result = _train_decisions(root / "start", loss_type)
        store = TrajectoryStore(f"sqlite:///{root / f'rank{rank}-{loss_type}.db'}")
        saved = save_version(trainer, store, root / f"rank{rank}-{loss_type}" / "stop-1")
        out[loss_type] = {
            "params": [p.detach().clone() for p in trainer.policy.parameters()],
            "history": result.history,
            "metrics": result.metrics,
            "saved": str(saved),
            "registered": [v.version for v in store.policy_versions()],
        }
    # The collectives themselves: a gradient one rank lacks, one no rank has; a failed block.
    parallel = DataParallel.current()
    given, never = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    if rank == 0:
        given.grad = torch.tensor([1.0, 2.0])
    parallel.all_reduce_gradients([given, never])
    out["grads"] = (given.grad, never.grad)
    try:
        with parallel.together():
            if rank == 1:
                raise ValueError("rank 1 failed")
    except Exception as exc:
        out["raised"] = type(exc).__name__
    torch.save(out, root / f"result-{rank}.pt")


@pytest.mark.slow
def test_two_ranks_train_a_decision_policy_as_one_process(tmp_path: Path):
    torch.manual_seed(0)
    LearnedStopPolicy(hidden=8).save(tmp_path / "start")
    _spawn(_decision_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"result-{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank in ranks:
        assert rank["grads"][0].tolist() == [1.0, 2.0] and rank["grads"][1] is None
    assert [rank["raised"] for rank in ranks] == ["PeerFailed", "ValueError"]
    for loss_type in LOSS_TYPES:
        trainer, single = _train_decisions(tmp_path / "start", loss_type)
        expected = list(trainer.policy.parameters())
        for rank in ranks:
            got = rank[loss_type]
            for p, q in zip(expected, got["params"], strict=True):
                torch.testing.assert_close(q, p.detach(), rtol=0, atol=1e-9)
            assert (
                len(got["history"])
                == len(single.history)
                == 2 * (3 if loss_type != "sequence_mean" else 2)
            )
            for ours, theirs in zip(got["history"], single.history, strict=True):
                assert ours.keys() == theirs.keys()
                for key, value in theirs.items():
                    assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            assert got["metrics"]["kl"] > 0
        # The replicas are the same bits; rank 0 alone saved and registered.
        for p, q in zip(ranks[0][loss_type]["params"], ranks[1][loss_type]["params"], strict=True):
            assert torch.equal(p, q)
        assert ranks[0][loss_type]["registered"] == ["1"]
        assert ranks[1][loss_type]["registered"] == []
        assert (tmp_path / f"rank0-{loss_type}" / "stop-1").is_dir()
        assert not (tmp_path / f"rank1-{loss_type}").exists()
        assert ranks[1][loss_type]["saved"] == str(tmp_path / f"rank1-{loss_type}" / "stop-1")


# --- a LoRA on the tiny LM ----------------------------------------------------------------------


def _text_config(loss_type: str) -> Any:
    from training.text.trainer import LoRAConfig

    return LoRAConfig(
        lr=1e-2,
        epochs=2,
        minibatch_size=5,
        beta=0.04,
        loss_type=loss_type,
        max_tokens_per_forward=40,  # micro-batches: gradient accumulation inside each rank
    )


def _text_groups(model: Path) -> list[Any]:
    """3 groups (4, 4 and 3 members: 11 rows, minibatches of 5, 5 and 1) of random prompts and
    completions, with the base model's log-probs as the stored ones (a fresh LoRA is the base)."""
    from training.text.groups import TextGroup, TextMember
    from training.text.trainer import LoRATrainer

    trainer = LoRATrainer(model, _text_config("token_mean"))
    vocab = trainer.engine.model.config.vocab_size
    rng = random.Random(3)
    groups = []
    for g, size in enumerate((4, 4, 3)):
        prompt = tuple(rng.randrange(10, vocab) for _ in range(rng.randint(4, 8)))
        members = []
        for i in range(size):
            completion = tuple(rng.randrange(10, vocab) for _ in range(rng.randint(2, 6)))
            with torch.no_grad():
                logp, _ = trainer.logprobs([(prompt, completion)])
            old = tuple(float(x) for x in logp[0, : len(completion)])
            members.append(
                TextMember(f"t{g}-{i}", "", completion, old, rng.random(), prompt_token_ids=prompt)
            )
        groups.append(TextGroup(f"g{g}", "", (), tuple(members)))
    return groups


def _train_text(model: Path, groups: list[Any], loss_type: str) -> tuple[Any, Any]:
    from training.text.trainer import LoRATrainer

    trainer = LoRATrainer(model, _text_config(loss_type))
    return trainer, trainer.train(groups)


def _text_worker(rank: int, root: Path, model: Path) -> None:
    groups = torch.load(root / "groups.pt", weights_only=False)
    out = {}
    for loss_type in ("token_mean", "dr_grpo"):
        trainer, result = _train_text(model, groups, loss_type)
        out[loss_type] = {
            "params": [p.detach().clone() for p in trainer.parameters],
            "history": result.history,
            "metrics": result.metrics,
        }
    torch.save(out, root / f"text-{rank}.pt")


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_ranks_train_a_lora_as_one_process(tmp_path: Path):
    pytest.importorskip("peft")
    from nodes.backends.engines.tiny_models import build_lm

    model = build_lm(tmp_path / "lm")
    torch.set_num_threads(1)
    groups = _text_groups(model)
    torch.save(groups, tmp_path / "groups.pt")
    _spawn(_text_worker, tmp_path, model)
    ranks = [torch.load(tmp_path / f"text-{r}.pt", weights_only=False) for r in range(WORLD)]
    for loss_type in ("token_mean", "dr_grpo"):
        trainer, single = _train_text(model, groups, loss_type)
        assert len(single.history) == 6
        lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        # The LoRA's B matrices left 0 (by 20 tolerances): the comparison is not vacuous.
        assert max(float(p.abs().max()) for p in lora_b) > 1e-2
        for rank in ranks:
            got = rank[loss_type]
            for p, q in zip(trainer.parameters, got["params"], strict=True):
                torch.testing.assert_close(q, p.detach(), rtol=0, atol=5e-4)
            for ours, theirs in zip(got["history"], single.history, strict=True):
                for key in ("loss", "kl", "ratio_mean", "clip_low", "clip_high", "grad_norm"):
                    # k3 = exp(d) - d - 1 of |d| ~ 0.05 in float32 cancels: 1e-7 absolute
                    tolerance = 1e-7 if key == "kl" else 1e-8
                    assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=tolerance), key
            assert got["metrics"]["first_max_abs_log_ratio"] < 1e-5
            assert got["metrics"]["groups_used"] == 3
        for p, q in zip(ranks[0][loss_type]["params"], ranks[1][loss_type]["params"], strict=True):
            assert torch.equal(p, q)


# --- the command line under torchrun -------------------------------------------------------------


@pytest.mark.slow
def test_atelier_train_from_a_stored_run_under_torchrun(tmp_path: Path):
    """``torchrun --nproc_per_node 2 -m atelier.cli -- train --run ...`` trains the router as
    ``atelier train`` does: the same weights, one printed summary, the rewards stored once."""
    import shutil
    import sqlite3
    import subprocess
    import sys

    from tests.cli_helpers import atelier_env, run_atelier

    db = tmp_path / "runs.db"
    rollout = run_atelier(
        "rollout", "--per-category", "1", "-G", "4", "--name", "explore", "--mode", "random",
        db=db, cwd=tmp_path,
    )  # fmt: skip
    assert rollout.returncode == 0, rollout.stderr
    shutil.copy(db, tmp_path / "dist.db")
    train = ("train", "--run", "explore", "--policy", "router", "--penalty", "margin")
    single = run_atelier(*train, "--out", "single", db=db, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    # "--": torchrun's own parser would take --run for an abbreviation of its --run-path
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_port", str(_free_port()), "-m", "atelier.cli", "--"]
    dist = subprocess.run(
        [*torchrun, *train, "--out", "dist"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=atelier_env(tmp_path / "dist.db"),
    )
    assert dist.returncode == 0, dist.stderr
    assert dist.stdout.count("trained router@1") == 1  # rank 0 prints, rank 1 is quiet
    summary = next(line for line in single.stdout.splitlines() if line.startswith("trained"))
    assert summary in dist.stdout  # the same metrics, to the printed digits
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["router-1"]
    expected = load_policy(tmp_path / "single" / "router-1")
    got = load_policy(tmp_path / "dist" / "router-1")
    for p, q in zip(expected.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-9)
    counts = []
    for path in (db, tmp_path / "dist.db"):
        with sqlite3.connect(path) as conn:
            tables = ("rewards", "policy_versions")
            counts.append([conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables])
    assert counts[0] == counts[1] and counts[1][1] == 1  # rank 1 stored no reward, no version


def test_torchrun_refuses_what_is_not_data_parallel(tmp_path: Path):
    from tests.cli_helpers import run_atelier

    refused = run_atelier(
        "train", "--world", "shapeworld", db=tmp_path / "a.db", cwd=tmp_path, WORLD_SIZE="2"
    )
    assert refused.returncode == 2
    assert "--world: not data-parallel yet" in refused.stderr


# --- Flow-GRPO on the tiny SD3 ------------------------------------------------------------------


def _flow_trainer(model: Path) -> Any:
    from nodes.backends.engines.flow_image import load_pipeline
    from training.images.trainer import FlowGRPOConfig, FlowGRPOTrainer

    # 3 groups x 4 images x 1 transition = 12, minibatches of 5, 5 and 2
    config = FlowGRPOConfig(r=4, alpha=8, lr=2e-2, clip_range=1e-2, beta=0.004, minibatch_size=5)
    return FlowGRPOTrainer(load_pipeline(model), config, model="tiny-sd3")


def _flow_worker(rank: int, root: Path, model: Path) -> None:
    groups = torch.load(root / "flow-groups.pt", weights_only=False)
    trainer = _flow_trainer(model)
    result = trainer.train(groups)
    params = [p.detach().clone() for p in trainer.parameters]
    torch.save({"params": params, "history": result.history}, root / f"flow-{rank}.pt")


@pytest.mark.slow
@pytest.mark.models
def test_two_ranks_train_a_diffusion_lora_as_one_process(tmp_path: Path):
    import asyncio

    import numpy as np

    from nodes.backends.engines.flow_image import FlowImageEngine, FlowImageModel, load_pipeline
    from nodes.backends.engines.tiny_models import build_sd3
    from nodes.backends.flow.sampler import SDEConfig
    from storage.store import TrajectoryStore
    from training.images.groups import read_groups
    from training.images.rewards import score_run
    from training.images.sampling import collect

    def redness(image: Any, prompt: str = "") -> float:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
        return float((rgb[..., 0] - rgb[..., 1:].mean(-1)).mean())

    torch.set_num_threads(1)
    model = build_sd3(tmp_path / "sd3")
    sde = SDEConfig(noise_level=0.7, window=(0, 2), count=1)
    engine = FlowImageEngine(load_pipeline(model), name="tiny-sd3", sde_config=sde, lora="draw@0")
    painter = FlowImageModel(engine, default_steps=2, guidance_scale=3.0, max_batch=16)
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'flow.db'}")
    prompts = ["a picture", "a scene", "a thing"]
    run_id = asyncio.run(collect(painter, store, prompts, group_size=4, width=32, height=32))
    painter.close()
    score_run(store, run_id, redness, "redness")
    groups = read_groups(store, run_id, reward="redness", node="draw")
    assert len(groups) == 3 and sum(len(m.transitions) for g in groups for m in g.members) == 12
    torch.save(groups, tmp_path / "flow-groups.pt")
    _spawn(_flow_worker, tmp_path, model)
    trainer = _flow_trainer(model)
    single = trainer.train(groups)
    assert len(single.history) == 3
    lora_b = [p for n, p in trainer.transformer.named_parameters() if "lora_B" in n]
    assert max(float(p.abs().max()) for p in lora_b) > 2e-2  # moved: 20 tolerances
    ranks = [torch.load(tmp_path / f"flow-{r}.pt", weights_only=False) for r in range(WORLD)]
    for got in ranks:
        for p, q in zip(trainer.parameters, got["params"], strict=True):
            torch.testing.assert_close(q, p.detach(), rtol=0, atol=1e-3)  # lr / 20, as the LM's
        for ours, theirs in zip(got["history"], single.history, strict=True):
            assert ours.keys() == theirs.keys()
            for key in ("loss", "ratio_mean", "grad_norm"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), key
    for p, q in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(p, q)
