"""The pages of ``atelier ui``: plain functions from what the store returned to HTML.

Nothing here touches the store or the request (``atelier.ui.app`` does both), so each page can
be rendered and checked alone. Every text from the store is escaped with :func:`e` (prompts and
model outputs are untrusted); the trajectory timeline is the static viewer's own
(``storage.viewer.trajectory_card``), so both show a trajectory the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from atelier.ui.layout import e, num, page, path, percent, run_options, table, with_query
from storage.viewer import ImageTable, Links, trajectory_card

PAGE_SIZES = (10, 24, 48, 96, 200)
DEFAULT_PAGE_SIZE = 48


class ServedImages(ImageTable):
    """Images linked to the app's ``/images/<sha256>`` (no inline data)."""

    def __init__(self, max_side: int | None = None) -> None:
        self.max_side = max_side

    def use(self, ref: str) -> str:
        return ref

    def src(self, ref: str) -> str | None:
        return image_url(ref, self.max_side)


def image_url(ref: str, max_side: int | None = None) -> str:
    return with_query(path("images", ref), {"max": max_side})


class AppLinks(Links):
    def run(self, run_id: str) -> str | None:
        return path("runs", run_id)

    def group(self, run_id: str, group_id: str) -> str | None:
        return path("runs", run_id, "groups", group_id)

    def generation(self, trajectory_id: str, step_seq: int, position: int) -> str | None:
        return path("trajectories", trajectory_id, "generations", str(step_seq), str(position))


LINKS = AppLinks()


def _badge(text: str, cls: str = "") -> str:
    return f'<span class="badge {cls}">{e(text)}</span>'


def _status_badge(status: str) -> str:
    cls = {"succeeded": "", "failed": "bad", "running": "warn", "incomplete": "warn"}
    return _badge(status, cls.get(status, ""))


def _correct_badge(correct: bool | None) -> str:
    if correct is None:
        return ""
    return _badge("✓ correct", "ok") if correct else _badge("✗ incorrect", "bad")


def _stat(label: str, value: str) -> str:
    return f'<div class="stat"><b>{e(value)}</b><span>{e(label)}</span></div>'


def _shares(shares: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(shares.items())) or "–"


# --- runs ------------------------------------------------------------------------------------


def runs_page(runs: Sequence[Any], describe: Any, *, nonce: str) -> str:
    """Every run, newest first, and the form comparing two of them. ``describe(config)`` says
    a run's config in a few words."""
    rows = [
        (
            f'<a href="{e(path("runs", run.id))}">{e(run.name)}</a>',
            f'<span class="mono">{e(run.id[:12])}</span>',
            e(run.created_at.strftime("%Y-%m-%d %H:%M:%S")),
            _status_badge(run.status),
            f'<span class="num">{run.trajectory_count}</span>',
            e(describe(run.config)),
        )
        for run in runs
    ]
    listing = (
        table(("name", "id", "created", "status", "trajectories", "config"), rows)
        if rows
        else '<p class="empty">No runs in this store yet: <code>atelier demo</code> or '
        "<code>atelier rollout</code> records some.</p>"
    )
    options = run_options(runs)
    compare = ""
    if len(runs) >= 2:
        compare = (
            '<h2>Compare two runs</h2><form class="inline" method="get" action="/compare">'
            f'<label>run A<select name="a">{options}</select></label>'
            f'<label>run B<select name="b">{options}</select></label>'
            "<button type=submit>compare</button></form>"
        )
    return page("Runs", listing + compare, nonce=nonce, active="runs", subtitle=f"{len(runs)} runs")


# --- one run: summary, filters, paginated trajectories ---------------------------------------


def _summary_stats(summary: Any) -> str:
    return (
        '<div class="stats">'
        + _stat("trajectories", str(summary.trajectories))
        + _stat("succeeded", str(summary.succeeded))
        + _stat("failed", str(summary.failed))
        + _stat("accuracy", percent(summary.accuracy))
        + _stat("mean score", num(summary.mean_score))
        + _stat("images / traj.", num(summary.mean_images, 2))
        + "</div>"
        + f'<p class="meta">modes: {e(_shares(summary.mode_shares))}'
        + (
            " · rewards: "
            + e(", ".join(f"{k} {v:.4g}" for k, v in sorted(summary.rewards.items())))
            if summary.rewards
            else ""
        )
        + "</p>"
    )


def _select(name: str, label: str, values: Sequence[str], current: str | None) -> str:
    options = ['<option value="">any</option>'] + [
        f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(v)}</option>'
        for v in values
    ]
    return f'<label>{e(label)}<select name="{e(name)}">{"".join(options)}</select></label>'


def filter_params(where: Any, per_page: int) -> dict[str, Any]:
    """The URL query that reproduces ``where`` (a ``storage.search.TrajectoryFilter``)."""
    correct = None if where.correct is None else ("yes" if where.correct else "no")
    return {
        "q": where.text,
        "mode": where.mode,
        "status": where.status,
        "category": where.category,
        "correct": correct,
        "min_score": where.min_score,
        "max_score": where.max_score,
        "policy_version": where.policy_version,
        "group": where.group,
        "per": per_page if per_page != DEFAULT_PAGE_SIZE else None,
    }


def _filter_form(action: str, where: Any, choices: Mapping[str, Sequence[str]], per: int) -> str:
    correct = {None: "", True: "yes", False: "no"}[where.correct]
    correct_options = "".join(
        f'<option value="{v}"{" selected" if v == correct else ""}>{label}</option>'
        for v, label in (("", "any"), ("yes", "correct"), ("no", "incorrect"))
    )
    pers = "".join(
        f'<option value="{n}"{" selected" if n == per else ""}>{n}</option>' for n in PAGE_SIZES
    )
    group = f'<input type="hidden" name="group" value="{e(where.group)}">' if where.group else ""
    return (
        f'<form class="filters" method="get" action="{e(action)}" role="search">'
        f'<label>search<input type="search" name="q" value="{e(where.text or "")}" '
        'placeholder="prompt, plan, reflection"></label>'
        + _select("mode", "mode", choices.get("mode", ()), where.mode)
        + _select("status", "status", choices.get("status", ()), where.status)
        + _select("category", "category", choices.get("category", ()), where.category)
        + f'<label>judged<select name="correct">{correct_options}</select></label>'
        + '<label>score ≥<input type="number" step="any" name="min_score" '
        f'value="{e("" if where.min_score is None else where.min_score)}"></label>'
        + '<label>score ≤<input type="number" step="any" name="max_score" '
        f'value="{e("" if where.max_score is None else where.max_score)}"></label>'
        + _select(
            "policy_version",
            "policy version",
            choices.get("policy_version", ()),
            where.policy_version,
        )
        + f'<label>per page<select name="per">{pers}</select></label>'
        + group
        + '<button type="submit">apply</button>'
        + f'<a href="{e(action)}">clear</a></form>'
    )


def pager(base: str, params: Mapping[str, Any], current: int, pages: int) -> str:
    """Links to the first, previous, nearby, next and last pages (1-based), keeping ``params``."""
    if pages <= 1:
        return ""

    def link(number: int, text: str | None = None, rel: str = "") -> str:
        url = with_query(base, {**params, "page": number if number > 1 else None})
        rel_attr = f' rel="{rel}"' if rel else ""
        return f'<a href="{e(url)}"{rel_attr} data-page="{number}">{e(text or number)}</a>'

    parts = []
    if current > 1:
        parts.append(link(current - 1, "‹ previous", "prev"))
    shown = sorted({1, pages, *range(max(1, current - 2), min(pages, current + 2) + 1)})
    last = 0
    for number in shown:
        if number > last + 1:
            parts.append('<span class="gap">…</span>')
        if number == current:
            parts.append(f'<span class="current" aria-current="page">{number}</span>')
        else:
            parts.append(link(number))
        last = number
    if current < pages:
        parts.append(link(current + 1, "next ›", "next"))
    return f'<nav class="pager" aria-label="pages">{"".join(parts)}</nav>'


def trajectory_tile(summary: Any) -> str:
    """A trajectory in a list: final image, prompt, badges; links to its page."""
    if summary.final_image:
        thumb = (
            f'<img class="thumb" src="{e(image_url(summary.final_image, 256))}" '
            f'alt="final image: {e(summary.prompt)}" loading="lazy">'
        )
    else:
        thumb = '<span class="no-image">no image</span>'
    score = (
        ""
        if summary.score is None
        else f'<span class="score-pill">V {e(num(summary.score))}</span>'
    )
    badges = (
        _badge(summary.mode or "no mode", "mode")
        + _status_badge(summary.status)
        + _correct_badge(summary.correct)
        + (_badge(summary.category) if summary.category else "")
    )
    facts = f"{summary.image_count} image{'s' if summary.image_count != 1 else ''}"
    if summary.duration_s is not None:
        facts += f" · {summary.duration_s:.2f} s"
    return (
        f'<a class="tcard trajectory-tile" href="{e(path("trajectories", summary.id))}" '
        f'data-id="{e(summary.id)}" data-mode="{e(summary.mode or "")}" '
        f'data-status="{e(summary.status)}" data-group="{e(summary.group_id)}">'
        f'<span class="thumb-wrap">{thumb}{score}</span><span class="card-body">'
        f'<span class="prompt">{e(summary.prompt)}</span>'
        f'<span class="badges">{badges}</span><span class="facts-line">{e(facts)}</span>'
        "</span></a>"
    )


def run_page(
    run: Any,
    summary: Any,
    where: Any,
    choices: Mapping[str, Sequence[str]],
    results: Any,
    *,
    per_page: int,
    nonce: str,
) -> str:
    """A run: its summary, the filter form, one page of matching trajectories, the pager."""
    base = path("runs", run.id)
    params = filter_params(where, per_page)
    pages = max(1, math.ceil(results.total / per_page))
    current = results.offset // per_page + 1
    first = results.offset + 1 if results.items else 0
    shown = (
        f'<p class="summary" id="summary"><span class="n">{results.total}</span> of '
        f"{summary.trajectories} trajectories match · showing {first}–"
        f"{results.offset + len(results.items)} · page {current} of {pages}</p>"
    )
    tiles = "".join(trajectory_tile(t) for t in results.items)
    listing = (
        f'<div class="cards" id="results">{tiles}</div>'
        if tiles
        else ('<p class="empty" id="results">No trajectory matches these filters.</p>')
    )
    nav = pager(base, params, current, pages)
    links = (
        f'<p class="meta"><a href="{e(path("runs", run.id, "groups"))}">GRPO groups of this run</a>'
        f' · <a href="{e(with_query("/compare", {"a": run.id}))}">compare with another run</a></p>'
    )
    body = (
        _summary_stats(summary)
        + links
        + _filter_form(base, where, choices, per_page)
        + shown
        + nav
        + listing
        + nav
    )
    return page(run.name, body, nonce=nonce, active="runs", subtitle=run.id)


# --- one trajectory ---------------------------------------------------------------------------


def trajectory_page(detail: Any, runs: Mapping[str, Any], *, nonce: str) -> str:
    card = trajectory_card(detail, ServedImages(), runs, opened=True, links=LINKS)
    body = f'<div class="grid single">{card}</div>'
    return page(
        detail.prompt[:80] or detail.id, body, nonce=nonce, active="runs", subtitle="trajectory"
    )


# --- groups -----------------------------------------------------------------------------------


def groups_page(
    run: Any, groups: Sequence[Any], total: int, current: int, per_page: int, *, nonce: str
) -> str:
    base = path("runs", run.id, "groups")
    rows = [
        (
            f'<a href="{e(path("runs", run.id, "groups", g.group_id))}" class="mono">'
            f"{e(g.group_id)}</a>",
            e(g.prompt),
            f'<span class="num">{g.members}</span>',
            num(g.mean_score),
            f"{num(g.min_score)} – {num(g.max_score)}",
            str(g.correct),
            "yes" if g.has_advantages else "",
        )
        for g in groups
    ]
    listing = table(
        ("group", "prompt", "members", "mean score", "range", "correct", "advantages"), rows
    )
    pages = max(1, math.ceil(total / per_page))
    nav = pager(base, {}, current, pages)
    back_href = e(path("runs", run.id))
    back = f'<p class="meta"><a href="{back_href}">← trajectories of {e(run.name)}</a></p>'
    return page(
        f"Groups of {run.name}",
        back + nav + listing + nav,
        nonce=nonce,
        active="runs",
        subtitle=f"{total} groups",
    )


def _advantage_class(value: float | None) -> str:
    if value is None or not math.isfinite(value) or value == 0:
        return ""
    return "adv-pos" if value > 0 else "adv-neg"


def group_page(run: Any, view: Any, *, nonce: str) -> str:
    """A GRPO group's members side by side: final image and every image, stored rewards, the
    advantage, the decisions and their log-probs."""
    members = []
    for member in view.members:
        s = member.summary
        final = (
            f'<img class="final" src="{e(image_url(s.final_image, 320))}" '
            f'alt="final image of sample {s.sample_index}">'
            if s.final_image
            else '<span class="no-image">no image</span>'
        )
        strip = "".join(
            f'<img src="{e(image_url(ref, 96))}" alt="image {i + 1}" loading="lazy">'
            for i, ref in enumerate(member.images)
        )
        rows = [
            ("status", e(s.status)),
            ("mode", e(s.mode or "–")),
            ("images", str(s.image_count)),
            ("score", num(s.score)),
            ("correct", {None: "–", True: "✓", False: "✗"}[s.correct]),
        ]
        reward_rows = []
        for name in view.reward_names:
            if name == "advantage":
                continue
            value = member.latest.get(name)
            reward_rows.append(
                f'<tr class="reward" data-name="{e(name)}"><td>{e(name)}</td>'
                f'<td class="v">{e("–" if value is None else f"{value:.4g}")}</td></tr>'
            )
        adv = member.advantage
        adv_text = "–" if adv is None else f"{adv:+.4f}"
        decisions = "".join(
            f'<li class="decision-item">step {d.step_seq} {e(d.node)}: {e(d.kind)} → '
            f"<b>{e(d.action)}</b>"
            + (
                f" <span class=muted>log p {d.log_prob:.3f} (p {math.exp(d.log_prob):.2f})</span>"
                if isinstance(d.log_prob, (int, float)) and math.isfinite(d.log_prob)
                else ""
            )
            + (f' <span class="muted">{e(d.policy)}@{e(d.version)}</span>' if d.policy else "")
            + "</li>"
            for d in member.decisions
        )
        facts = "".join(f"<tr><td>{k}</td><td class=v>{v}</td></tr>" for k, v in rows)
        members.append(
            f'<section class="member" data-id="{e(s.id)}" data-sample="{s.sample_index}" '
            f'data-advantage="{e("" if adv is None else repr(float(adv)))}">'
            f'<a href="{e(path("trajectories", s.id))}">sample {s.sample_index}</a>'
            f"{final}<div class=strip>{strip}</div><table>{facts}"
            f'{"".join(reward_rows)}<tr class="advantage"><td>advantage</td>'
            f'<td class="v {_advantage_class(adv)}">{e(adv_text)}</td></tr></table>'
            f'<ul class="decisions">{decisions}</ul></section>'
        )
    head = (
        f'<p class="prompt-line">{e(view.prompt)}</p>'
        f'<p class="meta"><a href="{e(path("runs", run.id))}">{e(run.name)}</a> · '
        f'<a href="{e(path("runs", run.id, "groups"))}">all groups</a> · '
        f'<a href="{e(with_query(path("runs", run.id), {"group": view.group_id}))}">'
        "as trajectories</a></p>"
    )
    body = head + f'<div class="group" id="group">{"".join(members)}</div>'
    return page(
        f"Group {view.group_id}",
        body,
        nonce=nonce,
        active="runs",
        subtitle=f"{len(view.members)} members",
    )


# --- per-token log-probs ----------------------------------------------------------------------


def probability_bucket(logprob: float) -> int:
    """The token's probability in tenths (0..10): its shade class ``p<bucket>`` (a class, not a
    style attribute: the pages' Content-Security-Policy allows no inline style)."""
    if not math.isfinite(logprob):
        return 0
    return min(10, max(0, round(10 * math.exp(min(logprob, 0.0)))))


def tokens_page(
    detail: Any, step: Any, generation: Any, pieces: Sequence[str] | None, *, nonce: str
) -> str:
    """One generation's tokens, each shaded by its probability (``pieces``: each token's text
    from the model's tokenizer, else the ids are shown)."""
    spans = []
    for index, (token, logprob) in enumerate(
        zip(generation.token_ids, generation.logprobs, strict=False)
    ):
        text = pieces[index] if pieces is not None else f"#{token} "
        title = (
            f"token {index}: id {token}, log p {logprob:.4f}, p {math.exp(min(logprob, 0.0)):.3f}"
        )
        spans.append(
            f'<span class="tok p{probability_bucket(logprob)}" data-logprob="{logprob!r}" '
            f'title="{e(title)}">{e(text)}</span>'
        )
    values = list(generation.logprobs)
    total = sum(values)
    stats = (
        '<div class="stats">'
        + _stat("tokens", str(len(values)))
        + _stat("Σ log p", f"{total:.3f}")
        + _stat("mean log p", num(total / len(values) if values else None))
        + _stat("min log p", num(min(values) if values else None))
        + "</div>"
    )
    note = (
        ""
        if pieces is not None
        else '<p class="meta">Token ids shown: start <code>atelier ui --tokenizer DIR</code> '
        "with the model's tokenizer to see their text.</p>"
    )
    back = (
        f'<p class="meta"><a href="{e(path("trajectories", detail.id))}">← trajectory</a> · '
        f"step {step.seq} {e(step.node)} · {e(generation.role)} · {e(generation.model)}</p>"
    )
    body = (
        back
        + stats
        + note
        + f'<div class="tokens" id="tokens">{"".join(spans)}</div>'
        + f'<h2>Text</h2><pre class="gen-text">{e(generation.text)}</pre>'
    )
    return page("Token log-probs", body, nonce=nonce, active="runs", subtitle=detail.prompt[:60])
