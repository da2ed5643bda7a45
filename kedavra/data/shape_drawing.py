"""How the shapes data set draws a shape: each outline in its unit box, filled into a pixel box with Pillow, and
the exact pixel coverage of a shape (supersampled, box-filtered), which the evaluator's templates reuse so that
they match the data set's drawing bit for bit."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # draw at 4x and box-filter down: 16 coverage levels on every edge
STAR_INNER_RATIO = 0.45  # inner / outer radius of the star (a regular pentagram's 0.382 vanishes at 9 px)
CROSS_HALF_WIDTH = 1 / 3  # half the arm width of the plus, in its unit box [-1, 1]: arms a third of the box


def _normalise(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Stretch a polygon to fill the unit box [-1, 1]^2 exactly, so a bounding box is all a template needs."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx, sy = 2 / (max(xs) - min(xs)), 2 / (max(ys) - min(ys))
    return tuple(((x - min(xs)) * sx - 1, (y - min(ys)) * sy - 1) for x, y in points)


def _star() -> tuple[tuple[float, float], ...]:
    points = []
    for k in range(10):  # outer and inner vertices alternate, the first outer one pointing up
        angle = -math.pi / 2 + k * math.pi / 5
        radius = 1.0 if k % 2 == 0 else STAR_INNER_RATIO
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return _normalise(points)


def _cross() -> tuple[tuple[float, float], ...]:
    w = CROSS_HALF_WIDTH
    return ((-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
            (-w, -w))


# Each shape's outline in its unit box [-1, 1]^2 (y down); the circle is the ellipse inscribed in the box. More
# outlines than the shapes data set's SHAPES: "hexagon" is drawn (and can be a template of the evaluator) but is no
# part of the data set's grammar, so that a model trained on it has never seen one (docs/adapters.md).
OUTLINES: dict[str, tuple[tuple[float, float], ...] | None] = {
    "circle": None,
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "star": _star(),
    "cross": _cross(),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
    # a regular hexagon with a flat top and bottom (vertices at 0, 60, ..., 300 degrees), normalised: in a square box
    # its height is stretched from √3/2 of its width to all of it, as the triangle's is
    "hexagon": ((-0.5, -1), (0.5, -1), (1, 0), (0.5, 1), (-0.5, 1), (-1, 0)),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Fill `shape` stretched to the box (x0, y0, x1, y1) (pixel edges of the canvas `draw` paints on)."""
    x0, y0, x1, y1 = box
    outline = OUTLINES[shape]
    if outline is None:
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)  # Pillow's ellipse box is inclusive of its last pixel
        return
    half_w, half_h, cx, cy = (x1 - x0) / 2, (y1 - y0) / 2, (x0 + x1) / 2, (y0 + y1) / 2
    draw.polygon([(cx + u * half_w, cy + v * half_h) for u, v in outline], fill=fill)


def shape_coverage(shape: str, box: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """Float array (height, width) in [0, 1]: the fraction of each pixel `shape` covers when stretched to `box`
    (pixel coordinates), drawn exactly as the data set draws it. The evaluator's templates."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, tuple(c * SUPERSAMPLE for c in box), 255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255
