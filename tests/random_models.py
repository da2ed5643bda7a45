"""A tiny kedavra model with every weight random (the U-Net's zero-initialised output layers too), so that
guidance and seeds visibly change the result: shared by the pipeline, acceleration and CUDA tests. It needs
nothing but kedavra (no reference libraries), so the CUDA tests run where diffusers is not installed."""

import torch

from kedavra.networks.model import ModelConfig, StableDiffusion


def tiny_model(family: str = "tiny", seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    model = StableDiffusion(ModelConfig.from_preset(family))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model
