"""Encoding and decoding large images in overlapping tiles, so the VAE's activation memory stays bounded.

The image (or latent) is cut into tiles of `tile_size` pixels that overlap by `overlap`; each tile goes through the
network alone, and the outputs are blended with linear ramps across the overlaps, whose weights sum to one at every
pixel (as diffusers' `enable_vae_tiling` does). Inputs no larger than `threshold` on both sides are processed whole,
so their result is exact.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kedavra.validation import check_int, check_optional_int, is_int


@dataclass(frozen=True)
class Tiling:
    """Process an image (or its latent) in overlapping tiles, blended linearly where they overlap.

    All sizes are in image pixels, for encode and decode alike (a latent tile is tile_size / f).
    Tiling happens only when the image's height or width exceeds `threshold` (default: tile_size);
    threshold=0 always tiles. The defaults are those of diffusers' `enable_vae_tiling` for SD
    (512-pixel tiles, tile_overlap_factor 0.25 -> 128 pixels).
    """

    tile_size: int = 512
    overlap: int = 128
    threshold: int | None = None

    def __post_init__(self) -> None:
        check_int("Tiling.tile_size", self.tile_size, low=1)
        if not is_int(self.overlap) or not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"Tiling.overlap must be an int in [0, tile_size={self.tile_size}), got {self.overlap!r}")
        check_optional_int("Tiling.threshold", self.threshold, low=0, none_means="the tile size")

    def applies_to(self, height: int, width: int) -> bool:
        """Whether an image of this size (pixels) should be tiled."""
        limit = self.tile_size if self.threshold is None else self.threshold
        return max(height, width) > limit


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of equally spaced tiles of size `tile` covering [0, length), neighbours sharing >= overlap.

    One tile (of size `length`) when it fits. Otherwise every tile is full-sized (the last is not a
    sliver with poor GroupNorm statistics), and consecutive offsets differ by at most tile - overlap.
    """
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [k * (length - tile) // (count - 1) for k in range(count)]


def _blend_ramps(starts: list[int], size: int, scale: int) -> list[Tensor]:
    """Per tile along one axis, weights (size * scale,) rising linearly across the overlap with the
    previous tile and falling across the overlap with the next: (i + 0.5) / overlap, so two
    overlapping ramps sum to 1 at every position (a linear cross-fade, no seam)."""
    ramps = []
    position = torch.arange(size * scale, dtype=torch.float64) + 0.5
    for k, start in enumerate(starts):
        weight = torch.ones(size * scale, dtype=torch.float64)
        if k > 0:
            rise = (starts[k - 1] + size - start) * scale
            weight = torch.minimum(weight, position / rise)
        if k < len(starts) - 1:
            fall = (start + size - starts[k + 1]) * scale
            weight = torch.minimum(weight, position.flip(0) / fall)
        ramps.append(weight)
    return ramps


def run_tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, in_scale: int, out_scale: int
) -> Tensor:
    """Apply `fn` to overlapping tiles of `x` and blend the results into one output.

    Positions are counted on a grid (the latent grid, for the VAE): `x` has in_scale pixels per grid
    cell and fn's output out_scale, so fn maps an (n * in_scale)-sided tile to (n * out_scale) sides.
    `tile` and `overlap` are in grid cells. The blend weights sum to one wherever tiles overlap, and
    the output is divided by the summed weights, so a tile-independent fn gives the untiled result.
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tile_starts(grid_h, tile, overlap), tile_starts(grid_w, tile, overlap)
    tile_h, tile_w = min(tile, grid_h), min(tile, grid_w)
    row_ramps = _blend_ramps(rows, tile_h, out_scale)
    col_ramps = _blend_ramps(cols, tile_w, out_scale)
    out = total_weight = None
    for row, row_ramp in zip(rows, row_ramps, strict=True):
        for col, col_ramp in zip(cols, col_ramps, strict=True):
            piece = x[..., row * in_scale : (row + tile_h) * in_scale, col * in_scale : (col + tile_w) * in_scale]
            result = fn(piece)  # (B, C_out, tile_h * out_scale, tile_w * out_scale)
            if out is None:
                out = result.new_zeros(*result.shape[:-2], grid_h * out_scale, grid_w * out_scale)
                total_weight = result.new_zeros(grid_h * out_scale, grid_w * out_scale)
            weight = (row_ramp[:, None] * col_ramp[None, :]).to(result)  # (tile_h * out, tile_w * out)
            window = (
                ...,
                slice(row * out_scale, (row + tile_h) * out_scale),
                slice(col * out_scale, (col + tile_w) * out_scale),
            )
            out[window] += result * weight
            total_weight[window[1:]] += weight
    return out / total_weight


# ---------------------------------------------------------------------------------------------------
# The autoencoder
