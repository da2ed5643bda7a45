"""What each stage trains, built from a TrainConfig: the runs a config stands for, the model, its trainable part
and objective, and the snapshots a run saves and samples with.

    vae   trains model.vae with VAEObjective; the rest of the model is carried along untrained
    unet  trains model.unet and (unless `train_text_encoder` is off) model.text_encoder with DiffusionObjective;
          model.vae comes from the trained VAE checkpoint (`TrainConfig.vae`), or is the init model's, and stays
          frozen

From scratch the model is the preset's, drawn from the run's seed. A fine-tune (`TrainConfig.init`) loads the
model with kedavra.checkpoint.load_model and keeps its ModelConfig, only `prediction_type` and `schedule` replaced
where the config names them.

A VAE's latents reach the U-Net multiplied by `VAEConfig.scaling_factor`; LDM (sec. 4.3.2, App. D.1) sets it to
1 / (std of the latents of a batch of training data). `latent_scale` measures it for a trained VAE and every
model the vae stage saves from scratch carries it in its config, so the unet stage trains on unit-variance latents.
A fine-tuned VAE keeps the init model's factor: its U-Net was trained on latents scaled by it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from kedavra.api import resolve_model
from kedavra.checkpoint import load_model
from kedavra.diffusion.schedule import get_schedule
from kedavra.networks.minilm import load_pretrained_minilm_state
from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion, with_minilm_text_encoder
from kedavra.training.config import TrainConfig, check_schedule_fits

EXPORT_FILE = "model.safetensors"  # the finished run's EMA model, for `kedavra generate --model`
SCALE_PROBE_ITEMS = 256  # training items whose latents set the scaling factor (LDM: one batch, App. D.1)


def stage_configs(config: TrainConfig) -> list[TrainConfig]:
    """The runs `config` stands for: itself, or for stage "all" a vae run in OUT/vae and a unet run in OUT/unet
    on that VAE (fields left None take each stage's defaults). A fine-tune's unet run starts from the vae run's
    exported model: the init model with its VAE fine-tuned."""
    if config.stage != "all":
        return [config]
    out = Path(config.out_dir)
    vae = dataclasses.replace(config, stage="vae", steps=config.vae_steps, vae_steps=None, train_text_encoder=True,
                              text_encoder="clip", out_dir=str(out / "vae"))
    vae_model = str(out / "vae" / EXPORT_FILE)
    start = {"init": vae_model} if config.init is not None else {"vae": vae_model}
    unet = dataclasses.replace(config, stage="unet", vae_steps=None, out_dir=str(out / "unet"), **start)
    return [vae, unet]


def trained_components(config: TrainConfig) -> tuple[str, ...]:
    """The components the stage of `config` trains (the others are frozen)."""
    if config.stage == "vae":
        return ("vae",)
    return ("text_encoder", "unet") if config.train_text_encoder else ("unet",)


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named random stream of a run ("init", "draws", "order/3", ...), independent
    of the others: the run's seed and the stream name, hashed."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def model_config_for(config: TrainConfig, vae_config=None) -> ModelConfig:
    """The ModelConfig a stage trains: the preset at the run's image size, prediction type and schedule (a zero-
    terminal-SNR schedule with trailing timestep spacing), with the trained VAE's config (its scaling factor) for the
    unet stage, and MiniLM as the text side where asked."""
    preset = PRESETS[config.preset]
    if config.text_encoder == "minilm":
        preset = with_minilm_text_encoder(preset)
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
    from the run's seed (the global RNG is forked, so the caller's is untouched), for the unet stage with the
    trained VAE's weights, and MiniLM's pretrained ones where it is the text encoder."""
    if config.init is not None:
        return _load_init(config)
    trained_vae = _load_trained_vae(config) if config.stage == "unet" else None
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


def _load_init(config: TrainConfig) -> StableDiffusion:
    """The init model, read by kedavra.checkpoint.load_model (whose error names an unreadable file), with the
    config's prediction type and schedule where it names them."""
    model = load_model(resolve_model(config.init))
    if model.config.inpainting:
        channels = model.config.unet.in_channels
        raise ValueError(f"init {config.init!r} is an inpainting model (its U-Net takes {channels} input channels: "
                         "latents, mask, masked image); training supports text-to-image models")
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


def with_latent_scale(model_config: ModelConfig, scale: float) -> ModelConfig:
    return dataclasses.replace(model_config, vae=dataclasses.replace(model_config.vae, scaling_factor=scale))


def measures_latent_scale(config: TrainConfig) -> bool:
    """Whether the models a run saves carry a newly measured latent scale: a vae run from scratch's (a fine-tune
    keeps its model's, module docstring)."""
    return config.stage == "vae" and config.init is None


def trained_parameters(model: StableDiffusion, config: TrainConfig) -> dict[str, nn.Parameter]:
    """The parameters a stage trains, named as in the model's state dict ("unet.conv_in.weight", ...)."""
    return {f"{part}.{name}": p for part in trained_components(config)
            for name, p in getattr(model, part).named_parameters()}


def freeze_untrained(model: StableDiffusion, config: TrainConfig) -> None:
    """requires_grad and train mode on the stage's components; the others frozen, in eval mode."""
    trained = trained_components(config)
    for part in ("text_encoder", "unet", "vae"):
        module = getattr(model, part)
        module.requires_grad_(part in trained)
        module.train(part in trained)


@torch.no_grad()
def latent_scale(vae: nn.Module, images: Tensor, generator: torch.Generator) -> float | None:
    """1 / std of the posterior samples of `images` (LDM sec. 4.3.2: the latents' scale for the diffusion model),
    over the images whose latents are finite; None when there are none or they are constant."""
    z = vae.encode(images).sample(generator).float()  # (B, C, h, w)
    z = z[torch.isfinite(z).flatten(1).all(dim=1)]
    scale = 1.0 / z.std().item() if z.numel() > 1 else math.inf
    return scale if math.isfinite(scale) else None
