"""ShapeWorld's pixel detector: exact on clean renders, robust to resizing and JPEG."""

from __future__ import annotations

import io
import random
from collections import Counter

from PIL import Image

from nodes.backends.shapeworld.detect import detect
from nodes.backends.shapeworld.geometry import boxes_overlap
from nodes.backends.shapeworld.render import PlacedObject, Scene, render
from nodes.backends.shapeworld.vocab import COLOURS, SHAPES


def random_scene(rng: random.Random, size: int = 256, max_objects: int = 8) -> Scene:
    """Up to ``max_objects`` non-overlapping objects (sides 18-48 px, 3 px apart), placed by
    rejection sampling independently of ShapeWorld's own layout code."""
    objects: list[PlacedObject] = []
    target = rng.randint(1, max_objects)
    for _ in range(500):
        if len(objects) == target:
            break
        side = rng.randint(18, 48)
        cx = rng.randint(side // 2, size - side + side // 2)
        cy = rng.randint(side // 2, size - side + side // 2)
        obj = PlacedObject(rng.choice(SHAPES), rng.choice(COLOURS), cx, cy, side)
        if all(not boxes_overlap(obj.box, o.box, gap=3) for o in objects):
            objects.append(obj)
    return Scene(size, size, tuple(objects))


def counts(items: object) -> Counter[tuple[str, str]]:
    return Counter((o.colour, o.shape) for o in items)  # type: ignore[attr-defined]


def test_exact_counts_on_at_least_99_percent_of_clean_scenes() -> None:
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(400)]
    exact = sum(counts(detect(render(s))) == counts(s.objects) for s in scenes)
    assert exact / len(scenes) >= 0.99


def test_detected_boxes_match_the_drawn_boxes() -> None:
    rng = random.Random(1)
    for _ in range(50):
        scene = random_scene(rng, max_objects=4)
        found = sorted((o.bbox[0], o.bbox[1]) for o in detect(render(scene)))
        drawn = sorted(o.box for o in scene.objects)
        # Stars are drawn a little less tall than their box; the top-left corner still matches
        # to within a pixel (a star's top edge sits lower, hence the y tolerance).
        for (fx, fy), box in zip(found, drawn, strict=True):
            assert abs(fx - box[0]) <= 1 and 0 <= fy - box[1] <= 4


def test_mostly_works_after_jpeg_and_resizing() -> None:
    # About 97% and 99% here; small stars lose their points to JPEG's colour subsampling.
    rng = random.Random(2)
    scenes = [random_scene(rng, max_objects=6) for _ in range(100)]
    exact_jpeg = exact_resized = 0
    for scene in scenes:
        image = render(scene)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        exact_jpeg += counts(detect(Image.open(io.BytesIO(buffer.getvalue())))) == counts(
            scene.objects
        )
        resized = image.resize((384, 384), Image.Resampling.BILINEAR)
        exact_resized += counts(detect(resized)) == counts(scene.objects)
    assert exact_jpeg >= 93
    assert exact_resized >= 95


def test_non_palette_pixels_are_ignored() -> None:
    scene = Scene(256, 256, (PlacedObject("circle", "red", 60, 60, 40),))
    image = render(scene)
    image.paste((128, 128, 128), (150, 150, 220, 220))  # a grey block
    image.paste((0, 0, 0), (10, 200, 60, 210))  # a black bar
    assert counts(detect(image)) == Counter({("red", "circle"): 1})
    assert detect(Image.new("RGB", (64, 64), "white")) == []
