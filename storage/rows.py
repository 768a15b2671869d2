"""Pure conversions between the graph's records and table rows, and state replay.

Nothing here touches a database: the recorder builds rows with these functions outside any
transaction (so the write lock is held only for the inserts), and the store reads with them.
"""

from __future__ import annotations

import functools
import io
import operator
import struct
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from PIL import Image, UnidentifiedImageError
from sqlalchemy import JSON

from storage.codec import pack_ids, pack_logprobs
from storage.diffusion import transition_rows
from storage.images import check_ref
from storage.schema import derive_stage

_UTC = timezone.utc
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NO_DECISION: dict[str, Any] = {}
DEFAULT_REDUCED_FIELDS = frozenset({"images", "reflections", "decisions"})
"""``ReasonerState``'s append-reduced fields, used when no state type is given."""


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)


def now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive (they were stored in UTC); PostgreSQL aware."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=_UTC)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG header, or from any format PIL reads; ValueError otherwise."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError("image bytes are not a readable image (PNG expected)") from exc


def image_row(
    ref: str, data: bytes, *, keep_bytes: bool, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    width, height = size or image_size(data)
    return {
        "sha256": ref,
        "data": data if keep_bytes else None,
        "width": width,
        "height": height,
        "size": len(data),
        "created_at": now(),
    }


def state_json(state: Any) -> dict[str, Any] | None:
    if state is None:
        return None
    if hasattr(state, "model_dump"):
        return state.model_dump(mode="json")
    return dict(state)


def trajectory_row(state: dict[str, Any], run_id: str, started_at: datetime) -> dict[str, Any]:
    """A new trajectory, status ``running``, from its (JSON) state."""
    task = state.get("task") or {}
    return {
        "id": state["trajectory_id"],
        "run_id": run_id,
        "prompt": task.get("prompt", ""),
        "category": task.get("category"),
        "group_id": task.get("group_id", ""),
        "sample_index": task.get("sample_index", 0),
        "seed": task.get("seed", 0),
        "mode": state.get("mode"),
        "status": "running",
        "final_image": None,
        "image_count": len(state.get("images") or ()),
        "score": None,
        "correct": None,
        "rewards": {},
        "started_at": started_at,
        "finished_at": None,
        "duration_s": None,
        "error": None,
        "initial_state": state,
        "final_state": None,
    }


def finish_values(
    status: str,
    state: dict[str, Any] | None,
    error: str | None,
    finished_at: datetime,
    duration_s: float | None,
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "status": status,
        "error": error,
        "finished_at": finished_at,
        "duration_s": duration_s,
        "final_state": state,
    }
    if state is not None:
        judgement = state.get("judgement") or {}
        values.update(
            mode=state.get("mode"),
            final_image=state.get("final_image"),
            image_count=len(state.get("images") or ()),
            score=judgement.get("score"),
            correct=judgement.get("correct"),
        )
    return values


@dataclass(slots=True)
class StepRows:
    trajectory_id: str
    step: dict[str, Any]
    generations: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    blobs: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    """Diffusion transitions (``storage.diffusion``) and the blobs holding their latents."""
    mode: str | None = None
    """The mode the step chose, if it chose one (the trajectory row is updated with it)."""

    @property
    def refs(self) -> set[str]:
        return {row["ref"] for row in self.images}


def step_rows(record: Any, state_before: dict[str, Any] | None) -> StepRows:
    """Rows for one :class:`agent_graph.recording.StepRecord` (duck-typed: storage does not
    import the graph), its state kept as the recorder decided: ``state_before`` in full (a
    snapshot) or None (a delta). Runs once per recorded step on the writer thread: kept lean."""
    trace = record.trace
    update = record.update
    tid, seq = record.trajectory_id, record.seq
    decisions = update.get("decisions")
    decision = decisions[-1] if decisions and isinstance(decisions[-1], dict) else _NO_DECISION
    generations = trace.generations
    step = {
        "trajectory_id": tid,
        "seq": seq,
        "node": record.node,
        "stage": derive_stage(record.node, _stage_facts(record.state_before), update),
        # A delta step stores JSON null (the column stays NOT NULL: no table rebuild needed).
        "state_before": JSON.NULL if state_before is None else state_before,
        "state_update": update,
        "text": "\n\n".join([g.text for g in generations]) if generations else None,
        "latency_s": float(record.latency_s),
        "started_at": datetime.fromtimestamp(record.started_at, _UTC),
        "error": record.error,
        "models": list(trace.models),
        "policy": decision.get("policy"),
        "policy_version": decision.get("version"),
    }
    rows = StepRows(tid, step, mode=update.get("mode"))
    for position, generation in enumerate(generations):
        token_ids, logprobs = _sized(generation.token_ids), _sized(generation.logprobs)
        prompt_ids = getattr(generation, "prompt_token_ids", None)
        if logprobs and len(logprobs) != len(token_ids):
            raise ValueError(
                f"step {seq} of {tid}: generation {position} has {len(token_ids)} token ids "
                f"but {len(logprobs)} log-probs"
            )
        rows.generations.append(
            {
                "trajectory_id": tid,
                "step_seq": seq,
                "position": position,
                "role": generation.role,
                "text": generation.text,
                "model": generation.model,
                "latency_s": float(generation.latency_s),
                "n_tokens": len(token_ids),
                "token_ids": pack_ids(token_ids),
                "logprobs": pack_logprobs(logprobs),
                # Stored as built by the node (one JSON encoding, by the driver's bind).
                "messages": getattr(generation, "messages", None),
                "sampling": getattr(generation, "sampling", None),
                "prompt_token_ids": None if prompt_ids is None else pack_ids(prompt_ids),
            }
        )
    for direction, refs in (("in", trace.images_in), ("out", trace.images_out)):
        for position, ref in enumerate(refs):
            rows.images.append(
                {
                    "trajectory_id": tid,
                    "step_seq": seq,
                    "direction": direction,
                    "position": position,
                    "ref": check_ref(ref),
                }
            )
    if getattr(trace, "transitions", None):
        rows.blobs, rows.transitions = transition_rows(tid, seq, trace.transitions)
    return rows


def _sized(values: Any) -> Sequence[Any]:
    return values if isinstance(values, (tuple, list)) else tuple(values)


def reduced_fields(state_type: Any = None) -> frozenset[str]:
    """Fields of a pydantic state model whose updates are merged by a reducer (appended)."""
    if state_type is None:
        return DEFAULT_REDUCED_FIELDS
    return frozenset(
        name
        for name, info in state_type.model_fields.items()
        if any(callable(meta) for meta in info.metadata)
    )


def _stage_facts(state: Any) -> Mapping[str, Any]:
    """What :func:`derive_stage` reads of the state before a step: its JSON form as is, or the
    same fields read off the state object (no dump of the whole state for a delta step)."""
    if state is None or isinstance(state, Mapping):
        return state or {}
    mode = getattr(state, "mode", None)
    return {"mode": getattr(mode, "value", mode), "subtasks": getattr(state, "subtasks", None)}


@functools.cache
def replayable(state_type: type) -> bool:
    """True when the store rebuilds a state of this type exactly from a snapshot and the
    updates after it (:func:`replay_states`): its reduced fields are exactly
    :data:`DEFAULT_REDUCED_FIELDS` (``ReasonerState``'s), each a list appended to
    (``operator.add``), and every other field is replaced by an update. States of any other
    type (a user's extra reducers, or not a pydantic model) are never kept as deltas."""
    fields = getattr(state_type, "model_fields", None)
    if not isinstance(fields, dict):
        return False
    reduced = {name: _reducers(info) for name, info in fields.items() if _reducers(info)}
    return set(reduced) == DEFAULT_REDUCED_FIELDS and all(
        reducers == [operator.add] and typing.get_origin(fields[name].annotation) is list
        for name, reducers in reduced.items()
    )


def _reducers(info: Any) -> list[Any]:
    return [meta for meta in info.metadata if callable(meta)]


def replay_states(
    initial_state: Callable[[], dict[str, Any] | None],
    steps: Sequence[tuple[dict[str, Any] | None, dict[str, Any]]],
    reduced: Iterable[str] = DEFAULT_REDUCED_FIELDS,
) -> list[dict[str, Any]]:
    """The state before each of a trajectory's steps, given in order as (stored state or None,
    update): a stored state is taken as is; a delta step's state is the previous state merged
    with the previous update, starting from the trajectory's initial state (asked for only when
    the first step is a delta)."""
    reduced = frozenset(reduced)
    states: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    previous_update: dict[str, Any] = {}
    for stored, update in steps:
        if stored is not None:
            current = stored
        elif current is None:  # the first step is a delta: start from the initial state
            current = initial_state()
            if current is None:
                raise ValueError("a delta step with neither a snapshot nor an initial state")
        else:
            current = merge_update(current, previous_update, reduced)
        states.append(current)
        previous_update = update
    return states


def merge_update(
    state: dict[str, Any], update: dict[str, Any], reduced: Iterable[str] = DEFAULT_REDUCED_FIELDS
) -> dict[str, Any]:
    """The state after a step, as LangGraph builds it: reduced (list) fields are appended to,
    every other field is replaced."""
    merged = dict(state)
    reduced = set(reduced)
    for key, value in update.items():
        if key in reduced and isinstance(value, list):
            merged[key] = [*(merged.get(key) or []), *value]
        else:
            merged[key] = value
    return merged
