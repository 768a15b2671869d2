"""The LoRA trainer's typed hyperparameters (torch-free, so the CLI can build its options from
them without loading torch): ``LoRAConfig``, the default target modules and drift bounds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.grpo_options import AdvantageScale, LossType

# Every linear layer of the decoder: the modules vLLM loads LoRA weights for. Not ``lm_head``:
# vLLM refuses an adapter with LoRA weights on it ("unsupported LoRA weight"), so an adapter
# that trains it could be served by ``atelier serve lm`` but not by vLLM.
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip

Dtype = Literal["float32", "bfloat16"]

DEFAULT_DRIFT: dict[str, float] = {"float32": 1e-4, "bfloat16": 0.1}
"""The drift bound when ``LoRAConfig.max_logprob_drift`` is None: the largest per-token
|recomputed - stored| log-prob the server's incremental decoding (KV cache, left-padded batch)
and the trainer's one teacher-forced pass (right-padded) may differ by in that dtype. Measured
on CPU (max over all completion tokens): float32 4.8e-7 (tiny LLaVA), 1.4e-6 (a 512-wide,
8-layer LM, 259 tokens) — 1e-4 leaves room for bigger models and other kernels. But
1.4e-4 on the 0.7M-parameter role LM of ``benchmarks/learn_decomposer.py`` after SFT
(thousands of tokens, sharp distributions, large activations), which therefore runs with
1e-3; a float32 trainer against a bfloat16 server differs by only 1.3e-3 on the tiny LLaVA,
so a looser default would stop missing dtype mismatches there. bfloat16: 0.0
(tiny LLaVA: same kernels, same rounding) and 1.1e-2 (the 512-wide LM): every layer rounds
its outputs to 8 bits of mantissa, in a different order in the two passes, and the difference
grows with width, depth and the number of tokens; 0.1 leaves room for GPU kernels and
billion-parameter models. A trained model is expected to move by more than that for a wrong
prompt or image (not measured: no trained model is reachable offline); a random tiny model
barely reacts to its inputs (a wrong image moves its log-probs by ~0.035, a changed prompt
token by ~0.007), so on tiny models only the float32 bound catches those."""


class LoRAConfig(BaseModel):
    """The LoRA trainer's hyperparameters (GRPO's and SFT's), each with the default used here;
    ``atelier train --policy plan|reflect|decompose`` has one option per field."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = Field(16, ge=1)
    """LoRA scale numerator: the update is (alpha / r) · B A."""
    target_modules: tuple[str, ...] = LORA_TARGETS
    """Names (last component) of the linear layers that get a LoRA; in a vision-language model
    only those of the language model and top-level heads (``lm_head``), never the vision
    tower's."""
    lr: float = Field(1e-2, ge=0)
    """AdamW learning rate (a tiny model; billion-parameter runs use ~1e-5)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    epochs: int = Field(8, ge=1)
    """Passes over the batch (GRPO's μ); every one is clipped against the stored π_old."""
    minibatch_size: int = Field(16, ge=1)
    """Completions per optimizer step."""
    max_tokens_per_forward: int | None = Field(None, ge=1)
    """Micro-batches: at most this many tokens (rows × the longest prompt + completion) per
    forward pass; a minibatch's micro-batches accumulate their gradients into one update, the
    same as one pass. None: the whole minibatch in one pass."""
    eps_low: float = Field(0.2, ge=0, lt=1)
    """Lower clip ε of the ratio."""
    eps_high: float = Field(0.28, ge=0)
    """Upper clip ε of the ratio (DAPO's clip-higher)."""
    loss_type: LossType = "token_mean"
    """Aggregation: "token_mean" (DAPO), "sequence_mean" (GRPO) or "dr_grpo"."""
    advantage_scale: AdvantageScale = "group"
    """"group" (GRPO), "batch" (batch std) or "none" (Dr. GRPO)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm of the LoRA parameters)."""
    beta: float = Field(0.0, ge=0)
    """Weight of the k3 KL to the reference (DeepSeekMath's GRPO: 0.04; DAPO and Dr. GRPO: 0,
    the default)."""
    kl_reference: Literal["base", "initial"] = "base"
    """The KL's reference: "base", the base model with the adapter disabled (DeepSeekMath's);
    "initial", the adapter training starts from (``--init``, e.g. the SFT version) — after SFT
    of a model that did not know the role, the base is a policy GRPO should not be pulled to."""
    seed: int = 0
    """Seeds LoRA's random A matrices and the minibatch shuffle."""
    dtype: Dtype = "float32"
    """The base model's dtype (the LoRA weights stay float32); the server that sampled must run
    the same dtype, its log-probs are what the ratio is taken against."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    less memory for about a third more compute; the same loss and gradients."""
    max_logprob_drift: float | None = Field(None, gt=0)
    """Largest |recomputed - stored| completion log-prob allowed before the first update; above
    it training stops (the trainer does not see what the server saw). None: the dtype's
    :data:`DEFAULT_DRIFT` (1e-4 in float32, 0.1 in bfloat16)."""
    require_raw_sampling: bool = True
    """Refuse members sampled with temperature != 1, top-p < 1, top-k or a repetition penalty:
    the stored (raw) log-probs are then not the sampling policy's, and the ratio is biased."""

    @property
    def drift_bound(self) -> float:
        """The drift bound in force: ``max_logprob_drift``, else the dtype's default."""
        if self.max_logprob_drift is not None:
            return self.max_logprob_drift
        return DEFAULT_DRIFT[self.dtype]
