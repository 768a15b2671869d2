"""The HTML viewer: structure and escaping (html.parser), and the page in a real headless
Chromium driven over the DevTools protocol (``--remote-debugging-pipe``: no extra package, no
network), where its script runs: images load, filters hide the right trajectories."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from agent_graph.runner import Runner, make_group_tasks
from storage.recorder import SQLRecorder
from storage.store import TrajectoryStore
from storage.viewer import render_html, write_html
from tests.pg import EDIT, STOP, graph_context
from tests.scripted import CountingPainter
from tests.test_export import XSS_PROMPT, populate_store

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrajectoryStore, dict[str, str]]:
    path = tmp_path_factory.mktemp("viewer") / "atelier.db"
    store = TrajectoryStore(f"sqlite:///{path}")
    runs = asyncio.run(populate_store(store))
    yield store, runs
    store.close()


@pytest.fixture(scope="module")
def page(populated) -> str:
    return render_html(populated[0])


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of the script elements."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.owners: list[str | None] = []
        """The ``data-id`` of the trajectory element each tag is in (or after)."""
        self.scripts: list[str] = []
        self._owner: str | None = None
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if "trajectory" in attributes.get("class", "").split():
            self._owner = attributes.get("data-id")
        self.tags.append((tag, attributes))
        self.owners.append(self._owner)
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data

    def with_class(self, name: str, tag: str | None = None) -> list[dict[str, str]]:
        return [a for a, _ in self.owned(name, tag)]

    def owned(self, name: str, tag: str | None = None) -> list[tuple[dict[str, str], str | None]]:
        return [
            (a, owner)
            for (t, a), owner in zip(self.tags, self.owners, strict=True)
            if name in a.get("class", "").split() and (tag is None or t == tag)
        ]


def expected(store: TrajectoryStore) -> dict[str, Any]:
    details = [store.trajectory(t.id) for t in store.trajectories()]
    return {
        "details": details,
        "steps": [(s.trajectory_id, s.seq, s.node) for d in details for s in d.steps],
        "step_images": sum(len(s.images_in) + len(s.images_out) for d in details for s in d.steps),
    }


def test_page_has_one_element_per_trajectory_step_and_step_image(populated, page):
    store, _ = populated
    want = expected(store)
    doc = Elements(page)
    cards = doc.with_class("trajectory")
    assert [c["data-id"] for c in cards] == [d.id for d in want["details"]]
    for card, detail in zip(cards, want["details"], strict=True):
        assert card["data-mode"] == (detail.mode or "")
        assert card["data-status"] == detail.status
        assert card["data-score"] == ("" if detail.score is None else repr(detail.score))
        assert card["data-prompt"] == detail.prompt  # attribute-escaped, parsed back
    steps = doc.owned("step", "li")
    assert len(steps) == len(want["steps"]) > 150
    # in order, in their trajectory's element: the page's steps read as the store's
    assert [(t, int(s["data-seq"]), s["data-node"]) for s, t in steps] == want["steps"]
    images = doc.with_class("step-image", "img")
    assert len(images) == want["step_images"]
    directions = Counter(i["data-direction"] for i in images)
    assert directions["out"] == sum(len(s.images_out) for d in want["details"] for s in d.steps)
    assert len(doc.with_class("thumb", "img")) == sum(1 for d in want["details"] if d.final_image)
    # the failed trajectory shows its error, the malformed reflection and the stop phrase flags
    assert sum(1 for c in cards if c["data-status"] == "failed") == 1
    assert "editor crashed &lt;b&gt;badly&lt;/b&gt;" in page
    assert len(doc.with_class("malformed")) >= 2 and doc.with_class("stop")


def test_each_distinct_image_is_embedded_once(populated, page):
    store, _ = populated
    doc = Elements(page)
    table = json.loads(doc.scripts[0])
    used = {a["data-ref"] for _, a in doc.tags if "data-ref" in a}
    assert set(table) == used
    refs = {
        i.ref
        for d in expected(store)["details"]
        for s in d.steps
        for i in (*s.images_in, *s.images_out)
    }
    assert refs <= used and len(used) < len(doc.with_class("step-image")) / 2
    for ref, (mime, data) in table.items():
        assert mime == "image/png" and base64.b64decode(data) == store.image_bytes(ref)
        assert page.count(data) == 1
    assert "data:image" not in page  # no per-<img> copies


def test_untrusted_text_is_escaped_and_nothing_external_loads(populated, page):
    doc = Elements(page)
    assert '<script>alert("pwned")' not in page and "<b>star</b>" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert [t for t, _ in doc.tags].count("script") == 2  # the image JSON and the page script
    for tag, attrs in doc.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert "src" not in attrs and "href" not in attrs  # images get blob: URLs from the script
        if tag == "img":
            assert re.fullmatch(r"[0-9a-f]{64}", attrs["data-ref"])
    csp = next(
        a["content"] for t, a in doc.tags if a.get("http-equiv") == "Content-Security-Policy"
    )
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert "default-src 'none'" in csp and len(nonce) >= 16
    assert [a.get("nonce") for t, a in doc.tags if t == "script"] == [None, nonce]
    assert [a.get("nonce") for t, a in doc.tags if t == "style"] == [nonce]


def test_selection_by_ids_run_and_limit(populated, tmp_path):
    store, runs = populated
    scripted = [t.id for t in store.trajectories(run=runs["scripted"])]
    doc = Elements(render_html(store, trajectory_ids=[scripted[2], scripted[0]]))
    assert [c["data-id"] for c in doc.with_class("trajectory")] == [scripted[2], scripted[0]]
    doc = Elements(render_html(store, run=runs["scripted"]))
    assert [c["data-id"] for c in doc.with_class("trajectory")] == scripted
    limited = render_html(store, limit=3)
    assert len(Elements(limited).with_class("trajectory")) == 3
    assert f"first 3 of {len(store.trajectories())} trajectories" in limited
    with pytest.raises(ValueError, match="not in run"):
        render_html(store, run=runs["shapeworld"], trajectory_ids=[scripted[0]])
    path = write_html(store, tmp_path / "v.html", run=runs["scripted"], title="<mine>")
    assert "<title>&lt;mine&gt; · Atelier</title>" in path.read_text(encoding="utf-8")
    with pytest.raises(KeyError):
        render_html(store, run="no-such-run")
    empty = store.create_run("nothing yet")
    assert "No trajectories." in render_html(store, run=empty.id)


def test_the_trajectory_asked_for_opens_expanded_and_stays_escaped(populated):
    store, runs = populated
    xss = [t.id for t in store.trajectories() if "<script>" in t.prompt]
    scripted = [t.id for t in store.trajectories(run=runs["scripted"])]
    page = render_html(store, trajectory_ids=[xss[0]])  # `atelier view <trajectory id>`
    doc = Elements(page)
    (card,) = doc.with_class("trajectory", "details")
    assert card["data-id"] == xss[0] and "open" in card
    assert '<script>alert("pwned")' not in page and "&lt;script&gt;alert(" in page
    # Its steps are in the opened element, as on a run's page.
    assert {owner for _, owner in doc.owned("step", "li")} == {xss[0]}
    # A run's page is a grid of closed cards, unless asked otherwise.
    closed = Elements(render_html(store, run=runs["scripted"])).with_class("trajectory")
    assert closed and not any("open" in c for c in closed)
    chosen = Elements(render_html(store, run=runs["scripted"], expanded=[scripted[1]]))
    assert [c["data-id"] for c in chosen.with_class("trajectory") if "open" in c] == [scripted[1]]
    shut = Elements(render_html(store, trajectory_ids=[xss[0]], expanded=()))
    assert not any("open" in c for c in shut.with_class("trajectory"))


class BigPainter(CountingPainter):
    def _image(self) -> Image.Image:
        return super()._image().resize((1200, 900))


async def test_large_images_are_embedded_downscaled(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'big.db'}")
    run = store.create_run("big")
    async with SQLRecorder(store, run.id) as recorder:
        context = graph_context(
            store, recorder, mode="reflect", reflections=(EDIT, STOP), painter=BigPainter()
        )
        await Runner(context).run(make_group_tasks(["a big red circle"], 1))
    small = json.loads(Elements(render_html(store, max_image_side=256)).scripts[0])
    for mime, data in small.values():
        assert mime == "image/jpeg"
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.size == (256, 192)
    full = json.loads(Elements(render_html(store, max_image_side=None)).scripts[0])
    assert {ref: base64.b64decode(d) for ref, (_, d) in full.items()} == {
        ref: store.image_bytes(ref) for ref in full
    }
    store.close()


# --- in a real browser ---------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-pipe",
    )

    def __init__(self, timeout_s: float = 20.0) -> None:
        self.timeout_s = timeout_s
        self.profile = tempfile.mkdtemp(prefix="atelier-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move the child's ends above fd 10, so dup2 onto 3 and 4 cannot clobber them.
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire() -> None:
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=wire,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(child_r)
        os.close(child_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        session = kw.get("session", self.session)
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def _next(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str, width: int = 1400, height: int = 1000) -> None:
        targets = self.call("Target.getTargets")["targetInfos"]
        target = next(t for t in targets if t["type"] == "page")
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                if self.js(
                    f"document.readyState === 'complete' && location.href === {json.dumps(url)}"
                ):
                    return
            except RuntimeError:  # the context went away while navigating
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{url} did not load")

    def js(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, selector: str | None = None) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if selector:
            x, y, w, h = self.js(
                f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                ".getBoundingClientRect(); return [r.left, r.top + scrollY, r.width, "
                "Math.min(r.height, 2400)]; })()"
            )
            params.update(
                captureBeyondViewport=True,
                clip={"x": x, "y": y, "width": w, "height": h, "scale": 1},
            )
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", params)["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", session=None)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
    browser = Chromium()
    yield browser
    browser.close()


VISIBLE = "[...document.querySelectorAll('.trajectory')].filter(c => c.offsetParent !== null)"


def test_in_chromium_images_load_and_filters_hide_the_right_trajectories(
    populated, page, chromium, tmp_path
):
    store, _ = populated
    want = expected(store)
    details = want["details"]
    path = tmp_path / "viewer.html"
    path.write_text(page, encoding="utf-8")
    chromium.open(path.as_uri())
    assert chromium.js("window.atelier.ready") is True
    loaded = chromium.js(
        "[...document.querySelectorAll('img.step-image')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )
    assert loaded == want["step_images"] > 100
    assert chromium.js(
        "[...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert chromium.js(f"{VISIBLE}.length") == len(details)
    summary = chromium.js("document.getElementById('summary').textContent")
    assert summary.startswith(f"{len(details)} trajectories")
    chromium.screenshot(tmp_path / "grid.png")

    # mode = decompose, through the select, as a person would
    decompose = [d.id for d in details if d.mode == "decompose"]
    assert 0 < len(decompose) < len(details)
    chromium.js(
        "(() => { const s = document.getElementById('f-mode'); s.value = 'decompose';"
        " s.dispatchEvent(new Event('change', {bubbles: true})); })()"
    )
    assert chromium.js(f"{VISIBLE}.map(c => c.dataset.id)") == decompose
    summary = chromium.js("document.getElementById('summary').textContent")
    assert summary.startswith(f"{len(decompose)} of {len(details)} trajectories")

    # score range and text search, through the page's exposed function and the search box
    low = [d.id for d in details if d.score is not None and d.score <= 0.5]
    assert chromium.js("atelier.setFilters({mode: '', max: 0.5})") == len(low) > 0
    assert chromium.js(f"{VISIBLE}.map(c => c.dataset.id)") == low
    chromium.js(
        "(() => { atelier.setFilters({max: ''}); const q = document.getElementById('f-q');"
        " q.value = 'SCRIPT>ALERT'; q.dispatchEvent(new Event('input', {bubbles: true})); })()"
    )
    xss = [d.id for d in details if d.prompt == XSS_PROMPT]
    assert chromium.js(f"{VISIBLE}.map(c => c.dataset.id)") == xss and len(xss) == 2

    # open the failed one, showing its step timeline
    chromium.js("atelier.setFilters({q: '', status: 'failed'}); atelier.expandAll()")
    steps = chromium.js(
        "[...document.querySelectorAll('.trajectory[open] .step')]"
        ".filter(s => s.offsetParent !== null).map(s => s.dataset.node)"
    )
    failed = next(d for d in details if d.status == "failed")
    assert steps == [s.node for s in failed.steps]
    chromium.js("atelier.setFilters({status: ''}); atelier.collapseAll()")
    chromium.js(
        "(() => { const c = [...document.querySelectorAll('.trajectory')]"
        ".filter(c => c.dataset.mode === 'decompose').sort((a, b) => b.dataset.images -"
        " a.dataset.images)[0]; c.open = true; c.scrollIntoView(); })()"
    )
    shot = chromium.screenshot(tmp_path / "trajectory.png", ".trajectory[open]")
    assert shot.stat().st_size > 10_000

    # nothing went wrong in the page: no exception, no CSP violation, no dialog
    problems = [
        e
        for e in chromium.events
        if e.get("method") in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert problems == []
    print(f"screenshots: {tmp_path / 'grid.png'} {shot}")
