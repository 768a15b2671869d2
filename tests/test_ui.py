"""``atelier ui`` over HTTP: a real store (ShapeWorld runs and a trained GRPO run,
``tests/ui_store.py``) served by uvicorn on loopback, read with httpx and parsed with
html.parser. What the browser shows is in ``tests/test_ui_browser.py``."""

from __future__ import annotations

import html
import io
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from PIL import Image

from atelier.ui.app import create_app
from storage.analysis import group_view
from storage.store import TrajectoryStore
from tests.ui_server import serving
from tests.ui_store import XSS_PROMPT, build_ui_store

pytestmark = pytest.mark.models  # the store holds a run sampled from a tiny transformers LM
pytest_plugins = ("tests.ui_fixtures",)  # ui_built, ui_store, ui_base: one store a session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client(ui_base):
    with httpx.Client(base_url=ui_base, timeout=30) as client:
        yield client


class Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def with_class(self, cls: str) -> list[dict[str, str]]:
        return [a for _, a in self.tags if cls in a.get("class", "").split()]


def tile_ids(text: str) -> list[str]:
    return [a["data-id"] for a in Tags(text).with_class("trajectory-tile")]


def test_runs_page_lists_every_run_with_links(client, ui_store, ui_built):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for run in ui_store.runs():
        assert f'href="/runs/{run.id}"' in page.text
        assert html.escape(run.name) in page.text
    assert "script-src 'nonce-" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_pagination_walks_every_trajectory_of_a_run_once_in_order(client, ui_store, ui_built):
    run = ui_built[1].demo_runs["reflect"]
    expected = [t.id for t in ui_store.trajectories(run=run)]
    seen: list[str] = []
    number = 1
    while True:
        page = client.get(f"/runs/{run}", params={"per": 24, "page": number})
        assert page.status_code == 200
        ids = tile_ids(page.text)
        if not ids:
            break
        seen += ids
        number += 1
    assert seen == expected
    assert f'<span class="n">{len(expected)}</span>' in client.get(f"/runs/{run}").text


def test_filters_in_the_url_select_server_side(client, ui_store, ui_built):
    run = ui_built[1].demo_runs["auto"]
    everything = ui_store.trajectories(run=run)
    page = client.get(f"/runs/{run}", params={"correct": "yes", "per": 200})
    assert tile_ids(page.text) == [t.id for t in everything if t.correct is True]
    mode = everything[0].mode
    page = client.get(f"/runs/{run}", params={"mode": mode, "correct": "no", "per": 200})
    assert tile_ids(page.text) == [
        t.id for t in everything if t.mode == mode and t.correct is False
    ]
    # the form shows the filter state back, and the pager links keep it
    assert re.search(r'<option value="no" selected>', page.text)


def test_search_finds_a_word_of_a_reflection_and_not_elsewhere(client, ui_store, ui_built):
    ids = ui_built[1]
    found: list[str] = []
    for run in ids.run_ids:
        found += tile_ids(client.get(f"/runs/{run}", params={"q": ids.step_word, "per": 200}).text)
    assert found
    for trajectory_id in found:
        detail = ui_store.trajectory(trajectory_id)
        texts = [detail.prompt, *(s.text or "" for s in detail.steps)]
        assert any(re.search(rf"\b{re.escape(ids.step_word)}\b", t, re.I) for t in texts)
        assert not re.search(rf"\b{re.escape(ids.step_word)}\b", detail.prompt, re.I)


def test_a_hostile_prompt_is_text_on_every_page(client, ui_built):
    ids = ui_built[1]
    pages = [
        client.get("/runs/" + ids.demo_runs["reflect"]),
        client.get("/trajectories/" + ids.xss_trajectory),
        client.get("/runs/" + ids.demo_runs["reflect"] + "/groups"),
    ]
    for page in pages:
        assert page.status_code == 200
        assert "<script>alert(1)</script>" not in page.text
        assert "<b>two red circles</b>" not in page.text
        assert html.escape(XSS_PROMPT) in page.text
    # the only script-ish tags are none at all: the app's pages need no script
    assert all(tag != "script" for tag, _ in Tags(pages[1].text).tags)


def test_group_view_shows_each_members_stored_rewards_and_advantage(client, ui_store, ui_built):
    ids = ui_built[1]
    page = client.get(f"/runs/{ids.trained_run}/groups/{ids.trained_group}")
    assert page.status_code == 200
    members = Tags(page.text).with_class("member")
    truth = {r.trajectory_id: r.value for r in ui_store.rewards(name="advantage")}
    view = group_view(ui_store, ids.trained_run, ids.trained_group)
    assert [m["data-id"] for m in members] == [m.summary.id for m in view.members]
    for member in members:
        stored = [
            r for r in ui_store.rewards(trajectory_id=member["data-id"]) if r.name == "advantage"
        ]
        assert stored, "a trained group's member has a stored advantage"
        assert float(member["data-advantage"]) == pytest.approx(stored[-1].value, abs=0)
        assert member["data-id"] in truth
    for name in ("composite", "penalised"):
        assert f'data-name="{name}"' in page.text


def _first_generation_with_tokens(ui_store, run_ids):
    for run in run_ids:
        for summary in ui_store.trajectories(run=run):
            detail = ui_store.trajectory(summary.id)
            for step in detail.steps:
                for generation in step.generations:
                    if generation.token_ids:
                        return detail, step, generation
    return None


def test_token_page_shades_every_token_by_its_log_prob(client, ui_store, ui_built):
    found = _first_generation_with_tokens(ui_store, ui_built[1].run_ids)
    if found is None:
        pytest.skip("no generation with token ids in this store")
    detail, step, generation = found
    url = f"/trajectories/{detail.id}/generations/{step.seq}/{generation.position}"
    page = client.get(url)
    assert page.status_code == 200
    tokens = Tags(page.text).with_class("tok")
    assert [float(t["data-logprob"]) for t in tokens] == list(generation.logprobs)
    assert f'href="{url}"' in client.get(f"/trajectories/{detail.id}").text


def test_training_pages_plot_every_iteration(client, ui_store, ui_built):
    listing = client.get("/training")
    assert listing.status_code == 200
    keys = re.findall(r'href="/training/([^"]+)"', listing.text)
    assert keys
    page = client.get(f"/training/{keys[0]}")
    assert page.status_code == 200
    assert page.text.count('<svg class="chart"') >= 6
    for label in ("loss", "KL", "accuracy", "clip fraction"):
        assert f"{label}" in page.text


def test_versions_page_names_the_runs_that_used_each_version(client, ui_built):
    page = client.get("/versions")
    assert page.status_code == 200
    for label in ui_built[1].versions:
        _, version = label.split("@")
        assert html.escape(version) in page.text


def test_compare_two_runs(client, ui_built):
    ids = ui_built[1]
    a, b = ids.demo_runs["direct"], ids.demo_runs["reflect"]
    page = client.get("/compare", params={"a": a, "b": b})
    assert page.status_code == 200
    assert "demo-direct" in page.text and "demo-reflect" in page.text
    assert "B − A" in page.text


def test_images_are_served_whole_or_as_thumbnails(client, ui_store, ui_built):
    ref = next(
        t.final_image
        for t in ui_store.trajectories(run=ui_built[1].demo_runs["direct"])
        if t.final_image
    )
    whole = client.get(f"/images/{ref}")
    assert whole.status_code == 200 and whole.content == ui_store.image_bytes(ref)
    small = client.get(f"/images/{ref}", params={"max": 16})
    assert small.status_code == 200
    assert max(Image.open(io.BytesIO(small.content)).size) <= 16
    assert client.get("/images/" + "0" * 64).status_code == 404
    assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code == 404


@pytest.mark.parametrize(
    ("url", "status", "says"),
    [
        ("/runs/nope", 404, "no run"),
        ("/trajectories/nope", 404, "no trajectory"),
        ("/training/nope", 404, "no training run"),
        ("/nope", 404, "no page"),
        ("/compare", 400, "compare needs"),
    ],
)
def test_unknown_things_are_one_line_pages(client, url, status, says):
    page = client.get(url)
    assert page.status_code == status
    assert says in page.text
    assert "Traceback" not in page.text


@pytest.mark.parametrize(
    "params",
    [
        {"page": "0"},
        {"page": "x"},
        {"page": "٣"},
        {"per": "7"},
        {"min_score": "nan"},
        {"min_score": "abc"},
        {"correct": "maybe"},
        {"status": "sideways"},
        {"q": "x" * 1001},
    ],
)
def test_bad_query_parameters_are_400_pages(client, ui_built, params):
    page = client.get("/runs/" + ui_built[1].demo_runs["direct"], params=params)
    assert page.status_code == 400, params
    assert "Traceback" not in page.text


@pytest.mark.parametrize(
    "q",
    ['"', "*", "OR", "NEAR(", "'; drop table runs; --", "-x", "a:b", "\x00", "é"],
)
def test_search_text_with_query_syntax_is_plain_words(client, ui_built, q):
    page = client.get("/runs/" + ui_built[1].demo_runs["reflect"], params={"q": q})
    assert page.status_code == 200


def test_a_token_guards_every_page(ui_store, ui_built):
    app = create_app(ui_store, token="s3cret-token")
    with serving(app) as ui_base, httpx.Client(base_url=ui_base, timeout=30) as client:
        assert client.get("/").status_code == 401
        assert client.get("/", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert client.get("/", headers={"Authorization": "bearer s3cret-token"}).status_code == 200
        ref = "/runs/" + ui_built[1].demo_runs["direct"] + "?per=24&token=s3cret-token"
        hop = client.get(ref)
        assert hop.status_code == 303
        assert "token" not in hop.headers["location"]
        assert hop.headers["location"].endswith("per=24")
        assert "httponly" in hop.headers["set-cookie"].lower()
        assert client.get(hop.headers["location"]).status_code == 200  # cookie kept


def test_loopback_binds_refuse_other_host_names(ui_store):
    with serving(create_app(ui_store, allowed_hosts=["127.0.0.1", "localhost"])) as ui_base:
        assert httpx.get(ui_base + "/").status_code == 200
        assert httpx.get(ui_base + "/", headers={"Host": "evil.example"}).status_code == 400


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atelier.cli", "ui", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--host", "0.0.0.0"], "set --token"),
        (["--token", "short"], "at least 8"),
        (["--port", "70000"], "--port must be"),
        (["--tokenizer", "/nonexistent"], "no such folder"),
    ],
)
def test_cli_wrong_input_is_one_error_line(ui_built, args, says):
    done = _cli("--db", ui_built[0], *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error:") and says in lines[0]


def test_cli_missing_store_is_one_error_line(tmp_path):
    done = _cli("--db", str(tmp_path / "none.db"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("atelier: error: no store at")


def test_cli_serves_and_prints_its_link(ui_built):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atelier.cli",
            "ui",
            "--db",
            ui_built[0],
            "--port",
            "0",
            "--token",
            "a-long-token",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = process.stdout.readline()
        link = re.search(r"(http://\S+)", line).group(1)
        assert link.endswith("?token=a-long-token")
        with httpx.Client(timeout=30, follow_redirects=True) as client:
            page = client.get(link)
            assert page.status_code == 200 and "Runs" in page.text
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0, process.stderr.read()


def test_token_pages_show_each_tokens_text_with_the_models_tokenizer(ui_store, ui_built):
    from transformers import AutoTokenizer

    ids = ui_built[1]
    tokenizer = AutoTokenizer.from_pretrained(str(ids.tokenizer_dir), local_files_only=True)
    detail, step, generation = _first_generation_with_tokens(ui_store, [ids.model_run])
    url = f"/trajectories/{detail.id}/generations/{step.seq}/{generation.position}"
    with serving(create_app(ui_store, tokenizer=tokenizer)) as ui_base:
        page = httpx.get(ui_base + url)
    assert page.status_code == 200
    spans = re.findall(r'<span class="tok p\d+"[^>]*>(.*?)</span>', page.text, re.S)
    assert [html.unescape(s) for s in spans] == [
        tokenizer.decode([t]) for t in generation.token_ids
    ]


@pytest.mark.postgres
def test_the_app_over_postgresql(pg_server, tmp_path):
    """The same pages over a PostgreSQL store: search (its full-text indexes), groups, a
    training run."""
    url = pg_server.create_database()
    ids = build_ui_store(url, tmp_path / "versions", with_model=False)
    store = TrajectoryStore(url)
    try:
        with serving(create_app(store)) as base, httpx.Client(base_url=base, timeout=30) as client:
            found = []
            for run in ids.run_ids:
                reply = client.get(f"/runs/{run}", params={"q": ids.step_word, "per": 200})
                assert reply.status_code == 200
                found += tile_ids(reply.text)
            assert found
            group = client.get(f"/runs/{ids.trained_run}/groups/{ids.trained_group}")
            assert group.status_code == 200 and 'data-advantage="' in group.text
            assert client.get("/training").status_code == 200
            assert client.get("/versions").status_code == 200
    finally:
        store.close()
