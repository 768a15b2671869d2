"""Reward sources: pluggable, async rewards of one image against its prompt.

A source (:class:`ImageReward`) has a ``name`` (what its values are stored as) and
``async score(image, prompt) -> RewardValue(value, details)``. Sources:

- :class:`CheckerReward` (``checker``): ShapeWorld's GenEval-style checker score V, the fraction
  of the prompt's criteria the image meets;
- :class:`JudgeReward` (``vlm_yes``): any :class:`~nodes.backends.base.Judge`'s score; over a
  VLM (:meth:`JudgeReward.vlm`) that is P(yes) / (P(yes) + P(no)), one request per image where
  each answer is one token (``nodes.backends.vlm_judge``);
- :class:`GvUReward` (``gvu``): GvU's intrinsic reward, the geometric mean of the prompt tokens'
  probabilities given the image, through a scoring chat model's ``score_text`` (vLLM or
  ``atelier serve lm`` over HTTP, or in-process);
- :class:`WeightedReward` (``composite``): Σ_i a_i · R_i of other sources;
- :class:`FunctionReward`: any function ``f(image, prompt)``, sync or async, returning a float
  or ``(float, details)``.

:func:`score_final_images` scores every succeeded trajectory's final image of a run with a source,
concurrently, and stores the values as trajectory rewards under the source's name (ones already
stored are kept, not recomputed: a resumed loop adds no duplicates). Every policy kind trains
on stored rewards by name — decisions with ``GRPOConfig(outcome_reward=name)`` (the composite
a1·R_o + a2·R_f + a3·R_s and the complexity penalty then apply to it unchanged), Flow-GRPO with
``training.images.groups.read_groups(..., reward=name)`` — so any source drives any of them.
:func:`build_reward_source` builds one by kind (``checker``, ``judge``, ``gvu``) from a
config's backends; :func:`describe_source` is what a trained version records of its source.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from PIL import Image

from nodes.backends.base import ChatMessage, Judge, ScoringChatModel
from storage.store import RewardInput
from training.rewards.outcome import intrinsic_reward

if TYPE_CHECKING:
    from storage.store import TrajectoryStore

GVU_INSTRUCTION = "Describe this image."
"""The user turn GvU's scored prompt answers (with the image): the prompt is scored as the
model's description of the image, p(prompt | image, instruction)."""
KINDS = ("checker", "judge", "gvu")
"""What :func:`build_reward_source` builds."""


class RewardValue(NamedTuple):
    """One image's reward and what explains it (stored with the value)."""

    value: float
    details: Mapping[str, Any] = {}


@runtime_checkable
class ImageReward(Protocol):
    """A reward of one image against the prompt it was drawn for."""

    name: str
    """The stored reward's name (``checker``, ``vlm_yes``, ``gvu``, ...)."""

    async def score(self, image: Image.Image, prompt: str) -> RewardValue: ...


class JudgeReward:
    """A :class:`~nodes.backends.base.Judge`'s score V of the image against the prompt."""

    def __init__(self, judge: Judge, name: str = "vlm_yes") -> None:
        self.judge = judge
        self.name = name

    @classmethod
    def vlm(cls, model: ScoringChatModel, name: str = "vlm_yes", **judge: Any) -> JudgeReward:
        """The VLM yes-probability judge over ``model`` (``judge``: ``VLMJudge``'s options,
        e.g. ``top_logprobs``, ``question``)."""
        from nodes.backends.vlm_judge import VLMJudge

        return cls(VLMJudge(model, **judge), name)

    @property
    def model_id(self) -> str:
        return self.judge.model_id

    async def score(self, image: Image.Image, prompt: str) -> RewardValue:
        verdict = await self.judge.judge(image, prompt)
        details: dict[str, Any] = {"judge": self.judge.model_id, "correct": verdict.correct}
        if verdict.criteria:
            details["criteria"] = dict(verdict.criteria)
        if verdict.detail:
            details["detail"] = verdict.detail
        return RewardValue(float(verdict.score), details)


class CheckerReward(JudgeReward):
    """ShapeWorld's checker score (``checker``): exact, from pixels, for ShapeWorld prompts."""

    def __init__(self, config: Any = None, name: str = "checker") -> None:
        from nodes.backends.shapeworld.checker import ShapeWorldChecker

        super().__init__(ShapeWorldChecker(config), name)


class GvUReward:
    """GvU's intrinsic reward through ``model.score_text`` (``gvu``, GvU §3.2):

        R = exp( (1/n) Σ_j log p(prompt_j | image, instruction, prompt_<j) )

    The conversation is ``system`` (when given), then a user turn with the image and
    ``instruction``; the prompt is scored as the assistant's reply (its tokens only: the image
    placeholders and the template are context)."""

    def __init__(
        self,
        model: ScoringChatModel,
        *,
        instruction: str = GVU_INSTRUCTION,
        system: str | None = None,
        name: str = "gvu",
    ) -> None:
        self.model = model
        self.instruction = instruction
        self.system = system
        self.name = name

    @property
    def model_id(self) -> str:
        return f"gvu:{self.model.model_id}"

    def messages(self, image: Image.Image) -> list[ChatMessage]:
        turns = [ChatMessage("system", self.system)] if self.system else []
        return [*turns, ChatMessage("user", self.instruction, images=(image,))]

    async def score(self, image: Image.Image, prompt: str) -> RewardValue:
        scored = await self.model.score_text(self.messages(image), prompt)
        return RewardValue(
            intrinsic_reward(scored.logprobs),
            {
                "model": scored.model or self.model.model_id,
                "tokens": len(scored.token_ids),
                "mean_logprob": scored.mean_logprob,
            },
        )


class WeightedReward:
    """The composite Σ_i a_i · R_i of other sources (each part's value in the details)."""

    def __init__(self, parts: Sequence[tuple[ImageReward, float]], name: str = "composite") -> None:
        if not parts:
            raise ValueError("a weighted reward needs at least one part")
        self.parts = list(parts)
        self.name = name

    async def score(self, image: Image.Image, prompt: str) -> RewardValue:
        values = await asyncio.gather(*(part.score(image, prompt) for part, _ in self.parts))
        total = sum(w * v.value for (_, w), v in zip(self.parts, values, strict=True))
        details = {
            part.name: {"value": v.value, "weight": w, **dict(v.details)}
            for (part, w), v in zip(self.parts, values, strict=True)
        }
        return RewardValue(total, details)


RewardFunction = Callable[[Any, str], Any]
"""``f(pil_image, prompt)``: a float or (float, details), or an awaitable of either."""


class FunctionReward:
    """A plain function as a source (a sync one is called inline: keep it cheap)."""

    def __init__(self, function: RewardFunction, name: str) -> None:
        self.function = function
        self.name = name

    @property
    def model_id(self) -> str:
        return getattr(self.function, "__qualname__", type(self.function).__name__)

    async def score(self, image: Image.Image, prompt: str) -> RewardValue:
        result = self.function(image, prompt)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, tuple):
            value, details = result
            return RewardValue(float(value), dict(details))
        return RewardValue(float(result))


def as_image_reward(reward: ImageReward | RewardFunction, name: str | None = None) -> ImageReward:
    """``reward`` as a source: a source as it is, a function wrapped (``name`` is then its
    stored name, required)."""
    if isinstance(reward, ImageReward):
        return reward
    if name is None:
        raise ValueError("a reward function needs a name to store its values under")
    return FunctionReward(reward, name)


async def score_final_images(
    store: TrajectoryStore,
    run_id: str,
    reward: ImageReward | RewardFunction,
    name: str | None = None,
    *,
    concurrency: int = 8,
) -> dict[str, float]:
    """Score every succeeded trajectory's final image of run ``run_id`` with ``reward`` (at
    most ``concurrency`` at a time) and store each value, with its details and what scored it
    (``details["scored_by"]``: :func:`describe_source`), as the trajectory reward ``name``
    (default: the source's name). A trajectory whose latest stored value of that name was
    scored by the same source, configured the same, keeps it (nothing is recomputed or stored
    twice); one scored otherwise (another model, GvU instruction, judge ``top_logprobs``) is
    scored again and the new value stored as the latest. Returns trajectory id → value, the
    kept ones included."""
    source = as_image_reward(reward, name)
    name = name or source.name
    label = f"training.rewards.sources:{getattr(source, 'model_id', type(source).__name__)}"
    scored_by = describe_source(source)
    finals = [
        s for s in store.trajectories(run=run_id, status="succeeded") if s.final_image is not None
    ]
    latest: dict[str, Any] = {}  # trajectory id -> its latest stored row of this name
    for row in store.rewards(name=name, trajectory_ids=[s.id for s in finals]):
        if row.step_seq is None:
            latest[row.trajectory_id] = row
    values: dict[str, float] = {}
    todo = []
    for summary in finals:
        row = latest.get(summary.id)
        if row is not None and (row.details or {}).get("scored_by") == scored_by:
            values[summary.id] = row.value
        else:
            todo.append(summary)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(summary: Any) -> RewardInput:
        async with gate:
            result = await source.score(store.get(summary.final_image), summary.prompt)
        details = {**dict(result.details), "scored_by": scored_by}
        return RewardInput(summary.id, name, float(result.value), source=label, details=details)

    rows = await asyncio.gather(*(one(s) for s in todo))
    if rows:
        store.add_rewards(rows)
    values.update({row.trajectory_id: row.value for row in rows})
    return values


def build_reward_source(
    kind: str,
    *,
    judge: Any = None,
    model: ScoringChatModel | None = None,
    **options: Any,
) -> ImageReward:
    """A source by kind, from a config's backends (``nodes.backends.config.build_backends``):

    - ``checker``: :class:`CheckerReward` (``options``: ``config``, a ShapeWorldConfig);
    - ``judge``: the config's ``judge`` role as :class:`JudgeReward`, or a VLM judge over
      ``model`` (``options``: ``VLMJudge``'s, e.g. ``top_logprobs``);
    - ``gvu``: :class:`GvUReward` over ``model``, else over the judge role's VLM (``options``:
      ``instruction``, ``system``).
    """
    if kind == "checker":
        return CheckerReward(**options)
    if kind == "judge":
        if model is not None:
            return JudgeReward.vlm(model, **options)
        if judge is None:
            raise ValueError("reward source 'judge' needs a judge role or a VLM backend")
        return JudgeReward(judge, "checker" if _is_shapeworld(judge) else "vlm_yes")
    if kind == "gvu":
        model = model if model is not None else getattr(judge, "model", None)
        if not isinstance(model, ScoringChatModel):
            raise ValueError(
                "reward source 'gvu' needs a VLM that scores text (an openai or inprocess-lm "
                "backend): name one, or a judge role on one"
            )
        return GvUReward(model, **options)
    raise ValueError(f"reward source must be one of {', '.join(KINDS)}, not {kind!r}")


def describe_source(source: ImageReward | None) -> dict[str, Any]:
    """What a trained version records of the source it trained on (``reward_source`` in its
    metadata): the kind, the stored reward's name and what scored it. None: the judge score
    each run stored (``checker``)."""
    if source is None:
        return {"kind": "checker", "reward": "checker", "scored_by": "the runs' stored judge score"}
    info: dict[str, Any] = {"reward": source.name}
    if isinstance(source, CheckerReward):
        info["kind"] = "checker"
    elif isinstance(source, JudgeReward):
        info.update(kind="judge", judge=source.model_id)
        scorer = getattr(source.judge, "scorer", None)
        if scorer is not None:
            info["top_logprobs"] = scorer.top_logprobs
    elif isinstance(source, GvUReward):
        info.update(kind="gvu", model=source.model.model_id, instruction=source.instruction)
        if source.system:
            info["system"] = source.system
    elif isinstance(source, WeightedReward):
        info["kind"] = "weighted"
        info["parts"] = [{**describe_source(part), "weight": w} for part, w in source.parts]
    else:
        info.update(kind="function", function=getattr(source, "model_id", type(source).__name__))
    return info


def _is_shapeworld(judge: Any) -> bool:
    from nodes.backends.shapeworld.checker import ShapeWorldChecker

    return isinstance(judge, ShapeWorldChecker)
