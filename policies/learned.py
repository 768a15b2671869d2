"""The common core of learned node policies: features -> MLP (or linear) -> softmax over a fixed
action set, sampled with the caller's ``random.Random``.

The network runs in float64 (it is tiny): a single observation at sampling time and a training
batch then give the same log-probs to ~1e-15 (float32 matmuls differ by ~1e-7 between batch
shapes), so the log-prob the store records when an action is sampled is exactly what
:meth:`CategoricalPolicy.log_prob` recomputes for training while the weights are unchanged.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from policies.base import Action, sample_categorical
from policies.features import FeatureEncoder, encoder_from_config
from policies.weights import load_weights, save_weights

Obs = TypeVar("Obs")
P = TypeVar("P", bound="CategoricalPolicy[Any]")


def build_net(in_dim: int, out_dim: int, hidden: int, seed: int) -> nn.Module:
    """Linear softmax (``hidden=0``) or one hidden tanh layer. The output layer starts at zero:
    a fresh policy is exactly uniform, so its first GRPO ratios against a uniform behaviour
    policy are exactly 1."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    if hidden > 0:
        first = nn.Linear(in_dim, hidden)
        with torch.no_grad():
            bound = 1.0 / in_dim**0.5
            first.weight.uniform_(-bound, bound, generator=generator)
            first.bias.uniform_(-bound, bound, generator=generator)
        layers += [first, nn.Tanh()]
        in_dim = hidden
    last = nn.Linear(in_dim, out_dim)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers).double()


class CategoricalPolicy(Generic[Obs]):
    """A softmax policy over ``ACTIONS``; subclasses define :meth:`features`."""

    ACTIONS: ClassVar[tuple[str, ...]]
    KIND: ClassVar[str]
    """The ``class`` key of its saved config (see ``policies.weights.POLICY_CLASSES``)."""

    def __init__(
        self,
        encoder: FeatureEncoder,
        *,
        hidden: int = 0,
        name: str,
        version: str = "0",
        greedy: bool = False,
        seed: int = 0,
    ) -> None:
        self.encoder = encoder
        self.hidden = hidden
        self.name = name
        self.version = version
        self.greedy = greedy
        """Take the most probable action (log-prob 0.0: deterministic) instead of sampling."""
        self.seed = seed
        self.net = build_net(self.in_dim, len(self.ACTIONS), hidden, seed)

    @property
    def in_dim(self) -> int:
        return self.encoder.dim + self.extra_dim

    extra_dim: ClassVar[int] = 0
    """Features a subclass appends to the encoder's."""

    def features(self, observations: Sequence[Obs]) -> torch.Tensor:
        raise NotImplementedError

    # --- probabilities ----------------------------------------------------------------------

    def log_probs(self, observations: Sequence[Obs]) -> torch.Tensor:
        """[N, len(ACTIONS)] float64 log-softmax; differentiable w.r.t. the weights."""
        logits = self.net(self.features(observations).double())
        return torch.log_softmax(logits, dim=-1)

    def log_prob(self, observations: Sequence[Obs], actions: Sequence[str]) -> torch.Tensor:
        """[N] log π(action_i | obs_i), differentiable (float64)."""
        if len(observations) != len(actions):
            raise ValueError("one action per observation")
        index = torch.tensor([self.ACTIONS.index(a) for a in actions], dtype=torch.long)
        return self.log_probs(observations).gather(1, index.unsqueeze(1)).squeeze(1)

    def probabilities(self, obs: Obs) -> dict[str, float]:
        with torch.no_grad():
            row = self.log_probs([obs])[0].exp()
        return dict(zip(self.ACTIONS, row.tolist(), strict=True))

    def act(self, obs: Obs, rng: random.Random) -> Action:
        probs = self.probabilities(obs)
        if self.greedy:
            return Action(max(probs, key=probs.__getitem__), 0.0, self.name, self.version)
        choice, log_prob = sample_categorical(probs, rng)
        return Action(choice, log_prob, self.name, self.version)

    # --- training helpers -------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def clone(self: P, *, version: str | None = None, greedy: bool | None = None) -> P:
        """A deep copy (weights included), optionally with another version or greedy flag."""
        other = copy.copy(self)
        other.net = copy.deepcopy(self.net)
        if version is not None:
            other.version = version
        if greedy is not None:
            other.greedy = greedy
        return other

    # --- persistence ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "class": self.KIND,
            "name": self.name,
            "version": self.version,
            "actions": list(self.ACTIONS),
            "encoder": self.encoder.config(),
            "hidden": self.hidden,
            "greedy": self.greedy,
            "seed": self.seed,
        }

    def save(self, directory: str | Path) -> Path:
        """Weights as safetensors, config as JSON, in ``directory`` (created)."""
        return save_weights(directory, dict(self.net.state_dict()), self.config())

    @classmethod
    def load(cls: type[P], directory: str | Path) -> P:
        tensors, config = load_weights(directory)
        if config.get("class") != cls.KIND or tuple(config["actions"]) != cls.ACTIONS:
            raise ValueError(f"{directory} holds a {config.get('class')!r} policy, not {cls.KIND}")
        policy = cls(
            encoder_from_config(config["encoder"]),
            hidden=config["hidden"],
            name=config["name"],
            version=config["version"],
            greedy=config["greedy"],
            seed=config["seed"],
        )
        policy.net.load_state_dict(tensors)
        return policy
