"""What each stage trains, built from a TrainConfig: the model, its trainable part and objective, and the
snapshots a run saves and samples with.

    vae   trains model.vae with VAEObjective; the rest of the model is carried along untrained
    unet  trains model.text_encoder and model.unet with DiffusionObjective; model.vae comes from the trained
          VAE checkpoint (`TrainConfig.vae`) and stays frozen

A VAE's latents reach the U-Net multiplied by `VAEConfig.scaling_factor`; LDM (sec. 4.3.2, App. D.1) sets it to
1 / (std of the latents of a batch of training data). `latent_scale` measures it for a trained VAE and every
model the vae stage saves carries it in its config, so the unet stage trains on unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from kedavra.checkpoint import load_model
from kedavra.model import PRESETS, ModelConfig, StableDiffusion
from kedavra.schedule import get_schedule
from kedavra.training.config import TrainConfig

SCALE_PROBE_ITEMS = 256  # training items whose latents set the scaling factor (LDM: one batch, App. D.1)
TRAINED = {"vae": ("vae",), "unet": ("text_encoder", "unet")}  # the components each stage trains


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of a run ("init", "draws", "order/3", ...), independent
    of the others: the run's seed and the stream name, hashed."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def model_config_for(config: TrainConfig, vae_config=None) -> ModelConfig:
    """The ModelConfig a stage trains: the preset at the run's image size, prediction type and schedule, with the
    trained VAE's config (its scaling factor) for the unet stage."""
    preset = PRESETS[config.preset]
    return dataclasses.replace(
        preset,
        image_size=config.image_size,
        prediction_type=config.model_config_prediction,
        schedule=get_schedule(config.schedule_name),
        vae=vae_config if vae_config is not None else preset.vae,
    )


def build_model(config: TrainConfig) -> StableDiffusion:
    """A fresh model for the stage, its initial weights drawn from the run's seed (the global RNG is forked, so
    the caller's is untouched); for the unet stage with the trained VAE's weights."""
    trained_vae = _load_trained_vae(config) if config.stage == "unet" else None
    model_config = model_config_for(config, trained_vae.config if trained_vae is not None else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(config.seed, "init"))
        model = StableDiffusion(model_config)
    if trained_vae is not None:
        model.vae.load_state_dict(trained_vae.state_dict())
    return model


def _load_trained_vae(config: TrainConfig):
    path = Path(config.vae)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a vae-stage run folder
        path = path / "model.safetensors"
    if not path.exists():
        raise ValueError(f"vae {config.vae!r}: no such file; give the model.safetensors of a vae-stage run")
    vae = load_model(path).vae
    expected = PRESETS[config.preset].vae
    if dataclasses.replace(vae.config, scaling_factor=expected.scaling_factor) != expected:
        raise ValueError(f"the VAE in {str(path)!r} is not the {config.preset!r} preset's VAE: "
                         f"{vae.config} != {expected}")
    return vae


def model_from_state(model_config: ModelConfig, state: dict[str, Tensor]) -> StableDiffusion:
    """A model holding copies of the tensors in `state` (a full state dict), built without random init."""
    with torch.device("meta"):
        model = StableDiffusion(model_config)
    model.load_state_dict({name: tensor.detach().cpu().clone() for name, tensor in state.items()}, assign=True)
    return model.eval()


def with_latent_scale(model_config: ModelConfig, scale: float) -> ModelConfig:
    return dataclasses.replace(model_config, vae=dataclasses.replace(model_config.vae, scaling_factor=scale))


def trained_parameters(model: StableDiffusion, stage: str) -> dict[str, nn.Parameter]:
    """The parameters a stage trains, named as in the model's state dict ("unet.conv_in.weight", ...)."""
    return {f"{part}.{name}": p for part in TRAINED[stage] for name, p in getattr(model, part).named_parameters()}


def freeze_untrained(model: StableDiffusion, stage: str) -> None:
    """requires_grad and train mode on the stage's components; the others frozen, in eval mode."""
    for part in ("text_encoder", "unet", "vae"):
        module = getattr(model, part)
        trained = part in TRAINED[stage]
        module.requires_grad_(trained)
        module.train(trained)


@torch.no_grad()
def latent_scale(vae: nn.Module, images: Tensor, generator: torch.Generator) -> float | None:
    """1 / std of the posterior samples of `images` (LDM sec. 4.3.2: the latents' scale for the diffusion model),
    over the images whose latents are finite; None when there are none or they are constant."""
    z = vae.encode(images).sample(generator).float()  # (B, C, h, w)
    z = z[torch.isfinite(z).flatten(1).all(dim=1)]
    scale = 1.0 / z.std().item() if z.numel() > 1 else math.inf
    return scale if math.isfinite(scale) else None
