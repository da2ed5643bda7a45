"""The LoRA side of a run (`TrainConfig.lora_rank`): the LoRA injected into the model the run loads, the metadata its
files carry, and the fingerprint that ties a checkpoint to its base model.

kedavra.adapters.lora_training holds the layers and the kohya file format; this module knows the run. The metadata
is what kohya's sd-scripts (train_network.py, library/sai_model_spec.py) writes, so A1111's and ComfyUI's LoRA
browsers show a kedavra LoRA as they show one of kohya's: `ss_network_module`, `ss_network_dim`, `ss_network_alpha`,
`ss_base_model_version` and the `modelspec.*` architecture where the base model is a known SD release, and the
training settings (learning rate, steps, batch, resolution, ...); besides, kedavra's own TrainConfig as JSON.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from pathlib import Path

import torch

from kedavra.adapters.lora_training import LoraNetwork, inject_lora, save_lora
from kedavra.networks.model import ModelConfig
from kedavra.training.checkpointing import atomic_write
from kedavra.training.config import TrainConfig, stream_seed
from kedavra.training.optim import ADAM_BETAS

NETWORK_MODULE = "networks.lora"  # kohya's --network_module for LoRA / LoCon (networks/lora.py)
MODEL_SPEC_VERSION = "1.0.0"  # Stability AI's ModelSpec (modelspec.sai_model_spec)
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # sai_model_spec IMPL_STABILITY_AI
# kedavra family -> kohya's ss_base_model_version before the v-prediction suffix: model_util's
# get_model_version_str_for_sd1_sd2 (sd_v1, sd_v2, + "_v" for v-prediction), sdxl_model_util's
# MODEL_VERSION_SDXL_BASE_V1_0. Other families (kedavra's own) have no such names.
BASE_MODEL_VERSIONS = {"sd15": "sd_v1", "sd21-base": "sd_v2", "sd21": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# sai_model_spec's ARCH_* ids, by base version and v-prediction (its determine_architecture)
ARCHITECTURES = {("sd_v1", False): "stable-diffusion-v1", ("sd_v1", True): "stable-diffusion-v1",
                 ("sd_v2", False): "stable-diffusion-v2-512", ("sd_v2", True): "stable-diffusion-v2-768-v",
                 ("sdxl_base_v1-0", False): "stable-diffusion-xl-v1-base",
                 ("sdxl_base_v1-0", True): "stable-diffusion-xl-v1-base"}


def inject(config: TrainConfig, model) -> LoraNetwork:
    """The run's LoRA layers in `model`, their down projections drawn from the run's "lora" stream."""
    generator = torch.Generator().manual_seed(stream_seed(config.seed, "lora"))
    return inject_lora(model, config.lora_rank, config.lora_alpha, text_encoder=config.lora_text_encoder,
                       conv=config.lora_conv, dropout=config.lora_dropout, generator=generator)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of `model`'s state dict (name, dtype, shape, bytes): a LoRA checkpoint holds no
    base weights, so a resume compares this to be sure it trains on the same base (about 3 s for SD 1.5 here)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def base_model_metadata(model_config: ModelConfig, image_size: int, title: str, date: str) -> dict[str, str]:
    """kohya's base-model keys and the ModelSpec ones, where the family is a known SD release (else none: ModelSpec
    requires an architecture id)."""
    base = BASE_MODEL_VERSIONS.get(model_config.family)
    if base is None:
        return {}
    v = model_config.prediction_type == "v"  # a fine-tune may have changed it (--prediction-type)
    sdxl = model_config.family == "sdxl"
    return {
        "ss_base_model_version": base + ("_v" if v and not sdxl else ""),
        "ss_v2": str(base == "sd_v2"),
        "modelspec.sai_model_spec": MODEL_SPEC_VERSION,
        "modelspec.architecture": f"{ARCHITECTURES[base, v]}/lora",
        "modelspec.implementation": SDXL_IMPLEMENTATION if sdxl else "diffusers",
        "modelspec.title": title,
        "modelspec.date": date,
        "modelspec.resolution": f"{image_size}x{image_size}",
        "modelspec.prediction_type": "v" if v else "epsilon",
    }


def lora_metadata(config: TrainConfig, model_config: ModelConfig, *, step: int, epoch: int, data_size: int,
                  batches_per_epoch: int, world_size: int, started_at: float, weights: str) -> dict[str, str]:
    """Every metadata entry of a LoRA file the run writes at `step` (module docstring); `weights` says which
    ("trained", or "EMA ...")."""
    now = datetime.datetime.now(datetime.UTC)
    size = config.image_size
    metadata = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_network_dropout": str(config.lora_dropout) if config.lora_dropout else "None",
        "ss_sd_model_name": Path(config.init).name,
        "ss_output_name": Path(config.out_dir).name,
        "ss_training_comment": f"kedavra train --lora {config.lora_rank}; {weights} weights",
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(now.timestamp()),
        "ss_learning_rate": str(config.lr),
        "ss_unet_lr": str(config.lr),
        "ss_lr_scheduler": config.lr_schedule,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_train_images": str(data_size),
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_num_epochs": str(math.ceil(config.steps / batches_per_epoch)),
        "ss_batch_size_per_device": str(config.batch_size // (config.accumulation * world_size)),
        "ss_total_batch_size": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.accumulation),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": "bf16" if config.precision == "bf16" else "no",
        "ss_resolution": f"({size}, {size})",
        "ss_seed": str(config.seed),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_max_grad_norm": str(config.grad_clip),
        "ss_cache_latents": str(config.latent_cache),
        "ss_zero_terminal_snr": str(model_config.schedule.zero_terminal_snr),
        "ss_optimizer": f"torch.optim.adamw.AdamW(weight_decay={config.weight_decay},betas={ADAM_BETAS})",
        "kedavra.weights": weights,
        "kedavra.model_family": model_config.family,
        "kedavra.train_config": json.dumps(config.to_dict()),
    }
    if config.lora_text_encoder:
        metadata["ss_text_encoder_lr"] = str(config.lr)
    if config.lora_conv:  # kohya's network_args for LoCon: the conv layers' rank and alpha (here the same)
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(config.lora_rank),
                                                  "conv_alpha": str(config.lora_alpha)})
    metadata |= base_model_metadata(model_config, size, Path(config.out_dir).name, now.date().isoformat())
    return metadata


def write_lora(path: Path, network: LoraNetwork, values: dict[str, torch.Tensor] | None,
               metadata: dict[str, str]) -> Path:
    """The LoRA (`values` by parameter name, default the current weights) as a kohya .safetensors at `path`,
    written atomically."""
    state = network.kohya_state_dict(values)
    return atomic_write(path, lambda partial: save_lora(partial, state, metadata))
