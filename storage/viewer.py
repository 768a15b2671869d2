"""One self-contained HTML page showing stored trajectories: ``atelier view``.

::

    from storage.viewer import write_html
    write_html(store, "run.html", run=run_id)        # open it in any browser, offline

The page is a grid of trajectory cards (final image, prompt, mode, status, score, a trail of the
per-image scores); a card opens into the trajectory's step timeline: every step in order with
its node, latency, images out (large) and in (small), reflection (thought, instruction, stop
phrase and malformed flags), decisions (policy, action, log-prob), sub-tasks, judgement, errors
and the raw generations. Filters (mode, status, category, correctness, score range, text) and
the summary line work client-side in plain JavaScript.

Self-contained and safe to open:

- no network: CSS, script and images are inline, and a Content-Security-Policy forbids any
  fetch; the script and stylesheet carry a per-page nonce, so nothing injected could run;
- every text is HTML-escaped (prompts and model outputs are untrusted), and the script reads
  data only from ``data-*`` attributes and JSON, never as markup;
- each distinct image is embedded once (base64 in a JSON map keyed by sha256) and shown through
  one shared ``blob:`` URL; images larger than ``max_image_side`` are downscaled (JPEG) so that
  pages of big model outputs stay small.

The same parts render the pages of ``atelier ui`` (``atelier.ui``), which serves them over the
live store: :func:`trajectory_card` with an image table whose ``src`` links each image to the
server (instead of the inline map) and :class:`Links` to its other pages.

Stable hooks (used by the tests): ``.trajectory`` with ``data-id``, ``data-mode``,
``data-status``, ``data-score``, ``data-correct``; ``.step`` with ``data-node`` and
``data-seq``; ``img.step-image`` with ``data-ref`` and ``data-direction`` (``in``/``out``);
``window.atelier`` (``setFilters``, ``applyFilters``, ``visibleCount``, ``expandAll``, ``ready``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import secrets
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from storage.images import ImageNotFound, InvalidImageRef
from storage.records import StepInfo, StoredImage, TrajectoryDetail
from storage.viewer_assets import CSS, JS

__all__ = ["ImageTable", "Links", "render_html", "trajectory_card", "write_html"]

DEFAULT_LIMIT = 500


def write_html(store: Any, path: str | Path, **kwargs: Any) -> Path:
    """Render (see :func:`render_html`) and write the page to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_html(store, **kwargs), encoding="utf-8")
    return path


def render_html(
    store: Any,
    *,
    run: str | None = None,
    trajectory_ids: Sequence[str] | None = None,
    limit: int = DEFAULT_LIMIT,
    title: str | None = None,
    max_image_side: int | None = 512,
    expanded: Collection[str] | None = None,
) -> str:
    """One self-contained HTML page of stored trajectories.

    ``trajectory_ids`` (in that order) or else the trajectories of ``run`` (all runs when
    ``None``), by start time, at most ``limit`` of them. With both, every id must belong to
    ``run``. Images with a side longer than ``max_image_side`` are embedded downscaled
    (``None``: always the stored PNG bytes). The trajectories whose ids are in ``expanded``
    open with their step timeline shown; by default those asked for by ``trajectory_ids``
    (one asked for by id is what the page is for), none on a run's page.
    """
    if limit < 0:
        raise ValueError("limit must be >= 0")
    details, total = _load(store, run, trajectory_ids, limit)
    images = ImageTable(store, max_image_side)
    run_ids = sorted({d.run_id for d in details} | ({run} if run else set()))
    runs = {info.id: info for info in store.runs(ids=run_ids)} if run_ids else {}
    opened = set(trajectory_ids or ()) if expanded is None else set(expanded)
    cards = [
        trajectory_card(d, images, runs, index=i, opened=d.id in opened)
        for i, d in enumerate(details)
    ]
    nonce = secrets.token_urlsafe(18)
    heading = title or _heading(run, trajectory_ids, runs)
    notice = ""
    if total > len(details):
        notice = (
            f'<p class="notice">Showing the first {len(details)} of {total} trajectories '
            f"(limit={limit}).</p>"
        )
    body = "\n".join(cards) or '<p class="empty">No trajectories.</p>'
    csp = (
        "default-src 'none'; img-src data: blob:; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "base-uri 'none'; form-action 'none'"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="atelier">
<title>{_e(heading)} · Atelier</title>
<style nonce="{nonce}">{CSS}</style>
</head>
<body>
<header class="top">
<h1>Atelier <span>{_e(heading)}</span></h1>
<p class="meta">{_meta(store, run, runs)}</p>
{_filters(details, runs)}
<p class="summary" id="summary">{_e(_static_summary(details))}</p>
{notice}
<noscript><p class="notice">Images, filters and sorting need JavaScript.</p></noscript>
</header>
<main class="grid" id="grid">
{body}
</main>
<script type="application/json" id="atelier-images">{images.json()}</script>
<script nonce="{nonce}">{JS}</script>
</body>
</html>
"""


# --- loading --------------------------------------------------------------------------------


def _load(
    store: Any, run: str | None, trajectory_ids: Sequence[str] | None, limit: int
) -> tuple[list[TrajectoryDetail], int]:
    if trajectory_ids is not None:
        ids = list(dict.fromkeys(trajectory_ids))
        details = [store.trajectory(tid) for tid in ids[:limit]]
        if run is not None:
            strangers = [d.id for d in details if d.run_id != run]
            if strangers:
                raise ValueError(f"trajectories not in run {run!r}: {', '.join(strangers)}")
        return details, len(ids)
    if run is not None:
        total = store.run(run).trajectory_count
    else:
        total = sum(info.trajectory_count for info in store.runs())
    summaries = store.trajectories(run=run, limit=limit)
    return [store.trajectory(s.id) for s in summaries], max(total, len(summaries))


class Links:
    """Where a page's parts link to: nowhere on the self-contained page (these defaults); the
    served pages of ``atelier ui`` override them."""

    def run(self, run_id: str) -> str | None:
        return None

    def group(self, run_id: str, group_id: str) -> str | None:
        return None

    def generation(self, trajectory_id: str, step_seq: int, position: int) -> str | None:
        return None


class ImageTable:
    """The page's images: each distinct reference once, as ``[mime, base64]``, shown by the
    page's script through ``blob:`` URLs (``src`` is None: no URL in the markup)."""

    def __init__(self, store: Any, max_side: int | None) -> None:
        self.store = store
        self.max_side = max_side
        self.data: dict[str, list[str] | None] = {}

    def use(self, ref: str) -> str:
        if ref not in self.data:
            self.data[ref] = self._encode(ref)
        return ref

    def src(self, ref: str) -> str | None:
        return None

    def _encode(self, ref: str) -> list[str] | None:
        try:
            raw = self.store.image_bytes(ref)
        except (ImageNotFound, InvalidImageRef):
            return None
        mime = "image/png"
        if self.max_side:
            raw, mime = downscaled(raw, self.max_side)
        return [mime, base64.b64encode(raw).decode("ascii")]

    def json(self) -> str:
        present = {ref: entry for ref, entry in self.data.items() if entry is not None}
        # Nothing in it can close the script element (hex keys, base64), but be safe anyway.
        return json.dumps(present, separators=(",", ":")).replace("</", "<\\/")


def downscaled(raw: bytes, max_side: int) -> tuple[bytes, str]:
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        if max(image.size) <= max_side:
            return raw, "image/png"
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue(), "image/jpeg"


# --- page parts -----------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _slug(value: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-") or "other"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.{digits}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _score_class(score: float | None) -> str:
    if score is None or not math.isfinite(score):
        return ""
    if score >= 0.999:
        return "score-hi"
    return "score-mid" if score >= 0.5 else "score-lo"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _heading(run: str | None, ids: Sequence[str] | None, runs: dict[str, Any]) -> str:
    if ids is not None:
        return f"{len(ids)} trajectory" if len(ids) == 1 else f"{len(ids)} trajectories"
    if run is not None:
        info = runs.get(run)
        return f"run {info.name if info else run}"
    return "all runs"


def _meta(store: Any, run: str | None, runs: dict[str, Any]) -> str:
    parts = []
    if run is not None and run in runs:
        info = runs[run]
        parts.append(
            f"run <b>{_e(info.name)}</b> <span class='mono'>{_e(info.id)}</span> · "
            f"{_e(info.status)} · created {_e(_when(info.created_at))}"
        )
        if info.config:
            config = json.dumps(info.config, sort_keys=True, default=str)
            parts.append(f"config <span class='mono'>{_e(_clip(config, 300))}</span>")
    elif len(runs) > 1:
        parts.append(f"{len(runs)} runs")
    url = getattr(store, "url", None)
    if url:
        parts.append(f"store <span class='mono'>{_e(url)}</span>")
    parts.append(f"generated {_e(_when(datetime.now(timezone.utc)))}")
    return " · ".join(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _options(
    element_id: str, label: str, values: Iterable[str | None], names: dict[str, str]
) -> str:
    counts = Counter("" if v is None else v for v in values)
    if not counts:
        return ""
    options = [f'<option value="">all ({sum(counts.values())})</option>']
    for value in sorted(counts):
        name = names.get(value, value) or "(none)"
        options.append(f'<option value="{_e(value)}">{_e(name)} ({counts[value]})</option>')
    return (
        f'<label for="{element_id}">{_e(label)}<select id="{element_id}">'
        + "".join(options)
        + "</select></label>"
    )


def _filters(details: list[TrajectoryDetail], runs: dict[str, Any]) -> str:
    parts = [
        _options("f-mode", "mode", (d.mode for d in details), {}),
        _options("f-status", "status", (d.status for d in details), {}),
    ]
    if any(d.category for d in details):
        parts.append(_options("f-category", "category", (d.category for d in details), {}))
    if len({d.run_id for d in details}) > 1:
        names = {rid: info.name for rid, info in runs.items()}
        parts.append(_options("f-run", "run", (d.run_id for d in details), names))
    parts.append(
        _options(
            "f-correct",
            "correct",
            (_bool_attr(d.correct) for d in details),
            {"true": "correct", "false": "incorrect", "": "unjudged"},
        )
    )
    parts.append(
        '<label class="range">'
        '<span>score ≥<input type="number" id="f-min" step="0.05" placeholder="min"></span>'
        '<span>score ≤<input type="number" id="f-max" step="0.05" placeholder="max"></span>'
        "</label>"
    )
    parts.append(
        '<label for="f-q">search<input type="search" id="f-q" '
        'placeholder="prompt text or id prefix"></label>'
    )
    parts.append(
        '<label for="f-sort">order<select id="f-sort">'
        '<option value="">as stored</option>'
        '<option value="score-asc">score, lowest first</option>'
        '<option value="score-desc">score, highest first</option>'
        '<option value="images">most images</option>'
        '<option value="steps">most steps</option>'
        "</select></label>"
    )
    parts.append(
        '<button type="reset">reset</button>'
        '<button type="button" id="expand-all">expand all</button>'
        '<button type="button" id="collapse-all">collapse all</button>'
    )
    return '<form class="filters" id="filters" autocomplete="off">' + "".join(parts) + "</form>"


def _static_summary(details: list[TrajectoryDetail]) -> str:
    n = len(details)
    correct = sum(1 for d in details if d.correct)
    steps = sum(len(d.steps) for d in details)
    return f"{n} trajectories · {correct} correct · {steps} steps"


def _bool_attr(value: bool | None) -> str:
    return "" if value is None else ("true" if value else "false")


def _img(images: ImageTable, ref: str, cls: str, alt: str, extra: str = "") -> str:
    images.use(ref)
    src = images.src(ref)
    if src is not None:
        extra += f' src="{_e(src)}" loading="lazy"'
    return f'<img class="{cls}" data-ref="{_e(ref)}" alt="{_e(alt)}" decoding="async"{extra}>'


def _state_images(detail: TrajectoryDetail) -> list[dict[str, Any]]:
    """The images of the trajectory in order (the final state's, else from the updates)."""
    if detail.final_state and isinstance(detail.final_state.get("images"), list):
        return [i for i in detail.final_state["images"] if isinstance(i, dict) and "ref" in i]
    found: list[dict[str, Any]] = []
    for step in detail.steps:
        found.extend(i for i in step.update.get("images", []) if isinstance(i, dict) and "ref" in i)
    return found


def _pill(score: float | None) -> str:
    if score is None:
        return ""
    return f'<span class="score-pill {_score_class(score)}">V {_e(_num(score))}</span>'


def trajectory_card(
    detail: TrajectoryDetail,
    images: ImageTable,
    runs: dict[str, Any],
    *,
    index: int = 0,
    opened: bool = False,
    links: Links | None = None,
) -> str:
    """One trajectory: its card (final image, prompt, badges, score trail) opening into its
    facts, images and step timeline. ``runs``: run id -> ``RunInfo`` (for the run's name)."""
    links = links or Links()
    state_images = _state_images(detail)
    final = detail.final_image or (state_images[-1]["ref"] if state_images else None)
    if final:
        thumb = _img(images, final, "thumb", f"final image: {detail.prompt}")
    else:
        thumb = '<span class="no-image">no image</span>'
    badges = [
        f'<span class="badge mode mode-{_slug(detail.mode or "none")}">'
        f"{_e(detail.mode or 'no mode')}</span>"
    ]
    status_cls = {"succeeded": "", "failed": "bad", "running": "warn", "incomplete": "warn"}
    badges.append(
        f'<span class="badge {status_cls.get(detail.status, "")}">{_e(detail.status)}</span>'
    )
    if detail.correct is not None:
        badges.append(
            '<span class="badge ok">✓ correct</span>'
            if detail.correct
            else '<span class="badge bad">✗ incorrect</span>'
        )
    if detail.category:
        badges.append(f'<span class="badge">{_e(detail.category)}</span>')
    trail = "".join(
        f'<i class="{_trail_class(img.get("score"))}" '
        f'title="{_e(img.get("node", ""))} V={_e(_num(img.get("score")))}"></i>'
        for img in state_images
    )
    duration = f" · {_latency(detail.duration_s)}" if detail.duration_s is not None else ""
    facts_line = (
        f"{detail.image_count} image{'s' if detail.image_count != 1 else ''} · "
        f"{len(detail.steps)} steps{duration}"
    )
    attrs = {
        "id": f"t-{detail.id}",
        "data-id": detail.id,
        "data-run": detail.run_id,
        "data-mode": detail.mode or "",
        "data-status": detail.status,
        "data-score": "" if detail.score is None else repr(float(detail.score)),
        "data-correct": _bool_attr(detail.correct),
        "data-category": detail.category or "",
        "data-images": str(detail.image_count),
        "data-steps": str(len(detail.steps)),
        "data-prompt": detail.prompt,
        "data-index": str(index),
    }
    attr_text = " ".join(f'{k}="{_e(v)}"' for k, v in attrs.items())
    if opened:
        attr_text += " open"
    return f"""<details class="trajectory" {attr_text}>
<summary><span class="card">
<span class="thumb-wrap">{thumb}{_pill(detail.score)}</span>
<span class="card-body">
<span class="prompt">{_e(detail.prompt)}</span>
<span class="badges">{"".join(badges)}</span>
<span class="facts-line">{_e(facts_line)}</span>
<span class="trail">{trail}</span>
</span></span></summary>
<div class="detail">
{_facts(detail, runs, links)}
{_film(state_images, final, images)}
<h3 class="section">Steps</h3>
<ol class="timeline">
{"".join(_step(s, images, links) for s in detail.steps)}
</ol>
</div>
</details>"""


def _trail_class(score: Any) -> str:
    if not isinstance(score, (int, float)) or not math.isfinite(score):
        return "bn"
    return f"b{min(10, max(0, round(float(score) * 10)))}"


def _linked(text: str, href: str | None) -> str:
    """``text`` (already escaped markup) as a link to ``href`` when there is one."""
    return f'<a href="{_e(href)}">{text}</a>' if href else text


def _facts(detail: TrajectoryDetail, runs: dict[str, Any], links: Links) -> str:
    run = runs.get(detail.run_id)
    run_text = f"{_e(run.name) if run else ''} <span class='mono'>{_e(detail.run_id)}</span>"
    rows: list[tuple[str, str]] = [
        ("trajectory", f"<span class='mono'>{_e(detail.id)}</span>"),
        ("run", _linked(run_text, links.run(detail.run_id))),
    ]
    if detail.group_id:
        group_text = f"<span class='mono'>{_e(detail.group_id)}</span>"
        group_href = links.group(detail.run_id, detail.group_id)
        rows.append(("group", f"{_linked(group_text, group_href)} · sample {detail.sample_index}"))
    rows.append(("seed", f"<span class='mono'>{detail.seed}</span>"))
    rows.append(("started", _e(_when(detail.started_at))))
    if detail.duration_s is not None:
        rows.append(("duration", _e(_latency(detail.duration_s))))
    state = detail.final_state or {}
    if state.get("stop_reason"):
        rows.append(("stop reason", _e(state["stop_reason"])))
    if "rounds" in state:
        rows.append(("correction rounds", _e(state["rounds"])))
    verdict = {True: "correct", False: "incorrect", None: "not judged"}[detail.correct]
    rows.append(("final score", f"{_pill(detail.score) or 'n/a'} {verdict}"))
    if detail.rewards:
        rewards = ", ".join(f"{k} = {v:.6g}" for k, v in sorted(detail.rewards.items()))
        rows.append(("rewards", _e(rewards)))
    step_rewards = [r for r in detail.reward_records if r.step_seq is not None]
    if step_rewards:
        text = ", ".join(f"step {r.step_seq}: {r.name} = {r.value:.6g}" for r in step_rewards)
        rows.append(("step rewards", _e(text)))
    out = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    error = f'<div class="error-box">{_e(detail.error)}</div>' if detail.error else ""
    return f'<dl class="facts">{out}</dl>{error}'


def _film(state_images: list[dict[str, Any]], final: str | None, images: ImageTable) -> str:
    if not state_images:
        return ""
    figures = []
    for i, record in enumerate(state_images):
        ref = record["ref"]
        is_final = ref == final and i == len(state_images) - 1
        caption = f"#{i + 1} {_e(record.get('node', ''))}"
        alt = f"image {i + 1}: {record.get('instruction', '')}"
        figures.append(
            f'<figure class="{"final" if is_final else ""}" '
            f'title="{_e(record.get("instruction"))}">'
            f"{_img(images, ref, 'film-image', alt)}{_pill(record.get('score'))}"
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return f'<h3 class="section">Images</h3><div class="film">{"".join(figures)}</div>'


def _step(step: StepInfo, images: ImageTable, links: Links) -> str:
    update = step.update or {}
    body: list[str] = []
    if step.error:
        body.append(f'<div class="error-box">{_e(step.error)}</div>')
    for decision in update.get("decisions", []) or []:
        body.append(_decision(decision))
    if update.get("blueprint"):
        body.append(
            '<div class="block"><span class="label">blueprint</span>'
            f"{_e(update['blueprint'])}</div>"
        )
    if "subtasks" in update:
        body.append(_subtasks(update))
    if step.images_in:
        ins = "".join(
            _img(images, img.ref, "step-image step-image-in", "input image", ' data-direction="in"')
            for img in step.images_in
        )
        body.append(f'<div class="in-images"><span>input</span>{ins}</div>')
    for reflection in update.get("reflections", []) or []:
        body.append(_reflection(reflection))
    if step.images_out:
        body.append(_images_out(step.images_out, update.get("images", []) or [], images))
    extras = []
    if "subtasks_done" in update and "subtasks" not in update:
        extras.append(f"sub-tasks done: {_e(update['subtasks_done'])}")
    if "rounds" in update:
        extras.append(f"correction round {_e(update['rounds'])}")
    if update.get("stop_reason"):
        extras.append(f"stop: <b>{_e(update['stop_reason'])}</b>")
    if extras:
        body.append(f'<div class="muted">{" · ".join(extras)}</div>')
    if update.get("judgement"):
        body.append(_judgement(update["judgement"]))
    if not body:
        other = sorted(k for k in update if k != "step_count")
        body.append(
            f'<div class="muted">{"updated " + _e(", ".join(other)) if other else "no change"}'
            "</div>"
        )
    body.append(_generations(step, links))
    models = ", ".join(step.models)
    policy = f"policy {step.policy}" + (f" v{step.policy_version}" if step.policy_version else "")
    head = (
        f'<span class="seq">{step.seq}</span><span class="node">{_e(step.node)}</span>'
        f'<span class="stage">{_e(step.stage)}</span>'
        f'<span class="latency">{_e(_latency(step.latency_s))}</span>'
        + (f'<span class="models">{_e(models)}</span>' if models else "")
        + (f'<span class="models">{_e(policy)}</span>' if step.policy else "")
    )
    failed = " failed" if step.error else ""
    return (
        f'<li class="step node-{_slug(step.node)}{failed}" data-node="{_e(step.node)}" '
        f'data-seq="{step.seq}"><div class="step-head">{head}</div>'
        f'<div class="step-body">{"".join(b for b in body if b)}</div></li>'
    )


def _decision(decision: dict[str, Any]) -> str:
    log_prob = decision.get("log_prob")
    prob = ""
    if isinstance(log_prob, (int, float)) and math.isfinite(log_prob):
        prob = f" (log p {log_prob:.3f}, p {math.exp(log_prob):.2f})"
    policy = decision.get("policy", "")
    version = decision.get("version")
    return (
        f'<div class="decision">{_e(decision.get("kind", "decision"))} → '
        f"<b>{_e(decision.get('action'))}</b>{_e(prob)} "
        f'<span class="muted">{_e(policy)}{" v" + _e(version) if version else ""}</span></div>'
    )


def _subtasks(update: dict[str, Any]) -> str:
    items = []
    for sub in update.get("subtasks") or []:
        if isinstance(sub, dict):
            instruction, expect = sub.get("instruction", ""), sub.get("expect", "")
        else:
            instruction, expect = str(sub), ""
        expect_html = f' <span class="expect">expect: {_e(expect)}</span>' if expect else ""
        items.append(f"<li>{_e(instruction)}{expect_html}</li>")
    flag = ""
    if update.get("subtasks_well_formed") is False:
        flag = '<span class="badge warn">malformed</span> '
    listing = f'<ol class="subtasks">{"".join(items)}</ol>' if items else ""
    count = len(items)
    return (
        f'<div class="block"><span class="label">{count} sub-task{"s" if count != 1 else ""}'
        f"</span>{flag}{listing}</div>"
    )


def _reflection(reflection: dict[str, Any]) -> str:
    well_formed = reflection.get("well_formed", True)
    flags = []
    if not well_formed:
        flags.append('<span class="badge bad">malformed</span>')
    if reflection.get("stop_phrase"):
        flags.append('<span class="badge ok">stop phrase: no further edit needed</span>')
    if "accept" in reflection:
        flags.append(
            '<span class="badge ok">accepted</span>'
            if reflection["accept"]
            else '<span class="badge warn">keep correcting</span>'
        )
    target = reflection.get("target")
    parts = [f'<span class="label">reflection</span>{"".join(flags)}']
    if target:
        parts.append(f'<div class="target">checked against: {_e(target)}</div>')
    if well_formed:
        if reflection.get("thought"):
            parts.append(f'<p class="thought">{_e(reflection["thought"])}</p>')
        if reflection.get("instruction"):
            parts.append(f'<p class="instruction">→ {_e(reflection["instruction"])}</p>')
    else:
        parts.append(f'<p class="raw">{_e(reflection.get("text", ""))}</p>')
    cls = "block reflection" + ("" if well_formed else " malformed")
    cls += " stop" if reflection.get("stop_phrase") else ""
    return f'<div class="{cls}">{"".join(parts)}</div>'


def _images_out(
    stored: list[StoredImage], records: list[dict[str, Any]], images: ImageTable
) -> str:
    figures = []
    for i, img in enumerate(stored):
        record: dict[str, Any] = {}
        if i < len(records) and isinstance(records[i], dict) and records[i].get("ref") == img.ref:
            record = records[i]
        else:
            record = next(
                (r for r in records if isinstance(r, dict) and r.get("ref") == img.ref), {}
            )
        instruction = record.get("instruction", "")
        caption = (
            f"<span>{_pill(record.get('score'))} "
            f'<span class="muted">{_e(record.get("node", ""))} · {img.width}×{img.height}</span>'
            f"</span><span>{_e(_clip(instruction, 600))}</span>"
        )
        figures.append(
            '<figure class="out-image">'
            + _img(
                images,
                img.ref,
                "step-image",
                f"output image: {instruction}",
                ' data-direction="out"',
            )
            + f"<figcaption>{caption}</figcaption></figure>"
        )
    return f'<div class="images-row">{"".join(figures)}</div>'


def _judgement(judgement: dict[str, Any]) -> str:
    score = judgement.get("score")
    correct = judgement.get("correct")
    verdict = (
        '<span class="badge ok">✓ correct</span>'
        if correct
        else '<span class="badge bad">✗ incorrect</span>'
    )
    criteria = judgement.get("criteria") or {}
    items = "".join(
        f'<li class="badge {"ok" if ok else "bad"}">{"✓" if ok else "✗"} {_e(name)}</li>'
        for name, ok in criteria.items()
    )
    model = judgement.get("model")
    return (
        f'<div class="block"><span class="label">judgement</span>'
        f"{_pill(score if isinstance(score, (int, float)) else None)} {verdict}"
        f"{' <span class=muted>' + _e(model) + '</span>' if model else ''}"
        f"{'<ul class=criteria>' + items + '</ul>' if items else ''}</div>"
    )


def _generations(step: StepInfo, links: Links) -> str:
    if not step.generations:
        if step.text:
            return (
                '<details class="gens"><summary>raw text</summary>'
                f"<pre>{_e(step.text)}</pre></details>"
            )
        return ""
    tokens = sum(len(g.token_ids) for g in step.generations)
    logprob = sum(sum(g.logprobs) for g in step.generations)
    head = f"{len(step.generations)} generation{'s' if len(step.generations) != 1 else ''}"
    if tokens:
        head += f" · {tokens} tokens · Σ log p {logprob:.2f}"
    blocks: list[str] = []
    for g in step.generations:
        href = links.generation(step.trajectory_id, step.seq, g.position)
        tokens_text = _linked(f"{len(g.token_ids)} tokens", href if g.token_ids else None)
        blocks.append(
            f'<div class="muted">{_e(g.role)} · {_e(g.model)} · {_e(_latency(g.latency_s))}'
            f" · {tokens_text}</div><pre>{_e(g.text)}</pre>"
        )
    return f'<details class="gens"><summary>{_e(head)}</summary>{"".join(blocks)}</details>'
