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

from kedavra.api import choose_model, model_identity  # noqa: F401  (until serving builds requests)
from kedavra.diffusion.samplers import SamplerSpec
from kedavra.formats.png_info import GenerationParameters
from kedavra.pipeline.device import check_device  # noqa: F401
from kedavra.pipeline.infotext import (  # noqa: F401
    AUTOMATIC_KARRAS,
    DEFAULT_SCHEDULES,
    ETA_KEY,
    GUIDANCE_RESCALE_KEY,
    KARRAS_SCHEDULE,
    schedule_karras,
)
from kedavra.pipeline.pipeline import MAX_IMAGES, MAX_SEED, MAX_SIDE


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
