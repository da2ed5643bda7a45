"""DeepCache: reuse the U-Net's deep features across neighbouring sampler steps (opt-in).

DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free", Sec. 3.2-3.3): the
high-level features a U-Net's deep blocks compute change little from one denoising step to the next, while the
skip branch of its shallowest blocks carries what changes. So on a *full* call the whole U-Net runs and the up path's
input at one skip connection is kept; on a *cached* call only the shallow part runs: conv_in and the down path up to
that skip, then the kept feature stands in for everything deeper, and the up path resumes there (the paper's
Eq. 4-5, its "uniform 1:N strategy": a full call every N calls).

    skips s_0 (conv_in), s_1, ..., s_{S-1} as the down path leaves them; up sub-block k pops s_{S-1-k}
    depth d   a cached call computes s_0 .. s_d and the up sub-blocks that pop s_d .. s_0, with the kept input of
              the one that pops s_d (d = 1: DeepCache's default for SD, the first down block's first layer)

Everything else of the call (time embedding, SDXL's added conditioning, conv_out) runs every time. The cache keeps
one feature, for one batch shape and dtype: a call of another shape (the hires pass, another batch) runs full.
The images change: docs/benchmark.md ("Step cache") measures the speed against the drift from the uncached image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kedavra.validation import check_int

DEFAULT_DEPTH = 1  # DeepCache's cache_layer_id 0, cache_block_id 0 for Stable Diffusion


@dataclass
class StepCache:
    """The state of one sampling run's DeepCache: a full U-Net call every `interval` calls, the others cached."""

    interval: int
    depth: int = DEFAULT_DEPTH
    calls: int = 0
    full_calls: int = 0
    feature: Tensor | None = field(default=None, repr=False)
    key: tuple | None = None  # (shape, dtype, device) of the input the feature was computed for

    def __post_init__(self):
        check_int("step cache interval", self.interval, 1, note=" (U-Net calls per full call; 1 = no reuse)")
        check_int("step cache depth", self.depth, 0)

    def next_call(self, x: Tensor) -> bool:
        """Whether this call (input x) reuses the kept feature; counts the call."""
        key = (tuple(x.shape), x.dtype, x.device)
        reuse = self.feature is not None and self.key == key and self.calls % self.interval != 0
        if not reuse:
            self.calls = 0  # a full call starts the count again (also after a change of shape)
            self.full_calls += 1
        self.calls += 1
        return reuse

    def keep(self, feature: Tensor, x: Tensor) -> None:
        """Keep the up path's input `feature` of a full call on input x."""
        self.feature, self.key = feature, (tuple(x.shape), x.dtype, x.device)
