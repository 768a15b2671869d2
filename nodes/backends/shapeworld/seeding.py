"""Deterministic randomness: every random choice in ShapeWorld flows from :func:`rng_for`.

A request's seed alone would make two different prompts with the same seed share their "luck";
mixing in a stable digest of the request content keeps them independent while the same request
always replays identically. ``hashlib`` rather than ``hash()``: the latter is salted per process.
"""

from __future__ import annotations

import hashlib
import random

from PIL import Image


def rng_for(seed: int | None, *parts: str | bytes) -> random.Random:
    """A ``random.Random`` determined by ``seed`` and the request ``parts``."""
    digest = hashlib.sha256(str(seed if seed is not None else 0).encode())
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        # Length-prefix each part so ("ab", "c") and ("a", "bc") differ.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return random.Random(int.from_bytes(digest.digest()[:16], "little"))


def image_digest(image: Image.Image) -> bytes:
    """A stable digest of an image's pixels (size and mode included)."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.digest()
