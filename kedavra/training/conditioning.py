"""The network the unet stage trains: the U-Net conditioned on the text encoder's hidden states, as one module.

    prediction = ε_θ(x_t, t, τ_θ(y))     (Rombach et al. 2022, eq. 3: τ_θ the text encoder, y the caption's ids)

SDXL (Podell et al. 2023, sec. 2.1 and 2.2): two text encoders whose states are concatenated along the channels,
the second one's pooled, projected embedding and the micro-conditioning numbers (`time_ids`) through the U-Net's
added embedding.

One module, so that one DistributedDataParallel wrapper averages the gradients of every part that trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONTEXT_CACHE_BYTES = 2 * 2**30  # a frozen text encoder's outputs kept for repeated captions, at most this much


class TextConditionedUNet(nn.Module):
    """forward(x_t (B, C, h, w), t (B,), input_ids (B, L), input_ids_2 (B, L) | None, time_ids (B, n) | None) ->
    the U-Net's prediction (B, C, h, w); input_ids_2 and time_ids for an SDXL U-Net (`text_encoder_2` given).

    A frozen text encoder (no parameter requiring grad: MiniLM, --freeze-text-encoder, or a LoRA run that leaves it
    alone) runs without autograd, one caption at a time, and its output per caption is kept (up to
    CONTEXT_CACHE_BYTES) since captions repeat: the same numbers as running it again, however the batches fall, so a
    resumed run stays bitwise equal to an uninterrupted one.
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, text_encoder_2: nn.Module | None = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.unet = unet
        self.contexts: dict[bytes, Tensor] = {}  # ids -> the first encoder's (L, D) states
        self.contexts_2: dict[bytes, tuple[Tensor, Tensor]] = {}  # ids -> SDXL's second's (L, D) states, (P,) pooled
        self.cached_bytes = 0

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor, input_ids_2: Tensor | None = None,
                time_ids: Tensor | None = None) -> Tensor:
        if self.text_encoder_2 is None:
            return self.unet(x_t, t, self._encode(0, input_ids)[0])  # (B, C, h, w)
        first, _ = self._encode(0, input_ids)  # (B, L, D1)
        second, pooled = self._encode(1, input_ids_2)  # (B, L, D2), (B, P)
        context = torch.cat([first, second], dim=-1)  # (B, L, D1 + D2)
        return self.unet(x_t, t, context, added_cond={"text_embeds": pooled, "time_ids": time_ids})

    def _encode(self, index: int, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, L, D) states of text encoder `index` for (B, L) ids, and for SDXL's second its pooled (B, P)."""
        encoder = self.text_encoder if index == 0 else self.text_encoder_2
        if any(p.requires_grad for p in encoder.parameters()):
            return encoder.encode(ids) if index == 1 else (encoder(ids), None)
        rows = [self._frozen_context(index, row) for row in ids]
        pooled = torch.stack([p for _, p in rows]) if index == 1 else None  # (B, P)
        return torch.stack([states for states, _ in rows]), pooled  # (B, L, D)

    @torch.no_grad()
    def _frozen_context(self, index: int, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(L,) ids -> (L, D) hidden states of frozen text encoder `index` (and SDXL's pooled (P,)), from the cache
        where possible."""
        key = ids.cpu().numpy().tobytes()
        cache = self.contexts if index == 0 else self.contexts_2
        if key in cache:
            return (cache[key], None) if index == 0 else cache[key]
        if index == 0:
            result = (self.text_encoder(ids[None])[0], None)  # (L, D)
        else:
            states, pooled = self.text_encoder_2.encode(ids[None])  # (1, L, D), (1, P)
            result = (states[0], pooled[0])
        size = sum(t.numel() * t.element_size() for t in result if t is not None)
        if self.cached_bytes + size <= CONTEXT_CACHE_BYTES:
            cache[key] = result[0] if index == 0 else result
            self.cached_bytes += size
        return result
