"""Image grids: a batch of same-size images tiled into one picture, row by row.

Without a column count the shape is AUTOMATIC1111's default (`image_grid` in modules/images.py, with its
settings n_rows = -1 and grid_prevent_empty_spots off): rows = round(√n), columns = ⌈n / rows⌉, so
2 -> 1x2, 3 -> 2x2 (one empty cell), 4 -> 2x2, 6 -> 2x3, 8 -> 3x3, 9 -> 3x3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from kedavra.validation import check_int, check_optional_int


def grid_shape(count: int, columns: int | None = None) -> tuple[int, int]:
    """(rows, columns) for `count` images: `columns` wide if given, else A1111's default (module docstring)."""
    check_int("a grid's image count", count, low=1)
    if check_optional_int("columns", columns, low=1) is not None:
        columns = min(columns, count)
        return math.ceil(count / columns), columns
    rows = round(math.sqrt(count))  # A1111 image_grid; √n is never k + 0.5, so ties do not arise
    return rows, math.ceil(count / rows)


def image_grid(images: Sequence[Image.Image], columns: int | None = None, padding: int = 0,
               background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """One RGB image holding `images` (all the same size) left to right, top to bottom, `padding` pixels of
    `background` between tiles and around them; empty cells of a last, partial row stay `background`."""
    images = list(images)
    rows, columns = grid_shape(len(images), columns)
    check_int("padding", padding, low=0)
    width, height = images[0].size
    for index, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(f"grid images must share one size: image 0 is {width}x{height}, "
                             f"image {index} is {image.size[0]}x{image.size[1]}")
    grid = Image.new("RGB", (columns * width + (columns + 1) * padding, rows * height + (rows + 1) * padding),
                     background)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (padding + column * (width + padding), padding + row * (height + padding)))
    return grid
