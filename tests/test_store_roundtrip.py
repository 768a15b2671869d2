"""What goes into the store comes back: every field, bit-exact encodings, images, queries."""

from __future__ import annotations

import itertools
import math
import struct
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import func, select

from agent_graph.recording import StepRecord
from agent_graph.runner import Runner, make_group_tasks
from nodes.common import Generation, NodeTrace
from nodes.state import (
    Budget,
    Decision,
    FinalJudgement,
    ImageRecord,
    Mode,
    ReasonerState,
    Task,
)
from storage.codec import pack_ids, pack_logprobs, unpack_ids, unpack_logprobs
from storage.images import ImageNotFound, InvalidImageRef, encode_png
from storage.recorder import SQLRecorder
from storage.rows import merge_update
from storage.schema import ImageRow, StepImageRow
from storage.store import TrajectoryNotFound, TrajectoryStore
from tests.pg import graph_context

EXTREME_LOGPROBS = (
    -1e-300,
    -745.1,
    -5e-324,
    -0.0,
    0.0,
    -1.7976931348623157e308,
    -2.2250738585072014e-308,
    -1e-320,
    -0.1,
    -math.pi,
)
LARGE_IDS = (0, 1, 151_643, 2**31 - 1, -(2**31), 10**9, 255, 256, 65_535)


def bits(values):
    return [struct.pack("<d", v) for v in values]


def test_codec_is_bit_exact_little_endian_and_refuses_overflow():
    assert unpack_ids(pack_ids(LARGE_IDS)) == LARGE_IDS
    assert bits(unpack_logprobs(pack_logprobs(EXTREME_LOGPROBS))) == bits(EXTREME_LOGPROBS)
    assert pack_ids([1, 2**31 - 1]) == b"\x01\x00\x00\x00\xff\xff\xff\x7f"
    assert pack_logprobs([-745.1]) == struct.pack("<d", -745.1)
    assert len(pack_ids(range(1000))) == 4000 and len(pack_logprobs([0.5] * 10)) == 80
    assert unpack_ids(b"") == () and unpack_logprobs(b"") == ()
    with pytest.raises(OverflowError):
        pack_ids([2**31])
    with pytest.raises(ValueError):
        unpack_logprobs(b"\x00" * 12)


def image(shade: int, size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, (shade, 255 - shade, 7))


def state_for(trajectory_id: str, **fields) -> ReasonerState:
    task = Task(
        prompt="two red circles left of a star",
        group_id="g1",
        sample_index=3,
        seed=2**62 + 12345,
        category="position",
    )
    return ReasonerState(
        trajectory_id=trajectory_id, task=task, budget=Budget(max_rounds=2), **fields
    )


async def test_every_field_of_a_trajectory_and_its_steps_round_trips(store):
    run = store.create_run("round trip", {"lr": 1e-5, "note": "ü"})
    ref_a, ref_b = store.put(image(10)), store.put(image(200, (7, 9)))
    initial = state_for("t-1")
    decision = Decision(
        kind="mode",
        action="reflect",
        log_prob=-1.0986122886681098,
        policy="uniform-mode",
        version="7",
        step=0,
    )
    generations = [
        Generation(
            "plan",
            "BLUEPRINT ü ✓",
            LARGE_IDS,
            EXTREME_LOGPROBS[: len(LARGE_IDS)],
            "planner-0.5b",
            0.125,
        ),
        Generation("critique", "", (), (), "vlm", 0.0),
    ]
    record = StepRecord(
        trajectory_id="t-1",
        seq=0,
        node="plan",
        started_at=1_700_000_000.123456,
        latency_s=0.25,
        state_before=initial.model_dump(mode="json"),
        update={
            "mode": "reflect",
            "blueprint": "BLUEPRINT",
            "step_count": 1,
            "decisions": [decision.model_dump(mode="json")],
        },
        trace=NodeTrace(
            generations=generations,
            images_in=[ref_a],
            images_out=[ref_b, ref_a],
            models=["planner-0.5b", "vlm"],
        ),
        error="plan: ValueError: partial",
    )
    final = initial.model_copy(
        update={
            "mode": Mode.REFLECT,
            "step_count": 1,
            "final_image": ref_b,
            "images": [ImageRecord(ref=ref_b, node="draw", instruction="x", score=0.5)],
            "judgement": FinalJudgement(score=0.625, correct=True, criteria={"count": True}),
        }
    )
    async with SQLRecorder(store, run.id) as recorder:
        await recorder.start_trajectory(initial)
        await recorder.record_step(record)
        await recorder.finish_trajectory("t-1", "failed", final, "graph: boom")

    detail = store.trajectory("t-1")
    assert (detail.run_id, detail.prompt, detail.category, detail.group_id) == (
        run.id,
        "two red circles left of a star",
        "position",
        "g1",
    )
    assert (detail.sample_index, detail.seed, detail.mode, detail.status) == (
        3,
        2**62 + 12345,
        "reflect",
        "failed",
    )
    assert (detail.final_image, detail.image_count, detail.score, detail.correct) == (
        ref_b,
        1,
        0.625,
        True,
    )
    assert detail.error == "graph: boom" and detail.rewards == {}
    assert detail.finished_at >= detail.started_at and detail.duration_s >= 0
    assert detail.started_at.tzinfo is not None
    assert detail.initial_state == initial.model_dump(mode="json")
    assert detail.final_state == final.model_dump(mode="json")
    assert ReasonerState.model_validate(detail.final_state) == final

    [step] = detail.steps
    assert (step.trajectory_id, step.seq, step.node, step.stage) == ("t-1", 0, "plan", "reason")
    assert step.started_at.timestamp() == pytest.approx(1_700_000_000.123456, abs=1e-6)
    assert step.latency_s == 0.25 and step.error == "plan: ValueError: partial"
    assert step.text == "BLUEPRINT ü ✓\n\n"
    assert step.models == ["planner-0.5b", "vlm"]
    assert (step.policy, step.policy_version) == ("uniform-mode", "7")
    assert step.state_before == record.state_before and step.update == record.update
    first, second = step.generations
    assert (first.position, first.role, first.text, first.model, first.latency_s) == (
        0,
        "plan",
        "BLUEPRINT ü ✓",
        "planner-0.5b",
        0.125,
    )
    assert first.token_ids == LARGE_IDS
    assert bits(first.logprobs) == bits(EXTREME_LOGPROBS[: len(LARGE_IDS)])
    assert (second.role, second.text, second.token_ids, second.logprobs) == ("critique", "", (), ())
    assert [i.ref for i in step.images_in] == [ref_a]
    assert [i.ref for i in step.images_out] == [ref_b, ref_a]
    out = step.images_out[0]
    assert (out.width, out.height, out.size) == (7, 9, len(encode_png(image(200, (7, 9)))))
    assert out.load().tobytes() == image(200, (7, 9)).tobytes()
    assert store.steps("t-1") == detail.steps

    [listed] = store.runs()
    assert (listed.id, listed.name, listed.config, listed.status, listed.trajectory_count) == (
        run.id,
        "round trip",
        {"lr": 1e-5, "note": "ü"},
        "finished",
        1,
    )


async def test_the_same_image_from_two_steps_is_stored_once(store):
    same = image(42)
    ref = store.put(same)
    assert store.put(image(42)) == ref and store.put_bytes(encode_png(same)) == ref
    async with SQLRecorder(store, "r") as recorder:
        await recorder.start_trajectory(state_for("t-2"))
        for seq in range(2):
            ref_again = store.put(image(42))  # a second "draw" of identical pixels
            await recorder.record_step(
                StepRecord(
                    "t-2",
                    seq,
                    "draw",
                    1.0,
                    0.0,
                    state_for("t-2", step_count=seq).model_dump(mode="json"),
                    {"step_count": seq + 1},
                    NodeTrace(images_out=[ref_again]),
                )
            )
    with store.db.read() as conn:
        assert conn.scalar(select(func.count()).select_from(ImageRow)) == 1
        assert conn.scalar(select(func.count()).select_from(StepImageRow)) == 2
    assert store.image_bytes(ref) == encode_png(same)
    assert store.image(ref).tobytes() == same.tobytes() and ref in store


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])  # FULL also fsyncs image files
def test_images_can_live_in_a_directory_beside_the_database(tmp_path, synchronous):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with TrajectoryStore(url, image_dir=str(tmp_path / "img"), synchronous=synchronous) as s:
        assert s.files.fsync == (synchronous == "FULL")
        ref = s.put(image(3))
        assert s.put(image(3)) == ref
        with s.db.read() as conn:
            data, width = conn.execute(select(ImageRow.data, ImageRow.width)).one()
        assert data is None and width == 12
        assert (tmp_path / "img" / ref[:2] / f"{ref}.png").read_bytes() == encode_png(image(3))
    with TrajectoryStore(url, image_dir=str(tmp_path / "img")) as s:
        assert s.get(ref).tobytes() == image(3).tobytes()
        assert s.image_info(ref).height == 10


@pytest.mark.parametrize(
    "bad",
    [
        "../../../../etc/passwd",
        "../" + "a" * 61,
        "a" * 63 + "/",
        "A" * 64,
        "a" * 64 + "\n",
        "/" + "a" * 63,
        "a" * 32 + "/../" + "a" * 28,
        "",
        "a" * 65,
    ],
)
def test_image_refs_that_are_not_sha256_hex_are_refused(store, tmp_path, bad):
    for method in (store.get, store.get_bytes, store.image, store.image_bytes, store.image_info):
        with pytest.raises(InvalidImageRef):
            method(bad)
    assert bad not in store
    with (
        TrajectoryStore(f"sqlite:///{tmp_path / 'd.db'}", image_dir=str(tmp_path / "i")) as d,
        pytest.raises(InvalidImageRef),
    ):
        d.get_bytes(bad)


async def test_a_step_naming_a_malformed_image_ref_is_refused_before_it_is_queued(store):
    async with SQLRecorder(store, "r") as recorder:
        with pytest.raises(InvalidImageRef):
            await recorder.record_step(
                StepRecord(
                    "t",
                    0,
                    "draw",
                    1.0,
                    0.0,
                    state_for("t").model_dump(mode="json"),
                    {},
                    NodeTrace(images_in=["../../etc/passwd"]),
                )
            )


def test_unknown_images_and_trajectories_raise(store):
    with pytest.raises(ImageNotFound):
        store.get_bytes("0" * 64)
    assert "0" * 64 not in store and 42 not in store
    with pytest.raises(TrajectoryNotFound):
        store.trajectory("nope")
    with pytest.raises(TrajectoryNotFound):
        store.last_state("nope", ReasonerState)
    with pytest.raises(ValueError):
        store.put_bytes(b"not an image")


async def run_groups(store, run_id, prompts, group_size, mode="auto"):
    async with SQLRecorder(store, run_id) as recorder:
        context = graph_context(store, recorder, mode=mode)
        return await Runner(context, concurrency=16).run(
            make_group_tasks(prompts, group_size=group_size, seed=len(run_id))
        )


async def test_groups_have_g_members_and_queries_filter(store):
    prompts = [f"{n} red circles" for n in ("one", "two", "three", "four", "five")]
    results = await run_groups(store, "run-a", prompts, group_size=4)
    await run_groups(store, "run-b", prompts[:2], group_size=3, mode="direct")

    groups = store.groups(run="run-a")
    assert len(groups) == 5
    for group_id, members in groups.items():
        assert [m.sample_index for m in members] == [0, 1, 2, 3]
        assert {m.group_id for m in members} == {group_id} and len({m.prompt for m in members}) == 1
        assert {m.run_id for m in members} == {"run-a"}
    assert sum(map(len, store.groups().values())) == 5 * 4 + 2 * 3
    assert all(len(m) == 3 for m in store.groups(run="run-b").values())

    assert len(store.trajectories(run="run-a")) == 20
    assert len(store.trajectories(run="run-a", limit=7)) == 7
    assert {t.mode for t in store.trajectories(run="run-b")} == {"direct"}
    modes = {r.mode for r in results}
    for mode in modes:
        assert {t.id for t in store.trajectories(run="run-a", mode=mode)} == {
            r.trajectory_id for r in results if r.mode == mode
        }
    assert len(store.trajectories(status="succeeded")) == 26
    assert store.trajectories(status="running") == []
    assert len(store.trajectories(min_reward=0.75)) == 26  # FixedJudge scores 0.75
    assert store.trajectories(min_reward=0.76) == []
    with pytest.raises(ValueError):
        store.trajectories(status="bogus")


async def test_rewards_summaries_and_policy_versions(store):
    [result] = await run_groups(store, "run-r", ["a red circle"], group_size=1)
    tid = result.trajectory_id
    store.add_reward(tid, "outcome", 0.25, source="judge")
    info = store.add_reward(tid, "outcome", 0.5, source="judge", details={"why": "recount"})
    store.add_reward(tid, "format", 1.0)
    step_reward = store.add_reward(tid, "stage", -0.5, step=1, source="tree-rl")
    assert (info.name, info.value, info.source, info.details) == (
        "outcome",
        0.5,
        "judge",
        {"why": "recount"},
    )
    assert step_reward.step_seq == 1
    assert store.trajectory(tid).rewards == {"outcome": 0.5, "format": 1.0}
    assert [r.value for r in store.rewards(tid, "outcome")] == [0.25, 0.5]
    assert [t.id for t in store.trajectories(min_reward=0.5, reward="outcome")] == [tid]
    assert store.trajectories(min_reward=0.6, reward="outcome") == []
    with pytest.raises(TrajectoryNotFound):
        store.add_reward("nope", "outcome", 1.0)
    with pytest.raises(Exception, match=r"(?i)foreign key|violates"):
        store.add_reward(tid, "stage", 1.0, step=999)  # no such step
    assert len(store.rewards(tid)) == 4  # the failed ones left nothing behind

    v1 = store.register_policy_version(
        "router", "1", path="/w/router-1.safetensors", metadata={"step": 100}
    )
    assert (
        store.register_policy_version(
            "router", "1", path="/w/router-1.safetensors", metadata={"step": 100}
        )
        == v1
    )
    with pytest.raises(ValueError, match="already registered"):
        store.register_policy_version("router", "1", path="/elsewhere")
    store.register_policy_version("router", "2")
    assert [p.version for p in store.policy_versions("router")] == ["1", "2"]
    assert v1.metadata == {"step": 100} and v1.created_at.tzinfo is not None


async def test_last_state_replays_every_step_into_the_next(store):
    results = await run_groups(store, "run-s", ["two red circles", "a star"], group_size=3)
    for result in results:
        steps = store.steps(result.trajectory_id)
        for step, following in itertools.pairwise(steps):
            merged = ReasonerState.model_validate(merge_update(step.state_before, step.update))
            assert merged == ReasonerState.model_validate(following.state_before)
        assert store.last_state(result.trajectory_id, ReasonerState) == result.state
        assert store.last_state_dict(
            result.trajectory_id, ReasonerState
        ) == result.state.model_dump(mode="json")


def test_timestamps_come_back_in_utc(store):
    run = store.create_run()
    assert run.created_at.utcoffset() == timedelta(0)
    assert run.name == run.id and run.status == "running"
