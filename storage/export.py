"""Exports of stored trajectories: JSON Lines (one trajectory per line) and Parquet (one step
per row), for training pipelines and analysis outside Atelier.

::

    from storage.export import export_jsonl, export_parquet
    export_jsonl(store, "run.jsonl", run=run_id)              # + run_images/<sha256>.png
    export_parquet(store, "steps.parquet", run=run_id, images="bytes")

Both read through the store's public API only, one trajectory at a time, so exports of large
stores stream. Token ids and log-probs come out exactly as stored (a JSON float is written as
Python's shortest round-tripping repr, so ``json.loads`` gives back the same bits; Parquet keeps
float64). Non-finite log-probs, should a model report any, are written as JSON ``-Infinity`` /
``NaN`` (which Python's ``json`` reads back; strict parsers do not).

Images, by ``images``:

- ``"files"`` (default): PNG files named ``<sha256>.png`` (the name is the hash of the bytes;
  each distinct image written once) in ``image_dir``, by default ``<output stem>_images``
  beside the output, referenced by their path relative to the output file's folder;
- ``"base64"``: JSONL inlines each image's PNG as base64; Parquet stores the PNG bytes in binary
  columns (``"bytes"`` is the same for Parquet);
- ``"none"``: only references (sha256) and sizes.

An image whose bytes the store cannot give (e.g. kept in an image directory the store was not
opened with) is exported with ``"missing": true`` (JSONL) or a null path/bytes (Parquet), and a
warning is logged; bytes whose sha256 differs from their reference raise ``ValueError``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from storage.images import ImageNotFound, InvalidImageRef, check_ref
from storage.records import StepInfo, StoredImage, TrajectoryDetail

__all__ = [
    "ImagesMode",
    "export_jsonl",
    "export_parquet",
    "iter_trajectories",
    "parquet_schema",
    "trajectory_record",
]

log = logging.getLogger(__name__)

ImagesMode = Literal["files", "base64", "bytes", "none"]
_MODES = ("files", "base64", "bytes", "none")
_RECENT_IMAGES = 256
_PARQUET_BATCH = 128
"""Trajectories per Parquet row group written."""
PYARROW_HINT = (
    "Parquet export needs pyarrow: pip install pyarrow (or pip install 'atelier[export]')"
)


def iter_trajectories(store: Any, run: str | None = None) -> Iterator[TrajectoryDetail]:
    """Every trajectory of ``run`` (all runs when ``None``) by start time, one at a time.

    The list of ids is taken first, so trajectories that start during the export are left out
    rather than shifting the pages. An unknown ``run`` raises ``KeyError``."""
    if run is not None:
        store.run(run)
    for summary in store.trajectories(run=run):
        yield store.trajectory(summary.id)


# --- images ------------------------------------------------------------------------------


class _Images:
    """Resolves image references for an export: files written once, or inline bytes."""

    def __init__(self, store: Any, mode: str, image_dir: Path, base_dir: Path) -> None:
        self.store = store
        self.mode = mode
        self.image_dir = image_dir
        self.base_dir = base_dir
        self.paths: dict[str, str | None] = {}
        self.missing: set[str] = set()
        self._recent: OrderedDict[str, bytes] = OrderedDict()

    def data(self, ref: str) -> bytes | None:
        """The PNG bytes of ``ref`` (the last few hundred kept: a step's input image is usually
        the previous step's output); ``None`` when the store does not have them."""
        if ref in self._recent:
            self._recent.move_to_end(ref)
            return self._recent[ref]
        try:
            raw = bytes(self.store.image_bytes(ref))
        except (ImageNotFound, InvalidImageRef):
            if ref not in self.missing:
                log.warning("image %s is not available in the store; exported without it", ref)
                self.missing.add(ref)
            return None
        if hashlib.sha256(raw).hexdigest() != ref:
            raise ValueError(f"the stored bytes of image {ref} do not hash to its reference")
        self._recent[ref] = raw
        if len(self._recent) > _RECENT_IMAGES:
            self._recent.popitem(last=False)
        return raw

    def path(self, ref: str) -> str | None:
        """The PNG file of ``ref`` (written on first use), relative to the output's folder."""
        if ref in self.paths:
            return self.paths[ref]
        try:
            # The file name comes from the database: only a sha256 may name a file, so that
            # a crafted reference ("../x", "/abs/x") can neither place a file nor be reported
            # as one outside the image folder.
            check_ref(ref)
        except InvalidImageRef:
            log.warning("image reference %.80r is not a sha256; exported without a file", ref)
            self.paths[ref] = None
            return None
        target = self.image_dir / f"{ref}.png"
        raw = None if target.exists() else self.data(ref)
        if raw is not None:
            self.image_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.image_dir, prefix=".tmp-", suffix=".png")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(raw)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        rel = Path(os.path.relpath(target, self.base_dir)).as_posix() if target.exists() else None
        self.paths[ref] = rel
        return rel

    def describe(self, ref: str, info: StoredImage | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"ref": ref}
        if info is None:
            info = self._info(ref)
        if info is not None:
            entry.update(width=info.width, height=info.height, size=info.size)
        if self.mode == "files":
            path = self.path(ref)
            entry["path"] = path
            if path is None:
                entry["missing"] = True
        elif self.mode in ("base64", "bytes"):
            raw = self.data(ref)
            entry["base64"] = None if raw is None else base64.b64encode(raw).decode("ascii")
            if raw is None:
                entry["missing"] = True
        return entry

    def _info(self, ref: str) -> StoredImage | None:
        try:
            return self.store.image_info(ref)
        except (ImageNotFound, InvalidImageRef, AttributeError):
            return None


def _check_mode(images: str) -> None:
    if images not in _MODES:
        raise ValueError(f"images must be one of {', '.join(_MODES)}; got {images!r}")


def _image_dir(path: Path, image_dir: str | os.PathLike[str] | None) -> Path:
    return Path(image_dir) if image_dir is not None else path.parent / f"{path.stem}_images"


# --- JSON Lines ----------------------------------------------------------------------------


def _iso(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat()


def trajectory_record(detail: TrajectoryDetail, images: _Images | None = None) -> dict[str, Any]:
    """The JSON object exported for one trajectory (images as references when ``images`` is
    ``None``)."""

    def image(ref: str, info: StoredImage | None = None) -> dict[str, Any]:
        if images is None:
            entry: dict[str, Any] = {"ref": ref}
            if info is not None:
                entry.update(width=info.width, height=info.height, size=info.size)
            return entry
        return images.describe(ref, info)

    known = {img.ref: img for step in detail.steps for img in (*step.images_in, *step.images_out)}
    step_rewards: dict[int, list[dict[str, Any]]] = {}
    for reward in detail.reward_records:
        if reward.step_seq is not None:
            step_rewards.setdefault(reward.step_seq, []).append(_reward(reward))
    return {
        "id": detail.id,
        "run_id": detail.run_id,
        "prompt": detail.prompt,
        "category": detail.category,
        "group_id": detail.group_id,
        "sample_index": detail.sample_index,
        "seed": detail.seed,
        "mode": detail.mode,
        "status": detail.status,
        "score": detail.score,
        "correct": detail.correct,
        "image_count": detail.image_count,
        "rewards": dict(detail.rewards),
        "started_at": _iso(detail.started_at),
        "finished_at": _iso(detail.finished_at),
        "duration_s": detail.duration_s,
        "error": detail.error,
        "final_image": (
            image(detail.final_image, known.get(detail.final_image)) if detail.final_image else None
        ),
        "initial_state": detail.initial_state,
        "final_state": detail.final_state,
        "reward_records": [_reward(r) for r in detail.reward_records],
        "steps": [
            _step_record(step, image, step_rewards.get(step.seq, [])) for step in detail.steps
        ],
    }


def _reward(reward: Any) -> dict[str, Any]:
    return {
        "name": reward.name,
        "value": reward.value,
        "step": reward.step_seq,
        "source": reward.source,
        "created_at": _iso(reward.created_at),
        "details": reward.details,
    }


def _step_record(step: StepInfo, image: Any, rewards: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "seq": step.seq,
        "node": step.node,
        "stage": step.stage,
        "started_at": _iso(step.started_at),
        "latency_s": step.latency_s,
        "text": step.text,
        "error": step.error,
        "models": list(step.models),
        "policy": step.policy,
        "policy_version": step.policy_version,
        "state_before": step.state_before,
        "update": step.update,
        "rewards": rewards,
        "generations": [
            {
                "position": g.position,
                "role": g.role,
                "text": g.text,
                "model": g.model,
                "latency_s": g.latency_s,
                "token_ids": list(g.token_ids),
                "logprobs": list(g.logprobs),
            }
            for g in step.generations
        ],
        "images_in": [image(img.ref, img) for img in step.images_in],
        "images_out": [image(img.ref, img) for img in step.images_out],
    }


def export_jsonl(
    store: Any,
    path: str | os.PathLike[str],
    *,
    run: str | None = None,
    images: ImagesMode = "files",
    image_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Write one JSON object per trajectory (with its steps, generations, rewards) to ``path``;
    returns how many trajectories were written. See the module docstring for ``images``."""
    _check_mode(images)
    path = Path(path)
    resolver = _Images(store, images, _image_dir(path, image_dir), path.parent)
    count = 0
    with _atomic(path, "w") as handle:
        for detail in iter_trajectories(store, run):
            record = trajectory_record(detail, resolver)
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.write("\n")
            count += 1
    return count


class _atomic:
    """Write to a temporary file beside ``path``; rename over ``path`` only on success."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode

    def __enter__(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        if "b" in self.mode:
            self.handle = os.fdopen(fd, self.mode)
        else:
            self.handle = os.fdopen(fd, self.mode, encoding="utf-8", newline="\n")
        return self.handle

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.handle.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            Path(self.tmp).unlink(missing_ok=True)


# --- Parquet -------------------------------------------------------------------------------


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(PYARROW_HINT, name="pyarrow") from exc
    return pa, pq


def parquet_schema(images: ImagesMode = "files") -> Any:
    """The Arrow schema of :func:`export_parquet`'s steps table for an ``images`` mode."""
    _check_mode(images)
    pa, _ = _pyarrow()
    ts = pa.timestamp("us", tz="UTC")
    rewards = pa.map_(pa.string(), pa.float64())
    strings = pa.list_(pa.string())
    columns = [
        # the trajectory, repeated on each of its steps
        ("trajectory_id", pa.string()),
        ("run_id", pa.string()),
        ("prompt", pa.string()),
        ("category", pa.string()),
        ("group_id", pa.string()),
        ("sample_index", pa.int64()),
        ("seed", pa.int64()),
        ("mode", pa.string()),
        ("status", pa.string()),
        ("score", pa.float64()),
        ("correct", pa.bool_()),
        ("image_count", pa.int64()),
        ("trajectory_rewards", rewards),
        ("trajectory_started_at", ts),
        ("trajectory_finished_at", ts),
        ("trajectory_duration_s", pa.float64()),
        ("trajectory_error", pa.string()),
        ("final_image", pa.string()),
        # the step
        ("seq", pa.int64()),
        ("node", pa.string()),
        ("stage", pa.string()),
        ("started_at", ts),
        ("latency_s", pa.float64()),
        ("text", pa.string()),
        ("error", pa.string()),
        ("models", strings),
        ("policy", pa.string()),
        ("policy_version", pa.string()),
        ("state_before", pa.string()),  # JSON
        ("update", pa.string()),  # JSON
        ("step_rewards", rewards),
        # its generations, aligned by position
        ("generation_roles", strings),
        ("generation_texts", strings),
        ("generation_models", strings),
        ("generation_latency_s", pa.list_(pa.float64())),
        ("token_ids", pa.list_(pa.list_(pa.int64()))),
        ("logprobs", pa.list_(pa.list_(pa.float64()))),
        # its images (sha256 references), with the judge's score of each image made
        ("images_in", strings),
        ("images_out", strings),
        ("images_out_scores", pa.list_(pa.float64())),
    ]
    if images == "files":
        columns += [
            ("final_image_path", pa.string()),
            ("images_in_paths", strings),
            ("images_out_paths", strings),
        ]
    elif images in ("base64", "bytes"):
        columns += [
            ("final_image_png", pa.binary()),
            ("images_in_png", pa.list_(pa.binary())),
            ("images_out_png", pa.list_(pa.binary())),
        ]
    return pa.schema(columns)


def _scores(step: StepInfo) -> list[float | None]:
    records = [r for r in (step.update or {}).get("images", []) or [] if isinstance(r, dict)]
    scores: list[float | None] = []
    for i, img in enumerate(step.images_out):
        if i < len(records) and records[i].get("ref") == img.ref:
            record = records[i]
        else:
            record = next((r for r in records if r.get("ref") == img.ref), {})
        score = record.get("score")
        scores.append(float(score) if isinstance(score, (int, float)) else None)
    return scores


def _step_rows(detail: TrajectoryDetail, images: _Images) -> list[dict[str, Any]]:
    step_rewards: dict[int, dict[str, float]] = {}
    for reward in detail.reward_records:  # by id: the latest value of a name wins
        if reward.step_seq is not None:
            step_rewards.setdefault(reward.step_seq, {})[reward.name] = reward.value
    trajectory = {
        "trajectory_id": detail.id,
        "run_id": detail.run_id,
        "prompt": detail.prompt,
        "category": detail.category,
        "group_id": detail.group_id,
        "sample_index": detail.sample_index,
        "seed": detail.seed,
        "mode": detail.mode,
        "status": detail.status,
        "score": detail.score,
        "correct": detail.correct,
        "image_count": detail.image_count,
        "trajectory_rewards": list(detail.rewards.items()),
        "trajectory_started_at": detail.started_at,
        "trajectory_finished_at": detail.finished_at,
        "trajectory_duration_s": detail.duration_s,
        "trajectory_error": detail.error,
        "final_image": detail.final_image,
    }
    if images.mode == "files":
        trajectory["final_image_path"] = (
            images.path(detail.final_image) if detail.final_image else None
        )
    elif images.mode in ("base64", "bytes"):
        trajectory["final_image_png"] = (
            images.data(detail.final_image) if detail.final_image else None
        )
    rows = []
    for step in detail.steps:
        row = dict(trajectory)
        row.update(
            seq=step.seq,
            node=step.node,
            stage=step.stage,
            started_at=step.started_at,
            latency_s=step.latency_s,
            text=step.text,
            error=step.error,
            models=list(step.models),
            policy=step.policy,
            policy_version=step.policy_version,
            state_before=json.dumps(step.state_before, ensure_ascii=False),
            update=json.dumps(step.update, ensure_ascii=False),
            step_rewards=list(step_rewards.get(step.seq, {}).items()),
            generation_roles=[g.role for g in step.generations],
            generation_texts=[g.text for g in step.generations],
            generation_models=[g.model for g in step.generations],
            generation_latency_s=[g.latency_s for g in step.generations],
            token_ids=[list(g.token_ids) for g in step.generations],
            logprobs=[list(g.logprobs) for g in step.generations],
            images_in=[img.ref for img in step.images_in],
            images_out=[img.ref for img in step.images_out],
            images_out_scores=_scores(step),
        )
        if images.mode == "files":
            row["images_in_paths"] = [images.path(img.ref) for img in step.images_in]
            row["images_out_paths"] = [images.path(img.ref) for img in step.images_out]
        elif images.mode in ("base64", "bytes"):
            row["images_in_png"] = [images.data(img.ref) for img in step.images_in]
            row["images_out_png"] = [images.data(img.ref) for img in step.images_out]
        rows.append(row)
    return rows


def export_parquet(
    store: Any,
    path: str | os.PathLike[str],
    *,
    run: str | None = None,
    images: ImagesMode = "files",
    image_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Write the steps table (one row per step, the trajectory's columns repeated, token ids
    and log-probs as list columns; see :func:`parquet_schema`) to ``path``; returns how many
    rows were written. Needs pyarrow (``ImportError`` naming ``pip install pyarrow`` if not).

    ``images``: ``"files"`` (paths columns), ``"bytes"`` or its alias ``"base64"`` (PNG bytes
    in binary columns), ``"none"`` (references only)."""
    _check_mode(images)
    pa, pq = _pyarrow()
    schema = parquet_schema(images)
    path = Path(path)
    resolver = _Images(store, images, _image_dir(path, image_dir), path.parent)
    count = 0
    with _atomic(path, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        batch: list[dict[str, Any]] = []
        pending = 0
        for detail in iter_trajectories(store, run):
            batch.extend(_step_rows(detail, resolver))
            pending += 1
            if pending >= _PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
                batch, pending = [], 0
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
