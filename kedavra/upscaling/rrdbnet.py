"""RRDBNet: the generator of ESRGAN and Real-ESRGAN (x4plus, x4plus anime 6B, x2plus).

Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks", Sec. 3.1 and Fig. 4: the
network is a stack of Residual-in-Residual Dense Blocks (RRDB) at the low resolution, a long skip connection around
the stack, then two nearest-neighbour x2 upsamplings each followed by a 3x3 convolution. A dense block (RDB) has
five 3x3 convolutions, each seeing the concatenation of the block input and every earlier output (growth channels
each); its output is scaled by the residual scale β = 0.2 and added to its input, and an RRDB chains three RDBs with
the same scaled residual around them.

Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", Sec. 3.3: the
same generator serves x2 and x1 by pixel-unshuffling the input first (space to channels: x2 gives 12 input
channels, x1 gives 48), so the trunk always runs at a quarter of the output size and the tail always upsamples x4.

The parameter names follow BasicSR's `basicsr/archs/rrdbnet_arch.py` (conv_first, body.N.rdbK.convJ, conv_body,
conv_up1, conv_up2, conv_hr, conv_last), so Real-ESRGAN's released state dicts load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESIDUAL_SCALE = 0.2  # β in ESRGAN Sec. 3.1 ("residual scaling"), used in every RDB and RRDB
LEAKY_SLOPE = 0.2  # LeakyReLU negative slope in ESRGAN / BasicSR's RRDBNet
UNSHUFFLE_FACTOR = {4: 1, 2: 2, 1: 4}  # output scale -> pixel-unshuffle factor (Real-ESRGAN Sec. 3.3)


@dataclass(frozen=True)
class RRDBNetConfig:
    """One RRDBNet. x4plus: 23 blocks; x4plus anime 6B: 6 blocks; both 64 features, 32 growth channels."""

    scale: int = 4  # 4, 2 or 1: the output is `scale` times the input
    num_blocks: int = 23
    num_features: int = 64
    num_growth: int = 32
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        if self.scale not in UNSHUFFLE_FACTOR:
            raise ValueError(f"RRDBNet scale {self.scale!r} is not one of {sorted(UNSHUFFLE_FACTOR)}")
        for name in ("num_blocks", "num_features", "num_growth", "in_channels", "out_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RRDBNet {name} must be a positive integer, got {value!r}")

    @property
    def unshuffle_factor(self) -> int:
        """The factor the input is pixel-unshuffled by; its height and width must be multiples of it."""
        return UNSHUFFLE_FACTOR[self.scale]


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    """ESRGAN Fig. 4 (RDB): five densely connected 3x3 convolutions; out = x + β·conv5([x, x1, x2, x3, x4])."""

    def __init__(self, num_features: int, num_growth: int):
        super().__init__()
        self.conv1 = _conv(num_features, num_growth)
        self.conv2 = _conv(num_features + num_growth, num_growth)
        self.conv3 = _conv(num_features + 2 * num_growth, num_growth)
        self.conv4 = _conv(num_features + 3 * num_growth, num_growth)
        self.conv5 = _conv(num_features + 4 * num_growth, num_features)

    def forward(self, x: Tensor) -> Tensor:
        x1 = F.leaky_relu(self.conv1(x), LEAKY_SLOPE)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), LEAKY_SLOPE)  # (B, F + G, H, W) in
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), LEAKY_SLOPE)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), LEAKY_SLOPE)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # (B, F + 4G, H, W) -> (B, F, H, W)
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """ESRGAN Fig. 4 (RRDB): three dense blocks in a chain, with a scaled residual around the chain."""

    def __init__(self, num_features: int, num_growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_features, num_growth)
        self.rdb2 = ResidualDenseBlock(num_features, num_growth)
        self.rdb3 = ResidualDenseBlock(num_features, num_growth)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """Images in [0, 1], (B, C, H, W) -> (B, C, scale·H, scale·W); H and W multiples of `config.unshuffle_factor`."""

    def __init__(self, config: RRDBNetConfig):
        super().__init__()
        self.config = config
        f, g = config.num_features, config.num_growth
        self.conv_first = _conv(config.in_channels * config.unshuffle_factor**2, f)
        self.body = nn.Sequential(*(RRDB(f, g) for _ in range(config.num_blocks)))
        self.conv_body = _conv(f, f)
        self.conv_up1 = _conv(f, f)
        self.conv_up2 = _conv(f, f)
        self.conv_hr = _conv(f, f)
        self.conv_last = _conv(f, config.out_channels)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def receptive_radius(self) -> int:
        """How many input pixels away an output pixel can see (each 3x3 convolution adds one pixel at its
        resolution): conv_first, 15 per RRDB and conv_body at a quarter of the output size, then one at half and
        three at full output size, in input pixels rounded up."""
        trunk = 1 + 15 * self.config.num_blocks + 1  # at the unshuffled resolution: factor input pixels each
        tail = 1 / 2 + 3 / 4  # conv_up1 at x2, conv_up2 / conv_hr / conv_last at x4, in unshuffled pixels
        return math.ceil((trunk + tail + 1) * self.config.unshuffle_factor)  # + 1: the unshuffle's own reach

    def forward(self, x: Tensor) -> Tensor:
        if self.config.unshuffle_factor > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle_factor)  # (B, C, H, W) -> (B, C·r², H/r, W/r)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))  # ESRGAN's long skip around the RRDB trunk
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))
