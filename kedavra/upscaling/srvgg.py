"""SRVGGNetCompact: the small all-convolutional upscaler of Real-ESRGAN's anime video models (realesr-animevideov3).

Wang et al. 2021, "Real-ESRGAN" (the repository's `realesrgan/archs/srvgg_arch.py`, added with the animevideo
models): a plain VGG-style stack of 3x3 convolutions at the input resolution, each followed by a PReLU (one slope
per channel), a last convolution to out_channels·scale² channels, a pixel shuffle (channels to space) and the
nearest-neighbour upsampled input added, so the network learns only the residual over nearest upsampling.
realesr-animevideov3 has 16 body convolutions of 64 features and scale 4.

Parameter names follow that source: `body.0` the first convolution, `body.1` its PReLU, `body.{2k}` / `body.{2k+1}`
the k-th body convolution and its PReLU, `body.{2·num_conv+2}` the last convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SRVGGNetCompactConfig:
    """One SRVGGNetCompact; the defaults are realesr-animevideov3's."""

    scale: int = 4
    num_conv: int = 16
    num_features: int = 64
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        for name in ("scale", "num_conv", "num_features", "in_channels", "out_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SRVGGNetCompact {name} must be a positive integer, got {value!r}")
        if self.out_channels != self.in_channels:
            raise ValueError("SRVGGNetCompact adds the upsampled input to its output: in_channels must equal "
                             f"out_channels, got {self.in_channels} and {self.out_channels}")


class SRVGGNetCompact(nn.Module):
    """Images in [0, 1], (B, C, H, W) -> (B, C, scale·H, scale·W), any H and W."""

    def __init__(self, config: SRVGGNetCompactConfig):
        super().__init__()
        self.config = config
        f = config.num_features
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, f, 3, padding=1), nn.PReLU(f)]
        for _ in range(config.num_conv):
            layers += [nn.Conv2d(f, f, 3, padding=1), nn.PReLU(f)]
        layers.append(nn.Conv2d(f, config.out_channels * config.scale**2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def receptive_radius(self) -> int:
        """Input pixels an output pixel can see: one per 3x3 convolution, all at the input resolution."""
        return self.config.num_conv + 2

    def forward(self, x: Tensor) -> Tensor:
        out = F.pixel_shuffle(self.body(x), self.config.scale)  # (B, C·s², H, W) -> (B, C, s·H, s·W)
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")
