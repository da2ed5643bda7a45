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

The shape comes from `UNetConfig` (kedavra.networks.unet_config, re-exported here): per-level widths, ResBlock
counts, transformer depths and heads, levels without attention, an optional mid block (BK-SDM has none) and SDXL's
added embedding of the pooled text and micro-conditioning (Podell et al. 2023, Sec. 2.2), passed as `added_cond`,
and, for kedavra's own models, CoordConv's coordinate channels at conv_in (`coord_channels`, Liu et al. 2018).

`kedavra.networks.unet_keys.convert_unet_state_dict` maps the two checkpoint layouts in the wild ("diffusers":
UNet2DConditionModel names; "ldm": the CompVis/Stability single file, `model.diffusion_model.`
stripped) onto this module's parameter names, deriving every index from the config.
"""

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kedavra.networks.step_cache import StepCache
from kedavra.networks.transformer import CrossAttention, SpatialTransformer
from kedavra.networks.unet_config import RESNET_NORM_EPS, UNetConfig

MAX_PERIOD = 10_000  # Vaswani et al. 2017, Sec. 3.5: wavelengths up to 10000 * 2*pi
ADDED_COND_KEYS = ("text_embeds", "time_ids")  # SDXL's added conditioning, as diffusers' added_cond_kwargs names it


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


def coordinate_grid(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 2, H, W): each pixel's row and column, scaled so the first is -1 and the last +1 (0 for a
    side of one pixel); CoordConv's extra input channels (Liu et al. 2018, Sec. 4), in x's dtype and device.
    Fractions of the side rather than indices, so a model trained at one size places things alike at another."""
    batch, _, height, width = x.shape
    rows, cols = (torch.linspace(-1.0, 1.0, n, device=x.device) if n > 1 else torch.zeros(1, device=x.device)
                  for n in (height, width))
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W): row, column
    return grid.to(x.dtype)[None].expand(batch, 2, height, width)


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


class TextTimeEmbedding(nn.Module):
    """SDXL's added embedding (Podell et al. 2023, "SDXL", Sec. 2.2; diffusers' addition_embed_type "text_time"):
    each micro-conditioning number (original size, crop corner, target size; the refiner an aesthetic score for the
    target size) gets sinusoids of width `time_dim`, concatenated after the pooled text embedding, through a 2-layer
    SiLU MLP to the time embedding's width; the U-Net adds the result to the time embedding."""

    def __init__(self, input_dim: int, time_dim: int, embed_dim: int):
        super().__init__()
        self.time_dim = time_dim
        self.linear_1 = nn.Linear(input_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, text_embeds: Tensor, time_ids: Tensor) -> Tensor:
        """text_embeds (B, P), time_ids (B, n) with P + n * time_dim = input_dim -> (B, embed_dim)."""
        batch = text_embeds.shape[0]
        sinusoids = timestep_embedding(time_ids.reshape(-1), self.time_dim)  # (B * n, D_t)
        sinusoids = sinusoids.reshape(batch, -1)  # (B, n * D_t): each number's sinusoids in turn
        features = torch.cat([text_embeds.float(), sinusoids], dim=-1).to(self.linear_1.weight.dtype)  # (B, P + n D_t)
        return self.linear_2(F.silu(self.linear_1(features)))  # (B, 4C)


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with the timestep embedding added between; residual.

    Ho et al. 2020, App. B (Wide ResNet blocks with the time embedding added per channel).
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float, groups: int,
                 eps: float = RESNET_NORM_EPS):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
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
    """forward(x_t (B, C_in, H, W), t (B,) or scalar, context (B, L, D_ctx), added_cond=None) -> (B, C_out, H, W),
    any H, W >= 1; added_cond carries SDXL's pooled text embedding and micro-conditioning (see `forward`)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        levels = config.num_levels
        embed_dim = config.time_embed_dim

        def resnet(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, config.dropout, config.norm_groups, config.norm_eps)

        def transformer(level: int) -> SpatialTransformer:
            """The spatial transformer at `level` (the mid block's: the last level's heads and depth)."""
            num_heads, head_dim = config.level_heads(level)
            return SpatialTransformer(
                config.level_channels[level],
                num_heads,
                head_dim,
                config.context_dim,
                config.level_depths[level],
                config.use_linear_projection,
                config.norm_groups,
            )

        self.time_embedding = TimestepEmbedding(config.base_channels, embed_dim)
        self.add_embedding = None
        if config.has_added_embedding:
            self.add_embedding = TextTimeEmbedding(
                config.addition_embed_input_dim, config.addition_time_embed_dim, embed_dim
            )
        in_channels = config.in_channels + (2 if config.coord_channels else 0)  # CoordConv: + row, column
        self.conv_in = nn.Conv2d(in_channels, config.base_channels, kernel_size=3, padding=1)

        skip_channels = [config.base_channels]  # widths of the tensors the down path leaves as skips
        channels = config.base_channels
        self.down_blocks = nn.ModuleList()
        for i, (width, attend) in enumerate(zip(config.level_channels, config.attention_per_level, strict=True)):
            resnets, attentions = [], []
            for _ in range(config.level_res_blocks[i]):
                resnets.append(resnet(channels, width))
                channels = width
                if attend:
                    attentions.append(transformer(i))
                skip_channels.append(width)
            downsample = Downsample(width) if i < levels - 1 else None
            if downsample is not None:
                skip_channels.append(width)
            self.down_blocks.append(Level(resnets, attentions, downsample))

        self.num_skips = len(skip_channels)  # conv_in's output and every down sub-block's and downsampler's
        self.mid_block = None  # block-removed models (BK-SDM) go straight from the down path to the up path
        if config.mid_block:
            self.mid_block = Level([resnet(channels, channels), resnet(channels, channels)], [transformer(-1)], None)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            width, attend = config.level_channels[i], config.attention_per_level[i]
            resnets, attentions = [], []
            for _ in range(config.level_res_blocks[i] + 1):  # one more than going down: conv_in / the
                resnets.append(resnet(channels + skip_channels.pop(), width))  # downsampler also left a skip
                channels = width
                if attend:
                    attentions.append(transformer(i))
            upsample = Upsample(width) if i > 0 else None
            self.up_blocks.append(Level(resnets, attentions, upsample))

        self.norm_out = nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)
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

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor, added_cond: Mapping[str, Tensor] | None) -> Tensor:
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
        self._check_added_cond(batch, added_cond)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.shape == (1,):
            return t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"UNet timesteps t must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        return t

    def _check_added_cond(self, batch: int, added_cond: Mapping[str, Tensor] | None) -> None:
        """SDXL-style U-Nets need text_embeds (B, P) and time_ids (B, n) with P + n * D_t = addition_embed_input_dim;
        the others take none."""
        config = self.config
        if not config.has_added_embedding:
            if added_cond is not None:
                raise ValueError(
                    "this U-Net has no added embedding (addition_embed_input_dim is None), so added_cond must be None, "
                    f"got {type(added_cond).__name__}"
                )
            return
        need = f"P + n * {config.addition_time_embed_dim} = {config.addition_embed_input_dim}"
        if not isinstance(added_cond, Mapping) or set(added_cond) != set(ADDED_COND_KEYS):
            got = sorted(added_cond) if isinstance(added_cond, Mapping) else added_cond
            raise ValueError(
                f"this U-Net (SDXL-style) needs added_cond with exactly the keys {list(ADDED_COND_KEYS)}: the pooled "
                f"text embedding (B, P) and the micro-conditioning numbers (B, n), {need}; got {got!r}"
            )
        text, ids = added_cond["text_embeds"], added_cond["time_ids"]
        shapes = (tuple(text.shape), tuple(ids.shape))
        if (text.ndim != 2 or ids.ndim != 2 or text.shape[0] != batch or ids.shape[0] != batch
                or text.shape[1] + ids.shape[1] * config.addition_time_embed_dim != config.addition_embed_input_dim):
            raise ValueError(
                f"added_cond text_embeds (B={batch}, P) and time_ids (B={batch}, n) must give {need} "
                f"(SDXL base: P = 1280, n = 6), got shapes {shapes[0]} and {shapes[1]}"
            )

    def forward(
        self, x: Tensor, t: Tensor | float, context: Tensor, added_cond: Mapping[str, Tensor] | None = None,
        cache: StepCache | None = None,
    ) -> Tensor:
        """x (B, C_in, H, W), t (B,) or scalar, context (B, L, D_ctx) -> (B, C_out, H, W). added_cond: SDXL's
        {"text_embeds": (B, P), "time_ids": (B, n)} when the config has the added embedding, else None.
        cache: DeepCache's state (kedavra.networks.step_cache): the call either runs whole and keeps the up path's
        input at skip `cache.depth`, or runs only the shallow blocks around that skip and reuses the kept feature."""
        t = self._check_inputs(x, t, context, added_cond)
        emb = self.time_embedding(t)  # (B, 4C)
        if self.add_embedding is not None:  # SDXL (Podell et al. 2023, Sec. 2.2): emb + MLP([pooled text, sinusoids])
            emb = emb + self.add_embedding(added_cond["text_embeds"], added_cond["time_ids"])  # (B, 4C)
        reuse = cache is not None and cache.next_call(x)
        # DeepCache (Ma et al. 2023, Eq. 4-5): the up sub-block that pops skip `depth` is where a cached call resumes
        resume_at = self.num_skips - 1 - min(cache.depth, self.num_skips - 1) if cache is not None else -1

        if self.config.coord_channels:  # CoordConv (Liu et al. 2018): conv_in also reads where each pixel is
            h = self.conv_in(torch.cat([x, coordinate_grid(x)], dim=1))  # (B, C_in + 2, H, W) -> (B, C, H, W)
        else:
            h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        for level in self.down_blocks:
            if reuse and len(skips) > cache.depth:  # the shallow skips are all a cached call needs
                break
            for j, resnet in enumerate(level.resnets):
                if reuse and len(skips) > cache.depth:
                    break
                h = self._run(resnet, h, emb)
                if level.attentions:
                    h = self._run(level.attentions[j], h, context)
                skips.append(h)
            if level.resample is not None and not (reuse and len(skips) > cache.depth):
                h = level.resample(h)  # (B, C_level, ceil(H/2), ceil(W/2))
                skips.append(h)

        mid = self.mid_block
        if mid is not None and not reuse:
            h = self._run(mid.resnets[0], h, emb)
            h = self._run(mid.attentions[0], h, context)
            h = self._run(mid.resnets[1], h, emb)

        k = 0  # up sub-blocks in order; sub-block k pops skip num_skips - 1 - k
        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                if k == resume_at:
                    if reuse:
                        h = cache.feature
                    else:
                        cache.keep(h, x)
                k += 1
                if reuse and k <= resume_at:
                    continue
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                h = self._run(resnet, h, emb)
                if level.attentions:
                    h = self._run(level.attentions[j], h, context)
            if level.resample is not None and not (reuse and k <= resume_at):
                h = level.resample(h, skips[-1].shape[2:])  # (B, C_level, H_skip, W_skip): 2H, 2W unless rounded

        return self.conv_out(F.silu(self.norm_out(h)))
