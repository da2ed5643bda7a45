"""The latent space: an image's VAE latent channel by channel, and the encode -> decode round trip with its error.

Latent diffusion (Rombach et al. 2022, sec. 3) runs the diffusion model on z = E(x), f times smaller than the
image per side, and decodes its samples with D. The figure shows, for one image x in [-1, 1]:
    the image | each latent channel of z · scaling_factor (what the U-Net sees; LDM sec. 4.3.2), as a
    diverging colour map, blue negative, white 0, red positive, one symmetric scale for all channels |
    the round trip D(z) | the error |D(z) - x|, averaged over RGB, as a heat map
with the mean squared error and the PSNR of the round trip. z is the posterior's mean (its mode) unless a
generator is given, in which case it is one draw z = μ + σ·n from the posterior (Kingma and Welling 2014).
Errors are measured on the decoded image clamped to [-1, 1], as the pipeline outputs it; PSNR on [0, 1] pixels,
10·log10(1 / MSE) with MSE = mean((D(z) - x)²) / 4 (a range of 2 scaled to 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from kedavra.formats.images import from_pil
from kedavra.networks.vae import AutoencoderKL
from kedavra.pipeline.pipeline import Pipeline
from kedavra.validation import check_int
from kedavra.viz.forward import load_image
from kedavra.viz.panels import (
    SIGNED_COLOURMAP,
    SheetLayout,
    check_png_path,
    colour_map,
    display_scale,
    draw_sheet,
    enlarge,
    heat_image,
    to_image,
)
from kedavra.viz.sample_image import draw_sample_image

RANGE_TO_UNIT = 4.0  # images in [-1, 1] span 2, so squared errors scale by 2² = 4 to [0, 1] pixels


@dataclass(frozen=True)
class RoundTrip:
    """One image through the VAE: image and reconstruction (3, H, W) in [-1, 1], latents (C, h, w) scaled by
    the VAE's scaling_factor, error (H, W) = |reconstruction - image| averaged over RGB; float32 on the CPU."""

    image: torch.Tensor
    latents: torch.Tensor
    reconstruction: torch.Tensor
    error: torch.Tensor
    mse: float  # mean((reconstruction - image)²) on [-1, 1] images
    sampled: bool  # latents drawn from the posterior (True) or its mean (False)

    @property
    def psnr(self) -> float:
        """Peak signal-to-noise ratio of the round trip in dB, on [0, 1] pixels."""
        return math.inf if self.mse == 0 else 10 * math.log10(RANGE_TO_UNIT / self.mse)


@torch.no_grad()
def round_trip(vae: AutoencoderKL, image: Image.Image | torch.Tensor, *, device: str | torch.device | None = None,
               generator: torch.Generator | None = None) -> RoundTrip:
    """Encode `image` (PIL, or (3, H, W) / (1, 3, H, W) in [-1, 1]; sides multiples of the VAE's factor) and
    decode it again, in the VAE's precision, on `device` (default: where the VAE is; the VAE is moved there)."""
    parameter = next(vae.parameters())
    device = parameter.device if device is None else torch.device(device)
    x = from_pil(image) if isinstance(image, Image.Image) else image.reshape(1, *image.shape[-3:])  # (1, 3, H, W)
    f = vae.config.downsample_factor
    if x.shape[1] != 3 or x.shape[-1] % f or x.shape[-2] % f:
        raise ValueError(f"the image must be RGB with sides that are multiples of {f}, got shape {tuple(x.shape)}")
    vae = vae.to(device)
    x = x.to(device=device, dtype=torch.float32)
    posterior = vae.encode(x.to(parameter.dtype))
    z = posterior.sample(generator) if generator is not None else posterior.mode()  # (1, C, h, w), unscaled
    reconstruction = vae.decode(z).float().clamp(-1, 1)[0].cpu()  # (3, H, W)
    x = x[0].cpu()
    difference = reconstruction - x
    return RoundTrip(x, (z * vae.config.scaling_factor)[0].float().cpu(), reconstruction, difference.abs().mean(0),
                     float(difference.pow(2).mean()), generator is not None)


def load_image_for(pipe: Pipeline, path: str | Path | None, size: int | None = None) -> Image.Image:
    """The image to encode: a file (centre-cropped to a square) or the built-in drawing, at `size` pixels
    (default: the model's image size), which must be a multiple of the VAE's downsampling factor."""
    size = pipe.config.image_size if size is None else size
    f = pipe.config.vae.downsample_factor
    check_int("size", size, f, multiple_of=f, note=" (the VAE's downsampling factor)")
    return draw_sample_image(size) if path is None else load_image(path, size)


def draw_latents(trip: RoundTrip) -> tuple[Image.Image, SheetLayout]:
    """One row: the image, one tile per latent channel, the reconstruction, the error heat map."""
    height, width = trip.image.shape[-2:]
    scale = display_scale(width)
    bound = float(trip.latents.abs().max()) or 1.0  # one symmetric scale for every channel
    channels = []
    for channel in trip.latents:
        upsampled = F.interpolate(channel[None, None], size=(height, width), mode="nearest")[0, 0]  # (H, W)
        channels.append(Image.fromarray(colour_map(upsampled.numpy(), -bound, bound, SIGNED_COLOURMAP)))
    tiles = [enlarge(to_image(trip.image), scale), *(enlarge(tile, scale) for tile in channels),
             enlarge(to_image(trip.reconstruction), scale), enlarge(heat_image(trip.error.numpy()), scale)]
    labels = [["image x"]]
    labels += [[f"channel {c}", f"{float(ch.min()):.2f} … {float(ch.max()):.2f}"] for c, ch in enumerate(trip.latents)]
    labels += [["decoded D(z)"], ["|D(z) − x|", f"max {float(trip.error.max()):.3f}"]]
    z = "a posterior sample z" if trip.sampled else "the posterior mean z"
    title = [f"The latent space: {z} · scaling factor, {trip.latents.shape[0]} channels of "
             f"{trip.latents.shape[1]}×{trip.latents.shape[2]} (colour scale ±{bound:.2f}), and the round trip",
             f"round trip: MSE {trip.mse:.5f} on [−1, 1] pixels, PSNR {trip.psnr:.2f} dB"]
    return draw_sheet([tiles], title, [["encode →", "decode"]], [labels])


def make_latents_figure(pipe: Pipeline, path: str | Path, image: Image.Image | None = None, *,
                        generator: torch.Generator | None = None) -> tuple[Path, RoundTrip]:
    """Write the latent-space figure of `image` (default: the built-in drawing at the model's size) to `path`
    (.png) with the pipeline's VAE on its device; returns the path and the round trip."""
    path = check_png_path(path)
    image = draw_sample_image(pipe.config.image_size) if image is None else image
    trip = round_trip(pipe.model.vae, image, device=pipe.device, generator=generator)
    sheet, _ = draw_latents(trip)
    sheet.save(path)
    return path, trip
