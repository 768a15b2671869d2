"""Screenshots of every view of ``atelier ui`` (the README shows them), taken in headless
Chromium with Playwright over the test suite's store (ShapeWorld runs and a trained GRPO run):

    .venv/bin/python tools/ui_screenshots.py docs/ui

Writes ``runs.png``, ``run.png``, ``search.png``, ``trajectory.png``, ``groups.png``,
``group.png``, ``tokens.png``, ``training.png``, ``versions.png`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the PNG files")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from atelier.ui.app import create_app
    from storage.analysis import training_series
    from storage.store import TrajectoryStore
    from tests.ui_server import serving
    from tests.ui_store import build_ui_store

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'atelier.db'}"
        ids = build_ui_store(url, Path(folder) / "versions")
        store = TrajectoryStore(url)
        series = training_series(store)
        trajectory = next(
            t.id
            for t in store.trajectories(run=ids.demo_runs["reflect"])
            if t.id != ids.xss_trajectory
        )
        sampled = store.trajectories(run=ids.model_run)[0].id
        generation = next(
            f"/trajectories/{sampled}/generations/{s.seq}/{g.position}"
            for s in store.trajectory(sampled).steps
            for g in s.generations
            if g.token_ids
        )
        views = {
            "runs": "/",
            "run": f"/runs/{ids.trained_runs[-1]}?per=24",
            "search": f"/runs/{ids.demo_runs['reflect']}?q={ids.step_word}",
            "trajectory": f"/trajectories/{trajectory}",
            "groups": f"/runs/{ids.trained_run}/groups",
            "group": f"/runs/{ids.trained_run}/groups/{ids.trained_group}",
            "tokens": generation,
            "training": f"/training/{series[0].key}",
            "versions": "/versions",
            "compare": f"/compare?a={ids.demo_runs['direct']}&b={ids.demo_runs['reflect']}",
        }
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ids.tokenizer_dir), local_files_only=True)
        app = create_app(store, tokenizer=tokenizer)
        with serving(app) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            for name, path in views.items():
                page.goto(base + path, wait_until="networkidle")
                target = args.out / f"{name}.png"
                page.screenshot(path=str(target))
                print(f"{target}  ← {path}")
            browser.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
