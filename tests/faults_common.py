"""What the fault tests share: a backends config pointing every role at one URL, and the check
that a recorded run lost and duplicated nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any


def write_backends_config(
    path: Path,
    url: str,
    *,
    timeout_s: float = 4.0,
    retries: int = 4,
    backoff_s: float = 0.01,
    max_in_flight: int | None = None,
) -> Path:
    """A TOML config: a chat backend and an image backend, both at ``url`` (a proxy or a fake
    server), with test-sized backoff. The timeouts are long enough that a busy test machine
    never times out a real answer, which would break the tests' exact accounting of failures:
    with two CPU hogs beside the suite, 3 of 787 answers took over 0.4 s, and the old 1.5 s
    bound failed a fault test once in three loaded runs. Each injected timeout costs 4 s."""
    pool = (
        f'urls = ["{url}"]\nmodel = "m"\ntimeout_s = {timeout_s}\nconnect_timeout_s = 4.0\n'
        f"retries = {retries}\nbackoff_s = {backoff_s}\ncooldown_s = 0.05\n"
    )
    if max_in_flight is not None:
        pool += f"max_in_flight = {max_in_flight}\n"
    path.write_text(
        f'[backends.vlm]\nkind = "openai"\n{pool}\n'
        f'[backends.painter]\nkind = "omni"\n{pool}\n'
        "[roles]\n"
        'planner = "vlm"\nreflector = "vlm"\ndecomposer = "vlm"\n'
        'generator = "painter"\neditor = "painter"\n'
    )
    return path


def check_recorded_run(store: Any, run_id: str, trajectories: int) -> Counter[str]:
    """Assert every trajectory of the run ended (succeeded, or failed with its error), its
    steps are numbered 0..n-1 with none missing or repeated, its final state counted exactly
    those steps, and every image a step or the trajectory references is stored. Returns the
    count per status."""
    summaries = store.trajectories(run=run_id, limit=None)
    assert len(summaries) == trajectories
    statuses: Counter[str] = Counter()
    for summary in summaries:
        statuses[summary.status] += 1
        assert summary.status in ("succeeded", "failed"), summary
        detail = store.trajectory(summary.id)
        steps = store.steps(summary.id)
        assert [s.seq for s in steps] == list(range(len(steps))), summary.id
        assert detail.final_state is not None
        assert detail.final_state["step_count"] == len(steps)
        assert steps[-1].node == "stop"
        assert sum(s.node == "stop" for s in steps) == 1
        if summary.status == "failed":
            assert summary.error, summary
            assert sum(s.error is not None for s in steps) == 1  # the node that met the fault
        else:
            assert summary.error is None and all(s.error is None for s in steps)
            assert summary.final_image is not None
            assert store.get(summary.final_image).size == (8, 8)
        for step in steps:
            for image in (*step.images_in, *step.images_out):
                assert image.load().size == (image.width, image.height)
    return statuses
