"""Hires fix: text to image's second pass at a larger size, as A1111 runs it (modules/processing.py,
StableDiffusionProcessingTxt2Img, v1.10).

    first pass at width x height -> latents
    upscale: in latent space (F.interpolate, "Latent" modes), or decode, upscale the pixels (None / Lanczos /
             Nearest / Real-ESRGAN, kedavra.upscaling.named.resize_image) and encode again
    crop (hr_resize_x and hr_resize_y both given with another aspect ratio: the middle, in latent cells)
    image to image at the new size: fresh noise from the same seeds at the new shape, the hires prompt, sampler
             and schedule type (default: the first pass's), `steps` steps run exactly (A1111 hands its sampler
             the step count, so the schedule has ⌊steps / min(strength, 0.999)⌋ steps and its last `steps` run:
             kedavra.diffusion.sigmas.a1111_img2img_steps with fix_steps)
    decode at the new size

The size (A1111's calculate_target_resolution), f the VAE factor:
    resize_x = resize_y = 0     ⌊width·scale⌋ x ⌊height·scale⌋
    one of them 0               the other side follows the first pass's aspect ratio (integer division)
    both given                  the first pass scaled to cover resize_x x resize_y, then (upscaled - target) // f
                                latent cells cropped, half from each side (the extra one from the end)
The latents have ⌊side / f⌋ cells, so the image is the target rounded down to a multiple of f.

Where kedavra differs from A1111: the pixel path encodes with a posterior sample seeded with each image's seed
(A1111 draws it from the global generator, unseeded), and the pixel upscalers run on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kedavra.diffusion.samplers.k_diffusion import A1111_ETA_ANCESTRAL, resolve_k_sampler
from kedavra.validation import check_int, check_number

# A1111's latent upscale modes (modules/shared_items.py latent_upscale_modes): name -> (interpolation, antialias)
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_HIRES_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode, used when no upscaler is named
DEFAULT_HIRES_SCALE = 2.0  # A1111's hr_scale default
DEFAULT_HIRES_STRENGTH = 0.7  # A1111's txt2img "Denoising strength" slider default (its API's field: 0.75)
MAX_HIRES_SIDE = 2048  # the second pass's largest side (GenerationRequest's MAX_SIDE)


@dataclass(frozen=True)
class HiresGeometry:
    """Where the second pass works: the size the first pass is upscaled to, the latent cells cropped off (x, y),
    and the final image size, (width, height) in pixels."""

    upscaled: tuple[int, int]
    truncate: tuple[int, int]
    final: tuple[int, int]


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix settings (its txt2img API's hr_* fields).

    scale                    hr_scale: the first pass's size times this (when resize_x and resize_y are 0)
    resize_x, resize_y       hr_resize_x / hr_resize_y: a target size in pixels instead (0: from the other side)
    upscaler                 hr_upscaler: a latent mode (LATENT_UPSCALE_MODES) or a pixel upscaler's name
                             (kedavra.upscaling.named: None, Lanczos, Nearest, R-ESRGAN 4x+, ... or a file)
    steps                    hr_second_pass_steps: steps of the second pass (0: the first pass's count)
    strength                 denoising_strength: how much of the upscaled image is repainted, in (0, 1]
    sampler, schedule_type   hr_sampler_name, hr_scheduler: None for the first pass's
    prompt, negative_prompt  hr_prompt, hr_negative_prompt: None (or "") for the first pass's
    """

    scale: float = DEFAULT_HIRES_SCALE
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = DEFAULT_HIRES_UPSCALER
    steps: int = 0
    strength: float = DEFAULT_HIRES_STRENGTH
    sampler: str | None = None
    schedule_type: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def __post_init__(self):
        check_number("hires scale", self.scale, low=0, low_inclusive=False)
        check_int("hires resize_x", self.resize_x, 0, MAX_HIRES_SIDE)
        check_int("hires resize_y", self.resize_y, 0, MAX_HIRES_SIDE)
        check_int("hires steps", self.steps, 0)
        if not isinstance(self.strength, int | float) or isinstance(self.strength, bool) or \
                not 0 < self.strength <= 1:
            raise ValueError(f"hires denoising strength must be a number in (0, 1], got {self.strength!r} (0 would run "
                             "no step; to upscale alone, use `kedavra upscale`)")
        for name in ("sampler", "schedule_type", "prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"hires {name} must be a str or None, got {value!r}")
            if value == "":
                object.__setattr__(self, name, None)  # A1111: an empty hr_prompt means the first pass's
        object.__setattr__(self, "upscaler", resolve_hires_upscaler(self.upscaler))

    @property
    def latent_mode(self) -> tuple[str, bool] | None:
        """(interpolation, antialias) of a latent upscaler, None for a pixel one."""
        return LATENT_UPSCALE_MODES.get(self.upscaler)

    @property
    def by_scale(self) -> bool:
        return self.resize_x == 0 and self.resize_y == 0

    def geometry(self, width: int, height: int, f: int) -> HiresGeometry:
        """The second pass's sizes for a first pass of width x height on a VAE of factor f (module docstring);
        ValueError when the result is under f or over MAX_HIRES_SIDE on a side."""
        truncate = (0, 0)
        if self.by_scale:
            upscaled = (int(width * self.scale), int(height * self.scale))
        elif self.resize_y == 0:
            upscaled = (self.resize_x, self.resize_x * height // width)
        elif self.resize_x == 0:
            upscaled = (self.resize_y * width // height, self.resize_y)
        else:
            if width / height < self.resize_x / self.resize_y:
                upscaled = (self.resize_x, self.resize_x * height // width)
            else:
                upscaled = (self.resize_y * width // height, self.resize_y)
            truncate = ((upscaled[0] - self.resize_x) // f, (upscaled[1] - self.resize_y) // f)
        final = ((upscaled[0] // f - truncate[0]) * f, (upscaled[1] // f - truncate[1]) * f)
        asked = f"x{self.scale:g}" if self.by_scale else f"{self.resize_x}x{self.resize_y}"
        if min(final) < f or max(upscaled) > MAX_HIRES_SIDE:
            raise ValueError(f"hires fix {asked} of a {width}x{height} image gives {upscaled[0]}x{upscaled[1]}; each "
                             f"side must be from {f} to {MAX_HIRES_SIDE} pixels")
        return HiresGeometry(upscaled, truncate, final)

    def infotext(self, first_sampler: str, first_schedule: str | None, second_sampler: str,
                 second_schedule: str | None, prompt: str, negative_prompt: str) -> dict[str, str]:
        """A1111's infotext keys for this hires fix (modules/processing.py): "Hires upscale" or "Hires resize",
        "Hires steps" (when set), "Hires upscaler", and "Hires sampler", "Hires schedule type", "Hires prompt",
        "Hires negative prompt" where they differ from the first pass's (names as the infotext writes them)."""
        fields = {"Hires upscale": f"{self.scale:g}"} if self.by_scale else \
            {"Hires resize": f"{self.resize_x}x{self.resize_y}"}
        if self.steps:
            fields["Hires steps"] = str(self.steps)
        fields["Hires upscaler"] = self.upscaler
        if second_sampler != first_sampler:
            fields["Hires sampler"] = second_sampler
        if second_schedule is not None and second_schedule != first_schedule:
            fields["Hires schedule type"] = second_schedule
        if self.prompt is not None and self.prompt != prompt:
            fields["Hires prompt"] = self.prompt
        if self.negative_prompt is not None and self.negative_prompt != negative_prompt:
            fields["Hires negative prompt"] = self.negative_prompt
        return fields

    def second_request(self, request, geometry: HiresGeometry, asked_sizes=(None, None)):
        """The GenerationRequest of the second pass, from the first pass's (checked again): the hires prompts,
        sampler, schedule type and steps (each defaulting to the first pass's), the final size, and SDXL's
        original / target size at the upscaled size (A1111 conditions the hires pass on hr_upscale_to_x/y) unless
        `asked_sizes` (the first request's original_size, target_size before model defaults) gave them."""
        n = request.num_images
        upscaled = (geometry.upscaled[1], geometry.upscaled[0])  # (height, width), as GenerationRequest keeps them
        same_sampler = self.sampler is None
        schedule_type = self.schedule_type or request.schedule_type
        eta_ancestral = A1111_ETA_ANCESTRAL  # A1111 hands the hires sampler the same eta when it takes one
        if schedule_type is not None and resolve_k_sampler(self.sampler or request.sampler, request.convention)[0].eta:
            eta_ancestral = request.eta_ancestral
        return request.replace(
            prompts=request.prompts if self.prompt is None else (self.prompt,) * n,
            negative_prompts=request.negative_prompts if self.negative_prompt is None else (self.negative_prompt,) * n,
            steps=self.steps or request.steps, sampler=self.sampler or request.sampler,
            schedule_type=schedule_type, eta=request.eta if same_sampler else 0.0, eta_ancestral=eta_ancestral,
            sigmas=None,
            width=geometry.final[0], height=geometry.final[1],
            original_size=asked_sizes[0] or upscaled, target_size=asked_sizes[1] or upscaled, hires=None)

    def replace(self, **changes) -> HiresFix:
        return dataclasses.replace(self, **changes)


def resolve_hires_upscaler(name: str) -> str:
    """A latent mode's or pixel upscaler's canonical name (case-insensitive); ValueError listing both kinds."""
    if not isinstance(name, str):
        raise ValueError(f"hires upscaler must be a str, got {name!r}")
    modes = {mode.lower(): mode for mode in LATENT_UPSCALE_MODES}
    if name.lower() in modes:
        return modes[name.lower()]
    from kedavra.upscaling.named import resolve_upscaler  # the pixel upscalers; loaded only when named

    try:
        return resolve_upscaler(name)
    except ValueError as error:
        raise ValueError(f"hires {error}; or a latent mode: {', '.join(LATENT_UPSCALE_MODES)}") from None


def upscale_latents(latents: torch.Tensor, mode: tuple[str, bool], geometry: HiresGeometry, f: int) -> torch.Tensor:
    """A1111's latent upscale: (B, C, h, w) -> (B, C, H/f, W/f) of the upscaled size, by `mode`."""
    return interpolate_latents(latents, (geometry.upscaled[1] // f, geometry.upscaled[0] // f), mode)


def interpolate_latents(latents: torch.Tensor, size: tuple[int, int], mode: tuple[str, bool]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size) as A1111 resizes latents (`mode`: an entry of LATENT_UPSCALE_MODES):
    torch's interpolate with align_corners left unset (False), as processing.py calls it for hires fix and for
    img2img's resize mode 3."""
    interpolation, antialias = mode
    return F.interpolate(latents, size=size, mode=interpolation, antialias=antialias)


def crop_latents(latents: torch.Tensor, geometry: HiresGeometry) -> torch.Tensor:
    """A1111's truncation: (B, C, h, w) -> the middle, truncate_y // 2 rows off the top and (truncate_y + 1) // 2
    off the bottom (and so for columns)."""
    tx, ty = geometry.truncate
    h, w = latents.shape[-2:]
    return latents[..., ty // 2 : h - (ty + 1) // 2, tx // 2 : w - (tx + 1) // 2]
