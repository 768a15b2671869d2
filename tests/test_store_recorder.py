"""SQLRecorder: group commit under hundreds of concurrent trajectories, and no silent loss."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from PIL import Image
from sqlalchemy import func, select

from agent_graph.graph import build_reasoner, step_limit
from agent_graph.recording import Recorder, StepRecord
from agent_graph.runner import Runner, make_group_tasks
from nodes.common import NodeTrace
from nodes.state import ReasonerState, Task
from storage.images import ImageNotFound, MemoryImageStore
from storage.recorder import RecorderBroken, RecorderClosed, SQLRecorder
from storage.schema import GenerationRow, StepImageRow, StepRow, TrajectoryRow
from storage.store import TrajectoryNotFound
from storage.writes import TrajectoryExists
from tests.pg import STOP, graph_context

PROMPTS = [
    "two red circles",
    "four blue squares",
    "a star above a green triangle",
    "three yellow stars left of a red circle",
]


def state(tid: str, **fields) -> ReasonerState:
    return ReasonerState(trajectory_id=tid, task=Task(prompt="p", group_id="g"), **fields)


def step(tid: str, seq: int, refs_out=()) -> StepRecord:
    return StepRecord(
        tid,
        seq,
        "draw",
        1.0,
        0.01,
        state(tid, step_count=seq).model_dump(mode="json"),
        {"step_count": seq + 1},
        NodeTrace(images_out=list(refs_out)),
    )


def db_steps(store, tid):
    return [(s.seq, s.node) for s in store.steps(tid)]


async def test_200_concurrent_trajectories_are_recorded_exactly_once_with_group_commit(store):
    tasks = make_group_tasks(PROMPTS * 10, group_size=5, seed=3)  # 200 trajectories
    assert len(tasks) == 200
    async with SQLRecorder(store, "big") as recorder:
        assert isinstance(recorder, Recorder)
        context = graph_context(store, recorder)
        results = await Runner(context, concurrency=200).run(tasks)
    assert {r.status for r in results} == {"succeeded"}
    assert {r.mode for r in results} == {"direct", "reflect", "decompose"}

    total = sum(len(r.steps) for r in results)
    with store.db.read() as conn:
        assert conn.scalar(select(func.count()).select_from(StepRow)) == total
        generations = conn.scalar(select(func.count()).select_from(GenerationRow))
        step_images = conn.scalar(select(func.count()).select_from(StepImageRow))
    assert generations == sum(len(s.trace.generations) for r in results for s in r.steps)
    assert step_images == sum(
        len(s.trace.images_in) + len(s.trace.images_out) for r in results for s in r.steps
    )
    for result in results:
        stored = store.steps(result.trajectory_id)
        assert [s.seq for s in stored] == list(range(len(result.steps)))  # contiguous, once
        assert [(s.seq, s.node) for s in stored] == [(s.seq, s.node) for s in result.steps]
        for mine, theirs in zip(stored, result.steps, strict=True):
            assert [g.token_ids for g in mine.generations] == [
                g.token_ids for g in theirs.trace.generations
            ]
            assert [i.ref for i in mine.images_out] == theirs.trace.images_out
        summary = store.trajectory(result.trajectory_id)
        assert (summary.status, summary.mode, summary.image_count, summary.final_image) == (
            "succeeded",
            result.mode,
            result.image_count,
            result.state.final_image,
        )
    groups = store.groups(run="big")
    assert len(groups) == 40 and {len(m) for m in groups.values()} == {5}
    # Group commit: far fewer commits than records, yet every caller waited for its commit.
    stats = recorder.stats
    assert stats.records == total + 2 * len(results) + 1  # + starts, finishes, the close
    assert stats.commits < stats.records / 4, stats
    assert stats.largest_batch > 10


async def test_a_bad_record_fails_only_its_own_caller(store):
    good = store.put(Image.new("RGB", (4, 4), "red"))
    async with SQLRecorder(store, "iso") as recorder:
        await asyncio.gather(*(recorder.start_trajectory(state(f"t{i}")) for i in range(20)))
        outcomes = await asyncio.gather(
            *(recorder.record_step(step(f"t{i}", 0, [good])) for i in range(20)),
            recorder.record_step(step("t0", 1, ["f" * 64])),  # an image nobody stored
            recorder.record_step(step("t1", 0, [good])),  # a duplicate step
            return_exceptions=True,
        )
    assert outcomes[:20] == [None] * 20
    assert isinstance(outcomes[20], ImageNotFound) and "use the store" in str(outcomes[20])
    assert isinstance(outcomes[21], Exception) and "unique" in str(outcomes[21]).lower()
    assert all(db_steps(store, f"t{i}") == [(0, "draw")] for i in range(20))
    assert recorder.stats.failed_batches >= 1


async def test_a_failing_database_reaches_every_waiting_caller_and_the_recorder_recovers(
    store, monkeypatch
):
    recorder = SQLRecorder(store, "fail")
    await recorder.start_trajectory(state("t"))
    real_write = store.db.write

    def broken(work):
        raise OSError("disk full")

    monkeypatch.setattr(store.db, "write", broken)
    outcomes = await asyncio.gather(
        *(recorder.record_step(step("t", i)) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, OSError) and "disk full" in str(o) for o in outcomes)
    assert db_steps(store, "t") == []
    monkeypatch.setattr(store.db, "write", real_write)
    await recorder.record_step(step("t", 0))
    assert db_steps(store, "t") == [(0, "draw")]
    await recorder.aclose()


async def test_a_dead_writer_fails_waiting_and_later_callers(store):
    recorder = SQLRecorder(store, "dead")
    await recorder.start_trajectory(state("t"))
    recorder._task.cancel()
    with pytest.raises(RecorderBroken):
        await recorder.record_step(step("t", 0))
    with pytest.raises(RecorderBroken):
        await recorder.aclose()


async def test_closing_marks_unfinished_trajectories_incomplete(store):
    recorder = SQLRecorder(store, "closing")
    await recorder.start_trajectory(state("done"))
    await recorder.start_trajectory(state("left"))
    await recorder.record_step(step("left", 0))
    await recorder.finish_trajectory("done", "succeeded", state("done"), None)
    await recorder.aclose()
    await recorder.aclose()  # idempotent
    assert {t.id: t.status for t in store.trajectories(run="closing")} == {
        "done": "succeeded",
        "left": "incomplete",
    }
    assert store.run("closing").status == "incomplete"
    with store.db.read() as conn:  # no final state: SQL NULL, not the JSON text 'null'
        assert (
            conn.scalar(
                select(func.count())
                .select_from(TrajectoryRow)
                .where(TrajectoryRow.final_state.is_(None))
            )
            == 1
        )
    with pytest.raises(RecorderClosed):
        await recorder.record_step(step("left", 1))


async def test_an_incomplete_trajectory_can_be_resumed_but_a_finished_one_not_restarted(store):
    async with SQLRecorder(store, "first") as recorder:
        await recorder.start_trajectory(state("t"))
        await recorder.record_step(step("t", 0))
    assert store.trajectory("t").status == "incomplete"
    resumed = store.last_state("t", ReasonerState)
    assert resumed.step_count == 1
    async with SQLRecorder(store, "second") as recorder:
        await recorder.start_trajectory(resumed)
        assert store.trajectory("t").status == "running"
        await recorder.record_step(step("t", 1))
        await recorder.finish_trajectory(
            "t", "succeeded", store.last_state("t", ReasonerState), None
        )
        with pytest.raises(TrajectoryExists):
            await recorder.start_trajectory(state("t"))
    assert db_steps(store, "t") == [(0, "draw"), (1, "draw")]
    assert store.trajectory("t").run_id == "second"


async def test_images_from_another_store_are_copied_in_with_their_steps(store):
    memory = MemoryImageStore()
    async with SQLRecorder(store, "copy", images=memory) as recorder:
        context = graph_context(memory, recorder, mode="reflect")
        [result] = await Runner(context).run([Task(prompt="a red circle", group_id="g")])
    refs = [img.ref for img in result.state.images]
    assert refs and all(ref in store for ref in refs)
    assert store.get(refs[-1]).tobytes() == memory.get(refs[-1]).tobytes()


async def test_a_graph_run_without_start_trajectory_still_records_its_trajectory(store):
    async with SQLRecorder(store, "bare") as recorder:
        context = graph_context(store, recorder, mode="direct")
        initial = state("bare-1")
        await build_reasoner().ainvoke(
            initial, context=context, config={"recursion_limit": step_limit(initial)}
        )
    detail = store.trajectory("bare-1")
    assert [s.node for s in detail.steps] == ["plan", "draw", "stop"]
    assert detail.prompt == "p" and detail.mode == "direct"
    assert detail.status == "incomplete"  # never finished through the recorder


async def test_a_cancelled_caller_does_not_cancel_the_write(store):
    async with SQLRecorder(store, "cancel") as recorder:
        await recorder.start_trajectory(state("t"))
        waiter = asyncio.ensure_future(recorder.record_step(step("t", 0)))
        await asyncio.sleep(0)
        waiter.cancel()
        await recorder.flush()
    assert db_steps(store, "t") == [(0, "draw")]


async def test_images_put_while_recording_are_readable_before_and_after_their_commit(store):
    async with SQLRecorder(store, "buf") as recorder:
        await recorder.start_trajectory(state("t"))
        ref = store.put(Image.new("RGB", (3, 5), "blue"))
        assert ref in store and store.get(ref).size == (3, 5)  # buffered, not yet written
        await recorder.record_step(step("t", 0, [ref]))
        assert store._pending_images() == []
        assert store.get(ref).size == (3, 5)
    assert Counter(i.ref for s in store.steps("t") for i in s.images_out) == {ref: 1}


async def test_step_stages_follow_the_method(store):
    async with SQLRecorder(store, "stages") as recorder:
        for mode in ("direct", "reflect", "decompose"):
            context = graph_context(
                store, recorder, mode=mode, reflections=("<think>x</think>Add a dot.", STOP)
            )
            [result] = await Runner(context).run([Task(prompt=f"p {mode}")])
            stages = [(s.node, s.stage) for s in store.steps(result.trajectory_id)]
            if mode == "direct":
                assert stages == [("plan", "reason"), ("draw", "reason"), ("stop", "stop")]
            elif mode == "reflect":
                assert stages[:3] == [
                    ("plan", "reason"),
                    ("draw", "reason"),
                    ("reflect", "reflect_refine"),
                ]
                assert ("refine", "reflect_refine") in stages
            else:
                assert stages[:3] == [
                    ("plan", "reason"),
                    ("decompose", "decompose"),
                    ("draw", "decompose"),
                ]
                assert ("refine", "decompose") in stages


async def test_finishing_an_unknown_trajectory_fails_only_its_caller_and_others_get_durations(
    store,
):
    async with SQLRecorder(store, "first") as recorder:
        await recorder.start_trajectory(state("earlier"))
        await recorder.record_step(step("earlier", 0))
    async with SQLRecorder(store, "second") as recorder:
        await recorder.start_trajectory(state("fresh"))
        # Submitted together, so they share one batch: the bad finish must not sink the others.
        outcomes = await asyncio.gather(
            recorder.finish_trajectory("ghost", "failed", None, "never started"),
            recorder.finish_trajectory("earlier", "failed", None, "given up"),
            recorder.finish_trajectory("fresh", "succeeded", None, None),
            return_exceptions=True,
        )
    assert isinstance(outcomes[0], KeyError) and "ghost" in str(outcomes[0])
    assert outcomes[1:] == [None, None]
    earlier, fresh = store.trajectory("earlier"), store.trajectory("fresh")
    assert (earlier.status, earlier.error, fresh.status) == ("failed", "given up", "succeeded")
    # "earlier" was not started by this recorder: its duration comes from the stored start.
    assert earlier.duration_s == pytest.approx(
        (earlier.finished_at - earlier.started_at).total_seconds(), abs=1e-3
    )
    assert 0 <= fresh.duration_s <= (fresh.finished_at - fresh.started_at).total_seconds() + 1e-3
    with pytest.raises(TrajectoryNotFound):
        store.trajectory("ghost")
