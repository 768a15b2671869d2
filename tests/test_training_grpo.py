"""training.grpo against TRL's GRPOTrainer (its own code, run on our inputs) and by hand.

Which TRL code each test runs (trl 1.16, ``trl/trainer/grpo_trainer.py``):

- advantages: ``GRPOTrainer._generate_and_score_completions``, the whole method, on a bare
  ``GRPOTrainer.__new__`` object. Only its inputs are stubbed: ``_generate`` returns fixed
  token ids, ``_calculate_rewards`` returns our rewards (float64: TRL's reward-function plumbing
  casts to float32), ``model`` is a stand-in with ``training=True``. Everything from
  ``if self.multi_objective_aggregation == "sum_then_normalize":`` (group mean, ``nanstd`` over
  the group or the batch, ``/(std + 1e-4)`` unless ``scale_rewards == "none"``) is TRL's.
  Measured max |Δ| ≈ 5e-8 (group), 3e-9 (batch), 0 (none): TRL's ``nanstd`` computes the
  n/(n−1) correction as int/int, i.e. in float32, even for float64 rewards.
- loss: ``GRPOTrainer._compute_loss`` on a bare object, with ``_get_per_token_logps_and_entropies``
  replaced by a function returning our (grad-requiring) per-token log-probs, so TRL computes the
  ratio, the two-sided clip, the k3 KL and the aggregation for ``loss_type`` "grpo" (our
  "sequence_mean"), "dapo" ("token_mean") and "dr_grpo"; gradients are taken through TRL's
  graph with ``torch.autograd.grad``. TRL's ``use_bias_correction_kl`` (default True since
  0.2x: KL·ρ) is set False, since the design's KL term is the plain k3 estimator.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict, deque

import pytest
import torch

from training.grpo import group_advantages, grpo_loss

TOL = 1e-6


# --- hand computations ------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    adv, zero = group_advantages(rewards, eps=1e-4)
    # group 1: mean 0.5, unbiased std = sqrt((0.25 + 0.25 + 0 + 0) / 3)
    std = math.sqrt(0.5 / 3)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0]
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert zero.tolist() == [False, True]

    none, _ = group_advantages(rewards, scale="none")
    assert none[0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0], abs=1e-12)

    batch, _ = group_advantages(rewards, scale="batch")
    batch_std = rewards.flatten().std().item()  # over all 8 rewards, unbiased
    assert batch[0].tolist() == pytest.approx(
        [0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4), 0, 0]
    )

    one, zero_one = group_advantages(torch.tensor([3.0, 1.0], dtype=torch.float64), eps=0.0)
    assert one.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert zero_one.shape == () and not zero_one


def test_grpo_loss_by_hand_tiny_case():
    # Two completions of two tokens; the second completion has one padding token.
    logp = torch.tensor([[math.log(0.5), math.log(0.9)], [math.log(0.2), 0.0]], dtype=torch.float64)
    old = torch.tensor([[math.log(0.25), math.log(0.9)], [math.log(0.4), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    logp.requires_grad_(True)
    # ratios: 2.0 (clipped to 1.2, A=+1), 1.0 (A=+1), 0.5 (clipped to 0.8, A=-2)
    # per-token loss: -min(2·1, 1.2·1) = -1.2; -1; -min(0.5·-2, 0.8·-2) = 1.6
    loss, metrics = grpo_loss(logp, old, adv, mask, loss_type="token_mean")
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.6) / 3, abs=1e-12)
    assert metrics["clip_high"] == pytest.approx(1 / 3) and metrics["clip_low"] == pytest.approx(
        1 / 3
    )
    assert metrics["ratio_mean"] == pytest.approx((2.0 + 1.0 + 0.5) / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    # Clipped tokens pass no gradient; the unclipped one: d(-ρA)/dlogp = -ρA / 3 = -1/3.
    assert grad.flatten().tolist() == pytest.approx([0.0, -1 / 3, 0.0, 0.0], abs=1e-12)

    seq, _ = grpo_loss(logp, old, adv, mask, loss_type="sequence_mean")
    assert seq.item() == pytest.approx(((-1.2 - 1.0) / 2 + 1.6 / 1) / 2, abs=1e-12)
    dr, _ = grpo_loss(logp, old, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    assert dr.item() == pytest.approx((-1.2 - 1.0 + 1.6) / (2 * 4), abs=1e-12)

    # k3 KL with β: ref = old here; KL_t = exp(ref − logp) − (ref − logp) − 1.
    with_kl, m = grpo_loss(logp, old, adv, mask, beta=0.1, ref_logprobs=old, loss_type="token_mean")
    kls = [math.exp(-math.log(2)) + math.log(2) - 1, 0.0, math.exp(math.log(2)) - math.log(2) - 1]
    assert with_kl.item() == pytest.approx((-1.2 - 1.0 + 1.6 + 0.1 * sum(kls)) / 3, abs=1e-12)
    assert m["kl"] == pytest.approx(sum(kls) / 3, abs=1e-12)


def test_grpo_loss_rejects_unknown_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        grpo_loss(x, x, torch.zeros(2), loss_type="bnpo")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        grpo_loss(x, x, torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 2, 2))


# --- TRL equivalence ----------------------------------------------------------------------------

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL/transformers renames


@pytest.fixture(scope="module")
def trl_parts():
    """(GRPOTrainer, Accelerator, GRPOConfig); skips when TRL is not installed."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    from accelerate import Accelerator
    from trl import GRPOConfig

    return grpo_trainer.GRPOTrainer, Accelerator, GRPOConfig


def _trl_config(trl_parts, tmp_path, **overrides):
    _, _, config_cls = trl_parts
    return config_cls(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        use_bias_correction_kl=False,
        **overrides,
    )


def _bare_trainer(trl_parts, args):
    trainer_cls, accelerator_cls, _ = trl_parts
    trainer = trainer_cls.__new__(trainer_cls)
    # After the config: building TrainingArguments resets accelerate's shared state.
    trainer.accelerator = accelerator_cls(cpu=True)
    trainer.args = args
    trainer.model = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


def _trl_advantages(trl_parts, tmp_path, rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """Run TRL's _generate_and_score_completions on B·G fake completions with these rewards."""
    groups, size = rewards.shape
    n = groups * size
    args = _trl_config(trl_parts, tmp_path, scale_rewards=scale, num_generations=size)
    t = _bare_trainer(trl_parts, args)
    t.environment_factories = None
    t.environments = None
    t.tools = None
    t._tokenizer = types.SimpleNamespace(pad_token_id=0)
    t.pad_to_multiple_of = None
    t.mask_truncated_completions = False
    t.num_iterations = 1
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.beta = 0.0
    t.num_generations = size
    t.multi_objective_aggregation = "sum_then_normalize"
    t.scale_rewards = scale
    t.reward_weights = torch.ones(1, dtype=torch.float64)
    t.reward_func_names = ["ours"]
    t.log_multimodal = False
    t._logs = {
        "images": deque(), "prompt": deque(), "completion": deque(),
        "rewards": defaultdict(deque), "advantages": deque(), "extra": defaultdict(deque),
    }  # fmt: skip
    t._pending_extra_logs = defaultdict(list)
    t._pending_metrics = defaultdict(list)

    def generate(prompts):
        ids = [[1, 2] for _ in prompts]
        return ids, [[3, 4, 5] for _ in prompts], None, ["c"] * len(prompts), None, {}, None, None

    t._generate = generate
    t._calculate_rewards = lambda *a, **k: rewards.reshape(n, 1).clone()
    out = t._generate_and_score_completions([{"prompt": "p"}] * n)
    return out["advantages"].reshape(groups, size)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(trl_parts, tmp_path, scale):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 8, generator=gen, dtype=torch.float64)
    rewards[2] = 0.75  # a zero-variance group
    rewards[3, :4] = 1.0  # ties
    ours, zero = group_advantages(rewards, scale=scale)  # type: ignore[arg-type]
    theirs = _trl_advantages(trl_parts, tmp_path, rewards, scale)
    assert theirs.dtype == torch.float64
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, diff
    assert zero.tolist() == [False, False, True, False, False, False]


def _trl_loss(
    trl_parts, tmp_path, logp, old, adv, mask, ref, *, loss_type, eps_low, eps_high, beta
):
    args = _trl_config(
        trl_parts, tmp_path, loss_type=loss_type, beta=beta, epsilon=eps_low,
        epsilon_high=eps_high, max_completion_length=logp.shape[1] + 3,
    )  # fmt: skip
    t = _bare_trainer(trl_parts, args)
    t.loss_type = loss_type
    t.beta = beta
    t.epsilon_low, t.epsilon_high = eps_low, eps_high
    t.max_completion_length = args.max_completion_length
    t.importance_sampling_level = "token"
    t.top_entropy_quantile = 1.0
    t.off_policy_mask_threshold = None
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t._entropy_bonus_enabled = False
    t.aux_loss_enabled = False
    t.current_gradient_accumulation_steps = 1
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    b, length = logp.shape
    inputs = {
        "prompt_ids": torch.ones(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.ones(b, length, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = t._compute_loss(None, inputs)
    return loss, t._metrics["train"]


@pytest.mark.parametrize(
    ("ours_type", "trl_type"),
    [("sequence_mean", "grpo"), ("token_mean", "dapo"), ("dr_grpo", "dr_grpo")],
)
@pytest.mark.parametrize(("eps_high", "beta"), [(0.2, 0.0), (0.28, 0.04)])
def test_loss_and_gradient_equal_trl(trl_parts, tmp_path, ours_type, trl_type, eps_high, beta):
    gen = torch.Generator().manual_seed(1)
    b, length = 12, 7
    old = -torch.rand(b, length, generator=gen, dtype=torch.float64) * 3
    # New log-probs near the old ones, some far enough to be clipped on both sides.
    logp_data = old + torch.randn(b, length, generator=gen, dtype=torch.float64) * 0.3
    ref = old + torch.randn(b, length, generator=gen, dtype=torch.float64) * 0.2
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (b,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)

    ours_logp = logp_data.clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        ours_logp, old, adv, mask, eps_low=0.2, eps_high=eps_high, beta=beta, ref_logprobs=ref,
        loss_type=ours_type, max_completion_length=length + 3,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, ours_logp)

    trl_logp = logp_data.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_loss(
        trl_parts, tmp_path, trl_logp, old, adv, mask, ref, loss_type=trl_type, eps_low=0.2,
        eps_high=eps_high, beta=beta,
    )  # fmt: skip
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_logp)

    assert trl_loss.dtype == torch.float64
    assert abs(loss.item() - trl_loss.item()) < TOL
    assert (grad - trl_grad).abs().max().item() < TOL
    assert metrics["clip_low"] > 0 and metrics["clip_high"] > 0  # both clip branches exercised
    assert metrics["clip_low"] == pytest.approx(trl_metrics["clip_ratio/low_mean"][-1], abs=TOL)
    assert metrics["clip_high"] == pytest.approx(trl_metrics["clip_ratio/high_mean"][-1], abs=TOL)
    if beta:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"][-1], abs=TOL)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_ragged_group_advantages_match_a_float64_recomputation(scale):
    """Groups of different sizes (a split text group, a dropped member): each group's
    advantages as (r - mean_g) / (std + eps), with std the group's, every reward's, or none."""
    import statistics

    from training.grpo import ragged_group_advantages

    rewards = [[0.0, 1.0, 0.5], [1.0, 1.0], [0.2, 0.9, 0.4, 0.0, 1.0]]
    advantages, zero = ragged_group_advantages(rewards, scale=scale, eps=1e-4)
    everything = statistics.stdev([r for rs in rewards for r in rs])
    assert zero == [False, True, False]
    for rs, adv in zip(rewards, advantages, strict=True):
        mean = statistics.fmean(rs)
        std = {"group": statistics.stdev(rs), "batch": everything, "none": None}[scale]
        expected = [(r - mean) / (std + 1e-4) if std is not None else r - mean for r in rs]
        assert adv.dtype == torch.float64
        assert adv.tolist() == pytest.approx(expected, abs=1e-12)
