"""A built-in test picture drawn from shapes with Pillow: a cat face in front of a sunny landscape.

Nothing is downloaded or read from disk, so the forward-process figures work offline and give the same
pixels on every machine. The picture has large flat areas (sky, grass, fur), hard edges of high contrast
(eyes, ears, a checkered strip) and fine lines (whiskers), so each level of noise is visible somewhere.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

SAMPLE_IMAGE_SIZE = 256  # default side of the picture in pixels
SUPERSAMPLE = 4  # drawn at 4× the requested side, then downsampled with Lanczos for smooth edges
CHECKER_SQUARES = 16  # squares across the checkered strip at the bottom

# Flat colours of the scene (RGB).
SKY = (86, 170, 235)
SUN = (255, 212, 40)
HILL_FAR = (70, 150, 80)
HILL_NEAR = (40, 115, 55)
FUR = (235, 140, 50)
FUR_DARK = (180, 90, 25)
EAR_INNER = (250, 170, 185)
MUZZLE = (250, 235, 215)
EYE = (120, 200, 70)
PUPIL = (20, 20, 25)
NOSE = (225, 80, 120)
INK = (40, 25, 20)
CHECK_LIGHT = (245, 245, 245)
CHECK_DARK = (200, 30, 45)


def draw_sample_image(size: int = SAMPLE_IMAGE_SIZE) -> Image.Image:
    """The built-in test picture as an RGB image of `size` × `size` pixels (deterministic)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), SKY)
    draw = ImageDraw.Draw(image)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * side, y0 * side, x1 * side, y1 * side)  # unit square -> pixels

    def points(*xy: tuple[float, float]) -> list[tuple[float, float]]:
        return [(x * side, y * side) for x, y in xy]

    _draw_landscape(draw, box)
    _draw_cat(draw, box, points, side)
    _draw_checker(draw, box)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _draw_landscape(draw: ImageDraw.ImageDraw, box) -> None:
    draw.ellipse(box(0.70, 0.05, 0.92, 0.27), fill=SUN)
    draw.ellipse(box(-0.30, 0.55, 0.60, 1.20), fill=HILL_FAR)
    draw.ellipse(box(0.35, 0.62, 1.40, 1.30), fill=HILL_NEAR)


def _draw_cat(draw: ImageDraw.ImageDraw, box, points, side: int) -> None:
    line = max(1, side // 160)
    # ears: outer triangles in fur colour, inner ones in pink
    draw.polygon(points((0.22, 0.40), (0.27, 0.12), (0.44, 0.30)), fill=FUR, outline=FUR_DARK, width=line)
    draw.polygon(points((0.78, 0.40), (0.73, 0.12), (0.56, 0.30)), fill=FUR, outline=FUR_DARK, width=line)
    draw.polygon(points((0.27, 0.36), (0.29, 0.19), (0.39, 0.30)), fill=EAR_INNER)
    draw.polygon(points((0.73, 0.36), (0.71, 0.19), (0.61, 0.30)), fill=EAR_INNER)
    # head, with three darker stripes on the forehead
    draw.ellipse(box(0.20, 0.24, 0.80, 0.80), fill=FUR, outline=FUR_DARK, width=line)
    for x in (0.45, 0.50, 0.55):
        draw.line(points((x, 0.27), (x, 0.36)), fill=FUR_DARK, width=3 * line)
    # muzzle
    draw.ellipse(box(0.34, 0.56, 0.50, 0.72), fill=MUZZLE)
    draw.ellipse(box(0.50, 0.56, 0.66, 0.72), fill=MUZZLE)
    # eyes: green irises with slit pupils and a white highlight
    for cx in (0.37, 0.63):
        draw.ellipse(box(cx - 0.075, 0.39, cx + 0.075, 0.53), fill=EYE, outline=INK, width=line)
        draw.ellipse(box(cx - 0.022, 0.40, cx + 0.022, 0.52), fill=PUPIL)
        draw.ellipse(box(cx + 0.01, 0.41, cx + 0.035, 0.435), fill=CHECK_LIGHT)
    # nose and mouth
    draw.polygon(points((0.46, 0.55), (0.54, 0.55), (0.50, 0.60)), fill=NOSE)
    draw.line(points((0.50, 0.60), (0.50, 0.64)), fill=INK, width=line)
    draw.arc(box(0.42, 0.58, 0.50, 0.67), start=0, end=160, fill=INK, width=line)
    draw.arc(box(0.50, 0.58, 0.58, 0.67), start=20, end=180, fill=INK, width=line)
    # whiskers: thin lines fanning out on both sides
    for dy in (-0.03, 0.0, 0.03):
        draw.line(points((0.36, 0.62), (0.08, 0.60 + 2 * dy)), fill=INK, width=line)
        draw.line(points((0.64, 0.62), (0.92, 0.60 + 2 * dy)), fill=INK, width=line)


def _draw_checker(draw: ImageDraw.ImageDraw, box) -> None:
    top, bottom = 0.88, 1.0
    width = 1 / CHECKER_SQUARES
    for row, (y0, y1) in enumerate(((top, (top + bottom) / 2), ((top + bottom) / 2, bottom))):
        for i in range(CHECKER_SQUARES):
            colour = CHECK_DARK if (i + row) % 2 else CHECK_LIGHT
            draw.rectangle(box(i * width, y0, (i + 1) * width, y1), fill=colour)
