"""Text to image (and image to image): the only module that knows every part.

    prompt -> tokenizer -> text encoder -> context (B, L, D)
    seed -> noise z (B, C, h, w) -> sampler driving the U-Net with classifier-free guidance -> latents
    latents -> VAE decoder -> image

Classifier-free guidance (Ho and Salimans 2022, eq. 6): the U-Net runs on the conditional and the
unconditional (negative-prompt) context in one batch, and the prediction is
    ε̃ = ε(x_t, ∅) + w (ε(x_t, c) - ε(x_t, ∅)),   w = guidance_scale
(the same combination applies to v-predictions). w = 1 is the conditional model alone.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kedavra.model import StableDiffusion
from kedavra.samplers import resolve_sampler, sample
from kedavra.timesteps import check_steps

MAX_SIDE = 2048  # largest width/height accepted, in pixels: beyond it a CPU run takes hours
MAX_IMAGES = 64  # largest batch accepted in one call
MAX_SEED = 2**32 - 1  # seeds are 32-bit, as in A1111 and diffusers' examples


@dataclass
class GenerationResult:
    """What a pipeline call returns: the images, the seed of each, and the final latents."""

    images: list[Image.Image]
    seeds: list[int]
    latents: torch.Tensor


class Pipeline:
    """Generate images with a `StableDiffusion` model (see `__call__`)."""

    def __init__(self, model: StableDiffusion, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = model.config

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's and the U-Net's downsampling together."""
        return self.config.vae.downsample_factor * self.config.unet.downsample_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, L, D) text-encoder hidden states, the U-Net's cross-attention context."""
        ids = self.model.tokenizer(list(prompts)).to(self.device)
        return self.model.text_encoder(ids)

    def check_request(self, width: int, height: int, steps: int, guidance_scale: float, num_images: int,
                      seed: int | None, sampler: str) -> None:
        """Refuse bad generation settings before any heavy work, naming the value and what is allowed."""
        m = self.size_multiple
        for name, side in (("width", width), ("height", height)):
            if isinstance(side, bool) or not isinstance(side, int) or not m <= side <= MAX_SIDE or side % m:
                raise ValueError(f"{name} must be a multiple of {m} from {m} to {MAX_SIDE}, got {side!r}")
        check_steps(steps, self.config.schedule.num_train_timesteps)
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be an integer from 1 to {MAX_IMAGES}, got {num_images!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (or None for a random one), got {seed!r}")
        resolve_sampler(sampler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        steps: int = 20,
        sampler: str = "euler",
        guidance_scale: float = 7.5,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        init_image: Image.Image | torch.Tensor | None = None,
        strength: float = 0.8,
        karras: bool = False,
        eta: float = 0.0,
        callback: Callable | None = None,
    ) -> GenerationResult:
        """Generate `num_images` images for `prompt` (a list of prompts gives one image each).

        Image i uses seed + i (A1111's convention); its noise and every random draw of its sampler come
        from a CPU generator seeded with it, so a seed gives the same image on any device, and a batch the
        same images as single calls. init_image/strength: image to image (strength 1 ignores the image).
        """
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        width = self.config.image_size if width is None else width
        height = self.config.image_size if height is None else height
        self.check_request(width, height, steps, guidance_scale, len(prompts), seed, sampler)
        seed = secrets.randbelow(MAX_SEED + 1 - len(prompts)) if seed is None else seed
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(len(prompts))]
        generators = [torch.Generator().manual_seed(s) for s in seeds]

        f = self.config.vae.downsample_factor
        latent_shape = (1, self.config.vae.latent_channels, height // f, width // f)
        init_latents = None
        if init_image is not None:
            images = self._image_batch(init_image, len(prompts), width, height)
            init_latents = torch.cat([
                self.model.vae.encode_to_latents(images[i : i + 1], generator=generators[i]) for i in range(len(seeds))
            ])
        noise = torch.cat([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device, self.dtype)

        denoise = self._guided_unet(self.encode_prompts(prompts), self.encode_prompts(negatives), guidance_scale)
        latents = sample(
            denoise, noise, sampler=sampler, steps=steps, schedule=self.config.schedule,
            prediction_type=self.config.prediction_type, spacing=self.config.spacing,
            steps_offset=self.config.steps_offset, karras=karras, eta=eta, init=init_latents,
            strength=strength if init_latents is not None else 1.0, generator=generators, callback=callback,
        )
        images = self.model.vae.decode_latents(latents)
        return GenerationResult(to_pil(images), seeds, latents)

    def _guided_unet(self, context: torch.Tensor, uncond_context: torch.Tensor, guidance_scale: float):
        """The model the sampler drives: the U-Net with classifier-free guidance folded in."""
        unet = self.model.unet
        if guidance_scale == 1.0:
            return lambda x_t, t: unet(x_t, t, context)
        both = torch.cat([uncond_context, context])  # (2B, L, D): unconditional first, as diffusers orders them

        def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out_uncond, out_cond = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)  # Ho and Salimans 2022, eq. 6

        return guided

    def _image_batch(self, image, batch: int, width: int, height: int) -> torch.Tensor:
        """An init image (PIL, or a (B|1, 3, H, W) tensor in [-1, 1]) as a (B, 3, H, W) tensor in [-1, 1]."""
        if isinstance(image, Image.Image):
            tensor = from_pil(image)
        elif isinstance(image, torch.Tensor):
            tensor = image if image.ndim == 4 else image[None]
        else:
            raise ValueError(f"init_image must be a PIL image or a tensor, got {type(image).__name__}")
        if tensor.shape[-2:] != (height, width) or tensor.shape[-3] != 3:
            raise ValueError(f"init_image is {tensor.shape[-1]}x{tensor.shape[-2]} with {tensor.shape[-3]} channels; "
                             f"it must be RGB {width}x{height} (the requested size)")
        if tensor.shape[0] not in (1, batch):
            raise ValueError(f"init_image holds {tensor.shape[0]} images for a batch of {batch}; give 1 or {batch}")
        return tensor.expand(batch, -1, -1, -1).to(self.device, self.dtype)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounding to the nearest 8-bit level."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]  # (H, W, 3)


def from_pil(image: Image.Image) -> torch.Tensor:
    """An image -> (1, 3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
