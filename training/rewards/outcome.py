"""Outcome rewards R_o: how well the final image matches the prompt, V in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from training.rewards.record import Reward


def checker_score(trajectory: Any) -> Reward:
    """ShapeWorld's GenEval-style checker score V (fraction of the prompt's criteria met).

    ``trajectory`` is a stored summary/detail (its ``score`` is the judgement's score) or a
    state dict: its ``judgement.score``, else the judge score of its last image.
    """
    if isinstance(trajectory, Mapping):
        judgement = trajectory.get("judgement")
        if judgement:
            return Reward("checker", float(judgement["score"]), judgement.get("model", ""))
        scores = [i["score"] for i in trajectory.get("images", ()) if i.get("score") is not None]
        if scores:
            return Reward("checker", float(scores[-1]), "image-score")
        raise ValueError("the state has neither a judgement nor a scored image")
    score = getattr(trajectory, "score", None)
    if score is None:
        raise ValueError(f"trajectory {getattr(trajectory, 'id', '?')} has no judge score")
    return Reward("checker", float(score), "judgement")


def _logsumexp(values: float | Sequence[float]) -> float:
    items = [values] if isinstance(values, (int, float)) else list(values)
    if not items:
        raise ValueError("no log-probabilities given")
    top = max(items)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in items))


def yes_probability(
    logprob_yes: float | Sequence[float], logprob_no: float | Sequence[float]
) -> float:
    """VLM judge score: p(yes) renormalised over the two answers.

        V = p(Yes) / (p(Yes) + p(No)) = 1 / (1 + exp(log p(No) − log p(Yes)))

    A sequence of log-probs is the mass of several spellings of one answer ("Yes", " yes"),
    summed as log Σ exp. Mass on any other token is ignored, as in VQAScore-style judges.
    """
    ly, ln = _logsumexp(logprob_yes), _logsumexp(logprob_no)
    if ly == -math.inf and ln == -math.inf:
        raise ValueError("both answers have probability 0")
    diff = ln - ly
    if diff > 0:  # stable for large |diff|
        e = math.exp(-diff)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(diff))


def intrinsic_reward(prompt_token_logprobs: Sequence[float]) -> float:
    """GvU's intrinsic reward: the geometric mean of the prompt tokens' probabilities given the
    image, as scored by the understanding model (GvU, §3.2):

        R = exp( (1/n) Σ_j log p(prompt_token_j | image, prompt_<j) )

    The log-probs come from the backend's ``score_text`` (vLLM ``prompt_logprobs``).
    """
    values = list(prompt_token_logprobs)
    if not values:
        raise ValueError("no prompt-token log-probabilities given")
    if any(math.isnan(v) or v > 0 for v in values):
        raise ValueError("log-probabilities must be <= 0 and not NaN")
    return math.exp(sum(values) / len(values))
