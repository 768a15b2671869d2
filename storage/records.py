"""What the store hands out: plain dataclasses (slots, cheap to build by the 100k), never ORM rows.

Every object is complete when returned (no lazy loading), so no database session outlives the
call that produced it. Images are the one exception by design: a :class:`StoredImage` carries
its reference and size and loads its pixels on demand through the store it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from PIL import Image


@dataclass(slots=True)
class RunInfo:
    id: str
    name: str
    created_at: datetime
    config: dict[str, Any]
    status: str
    trajectory_count: int = 0


@dataclass(slots=True)
class StoredImage:
    ref: str
    width: int
    height: int
    size: int
    """Bytes of PNG."""
    _loader: Callable[[str], Image.Image] = field(repr=False, compare=False)

    def load(self) -> Image.Image:
        return self._loader(self.ref)


@dataclass(slots=True)
class GenerationInfo:
    position: int
    role: str
    text: str
    model: str
    latency_s: float
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    messages: list[dict[str, Any]] | None = None
    """The chat messages exactly as sent (OpenAI shape; an image part is ``{"type":
    "image_ref", "ref": <sha256>}``, loadable with ``store.get(ref)``); None for generations
    recorded before schema version 4."""
    sampling: dict[str, Any] | None = None
    """The request's other fields as sent (temperature, top_p, max_tokens, seed, logprobs...)."""
    prompt_token_ids: tuple[int, ...] | None = None
    """The prompt's token ids as the server encoded them; None when it did not return them."""


@dataclass(slots=True)
class StepInfo:
    trajectory_id: str
    seq: int
    node: str
    stage: str
    started_at: datetime
    latency_s: float
    text: str | None
    error: str | None
    models: list[str]
    policy: str | None
    policy_version: str | None
    state_before: dict[str, Any]
    update: dict[str, Any]
    generations: list[GenerationInfo]
    images_in: list[StoredImage]
    images_out: list[StoredImage]


@dataclass(slots=True)
class RewardInfo:
    id: int
    trajectory_id: str
    step_seq: int | None
    name: str
    value: float
    source: str
    created_at: datetime
    details: dict[str, Any] | None = None


@dataclass(slots=True)
class TrajectorySummary:
    id: str
    run_id: str
    prompt: str
    category: str | None
    group_id: str
    sample_index: int
    seed: int
    mode: str | None
    status: str
    final_image: str | None
    image_count: int
    score: float | None
    correct: bool | None
    rewards: dict[str, float]
    """Trajectory-level rewards, name -> latest value."""
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    error: str | None


@dataclass(slots=True)
class TrajectoryDetail(TrajectorySummary):
    initial_state: dict[str, Any] | None = None
    final_state: dict[str, Any] | None = None
    steps: list[StepInfo] = field(default_factory=list)
    reward_records: list[RewardInfo] = field(default_factory=list)


@dataclass(slots=True)
class PolicyVersionInfo:
    id: int
    name: str
    version: str
    created_at: datetime
    path: str | None
    metadata: dict[str, Any]
