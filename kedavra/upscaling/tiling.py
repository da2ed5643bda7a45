"""Tiled upscaling: bounded memory on large images, without seams.

The image is cut into tiles of `tile` input pixels that overlap their neighbours by `overlap` pixels; each tile
goes through the network alone, and the outputs are blended with separable weights. Along each axis a tile's
weight is 0 within `MARGIN`·overlap of an edge it shares with a neighbour (where its output saw zero padding
instead of the neighbour's pixels), then rises linearly over `RAMP`·overlap to 1; the two neighbours' ramps cross
in the middle of the overlap and sum to 1 there (MARGIN·2 + RAMP = 1). Edges on the image border get no margin:
the untiled network sees the same zero padding there.

Contract: if the network's receptive radius is at most MARGIN·overlap input pixels, every output pixel with a
non-zero weight is exactly the untiled network's value (up to float rounding), so tiled equals untiled. With a
larger receptive field (Real-ESRGAN's RRDBNet sees hundreds of pixels in theory, few in practice) the ramps hide the
small differences. The same scheme, with a hard crop instead of ramps, is Real-ESRGAN's `tile` / `tile_pad`
(realesrgan/utils.py); the ramps follow the overlap-add blending of tiled VAE decoders.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MARGIN = 3 / 8  # fraction of the overlap discarded next to a shared tile edge
RAMP = 1 / 4  # fraction of the overlap over which the weight rises from 0 to 1


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` shared pixels; the last
    tile ends at the border. Offsets are multiples of r when length, tile and overlap are."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _axis_weights(start: int, size: int, length: int, overlap: int, scale: int) -> Tensor:
    """Blend weights of one tile along one axis, at output resolution: (size·scale,)."""
    position = (torch.arange(size * scale, dtype=torch.float64) + 0.5) / scale  # output pixel centres, input units
    weight = torch.ones(size * scale, dtype=torch.float64)
    if overlap == 0:
        return weight
    margin, ramp = MARGIN * overlap, RAMP * overlap
    if start > 0:  # a neighbour before
        weight = torch.minimum(weight, ((position - margin) / ramp).clamp(0, 1))
    if start + size < length:  # a neighbour after
        weight = torch.minimum(weight, ((size - position - margin) / ramp).clamp(0, 1))
    return weight


def upscale_tiled(network: Callable[[Tensor], Tensor], image: Tensor, scale: int, tile: int | None,
                  overlap: int) -> Tensor:
    """Run `network` (B, C, H, W) -> (B, C, scale·H, scale·W) over `image` in tiles; tile=None runs it whole.

    `image` is (1, C, H, W); the result is float32 (1, C, scale·H, scale·W) whatever dtype the network computes in.
    """
    _, channels, height, width = image.shape
    if tile is None or (height <= tile and width <= tile):
        return network(image).float()
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be at least 0 and smaller than the tile size {tile}")
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = torch.zeros(1, channels, height * scale, width * scale)
    row_total = torch.zeros(height * scale, dtype=torch.float64)
    col_total = torch.zeros(width * scale, dtype=torch.float64)
    for top in rows:
        tile_h = min(tile, height)
        wy = _axis_weights(top, tile_h, height, overlap, scale)
        row_total[top * scale:(top + tile_h) * scale] += wy
        for left in cols:
            tile_w = min(tile, width)
            wx = _axis_weights(left, tile_w, width, overlap, scale)
            if top == rows[0]:
                col_total[left * scale:(left + tile_w) * scale] += wx
            piece = network(image[:, :, top:top + tile_h, left:left + tile_w]).float()  # (1, C, s·th, s·tw)
            weight = (wy[:, None] * wx[None, :]).float()  # (s·th, s·tw)
            out[:, :, top * scale:(top + tile_h) * scale, left * scale:(left + tile_w) * scale] += piece * weight
    # The tiles form a grid, so the summed weights are separable: Σ_ij wy_i(y)·wx_j(x) = (Σ_i wy_i(y))·(Σ_j wx_j(x)).
    return out / (row_total[:, None] * col_total[None, :]).float()
