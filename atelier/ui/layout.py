"""The frame every page of ``atelier ui`` shares: escaping, the page skeleton with its
Content-Security-Policy nonce, navigation, tables, links that carry the filter state, and the
stylesheet (the static viewer's, which the trajectory parts need, plus the app's own)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from storage.viewer_assets import CSS as VIEWER_CSS

NAV = (
    ("runs", "/", "Runs"),
    ("training", "/training", "Training"),
    ("versions", "/versions", "Versions"),
)


def e(value: Any) -> str:
    """``value`` as text safe in HTML content and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def path(*parts: str) -> str:
    """An absolute URL path from segments, each percent-encoded (ids may hold anything)."""
    return "/" + "/".join(quote(part, safe="") for part in parts)


def with_query(base: str, params: Mapping[str, Any]) -> str:
    """``base`` with the non-empty ``params`` as its query string (keys in the given order)."""
    kept = {k: v for k, v in params.items() if v is not None and v != ""}
    return f"{base}?{urlencode(kept)}" if kept else base


def num(value: float | None, digits: int = 3) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def run_options(runs: Sequence[Any], selected: str | None = None) -> str:
    """``<option>``s of a run picker (name and id prefix), ``selected`` pre-selected."""
    return "".join(
        f'<option value="{e(r.id)}"{" selected" if r.id == selected else ""}>'
        f"{e(r.name)} · {e(r.id[:8])}</option>"
        for r in runs
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "data") -> str:
    """A table; ``headers`` are text (escaped here), ``rows`` are markup (escaped by callers)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def page(title: str, body: str, *, nonce: str, active: str = "", subtitle: str = "") -> str:
    """A whole page: no script (nothing here needs one), styles under ``nonce``."""
    nav = "".join(
        f'<a href="{href}"{" class=active" if key == active else ""}>{e(label)}</a>'
        for key, href, label in NAV
    )
    sub = f" <span>{e(subtitle)}</span>" if subtitle else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="atelier">
<title>{e(title)} · Atelier</title>
<style nonce="{nonce}">{VIEWER_CSS}{APP_CSS}</style>
</head>
<body>
<header class="top">
<nav class="app-nav"><b>Atelier</b>{nav}</nav>
<h1>{e(title)}{sub}</h1>
</header>
<main class="app">
{body}
</main>
</body>
</html>
"""


def content_security_policy(nonce: str) -> str:
    return (
        "default-src 'none'; img-src 'self'; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


APP_CSS = (
    """
.app-nav { display: flex; gap: 16px; align-items: baseline; margin-bottom: 6px; font-size: 13px; }
.app-nav a { color: var(--muted); text-decoration: none; }
.app-nav a.active, .app-nav a:hover { color: var(--accent); }
main.app { padding: 16px 24px 60px; }
main.app a { color: var(--accent); }
main.app h2 { font-size: 16px; margin: 22px 0 8px; }
table.data { border-collapse: collapse; background: var(--panel); border: 1px solid var(--line);
  border-radius: 8px; font-size: 13px; }
table.data th, table.data td { padding: 5px 10px; border-bottom: 1px solid var(--line);
  text-align: left; vertical-align: top; }
table.data th { font-size: 11px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); font-weight: 600; }
table.data td.num, table.data th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: grid; gap: 14px; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr));
  margin-top: 12px; }
.tcard { background: var(--panel); border: 1px solid var(--line); border-radius: 10px;
  overflow: hidden; box-shadow: var(--shadow); display: block; color: inherit !important;
  text-decoration: none; }
.tcard .thumb-wrap img { width: 100%; height: 100%; object-fit: contain;
  image-rendering: pixelated; }
.tcard .card-body { padding: 8px 10px; }
.pager { display: flex; gap: 6px; align-items: center; margin: 14px 0; flex-wrap: wrap; }
.pager a, .pager span { padding: 3px 9px; border: 1px solid var(--line); border-radius: 6px;
  background: var(--panel); font-size: 13px; text-decoration: none; }
.pager span.current { border-color: var(--accent); color: var(--accent); font-weight: 600; }
.pager span.gap { border: none; background: none; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; margin: 4px 0 10px; }
.stat { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 6px 12px; min-width: 90px; }
.stat b { display: block; font-size: 17px; }
.stat span { font-size: 11px; color: var(--muted); text-transform: uppercase; }
.group { display: grid; gap: 12px; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); }
.member { background: var(--panel); border: 1px solid var(--line); border-radius: 10px;
  padding: 8px; box-shadow: var(--shadow); }
.member .final { width: 100%; aspect-ratio: 1/1; object-fit: contain; image-rendering: pixelated;
  background: #fff; display: block; }
.member .strip { display: flex; gap: 3px; flex-wrap: wrap; margin: 4px 0; }
.member .strip img { width: 38px; height: 38px; object-fit: contain; image-rendering: pixelated;
  background: #fff; border: 1px solid var(--line); }
.member table { width: 100%; font-size: 12.5px; border-collapse: collapse; }
.member td { padding: 1px 3px; border-bottom: 1px solid var(--line); }
.member td.v { text-align: right; font-variant-numeric: tabular-nums; }
.member tr.advantage td { font-weight: 700; }
.adv-pos { color: var(--ok); } .adv-neg { color: var(--bad); }
.tokens { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px; line-height: 1.9; font-family: ui-monospace, Menlo, Consolas, monospace;
  font-size: 12.5px; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 3px; padding: 1px 1px; }
"""
    + "".join(  # token shades by probability: red (improbable) to green (certain)
        f".tok.p{i} {{ background: hsla({12 * i}, 70%, 50%, .3); }}\n" for i in range(11)
    )
    + """.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
svg.chart .grid { stroke: var(--line); }
svg.chart text { fill: var(--muted); font-size: 10px; }
svg.chart .chart-title { fill: var(--ink); font-size: 12px; font-weight: 600; }
.compare { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.delta-up { color: var(--ok); } .delta-down { color: var(--bad); }
form.inline { display: flex; gap: 8px; align-items: end; flex-wrap: wrap; margin: 8px 0; }
form.inline label { display: flex; flex-direction: column; font-size: 11px; color: var(--muted); }
form.inline select, form.inline button { font: inherit; font-size: 13px; padding: 4px 6px; }
.error-page { font-size: 15px; }
"""
)
