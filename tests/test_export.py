"""Exports of stored trajectories: JSON Lines round trip (images as files or base64) and the
Parquet steps table, against what the store hands out."""

from __future__ import annotations

import asyncio
import base64
import builtins
import hashlib
import json
import math
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent_graph.runner import Runner, make_group_tasks
from nodes.backends.base import TextCompletion
from storage.export import export_jsonl, export_parquet
from storage.recorder import SQLRecorder
from storage.store import TrajectoryStore
from tests.pg import EDIT, STOP, graph_context
from tests.scripted import CountingPainter

XSS_PROMPT = '<script>alert("pwned")</script> two red circles & a <b>star</b>'
MALFORMED = "The image looks wrong </think> <img src=x onerror=alert(1)> fix it"
SHAPEWORLD_CATEGORIES = ("counting", "position_count", "multi_count", "colors")


class PreciseChat:
    """A planner whose log-probs need all 17 significant digits (and whose ids are large), so
    that any rounding on the way out shows."""

    model_id = "precise-chat"

    async def chat(self, request: object) -> TextCompletion:
        ids = (0, 151_643, 2**31 - 1, 7)
        logprobs = tuple(math.log((i + 1) / (i + math.pi)) for i in range(len(ids)))
        return TextCompletion(text="BLUEPRINT", token_ids=ids, logprobs=logprobs, model="precise")


def with_planner(context: Any, planner: Any) -> Any:
    return replace(context, backends=replace(context.backends, planner=planner))


class BrokenEditor(CountingPainter):
    async def edit(self, request: object) -> object:
        raise RuntimeError("editor crashed <b>badly</b>")


async def populate_store(store: TrajectoryStore) -> dict[str, str]:
    """A store with varied real trajectories: ShapeWorld in the three modes (real images,
    reflections, sub-tasks), scripted ones with token ids and extreme log-probs, an XSS prompt,
    a malformed reflection, a failed trajectory and rewards. Returns the run ids by name."""
    from agent_graph.presets import shapeworld_context
    from nodes.backends.shapeworld import fixed_prompt_set

    items = [i for i in fixed_prompt_set(1, seed=0) if i.category in SHAPEWORLD_CATEGORIES]
    shapes = store.create_run("shapeworld", {"note": "<i>config</i>"})
    for mode in ("auto", "reflect", "decompose"):
        async with SQLRecorder(store, shapes.id) as recorder:
            context = shapeworld_context(mode, images=store, recorder=recorder)
            tasks = make_group_tasks([i.text for i in items], 2, 0, [i.category for i in items])
            await Runner(context, concurrency=32).run(tasks)
    scripted = store.create_run("scripted")
    async with SQLRecorder(store, scripted.id) as recorder:
        context = graph_context(
            store, recorder, mode="reflect", reflections=(MALFORMED, EDIT, STOP)
        )
        context = with_planner(context, PreciseChat())
        await Runner(context).run(make_group_tasks([XSS_PROMPT], 2, 7, ["xss"]))
        context = graph_context(store, recorder, mode="decompose", reflections=(EDIT,))
        await Runner(context).run(make_group_tasks(["two red circles and a blue square"], 1, 3))
        broken = graph_context(
            store, recorder, mode="reflect", reflections=(EDIT,), painter=BrokenEditor()
        )
        await Runner(broken).run(make_group_tasks(["a failing prompt"], 1, 5))
    first = store.trajectories(run=scripted.id)[0]
    store.add_reward(first.id, "judge", 0.625, source="test")
    store.add_reward(first.id, "judge", -1e-300, source="test again")
    store.add_reward(first.id, "format", 1.0, step=2, details={"why": "<ok>"})
    return {"shapeworld": shapes.id, "scripted": scripted.id}


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrajectoryStore, dict[str, str]]:
    path = tmp_path_factory.mktemp("export") / "atelier.db"
    store = TrajectoryStore(f"sqlite:///{path}")
    runs = asyncio.run(populate_store(store))
    yield store, runs
    store.close()


def bits(values) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_against_store(store: TrajectoryStore, records: list[dict]) -> None:
    """Every exported trajectory equals the store's: steps, generations bit-exact, rewards."""
    stored = store.trajectories()
    assert [r["id"] for r in records] == [t.id for t in stored]
    for record in records:
        detail = store.trajectory(record["id"])
        assert record["prompt"] == detail.prompt and record["status"] == detail.status
        assert (record["score"], record["correct"]) == (detail.score, detail.correct)
        assert record["rewards"] == detail.rewards
        assert record["final_state"] == detail.final_state
        assert [s["seq"] for s in record["steps"]] == [s.seq for s in detail.steps]
        for mine, theirs in zip(record["steps"], detail.steps, strict=True):
            assert (mine["node"], mine["update"]) == (theirs.node, theirs.update)
            assert len(mine["generations"]) == len(theirs.generations)
            for g, h in zip(mine["generations"], theirs.generations, strict=True):
                assert tuple(g["token_ids"]) == h.token_ids
                assert bits(g["logprobs"]) == bits(h.logprobs)
            assert [i["ref"] for i in mine["images_in"]] == [i.ref for i in theirs.images_in]
            assert [i["ref"] for i in mine["images_out"]] == [i.ref for i in theirs.images_out]
        step_rewards = [(r.step_seq, r.name, r.value) for r in detail.reward_records]
        assert [(r["step"], r["name"], r["value"]) for r in record["reward_records"]] == (
            step_rewards
        )


def test_jsonl_round_trip_with_image_files(populated, tmp_path):
    store, _ = populated
    out = tmp_path / "out" / "all.jsonl"
    count = export_jsonl(store, out)
    records = read_jsonl(out)
    assert count == len(records) == len(store.trajectories()) > 20
    check_against_store(store, records)
    # the scripted chat's token ids and extreme log-probs did go through
    logprobs = [
        lp for r in records for s in r["steps"] for g in s["generations"] for lp in g["logprobs"]
    ]
    assert -5e-324 in logprobs and -745.1 in logprobs
    assert any(str(lp) == "-0.0" for lp in logprobs)
    assert math.log(2 / (1 + math.pi)) in logprobs
    # images: files named by the sha256 of their bytes, beside the output, by relative path
    image_dir = out.parent / "all_images"
    files = sorted(image_dir.iterdir())
    refs = {
        i["ref"] for r in records for s in r["steps"] for i in (*s["images_in"], *s["images_out"])
    } | {r["final_image"]["ref"] for r in records if r["final_image"]}
    assert {f.stem for f in files} == refs
    for f in files:
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.stem and f.suffix == ".png"
    for record in records:
        for step in record["steps"]:
            for image in step["images_out"]:
                assert image["path"] == f"all_images/{image['ref']}.png"
                assert (out.parent / image["path"]).is_file()
                assert (
                    image["width"] > 0
                    and image["size"] == (out.parent / image["path"]).stat().st_size
                )
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp files left


def test_jsonl_base64_images_decode_to_the_stored_bytes(populated, tmp_path):
    store, runs = populated
    out = tmp_path / "shapes.jsonl"
    count = export_jsonl(store, out, run=runs["shapeworld"], images="base64")
    records = read_jsonl(out)
    assert count == len(records) == store.run(runs["shapeworld"]).trajectory_count
    assert {r["run_id"] for r in records} == {runs["shapeworld"]}
    assert not (tmp_path / "shapes_images").exists()
    seen = 0
    for record in records:
        for step in record["steps"]:
            for image in (*step["images_in"], *step["images_out"]):
                assert base64.b64decode(image["base64"]) == store.image_bytes(image["ref"])
                seen += 1
        final = record["final_image"]
        assert base64.b64decode(final["base64"]) == store.image_bytes(final["ref"])
    assert seen > 0


def test_jsonl_without_images_and_with_an_explicit_image_dir(populated, tmp_path):
    store, runs = populated
    out = tmp_path / "a.jsonl"
    export_jsonl(store, out, run=runs["scripted"], images="none")
    record = read_jsonl(out)[0]
    image = record["steps"][1]["images_out"][0]
    assert set(image) == {"ref", "width", "height", "size"}
    elsewhere = tmp_path / "pngs"
    export_jsonl(store, tmp_path / "sub" / "b.jsonl", run=runs["scripted"], image_dir=elsewhere)
    record = read_jsonl(tmp_path / "sub" / "b.jsonl")[0]
    path = record["steps"][1]["images_out"][0]["path"]
    assert path.startswith("../pngs/") and (tmp_path / "sub" / path).is_file()
    with pytest.raises(ValueError, match="images must be one of"):
        export_jsonl(store, out, images="inline")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="no run"):
        export_jsonl(store, tmp_path / "c.jsonl", run="no-such-run")
    assert not (tmp_path / "c.jsonl").exists()


def test_parquet_steps_table_equals_the_store(populated, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    store, _ = populated
    out = tmp_path / "steps.parquet"
    rows = export_parquet(store, out)
    table = pq.read_table(out)
    details = [store.trajectory(t.id) for t in store.trajectories()]
    steps = [(d, s) for d in details for s in d.steps]
    assert rows == table.num_rows == len(steps) > 100
    for column in (
        "trajectory_id",
        "prompt",
        "mode",
        "status",
        "score",
        "correct",
        "seq",
        "node",
        "latency_s",
        "update",
        "token_ids",
        "logprobs",
        "images_out",
        "images_out_scores",
        "images_out_paths",
        "final_image_path",
        "trajectory_rewards",
        "step_rewards",
    ):
        assert column in table.column_names
    for row, (detail, step) in zip(table.to_pylist(), steps, strict=True):
        assert (row["trajectory_id"], row["seq"], row["node"]) == (detail.id, step.seq, step.node)
        assert (row["prompt"], row["mode"], row["score"]) == (
            detail.prompt,
            detail.mode,
            detail.score,
        )
        assert row["latency_s"] == step.latency_s
        assert json.loads(row["update"]) == step.update
        assert row["token_ids"] == [list(g.token_ids) for g in step.generations]
        assert [bits(lp) for lp in row["logprobs"]] == [bits(g.logprobs) for g in step.generations]
        assert row["images_out"] == [i.ref for i in step.images_out]
        assert row["images_out_paths"] == [f"steps_images/{i.ref}.png" for i in step.images_out]
        assert dict(row["trajectory_rewards"]) == detail.rewards
        scores = [i["score"] for i in step.update.get("images", [])]
        assert row["images_out_scores"] == scores
    rewarded = [r for r in table.to_pylist() if r["step_rewards"]]
    assert [(r["seq"], dict(r["step_rewards"])) for r in rewarded] == [(2, {"format": 1.0})]


def test_parquet_embeds_png_bytes_and_works_on_an_empty_selection(populated, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    store, runs = populated
    out = tmp_path / "bytes.parquet"
    rows = export_parquet(store, out, run=runs["scripted"], images="bytes")
    table = pq.read_table(out).to_pylist()
    assert (
        rows
        == len(table)
        == sum(len(store.steps(t.id)) for t in store.trajectories(run=runs["scripted"]))
    )
    for row in table:
        for ref, png in zip(
            row["images_in"] + row["images_out"],
            row["images_in_png"] + row["images_out_png"],
            strict=True,
        ):
            assert png == store.image_bytes(ref)
    empty = store.create_run("empty")
    assert export_parquet(store, tmp_path / "empty.parquet", run=empty.id, images="none") == 0
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0


def test_parquet_without_pyarrow_says_how_to_install_it(populated, tmp_path, monkeypatch):
    store, _ = populated
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match=r"pip install pyarrow"):
        export_parquet(store, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


async def test_jsonl_round_trip_on_both_backends(store, tmp_path):
    run = store.create_run("small")
    async with SQLRecorder(store, run.id) as recorder:
        context = graph_context(store, recorder, mode="reflect", reflections=(EDIT, STOP))
        await Runner(context).run(make_group_tasks(["two red circles", XSS_PROMPT], 2, 1))
    out = tmp_path / "small.jsonl"
    assert export_jsonl(store, out, images="base64") == 4
    records = read_jsonl(out)
    check_against_store(store, records)
    assert all(r["started_at"].endswith("+00:00") for r in records)
