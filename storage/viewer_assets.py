"""The stylesheet and script of the trajectory viewer page (:mod:`storage.viewer`).

Kept apart so the page logic reads as Python. Neither contains data: the page embeds its images
as JSON in ``<script type="application/json" id="atelier-images">`` and everything else as
escaped HTML with ``data-*`` attributes, which the script reads (never as markup).
"""

from __future__ import annotations

CSS = """
:root {
  --bg: #f4f3ef; --panel: #ffffff; --ink: #1f2328; --muted: #6a6f76; --line: #e3e1da;
  --accent: #4f46e5; --ok: #1a7f37; --ok-bg: #dcf5e3; --bad: #c0362c; --bad-bg: #fde2df;
  --mid: #9a6700; --mid-bg: #fff1c2; --chip: #eeede8; --shadow: 0 1px 2px rgba(0,0,0,.06),
  0 4px 14px rgba(0,0,0,.05);
  --plan: #7c3aed; --decompose: #0f766e; --draw: #2563eb; --reflect: #b45309;
  --refine: #15803d; --stop: #57606a; --other: #6e7781;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #15171a; --panel: #1e2126; --ink: #e6e6e6; --muted: #9aa0a6; --line: #30343a;
    --accent: #8b8cf8; --ok: #56d364; --ok-bg: #1b3a24; --bad: #ff7b72; --bad-bg: #46201d;
    --mid: #e3b341; --mid-bg: #3d3113; --chip: #2a2e34;
    --shadow: 0 1px 2px rgba(0,0,0,.4);
  }
}
* { box-sizing: border-box; }
html { background: var(--bg); }
body {
  margin: 0; color: var(--ink); background: var(--bg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif;
}
code, .mono {
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
}
header.top { background: var(--bg); border-bottom: 1px solid var(--line); padding: 14px 24px 10px; }
header.top h1 { margin: 0; font-size: 20px; font-weight: 650; letter-spacing: -.01em; }
header.top h1 span { color: var(--muted); font-weight: 400; }
.meta { margin: 2px 0 10px; color: var(--muted); font-size: 12.5px; }
.meta b { color: var(--ink); font-weight: 600; }
.filters { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: end; }
.filters label {
  display: flex; flex-direction: column; gap: 2px; font-size: 11px; color: var(--muted);
  text-transform: uppercase; letter-spacing: .04em;
}
.filters select, .filters input, .filters button {
  font: inherit; font-size: 13px; color: var(--ink); background: var(--panel);
  border: 1px solid var(--line); border-radius: 7px; padding: 5px 8px; min-height: 31px;
}
.filters input[type=number] { width: 76px; }
.filters input[type=search] { width: 220px; }
.filters button { cursor: pointer; }
.filters button:hover { border-color: var(--accent); }
.filters .range { flex-direction: row; align-items: center; gap: 4px; }
.filters .range > span { display: flex; flex-direction: column; gap: 2px; }
.summary { margin: 10px 0 0; font-size: 13px; }
.summary .n { font-weight: 650; }
.notice { margin: 6px 0 0; color: var(--mid); font-size: 12.5px; }
main.grid {
  display: grid; gap: 16px; padding: 18px 24px 60px;
  grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); align-items: start;
}
.empty { padding: 40px 24px; color: var(--muted); }
.trajectory {
  display: block; background: var(--panel); border: 1px solid var(--line);
  border-radius: 12px; box-shadow: var(--shadow); overflow: hidden;
}
.trajectory[hidden] { display: none; }
.trajectory[open] { grid-column: 1 / -1; }
.trajectory > summary { list-style: none; cursor: pointer; display: block; }
.trajectory > summary::-webkit-details-marker { display: none; }
.trajectory > summary:focus-visible { outline: 2px solid var(--accent); outline-offset: -2px; }
.card, .card-body, .prompt, .facts-line { display: block; }
.card { position: relative; }
.thumb-wrap { display: block; position: relative; background: var(--chip); aspect-ratio: 1 / 1; }
.thumb, .film-image, .step-image {
  image-rendering: pixelated; display: block; background: #fff;
}
.thumb { width: 100%; height: 100%; object-fit: contain; }
img.missing {
  background: repeating-linear-gradient(45deg, var(--chip), var(--chip) 6px,
  var(--panel) 6px, var(--panel) 12px);
}
.no-image {
  display: flex; align-items: center; justify-content: center; height: 100%;
  color: var(--muted); font-size: 12px;
}
.score-pill {
  display: inline-block; padding: 1px 7px; border-radius: 999px; font-weight: 650;
  font-size: 12px; font-variant-numeric: tabular-nums; background: var(--chip); color: var(--muted);
}
.thumb-wrap .score-pill { position: absolute; top: 8px; right: 8px; box-shadow: var(--shadow); }
.score-hi { background: var(--ok-bg); color: var(--ok); }
.score-mid { background: var(--mid-bg); color: var(--mid); }
.score-lo { background: var(--bad-bg); color: var(--bad); }
.card-body { padding: 10px 12px 12px; }
.prompt { margin: 0 0 8px; font-weight: 560; overflow-wrap: anywhere; }
.badges { display: flex; flex-wrap: wrap; gap: 5px; align-items: center; }
.badge {
  display: inline-block; padding: 1px 7px; border-radius: 6px; font-size: 11.5px;
  background: var(--chip); color: var(--ink); white-space: nowrap;
}
.badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.bad { background: var(--bad-bg); color: var(--bad); }
.badge.warn { background: var(--mid-bg); color: var(--mid); }
.badge.mode { color: #fff; background: var(--other); }
.badge.mode-direct { background: var(--draw); }
.badge.mode-reflect { background: var(--reflect); }
.badge.mode-decompose { background: var(--decompose); }
.facts-line { margin-top: 6px; color: var(--muted); font-size: 12px; }
.trail { display: flex; align-items: flex-end; gap: 2px; height: 18px; margin-top: 8px; }
.trail i { display: block; width: 7px; border-radius: 2px 2px 0 0; background: var(--line); }
.trail i.b0 { height: 2px; background: var(--bad); } .trail i.b1 { height: 10%; }
.trail i.b2 { height: 20%; } .trail i.b3 { height: 30%; } .trail i.b4 { height: 40%; }
.trail i.b5 { height: 50%; } .trail i.b6 { height: 60%; } .trail i.b7 { height: 70%; }
.trail i.b8 { height: 80%; } .trail i.b9 { height: 90%; } .trail i.b10 { height: 100%; }
.trail i.b1, .trail i.b2, .trail i.b3, .trail i.b4 { background: var(--bad); }
.trail i.b5, .trail i.b6, .trail i.b7, .trail i.b8, .trail i.b9 { background: var(--mid); }
.trail i.b10 { background: var(--ok); }
.trail i.bn { height: 3px; background: var(--muted); }
.trajectory[open] > summary .card { display: grid; grid-template-columns: 200px 1fr; }
.trajectory[open] > summary .card-body { padding: 14px 18px; }
.trajectory[open] > summary .prompt { font-size: 17px; }
.trajectory[open] > summary { border-bottom: 1px solid var(--line); }
.detail { padding: 14px 18px 18px; }
.facts {
  display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0 0 14px;
  font-size: 12.5px;
}
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.error-box {
  background: var(--bad-bg); color: var(--bad); border-radius: 8px; padding: 8px 10px;
  white-space: pre-wrap; overflow-wrap: anywhere; margin: 6px 0;
}
.film { display: flex; gap: 10px; overflow-x: auto; padding: 2px 0 12px; margin-bottom: 8px; }
.film figure { margin: 0; flex: none; width: 112px; position: relative; }
.film figure .score-pill { position: absolute; top: 4px; right: 4px; font-size: 11px; }
.film-image { width: 112px; height: 112px; object-fit: contain; border-radius: 6px;
  border: 1px solid var(--line); }
.film figcaption { font-size: 11.5px; color: var(--muted); margin-top: 3px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.film figure.final .film-image { border: 2px solid var(--accent); }
h3.section { font-size: 12px; text-transform: uppercase; letter-spacing: .05em;
  color: var(--muted); margin: 4px 0 8px; font-weight: 600; }
ol.timeline { list-style: none; margin: 0; padding: 0; }
.step { position: relative; padding: 0 0 14px 26px; border-left: 2px solid var(--line);
  margin-left: 9px; }
.step:last-child { border-left-color: transparent; }
.step::before {
  content: ""; position: absolute; left: -7px; top: 4px; width: 12px; height: 12px;
  border-radius: 50%; background: var(--node, var(--other)); border: 2px solid var(--panel);
}
.node-plan { --node: var(--plan); } .node-decompose { --node: var(--decompose); }
.node-draw { --node: var(--draw); } .node-reflect { --node: var(--reflect); }
.node-refine { --node: var(--refine); } .node-stop { --node: var(--stop); }
.step-head { display: flex; flex-wrap: wrap; gap: 4px 10px; align-items: baseline; }
.step-head .seq { color: var(--muted); font-variant-numeric: tabular-nums; min-width: 1.5em; }
.step-head .node { font-weight: 650; color: var(--node, var(--other)); }
.step-head .stage, .step-head .latency, .step-head .models { color: var(--muted); font-size: 12px; }
.step-body { margin-top: 6px; display: flex; flex-direction: column; gap: 8px; }
.step.failed .step-head .node { color: var(--bad); }
.images-row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.out-image { margin: 0; display: flex; gap: 14px; align-items: flex-start; }
.out-image .step-image { width: 224px; height: 224px; object-fit: contain; border-radius: 8px;
  border: 1px solid var(--line); }
.out-image .step-image { flex: none; }
.out-image figcaption { font-size: 13px; overflow-wrap: anywhere; max-width: 420px;
  display: flex; flex-direction: column; gap: 4px; align-items: flex-start; }
.in-images { display: flex; gap: 6px; align-items: center; color: var(--muted); font-size: 12px; }
.in-images .step-image { width: 56px; height: 56px; object-fit: contain; border-radius: 5px;
  border: 1px solid var(--line); opacity: .9; }
.block { background: var(--bg); border-radius: 8px; padding: 8px 10px; overflow-wrap: anywhere; }
.block .label { font-size: 11px; text-transform: uppercase; letter-spacing: .05em;
  color: var(--muted); margin-right: 6px; }
.reflection.malformed { background: var(--mid-bg); }
.reflection .thought { color: var(--muted); font-style: italic; margin: 4px 0; }
.reflection .instruction { font-weight: 600; margin: 4px 0 0; }
.reflection .target { font-size: 12px; color: var(--muted); }
.reflection .raw { white-space: pre-wrap; margin: 4px 0 0; }
.decision { font-size: 13px; }
.decision b { color: var(--accent); }
ol.subtasks { margin: 4px 0 0; padding-left: 22px; }
ol.subtasks li { margin: 2px 0; }
ol.subtasks .expect { color: var(--muted); font-size: 12px; }
.criteria { list-style: none; margin: 4px 0 0; padding: 0; display: flex; flex-wrap: wrap;
  gap: 4px; }
.gens > summary { cursor: pointer; color: var(--muted); font-size: 12px; }
.gens pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 6px 0; font-size: 12px;
  background: var(--bg); padding: 8px; border-radius: 6px; max-height: 320px; overflow: auto; }
.muted { color: var(--muted); }
"""

JS = r"""
(function () {
  'use strict';
  var grid = document.getElementById('grid');
  var cards = Array.prototype.slice.call(document.querySelectorAll('.trajectory'));
  var form = document.getElementById('filters');
  var summary = document.getElementById('summary');
  var urls = {};
  var missing = 0;

  // Images: each distinct image is embedded once (base64, keyed by sha256) and turned into one
  // blob: URL that every <img data-ref> showing it shares.
  var images = {};
  var source = document.getElementById('atelier-images');
  if (source) { images = JSON.parse(source.textContent); }
  function imageUrl(ref) {
    if (Object.prototype.hasOwnProperty.call(urls, ref)) { return urls[ref]; }
    var entry = images[ref];
    var url = null;
    if (entry) {
      var bin = atob(entry[1]);
      var bytes = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
      url = URL.createObjectURL(new Blob([bytes], { type: entry[0] }));
    }
    urls[ref] = url;
    return url;
  }
  function settled(img) {  // resolves once the image has loaded or failed (no forced decode)
    return new Promise(function (resolve) {
      if (img.complete) { resolve(); return; }
      img.addEventListener('load', resolve, { once: true });
      img.addEventListener('error', resolve, { once: true });
    });
  }
  var imgs = document.querySelectorAll('img[data-ref]');
  var loads = [];
  for (var k = 0; k < imgs.length; k++) {
    var img = imgs[k];
    var url = imageUrl(img.getAttribute('data-ref'));
    if (url) {
      img.src = url;
      loads.push(settled(img));
    } else {
      img.classList.add('missing');
      img.alt = 'image not available';
      missing++;
    }
  }

  function el(id) { return document.getElementById(id); }
  function value(id) { var e = el(id); return e ? e.value : ''; }
  function num(text) { return text === '' ? null : Number(text); }

  function matches(card, f) {
    var d = card.dataset;
    if (f.mode && d.mode !== f.mode) { return false; }
    if (f.status && d.status !== f.status) { return false; }
    if (f.category && d.category !== f.category) { return false; }
    if (f.run && d.run !== f.run) { return false; }
    if (f.correct && d.correct !== f.correct) { return false; }
    if (f.min !== null || f.max !== null) {
      if (d.score === '') { return false; }
      var s = Number(d.score);
      if (f.min !== null && s < f.min) { return false; }
      if (f.max !== null && s > f.max) { return false; }
    }
    if (f.q) {
      var hay = (d.prompt || '').toLowerCase();
      if (hay.indexOf(f.q) < 0 && (d.id || '').indexOf(f.q) !== 0) { return false; }
    }
    return true;
  }

  function readFilters() {
    return {
      mode: value('f-mode'), status: value('f-status'), category: value('f-category'),
      run: value('f-run'), correct: value('f-correct'),
      min: num(value('f-min')), max: num(value('f-max')),
      q: value('f-q').trim().toLowerCase()
    };
  }

  function fmt(x, digits) { return x.toFixed(digits); }
  function plural(n, word) { return n + ' ' + word + (n === 1 ? '' : 's'); }

  function sortCards() {
    var key = value('f-sort');
    var order = cards.slice();
    var score = function (c) { return c.dataset.score === '' ? -1 : Number(c.dataset.score); };
    if (key === 'score-asc') { order.sort(function (a, b) { return score(a) - score(b); }); }
    else if (key === 'score-desc') { order.sort(function (a, b) { return score(b) - score(a); }); }
    else if (key === 'images') {
      order.sort(function (a, b) { return b.dataset.images - a.dataset.images; });
    } else if (key === 'steps') {
      order.sort(function (a, b) { return b.dataset.steps - a.dataset.steps; });
    } else {
      order.sort(function (a, b) { return a.dataset.index - b.dataset.index; });
    }
    for (var i = 0; i < order.length; i++) { grid.appendChild(order[i]); }
  }

  function applyFilters() {
    var f = readFilters();
    var shown = 0, succeeded = 0, correct = 0, scored = 0, total = 0, steps = 0, nimages = 0;
    for (var i = 0; i < cards.length; i++) {
      var c = cards[i];
      var ok = matches(c, f);
      c.hidden = !ok;
      if (!ok) { continue; }
      shown++;
      if (c.dataset.status === 'succeeded') { succeeded++; }
      if (c.dataset.correct === 'true') { correct++; }
      if (c.dataset.score !== '') { scored++; total += Number(c.dataset.score); }
      steps += Number(c.dataset.steps);
      nimages += Number(c.dataset.images);
    }
    sortCards();
    var parts = [];
    var noun = cards.length === 1 ? ' trajectory' : ' trajectories';
    parts.push(shown === cards.length ? shown + noun : shown + ' of ' + cards.length + noun);
    parts.push(succeeded + ' succeeded');
    parts.push(correct + ' correct' + (shown ? ' (' + fmt(100 * correct / shown, 0) + '%)' : ''));
    parts.push('mean score ' + (scored ? fmt(total / scored, 3) : 'n/a'));
    parts.push(plural(steps, 'step'));
    parts.push(plural(nimages, 'image'));
    if (missing) { parts.push(missing + ' image(s) not available'); }
    summary.textContent = parts.join(' · ');
    summary.dataset.shown = String(shown);
    return shown;
  }

  function setFilters(values) {
    var names = ['mode', 'status', 'category', 'run', 'correct', 'min', 'max', 'q', 'sort'];
    for (var i = 0; i < names.length; i++) {
      var name = names[i];
      if (values && Object.prototype.hasOwnProperty.call(values, name)) {
        var e = el('f-' + name);
        if (e) { e.value = values[name] === null ? '' : String(values[name]); }
      }
    }
    return applyFilters();
  }

  function setOpen(open) {
    for (var i = 0; i < cards.length; i++) { if (!cards[i].hidden) { cards[i].open = open; } }
  }

  if (form) {
    form.addEventListener('input', applyFilters);
    form.addEventListener('change', applyFilters);
    form.addEventListener('submit', function (e) { e.preventDefault(); });
    form.addEventListener('reset', function () { setTimeout(applyFilters, 0); });
  }
  var expand = el('expand-all'), collapse = el('collapse-all');
  if (expand) { expand.addEventListener('click', function () { setOpen(true); }); }
  if (collapse) { collapse.addEventListener('click', function () { setOpen(false); }); }
  applyFilters();

  window.atelier = {
    applyFilters: applyFilters,
    setFilters: setFilters,
    expandAll: function () { setOpen(true); },
    collapseAll: function () { setOpen(false); },
    visibleCount: function () { return cards.filter(function (c) { return !c.hidden; }).length; },
    ready: Promise.all(loads).then(function () { return true; })
  };
})();
"""
