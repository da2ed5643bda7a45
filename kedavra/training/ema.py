"""An exponential moving average of the trained weights, the weights a run samples and exports with.

    θ_ema <- d·θ_ema + (1 - d)·θ,   d = min(decay, (1 + n) / (10 + n)) after n updates

The warm-up of d is LDM's `LitEma` (ldm/modules/ema.py, from TensorFlow's ExponentialMovingAverage with
num_updates): early on the average forgets its random start quickly, later it settles at `decay`.
"""

from __future__ import annotations

import torch
from torch import nn

EMA_WARMUP_OFFSET = 10  # the 10 of (1 + n) / (10 + n), ldm/modules/ema.py LitEma.forward


def ema_decay_at(updates: int, decay: float) -> float:
    """The decay of update number `updates` (0-based), warmed up as in LitEma."""
    return min(decay, (1 + updates) / (EMA_WARMUP_OFFSET + updates))


class EMA:
    """Shadow copies (fp32, detached) of the named parameters of `modules`, keyed as in the model's state dict."""

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.updates = 0
        self.params = named_parameters
        self.shadow = {name: p.detach().float().clone() for name, p in named_parameters.items()}

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step towards the current parameters; returns the decay used."""
        decay = ema_decay_at(self.updates, self.decay)
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1 - decay)  # θ_ema + (1-d)(θ - θ_ema)
        self.updates += 1
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the shadows (exactly, dtype and all) and the update count from a checkpoint."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])
        self.updates = updates
