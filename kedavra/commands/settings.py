"""One generation's settings, checked, and what the CLI (`kedavra generate`) and the server (`kedavra serve`) share.

    Settings(prompt, negative_prompt, steps, sampler, karras, cfg_scale, guidance_rescale, eta, seed, width,
             height, num_images, strength).parameters(seed, width, height, model, model_hash_) -> GenerationParameters

Also A1111's "Schedule type" values and the one rule that turns one into Karras σ spacing (`schedule_karras`),
A1111's "Model" / "Model hash" of a checkpoint (`model_identity`), and the --model and --device choices both
commands take (`choose_model`, `check_device`). The layers above import this module; it imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kedavra.api import DEFAULT_MODEL, EMBEDDED_DIR, embedded_models
from kedavra.diffusion.samplers import SamplerSpec
from kedavra.formats.png_info import GenerationParameters, model_hash
from kedavra.pipeline.pipeline import MAX_IMAGES, MAX_SEED, MAX_SIDE

KARRAS_SCHEDULE = "Karras"  # A1111's "Schedule type" value for Karras σ spacing
# A1111 (v1.9 on) writes a "Schedule type" always; these two mean the sampler's own: the model's spacing, except
# that its 'DPM++ 2M' defaults to Karras (modules/sd_samplers_kdiffusion.py: {'scheduler': 'karras'}).
DEFAULT_SCHEDULES = ("Automatic", "Uniform")
AUTOMATIC_KARRAS = ("dpmpp_2m",)
ETA_KEY = "Eta DDIM"  # A1111 (modules/sd_samplers_compvis.py) writes DDIM's η under this key when it is not 0
GUIDANCE_RESCALE_KEY = "CFG rescale"  # SD.Next's key for Lin et al. 2023's φ (A1111 itself has no such option)
# The weight files of a diffusers folder's U-Net, in the order kedavra.checkpoint reads them.
UNET_WEIGHT_NAMES = tuple(f"diffusion_pytorch_model{variant}{suffix}"
                          for variant in ("", ".fp16") for suffix in (".safetensors", ".bin"))


@dataclass(frozen=True)
class Settings:
    """One run's generation settings, resolved from the flags, a --from-png file and the defaults.

    width / height None: the init image's, else the model's image size. strength: None for text to image."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: SamplerSpec
    karras: bool
    cfg_scale: float
    guidance_rescale: float
    eta: float
    seed: int | None
    width: int | None
    height: int | None
    num_images: int
    strength: float | None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        for name in ("width", "height"):
            side = getattr(self, name)
            if side is not None and not 1 <= side <= MAX_SIDE:
                raise ValueError(f"--{name} must be from 1 to {MAX_SIDE} pixels (and a multiple of the model's "
                                 f"VAE factor, 8 for SD), got {side}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"--guidance-rescale must be in [0, 1], got {self.guidance_rescale}")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"--eta must be a finite number >= 0, got {self.eta}")
        if self.eta and self.sampler.name != "ddim":
            raise ValueError(f"--eta {self.eta} applies only to the ddim sampler, not {self.sampler.name}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be from 0 to {MAX_SEED}, got {self.seed}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"--num-images must be from 1 to {MAX_IMAGES}, got {self.num_images}")
        if self.strength is not None and not 0 <= self.strength <= 1:
            raise ValueError(f"--strength must be in [0, 1], got {self.strength}")
        self.parameters(seed=0, width=1, height=1, model=None, model_hash_=None)  # PNG text must hold it

    def parameters(self, seed: int, width: int, height: int, model: str | None,
                   model_hash_: str | None) -> GenerationParameters:
        """What goes into the PNG of the image with this seed."""
        extra = {}
        if self.guidance_rescale:
            extra[GUIDANCE_RESCALE_KEY] = repr(float(self.guidance_rescale))
        if self.eta:
            extra[ETA_KEY] = repr(float(self.eta))
        return GenerationParameters(
            prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
            sampler=self.sampler.a1111 or self.sampler.name, schedule_type=KARRAS_SCHEDULE if self.karras else None,
            cfg_scale=self.cfg_scale, seed=seed, width=width, height=height, model_hash=model_hash_, model=model,
            denoising_strength=self.strength, extra=extra)


def schedule_karras(schedule_type: str, sampler: SamplerSpec, karras_from_name: bool) -> bool:
    """Whether A1111's "Schedule type" `schedule_type` (its label: "Karras", "Automatic", ...) means Karras σ
    spacing for `sampler`: "Karras" does, and "Automatic" (the sampler's own) does for AUTOMATIC_KARRAS; any
    other keeps what the sampler's name said (`karras_from_name`, e.g. from "DPM++ 2M Karras")."""
    automatic_karras = schedule_type == DEFAULT_SCHEDULES[0] and sampler.name in AUTOMATIC_KARRAS
    return karras_from_name or schedule_type == KARRAS_SCHEDULE or automatic_karras


def model_identity(path: Path) -> tuple[str, str | None]:
    """(A1111's "Model": the file stem or folder name, "Model hash": AutoV2 of the file, or for a diffusers folder
    of its U-Net weights file; None when the U-Net is sharded over several files)."""
    if path.is_file():
        return path.stem, model_hash(path)
    for name in UNET_WEIGHT_NAMES:
        if (path / "unet" / name).is_file():
            return path.name, model_hash(path / "unet" / name)
        if (path / "unet" / f"{name}.index.json").is_file():
            return path.name, None
    return path.name, None


def choose_model(flag: str | None, png: GenerationParameters | None) -> str:
    """--model, else the PNG's model when it is an embedded one, else the embedded default (kedavra-shapes)."""
    if flag is not None:
        return flag
    embedded = embedded_models()
    if png is not None and png.model in embedded:
        return png.model
    if DEFAULT_MODEL in embedded:
        return DEFAULT_MODEL
    if embedded:
        return next(iter(embedded))
    raise ValueError(f"no model given and no embedded model found in {EMBEDDED_DIR} (the installation lacks its "
                     "assets): pass --model PATH (an SD 1.x / 2.x .safetensors or .ckpt file, or a diffusers folder)")


def check_device(name: str | None) -> torch.device | None:
    """--device as a torch.device, refusing one this machine lacks."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; e.g. cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA GPU here ({torch.cuda.device_count()} found)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple GPU) is not available here")
    return device
