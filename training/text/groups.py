"""GRPO groups of recorded completions, read back from the store.

Built from the STORED token ids and sampling log-probs (never re-tokenised text) and the stored
reward; the chat each completion answers is rebuilt from the prompt and the run's system
prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.reading import stored_groups
from training.text.rewards import DEFAULT_REWARD
from training.text.sampling import DEFAULT_SYSTEM, prompt_messages, recorded_completion

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


@dataclass(frozen=True)
class TextMember:
    trajectory_id: str
    text: str
    token_ids: tuple[int, ...]
    """Exactly as sampled and stored."""
    logprobs: tuple[float, ...]
    """The sampling-time log-prob of each token (π_old)."""
    reward: float


@dataclass(frozen=True)
class TextGroup:
    """Completions of one prompt (a GRPO group); ``messages`` is the chat they answer."""

    group_id: str
    prompt: str
    messages: tuple[Any, ...]
    members: tuple[TextMember, ...]


def read_groups(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    *,
    reward: str = DEFAULT_REWARD,
) -> list[TextGroup]:
    """The runs' GRPO groups: every stored group (any status, any size) with the stored token
    ids and log-probs of its completions and their stored reward ``reward``."""
    systems: dict[str, str] = {}
    groups = []
    for run_id, group_id, details in stored_groups(store, run_ids, None, 1):
        if run_id not in systems:
            systems[run_id] = store.run(run_id).config.get("system", DEFAULT_SYSTEM)
        members = []
        for detail in details:
            completion = recorded_completion(detail.id, detail.steps)
            if len(completion.logprobs) != len(completion.token_ids):
                raise ValueError(f"trajectory {detail.id}: no sampling log-probs stored")
            if reward not in detail.rewards:
                raise KeyError(f"trajectory {detail.id} has no reward {reward!r}")
            members.append(
                TextMember(
                    detail.id,
                    completion.text,
                    tuple(completion.token_ids),
                    tuple(completion.logprobs),
                    float(detail.rewards[reward]),
                )
            )
        prompt = details[0].prompt
        messages = tuple(prompt_messages(prompt, systems[run_id]))
        groups.append(TextGroup(group_id, prompt, messages, tuple(members)))
    return groups


def best_members(groups: Sequence[TextGroup]) -> list[tuple[TextGroup, TextMember]]:
    """The highest-reward completion of each group."""
    return [(g, max(g.members, key=lambda m: m.reward)) for g in groups]
