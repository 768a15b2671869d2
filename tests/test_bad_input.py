"""Bad input gives a clear error or a recorded failure — never a crash — and the state model
survives any value it accepts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent_graph.presets import shapeworld_context
from agent_graph.runner import Runner
from nodes.state import (
    MAX_PROMPT_CHARS,
    Budget,
    Decision,
    ImageRecord,
    Mode,
    ReasonerState,
    Reflection,
    Task,
)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt is empty"),
        ("  \n\t ", "prompt is empty"),
        ("x" * (1 << 20), "the limit is"),
        ("a red\x00 circle", "control character"),
        ("a red circle\x1b[31m", "control character"),
    ],
)
def test_unusable_prompts_are_refused_with_a_reason(prompt, message):
    with pytest.raises(ValidationError, match=message):
        Task(prompt=prompt)


@pytest.mark.parametrize(
    "prompt",
    [
        "一个红色的圆",
        "красный круг",
        "🔴🔵",
        "a red circle\twith tabs\nand lines",
        "x" * MAX_PROMPT_CHARS,
    ],
)
async def test_prompts_outside_the_world_end_as_recorded_failures(prompt):
    result = await Runner(shapeworld_context("auto")).run_one(Task(prompt=prompt))
    assert result.status == "failed"
    assert "draw" in result.error and result.steps[-1].node == "stop"
    assert any(step.error for step in result.steps)


@pytest.mark.parametrize(
    "bad", [{"max_rounds": -1}, {"max_images": 0}, {"max_rounds": "four"}, {"max_rounds": 10**6}]
)
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValidationError):
        Budget(**bad)


texts = st.text(max_size=40)
images = st.builds(
    ImageRecord,
    ref=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    node=texts,
    instruction=texts,
    score=st.none() | st.floats(0, 1),
)
reflections = st.builds(
    Reflection,
    image_index=st.integers(0, 20),
    image_ref=texts,
    target=texts,
    text=texts,
    thought=texts,
    instruction=texts,
    stop_phrase=st.booleans(),
    well_formed=st.booleans(),
    accept=st.booleans(),
)
decisions = st.builds(
    Decision,
    kind=st.sampled_from(["mode", "stop"]),
    action=texts,
    log_prob=st.floats(-50, 0),
    policy=texts,
    version=texts,
    step=st.integers(0, 100),
)


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(min_size=1, max_size=200).filter(lambda p: p.strip()),
    seed=st.integers(-(2**63), 2**63 - 1),
    mode=st.none() | st.sampled_from(list(Mode)),
    images=st.lists(images, max_size=4),
    reflections=st.lists(reflections, max_size=4),
    decisions=st.lists(decisions, max_size=4),
)
def test_state_round_trips_through_json(prompt, seed, mode, images, reflections, decisions):
    try:
        task = Task(prompt=prompt, seed=seed)
    except ValidationError:
        return  # control characters: refused, as tested above
    state = ReasonerState(
        task=task, mode=mode, images=images, reflections=reflections, decisions=decisions
    )
    again = ReasonerState.model_validate_json(state.model_dump_json())
    assert again == state
    assert ReasonerState.model_validate(state.model_dump(mode="json")) == state


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` but holds a few bytes of pixel data: what a
    hostile or broken server sends to make a decoder allocate gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_a_30000_by_30000_header_is_refused_before_any_pixel_is_decoded():
    import resource

    from nodes.backends.wire import ImageDecodeError, decode_b64_image, decode_image

    hostile = _png_claiming(30000, 30000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageDecodeError, match=r"900000000 pixels.*decompression.bomb"):
        decode_image(hostile)
    import base64

    with pytest.raises(ImageDecodeError, match="decompression-bomb guard"):
        decode_b64_image("data:image/png;base64," + base64.b64encode(hostile).decode())
    # Nothing near the 2.7 GB those pixels would take was allocated.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_broken_image_bytes_in_the_store_give_a_clear_error(tmp_path):
    from PIL import Image

    from storage.store import TrajectoryStore

    store = TrajectoryStore(f"sqlite:///{tmp_path}/bad.db")
    hostile = store.put_bytes(_png_claiming(30000, 30000))
    with pytest.raises(Image.DecompressionBombError, match="decompression bomb"):
        store.get(hostile)
    truncated = store.put_bytes(_png_claiming(8, 8)[:30])
    with pytest.raises(OSError):
        store.get(truncated)
    store.close()
