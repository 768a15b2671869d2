"""The content-addressed image stores: dedup, round trip, and no path traversal."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from storage.images import (
    DirectoryImageStore,
    ImageNotFound,
    InvalidImageRef,
    MemoryImageStore,
    encode_png,
)


@pytest.fixture(params=["memory", "directory"])
def store(request, tmp_path):
    return (
        MemoryImageStore() if request.param == "memory" else DirectoryImageStore(tmp_path / "img")
    )


def test_round_trip_and_dedup(store):
    red = Image.new("RGB", (5, 4), (255, 0, 0))
    ref = store.put(red)
    assert ref == hashlib.sha256(encode_png(red)).hexdigest()
    assert store.put(red.copy()) == ref  # same pixels, same reference
    assert store.get(ref).tobytes() == red.tobytes() and store.get(ref).size == (5, 4)
    blue_ref = store.put(Image.new("RGB", (5, 4), (0, 0, 255)))
    assert blue_ref != ref and ref in store and blue_ref in store


def test_directory_store_keeps_one_file_per_image(tmp_path):
    store = DirectoryImageStore(tmp_path)
    for _ in range(3):
        store.put(Image.new("RGB", (3, 3), (1, 2, 3)))
    assert len(list(tmp_path.rglob("*.png"))) == 1
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "a" * 63,
        "A" * 64,
        "/" + "a" * 63,
        "a" * 62 + "/.",
        "",
        "..",
        "a" * 64 + "\x00",
    ],
)
def test_references_that_are_not_hashes_are_refused(store, bad):
    with pytest.raises(InvalidImageRef):
        store.get(bad)
    assert bad not in store


def test_missing_image(store):
    with pytest.raises(ImageNotFound):
        store.get("0" * 64)
