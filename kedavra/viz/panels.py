"""Drawing pieces the generation figures share: labelled sheets of tiles, colour maps, overlays, GIFs, outputs.

A sheet is a grid of equal tiles with a title above, a label on the left of each row and a few lines of text
under each tile; `SheetLayout.tile_box` says where each tile lies, so a test can crop one and check it. Tiles
smaller than DISPLAY_MIN_SIDE (a 32-pixel model's images) are enlarged by a whole factor with nearest
neighbour, so each pixel of the model's output stays one visible square of one colour.
Colour maps come from matplotlib's registry (a table lookup, no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from kedavra.validation import check_int, is_int
from kedavra.viz.forward import _font, tensor_to_pixels

DEFAULT_ROWS = 4  # steps a sheet shows when none are chosen: spread over the run, first and last included
DISPLAY_MIN_SIDE = 128  # pixels: smaller tiles are enlarged by the least whole factor that reaches this
HEAT_COLOURMAP = "inferno"  # perceptually uniform, black = 0 (matplotlib's default sequential family)
SIGNED_COLOURMAP = "RdBu_r"  # diverging: blue negative, white 0, red positive
OVERLAY_OPACITY = 0.65  # weight of the heat map over the image where the map is at its maximum
GIF_FRAME_MS = 350  # display time of one GIF frame in milliseconds
GIF_LAST_FRAME_MS = 1500  # the last frame (the result) stays longer before the loop starts again

TITLE_LINE = 17  # pixels per title line
LINE = 15  # pixels per label line
ROW_LABEL_WIDTH = 120  # left column with the row labels
MIN_COLUMN_WIDTH = 96  # a column is at least this wide so its labels fit under small tiles
GAP = 6  # space between tiles and around the sheet
FONT_SIZE = 12
TITLE_FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


# ---------------------------------------------------------------- pixels
def display_scale(side: int) -> int:
    """The whole enlargement factor that brings a tile of `side` pixels to at least DISPLAY_MIN_SIDE."""
    return max(1, math.ceil(DISPLAY_MIN_SIDE / side))


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    """`image` made `scale` times larger with nearest neighbour (each pixel becomes a scale × scale square)."""
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def to_image(x: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] -> an RGB image (clamped, rounded to 8 bits)."""
    return Image.fromarray(tensor_to_pixels(x.detach().float().cpu()))


def colour_map(values: torch.Tensor | np.ndarray, low: float, high: float, name: str = HEAT_COLOURMAP) -> np.ndarray:
    """Values (H, W) -> uint8 RGB (H, W, 3) through matplotlib's colour map `name`, low..high spanning it."""
    import matplotlib

    values = np.asarray(values, dtype=np.float64)
    span = high - low if high > low else 1.0
    rgba = matplotlib.colormaps[name]((values - low) / span, bytes=True)  # (H, W, 4), clipped to the map's ends
    return np.ascontiguousarray(rgba[..., :3])


def heat_image(values: torch.Tensor | np.ndarray, high: float | None = None) -> Image.Image:
    """A non-negative map (H, W) as a heat image, 0 black and `high` (default: the map's maximum) brightest."""
    values = np.asarray(values, dtype=np.float64)
    return Image.fromarray(colour_map(values, 0.0, float(values.max()) if high is None else high))


def overlay(image: Image.Image, values: torch.Tensor | np.ndarray) -> Image.Image:
    """A heat map of `values` (the image's H × W) laid over `image`, stretched from the map's minimum
    (transparent, the image shows) to its maximum (the brightest colour at OVERLAY_OPACITY)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    relative = (values - low) / (high - low) if high > low else np.zeros_like(values)  # (H, W) in [0, 1]
    weight = OVERLAY_OPACITY * relative[..., None]  # (H, W, 1)
    heat = colour_map(relative, 0.0, 1.0).astype(np.float64)
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.round((1 - weight) * base + weight * heat).astype(np.uint8))


# ---------------------------------------------------------------- sheets
@dataclass(frozen=True)
class SheetLayout:
    """Where each tile of a sheet lies, in pixels."""

    rows: int
    cols: int
    tile_width: int
    tile_height: int
    title_lines: int
    label_lines: int
    min_width: int = 0  # the title's width: the sheet is at least this wide

    @property
    def column(self) -> int:
        return max(self.tile_width, MIN_COLUMN_WIDTH)

    @property
    def header(self) -> int:
        return GAP + self.title_lines * TITLE_LINE + GAP

    @property
    def row_height(self) -> int:
        return self.tile_height + self.label_lines * LINE + GAP

    @property
    def width(self) -> int:
        return max(ROW_LABEL_WIDTH + GAP + self.cols * (self.column + GAP), self.min_width)

    @property
    def height(self) -> int:
        return self.header + self.rows * self.row_height

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile (row, col), right/bottom exclusive as in PIL's crop."""
        left = ROW_LABEL_WIDTH + GAP + col * (self.column + GAP) + (self.column - self.tile_width) // 2
        top = self.header + row * self.row_height
        return left, top, left + self.tile_width, top + self.tile_height


def draw_sheet(
    tiles: Sequence[Sequence[Image.Image | None]],
    title: Sequence[str],
    row_labels: Sequence[Sequence[str]],
    tile_labels: Sequence[Sequence[Sequence[str]]],
) -> tuple[Image.Image, SheetLayout]:
    """A white sheet with tiles[r][c] (all one size; None leaves a blank) in a grid, `title` lines on top,
    row_labels[r] (lines) on the left of row r, and tile_labels[r][c] (lines) under tile (r, c)."""
    first = next((tile for row in tiles for tile in row if tile is not None), None)
    if first is None:
        raise ValueError("a sheet needs at least one tile")
    label_lines = max((len(lines) for row in tile_labels for lines in row), default=0)
    title_width = max((_font(TITLE_FONT_SIZE, bold=True).getlength(line) for line in title), default=0)
    layout = SheetLayout(len(tiles), max(len(row) for row in tiles), first.width, first.height, len(title),
                         label_lines, math.ceil(title_width) + 2 * GAP)
    sheet = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title):
        font = _font(TITLE_FONT_SIZE, bold=i == 0)
        draw.text((GAP, GAP + i * TITLE_LINE), line, font=font, fill=TEXT)
    for r, row in enumerate(tiles):
        top = layout.header + r * layout.row_height
        for i, line in enumerate(row_labels[r]):
            draw.text((GAP, top + i * LINE), line, font=_font(FONT_SIZE, bold=i == 0), fill=TEXT)
        for c, tile in enumerate(row):
            left, tile_top, right, bottom = layout.tile_box(r, c)
            if tile is not None:
                if tile.size != first.size:
                    raise ValueError(f"sheet tiles must share one size: {tile.size} differs from {first.size}")
                sheet.paste(tile.convert("RGB"), (left, tile_top))
            for i, line in enumerate(tile_labels[r][c] if c < len(tile_labels[r]) else ()):
                draw.text(((left + right) // 2, bottom + 1 + i * LINE), line, font=_font(FONT_SIZE), fill=TEXT,
                          anchor="ma")
    return sheet, layout


def spread_indices(count: int, shown: int) -> list[int]:
    """`shown` indices spread evenly over range(count), always the first and the last (all when count <= shown)."""
    check_int("the number of steps to show", shown, 1)
    if count <= shown:
        return list(range(count))
    if shown == 1:
        return [count - 1]
    return sorted({round(k * (count - 1) / (shown - 1)) for k in range(shown)})


def check_step_indices(indices: Sequence[int], count: int) -> list[int]:
    """Step indices (0-based) as a sorted list without repeats; ValueError unless each lies in [0, count-1]."""
    chosen = list(indices)
    if not chosen:
        raise ValueError(f"give at least one step to show, from 0 to {count - 1}")
    for index in chosen:
        if not is_int(index) or not 0 <= index < count:
            raise ValueError(f"step index {index!r} is not a step of this run; allowed: integers 0 to {count - 1}")
    return sorted(set(chosen))


# ---------------------------------------------------------------- files
def check_png_path(path: str | Path) -> Path:
    """An output path ending in .png whose folder exists, or ValueError naming it."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {str(path)!r} must be a .png file")
    if not path.parent.is_dir():
        raise ValueError(f"output folder {str(path.parent)!r} does not exist (for {str(path)!r})")
    return path


def save_gif(frames: Sequence[Image.Image], path: str | Path) -> Path:
    """An animated GIF that loops, GIF_FRAME_MS per frame and GIF_LAST_FRAME_MS on the last one."""
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    durations = [GIF_FRAME_MS] * (len(frames) - 1) + [GIF_LAST_FRAME_MS]
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)
    return path
