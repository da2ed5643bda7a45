"""Inpainting as A1111 and ComfyUI do it with the sampler's help: the latent mask each makes of the pixel mask, and
A1111's final paste of the original pixels. The blending during sampling is the samplers' (kedavra.diffusion.
samplers.registry.InpaintingDenoiser); kedavra's own plans blend as diffusers does (the kept region noised to each
step's level) on a nearest-neighbour latent mask.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kedavra.formats.images import to_pil


def program_latent_mask(mask: torch.Tensor, latent_size: tuple[int, int], convention: str) -> torch.Tensor:
    """The latent blend mask (B, 1, h, w) A1111 or ComfyUI makes of a pixel mask (B, 1, H, W) of 0/1: A1111's
    PIL resize of the mask image (bicubic, Pillow's default for RGB), rounded to 0/1 (processing.py, latmask);
    ComfyUI's bilinear interpolation, left soft (comfy/sampler_helpers.py, prepare_mask)."""
    if convention == "comfyui":
        return torch.nn.functional.interpolate(mask.float(), size=latent_size, mode="bilinear")
    h, w = latent_size
    masks = []
    for image in mask.float():
        pixels = Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy(), "L").convert("RGB")
        resized = np.asarray(pixels.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)[..., 0] / 255
        masks.append(torch.from_numpy(np.around(resized))[None])
    return torch.stack(masks)  # (B, 1, h, w)


def overlay_kept_pixels(images: list[Image.Image], init: torch.Tensor, mask: torch.Tensor) -> list[Image.Image]:
    """A1111's apply_overlay for inpainting: the original pixels pasted back wherever the mask keeps the image, so
    only the painted region comes from the decoder (processing.py, overlay_images with mask_for_overlay)."""
    originals = to_pil(init.float())
    keep = [Image.fromarray(((1 - m[0].float()) * 255).round().to(torch.uint8).numpy(), "L") for m in mask]
    return [Image.composite(original, image, kept) for image, original, kept in zip(images, originals, keep,
                                                                                       strict=True)]
