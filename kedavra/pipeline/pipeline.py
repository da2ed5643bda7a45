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

from kedavra.diffusion.samplers import resolve_sampler, sample
from kedavra.diffusion.timesteps import check_steps
from kedavra.networks.acceleration import optimize_for_inference
from kedavra.networks.model import StableDiffusion
from kedavra.networks.vae import Tiling
from kedavra.pipeline.device import default_device, default_dtype, parse_precision
from kedavra.pipeline.prompt_weighting import encode_prompt_pairs

MAX_SIDE = 2048  # largest width/height accepted, in pixels: beyond it a CPU run takes hours
MAX_IMAGES = 64  # largest batch accepted in one call
MAX_SEED = 2**32 - 1  # seeds are 32-bit, as in A1111 and diffusers' examples
# Images larger than this on a side go through the VAE in 512-pixel tiles (diffusers' enable_vae_tiling sizes),
# which bounds the decoder's activation memory; smaller ones are processed whole, exactly.
VAE_TILING = Tiling(tile_size=512, overlap=128, threshold=1024)
DEFAULT_IMG2IMG_STRENGTH = 0.8  # share of the steps run from the noised init image (A1111's and diffusers' 0.75-0.8)
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting starts the painted region from pure noise


@dataclass
class GenerationResult:
    """What a pipeline call returns: the images, the seed of each, and the final latents."""

    images: list[Image.Image]
    seeds: list[int]
    latents: torch.Tensor


class Pipeline:
    """Generate images with a `StableDiffusion` model (see `__call__`)."""

    def __init__(self, model: StableDiffusion, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, optimize: bool = True):
        """device: "cpu", "cuda", ... (default: CUDA if present); dtype: "fp32", "bf16", "fp16" or a torch dtype
        (default: bf16 where the hardware runs it natively, e.g. a CPU with AMX, else fp32). The samplers'
        arithmetic stays in fp32 whatever the networks run in.
        optimize: on a CPU, keep the U-Net's and the VAE's conv and linear weights in oneDNN's packed layout
        (kedavra.networks.acceleration): the same images (bitwise, or within a bf16 rounding step at a few elements),
        U-Net steps 1.1-1.8x faster for SD 1.5 at 256-512 px, and one more copy of those weights in memory
        (1.7 GiB for SD 1.5 in bf16); docs/benchmark.md. The model is changed in place, as `.to()` already is."""
        if not isinstance(optimize, bool):
            raise ValueError(f"optimize must be True or False, got {optimize!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_precision(dtype) or default_dtype(self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.device.type == "cpu":  # oneDNN's convolutions run fastest on channels-last activations
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.vae.to(memory_format=torch.channels_last)
        if optimize:  # a no-op off the CPU
            for part in (self.model.unet, self.model.vae):
                optimize_for_inference(part, self.device, self.dtype)
        self.config = model.config

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's downsampling factor (8 for SD), one latent cell.
        The U-Net takes any latent size (it resizes its up path to its skips, as diffusers' U-Net does)."""
        return self.config.vae.downsample_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str], clip_skip: int | None = None):
        """(context, negative context), each (B, 77·k, D): the text encoder's hidden states for the prompts and
        the negative prompts (the unconditional side of guidance), with A1111's emphasis syntax "(word:1.3)",
        "[word]", BREAK, and prompts longer than 75 tokens in chunks of 77 (see kedavra.pipeline.prompt_weighting).
        Plain prompts of up to 75 tokens give exactly text_encoder(tokenizer(prompt))."""
        return encode_prompt_pairs(self.model.tokenizer, self.model.text_encoder, list(prompts), list(negative_prompts),
                                   clip_skip=clip_skip)

    def check_request(self, width: int, height: int, steps: int, guidance_scale: float, num_images: int,
                      seed: int | None, sampler: str) -> None:
        """Refuse bad generation settings before any heavy work, naming the value and what is allowed."""
        m = self.size_multiple
        for name, side in (("width", width), ("height", height)):
            if isinstance(side, bool) or not isinstance(side, int) or not m <= side <= MAX_SIDE or side % m:
                raise ValueError(f"{name} must be a multiple of {m} (the VAE's downsampling factor) from {m} to "
                                 f"{MAX_SIDE}, got {side!r}")
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
        strength: float | None = None,
        mask: Image.Image | torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        karras: bool = False,
        eta: float = 0.0,
        callback: Callable | None = None,
    ) -> GenerationResult:
        """Generate `num_images` images for `prompt` (a list of prompts gives one image each).

        Image i uses seed + i (A1111's convention); its noise and every random draw of its sampler come
        from a CPU generator seeded with it, so a seed gives the same image on any device, and a batch the
        same images as single calls.
        init_image, strength: image to image; strength (default 0.8, or 1.0 with a mask) is the fraction of the
            steps run from the noised image (1 starts from pure noise).
        mask: inpainting (needs init_image): white (>= 0.5) where to paint, black where to keep the image; an
            inpainting model (9-channel U-Net) sees the mask and the masked image, any other model has the kept
            region put back after every step.
        guidance_rescale: φ of Lin et al. 2023 (sec. 3.4, eq. 15-16): rescale the guided prediction's std to the
            conditional one's and mix by φ; 0.7 is their choice for v-prediction and zero-terminal-SNR models.
        clip_skip: take the text encoder's output that many layers from the end (A1111's "Clip skip"; default
            the model's own, 1 = the last layer).
        """
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be an integer from 1 to {MAX_IMAGES}, got {num_images!r}")
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        width = self.config.image_size if width is None else width
        height = self.config.image_size if height is None else height
        self.check_request(width, height, steps, guidance_scale, len(prompts), seed, sampler)
        if not isinstance(guidance_rescale, (int, float)) or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if strength is not None and init_image is None:
            raise ValueError(f"strength={strength} needs init_image: it sets how much of that image is repainted")
        if mask is not None and init_image is None:
            raise ValueError("mask needs init_image: inpainting repaints part of a given image")
        if self.config.inpainting and mask is None:
            raise ValueError(f"{self.config.family} is an inpainting model: give init_image and mask")
        if strength is None:
            strength = DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_IMG2IMG_STRENGTH
        seed = secrets.randbelow(MAX_SEED + 1 - len(prompts)) if seed is None else seed
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(len(prompts))]
        generators = [torch.Generator().manual_seed(s) for s in seeds]

        f = self.config.vae.downsample_factor
        latent_shape = (1, self.config.vae.latent_channels, height // f, width // f)
        init_latents = latent_mask = extra_channels = None
        if init_image is not None:  # encoded before the noise is drawn, as diffusers' img2img does
            images = self._image_batch(init_image, len(prompts), width, height)
            init_latents = self._encode_images(images, generators)
        noise = torch.cat([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device)
        if mask is not None:
            pixel_mask = self._mask_batch(mask, len(prompts), width, height)  # (B, 1, H, W), 1 = paint
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=(height // f, width // f))
            if self.config.inpainting:  # the U-Net sees the mask and the image with the painted part blacked out
                masked_latents = self._encode_images(images * (1 - pixel_mask), generators)
                extra_channels = torch.cat([latent_mask, masked_latents], dim=1)

        context, uncond_context = self.encode_prompts(prompts, negatives, clip_skip)
        denoise = self._guided_unet(context, uncond_context, guidance_scale, guidance_rescale, extra_channels)
        blend_mask = latent_mask if latent_mask is not None and not self.config.inpainting else None
        latents = sample(
            denoise, noise, sampler=sampler, steps=steps, schedule=self.config.schedule,
            prediction_type=self.config.prediction_type, spacing=self.config.spacing,
            steps_offset=self.config.steps_offset, karras=karras, eta=eta, init=init_latents,
            strength=strength if init_latents is not None else 1.0, mask=blend_mask, generator=generators,
            callback=callback,
        )
        return GenerationResult(to_pil(self.decode(latents)), seeds, latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE decoder; never black or NaN: if the decoder's output in
        the working precision is not finite (fp16 overflows in SD's VAE), decode again in fp32."""
        vae = self.model.vae
        images = vae.decode_latents(latents.to(self.dtype), tiling=VAE_TILING).float()
        if not torch.isfinite(images).all() and self.dtype != torch.float32:
            vae.float()
            try:
                images = vae.decode_latents(latents.float(), tiling=VAE_TILING)
            finally:
                vae.to(self.dtype)
        return images

    def _encode_images(self, images: torch.Tensor, generators) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) scaled latents, image i's posterior drawn with generator i."""
        vae = self.model.vae
        return torch.cat([
            vae.encode_to_latents(images[i : i + 1].to(self.dtype), generator=g, tiling=VAE_TILING).float()
            for i, g in enumerate(generators)
        ])

    def _guided_unet(self, context, uncond_context, guidance_scale: float, guidance_rescale: float,
                     extra_channels: torch.Tensor | None):
        """The model the sampler drives: the U-Net (in the working precision, on fp32 samples) with
        classifier-free guidance folded in; an inpainting U-Net also gets the mask and masked-image latents."""
        unet, dtype = self.model.unet, self.dtype
        use_guidance = guidance_scale != 1.0
        both = torch.cat([uncond_context, context]) if use_guidance else context  # unconditional first

        def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = x_t if extra_channels is None else torch.cat([x_t, extra_channels], dim=1)
            if not use_guidance:
                return unet(x_in.to(dtype), t, both).float()
            out_uncond, out_cond = unet(torch.cat([x_in, x_in]).to(dtype), torch.cat([t, t]), both).float().chunk(2)
            guided_out = out_uncond + guidance_scale * (out_cond - out_uncond)  # Ho and Salimans 2022, eq. 6
            if guidance_rescale > 0:  # Lin et al. 2023, eq. 15-16
                dims = list(range(1, guided_out.ndim))
                guided_std = guided_out.std(dim=dims, keepdim=True).clamp_min(1e-12)  # 0 only if all-constant
                rescaled = guided_out * (out_cond.std(dim=dims, keepdim=True) / guided_std)
                guided_out = guidance_rescale * rescaled + (1 - guidance_rescale) * guided_out
            return guided_out

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
        return tensor.expand(batch, -1, -1, -1).to(self.device)

    def _mask_batch(self, mask, batch: int, width: int, height: int) -> torch.Tensor:
        """A mask (PIL image, white = paint, or a (B|1, 1, H, W) / (H, W) tensor in [0, 1]) -> (B, 1, H, W) of 0/1."""
        if isinstance(mask, Image.Image):
            tensor = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]
        elif isinstance(mask, torch.Tensor):
            tensor = mask.float().reshape(-1, 1, *mask.shape[-2:]) if mask.ndim >= 2 else mask
        else:
            raise ValueError(f"mask must be a PIL image or a tensor, got {type(mask).__name__}")
        if tensor.ndim != 4 or tensor.shape[-2:] != (height, width):
            raise ValueError(f"mask is {tuple(tensor.shape[-2:])[::-1]} (width, height); it must be {width}x{height}, "
                             "the size of the image")
        if tensor.shape[0] not in (1, batch):
            raise ValueError(f"mask holds {tensor.shape[0]} masks for a batch of {batch}; give 1 or {batch}")
        return (tensor >= 0.5).float().expand(batch, -1, -1, -1).to(self.device)  # binarised, as SD's pipelines do


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounding to the nearest 8-bit level."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]  # (H, W, 3)


def from_pil(image: Image.Image) -> torch.Tensor:
    """An image -> (1, 3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
