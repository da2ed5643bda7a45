"""The KL autoencoder of latent diffusion: images <-> latents 8x smaller per side.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), Sec. 3.1:
an encoder E maps an image x (B, 3, H, W) in [-1, 1] to a diagonal Gaussian posterior over latents
z (B, 4, H/f, W/f), a decoder D maps z back to pixels, and a small KL penalty towards N(0, I) keeps
the latent space tame (the "KL-reg." autoencoder). Stable Diffusion 1.x and 2.x share one: f = 8.

Layer order, as in the CompVis `ldm/modules/diffusionmodules/model.py` Encoder/Decoder and diffusers'
`AutoencoderKL`:
  encoder: conv_in -> per level [ResBlock x num_res_blocks, stride-2 conv except at the last level]
           -> mid [ResBlock, single-head self-attention, ResBlock] -> GroupNorm, SiLU, conv_out (2 * z)
  quant_conv (1x1) -> posterior N(mean, exp(logvar)) -> sample or mode -> post_quant_conv (1x1)
  decoder: conv_in -> mid -> per level, deepest first [ResBlock x (num_res_blocks + 1),
           nearest-neighbour x2 + conv except at the last level] -> GroupNorm, SiLU, conv_out

The diffusion model sees latents multiplied by `scaling_factor` (unit variance for the U-Net);
`encode_to_latents` applies it and `decode_latents` removes it. Large images can be encoded and
decoded in overlapping tiles (see `Tiling`) to bound memory.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.networks.attention import multi_head_attention
from kedavra.networks.vae_tiling import Tiling, run_tiled
from kedavra.validation import check_choice, check_int, is_int

# LDM paper Sec. 4.3.2 and App. D.1: 1 / (std of the first training batch's latents), the SD 1.x/2.x
# VAE's `scale_factor: 0.18215` in the CompVis v1-inference.yaml / v2-inference.yaml configs.
SD_LATENT_SCALE = 0.18215
VAE_NORM_EPS = 1e-6  # ldm/modules/diffusionmodules/model.py Normalize(): GroupNorm(32, eps=1e-6)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # ldm/modules/distributions/distributions.py: logvar clamp
# F.pad order (left, right, top, bottom): ldm Downsample pads right and bottom only, then a 3x3
# stride-2 conv without padding, so an H x W map becomes ⌊H/2⌋ x ⌊W/2⌋.
DOWNSAMPLE_PADDING = (0, 1, 0, 1)


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the KL autoencoder. Level i has base_channels * channel_multipliers[i] channels."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = VAE_NORM_EPS
    scaling_factor: float = SD_LATENT_SCALE

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels", "base_channels", "num_res_blocks"):
            check_int(f"VAEConfig.{name}", getattr(self, name), low=1)
        if (
            not isinstance(self.channel_multipliers, tuple)
            or not self.channel_multipliers
            or not all(is_int(m) and m >= 1 for m in self.channel_multipliers)
        ):
            raise ValueError(
                "VAEConfig.channel_multipliers must be a non-empty tuple of positive ints, "
                f"got {self.channel_multipliers!r}"
            )
        check_int("VAEConfig.norm_groups", self.norm_groups, low=1)
        bad = [c for c in self.block_channels if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"VAEConfig.norm_groups={self.norm_groups} must divide every level's channel count "
                f"{self.block_channels}; {bad} are not divisible"
            )
        if not (isinstance(self.norm_eps, float) and 0.0 < self.norm_eps < 1.0):
            raise ValueError(f"VAEConfig.norm_eps must be a float in (0, 1), got {self.norm_eps!r}")
        if not (isinstance(self.scaling_factor, float) and math.isfinite(self.scaling_factor)):
            raise ValueError(f"VAEConfig.scaling_factor must be a finite float, got {self.scaling_factor!r}")
        if self.scaling_factor <= 0.0:
            raise ValueError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor!r}")

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        """The config a diffusers `vae/config.json` (AutoencoderKL) describes; absent keys take AutoencoderKL's
        defaults. What this autoencoder cannot run (another block type or activation, a latent shift or per-channel
        latent statistics as SD3 / Flux VAEs have, no quant convs, no mid-block attention) is refused by name."""
        if not isinstance(config, dict):
            raise ValueError(f"a VAE config must be a JSON object, got {type(config).__name__}")
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"vae _class_name {name!r} is not supported; allowed: AutoencoderKL (SD's KL-f8 kind)")
        required = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
        for key, allowed in required.items():
            if config.get(key, allowed) != allowed:
                raise ValueError(f"vae {key}={config[key]!r} is not supported; allowed: {allowed!r}")
        levels = list(config.get("block_out_channels", [64]))
        if not levels or not all(is_int(c) and c >= 1 for c in levels):
            raise ValueError(f"vae block_out_channels must be a non-empty list of positive ints, got {levels!r}")
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(config.get(key, [block] * len(levels)))
            if types != [block] * len(levels):
                raise ValueError(f"vae {key}={types!r} is not supported; allowed: {block!r} at each of the "
                                 f"{len(levels)} levels of block_out_channels")
        base = levels[0]
        if any(c % base for c in levels):
            raise ValueError(f"vae block_out_channels={levels!r}: every width must be a multiple of the first")
        scaling_factor = config.get("scaling_factor", SD_LATENT_SCALE)
        return cls(
            in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 4), base_channels=base,
            channel_multipliers=tuple(c // base for c in levels), num_res_blocks=config.get("layers_per_block", 1),
            norm_groups=config.get("norm_num_groups", 32),
            scaling_factor=float(scaling_factor) if is_int(scaling_factor) else scaling_factor,
        )

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Channels per level, shallowest first."""
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def num_levels(self) -> int:
        return len(self.channel_multipliers)

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side (8 for SD's four levels)."""
        return 2 ** (self.num_levels - 1)


VAE_PRESETS: dict[str, VAEConfig] = {
    "sd": VAEConfig(),  # SD 1.x and 2.x: CompVis kl-f8 (ch 128, ch_mult (1,2,4,4), 2 res blocks, z 4)
    # Fast tests and CPU training: f = 2, still with the mid-block attention.
    "tiny": VAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=8),
}


def get_vae_config(name: str) -> VAEConfig:
    """A named VAE preset (see VAE_PRESETS)."""
    return VAE_PRESETS[check_choice("VAE preset", name, VAE_PRESETS)]


# ---------------------------------------------------------------------------------------------------
# Posterior


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))), from (B, 2 * C_z, h, w) moments."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, C_z, h, w)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)  # clamp keeps NaN as NaN
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw z = mean + std * eps (Kingma & Welling 2014, Sec. 2.4).

        eps is drawn on the generator's device, so a CPU generator gives the same z on any device.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> Tensor:
        """KL(self || other), summed over all but the batch dim: (B,). other=None means N(0, I).

        Kingma & Welling 2014, App. B: KL(N(m, v) || N(0, 1)) = 0.5 * (m^2 + v - 1 - log v) per
        dimension; against N(m2, v2): 0.5 * ((m - m2)^2 / v2 + v / v2 - 1 - log v + log v2).
        """
        if other is None:
            per_dim = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            per_dim = (
                (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * per_dim.sum(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------
# Layers


def _group_norm(channels: int, config: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus a (1x1-projected when channels change) skip (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig):
        super().__init__()
        self.norm1 = _group_norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, config)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the S = H*W positions of a feature map, added to its input."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.norm = _group_norm(channels, config)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, S, C)
        projections = (self.to_q, self.to_k, self.to_v, self.to_out)
        # Vaswani et al. 2017, eq. 1 with one head (Dh = C): softmax(Q K^T / sqrt(C)) V
        out = multi_head_attention(tokens, tokens, projections, num_heads=1)  # (B, S, C)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + out


class MidBlock(nn.Module):
    """ResBlock, self-attention, ResBlock at the deepest level (the only global mixing in the VAE)."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, config) for _ in range(2)])
        self.attention = SpatialSelfAttention(channels, config)

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a 3x3 stride-2 conv (ldm Downsample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, DOWNSAMPLE_PADDING))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv (ldm Upsample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: a chain of ResBlocks, then Downsample / Upsample (None at the last level)."""

    def __init__(self, resnets: list[ResBlock], resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Image (B, C_in, H, W) -> posterior moments before quant_conv (B, 2 * C_z, H/f, W/f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        levels = []
        previous = channels[0]
        for i, width in enumerate(channels):
            resnets = [ResBlock(previous if j == 0 else width, width, config) for j in range(config.num_res_blocks)]
            downsample = Downsample(width) if i < config.num_levels - 1 else None
            levels.append(Level(resnets, downsample))
            previous = width
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(channels[-1], config)
        self.norm_out = _group_norm(channels[-1], config)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.conv_in(images)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents after post_quant_conv (B, C_z, h, w) -> image (B, C_out, h*f, w*f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_channels[::-1]  # deepest first
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], config)
        levels = []
        previous = channels[0]
        for i, width in enumerate(channels):
            resnets = [ResBlock(previous if j == 0 else width, width, config) for j in range(config.num_res_blocks + 1)]
            upsample = Upsample(width) if i < config.num_levels - 1 else None
            levels.append(Level(resnets, upsample))
            previous = width
        self.up_blocks = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels[-1], config)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------------
# Tiling


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    def _check_input(self, x: Tensor, what: str, channels: int, multiple: int, smallest: int = 1) -> None:
        """Raise ValueError unless x is (B, channels, H, W) with H, W positive multiples of `multiple` and at least
        `smallest`."""
        if x.ndim != 4:
            raise ValueError(f"{what} must be a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        height, width = x.shape[-2:]
        low = max(multiple, smallest)
        if height % multiple or width % multiple or min(height, width) < low:
            rule = f"positive multiples of {multiple}" if multiple > 1 else f"at least {low}"
            raise ValueError(
                f"{what} height and width must be {rule} (2 ** (levels - 1) "
                f"for this {self.config.num_levels}-level VAE), got {height} x {width}"
            )

    def _grid_tiling(self, tiling: Tiling | None) -> tuple[int, int] | None:
        """Tile size and overlap in latent cells (None without tiling)."""
        if tiling is None:
            return None
        f = self.config.downsample_factor
        if tiling.tile_size % f or tiling.overlap % f:
            raise ValueError(
                f"tile_size and overlap must be multiples of the downsample factor {f}, "
                f"got tile_size={tiling.tile_size} overlap={tiling.overlap}"
            )
        return tiling.tile_size // f, tiling.overlap // f

    def _moments(self, images: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(images))  # (B, 2 * C_z, H/f, W/f)

    def _pixels(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, C_out, h*f, w*f)

    def encode(self, images: Tensor, tiling: Tiling | None = None, any_size: bool = False) -> DiagonalGaussian:
        """Posterior over unscaled latents for images (B, C_in, H, W) in [-1, 1]; H, W multiples of f. With
        any_size, any H, W of at least f: the latents are ⌊H/f⌋ x ⌊W/f⌋, what ldm's padded stride-2 convolutions
        give (A1111 encodes its "latent upscale" init images at their own size so); tiled, the last H mod f rows and
        W mod f columns are left out."""
        f = self.config.downsample_factor
        self._check_input(images, "images", self.config.in_channels, 1 if any_size else f, smallest=f)
        grid_tiling = self._grid_tiling(tiling)
        if grid_tiling is not None and tiling.applies_to(*images.shape[-2:]):
            moments = run_tiled(self._moments, images, *grid_tiling, in_scale=f, out_scale=1)
        else:
            moments = self._moments(images)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor, tiling: Tiling | None = None) -> Tensor:
        """Unscaled latents (B, C_z, h, w) -> the decoder's raw output (B, C_out, h*f, w*f), unclamped."""
        f = self.config.downsample_factor
        self._check_input(z, "latents", self.config.latent_channels, multiple=1)
        grid_tiling = self._grid_tiling(tiling)
        if grid_tiling is not None and tiling.applies_to(z.shape[-2] * f, z.shape[-1] * f):
            return run_tiled(self._pixels, z, *grid_tiling, in_scale=1, out_scale=f)
        return self._pixels(z)

    def encode_to_latents(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
        tiling: Tiling | None = None,
        any_size: bool = False,
    ) -> Tensor:
        """Images in [-1, 1] -> latents for the diffusion model: z * scaling_factor (LDM Sec. 4.3.2).

        sample=True draws z from the posterior with `generator`; sample=False takes its mean. any_size: as `encode`.
        """
        posterior = self.encode(images, tiling, any_size)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.config.scaling_factor

    def decode_latents(self, latents: Tensor, tiling: Tiling | None = None) -> Tensor:
        """Diffusion-model latents -> images clamped to [-1, 1] (NaN stays NaN)."""
        return self.decode(latents / self.config.scaling_factor, tiling).clamp(-1.0, 1.0)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction (unclamped) and posterior, for training: the loss needs both."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
