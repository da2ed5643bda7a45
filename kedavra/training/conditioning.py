"""The network the unet stage trains: the U-Net conditioned on the text encoder's hidden states, as one module.

    prediction = ε_θ(x_t, t, τ_θ(y))     (Rombach et al. 2022, eq. 3: τ_θ the text encoder, y the caption's ids)

One module, so that one DistributedDataParallel wrapper averages the gradients of both parts when both train.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONTEXT_CACHE_BYTES = 2 * 2**30  # a frozen text encoder's outputs kept for repeated captions, at most this much


class TextConditionedUNet(nn.Module):
    """forward(x_t (B, C, h, w), t (B,), input_ids (B, L)) -> the U-Net's prediction (B, C, h, w).

    A frozen text encoder (no parameter requiring grad: MiniLM, or --freeze-text-encoder) runs without autograd,
    one caption at a time, and its output per caption is kept (up to CONTEXT_CACHE_BYTES) since captions repeat:
    the same numbers as running it again, however the batches fall, so a resumed run stays bitwise equal to an
    uninterrupted one.
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet
        self.contexts: dict[bytes, Tensor] = {}
        self.cached_bytes = 0

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            context = self.text_encoder(input_ids)  # (B, L, D)
        else:
            context = torch.stack([self._frozen_context(row) for row in input_ids])  # (B, L, D)
        return self.unet(x_t, t, context)  # (B, C, h, w)

    @torch.no_grad()
    def _frozen_context(self, ids: Tensor) -> Tensor:
        """(L,) ids -> (L, D) hidden states of the frozen text encoder, from the cache where possible."""
        key = ids.cpu().numpy().tobytes()
        if key in self.contexts:
            return self.contexts[key]
        context = self.text_encoder(ids[None])[0]  # (L, D)
        size = context.numel() * context.element_size()
        if self.cached_bytes + size <= CONTEXT_CACHE_BYTES:
            self.contexts[key] = context
            self.cached_bytes += size
        return context
