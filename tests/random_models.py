"""Tiny kedavra models with every weight random (the U-Net's zero-initialised output layers too), so that guidance
and seeds visibly change the result: shared by the pipeline, acceleration, CUDA, FID and command-line tests. They
need nothing but kedavra (no reference libraries), so the CUDA tests run where diffusers is not installed."""

import torch

from kedavra.networks.model import ModelConfig, StableDiffusion


def tiny_model(family: str = "tiny", seed: int = 0) -> StableDiffusion:
    """`family` as initialised, plus 0.05 · N(0, 1) on every weight."""
    torch.manual_seed(seed)
    model = StableDiffusion(ModelConfig.from_preset(family))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def normal_model(family: str = "tiny", std: float = 0.05, seed: int = 0) -> StableDiffusion:
    """`family` with every weight ~ N(0, std²) instead of its initialisation, drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    model = StableDiffusion(ModelConfig.from_preset(family))
    with torch.no_grad():
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=std)
    return model
