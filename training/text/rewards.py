"""Rewards of recorded completions, stored: the text policies' per-step rewards from graph runs,
and a reward of one-step runs' completions.

Graph runs (:func:`store_text_rewards`): every finished trajectory gets, computed from what the
store holds and stored with its name, value, source, trajectory and step —

=================  ===========  ==============================================================
name               where        value
=================  ===========  ==============================================================
``reason_text``    plan step    R3's reason-stage text reward V + r_format: V of the first
                                image drawn after the plan, r_format 1 for a usable blueprint
``reason_image``   draw step    R3's reason-stage image reward V of that first image
``reflection``     reflect      R3's C_j + r_format: C_j = V − V̂ if V̂ < 1, else 1[stop
                   step         phrase]; V̂ of the image reflected on, V of the image its edit
                                made (V̂ when none), both against the reflection's target
``refinement``     refine step  R3's C_j, on a refine that carried out a reflection's edit
``stepwise``       text steps,  the analyzer's score of each intermediate text; on the
                   trajectory   trajectory their mean, SAIR's R_s (``training.rewards.stepwise``)
``checker``,       trajectory   R_o (the final judge score; 0 when failed) and R_f (SAIR's
``format``                      binary format reward), as the decision trainer stores them
``sair``           trajectory   SAIR's composite a1·R_o + a2·R_f + a3·R_s
``sair_penalised`` trajectory   ``sair`` after the stored group's complexity penalty
=================  ===========  ==============================================================

V comes from the store: the graph records the judge's score of every image against the task
prompt (``ImageRecord.score``, with ``GraphSettings.score_images``). A V the store does not
hold — against a decomposition step's expectation, or in a run that did not score images — is
the ``judge``'s, computed now; each row's details say which (``v_source``: ``stored`` or
``judge:<model id>``) with every input of its formula, so each stored value can be recomputed
from the stored rows. Storing again adds no row where the latest stored value is the same.

A text policy trains on one name (:data:`NODE_REWARDS`): plan on ``reason_text``, reflect on
``reflection`` (both per step; ``training.text.groups.read_node_groups`` prefers a step's reward),
decompose on ``sair_penalised`` (R3 has no decomposition stage: SAIR's composite with the
complexity penalty is what rewards splitting no finer than needed; ``sair`` when the penalty is
off). :func:`node_reward` names it.

One-step runs (:func:`score_run`): any function of a completion's text and token ids, e.g.
:func:`target_fraction` (the share of tokens from a chosen token set, measurable even on random
weights), stored as a trajectory reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nodes.backends.protocols import Analyzer
from storage.store import RewardInput
from training.decisions.rewards import FORMAT, OUTCOME, trajectory_rewards
from training.reading import batches, run_list
from training.rewards.composite import ComplexityForm, apply_complexity_penalty, composite_reward
from training.rewards.formats import blueprint_format_reward, reflection_format_reward
from training.rewards.record import RewardKey, latest_values, store_new_rewards
from training.rewards.stages import (
    correction,
    reason_image_reward,
    reason_text_reward,
    refinement_reward,
    reflection_reward,
)
from training.rewards.steps import ImageScores, TrajectoryTrace, trace
from training.rewards.stepwise import analyze_texts, finished_details, stepwise_rows
from training.text.sampling import recorded_completion

if TYPE_CHECKING:
    from nodes.backends.base import Judge
    from storage.records import TrajectoryDetail
    from storage.store import TrajectoryStore

DEFAULT_REWARD = "lora_target"

REASON_TEXT = "reason_text"
REASON_IMAGE = "reason_image"
REFLECTION = "reflection"
REFINEMENT = "refinement"
COMPOSITE = "sair"
PENALISED = "sair_penalised"
NODE_REWARDS = {"plan": REASON_TEXT, "reflect": REFLECTION, "decompose": PENALISED}
"""The reward each text policy trains on (see the module doc)."""
SOURCE = "training.text.rewards"

TextReward = Callable[[str, Sequence[int]], float]
"""A reward of one completion: ``reward(text, token_ids)``."""


def target_fraction(target_ids: Iterable[int], stop_ids: Iterable[int] = ()) -> TextReward:
    """Reward: the share of a completion's tokens (stop tokens excluded) in ``target_ids``."""
    targets, stops = frozenset(target_ids), frozenset(stop_ids)

    def reward(text: str, token_ids: Sequence[int]) -> float:
        ids = [t for t in token_ids if t not in stops]
        return sum(t in targets for t in ids) / len(ids) if ids else 0.0

    return reward


def score_run(
    store: TrajectoryStore, run_id: str, reward: TextReward, name: str = DEFAULT_REWARD
) -> dict[str, float]:
    """Compute ``reward`` of every recorded completion of the run and store it as the
    trajectory reward ``name``; returns trajectory id → value."""

    values: dict[str, float] = {}
    for batch in batches(store.trajectories(run=run_id)):
        steps_of = store.steps_many([summary.id for summary in batch])
        for summary in batch:
            completion = recorded_completion(summary.id, steps_of[summary.id])
            values[summary.id] = float(reward(completion.text, completion.token_ids))
    store.add_rewards(
        RewardInput(tid, name, value, source="training.text") for tid, value in values.items()
    )
    return values


# --- graph runs: R3's stage rewards, SAIR's R_s, composite and penalty -------------------------


@dataclass
class TextRewards:
    """What :func:`store_text_rewards` did."""

    written: int = 0
    """Rows stored now (the others were stored before with the same value)."""
    values: dict[RewardKey, float] = field(default_factory=dict)
    """Every reward computed: (trajectory id, step seq or None, name) -> value."""


def node_reward(node: str, *, penalty: bool = True) -> str:
    """The stored reward a text policy of ``node`` trains on (:data:`NODE_REWARDS`); without
    the complexity penalty (``store_text_rewards(complexity_eps=None)``) decompose trains on
    the composite ``sair``."""
    if node not in NODE_REWARDS:
        raise ValueError(f"no text-policy reward for node {node!r}; nodes: {sorted(NODE_REWARDS)}")
    if node == "decompose" and not penalty:
        return COMPOSITE
    return NODE_REWARDS[node]


async def stage_rows(found: TrajectoryTrace, scores: ImageScores) -> list[RewardInput]:
    """R3's stage rewards of one trajectory, one row per step (see the module doc)."""
    rows: list[RewardInput] = []

    def add(name: str, value: float, seq: int | None, details: dict[str, Any]) -> None:
        rows.append(RewardInput(found.trajectory_id, name, value, seq, SOURCE, details))

    for plan in (t for t in found.texts if t.node == "plan"):
        first = found.first_image_after(plan.seq)
        r_format = blueprint_format_reward(plan.text)
        if first is None:  # nothing drawn after the plan (the trajectory failed): V = 0
            add(
                REASON_TEXT,
                reason_text_reward(0.0, r_format),
                plan.seq,
                {"v": 0.0, "r_format": r_format, "image": None, "v_source": None},
            )
            continue
        v, source = await scores.score(first.ref, found.prompt)
        drawn = "blueprint" if first.instruction == (plan.text.strip() or found.prompt) else "other"
        seen = {"v": v, "v_source": source, "image": first.index}
        add(
            REASON_TEXT,
            reason_text_reward(v, r_format),
            plan.seq,
            {**seen, "r_format": r_format, "drawn_from": drawn},
        )
        if first.node == "draw":
            add(REASON_IMAGE, reason_image_reward(v), first.seq, seen)
    for reflection in (t for t in found.texts if t.node == "reflect"):
        assert reflection.image_index is not None and reflection.target is not None
        image = found.images[reflection.image_index]
        v_prev, prev_source = await scores.score(image.ref, reflection.target)
        v_new, new_source, edit = None, None, reflection.correction
        if edit is not None:
            v_new, new_source = await scores.score(edit.ref, reflection.target)
        stop, r_format = reflection.stop_phrase, reflection_format_reward(reflection.text)
        c = correction(v_prev, v_new, stop)
        inputs = {
            "v_prev": v_prev,
            "v_prev_source": prev_source,
            "v_new": v_new,
            "v_new_source": new_source,
            "stop_phrase": stop,
            "image": image.index,
            "target": reflection.target,
            "c": c,
        }
        refine_step = None if edit is None else edit.seq
        add(
            REFLECTION,
            reflection_reward(v_prev, v_new, stop, r_format),
            reflection.seq,
            {**inputs, "r_format": r_format, "refine_step": refine_step},
        )
        if edit is not None:
            add(
                REFINEMENT,
                refinement_reward(v_prev, v_new, stop),
                edit.seq,
                {**inputs, "reflect_step": reflection.seq},
            )
    return rows


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    if len(weights) != 3 or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights are (a1, a2, a3), each finite and >= 0, not {weights!r}")
    return (float(weights[0]), float(weights[1]), float(weights[2]))


def composite_row(
    detail: TrajectoryDetail, r_s: float, weights: tuple[float, float, float]
) -> tuple[list[RewardInput], float]:
    """R_o and R_f (as the decision trainer computes them) and SAIR's composite; returns
    (rows, composite)."""
    parts = trajectory_rewards(detail)
    r_o, r_f = parts[OUTCOME], parts[FORMAT]
    value = composite_reward(r_o, r_f, r_s, weights)
    details = {"weights": list(weights), "outcome": r_o, "format": r_f, "stepwise": r_s}
    rows = [
        RewardInput(detail.id, OUTCOME, r_o, None, f"{SOURCE}:{OUTCOME}"),
        RewardInput(detail.id, FORMAT, r_f, None, f"{SOURCE}:{FORMAT}"),
        RewardInput(detail.id, COMPOSITE, value, None, f"{SOURCE}:sair", details),
    ]
    return rows, value


def penalised_rows(
    members: Sequence[tuple[str, float, int]],
    group: str,
    eps: float,
    form: ComplexityForm,
    cost: float,
) -> list[RewardInput]:
    """``sair_penalised`` of a stored group's members, given (trajectory id, composite, image
    count) of each."""
    values = apply_complexity_penalty(
        [c for _, c, _ in members], [n for _, _, n in members], eps, form, cost
    )
    details: dict[str, Any] = {"group": group, "eps": eps, "form": form}
    if form == "linear":
        details["cost"] = cost
    source = f"{SOURCE}:complexity_penalty"
    return [
        RewardInput(tid, PENALISED, value, None, source, {**details, "images": n})
        for (tid, _, n), value in zip(members, values, strict=True)
    ]


async def store_text_rewards(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    analyzer: Analyzer,
    *,
    judge: Judge | None = None,
    weights: Sequence[float] = (1.0, 0.0, 0.0),
    complexity_eps: float | None = 0.05,
    complexity_form: ComplexityForm = "scale",
    complexity_cost: float = 0.1,
) -> TextRewards:
    """Compute and store the text policies' rewards of the runs' finished trajectories (the
    table in the module doc): R3's stage rewards per step, the analyzer's score of every
    intermediate text and R_s, R_o, R_f, SAIR's composite with ``weights`` (a1, a2, a3) and,
    unless ``complexity_eps`` is None, the complexity penalty over each stored group's
    finished members (``complexity_form``/``complexity_cost`` as the decision trainer's).

    ``judge`` computes the V the store does not hold (a reflection checked against a
    decomposition step's expectation; a run recorded without image scores); without one such
    a V raises ``ValueError``. All of a text's rewards are computed, whatever node is trained
    next: R_s and the composite need every text anyway."""
    weights = _check_weights(weights)
    result = TextRewards()
    for run_id in run_list(run_ids):
        groups: dict[str, list[tuple[str, float, int]]] = {}
        stored_penalties: dict[RewardKey, float] = {}
        for _, details in finished_details(store, run_id):
            traces = [trace(detail) for detail in details]
            scores = ImageScores(store, judge)
            scores.remember(traces)
            analyses = await analyze_texts(traces, analyzer, store)
            rows: list[RewardInput] = []
            for detail, found in zip(details, traces, strict=True):
                rows += await stage_rows(found, scores)
                stepwise, r_s = stepwise_rows(found, analyses, analyzer.model_id)
                totals, value = composite_row(detail, r_s, weights)
                rows += stepwise + totals
                if detail.group_id:
                    groups.setdefault(detail.group_id, []).append(
                        (detail.id, value, detail.image_count)
                    )
            latest = latest_values(r for detail in details for r in detail.reward_records)
            stored_penalties.update({k: v for k, v in latest.items() if k[2] == PENALISED})
            result.written += _store(store, rows, latest, result)
        if complexity_eps is not None:
            rows = [
                row
                for group, members in groups.items()
                for row in penalised_rows(
                    members, group, complexity_eps, complexity_form, complexity_cost
                )
            ]
            result.written += _store(store, rows, stored_penalties, result)
    return result


def _store(
    store: TrajectoryStore,
    rows: list[RewardInput],
    latest: dict[RewardKey, float],
    result: TextRewards,
) -> int:
    result.values.update({(r.trajectory_id, r.step, r.name): float(r.value) for r in rows})
    return store_new_rewards(store, rows, latest)
