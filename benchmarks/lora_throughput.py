"""LoRA GRPO step throughput: Atelier's ``LoRATrainer`` against TRL's ``GRPOTrainer`` loss.

    PYTHONPATH=. .venv/bin/python benchmarks/lora_throughput.py [--repeats 4] [--warmup 1]
        [--rows 16] [--prompt-len 64] [--completion-len 64] [--ragged] [--threads 1]
        [--models tiny,qwen2-512]

Both sides run on ONE peft LoRA model (``LoRATrainer(model_dir, LoRAConfig(r=8, alpha=16))``,
LoRA on every decoder linear layer; its ``lora_B`` matrices are set to small random values so
the adapter changes the log-probs and the KL term is not zero) and on the same batch: ``--rows``
rows of synthetic token ids (``--prompt-len`` prompt + ``--completion-len`` completion ids; with
``--ragged`` completions shortened by up to half, right-padded), the same advantages (random,
one per row) and the same old log-probs (the current ones plus noise, so both clip branches
fire). One timed step of each side is:

(a) Atelier: ``trainer.logprobs(rows)`` (teacher-forced forward under base + LoRA, full logits,
    ``log_softmax`` at the completion positions), for β > 0 also the reference log-probs (the
    same call under ``trainer.model.disable_adapter()`` and ``torch.no_grad()``, as
    ``LoRATrainer._step`` computes them on every step), then ``training.grpo.grpo_loss`` and
    ``.backward()``.
(b) TRL: ``GRPOTrainer._compute_loss(model, inputs)`` on a bare ``GRPOTrainer.__new__`` object
    (only the attributes ``_compute_loss`` reads are set, as tests/test_training_grpo.py does),
    which runs TRL's own ``_get_per_token_logps_and_entropies`` (its fused, chunked LM head that
    ``GRPOTrainer.__init__`` installs with ``add_fused_lm_head``, here installed the same way:
    log-probs and entropy, entropy always computed by ``_compute_loss``), the clipped surrogate
    and its metric logging; then ``.backward()``. For β > 0 the step also computes
    ``ref_per_token_logps`` TRL's way (``_get_per_token_logps_and_entropies`` under
    ``use_adapter(model, None)``, i.e. adapter disabled, under ``torch.no_grad()``), so the
    reference forward IS counted on both sides. In a real TRL run that forward happens once per
    generation batch (in ``_generate_and_score_completions``), while ``LoRATrainer._step``
    recomputes it on every optimizer step (each of its ``epochs``): with several steps per
    batch, TRL's real per-step cost at β > 0 is lower than measured here by about one no-grad
    forward; Atelier's is as measured.

Where the two differ (same model, same math): Atelier materialises the [rows, length, vocab]
logits once and keeps them for backward; TRL's fused head never materialises them (on CPU, with
no Triton, it projects every position, prompt included, in vocabulary tiles), computes the
entropy too, and recomputes the projection tiles in backward: less memory, more compute.

Not timed on either side: gradient zeroing, the optimizer step, gradient clipping, building the
batch (Atelier's ``logprobs`` does build its padded id tensor from Python lists inside the timed
region; TRL's inputs arrive as padded tensors, built in ``_generate_and_score_completions``).

Loss types: Atelier ``token_mean`` = TRL ``dapo`` (``num_items_in_batch`` = the batch's real
completion tokens, one process, no accumulation); ``sequence_mean`` = ``grpo``; ε_low 0.2,
ε_high 0.28; β 0 and 0.04 (plain k3 KL: TRL's ``use_bias_correction_kl=False``); temperature 1.
Before timing, each case runs both sides once (the first warm-up) and asserts that the two losses
agree within 1e-5; the table reports |Δloss| and the largest difference between the two sides'
LoRA gradients (max |Δgrad| over every LoRA entry, and relative to the largest |grad| entry).

Models (random weights, built from configs, no downloads): ``tiny``, the test suite's tiny
Qwen2 (hidden 64, 2 layers, vocab ≈ 400: ``tiny_models.build_lm``), and ``qwen2-512``, a Qwen2
with hidden 512, 4 layers, 8 heads (2 KV heads), MLP 1024 and vocab 4096 (the tiny tokenizer is
saved beside it only because ``LoRATrainer`` loads one; the ids are synthetic). Timing:
``time.perf_counter``, ``torch.set_num_threads(--threads)`` (1 by default), ``--repeats``
timed steps per side interleaved A, B, A, B… per case, after ``--warmup`` untimed pairs.
tokens/s = the batch's real (unpadded) prompt + completion tokens ÷ the median seconds per step
(shown in brackets). ratio = Atelier's speed over TRL's, the median over the interleaved pairs
of (TRL seconds ÷ Atelier seconds), which cancels drift between pairs (> 1: Atelier's step is
faster). On a shared machine single steps vary by tens of percent: read ratios within ~±0.15 of
1 as "the same"; rerun with more ``--repeats`` for tighter figures.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import types
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from training.grpo import grpo_loss
from training.text.trainer import LoRAConfig, LoRATrainer

EPS_LOW, EPS_HIGH = 0.2, 0.28
LOSS_TYPES = (("token_mean", "dapo"), ("sequence_mean", "grpo"))
BETAS = (0.0, 0.04)
LOSS_TOLERANCE = 1e-5
LORA_B_STD = 0.05
"""Std of the random ``lora_B`` entries (peft starts them at 0: the adapter would be a no-op)."""
OLD_NOISE = 0.2
"""Std of the noise between the current and the "old" log-probs (ratios up to ~e^±0.6)."""
LARGE = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
}


def build_models(root: Path) -> dict[str, Path]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nodes.backends.engines.tiny_models import build_lm, build_tokenizer

    tiny = build_lm(root / "tiny")
    large = root / "qwen2-512"
    tokenizer = build_tokenizer(large)
    torch.manual_seed(0)
    config = Qwen2Config(
        **LARGE,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(large)
    return {"tiny": tiny, "qwen2-512": large}


class Case:
    """One model: the shared peft model (through ``LoRATrainer``), the TRL bare trainer's
    fixed parts and the batch, in Atelier's row form and TRL's padded-tensor form."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, workdir: Path) -> None:
        from trl.trainer.utils import add_fused_lm_head

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = LoRATrainer(model_dir, LoRAConfig(r=8, alpha=16, seed=0))
        self.model = self.trainer.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
        # What GRPOTrainer.__init__ does to a peft model: a fused LM head on the base model,
        # used only by calls with ``fused_lm_head=True`` (TRL's); Atelier's calls get the
        # original forward.
        add_fused_lm_head(
            self.model.get_base_model(), temperature=1.0, outputs=("log_probs", "entropy")
        )
        self.workdir = workdir

        vocab = self.model.get_base_model().config.vocab_size
        pad = self.model.get_base_model().config.pad_token_id or 0
        b, plen, clen = args.rows, args.prompt_len, args.completion_len
        low = 8  # above the special tokens
        prompts = torch.randint(low, vocab, (b, plen), generator=gen)
        completions = torch.randint(low, vocab, (b, clen), generator=gen)
        lengths = [clen - (i * clen // (2 * b) if args.ragged else 0) for i in range(b)]
        self.rows = [(prompts[i].tolist(), completions[i, : lengths[i]].tolist()) for i in range(b)]
        self.tokens = sum(len(p) + len(c) for p, c in self.rows)
        mask = (torch.arange(clen)[None, :] < torch.tensor(lengths)[:, None]).float()
        completion_ids = completions.masked_fill(mask == 0, pad)
        with torch.no_grad():
            logp, atelier_mask = self.trainer.logprobs(self.rows)
        assert torch.equal(atelier_mask, mask), "Atelier's mask is not the batch's"
        self.mask = mask
        self.old = ((logp + torch.randn(logp.shape, generator=gen) * OLD_NOISE) * mask).detach()
        self.advantages = torch.randn(b, generator=gen)
        self.longest = max(lengths)
        self.trl_inputs = {
            "prompt_ids": prompts,
            "prompt_mask": torch.ones_like(prompts),
            "completion_ids": completion_ids,
            "completion_mask": mask.long(),
            "advantages": self.advantages,
            "old_per_token_logps": self.old,
            "num_items_in_batch": mask.sum(),
        }

    # --- the two steps ------------------------------------------------------------------------

    def atelier_step(self, loss_type: str, beta: float) -> torch.Tensor:
        logp, mask = self.trainer.logprobs(self.rows)
        ref = None
        if beta:
            with torch.no_grad(), self.model.disable_adapter():
                ref = self.trainer.logprobs(self.rows)[0]
        loss, _ = grpo_loss(
            logp,
            self.old,
            self.advantages,
            mask,
            eps_low=EPS_LOW,
            eps_high=EPS_HIGH,
            beta=beta,
            ref_logprobs=ref,
            loss_type=loss_type,  # type: ignore[arg-type]
            max_completion_length=self.longest,
        )
        loss.backward()
        return loss.detach()

    def trl_trainer(self, loss_type: str, beta: float) -> Any:
        """A bare ``GRPOTrainer`` with only what ``_compute_loss`` (and the reference forward
        of ``_generate_and_score_completions``) reads."""
        from accelerate import Accelerator
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            output_dir=str(self.workdir / "trl"),
            report_to="none",
            use_cpu=True,
            use_bias_correction_kl=False,
            loss_type=loss_type,
            beta=beta,
            epsilon=EPS_LOW,
            epsilon_high=EPS_HIGH,
            max_completion_length=self.mask.shape[1],
            temperature=1.0,
        )
        t = GRPOTrainer.__new__(GRPOTrainer)
        # After the config: building TrainingArguments resets accelerate's shared state.
        t.accelerator = Accelerator(cpu=True)
        t.args = args
        t.model = types.SimpleNamespace(training=True)  # "train" mode, as in a training step
        t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        t.loss_type = loss_type
        t.beta = beta
        t.epsilon_low, t.epsilon_high = EPS_LOW, EPS_HIGH
        t.max_completion_length = args.max_completion_length
        t.importance_sampling_level = "token"
        t.top_entropy_quantile = 1.0
        t.off_policy_mask_threshold = None
        t.use_vllm = False
        t.vllm_importance_sampling_correction = False
        t._entropy_bonus_enabled = False
        t.aux_loss_enabled = False
        t.current_gradient_accumulation_steps = 1
        return t

    def trl_step(self, t: Any) -> torch.Tensor:
        from trl.trainer.utils import use_adapter

        inputs = dict(self.trl_inputs)
        if t.beta:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            with torch.no_grad(), use_adapter(self.model, adapter_name=None):
                ref, _, _ = t._get_per_token_logps_and_entropies(
                    self.model, ids, attention, self.mask.shape[1], batch_size=ids.shape[0]
                )
            inputs["ref_per_token_logps"] = ref
        loss = t._compute_loss(self.model, inputs)
        loss.backward()
        return loss.detach()

    # --- measuring ----------------------------------------------------------------------------

    def grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().clone() for p in self.params]

    def zero(self) -> None:
        for p in self.params:
            p.grad = None

    def timed(self, step: Any) -> float:
        self.zero()
        gc.collect()
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    def run(
        self, loss_type: str, trl_type: str, beta: float, warmup: int, repeats: int
    ) -> dict[str, float]:
        t = self.trl_trainer(trl_type, beta)

        def atelier() -> torch.Tensor:
            return self.atelier_step(loss_type, beta)

        def trl() -> torch.Tensor:
            return self.trl_step(t)

        # The check run is each side's first warm-up; ``warmup`` more untimed pairs follow.
        self.zero()
        ours = atelier()
        our_grads = self.grads()
        self.zero()
        theirs = trl()
        their_grads = self.grads()
        loss_diff = abs(ours.item() - theirs.item())
        assert loss_diff < LOSS_TOLERANCE, (
            f"{loss_type}/{trl_type} β={beta}: Atelier loss {ours.item():.8f}, "
            f"TRL loss {theirs.item():.8f}"
        )
        pairs = zip(our_grads, their_grads, strict=True)
        grad_diff = max((a - b).abs().max().item() for a, b in pairs)
        grad_scale = max(g.abs().max().item() for g in our_grads)
        for _ in range(warmup):
            self.timed(atelier)
            self.timed(trl)
        times: dict[str, list[float]] = {"atelier": [], "trl": []}
        for _ in range(repeats):  # interleaved: A, B, A, B, …
            times["atelier"].append(self.timed(atelier))
            times["trl"].append(self.timed(trl))
        self.zero()
        atelier_s, trl_s = statistics.median(times["atelier"]), statistics.median(times["trl"])
        pairs_ratio = [b / a for a, b in zip(times["atelier"], times["trl"], strict=True)]
        return {
            "loss": ours.item(),
            "loss_diff": loss_diff,
            "grad_diff": grad_diff,
            "grad_rel": grad_diff / grad_scale if grad_scale else 0.0,
            "atelier_tps": self.tokens / atelier_s,
            "trl_tps": self.tokens / trl_s,
            "atelier_s": atelier_s,
            "trl_s": trl_s,
            "ratio": statistics.median(pairs_ratio),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per side and case")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per side after the check run"
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument(
        "--ragged", action="store_true", help="completions of different lengths (padded)"
    )
    parser.add_argument("--models", default="tiny,qwen2-512", help="comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="lora-throughput-"))
    built = build_models(workdir)
    names = [m for m in args.models.split(",") if m]
    unknown = set(names) - set(built)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; known {sorted(built)}")
    print(
        f"{args.rows} rows × ({args.prompt_len} prompt + {args.completion_len} completion) "
        f"tokens{' (ragged completions)' if args.ragged else ''}, LoRA r=8 α=16, "
        f"{args.threads} thread(s), median of {args.repeats} interleaved steps per side\n"
    )
    print(
        "| model | loss type (Atelier ↔ TRL) | β | tokens/s Atelier | tokens/s TRL | "
        "ratio | loss | Δloss | max Δgrad (rel.) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        case = Case(built[name], args, workdir)
        for loss_type, trl_type in LOSS_TYPES:
            for beta in BETAS:
                r = case.run(loss_type, trl_type, beta, args.warmup, args.repeats)
                print(
                    f"| {name} | {loss_type} ↔ {trl_type} | {beta:g} | "
                    f"{r['atelier_tps']:,.0f} ({r['atelier_s'] * 1e3:.0f} ms) | "
                    f"{r['trl_tps']:,.0f} ({r['trl_s'] * 1e3:.0f} ms) | "
                    f"{r['ratio']:.2f} | {r['loss']:+.5f} | "
                    f"{r['loss_diff']:.1e} | {r['grad_diff']:.1e} ({r['grad_rel']:.1e}) |",
                    flush=True,
                )
        del case
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
