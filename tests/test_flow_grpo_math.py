"""Flow-GRPO's loss pieces against independent computations: the Gaussian KL against
torch.distributions' closed form, advantage clipping, and the clipped surrogate's gradient."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training.flow_grpo import flow_advantages, flow_grpo_loss, gaussian_mean_kl  # noqa: E402


def test_mean_kl_is_the_closed_form_gaussian_kl_per_element():
    from torch.distributions import Normal, kl_divergence

    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
    ref = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
    std = torch.tensor(0.37, dtype=torch.float64)
    expected = kl_divergence(Normal(mean, std), Normal(ref, std)).reshape(3, -1).mean(1)
    assert torch.allclose(gaussian_mean_kl(mean, ref, std), expected, atol=1e-12)


def test_advantages_are_group_normalised_and_clipped():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0] * 2])
    advantages, zero = flow_advantages(rewards, clip=2.0)
    # Group 0: the one success is (1 - 1/8) / std = 2.47 standard deviations up: clipped to 2.
    assert advantages[0, -1] == pytest.approx(2.0)
    assert advantages[0, 0] == pytest.approx(-(1 / 8) / rewards[0].std().item(), rel=1e-3)
    assert zero.tolist() == [False, True] and advantages[1].abs().max() == 0


def test_surrogate_pushes_log_probs_up_for_positive_advantages_and_clips():
    logprobs = torch.zeros(4, requires_grad=True)
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, metrics = flow_grpo_loss(logprobs, old, advantages, clip_range=0.1)
    loss.backward()
    assert torch.allclose(logprobs.grad, -advantages / 4)  # minimising raises log π where A > 0
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    # Beyond the clip (ratio 1.5 with A > 0), the gradient is gone.
    far = torch.full((1,), 0.405, requires_grad=True)
    loss, metrics = flow_grpo_loss(far, torch.zeros(1), torch.ones(1), clip_range=0.1)
    loss.backward()
    assert far.grad.abs().max() == 0 and metrics["clip_high"] == 1.0


def test_kl_term_adds_beta_times_the_mean_kl():
    logprobs, old, adv = torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0])
    mean, ref, std = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor(0.5)
    plain, _ = flow_grpo_loss(logprobs, old, adv)
    with_kl, metrics = flow_grpo_loss(
        logprobs, old, adv, beta=0.1, mean=mean, ref_mean=ref, std=std
    )
    assert metrics["kl"] == pytest.approx(2.0)  # 1 / (2 · 0.25)
    assert float(with_kl - plain) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="needs mean"):
        flow_grpo_loss(logprobs, old, adv, beta=0.1)
