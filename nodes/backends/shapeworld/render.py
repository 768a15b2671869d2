"""Drawing placed objects with PIL.

No anti-aliasing (PIL's ``ImageDraw`` on an RGB image draws hard edges), so every object pixel is
exactly its palette colour and a clean render can be read back exactly by the detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from nodes.backends.shapeworld.vocab import BACKGROUND, PALETTE

STAR_INNER_RATIO = 0.38
"""Inner/outer radius of the five-pointed star: thin enough that its fill ratio (~0.33) stays
well apart from the triangle's (~0.5)."""

Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1), x1 and y1 exclusive."""


@dataclass(frozen=True)
class PlacedObject:
    shape: str
    colour: str
    cx: int
    cy: int
    size: int
    """Side of the square the shape is drawn in (a star is as wide as this, a bit less tall)."""

    @property
    def box(self) -> Box:
        x0, y0 = self.cx - self.size // 2, self.cy - self.size // 2
        return x0, y0, x0 + self.size, y0 + self.size


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[PlacedObject, ...] = ()


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj)
    return image


def draw_object(draw: ImageDraw.ImageDraw, obj: PlacedObject) -> None:
    x0, y0, x1, y1 = obj.box
    right, bottom = x1 - 1, y1 - 1
    mid_x, mid_y = (x0 + right) / 2, (y0 + bottom) / 2
    fill = PALETTE[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, right, bottom), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(mid_x, y0), (right, bottom), (x0, bottom)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(mid_x, y0), (right, mid_y), (mid_x, bottom), (x0, mid_y)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star_points(x0, y0, obj.size), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _star_points(x0: int, y0: int, size: int) -> list[tuple[float, float]]:
    # The width (2 R sin 72°) fills the box; the height, R (1 + cos 36°), is centred in it.
    outer = (size - 1) / (2 * math.sin(math.radians(72)))
    inner = outer * STAR_INNER_RATIO
    height = outer * (1 + math.cos(math.radians(36)))
    cx = x0 + (size - 1) / 2
    cy = y0 + (size - 1 - height) / 2 + outer
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = math.radians(-90 + 36 * k)
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points
