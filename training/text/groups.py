"""GRPO groups of recorded completions, read back from the store.

Built from the STORED token ids and sampling log-probs (never re-tokenised text), the stored
request (chat messages, sampling fields and, when the server returned them, prompt ids) and the
stored reward. A request's images are stored once, as PNG, in the store's image store, and its
messages name them (``{"type": "image_ref", "ref": <sha256>}``): a member resolves them there
(:meth:`TextMember.load_images`: the exact stored bytes, decoded losslessly, so the pixels are
the ones the server was sent). Two readers:

- ``read_groups``: the one-step runs of ``training.text.sampling.collect`` (a group is one
  prompt's trajectories);
- ``read_node_groups``: whole graph runs. A group is what one node (``plan``, ``reflect``,
  ``decompose``) sampled *for the same input*: each trajectory of a stored group contributes its
  first step of that node, and members are split by their stored request ``messages`` — one
  group per distinct input, so a reflect step that saw another image never shares advantages
  with one that did not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nodes.backends.wire import IMAGE_REF_PART
from storage.images import decode_png
from training.reading import stored_groups
from training.text.rewards import DEFAULT_REWARD
from training.text.sampling import DEFAULT_SYSTEM, prompt_messages, recorded_completion

if TYPE_CHECKING:
    from PIL import Image

    from storage.records import GenerationInfo, StepInfo, TrajectoryDetail
    from storage.store import TrajectoryStore


class ImageBytes(Protocol):
    """Where stored images are read: an image store (``TrajectoryStore`` is one)."""

    def get_bytes(self, ref: str) -> bytes: ...


def message_image_refs(messages: Sequence[Any] | None) -> tuple[str, ...]:
    """The image refs of stored request ``messages`` (OpenAI shape), in prompt order."""
    refs: list[str] = []
    for message in messages or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            refs += [part["ref"] for part in content if part.get("type") == IMAGE_REF_PART]
    return tuple(refs)


@dataclass(frozen=True)
class TextMember:
    trajectory_id: str
    text: str
    token_ids: tuple[int, ...]
    """Exactly as sampled and stored."""
    logprobs: tuple[float, ...]
    """The sampling-time log-prob of each token (π_old), as the server returned it."""
    reward: float
    step_seq: int = 0
    """The stored step (``steps.seq``) whose generation this is."""
    messages: tuple[dict[str, Any], ...] | None = None
    """The request's chat messages exactly as sent (None: recorded before schema version 4)."""
    sampling: dict[str, Any] | None = None
    """The request's sampling fields as sent (temperature, top_p, seed, ...)."""
    prompt_token_ids: tuple[int, ...] | None = None
    """The prompt ids as the server encoded them (None when it did not return them)."""
    image_store: ImageBytes | None = field(default=None, compare=False, repr=False)
    """The image store the request's image refs resolve in (the store the member was read
    from); None for a member built by hand, which then can have no images."""

    @property
    def image_refs(self) -> tuple[str, ...]:
        """The request's images as stored refs, in prompt order (none for a text request)."""
        return message_image_refs(self.messages)

    def load_images(self) -> dict[str, Image.Image]:
        """The request's images by ref: the stored PNG bytes decoded (lossless: the pixels the
        server was sent). ``ValueError`` naming the member when one cannot be read."""
        loaded: dict[str, Image.Image] = {}
        for ref in self.image_refs:
            if ref in loaded:
                continue
            if self.image_store is None:
                raise ValueError(
                    f"trajectory {self.trajectory_id} (step {self.step_seq}): its request has "
                    "images but the member has no image store to read them from"
                )
            try:
                data = self.image_store.get_bytes(ref)
            except KeyError:  # storage.images.ImageNotFound
                raise ValueError(
                    f"trajectory {self.trajectory_id} (step {self.step_seq}): image {ref} of "
                    "its request is not in the image store"
                ) from None
            loaded[ref] = decode_png(data)
        return loaded


@dataclass(frozen=True)
class TextGroup:
    """Completions of one input (a GRPO group); ``messages`` is the chat they answer."""

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
    """The runs' GRPO groups of ``collect``'s one-step runs: every stored group (any status, any
    size) with the stored token ids and log-probs of its completions, their stored request and
    their stored reward ``reward``. The group's ``messages`` are rebuilt from the prompt and the
    run's system prompt (the trainer prefers each member's stored request)."""
    systems: dict[str, str] = {}
    groups = []
    for run_id, group_id, details in stored_groups(store, run_ids, None, 1):
        if run_id not in systems:
            systems[run_id] = store.run(run_id).config.get("system", DEFAULT_SYSTEM)
        members = []
        for detail in details:
            completion = recorded_completion(detail.id, detail.steps)
            _require_logprobs(detail.id, completion)
            if reward not in detail.rewards:
                raise KeyError(f"trajectory {detail.id} has no reward {reward!r}")
            value = detail.rewards[reward]
            members.append(_member(store, detail, detail.steps[0], completion, value))
        prompt = details[0].prompt
        messages = tuple(prompt_messages(prompt, systems[run_id]))
        groups.append(TextGroup(group_id, prompt, messages, tuple(members)))
    return groups


FINISHED = ("succeeded", "failed")
"""The statuses of trajectories that ran to an end (their rewards can be computed)."""


def read_node_groups(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    *,
    node: str = "plan",
    reward: str,
    status: str | Sequence[str] | None = FINISHED,
    min_size: int = 2,
) -> list[TextGroup]:
    """GRPO groups of ``node``'s completions in whole-trajectory groups of graph runs.

    Each trajectory of a stored group (``group_id``; those of ``status``, one or several, None:
    any; by default the finished ones, failed included: a trajectory that failed because of the
    node's own output — a plan the generator cannot draw — is the sample GRPO must push down,
    not one to leave out) gives its
    first ``node`` step's generation at position 0, with the stored completion ids, sampling
    log-probs and request, and the reward ``reward``: that step's reward if one is stored, else
    the trajectory's. A trajectory that never ran ``node`` gives nothing. Members are then split
    by their stored ``messages``: the first input keeps the stored group id, the k-th other
    distinct input becomes ``<group_id>#k``; a split group with fewer than ``min_size`` members
    is dropped (a lone completion has no advantage).

    Raises ``ValueError`` for a generation with no stored request (recorded before schema
    version 4), without a log-prob per token or naming an image the store does not hold, and
    ``KeyError`` for a member without the reward. Members read their images from ``store``
    (:meth:`TextMember.load_images`)."""
    groups: list[TextGroup] = []
    present: set[str] = set()  # image refs found in the store (a group's members share them)
    wanted = None if status is None else {status} if isinstance(status, str) else set(status)
    for _, group_id, details in stored_groups(store, run_ids, None, 1):
        inputs: dict[str, list[TextMember]] = {}
        for detail in details:
            if wanted is not None and detail.status not in wanted:
                continue
            found = _first_step(detail.steps, node)
            if found is None:
                continue
            step, generation = found
            if generation.messages is None:
                raise ValueError(
                    f"trajectory {detail.id} step {step.seq} ({node}): no stored request "
                    "(recorded before schema version 4); record the run again to train on it"
                )
            _require_logprobs(detail.id, generation)
            for ref in message_image_refs(generation.messages):
                if ref in present:
                    continue
                if ref not in store:  # found while reading, not in the middle of training
                    raise ValueError(
                        f"trajectory {detail.id} step {step.seq} ({node}): image {ref} of its "
                        "request is not in the store's image store"
                    )
                present.add(ref)
            value = _step_reward(detail, step.seq, reward)
            key = json.dumps(generation.messages, sort_keys=True)
            inputs.setdefault(key, []).append(_member(store, detail, step, generation, value))
        for k, members in enumerate(inputs.values()):
            if len(members) < min_size:
                continue
            name = group_id if k == 0 else f"{group_id}#{k}"
            messages = members[0].messages or ()
            groups.append(TextGroup(name, details[0].prompt, messages, tuple(members)))
    return groups


def best_members(groups: Sequence[TextGroup]) -> list[tuple[TextGroup, TextMember]]:
    """The highest-reward completion of each group."""
    return [(g, max(g.members, key=lambda m: m.reward)) for g in groups]


def _first_step(steps: Sequence[StepInfo], node: str) -> tuple[StepInfo, GenerationInfo] | None:
    """The trajectory's first ``node`` step with its generation at position 0."""
    for step in sorted(steps, key=lambda s: s.seq):
        if step.node == node:
            for generation in step.generations:
                if generation.position == 0:
                    return step, generation
    return None


def _step_reward(detail: TrajectoryDetail, step_seq: int, name: str) -> float:
    """A reward of the step (the latest stored) wins over the trajectory's of the same name."""
    step_values = [
        r.value for r in detail.reward_records if r.name == name and r.step_seq == step_seq
    ]
    if step_values:
        return float(step_values[-1])  # records come ordered by id: the last is the latest
    if name not in detail.rewards:
        raise KeyError(f"trajectory {detail.id} has no reward {name!r}")
    return float(detail.rewards[name])


def _require_logprobs(trajectory_id: str, generation: GenerationInfo) -> None:
    if generation.text and not generation.token_ids:
        raise ValueError(f"trajectory {trajectory_id}: no completion token ids stored")
    if len(generation.logprobs) != len(generation.token_ids):
        raise ValueError(f"trajectory {trajectory_id}: no sampling log-probs stored")


def _member(
    store: TrajectoryStore,
    detail: TrajectoryDetail,
    step: StepInfo,
    generation: GenerationInfo,
    reward: float,
) -> TextMember:
    return TextMember(
        detail.id,
        generation.text,
        tuple(generation.token_ids),
        tuple(generation.logprobs),
        float(reward),
        step_seq=step.seq,
        messages=None if generation.messages is None else tuple(generation.messages),
        sampling=None if generation.sampling is None else dict(generation.sampling),
        prompt_token_ids=(
            None if generation.prompt_token_ids is None else tuple(generation.prompt_token_ids)
        ),
        image_store=store,
    )
