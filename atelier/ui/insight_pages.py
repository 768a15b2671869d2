"""The pages that look across runs: training runs as curves, policy versions and where they
were used, and two runs compared side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from atelier.ui.layout import e, num, page, path, percent, run_options, table, with_query
from atelier.ui.plots import Series, line_chart


def _metric(point: Any, *names: str) -> float | None:
    for name in names:
        value = point.metrics.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def _rollout(point: Any, field: str) -> float | None:
    return None if point.rollout is None else getattr(point.rollout, field)


def training_list_page(series: Sequence[Any], *, nonce: str) -> str:
    rows = []
    for one in series:
        last = one.points[-1] if one.points else None
        rows.append(
            (
                f'<a href="{e(path("training", one.key))}">{e(one.label)}</a>',
                e(one.policy),
                f'<span class="num">{len(one.points)}</span>',
                e(f"{last.version}" if last else "–"),
                num(_rollout(last, "mean_score")) if last else "–",
                num(_metric(last, "loss")) if last else "–",
            )
        )
    listing = (
        table(
            ("training run", "policy", "iterations", "last version", "last reward", "last loss"),
            rows,
        )
        if rows
        else '<p class="empty">No training run in this store: <code>atelier train</code> '
        "records its versions here.</p>"
    )
    return page("Training runs", listing, nonce=nonce, active="training", subtitle=f"{len(series)}")


def training_page(one: Any, *, nonce: str) -> str:
    """Per-iteration curves of one training run, and its table of versions and runs."""
    points = one.points
    xs = [p.iteration for p in points]

    def series(name: str, values: Sequence[float | None]) -> Series:
        return Series(name, list(zip(xs, values, strict=True)))

    charts = [
        line_chart(
            "reward (rollout mean score)",
            [series("reward", [_rollout(p, "mean_score") for p in points])],
        ),
        line_chart("accuracy", [series("accuracy", [_rollout(p, "accuracy") for p in points])]),
        line_chart(
            "images per trajectory",
            [series("images", [_rollout(p, "mean_images") for p in points])],
        ),
    ]
    modes = sorted({m for p in points if p.rollout is not None for m in p.rollout.mode_shares})
    if modes:
        charts.append(
            line_chart(
                "mode shares",
                [
                    series(
                        m,
                        [p.rollout.mode_shares.get(m, 0.0) if p.rollout else None for p in points],
                    )
                    for m in modes
                ],
            )
        )
    charts += [
        line_chart(
            "trainer reward mean",
            [series("reward_mean", [_metric(p, "reward_mean") for p in points])],
        ),
        line_chart("loss", [series("loss", [_metric(p, "loss") for p in points])]),
        line_chart("KL", [series("kl", [_metric(p, "kl") for p in points])]),
        line_chart("clip fraction", [series("clip fraction", [p.clip_fraction for p in points])]),
    ]
    rows = []
    for p in points:
        run_cell = (
            f'<a href="{e(path("runs", p.run_id))}" class="mono">{e(p.run_id[:12])}</a>'
            if p.run_id
            else "–"
        )
        rows.append(
            (
                str(p.iteration),
                e(p.version),
                run_cell,
                num(_rollout(p, "mean_score")),
                percent(_rollout(p, "accuracy")),
                num(_rollout(p, "mean_images"), 2),
                num(_metric(p, "loss"), 4),
                num(_metric(p, "kl"), 4),
                num(p.clip_fraction, 3),
            )
        )
    listing = table(
        ("iteration", "version", "run", "reward", "accuracy", "images", "loss", "KL", "clip"), rows
    )
    body = f'<div class="charts" id="charts">{"".join(charts)}</div><h2>Iterations</h2>{listing}'
    return page(one.label, body, nonce=nonce, active="training", subtitle=one.policy)


def versions_page(usages: Sequence[Any], decided: set[str], *, nonce: str) -> str:
    """Every version, the runs it was trained from and those that used it; ``decided``: the
    ``name@version`` labels steps recorded decisions of (their runs link to the run's page
    filtered by that version; an adapter's to the run's page)."""
    rows = []
    for usage in usages:
        info = usage.info
        trained = " ".join(
            f'<a href="{e(path("runs", run_id))}" class="mono">{e(run_id[:12])}</a>'
            for run_id in usage.trained_from
        )
        label = f"{info.name}@{info.version}"
        query = {"policy_version": label} if label in decided else {}
        used = " ".join(
            f'<a href="{e(with_query(path("runs", run_id), query))}">{e(name)}</a> ({count})'
            for run_id, name, count in usage.used_by
        )
        rows.append(
            (
                e(info.name),
                f'<span class="mono">{e(info.version)}</span>',
                e(info.created_at.strftime("%Y-%m-%d %H:%M:%S")),
                trained or "–",
                used or "–",
                f'<span class="mono">{e(info.path or "")}</span>',
            )
        )
    listing = (
        table(
            ("policy", "version", "created", "trained from", "used by (trajectories)", "path"), rows
        )
        if rows
        else '<p class="empty">No policy version is registered in this store.</p>'
    )
    return page(
        "Policy versions", listing, nonce=nonce, active="versions", subtitle=f"{len(usages)}"
    )


def _delta(a: float | None, b: float | None, digits: int = 3, higher_is_better: bool = True) -> str:
    if a is None or b is None:
        return ""
    diff = b - a
    if diff == 0:
        return "±0"
    cls = "delta-up" if (diff > 0) == higher_is_better else "delta-down"
    return f'<span class="{cls}">{diff:+.{digits}f}</span>'


def compare_page(a: Any, b: Any, runs: Sequence[Any], *, nonce: str) -> str:
    """Two runs' summaries side by side (B − A beside each number), overall and per category."""
    metrics = [
        ("trajectories", "trajectories", 0),
        ("succeeded", "succeeded", 0),
        ("failed", "failed", 0),
        ("accuracy", "accuracy", 3),
        ("mean score", "mean_score", 3),
        ("images / trajectory", "mean_images", 2),
        ("seconds / trajectory", "mean_duration_s", 3),
    ]
    rows = []
    for label, field, digits in metrics:
        va, vb = getattr(a, field), getattr(b, field)
        show = percent if field == "accuracy" else (lambda v, d=digits: num(v, d))
        better = field not in ("failed", "mean_images", "mean_duration_s")
        rows.append((e(label), show(va), show(vb), _delta(va, vb, digits, better)))
    for mode in sorted(set(a.mode_shares) | set(b.mode_shares)):
        va, vb = a.mode_shares.get(mode, 0.0), b.mode_shares.get(mode, 0.0)
        rows.append((e(f"mode {mode}"), percent(va), percent(vb), _delta(va, vb, 3)))
    for name in sorted(set(a.rewards) | set(b.rewards)):
        va, vb = a.rewards.get(name), b.rewards.get(name)
        rows.append((e(f"reward {name}"), num(va, 4), num(vb, 4), _delta(va, vb, 4)))
    head_a = f'A: <a href="{e(path("runs", a.run.id))}">{e(a.run.name)}</a>'
    head_b = f'B: <a href="{e(path("runs", b.run.id))}">{e(b.run.name)}</a>'
    overall = table(("", "A", "B", "B − A"), rows, cls="data compare-table")
    categories = sorted(set(a.categories) | set(b.categories))
    cat_rows = []
    for category in categories:
        ca, cb = a.categories.get(category), b.categories.get(category)
        cat_rows.append(
            (
                e(category),
                str(ca.count if ca else 0),
                percent(ca.accuracy if ca else None),
                str(cb.count if cb else 0),
                percent(cb.accuracy if cb else None),
                _delta(ca.accuracy if ca else None, cb.accuracy if cb else None, 3),
            )
        )
    per_category = (
        "<h2>Per category</h2>"
        + table(("category", "A n", "A accuracy", "B n", "B accuracy", "Δ accuracy"), cat_rows)
        if cat_rows
        else ""
    )
    form = (
        '<form class="inline" method="get" action="/compare">'
        f'<label>run A<select name="a">{run_options(runs, a.run.id)}</select></label>'
        f'<label>run B<select name="b">{run_options(runs, b.run.id)}</select></label>'
        "<button type=submit>compare</button></form>"
    )
    body = form + f"<p>{head_a} · {head_b}</p>" + overall + per_category
    return page(
        "Compare runs", body, nonce=nonce, active="runs", subtitle=f"{a.run.name} vs {b.run.name}"
    )


def error_page(status: int, message: str, *, nonce: str) -> str:
    body = f'<p class="error-page">{e(message)}</p><p><a href="/">all runs</a></p>'
    return page(f"{status}", body, nonce=nonce)
