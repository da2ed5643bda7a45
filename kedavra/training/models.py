"""The model a stage's run trains: a preset's, built from the run's seed, or a trained one loaded to fine-tune;
and models rebuilt from saved weights (a resumed checkpoint, the snapshots a run saves and samples with).

From scratch the model is the preset's, drawn from the run's seed; a unet run from scratch takes the weights (and
the latent scale) of the trained VAE that `TrainConfig.vae` names. A fine-tune (`TrainConfig.init`) loads the
model with kedavra.checkpoint.load_model and keeps its ModelConfig, only `prediction_type` and `schedule` replaced
where the config names them. SDXL base models (two text encoders, the added embedding) are trained through a LoRA,
or whole with FSDP2 (`TrainConfig.fsdp`: their training state does not fit one device); the refiner not at all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from kedavra.api import resolve_model
from kedavra.checkpoint import load_model
from kedavra.diffusion.schedule import get_schedule
from kedavra.networks.minilm import load_pretrained_minilm_state
from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion, with_minilm_text_encoder
from kedavra.training.checkpointing import EXPORT_FILE
from kedavra.training.config import TrainConfig, check_schedule_fits, stream_seed


def model_config_for(config: TrainConfig, vae_config=None) -> ModelConfig:
    """The ModelConfig a run from scratch trains: the preset at the run's image size, prediction type and schedule
    (a zero-terminal-SNR schedule with trailing timestep spacing), with the trained VAE's config (its scaling
    factor) where one is given, MiniLM as the text side, CoordConv's coordinate inputs and a bidirectional
    text encoder where asked."""
    preset = PRESETS[config.preset]
    if config.text_encoder == "minilm":
        preset = with_minilm_text_encoder(preset)
    if config.coord_channels:
        preset = dataclasses.replace(preset, unet=dataclasses.replace(preset.unet, coord_channels=True))
    if config.bidirectional_text:
        preset = dataclasses.replace(preset, text_encoder=dataclasses.replace(preset.text_encoder, causal=False))
    schedule = get_schedule(config.schedule_name)
    # Lin et al. 2023, sec. 3.3: with zero terminal SNR, sampling starts at the last timestep, where x_T is pure noise
    spacing, offset = ("trailing", 0) if schedule.zero_terminal_snr else (preset.spacing, preset.steps_offset)
    return dataclasses.replace(
        preset,
        image_size=config.image_size,
        prediction_type=config.model_config_prediction,
        schedule=schedule,
        spacing=spacing,
        steps_offset=offset,
        vae=vae_config if vae_config is not None else preset.vae,
    )


def build_model(config: TrainConfig) -> StableDiffusion:
    """The model a stage's run starts from: the init model (fine-tuning), or a fresh one, its initial weights drawn
    from the run's seed (the global RNG is forked, so the caller's is untouched), with the trained VAE's weights
    where `config.vae` names one (a unet run), and MiniLM's pretrained ones where it is the text encoder."""
    if config.init is not None:
        return _load_init(config)
    trained_vae = _load_trained_vae(config) if config.vae is not None else None
    model_config = model_config_for(config, trained_vae.config if trained_vae is not None else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(config.seed, "init"))
        model = StableDiffusion(model_config)
    if trained_vae is not None:
        model.vae.load_state_dict(trained_vae.state_dict())
    if config.text_encoder == "minilm":
        model.text_encoder.load_state_dict(load_pretrained_minilm_state())
    return model


def _load_trained_vae(config: TrainConfig):
    path = Path(config.vae)
    if path.is_dir() and (path / EXPORT_FILE).is_file():  # a vae-stage run folder
        path = path / EXPORT_FILE
    if not path.exists():
        raise ValueError(f"vae {config.vae!r}: no such file; give the {EXPORT_FILE} of a vae-stage run")
    vae = load_model(path).vae
    expected = PRESETS[config.preset].vae
    if dataclasses.replace(vae.config, scaling_factor=expected.scaling_factor) != expected:
        raise ValueError(f"the VAE in {str(path)!r} is not the {config.preset!r} preset's VAE: "
                         f"{vae.config} != {expected}")
    return vae


def _load_init(config: TrainConfig) -> StableDiffusion:
    """The init model, read by kedavra.checkpoint.load_model (whose error names an unreadable file), with the
    config's prediction type and schedule where it names them."""
    model = load_model(resolve_model(config.init))
    if model.config.inpainting:
        channels = model.config.unet.in_channels
        raise ValueError(f"init {config.init!r} is an inpainting model (its U-Net takes {channels} input channels: "
                         "latents, mask, masked image); training supports text-to-image models")
    if model.config.micro_conditioning and model.config.text_encoder_2 is None:
        raise ValueError(f"init {config.init!r} is an SDXL model ({model.config.family}), a refiner; kedavra train "
                         "fine-tunes SD 1.x / 2.x-style models and SDXL base models, not the refiner")
    if model.config.micro_conditioning and config.lora_rank is None and not config.fsdp:
        raise ValueError(f"init {config.init!r} is an SDXL model ({model.config.family}); kedavra train fine-tunes "
                         "SD 1.x / 2.x-style models whole, and an SDXL base model through a LoRA (--lora RANK) or "
                         "whole with --fsdp under torchrun: its U-Net's 2.6 B parameters take about 52 GB of fp32 "
                         "weights, gradients, AdamW moments and EMA, which FSDP2 shares out over the processes "
                         "(docs/scaling.md)")
    model.config = finetune_model_config(config, model.config)
    return model


def finetune_model_config(config: TrainConfig, loaded: ModelConfig) -> ModelConfig:
    """The ModelConfig a fine-tune trains and saves: the loaded one, with `prediction_type` and `schedule`
    replaced where the config names them."""
    changed = dataclasses.replace(
        loaded,
        prediction_type=config.prediction_type or loaded.prediction_type,
        schedule=get_schedule(config.schedule) if config.schedule is not None else loaded.schedule,
    )
    named = f"schedule {config.schedule!r}" if config.schedule is not None else f"init {config.init!r}'s schedule"
    check_schedule_fits(changed.schedule, named, changed.prediction_type)
    return changed


def resolved_config(config: TrainConfig, model_config: ModelConfig) -> TrainConfig:
    """`config` with the fields a fine-tune takes from its model filled in (image_size) and checked against the
    model (`model_config`: the init model's, or the resumed checkpoint's, which keeps it)."""
    if config.init is None:
        return config
    size = config.image_size if config.image_size is not None else model_config.image_size
    factor = model_config.vae.downsample_factor
    if size % factor:
        raise ValueError(f"image_size must be a multiple of {factor} (the downsampling factor of init "
                         f"{config.init!r}'s VAE), got {size}")
    return dataclasses.replace(config, image_size=size)


def model_from_state(model_config: ModelConfig, state: dict[str, Tensor]) -> StableDiffusion:
    """A model holding copies of the tensors in `state` (a full state dict), built without random init."""
    with torch.device("meta"):
        model = StableDiffusion(model_config)
    model.load_state_dict({name: tensor.detach().cpu().clone() for name, tensor in state.items()}, assign=True)
    return model.eval()
