"""Spatial transformer: the attention blocks inside Stable Diffusion's U-Net.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), Sec. 3.3:
the U-Net is conditioned on text by cross-attention, Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V
with Q from the image features and K, V from the text context. A spatial transformer flattens a
feature map into S = H*W tokens, runs transformer blocks (Vaswani et al. 2017) over them and folds
the result back, adding it to its input.

Layer order, as in the CompVis `SpatialTransformer` and diffusers' `Transformer2DModel`:
GroupNorm -> proj_in -> [LayerNorm + self-attention, LayerNorm + cross-attention,
LayerNorm + GEGLU feed-forward, each residual] x depth -> proj_out -> + input.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from kedavra.networks.attention import Recorder, multi_head_attention

TRANSFORMER_NORM_EPS = 1e-6  # LDM ldm/modules/attention.py Normalize(): GroupNorm(32, eps=1e-6)
FEED_FORWARD_MULT = 4  # LDM FeedForward(mult=4): inner width 4x the model width


class CrossAttention(nn.Module):
    """Multi-head attention from `x` to `context` (self-attention when context is None), through the one
    implementation of kedavra.networks.attention (F.scaled_dot_product_attention).

    With `slice_size` set, the queries are processed `slice_size` tokens at a time, bounding the score matrix at
    (B, Nh, slice_size, L). `recorder`, off (None) by default, is the opt-in hook for visualisations: a callable
    handed the attention probabilities softmax(Q K^T / sqrt(Dh)) of every call as one float32 tensor (B, Nh, S, L);
    see `attention.attend` for what recording changes (nothing, up to float rounding, in the output).
    """

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.slice_size: int | None = None
        self.recorder: Recorder | None = None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, S, D), context (B, L, D_ctx) or None -> (B, S, D)."""
        context = x if context is None else context
        projections = (self.to_q, self.to_k, self.to_v, self.to_out)
        return multi_head_attention(  # Vaswani et al. 2017, eq. 1, per head
            x, context, projections, self.num_heads, slice_size=self.slice_size, recorder=self.recorder
        )


class GEGLU(nn.Module):
    """Gated GELU projection: Shazeer 2020 ("GLU Variants Improve Transformer"), eq. 6: x W * GELU(x V)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)  # rows [0, inner) give the value W, [inner, 2 inner) the gate V

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # each (B, S, inner)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward of width FEED_FORWARD_MULT * dim, then a projection back to dim."""

    def __init__(self, dim: int):
        super().__init__()
        inner_dim = FEED_FORWARD_MULT * dim
        self.geglu = GEGLU(dim, inner_dim)
        self.proj_out = nn.Linear(inner_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(self.geglu(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, num_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, S, D)
        x = x + self.attn2(self.norm2(x), context)  # (B, S, D), attending over (B, L, D_ctx)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on a text context.

    `use_linear_projection` picks Linear proj_in/proj_out (SD 2.x) instead of 1x1 convs (SD 1.x);
    the two hold the same numbers, a (C, C) matrix versus a (C, C, 1, 1) kernel.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int,
        context_dim: int,
        depth: int,
        use_linear_projection: bool,
        norm_groups: int,
    ):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)  # LDM attention.py zero_module: the block starts as identity
        nn.init.zeros_(self.proj_out.bias)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner_dim, context_dim, num_heads, head_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        # A view, not a copy, when x is channels_last.
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, h.shape[1])  # (B, S, D)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, S, D)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, h.shape[-1]).permute(0, 3, 1, 2)  # (B, D, H, W), channels_last
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return x + h
