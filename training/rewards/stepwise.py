"""SAIR's step-wise reward R_s, computed by an analyzer and stored.

Every intermediate text of a finished trajectory (its blueprint, its decomposition, each
reflection) is scored by an :class:`~nodes.backends.protocols.Analyzer` and stored on its step
as ``stepwise``; the trajectory's ``stepwise`` is their mean, R_s = (1/T) Σ_t Analyzer(text_t)
(:func:`~training.rewards.composite.stepwise_reward`): the R_s that the decision trainer's
composite a1·R_o + a2·R_f + a3·R_s reads, and that ``training.text.rewards`` combines too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from nodes.backends.protocols import ANALYZED_NODES, Analysis, Analyzer
from storage.store import RewardInput
from training.reading import batches, run_list
from training.rewards.composite import stepwise_reward
from training.rewards.record import latest_values, store_new_rewards
from training.rewards.steps import FINISHED, TextOutput, TrajectoryTrace, trace

if TYPE_CHECKING:
    from storage.images import ImageStore
    from storage.records import TrajectoryDetail
    from storage.store import TrajectoryStore

STEPWISE = "stepwise"
"""The name of R_s: on a text's step, the analyzer's score; on the trajectory, their mean."""

ANALYSES_AT_ONCE = 16
"""Analyzer calls in flight at once (a served VLM batches them; ShapeWorld's are instant)."""


def finished_details(
    store: TrajectoryStore, run_ids: str | Sequence[str], statuses: Sequence[str] = FINISHED
) -> Iterator[tuple[str, Sequence[TrajectoryDetail]]]:
    """(run id, a batch of its trajectories' details) for the runs' trajectories of
    ``statuses``, read in bulk (``training.reading.READ_BATCH`` at a time)."""
    for run_id in run_list(run_ids):
        ids = [s.id for s in store.trajectories(run=run_id, limit=None) if s.status in statuses]
        for batch in batches(ids):
            details = store.trajectory_details(batch)
            yield run_id, [details[tid] for tid in batch]


async def analyze_texts(
    traces: Sequence[TrajectoryTrace], analyzer: Analyzer, images: ImageStore
) -> dict[tuple[str, int], Analysis]:
    """The analyzer's verdict on every intermediate text of ``traces``, by (trajectory id, step
    seq). A reflection is analysed with the image it looked at and its target."""
    limit = asyncio.Semaphore(ANALYSES_AT_ONCE)

    async def one(found: TrajectoryTrace, text: TextOutput) -> Analysis:
        image = None
        if text.image_index is not None:
            image = images.get(found.images[text.image_index].ref)
        async with limit:
            analysis = await analyzer.analyze(
                found.prompt, text.node, text.text, image, target=text.target
            )
        if not 0.0 <= analysis.score <= 1.0:
            raise ValueError(
                f"{analyzer.model_id} scored step {text.seq} of {found.trajectory_id} "
                f"{analysis.score}, outside [0, 1]"
            )
        return analysis

    keys = [(found, text) for found in traces for text in found.texts]
    verdicts = await asyncio.gather(*(one(found, text) for found, text in keys))
    return {
        (found.trajectory_id, text.seq): verdict
        for (found, text), verdict in zip(keys, verdicts, strict=True)
    }


def stepwise_rows(
    found: TrajectoryTrace, analyses: dict[tuple[str, int], Analysis], analyzer_id: str
) -> tuple[list[RewardInput], float]:
    """The rows of one trajectory's R_s: each text's score on its step, and their mean on the
    trajectory (0 when it wrote no intermediate text, e.g. it failed first); returns (rows,
    R_s)."""
    rows, scores = [], []
    for text in found.texts:
        analysis = analyses[(found.trajectory_id, text.seq)]
        details = {"node": text.node, "reason": analysis.reason}
        if analysis.parts:
            details["parts"] = list(analysis.parts)
        if text.target is not None and text.target != found.prompt:
            details["target"] = text.target
        rows.append(
            RewardInput(
                found.trajectory_id, STEPWISE, analysis.score, text.seq, analyzer_id, details
            )
        )
        scores.append(analysis.score)
    r_s = stepwise_reward(scores) if scores else 0.0
    rows.append(
        RewardInput(
            found.trajectory_id,
            STEPWISE,
            r_s,
            None,
            analyzer_id,
            {"mean_of_steps": [text.seq for text in found.texts]},
        )
    )
    return rows, r_s


async def store_stepwise_rewards(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    analyzer: Analyzer,
    *,
    nodes: Sequence[str] = ANALYZED_NODES,
) -> dict[str, float]:
    """Analyse every intermediate text (of ``nodes``) of the runs' finished trajectories and
    store R_s: ``stepwise`` on each text's step (source: the analyzer's model id, details: the
    node and the analyzer's reason) and on the trajectory, the mean. A value already stored
    as the latest is not stored again. Returns trajectory id -> R_s.

    Call it before reading the groups a trainer uses (the groups carry the trajectory rewards
    stored when they were read)."""
    values: dict[str, float] = {}
    for _, details in finished_details(store, run_ids):
        traces = [trace(detail, nodes) for detail in details]
        analyses = await analyze_texts(traces, analyzer, store)
        rows: list[RewardInput] = []
        for found in traces:
            mine, values[found.trajectory_id] = stepwise_rows(found, analyses, analyzer.model_id)
            rows += mine
        latest = latest_values(r for detail in details for r in detail.reward_records)
        store_new_rewards(store, rows, latest)
    return values
