"""``storage.analysis``: every figure equals the same figure computed here in Python from the
store's plain reads (``trajectories``, ``trajectory``, ``steps_many``, ``rewards``,
``policy_versions``), on a store filled as users fill one (``tests/ui_store.py``), over SQLite
and PostgreSQL."""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections import Counter

import pytest

from storage.analysis import (
    UNKNOWN,
    group_view,
    run_groups,
    run_summaries,
    run_summary,
    training_series,
    version_usage,
)
from storage.store import TrajectoryStore
from tests.pg import BACKENDS
from tests.sql_spy import selects
from tests.ui_store import XSS_PROMPT, build_ui_store

pytest_plugins = ("tests.conftest_pg",)


@pytest.fixture(scope="module", params=BACKENDS)
def filled(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'ui.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    ids = build_ui_store(url, root / "versions", with_model=False)  # ShapeWorld only: fast
    store = TrajectoryStore(url)
    yield store, ids
    store.close()


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _same(a, b) -> bool:
    """Equal, floats within rounding (PostgreSQL may sum in another order)."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return type(a) is type(b) and _same(dataclasses.asdict(a), dataclasses.asdict(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return _close(a, b)
    return a == b


def _latest_trajectory_rewards(store, ids):
    latest: dict[tuple[str, str], float] = {}
    for reward in store.rewards(trajectory_ids=ids):  # by id: the last one wins
        if reward.step_seq is None:
            latest[(reward.trajectory_id, reward.name)] = reward.value
    return latest


# --- runs ---------------------------------------------------------------------------------


def test_run_summaries_equal_python_over_the_trajectories(filled):
    store, ids = filled
    for run_id in ids.run_ids:
        rows = store.trajectories(run=run_id)
        summary = run_summary(store, run_id)
        assert summary.run == store.run(run_id)
        assert summary.trajectories == len(rows) > 0
        assert summary.succeeded == sum(r.status == "succeeded" for r in rows)
        assert summary.failed == sum(r.status == "failed" for r in rows)
        judged = [r for r in rows if r.correct is not None]
        assert summary.judged == len(judged)
        assert summary.correct == sum(bool(r.correct) for r in judged)
        assert _close(summary.accuracy, summary.correct / len(judged) if judged else None)
        assert _close(summary.mean_score, _mean([r.score for r in rows]))
        assert _close(summary.mean_images, _mean([r.image_count for r in rows]))
        assert _close(summary.mean_duration_s, _mean([r.duration_s for r in rows]))
        modes = Counter(r.mode if r.mode is not None else UNKNOWN for r in rows)
        assert summary.mode_shares.keys() == modes.keys()
        for mode, n in modes.items():
            assert _close(summary.mode_shares[mode], n / len(rows))
        assert math.isclose(sum(summary.mode_shares.values()), 1.0)
        categories = {r.category if r.category is not None else UNKNOWN for r in rows}
        assert set(summary.categories) == categories
        for category, stats in summary.categories.items():
            members = [r for r in rows if (r.category or UNKNOWN) == category]
            judged = [r for r in members if r.correct is not None]
            assert (stats.count, stats.judged) == (len(members), len(judged))
            accuracy = sum(bool(r.correct) for r in judged) / len(judged) if judged else None
            assert _close(stats.accuracy, accuracy)
            assert _close(stats.mean_score, _mean([r.score for r in members]))
            assert _close(stats.mean_images, _mean([r.image_count for r in members]))
        latest = _latest_trajectory_rewards(store, [r.id for r in rows])
        names = {name for _, name in latest}
        assert set(summary.rewards) == names
        for name in names:
            values = [v for (_, n), v in latest.items() if n == name]
            assert _close(summary.rewards[name], statistics.fmean(values))
        # the summary column agrees: the latest trajectory-level value of each name
        assert {(r.id, n): v for r in rows for n, v in r.rewards.items()} == latest


def test_trained_runs_hold_the_trainers_rewards_and_the_xss_run_a_failure(filled):
    store, ids = filled
    for run_id in ids.trained_runs:
        rewards = run_summary(store, run_id).rewards
        assert {"checker", "format", "composite", "penalised", "advantage"} <= set(rewards)
        assert abs(rewards["advantage"]) < 1e-9  # group-normalised: mean 0 over every member
    reflect = run_summary(store, ids.demo_runs["reflect"])
    assert reflect.failed >= 1 and UNKNOWN in reflect.categories  # the XSS prompt: no category
    assert reflect.categories[UNKNOWN].count == 1


def test_a_run_summary_reads_no_step_and_few_statements(filled):
    store, ids = filled
    with selects(store) as statements:
        summaries = run_summaries(store, ids.run_ids)
    assert set(summaries) == set(ids.run_ids)
    assert len(statements) <= 6
    assert not any(re.search(r"\bsteps\b", s) for s in statements)
    assert _same(summaries[ids.trained_run], run_summary(store, ids.trained_run))
    with pytest.raises(KeyError):
        run_summary(store, "no-such-run")
    assert run_summaries(store, ["no-such-run"]) == {}


# --- groups -------------------------------------------------------------------------------


def _expected_groups(store, run_id):
    advantaged = {r.trajectory_id for r in store.rewards(name="advantage")}
    groups = []
    for group_id, members in store.groups(run=run_id).items():
        scores = [m.score for m in members if m.score is not None]
        groups.append(
            (
                min(m.started_at for m in members),
                group_id,
                members[0].prompt,
                len(members),
                _mean(scores),
                min(scores) if scores else None,
                max(scores) if scores else None,
                sum(bool(m.correct) for m in members),
                any(m.id in advantaged for m in members),
            )
        )
    groups.sort()
    return groups


def test_run_groups_equal_python_over_the_groups(filled):
    store, ids = filled
    for run_id in ids.run_ids:
        expected = _expected_groups(store, run_id)
        overviews, total = run_groups(store, run_id, limit=None)
        assert total == len(expected) == len(overviews)
        for overview, row in zip(overviews, expected, strict=True):
            started, group_id, prompt, members, mean, low, high, correct, advantages = row
            assert (overview.group_id, overview.prompt, overview.members) == (
                group_id,
                prompt,
                members,
            )
            assert overview.started_at == started
            assert _close(overview.mean_score, mean)
            assert (overview.min_score, overview.max_score) == (low, high)
            assert (overview.correct, overview.has_advantages) == (correct, advantages)
        trained = run_id in ids.trained_runs
        assert all(o.has_advantages for o in overviews) == trained
        if trained:
            assert all(o.members == 4 for o in overviews)
        # pages: the same order, sliced
        page, again = run_groups(store, run_id, offset=2, limit=3)
        assert again == total and page == overviews[2:5]


def test_group_view_members_rewards_images_and_decisions(filled):
    store, ids = filled
    view = group_view(store, ids.trained_run, ids.trained_group)
    members = store.trajectories(run=ids.trained_run, group=ids.trained_group)
    assert [m.summary.id for m in view.members] == [
        m.id for m in sorted(members, key=lambda m: m.sample_index)
    ]
    assert [m.summary.sample_index for m in view.members] == [0, 1, 2, 3]
    assert view.prompt == members[0].prompt and view.run_id == ids.trained_run
    names = set()
    trained_version = ids.versions[ids.trained_runs.index(ids.trained_run)]
    for member in view.members:
        tid = member.summary.id
        detail = store.trajectory(tid)
        assert member.rewards == store.rewards(tid)
        names |= {r.name for r in member.rewards}
        assert member.latest == detail.rewards  # the summary column: latest per name
        # the advantage the trainer stored for this member, with the version it trained
        (stored,) = store.rewards(tid, name="advantage")
        assert member.advantage == stored.value
        assert stored.details["trained"] == trained_version
        assert stored.details["group"] == ids.trained_group
        # images: every image the steps made, in order, the final one last
        made = list(dict.fromkeys(img.ref for s in detail.steps for img in s.images_out))
        assert sorted(member.images) == sorted(made)
        assert member.images[-1] == detail.final_image
        # decisions: as recorded on the steps, with their sampling log-probs
        recorded = [
            (s.seq, s.node, d["kind"], d["action"], d["log_prob"], d["policy"], d["version"])
            for s in detail.steps
            for d in s.update.get("decisions", [])
        ]
        assert recorded  # at least the router's
        assert [
            (d.step_seq, d.node, d.kind, d.action, d.log_prob, d.policy, d.version)
            for d in member.decisions
        ] == recorded
        router = [d for d in member.decisions if d.kind == "mode"]
        assert router and router[0].policy == "uniform-mode"  # iteration 0's behaviour
        assert router[0].log_prob == pytest.approx(math.log(1 / 3))
    assert view.reward_names == sorted(names)
    assert len({m.advantage for m in view.members}) > 1  # a learning signal


def test_group_view_of_an_unknown_group_raises_key_error(filled):
    store, ids = filled
    for run_id, group_id in (
        (ids.trained_run, "no-such-group"),
        (ids.demo_runs["direct"], "xss"),  # the XSS group is demo-reflect's
        ("no-such-run", ids.trained_group),
        (ids.trained_run, ""),
    ):
        with pytest.raises(KeyError):
            group_view(store, run_id, group_id)


def test_the_xss_prompt_comes_back_verbatim(filled):
    store, ids = filled
    view = group_view(store, ids.demo_runs["reflect"], "xss")
    assert view.prompt == XSS_PROMPT
    (member,) = view.members
    assert member.summary.id == ids.xss_trajectory and member.summary.status == "failed"
    assert member.images == [] and member.advantage is None
    overviews, _ = run_groups(store, ids.demo_runs["reflect"], limit=None)
    assert XSS_PROMPT in [o.prompt for o in overviews]


# --- training series and versions ---------------------------------------------------------


def test_training_series_of_the_shapeworld_loop(filled):
    store, ids = filled
    (series,) = training_series(store)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", series.key)
    assert series.key == training_series(store)[0].key  # stable
    assert series.policy == "router" and "grpo-0" in series.label
    versions = store.policy_versions(name="router")
    assert [f"router@{p.version}" for p in series.points] == ids.versions
    assert [p.iteration for p in series.points] == [0, 1]
    for point, info, run_id in zip(series.points, versions, ids.trained_runs, strict=True):
        assert point.created_at == info.created_at
        expected = {
            k: float(v)
            for k, v in info.metadata.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "series_iteration"
        }
        assert point.metrics == expected
        assert {"loss", "kl", "grad_norm", "reward_mean", "clip_low"} <= set(point.metrics)
        assert point.run_id == run_id == info.metadata["run"]
        assert _same(point.rollout, run_summary(store, run_id))


def test_version_usage_counts_the_trajectories_each_version_decided(filled):
    store, ids = filled
    usage = {f"{u.info.name}@{u.info.version}": u for u in version_usage(store)}
    assert list(usage) == ids.versions
    names = {run.id: run.name for run in store.runs()}
    all_ids = [t.id for t in store.trajectories()]
    steps = store.steps_many(all_ids)
    run_of = {t.id: t.run_id for t in store.trajectories()}
    (series,) = training_series(store)
    for label, entry in usage.items():
        name, version = label.split("@")
        users = Counter(
            run_of[tid]
            for tid, rows in steps.items()
            if any((s.policy, s.policy_version) == (name, version) for s in rows)
        )
        assert sorted(entry.used_by) == sorted((r, names[r], n) for r, n in users.items())
        assert entry.trained_from == [entry.info.metadata["run"]]
        assert entry.series == series.key
    # router@1 rolled out grpo-1 (on-policy); router@2 was never rolled out
    assert usage[ids.versions[0]].used_by == [(ids.trained_runs[1], "grpo-1", 36)]
    assert usage[ids.versions[1]].used_by == []


def test_version_usage_finds_the_runs_that_sampled_an_adapter(tmp_path):
    """An adapter writes no ``steps.policy``: the runs that used ``reflect@1`` are found by the
    model their generations were requested from (vLLM and ``atelier serve lm`` name a loaded
    adapter ``name@version``)."""
    import asyncio

    from agent_graph.runner import Runner, make_group_tasks
    from storage.recorder import SQLRecorder
    from tests.pg import CyclingChat, graph_context

    store = TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}")
    store.register_policy_version("reflect", "1", path="/adapters/reflect-1")
    store.register_policy_version("reflect", "2", path="/adapters/reflect-2")

    async def record(name: str, model_id: str, prompts: list[str]) -> str:
        run = store.create_run(name)
        async with SQLRecorder(store, run.id) as recorder:
            context = graph_context(store, recorder, mode="reflect")
            chat = CyclingChat(["EDIT: add a circle", "STOP"], model_id=model_id)
            backends = dataclasses.replace(context.backends, reflector=chat)
            context = dataclasses.replace(context, backends=backends)
            await Runner(context).run(make_group_tasks(prompts, 1, seed=0))
        return run.id

    adapted = asyncio.run(record("adapted", "reflect@1", ["a red circle", "a blue square"]))
    asyncio.run(record("base", "base-model", ["a green star"]))
    usage = {f"{u.info.name}@{u.info.version}": u.used_by for u in version_usage(store)}
    reflected = {
        t.id
        for t in store.trajectories(run=adapted)
        for s in store.steps(t.id)
        for g in s.generations
        if g.model == "reflect@1"
    }
    assert usage == {"reflect@1": [(adapted, "adapted", len(reflected))], "reflect@2": []}
    assert len(reflected) == 2
    store.close()


def test_versions_are_grouped_by_what_their_metadata_records(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'v.db'}")
    run = store.create_run("explore").id
    config = {"lr": 0.05}
    register = store.register_policy_version
    # a store from before series were recorded: one trainer kept counting, then a new one
    register("router", "1", metadata={"optimizer_steps": 8, "config": config, "loss": 0.5})
    register("router", "2", metadata={"optimizer_steps": 16, "config": config, "loss": 0.25})
    register("router", "3", metadata={"optimizer_steps": 8, "config": config, "loss": 0.1})
    # an on-policy loop: the untrained start, then its iterations (one of them failed)
    register("plan", "0", metadata={"loop": "my loop", "loop_iteration": -1})
    register("plan", "1", metadata={"loop": "my loop", "loop_iteration": 0, "run": run})
    register("plan", "2", metadata={"loop": "my loop", "loop_iteration": 2, "run": "gone"})
    # `train --run` from a stored run; R3's stop versions (one tree call per round)
    register("stop", "1", metadata={"runs": [run], "kl": None})
    register("stop", "2", metadata={"series": "r3-x", "series_iteration": 0, "run": run})
    register("stop", "3", metadata={"series": "r3-x", "series_iteration": 0})
    series = {s.label: s for s in training_series(store)}
    assert len({s.key for s in series.values()}) == len(series) == 5
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s.key) for s in series.values())
    by_versions = {(s.policy, tuple(p.version for p in s.points)): s for s in series.values()}
    assert set(by_versions) == {
        ("router", ("1", "2")),
        ("router", ("3",)),
        ("plan", ("1", "2")),
        ("stop", ("1",)),
        ("stop", ("2", "3")),
    }
    loop = by_versions[("plan", ("1", "2"))]
    assert [p.iteration for p in loop.points] == [0, 2]  # the loop's own numbering
    assert loop.label.startswith("plan@1…2 · loop my loop")
    assert loop.points[0].rollout is not None and loop.points[0].rollout.run.id == run
    assert loop.points[1].run_id == "gone" and loop.points[1].rollout is None
    legacy = by_versions[("router", ("1", "2"))]
    assert [p.metrics["loss"] for p in legacy.points] == [0.5, 0.25]
    assert all(p.run_id is None and p.rollout is None for p in legacy.points)
    one_off = by_versions[("stop", ("1",))]
    assert one_off.points[0].run_id == run and "kl" not in one_off.points[0].metrics
    r3 = by_versions[("stop", ("2", "3"))]
    assert [p.iteration for p in r3.points] == [0, 1]  # repeated numbers: their order
    usage = {(u.info.name, u.info.version): u for u in version_usage(store)}
    assert usage[("plan", "0")].series is None and usage[("stop", "1")].trained_from == [run]
    assert usage[("plan", "2")].series == loop.key
    store.close()
