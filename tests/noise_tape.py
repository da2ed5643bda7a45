"""The same standard normal tensors, in order, for a reference loop and kedavra's: the noise of stochastic samplers
compared step by step (tests/test_k_samplers.py, tests/test_comfyui_samplers_more.py)."""

from __future__ import annotations

import torch


class NoiseTape:
    """Draws of `shape` from one seeded generator, replayed after `rewind`; k-diffusion's / ComfyUI's noise_sampler
    protocol (`k_diffusion`, `comfy`) and kedavra's (`kedavra`) read the same tape."""

    def __init__(self, seed: int, shape: tuple[int, ...]):
        self.generator = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.tape: list[torch.Tensor] = []
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position == len(self.tape):
            self.tape.append(torch.randn(self.shape, generator=self.generator))
        self.position += 1
        return self.tape[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def k_diffusion(self, sigma, sigma_next):
        return self.next()

    comfy = k_diffusion

    def kedavra(self, x, sigma, sigma_next):
        return self.next()
