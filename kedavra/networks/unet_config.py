"""The shape of a Stable Diffusion U-Net (`UNetConfig`), its presets, and the reader of diffusers' unet/config.json.

The vocabulary is SD's family as diffusers' UNet2DConditionModel describes it: levels of ResBlocks with or without
spatial transformers (CrossAttnDownBlock2D / DownBlock2D and their mirrored up blocks), per-level widths, ResBlock
counts, transformer depths and attention heads, an optional cross-attention mid block (block-removed distilled models
such as BK-SDM drop it), and SDXL's "text_time" added embedding (Podell et al. 2023, "SDXL", Sec. 2.2). SD 1.x / 2.x
configs written before the per-level fields keep their meaning: every new field defaults to what they built.
"""

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from kedavra.validation import check_bool, check_int, check_number, is_int, some

TIME_EMBED_MULT = 4  # LDM openaimodel.py: time_embed_dim = model_channels * 4
RESNET_NORM_EPS = 1e-5  # LDM normalization(): GroupNorm32 with torch's default eps (diffusers' norm_eps)


def _per_level(name: str, value, levels: int, low: int) -> tuple[int, ...]:
    """An int, or a tuple of one int per level, as a tuple of `levels` ints each >= low."""
    values = value if isinstance(value, tuple) else (value,) * levels
    if len(values) != levels or not all(is_int(v) and v >= low for v in values):
        raise ValueError(
            f"UNetConfig.{name} must be an int >= {low} or a tuple of one per level ({levels}), got {value!r}"
        )
    return values


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a U-Net. The defaults are SD 1.5 (CompVis v1-inference.yaml `unet_config`).

    Level widths: `base_channels * channel_multipliers` (SD: 320 x (1, 2, 4, 4)), or `block_out_channels` when the
    widths are not multiples of the first (then channel_multipliers is None and base_channels is its first entry).
    `res_blocks_per_level`, `transformer_depth` and a head count `num_heads` are an int for every level or a tuple
    with one per level; the mid block takes the last level's depth and heads, as diffusers builds it.

    Attention heads: set exactly one of `num_heads` (SD 1.x: 8 heads at every width, so the head dim grows with the
    channels) or `head_dim` (SD 2.x, SDXL: 64-wide heads, so C/64 heads).

    SDXL's added embedding: `addition_time_embed_dim` (the sinusoid width of each micro-conditioning number, 256) and
    `addition_embed_input_dim` (pooled text width + n x that width: 2816 = 1280 + 6 x 256 for the base, 2560 = 1280 +
    5 x 256 for the refiner); both None (no added embedding) or both set.
    """

    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 320
    channel_multipliers: tuple[int, ...] | None = (1, 2, 4, 4)
    res_blocks_per_level: int | tuple[int, ...] = 2
    attention_per_level: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | tuple[int, ...] | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    # SD 2.1 sets this to compute attention scores in fp32 (fp16 scores overflowed). Accepted for config
    # compatibility and otherwise unused: SDPA's fused CUDA kernels accumulate Q K^T and the softmax in
    # fp32, and bf16, the autocast dtype kedavra uses, has fp32's exponent range.
    upcast_attention: bool = False
    dropout: float = 0.0
    norm_groups: int = 32  # LDM normalization(): GroupNorm(32, C)
    block_out_channels: tuple[int, ...] | None = None
    mid_block: bool = True
    norm_eps: float = RESNET_NORM_EPS
    addition_time_embed_dim: int | None = None
    addition_embed_input_dim: int | None = None
    # CoordConv (Liu et al. 2018): conv_in also reads two channels holding each latent pixel's row and column,
    # scaled to [-1, 1], so every layer can know where it is. Not SD's: kedavra's own models trained from scratch.
    coord_channels: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):  # lists arrive from JSON; keep the config hashable
            if isinstance(getattr(self, field.name), list):
                object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
        for name in ("in_channels", "out_channels", "base_channels", "context_dim", "norm_groups"):
            check_int(f"UNetConfig.{name}", getattr(self, name), low=1)
        self._check_widths()
        levels = self.num_levels
        if len(self.attention_per_level) != levels or not all(isinstance(a, bool) for a in self.attention_per_level):
            raise ValueError(
                f"UNetConfig.attention_per_level {self.attention_per_level!r} needs one per level ("
                f"{levels} bools, level widths {self.level_channels})"
            )
        _per_level("res_blocks_per_level", self.res_blocks_per_level, levels, 1)
        _per_level("transformer_depth", self.transformer_depth, levels, 1)
        if self.base_channels % 2:
            raise ValueError(f"UNetConfig.base_channels={self.base_channels} must be even (it is the sinusoid width)")
        for channels in set(self.level_channels):
            if channels % self.norm_groups:
                raise ValueError(
                    f"UNetConfig: level width {channels} is not divisible by norm_groups={self.norm_groups}"
                )
        self._check_heads()
        check_bool("UNetConfig.use_linear_projection", self.use_linear_projection)
        check_bool("UNetConfig.upcast_attention", self.upcast_attention)
        check_bool("UNetConfig.mid_block", self.mid_block)
        check_bool("UNetConfig.coord_channels", self.coord_channels)
        if not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        check_number("UNetConfig.norm_eps", self.norm_eps, low=0, low_inclusive=False)
        added = (self.addition_time_embed_dim, self.addition_embed_input_dim)
        if (added[0] is None) != (added[1] is None):
            raise ValueError(
                "UNetConfig: set both addition_time_embed_dim and addition_embed_input_dim (SDXL) or neither, got "
                f"addition_time_embed_dim={added[0]!r}, addition_embed_input_dim={added[1]!r}"
            )
        if added[0] is not None:
            check_int("UNetConfig.addition_time_embed_dim", added[0], low=2, multiple_of=2, note=" (a sinusoid width)")
            check_int("UNetConfig.addition_embed_input_dim", added[1], low=1)

    def _check_widths(self) -> None:
        if self.block_out_channels is None:
            multipliers = self.channel_multipliers
            valid = isinstance(multipliers, tuple) and multipliers and all(is_int(m) and m >= 1 for m in multipliers)
            if not valid:
                raise ValueError(
                    f"UNetConfig.channel_multipliers must be a non-empty tuple of positive ints, got {multipliers!r}"
                )
            return
        widths = self.block_out_channels
        if not isinstance(widths, tuple) or not widths or not all(is_int(c) and c >= 1 for c in widths):
            raise ValueError(
                f"UNetConfig.block_out_channels must be a non-empty tuple of positive ints, got {widths!r}"
            )
        if self.channel_multipliers is not None or self.base_channels != widths[0]:
            raise ValueError(
                f"UNetConfig.block_out_channels={widths!r} gives the level widths: channel_multipliers must be None "
                f"and base_channels {widths[0]}, got channel_multipliers={self.channel_multipliers!r}, "
                f"base_channels={self.base_channels}"
            )

    def _check_heads(self) -> None:
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"UNetConfig: set exactly one of num_heads (SD 1.x) or head_dim (SD 2.x), got "
                f"num_heads={self.num_heads!r}, head_dim={self.head_dim!r}"
            )
        if self.num_heads is not None:
            _per_level("num_heads", self.num_heads, self.num_levels, 1)
            field = "num_heads"
        else:
            check_int("UNetConfig.head_dim", self.head_dim, low=1)
            field = "head_dim"
        for level in self.attention_levels:
            channels = self.level_channels[level]
            per_head = self.head_dim if self.head_dim is not None else _per_level(
                "num_heads", self.num_heads, self.num_levels, 1)[level]
            if channels % per_head:
                raise ValueError(f"UNetConfig: attention width {channels} is not divisible by {field}={per_head}")

    @property
    def num_levels(self) -> int:
        return len(self.level_channels)

    @property
    def level_channels(self) -> tuple[int, ...]:
        if self.block_out_channels is not None:
            return self.block_out_channels
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def level_res_blocks(self) -> tuple[int, ...]:
        """ResBlocks per level on the down path (the up path has one more at each level)."""
        return _per_level("res_blocks_per_level", self.res_blocks_per_level, self.num_levels, 1)

    @property
    def level_depths(self) -> tuple[int, ...]:
        """Transformer blocks per spatial transformer at each level; the mid block's is the last level's."""
        return _per_level("transformer_depth", self.transformer_depth, self.num_levels, 1)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """Indices of the levels that carry spatial transformers, and the last level's when the mid block does."""
        levels = tuple(i for i, attend in enumerate(self.attention_per_level) if attend)
        return (*levels, self.num_levels - 1) if self.mid_block else levels

    @property
    def attention_channels(self) -> tuple[int, ...]:
        """Widths that carry a spatial transformer: the attention levels and the mid block."""
        return tuple(self.level_channels[level] for level in self.attention_levels)

    @property
    def time_embed_dim(self) -> int:
        return TIME_EMBED_MULT * self.base_channels

    @property
    def has_added_embedding(self) -> bool:
        """Whether forward takes SDXL's added conditioning (pooled text embedding and micro-conditioning ids)."""
        return self.addition_time_embed_dim is not None

    @property
    def downsample_factor(self) -> int:
        """The down path's total downsampling (one stride-2 conv per level but the last). Inputs whose H and W
        are multiples of it halve exactly at every level; others are rounded up there (see `Upsample`)."""
        return 2 ** (self.num_levels - 1)

    def level_heads(self, level: int) -> tuple[int, int]:
        """(num_heads, head_dim) of the transformers at `level` (-1: the last level's, which the mid block uses)."""
        channels = self.level_channels[level]
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        count = _per_level("num_heads", self.num_heads, self.num_levels, 1)[level]
        return count, channels // count

    def heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of the transformer at width `channels` (every level of that width agrees)."""
        found = {self.level_heads(i) for i, c in enumerate(self.level_channels) if c == channels}
        if not found and self.num_heads is not None and not isinstance(self.num_heads, tuple):
            found = {(self.num_heads, channels // self.num_heads)}
        if not found and self.head_dim is not None:
            found = {(channels // self.head_dim, self.head_dim)}
        if len(found) != 1:
            raise ValueError(f"UNetConfig.heads: width {channels} has no single head count here ({sorted(found)}); "
                             "use level_heads(level)")
        return found.pop()

    @classmethod
    def from_preset(cls, name: str) -> "UNetConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """The UNetConfig that a diffusers unet/config.json (UNet2DConditionModel) describes; a field or value
        outside SD's vocabulary is a ValueError naming it. Absent keys take UNet2DConditionModel's defaults."""
        return _from_diffusers(cls, config)


_SD15 = UNetConfig()
_SD21 = dataclasses.replace(  # Stability v2-inference-v.yaml unet_config
    _SD15, num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True, upcast_attention=True
)
INPAINT_IN_CHANNELS = 9  # SD inpainting: 4 noisy latent + 4 masked-image latent + 1 mask
SDXL_TIME_EMBED_DIM = 256  # SGM sd_xl_base.yaml ConcatTimestepEmbedderND outdim: sinusoids per micro-condition
# SGM sd_xl_base.yaml network_config: no attention at the first level, 1, 2 and 10 transformer layers below, 64-wide
# heads, Linear projections, a 2048-wide context (768 + 1280) and the added embedding of 1280 pooled + 6 x 256.
_SDXL = UNetConfig(
    base_channels=320, channel_multipliers=(1, 2, 4), res_blocks_per_level=2, attention_per_level=(False, True, True),
    num_heads=None, head_dim=64, context_dim=2048, transformer_depth=(1, 2, 10), use_linear_projection=True,
    addition_time_embed_dim=SDXL_TIME_EMBED_DIM, addition_embed_input_dim=1280 + 6 * SDXL_TIME_EMBED_DIM,
)
# SGM sd_xl_refiner.yaml: 384 base channels over four levels, 4 transformer layers, bigG's 1280-wide context alone,
# and 1280 pooled + 5 x 256 (original size, crop, aesthetic score).
_SDXL_REFINER = dataclasses.replace(
    _SDXL, base_channels=384, channel_multipliers=(1, 2, 4, 4), attention_per_level=(False, True, True, False),
    context_dim=1280, transformer_depth=4, addition_embed_input_dim=1280 + 5 * SDXL_TIME_EMBED_DIM,
)
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
    "sdxl": _SDXL,
    "sdxl-inpaint": dataclasses.replace(_SDXL, in_channels=INPAINT_IN_CHANNELS),
    "sdxl-refiner": _SDXL_REFINER,
    # SDXL's shape at tiny sizes, for tests: two 32-wide text encoders, added embedding of 32 pooled + 6 x 8.
    "tiny-sdxl": UNetConfig(
        base_channels=32, channel_multipliers=(1, 2), res_blocks_per_level=1, attention_per_level=(False, True),
        num_heads=None, head_dim=16, context_dim=64, transformer_depth=(1, 2), use_linear_projection=True,
        norm_groups=8, addition_time_embed_dim=8, addition_embed_input_dim=32 + 6 * 8,
    ),
    "tiny-sdxl-refiner": UNetConfig(  # the refiner's conditioning at test sizes: one 32-wide encoder, 32 + 5 x 8
        base_channels=32, channel_multipliers=(1, 2), res_blocks_per_level=1, attention_per_level=(False, True),
        num_heads=None, head_dim=16, context_dim=32, transformer_depth=(1, 2), use_linear_projection=True,
        norm_groups=8, addition_time_embed_dim=8, addition_embed_input_dim=32 + 5 * 8,
    ),
}

# ---- diffusers' unet/config.json ---------------------------------------------------------------------------------

# UNet2DConditionModel.__init__'s defaults (diffusers 0.42) for the fields read here.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,  # a head COUNT in SD's configs: diffusers' naming quirk (its issue #2011)
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
# Fields whose value in SD's family is fixed: field -> the allowed values (the first is diffusers' default).
DIFFUSERS_FIXED: dict[str, tuple] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
DIFFUSERS_IGNORED = ("sample_size", "addition_embed_type_num_heads")  # no part of the architecture SD builds
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCKS = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}
MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, None: False}
ADDITION_EMBED_TYPES = (None, "text_time")


def _refuse(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"U-Net config field {field}={value!r} is outside SD's U-Net vocabulary; allowed: {allowed}")


def _is(value, allowed) -> bool:
    """`value` equals `allowed`, where True, False and None match only themselves."""
    if allowed is None or isinstance(allowed, bool) or value is None or isinstance(value, bool):
        return value is allowed
    return value == allowed


def _ints(field: str, value, levels: int) -> int | tuple[int, ...]:
    """A diffusers int-or-list field as an int when every level agrees, else a tuple of one int per level."""
    values = list(value) if isinstance(value, list | tuple) else [value] * levels
    if len(values) != levels or not all(is_int(v) and v >= 1 for v in values):
        raise _refuse(field, value, f"a positive int or a list of one per level ({levels})")
    return values[0] if len(set(values)) == 1 else tuple(values)


def _from_diffusers(cls: type, config: dict[str, Any]) -> UNetConfig:
    if not isinstance(config, dict):
        raise ValueError(f"a diffusers U-Net config must be a dict (unet/config.json), got {type(config).__name__}")
    known = set(DIFFUSERS_DEFAULTS) | set(DIFFUSERS_FIXED) | set(DIFFUSERS_IGNORED)
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(
            f"U-Net config field(s) {unknown} are outside SD's U-Net vocabulary; known: {some(sorted(known), 60)}"
        )
    for field, allowed in DIFFUSERS_FIXED.items():
        value = config.get(field, allowed[0])
        if field == "only_cross_attention" and isinstance(value, list | tuple):
            value = False if all(v is False for v in value) else value
        if not any(_is(value, a) for a in allowed):
            raise _refuse(field, value, " or ".join(repr(a) for a in allowed))
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DEFAULTS}}

    down = c["down_block_types"]
    if not isinstance(down, list | tuple) or not down or any(b not in DOWN_BLOCKS for b in down):
        raise _refuse("down_block_types", down, f"a non-empty list of {' / '.join(DOWN_BLOCKS)}")
    attention = tuple(DOWN_BLOCKS[b] for b in down)
    levels = len(down)
    mirrored = [UP_BLOCKS[a] for a in reversed(attention)]
    if list(c["up_block_types"] or ()) != mirrored:
        raise _refuse("up_block_types", c["up_block_types"], f"{mirrored} (the down blocks mirrored)")
    if c["mid_block_type"] not in MID_BLOCKS:
        raise _refuse("mid_block_type", c["mid_block_type"], " or ".join(repr(m) for m in MID_BLOCKS))
    mid = MID_BLOCKS[c["mid_block_type"]]

    widths = c["block_out_channels"]
    if not isinstance(widths, list | tuple) or len(widths) != levels or not all(is_int(w) and w >= 1 for w in widths):
        raise _refuse("block_out_channels", widths, f"a list of one positive int per down block ({levels})")
    widths = tuple(int(w) for w in widths)
    base = widths[0]
    if all(w % base == 0 for w in widths):
        shape = {"base_channels": base, "channel_multipliers": tuple(w // base for w in widths)}
    else:
        shape = {"base_channels": base, "channel_multipliers": None, "block_out_channels": widths}

    heads_field = "num_attention_heads" if c["num_attention_heads"] is not None else "attention_head_dim"
    counts = _ints(heads_field, c[heads_field], levels)
    counts = counts if isinstance(counts, tuple) else (counts,) * levels
    used = [i for i in range(levels) if attention[i]] + ([levels - 1] if mid else [])
    for i in used:
        if widths[i] % counts[i]:
            raise _refuse(heads_field, c[heads_field], f"head counts that divide the level widths {list(widths)}")
    used = used or [0]
    if len({counts[i] for i in used}) == 1:  # SD 1.x: one head count at every width
        heads = {"num_heads": counts[used[0]], "head_dim": None}
    elif len({widths[i] // counts[i] for i in used}) == 1:  # SD 2.x, SDXL: one head width (64)
        heads = {"num_heads": None, "head_dim": widths[used[0]] // counts[used[0]]}
    else:
        heads = {"num_heads": counts, "head_dim": None}

    depth = c["transformer_layers_per_block"]
    if isinstance(depth, list | tuple) and any(isinstance(d, list | tuple) for d in depth):
        raise _refuse("transformer_layers_per_block", depth, "an int or a list of one int per level (not nested)")
    context = c["cross_attention_dim"]
    if isinstance(context, list | tuple):
        context = context[0] if len(set(context)) == 1 else context
    if not is_int(context) or context < 1:
        raise _refuse("cross_attention_dim", c["cross_attention_dim"], "one positive int (the text width)")

    added = c["addition_embed_type"]
    if added not in ADDITION_EMBED_TYPES:
        raise _refuse("addition_embed_type", added, " or ".join(repr(a) for a in ADDITION_EMBED_TYPES))
    addition = {}
    if added == "text_time":
        for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not is_int(c[field]) or c[field] < 1:
                raise _refuse(field, c[field], "a positive int with addition_embed_type 'text_time'")
        addition = {"addition_time_embed_dim": c["addition_time_embed_dim"],
                    "addition_embed_input_dim": c["projection_class_embeddings_input_dim"]}
    bools = {}
    for field in ("use_linear_projection", "upcast_attention"):  # SDXL's config writes upcast_attention: null
        value = False if c[field] is None else c[field]
        if not isinstance(value, bool):
            raise _refuse(field, c[field], "true, false or null")
        bools[field] = value
    if not is_int(c["norm_num_groups"]):
        raise _refuse("norm_num_groups", c["norm_num_groups"], "a positive int (SD normalises with GroupNorm)")
    try:
        return cls(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            **shape,
            res_blocks_per_level=_ints("layers_per_block", c["layers_per_block"], levels),
            attention_per_level=attention,
            **heads,
            context_dim=context,
            transformer_depth=_ints("transformer_layers_per_block", depth, levels),
            **bools,
            dropout=c["dropout"],
            norm_groups=c["norm_num_groups"],
            mid_block=mid,
            norm_eps=c["norm_eps"],
            **addition,
        )
    except ValueError as error:
        raise ValueError(f"U-Net config does not describe a U-Net kedavra builds: {error}") from None
