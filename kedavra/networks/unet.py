"""Stable Diffusion's conditional U-Net: predicts the noise in a latent x_t given t and the text.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), Sec. 3.3 and
App. E: the U-Net of Ho et al. 2020 / Dhariwal & Nichol 2021 (ResNet blocks with a timestep embedding,
skip connections from the down path to the up path), with spatial transformers at some resolutions
that cross-attend to the text context. SD 1.x and 2.x share the architecture and differ in the
attention heads, the text width and whether the transformer projections are 1x1 convs or Linear.

Walk of `UNet.forward` for the "sd15" preset on a (B, 4, 64, 64) latent:
  conv_in (B, 320, 64, 64) -> down levels at 64, 32, 16, 8 (each pushes its outputs as skips)
  -> mid (B, 1280, 8, 8) -> up levels at 8, 16, 32, 64 (each pops and concatenates skips)
  -> GroupNorm, SiLU, conv_out (B, 4, 64, 64).
Any H, W >= 1 works: each stride-2 conv gives ceil(n / 2), and each Upsample resizes to the size of the
skip it meets next, so a (B, 4, 65, 97) latent (520 x 776 pixels) walks 65x97, 33x49, 17x25, 9x13 down
and back up, as diffusers' UNet2DConditionModel does with its `upsample_size`.

`convert_unet_state_dict` maps the two checkpoint layouts in the wild ("diffusers":
UNet2DConditionModel names; "ldm": the CompVis/Stability single file, `model.diffusion_model.`
stripped) onto this module's parameter names, deriving every index from the config.
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kedavra.networks.transformer import CrossAttention, SpatialTransformer

TIME_EMBED_MULT = 4  # LDM openaimodel.py: time_embed_dim = model_channels * 4
MAX_PERIOD = 10_000  # Vaswani et al. 2017, Sec. 3.5: wavelengths up to 10000 * 2*pi
RESNET_NORM_EPS = 1e-5  # LDM normalization(): GroupNorm32 with torch's default eps


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a U-Net. The defaults are SD 1.5 (CompVis v1-inference.yaml `unet_config`).

    Attention heads: set exactly one of `num_heads` (SD 1.x: 8 heads at every width, so the head dim
    grows with the channels) or `head_dim` (SD 2.x: 64-wide heads, so C/64 heads).
    """

    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 320
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks_per_level: int = 2
    attention_per_level: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_projection: bool = False
    # SD 2.1 sets this to compute attention scores in fp32 (fp16 scores overflowed). Accepted for config
    # compatibility and otherwise unused: SDPA's fused CUDA kernels accumulate Q K^T and the softmax in
    # fp32, and bf16, the autocast dtype kedavra uses, has fp32's exponent range.
    upcast_attention: bool = False
    dropout: float = 0.0
    norm_groups: int = 32  # LDM normalization(): GroupNorm(32, C)

    def __post_init__(self):
        for name in ("channel_multipliers", "attention_per_level"):  # lists arrive from JSON; keep it hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        positive = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "base_channels": self.base_channels,
            "res_blocks_per_level": self.res_blocks_per_level,
            "context_dim": self.context_dim,
            "transformer_depth": self.transformer_depth,
            "norm_groups": self.norm_groups,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")
        if not self.channel_multipliers or any(not isinstance(m, int) or m < 1 for m in self.channel_multipliers):
            raise ValueError(
                f"UNetConfig.channel_multipliers must be a non-empty tuple of positive ints, "
                f"got {self.channel_multipliers!r}"
            )
        if not all(isinstance(a, bool) for a in self.attention_per_level):
            raise ValueError(
                f"UNetConfig.attention_per_level must hold one bool per level, got {self.attention_per_level!r}"
            )
        if len(self.attention_per_level) != len(self.channel_multipliers):
            raise ValueError(
                f"UNetConfig.attention_per_level has {len(self.attention_per_level)} entries "
                f"{self.attention_per_level!r}; it needs one per level, "
                f"{len(self.channel_multipliers)} (channel_multipliers={self.channel_multipliers!r})"
            )
        if self.base_channels % 2:
            raise ValueError(f"UNetConfig.base_channels={self.base_channels} must be even (it is the sinusoid width)")
        for channels in set(self.level_channels):
            if channels % self.norm_groups:
                raise ValueError(
                    f"UNetConfig: level width {channels} is not divisible by norm_groups={self.norm_groups}"
                )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"UNetConfig: set exactly one of num_heads (SD 1.x) or head_dim (SD 2.x), got "
                f"num_heads={self.num_heads!r}, head_dim={self.head_dim!r}"
            )
        per_head = self.num_heads if self.num_heads is not None else self.head_dim
        if not isinstance(per_head, int) or per_head < 1:
            raise ValueError(f"UNetConfig: num_heads / head_dim must be a positive int, got {per_head!r}")
        for channels in set(self.attention_channels):
            if channels % per_head:
                field = "num_heads" if self.num_heads is not None else "head_dim"
                raise ValueError(f"UNetConfig: attention width {channels} is not divisible by {field}={per_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def attention_channels(self) -> tuple[int, ...]:
        """Widths that carry a spatial transformer: the attention levels and the mid block."""
        levels = tuple(c for c, a in zip(self.level_channels, self.attention_per_level, strict=True) if a)
        return (*levels, self.level_channels[-1])

    @property
    def time_embed_dim(self) -> int:
        return TIME_EMBED_MULT * self.base_channels

    @property
    def downsample_factor(self) -> int:
        """The down path's total downsampling (one stride-2 conv per level but the last). Inputs whose H and W
        are multiples of it halve exactly at every level; others are rounded up there (see `Upsample`)."""
        return 2 ** (len(self.channel_multipliers) - 1)

    def heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of the transformer at width `channels`."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim

    @classmethod
    def from_preset(cls, name: str) -> "UNetConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name]


_SD15 = UNetConfig()
_SD21 = dataclasses.replace(  # Stability v2-inference-v.yaml unet_config
    _SD15, num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True, upcast_attention=True
)
INPAINT_IN_CHANNELS = 9  # SD inpainting: 4 noisy latent + 4 masked-image latent + 1 mask
PRESETS: dict[str, UNetConfig] = {
    "sd15": _SD15,
    "sd21": _SD21,
    "sd15-inpaint": dataclasses.replace(_SD15, in_channels=INPAINT_IN_CHANNELS),
    "sd21-inpaint": dataclasses.replace(_SD21, in_channels=INPAINT_IN_CHANNELS),
    # CPU-trainable: two levels, attention only at the lower resolution, 64-wide text context.
    # 8 groups keep several channels per group at width 32 (and let a 1x1 map normalise at all).
    "tiny": dataclasses.replace(
        _SD15,
        base_channels=32,
        channel_multipliers=(1, 2),
        res_blocks_per_level=1,
        attention_per_level=(False, True),
        num_heads=4,
        context_dim=64,
        norm_groups=8,
    ),
}


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) timesteps, possibly fractional -> (B, dim) sinusoids, cosines first (SD's flip_sin_to_cos).

    Vaswani et al. 2017, Sec. 3.5, as used for t by Ho et al. 2020: frequency k is MAX_PERIOD^(-k/half).
    """
    half = dim // 2
    # Operation order as in LDM's timestep_embedding, so fp32 rounding agrees at t ~ 1000.
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(MAX_PERIOD) * steps / half)  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoids of t through a 2-layer SiLU MLP, to TIME_EMBED_MULT x the base width."""

    def __init__(self, base_channels: int, embed_dim: int):
        super().__init__()
        self.base_channels = base_channels
        self.linear_1 = nn.Linear(base_channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: Tensor) -> Tensor:
        sinusoids = timestep_embedding(t, self.base_channels).to(self.linear_1.weight.dtype)  # (B, C)
        return self.linear_2(F.silu(self.linear_1(sinusoids)))  # (B, 4C)


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with the timestep embedding added between; residual.

    Ho et al. 2020, App. B (Wide ResNet blocks with the time embedding added per channel).
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=RESNET_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=RESNET_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # LDM openaimodel.py zero_module: the block starts as identity
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (padding 1): n -> ceil(n / 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (or resize to `size`): nearest-neighbour upsampling, then a 3x3 conv.

    `size` is that of the skip the output meets next; it is one less than double where the down path
    rounded an odd side up (diffusers' Upsample2D `output_size`, which its U-Net passes as `upsample_size`).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        height, width = x.shape[-2:]
        if size is None or tuple(size) == (2 * height, 2 * width):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, C, *size)
        return self.conv(x)


class Level(nn.Module):
    """One resolution of the down or up path: ResBlocks, a transformer after each when the level has
    attention, and an optional resampler. A container: `UNet.forward` walks it, because the skip
    connections cross levels."""

    def __init__(self, resnets: list[ResBlock], attentions: list[SpatialTransformer], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class UNet(nn.Module):
    """forward(x_t (B, C_in, H, W), t (B,) or scalar, context (B, L, D_ctx)) -> (B, C_out, H, W), any H, W >= 1."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        levels = len(config.channel_multipliers)
        n_res = config.res_blocks_per_level
        embed_dim = config.time_embed_dim

        def resnet(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, config.dropout, config.norm_groups)

        def transformer(channels: int) -> SpatialTransformer:
            num_heads, head_dim = config.heads(channels)
            return SpatialTransformer(
                channels,
                num_heads,
                head_dim,
                config.context_dim,
                config.transformer_depth,
                config.use_linear_projection,
                config.norm_groups,
            )

        self.time_embedding = TimestepEmbedding(config.base_channels, embed_dim)
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, kernel_size=3, padding=1)

        skip_channels = [config.base_channels]  # widths of the tensors the down path leaves as skips
        channels = config.base_channels
        self.down_blocks = nn.ModuleList()
        for i, (width, attend) in enumerate(zip(config.level_channels, config.attention_per_level, strict=True)):
            resnets, attentions = [], []
            for _ in range(n_res):
                resnets.append(resnet(channels, width))
                channels = width
                if attend:
                    attentions.append(transformer(width))
                skip_channels.append(width)
            downsample = Downsample(width) if i < levels - 1 else None
            if downsample is not None:
                skip_channels.append(width)
            self.down_blocks.append(Level(resnets, attentions, downsample))

        self.mid_block = Level([resnet(channels, channels), resnet(channels, channels)], [transformer(channels)], None)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            width, attend = config.level_channels[i], config.attention_per_level[i]
            resnets, attentions = [], []
            for _ in range(n_res + 1):  # one more than going down: conv_in / the downsampler also left a skip
                resnets.append(resnet(channels + skip_channels.pop(), width))
                channels = width
                if attend:
                    attentions.append(transformer(width))
            upsample = Upsample(width) if i > 0 else None
            self.up_blocks.append(Level(resnets, attentions, upsample))

        self.norm_out = nn.GroupNorm(config.norm_groups, channels, eps=RESNET_NORM_EPS)
        self.conv_out = nn.Conv2d(channels, config.out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # LDM openaimodel.py: out = zero_module(conv)
        nn.init.zeros_(self.conv_out.bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResBlock and transformer in the backward pass instead of storing activations."""
        self.gradient_checkpointing = enabled

    def set_attention_slice_size(self, slice_size: int | None) -> None:
        """Process attention queries `slice_size` tokens at a time (None: all at once) to bound memory."""
        if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
            raise ValueError(f"attention slice_size must be a positive int or None, got {slice_size!r}")
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.slice_size = slice_size

    def _run(self, block: Callable[..., Tensor], *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """Validate shapes; return t as a (B,) tensor on x's device."""
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(f"UNet input x must be (B, {config.in_channels}, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < 1:
            raise ValueError(f"UNet input H, W = {tuple(x.shape[2:])} must each be at least 1")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.context_dim:
            raise ValueError(
                f"UNet context must be (B={batch}, L, context_dim={config.context_dim}), "
                f"got shape {tuple(context.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.shape == (1,):
            return t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"UNet timesteps t must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        return t

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor) -> Tensor:
        t = self._check_inputs(x, t, context)
        emb = self.time_embedding(t)  # (B, 4C)

        h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, emb)
                if level.attentions:
                    h = self._run(level.attentions[j], h, context)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C_level, ceil(H/2), ceil(W/2))
                skips.append(h)

        mid = self.mid_block
        h = self._run(mid.resnets[0], h, emb)
        h = self._run(mid.attentions[0], h, context)
        h = self._run(mid.resnets[1], h, emb)

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                h = self._run(resnet, h, emb)
                if level.attentions:
                    h = self._run(level.attentions[j], h, context)
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[2:])  # (B, C_level, H_skip, W_skip): 2H, 2W unless rounded

        return self.conv_out(F.silu(self.norm_out(h)))
