"""``atelier ui`` in a real headless Chromium driven by Playwright (the system's
``/usr/bin/chromium``: nothing is downloaded): every view loads with no script or
Content-Security-Policy error and its images decode; the group view shows the stored rewards and
advantages of a trained run; search finds a reflection's word; the pager walks a run; a prompt
holding ``<script>`` and HTML is shown as text and never runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from storage.analysis import group_view, training_series
from tests.ui_store import XSS_PROMPT

pytest_plugins = ("tests.ui_fixtures",)  # ui_built, ui_store, ui_base: one store a session

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.models,  # the store holds a run sampled from a tiny transformers LM
    pytest.mark.skipif(
        not CHROMIUM.exists() and shutil.which("chromium") is None,
        reason="needs Chromium (apt install chromium; .ci/run installs it)",
    ),
]


@pytest.fixture(scope="module")
def browser(ui_base):
    # After the store is built: Playwright's sync API runs an event loop in this thread, and
    # the fixture's asyncio.run() cannot run inside one.
    with playwright_api.sync_playwright() as p:
        executable = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watched:
    """A page whose console errors, uncaught exceptions and dialogs are collected."""

    def __init__(self, browser) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, url: str) -> None:
        response = self.page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, url
        self.page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # lazy images
        self.page.wait_for_load_state("networkidle")

    def broken_images(self) -> list[str]:
        return self.page.evaluate(
            "Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0)"
            ".map(i => i.src)"
        )

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def watched(browser):
    page = Watched(browser)
    yield page
    page.close()


def test_every_view_loads_without_errors(watched, ui_base, ui_built, ui_store):
    ids = ui_built[1]
    series = training_series(ui_store)
    trajectory = ui_store.trajectories(run=ids.trained_run)[0].id
    urls = [
        "/",
        f"/runs/{ids.demo_runs['reflect']}",
        f"/runs/{ids.trained_run}/groups",
        f"/runs/{ids.trained_run}/groups/{ids.trained_group}",
        f"/trajectories/{trajectory}",
        "/training",
        f"/training/{series[0].key}",
        "/versions",
        f"/compare?a={ids.demo_runs['direct']}&b={ids.demo_runs['auto']}",
    ]
    for url in urls:
        watched.open(ui_base + url)
        assert watched.errors == [], (url, watched.errors)
        assert watched.broken_images() == [], url
        assert watched.page.locator("h1").count() == 1
    assert watched.page.locator("svg.chart").count() == 0  # the compare page has none
    watched.open(ui_base + f"/training/{series[0].key}")
    assert watched.page.locator("svg.chart polyline").count() >= 4


def test_group_view_shows_stored_rewards_and_advantages(watched, ui_base, ui_built, ui_store):
    ids = ui_built[1]
    watched.open(ui_base + f"/runs/{ids.trained_run}/groups/{ids.trained_group}")
    view = group_view(ui_store, ids.trained_run, ids.trained_group)
    members = watched.page.locator("section.member")
    assert members.count() == len(view.members) >= 2
    for index, member in enumerate(view.members):
        card = members.nth(index)
        assert card.get_attribute("data-id") == member.summary.id
        shown = card.locator("tr.advantage td.v").inner_text()
        assert member.advantage is not None
        assert float(shown) == pytest.approx(member.advantage, abs=5e-5)
        stored = [
            r for r in ui_store.rewards(trajectory_id=member.summary.id) if r.step_seq is None
        ]
        for name in {r.name for r in stored} - {"advantage"}:
            latest = [r.value for r in stored if r.name == name][-1]
            cell = card.locator(f'tr.reward[data-name="{name}"] td.v').inner_text()
            assert float(cell) == pytest.approx(latest, rel=1e-3, abs=1e-4), name
        assert card.locator("img.final").evaluate("i => i.naturalWidth") > 0
    assert watched.errors == []


def test_search_box_finds_a_reflections_word(watched, ui_base, ui_built, ui_store):
    ids = ui_built[1]
    word_re = re.compile(rf"\b{re.escape(ids.step_word)}\b", re.I)
    for run in ids.run_ids:
        expected = [
            t.id
            for t in ui_store.trajectories(run=run)
            if any(word_re.search(s.text or "") for s in ui_store.trajectory(t.id).steps)
            or word_re.search(t.prompt)
        ]
        if expected:
            break
    else:
        pytest.fail("the fixture's step word is in no step text")
    watched.open(ui_base + f"/runs/{run}?per=200")
    watched.page.fill('input[name="q"]', ids.step_word.upper())  # case-insensitive
    watched.page.click('button[type="submit"]')
    watched.page.wait_for_load_state("load")
    assert f"q={ids.step_word.upper()}" in watched.page.url
    shown = watched.page.locator("a.trajectory-tile").evaluate_all(
        "tiles => tiles.map(t => t.dataset.id)"
    )
    assert shown == expected
    assert watched.errors == []


def test_pager_walks_a_run(watched, ui_base, ui_built, ui_store):
    run = max(ui_built[1].run_ids, key=lambda r: len(ui_store.trajectories(run=r)))
    expected = [t.id for t in ui_store.trajectories(run=run)]
    assert len(expected) > 10, "the fixture's largest run spans several pages"
    watched.open(ui_base + f"/runs/{run}?per=10")
    seen: list[str] = []
    while True:
        seen += watched.page.locator("a.trajectory-tile").evaluate_all(
            "tiles => tiles.map(t => t.dataset.id)"
        )
        following = watched.page.locator('nav.pager a[rel="next"]').first
        if following.count() == 0:
            break
        following.click()
        watched.page.wait_for_load_state("load")
    assert seen == expected
    assert watched.errors == []


def test_a_prompt_with_script_and_html_is_shown_as_text(watched, ui_base, ui_built):
    ids = ui_built[1]
    for url in (f"/trajectories/{ids.xss_trajectory}", f"/runs/{ids.demo_runs['reflect']}"):
        watched.open(ui_base + url)
        prompt = watched.page.locator(".prompt").filter(has_text="alert(1)").first
        assert prompt.inner_text() == XSS_PROMPT
        assert prompt.locator("b, script").count() == 0
        assert watched.dialogs == []
        assert watched.page.evaluate("document.scripts.length") == 0
    assert watched.errors == []
