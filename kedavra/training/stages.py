"""Training stages as objects: what a stage trains and freezes, what a batch becomes, and its objective.

    vae   VAEStage: model.vae through VAEObjective (reconstruction + β·KL); the rest of the model is carried
          along untouched
    unet  UNetStage: model.unet, and model.text_encoder unless `train_text_encoder` is off, through
          DiffusionObjective on the latents of model.vae, frozen: the trained VAE (`TrainConfig.vae`) or the init
          model's; in a LoRA run (`TrainConfig.lora_rank`), the LoRA layers injected into them alone (every base
          weight frozen; kedavra.training.lora). An SDXL model (LoRA runs only, kedavra.training.models) conditions
          on both text encoders, the pooled text and the micro-conditioning (kedavra.training.conditioning)
    all   no object of its own: the vae run, then the unet run on the VAE just trained (`stage_configs`)

The Trainer (kedavra.training.loop) drives any Stage the same way:
    freeze_untrained(); trained_parameters()       what the optimizer and the EMA see
    objective()                                    the module a micro-batch goes through (DDP wraps it)
    prepare(progress)                              once, before the first step (the unet stage's latent cache)
    draws(B, generator)                            every random number of a global batch, in a fixed order
    inputs(indices, draws)                         a micro-batch's items and draws as the objective's arguments;
                                                   objective(**inputs)["loss"] is the per-sample loss (B,), and
                                                   `parts` name the other per-sample values it returns, logged
    log_parts(means)                               the parts' interval means as metrics.jsonl entries
    finish_snapshot(model)                         what a saved copy carries beyond its weights (the latent scale)
    sample(ema_model, path)                        the grid of a snapshot: reconstructions, or text-to-image samples

A VAE's latents reach the U-Net multiplied by `VAEConfig.scaling_factor`; LDM (sec. 4.3.2, App. D.1) sets it to
1 / (std of the latents of a batch of training data). `latent_scale` measures it for a trained VAE and every
model the vae stage saves from scratch carries it in its config, so the unet stage trains on unit-variance latents.
A fine-tuned VAE keeps the init model's factor: its U-Net was trained on latents scaled by it.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kedavra.adapters.lora_training import LoraNetwork
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.training import lora, report
from kedavra.training.batches import TokenCache, TrainingData
from kedavra.training.checkpointing import EXPORT_FILE
from kedavra.training.conditioning import TextConditionedUNet
from kedavra.training.config import TIMESTEP_DEFAULTS, TrainConfig, stream_seed
from kedavra.training.losses import DiffusionObjective, VAEObjective
from kedavra.training.precision import autocast
from kedavra.training.timestep_sampling import sample_timesteps, timestep_range

COMPONENTS = ("text_encoder", "unet", "vae")  # the parts of a StableDiffusion a stage trains or freezes
SCALE_PROBE_ITEMS = 256  # training items whose latents set the scaling factor (LDM: one batch, App. D.1)
CACHE_CHUNK = 128  # images per VAE encoder call when the latent cache is filled
RECONSTRUCTION_ITEMS = 8  # originals shown in the vae stage's reconstruction grids


def stage_configs(config: TrainConfig) -> list[TrainConfig]:
    """The runs `config` stands for: itself, or for stage "all" a vae run in OUT/vae and a unet run in OUT/unet
    on that VAE (fields left None take each stage's defaults). A fine-tune's unet run starts from the vae run's
    exported model: the init model with its VAE fine-tuned."""
    if config.stage != "all":
        return [config]
    out = Path(config.out_dir)
    vae = dataclasses.replace(config, stage="vae", steps=config.vae_steps, vae_steps=None, train_text_encoder=True,
                              text_encoder="clip", coord_channels=False, bidirectional_text=False, **TIMESTEP_DEFAULTS,
                              out_dir=str(out / "vae"))
    vae_model = str(out / "vae" / EXPORT_FILE)
    start = {"init": vae_model} if config.init is not None else {"vae": vae_model}
    unet = dataclasses.replace(config, stage="unet", vae_steps=None, out_dir=str(out / "unet"), **start)
    return [vae, unet]


def make_stage(config: TrainConfig, model: StableDiffusion, data: TrainingData, device: torch.device) -> Stage:
    """The Stage object of `config.stage` ("vae" or "unet": stage "all" is run as its two, see stage_configs)."""
    return STAGE_TYPES[config.stage](config, model, data, device)


class Stage(ABC):
    """One stage of a run over `model` (on `device`) and `data`; see the module docstring for how it is driven."""

    name: ClassVar[str]
    # per-sample values the objective returns beside "loss", logged: fixed per stage, or per run (UNetStage)
    parts: tuple[str, ...] = ()

    def __init__(self, config: TrainConfig, model: StableDiffusion, data: TrainingData, device: torch.device):
        self.config, self.model, self.data, self.device = config, model, data, device
        self.lora: LoraNetwork | None = None  # the injected LoRA layers of a LoRA run (UNetStage)

    @property
    @abstractmethod
    def trained_components(self) -> tuple[str, ...]:
        """The components of the model the stage trains (of COMPONENTS, and SDXL's text_encoder_2); the others are
        frozen. In a LoRA run: the components whose LoRA layers train."""

    @property
    def components(self) -> tuple[str, ...]:
        """The model's components: COMPONENTS, and SDXL's second text encoder where the model has one."""
        return COMPONENTS if self.model.text_encoder_2 is None else (*COMPONENTS, "text_encoder_2")

    def freeze_untrained(self) -> None:
        """requires_grad and train mode on the trained components; the others frozen, in eval mode. In a LoRA run
        every base weight is frozen and only the LoRA layers' parameters require grad."""
        for part in self.components:
            module = getattr(self.model, part)
            module.requires_grad_(part in self.trained_components and self.lora is None)
            module.train(part in self.trained_components)
        if self.lora is not None:
            for parameter in self.lora.named_parameters().values():
                parameter.requires_grad_(True)

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the stage trains, named as in the model's state dict ("unet.conv_in.weight", ...; a LoRA
        run's "unet.<layer>.lora_down.weight", ...)."""
        if self.lora is not None:
            return self.lora.named_parameters()
        return {f"{part}.{name}": p for part in self.trained_components
                for name, p in getattr(self.model, part).named_parameters()}

    @abstractmethod
    def objective(self) -> nn.Module:
        """The module a micro-batch goes through: forward(**inputs) -> {"loss": (B,), *parts: (B,)}."""

    def prepare(self, progress: bool) -> None:  # noqa: B027 (a hook: nothing by default)
        """Work done once before the first step (after the model and the training state are in place)."""

    @abstractmethod
    def draws(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Every random number of a global batch of `batch` items, drawn from `generator` in a fixed order, each
        with the batch as its first dimension (so a micro-batch takes its rows)."""

    @abstractmethod
    def inputs(self, indices: Tensor, draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """The objective's arguments, on the device, for the items `indices` and their rows of the draws."""

    def log_parts(self, means: dict[str, float]) -> dict[str, float]:
        """The metrics.jsonl entries for the parts' means over a log interval (by default the means themselves)."""
        return dict(means)

    def finish_snapshot(self, model: StableDiffusion) -> None:  # noqa: B027 (a hook: nothing by default)
        """Complete a saved copy of the model (a CPU copy of the trained or the EMA weights) before it is written."""

    @abstractmethod
    def sample(self, ema_model: StableDiffusion, path: Path) -> None:
        """Write the sample grid of `ema_model` (a snapshot of the EMA weights) to `path`."""

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the latents of `batch` training images."""
        vae, size = self.model.config.vae, self.config.image_size
        return (batch, vae.latent_channels, size // vae.downsample_factor, size // vae.downsample_factor)


class VAEStage(Stage):
    """The KL autoencoder alone, on images: per-sample reconstruction error + β·KL (VAEObjective)."""

    name = "vae"
    parts = ("recon", "kl")

    @property
    def trained_components(self) -> tuple[str, ...]:
        return ("vae",)

    def objective(self) -> nn.Module:
        return VAEObjective(self.model.vae, self.config.recon_loss, self.config.kl_weight)

    def draws(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"posterior": torch.randn(self.latent_shape(batch), generator=generator)}  # ε of z = μ + σ·ε

    def inputs(self, indices: Tensor, draws: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"images": self.data.images(indices).to(self.device), "noise": draws["posterior"].to(self.device)}

    def log_parts(self, means: dict[str, float]) -> dict[str, float]:
        """recon and kl, and kl_term = β·KL/D, the KL's share of the loss (kedavra.training.losses)."""
        return {**means, "kl_term": self.config.kl_weight * means["kl"] / (3 * self.config.image_size**2)}

    def finish_snapshot(self, model: StableDiffusion) -> None:
        """From scratch, the measured latent scale into the copy's config (module docstring); a fine-tune keeps
        its model's. While no latent is finite yet the config keeps its scale."""
        if self.config.init is not None:
            return
        probe = self.data.images(range(min(self.data.size, SCALE_PROBE_ITEMS)))
        generator = torch.Generator().manual_seed(stream_seed(self.config.seed, "scale"))
        scale = latent_scale(model.vae, probe, generator)
        if scale is not None:
            model.config = with_latent_scale(model.config, scale)
            model.vae.config = model.config.vae

    def sample(self, ema_model: StableDiffusion, path: Path) -> None:
        """Originals above their reconstructions."""
        images = self.data.images(range(min(self.data.size, RECONSTRUCTION_ITEMS)))
        report.reconstruction_grid(ema_model, images, path, self.device)


class UNetStage(Stage):
    """The U-Net (and the text encoder, where it trains) on the frozen VAE's latents: per-sample min-SNR-γ
    weighted ε or v loss (DiffusionObjective). A batch becomes x_0 = (μ + σ·ε) · scaling_factor from the VAE's
    posterior (cached once per run with `latent_cache`), with its t, ε and captions (the empty one where the
    caption-dropout coin says so)."""

    name = "unet"

    def __init__(self, config: TrainConfig, model: StableDiffusion, data: TrainingData, device: torch.device):
        super().__init__(config, model, data, device)
        self.parts = ("layout",) if config.layout_loss is not None else ()  # the layout term, logged beside the loss
        self.tokens = TokenCache(model.tokenizer)
        self.tokens_2 = TokenCache(model.tokenizer_2) if model.tokenizer_2 is not None else None  # SDXL's bigG
        self.latents: tuple[Tensor, Tensor] | None = None  # the posteriors' (mean, std), each (N, C, h, w)
        self.prompts: list[str] | None = None
        if config.lora_rank is not None:
            self.lora = lora.inject(config, model)
        self.timesteps = timestep_range(config, model.config.schedule.num_train_timesteps)

    @property
    def trained_components(self) -> tuple[str, ...]:
        if not self.config.train_text_encoder:
            return ("unet",)
        encoders = ("text_encoder",) if self.model.text_encoder_2 is None else ("text_encoder", "text_encoder_2")
        return (*encoders, "unet")

    def objective(self) -> nn.Module:
        model = self.model
        model.unet.enable_gradient_checkpointing(self.config.gradient_checkpointing)
        denoiser = TextConditionedUNet(model.text_encoder, model.unet, model.text_encoder_2)
        return DiffusionObjective(denoiser, model.config.schedule.alpha_bar, model.config.prediction_type,
                                  self.config.min_snr_gamma, self.config.min_snr_floor, self.config.layout_loss,
                                  self.config.layout_grid)

    def prepare(self, progress: bool) -> None:
        if self.config.latent_cache:
            self.latents = self._encode_all(progress)

    @torch.no_grad()
    def _encode_all(self, progress: bool) -> tuple[Tensor, Tensor]:
        """The frozen VAE's posterior (mean, std) of every item, each (N, C, h, w): encoded once, sampled every
        step with fresh ε (the same distribution as encoding each batch, at a fraction of the cost)."""
        means, stds = [], []
        starts = range(0, self.data.size, CACHE_CHUNK)
        for start in tqdm(starts, desc="encoding latents", unit="chunk", disable=not progress, dynamic_ncols=True):
            indices = range(start, min(start + CACHE_CHUNK, self.data.size))
            images = self.data.images(indices).to(self.device)
            self.data.captions(indices)
            with autocast(self.config.precision, self.device):
                posterior = self.model.vae.encode(images)
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
        return torch.cat(means), torch.cat(stds)

    def draws(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        shape = self.latent_shape(batch)
        return {
            "t": sample_timesteps(self.config, *self.timesteps, batch, generator),
            "noise": torch.randn(shape, generator=generator),
            "drop": torch.rand(batch, generator=generator) < self.config.caption_dropout,
            "posterior": torch.randn(shape, generator=generator),
        }

    def inputs(self, indices: Tensor, draws: dict[str, Tensor]) -> dict[str, Tensor]:
        device = self.device
        if self.latents is not None:
            mean, std = (cached[indices].to(device) for cached in self.latents)
        else:
            with torch.no_grad(), autocast(self.config.precision, device):
                posterior = self.model.vae.encode(self.data.images(indices).to(device))
            mean, std = posterior.mean.float(), posterior.std.float()
        z = mean + std * draws["posterior"].to(device)  # Kingma and Welling 2014, eq. 10
        captions = ["" if drop else c for c, drop in zip(self.data.captions(indices), draws["drop"], strict=True)]
        inputs = {"x0": z * self.model.config.vae.scaling_factor, "noise": draws["noise"].to(device),
                  "t": draws["t"].to(device), "input_ids": self.tokens(captions).to(device)}
        if self.tokens_2 is not None:
            inputs |= {"input_ids_2": self.tokens_2(captions).to(device), "time_ids": self.time_ids(len(captions))}
        return inputs

    def time_ids(self, batch: int) -> Tensor:
        """(B, 6) SDXL micro-conditioning (Podell et al. 2023, sec. 2.2; diffusers' _get_add_time_ids order):
        original size (h, w), crop top-left (0, 0), target size (h, w), all the training size: the data sets give
        whole images at that size."""
        size = float(self.config.image_size)
        return torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device).expand(batch, -1)

    def sample(self, ema_model: StableDiffusion, path: Path) -> None:
        """Text-to-image samples of the sample prompts: the config's, or the data's first distinct captions."""
        if self.prompts is None:
            self.prompts = list(self.config.sample_prompts) or self.data.sample_prompts()
        report.sample_grid(ema_model, self.prompts, path, self.device)


STAGE_TYPES: dict[str, type[Stage]] = {stage.name: stage for stage in (VAEStage, UNetStage)}


def with_latent_scale(model_config: ModelConfig, scale: float) -> ModelConfig:
    return dataclasses.replace(model_config, vae=dataclasses.replace(model_config.vae, scaling_factor=scale))


@torch.no_grad()
def latent_scale(vae: nn.Module, images: Tensor, generator: torch.Generator) -> float | None:
    """1 / std of the posterior samples of `images` (LDM sec. 4.3.2: the latents' scale for the diffusion model),
    over the images whose latents are finite; None when there are none or they are constant."""
    z = vae.encode(images).sample(generator).float()  # (B, C, h, w)
    z = z[torch.isfinite(z).flatten(1).all(dim=1)]
    scale = 1.0 / z.std().item() if z.numel() > 1 else math.inf
    return scale if math.isfinite(scale) else None
