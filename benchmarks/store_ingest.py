"""Trajectory-store throughput: steps/s through ``SQLRecorder`` vs raw ``sqlite3``, and the
latency of loading GRPO groups from 100k stored trajectories.

    python benchmarks/store_ingest.py                 # SQLite in a temporary directory
    python benchmarks/store_ingest.py --pg            # and PostgreSQL (private server)
    python benchmarks/store_ingest.py --trajectories 500 --groups-total 20000   # quicker

Ingest: ``--concurrency`` trajectories at a time, each start + ``--steps`` record_step calls +
finish, every step with a realistic state snapshot (~3 KB of JSON) and one generation of 128
tokens; "+images" also puts one distinct 64x64 PNG per step and references it. The baseline
writes equivalent rows (same JSON, same blobs) with ``sqlite3.executemany`` into the same kind of
tables, committing in batches of the size the recorder achieved, and once in one transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_graph.recording import StepRecord  # noqa: E402
from nodes.common import Generation, NodeTrace  # noqa: E402
from nodes.state import (  # noqa: E402
    Decision,
    ImageRecord,
    Mode,
    ReasonerState,
    Reflection,
    Task,
)
from storage.codec import pack_ids, pack_logprobs  # noqa: E402
from storage.recorder import SQLRecorder  # noqa: E402
from storage.schema import TrajectoryRow  # noqa: E402
from storage.store import TrajectoryStore  # noqa: E402

TOKENS = 128


def png(seed: int, size: int = 64) -> bytes:
    """A valid, distinct, incompressible-ish RGB PNG (~12 KB at 64x64)."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(size * 3) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = size.to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


def state(tid: str, seq: int, index: int) -> ReasonerState:
    refs = [f"{(index * 97 + i):064x}" for i in range(1 + seq // 2)]
    return ReasonerState(
        trajectory_id=tid,
        task=Task(
            prompt="three yellow stars left of a red circle above two blue squares",
            group_id=f"g{index // 4}",
            sample_index=index % 4,
            seed=index,
        ),
        mode=Mode.REFLECT,
        blueprint="A clean white background. " * 8,
        step_count=seq,
        images=[
            ImageRecord(ref=r, node="refine", instruction="Add one more yellow star.", score=0.5)
            for r in refs
        ],
        reflections=[
            Reflection(
                image_index=i,
                image_ref=r,
                target="the prompt",
                text="<think>" + "count the stars " * 6 + "</think>Add a star.",
                thought="count",
                instruction="Add a star.",
                stop_phrase=False,
                well_formed=True,
                accept=False,
            )
            for i, r in enumerate(refs)
        ],
        decisions=[
            Decision(
                kind="mode",
                action="reflect",
                log_prob=-1.0986,
                policy="uniform",
                version="1",
                step=0,
            )
        ],
    )


def records(tid: str, index: int, steps: int) -> list[StepRecord]:
    rng = random.Random(index)
    out = []
    for seq in range(steps):
        ids = tuple(rng.randrange(150_000) for _ in range(TOKENS))
        logprobs = tuple(-rng.expovariate(2.0) for _ in range(TOKENS))
        out.append(
            StepRecord(
                trajectory_id=tid,
                seq=seq,
                node="reflect",
                started_at=time.time(),
                latency_s=0.01,
                state_before=state(tid, seq, index).model_dump(mode="json"),
                update={"step_count": seq + 1, "rounds": seq},
                trace=NodeTrace(
                    generations=[
                        Generation(
                            "reflect", "<think>ok</think>Add a star.", ids, logprobs, "vlm", 0.01
                        )
                    ],
                    models=["vlm"],
                ),
            )
        )
    return out


async def ingest(
    store: TrajectoryStore, trajectories: int, steps: int, concurrency: int, images: bool
) -> tuple[float, Any]:
    prepared = [(f"t{uuid.uuid4().hex}", i) for i in range(trajectories)]
    plans = {tid: records(tid, i, steps) for tid, i in prepared}
    pngs = {tid: [png(i * 1000 + s) for s in range(steps)] for tid, i in prepared} if images else {}
    limiter = asyncio.Semaphore(concurrency)
    run = store.create_run("bench")
    recorder = SQLRecorder(store, run.id)

    async def one(tid: str, index: int) -> None:
        async with limiter:
            await recorder.start_trajectory(state(tid, 0, index))
            for seq, record in enumerate(plans[tid]):
                if images:
                    ref = store.put_bytes(pngs[tid][seq])
                    record.trace.images_out.append(ref)
                await recorder.record_step(record)
                await asyncio.sleep(0)  # another trajectory's turn, as a model call would be
            await recorder.finish_trajectory(tid, "succeeded", None, None)

    started = time.perf_counter()
    await asyncio.gather(*(one(tid, i) for tid, i in prepared))
    await recorder.aclose()
    return time.perf_counter() - started, recorder.stats


RAW_SCHEMA = """
CREATE TABLE steps (trajectory_id TEXT, seq INTEGER, node TEXT, stage TEXT, state_before TEXT,
  state_update TEXT, text TEXT, latency_s REAL, started_at TEXT, error TEXT, models TEXT,
  policy TEXT, policy_version TEXT, PRIMARY KEY (trajectory_id, seq));
CREATE TABLE generations (trajectory_id TEXT, step_seq INTEGER, position INTEGER, role TEXT,
  text TEXT, model TEXT, latency_s REAL, n_tokens INTEGER, token_ids BLOB, logprobs BLOB,
  PRIMARY KEY (trajectory_id, step_seq, position));
CREATE TABLE images (sha256 TEXT PRIMARY KEY, data BLOB, width INTEGER, height INTEGER,
  size INTEGER, created_at TEXT);
"""


def raw_baseline(path: Path, trajectories: int, steps: int, batch: int, images: bool) -> float:
    """Equivalent rows through sqlite3.executemany (WAL, synchronous=NORMAL), JSON included."""
    import hashlib

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(RAW_SCHEMA)
    rows = []
    for i in range(trajectories):
        tid = f"t{uuid.uuid4().hex}"
        for seq, record in enumerate(records(tid, i, steps)):
            rows.append((record, png(i * 1000 + seq) if images else None))
    now = datetime.now(timezone.utc).isoformat()
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        conn.execute("BEGIN IMMEDIATE")
        if images:
            conn.executemany(
                "INSERT OR IGNORE INTO images VALUES (?,?,?,?,?,?)",
                [(hashlib.sha256(p).hexdigest(), p, 64, 64, len(p), now) for _, p in chunk],
            )
        conn.executemany(
            "INSERT INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    r.trajectory_id,
                    r.seq,
                    r.node,
                    "reflect_refine",
                    json.dumps(r.state_before),
                    json.dumps(r.update),
                    r.trace.generations[0].text,
                    r.latency_s,
                    now,
                    None,
                    json.dumps(r.trace.models),
                    None,
                    None,
                )
                for r, _ in chunk
            ],
        )
        conn.executemany(
            "INSERT INTO generations VALUES (?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    r.trajectory_id,
                    r.seq,
                    0,
                    g.role,
                    g.text,
                    g.model,
                    g.latency_s,
                    len(g.token_ids),
                    pack_ids(g.token_ids),
                    pack_logprobs(g.logprobs),
                )
                for r, _ in chunk
                for g in r.trace.generations
            ],
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def bulk_trajectories(store: TrajectoryStore, total: int, group_size: int) -> str:
    run = store.create_run("groups-bench")
    now = datetime.now(timezone.utc)
    rows = [
        {
            "id": uuid.uuid4().hex,
            "run_id": run.id,
            "prompt": f"prompt {i // group_size}",
            "category": "count",
            "group_id": f"g{i // group_size:07d}",
            "sample_index": i % group_size,
            "seed": i,
            "mode": "reflect",
            "status": "succeeded",
            "final_image": f"{i:064x}",
            "image_count": 1 + i % 4,
            "score": (i % 7) / 7,
            "correct": i % 2 == 0,
            "rewards": {"outcome": (i % 7) / 7},
            "started_at": now,
            "finished_at": now,
            "duration_s": 1.5,
            "error": None,
            "initial_state": None,
            "final_state": None,
        }
        for i in range(total)
    ]
    for start in range(0, total, 10_000):
        chunk = rows[start : start + 10_000]
        store.db.write(lambda conn, c=chunk: conn.execute(TrajectoryRow.__table__.insert(), c))
    # Another run of the same size, so that filtering by run has something to skip.
    other = store.create_run("other")
    for row in rows:
        row.update(id=uuid.uuid4().hex, run_id=other.id)
    for start in range(0, total, 10_000):
        chunk = rows[start : start + 10_000]
        store.db.write(lambda conn, c=chunk: conn.execute(TrajectoryRow.__table__.insert(), c))
    return run.id


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trajectories", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--groups-total", type=int, default=100_000)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--pg", action="store_true", help="also PostgreSQL (private server)")
    args = parser.parse_args()

    backends: list[tuple[str, Callable[[], str]]] = []
    tmp = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    counter = iter(range(1000))
    backends.append(("sqlite", lambda: f"sqlite:///{tmp / f'bench{next(counter)}.db'}"))
    server = None
    if args.pg:
        from tests.pg import PostgresServer, missing_reason

        reason = missing_reason()
        if reason:
            print(f"PostgreSQL skipped: {reason}")
        else:
            server = PostgresServer()
            server.start()
            backends.append(("postgresql", server.create_database))

    n_steps = args.trajectories * args.steps
    print(
        f"ingest: {args.trajectories} trajectories x {args.steps} steps = {n_steps} steps, "
        f"{args.concurrency} concurrent\n"
    )
    print(
        f"{'backend':<11} {'writer':<50} {'steps/s':>9} {'seconds':>8} {'commits':>8} "
        f"{'mean batch':>10}"
    )
    try:
        for images in (False, True):
            label = "+images" if images else ""
            for name, new_url in backends:
                store = TrajectoryStore(new_url())
                elapsed, stats = asyncio.run(
                    ingest(store, args.trajectories, args.steps, args.concurrency, images)
                )
                store.close()
                print(
                    f"{name:<11} {'SQLRecorder ' + label:<50} {n_steps / elapsed:>9,.0f} "
                    f"{elapsed:>8.2f} {stats.commits:>8} {stats.mean_batch:>10.1f}"
                )
                if name == "sqlite":
                    batch = max(1, round(stats.steps / max(1, stats.commits)))
                    for rows_per_commit, what in (
                        (batch, f"batches of {batch}"),
                        (n_steps, "one transaction"),
                    ):
                        path = tmp / f"raw-{uuid.uuid4().hex}.db"
                        raw = raw_baseline(
                            path, args.trajectories, args.steps, rows_per_commit, images
                        )
                        print(
                            f"{name:<11} {f'raw sqlite3 executemany {label} {what}':<50} "
                            f"{n_steps / raw:>9,.0f} {raw:>8.2f}"
                        )
        print(
            f"\ngroups: {args.groups_total} trajectories in the run (groups of "
            f"{args.group_size}) + as many in another run\n"
        )
        print(f"{'backend':<11} {'query':<36} {'median s':>9} {'result':>10}")
        for name, new_url in backends:
            store = TrajectoryStore(new_url())
            run_id = bulk_trajectories(store, args.groups_total, args.group_size)
            queries: list[tuple[str, Callable[[], Any]]] = [
                ("groups(run=...)", lambda s=store, r=run_id: s.groups(run=r)),
                ("groups() (all 200k trajectories)", lambda s=store: s.groups()),
                (
                    "trajectories(run=..., limit=100)",
                    lambda s=store, r=run_id: s.trajectories(run=r, limit=100),
                ),
                ("trajectories(min_reward=0.8)", lambda s=store: s.trajectories(min_reward=0.8)),
            ]
            for query, fn in queries:
                seconds, result = timed(fn)
                print(f"{name:<11} {query:<36} {seconds:>9.3f} {len(result):>10,}")
            store.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
