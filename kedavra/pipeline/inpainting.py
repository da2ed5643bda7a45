"""Inpainting as A1111 and ComfyUI do it around the sampler: A1111's mask settings (blur, "only masked", masked
content, invert, resize mode, mask rounding), the latent mask each program makes of the pixel mask, and A1111's final
paste of the original pixels; and A1111's img2img resize mode 3, with a mask or without. The blending during
sampling is the samplers' (kedavra.diffusion.samplers.registry.InpaintingDenoiser); kedavra's own plans blend as
diffusers does (the kept region noised to each step's level) on a nearest-neighbour latent mask of the mask
binarised at 0.5.

A1111's img2img with a mask (modules/processing.py, StableDiffusionProcessingImg2Img.init and process_images):

    mask      inverted if asked; blurred along x, then y (OpenCV's GaussianBlur, kernel 2·⌊2.5σ + 0.5⌋ + 1 taps)
    whole picture: image and mask resized to W x H (the resize mode); overlay mask = min(2·mask, 1)
                   resize mode 3, "latent upscale": the image stays at its own size w x h; the mask is brought to
                   W x H and the overlay mask back to w x h by resize_image(3, ...), which A1111 runs as mode 2
                   (resize and fill, its else branch); after encoding, the init latents are resized bilinearly to
                   W/f x H/f (torch's interpolate, no antialias)
    only masked:   crop = the mask's bounding box + padding, widened to W:H (expand_crop_region); image and mask
                   cropped and resized into W x H ("resize and fill"); overlay mask = the blurred mask, full size
    masked content "fill": the image under the mask replaced by a blur of what surrounds it (masking.fill)
    latent mask    the (blurred, resized) mask resized to the latent grid (bicubic) and rounded to 0 / 1 (left
                   soft with mask_round false, which also gives an SD 1.x / 2.x inpainting model the soft mask);
                   "latent noise" / "latent nothing" replace the masked latents by the seed's noise / zeros
    after decoding the generated crop is scaled back into its box ("crop and resize"), and the original image is
                   laid over everything with alpha 1 − overlay mask (apply_overlay; an overlay of another size than
                   the output, as mode 3 makes, is laid at the top left, as Pillow's alpha_composite places it)

The blur reproduces OpenCV's 8-bit fixed-point arithmetic, so masks match A1111's bit for bit
(tests/test_inpaint_a1111.py, against OpenCV itself).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from kedavra.formats.images import from_pil, to_pil
from kedavra.pipeline.hires import LATENT_UPSCALE_MODES, interpolate_latents
from kedavra.upscaling.named import (
    CROP_AND_RESIZE,
    IMG2IMG_RESIZE_MODES,
    JUST_RESIZE,
    LATENT_UPSCALE,
    NO_UPSCALER,
    RESIZE_AND_FILL,
    resize_image,
)
from kedavra.validation import check_bool, check_choice, check_int

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0, 1, 2, 3
MAX_MASK_BLUR = 256  # pixels (σ); A1111's slider stops at 64
MAX_PADDING = 2048  # pixels around the mask's bounding box ("Only masked padding")
# A1111's infotext keys (modules/processing.py extra_generation_params)
MASK_BLUR_KEY, MASK_MODE_KEY, MASKED_CONTENT_KEY = "Mask blur", "Mask mode", "Masked content"
INPAINT_AREA_KEY, PADDING_KEY = "Inpaint area", "Masked area padding"
ONLY_MASKED, NOT_MASKED = "Only masked", "Inpaint not masked"
FIXED_ONE = 256  # OpenCV's 8-bit Gaussian blur computes its kernel in units of 1/256 (ufixedpoint16)
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # masking.fill: (blur radius, composites)
ALPHA_THRESHOLD = 128  # create_binary_mask: an RGBA mask's alpha above this paints (with mask_round)
# processing.py resizes mode 3's init latents with interpolate(mode="bilinear"): hires fix's "Latent" upscale
LATENT_UPSCALE_INTERPOLATION = LATENT_UPSCALE_MODES["Latent"]


@dataclass(frozen=True)
class InpaintOptions:
    """A1111's inpainting settings (its img2img API fields in brackets). The defaults are kedavra's: the mask as
    given over the whole picture; A1111's own API defaults are `A1111_API_DEFAULTS`.

    mask_blur_x, mask_blur_y  σ in pixels of the mask's Gaussian blur along each axis, 0: none [mask_blur_x/_y]
    only_masked               "Inpaint area: Only masked": generate the mask's surroundings at the full size and
                              paste them back [inpaint_full_res]
    padding                   pixels added around the mask's bounding box when only_masked [inpaint_full_res_padding]
    masked_content            what the sampler starts from under the mask: "fill", "original", "latent noise",
                              "latent nothing" [inpainting_fill 0-3]
    invert                    paint where the mask is black [inpainting_mask_invert]
    resize_mode               how an image (and mask) of another size than the request's is brought to it: 0 just
                              resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale): the
                              image encoded at its own size, its latents resized [resize_mode]
    mask_round                round the latent mask to 0 / 1 (A1111's default); False: the soft (blurred) latent mask
                              blends, an SD 1.x / 2.x inpainting model sees the soft mask, and an RGBA mask's alpha is
                              taken as it is (`a1111_mask`) [mask_round; A1111 writes no infotext for it]
    """

    mask_blur_x: int = 0
    mask_blur_y: int = 0
    only_masked: bool = False
    padding: int = 0
    masked_content: str = "original"
    invert: bool = False
    resize_mode: int = JUST_RESIZE
    mask_round: bool = True

    def __post_init__(self):
        for name in ("mask_blur_x", "mask_blur_y"):
            check_int(name, getattr(self, name), 0, MAX_MASK_BLUR)
        check_bool("only_masked", self.only_masked)
        check_int("padding", self.padding, 0, MAX_PADDING)
        check_choice("masked_content", self.masked_content, MASKED_CONTENT)
        check_bool("invert", self.invert)
        check_int("resize_mode", self.resize_mode, min(IMG2IMG_RESIZE_MODES), max(IMG2IMG_RESIZE_MODES),
                  note=f" ({', '.join(f'{k} {v}' for k, v in IMG2IMG_RESIZE_MODES.items())})")
        check_bool("mask_round", self.mask_round)

    @property
    def is_default(self) -> bool:
        return self == InpaintOptions()

    def infotext(self) -> dict[str, str]:
        """A1111's infotext fields for these settings, written as it writes them (only where they differ from its
        "whole picture, original" run; "Mask blur" when either axis blurs, its value when both are equal)."""
        fields = {}
        if self.invert:
            fields[MASK_MODE_KEY] = NOT_MASKED
        if self.mask_blur_x or self.mask_blur_y:
            fields[MASK_BLUR_KEY] = str(self.mask_blur_x) if self.mask_blur_x == self.mask_blur_y else "None"
        if self.only_masked:
            fields[INPAINT_AREA_KEY] = ONLY_MASKED
            fields[PADDING_KEY] = str(self.padding)
        if self.masked_content != "original":
            fields[MASKED_CONTENT_KEY] = self.masked_content
        return fields

    @classmethod
    def from_infotext(cls, values: dict[str, str]) -> InpaintOptions:
        """The settings an A1111 infotext records (the reverse of `infotext`); ValueError naming a bad value. A PNG
        whose "Mask blur" is missing was made without blur."""
        blur = values.get(MASK_BLUR_KEY, "0")
        if blur == "None":
            raise ValueError("the PNG's 'Mask blur: None' means different x and y blurs, which A1111 does not record; "
                             "give --mask-blur")
        area = values.get(INPAINT_AREA_KEY, "Whole picture")
        if area not in ("Whole picture", ONLY_MASKED):
            raise ValueError(f"{INPAINT_AREA_KEY} {area!r} is not 'Whole picture' or {ONLY_MASKED!r}")
        mode = values.get(MASK_MODE_KEY, "Inpaint masked")
        if mode not in ("Inpaint masked", NOT_MASKED):
            raise ValueError(f"{MASK_MODE_KEY} {mode!r} is not 'Inpaint masked' or {NOT_MASKED!r}")
        try:
            blur_px, padding = int(blur), int(values.get(PADDING_KEY, "0"))
        except ValueError:
            raise ValueError(f"{MASK_BLUR_KEY} {blur!r} and {PADDING_KEY} {values.get(PADDING_KEY)!r} must be "
                             "whole numbers of pixels") from None
        return cls(mask_blur_x=blur_px, mask_blur_y=blur_px, only_masked=area == ONLY_MASKED, padding=padding,
                   masked_content=values.get(MASKED_CONTENT_KEY, "original"), invert=mode == NOT_MASKED)


A1111_API_DEFAULTS = InpaintOptions(mask_blur_x=4, mask_blur_y=4, only_masked=True, masked_content="fill")


# ---- the mask ------------------------------------------------------------------------------------------------------


def blur_mask(mask: Image.Image, sigma_x: int, sigma_y: int) -> Image.Image:
    """A1111's mask blur: an 8-bit mask blurred along x with a Gaussian of σ = sigma_x, then along y, each pass as
    OpenCV's GaussianBlur computes 8-bit images (`_fixed_point_kernel`; border reflected without repeating the edge),
    bit for bit."""
    pixels = np.asarray(mask.convert("L"), dtype=np.int64)
    for axis, sigma in ((1, sigma_x), (0, sigma_y)):
        if sigma > 0:
            pixels = _blur_along(pixels, sigma, axis)
    return Image.fromarray(pixels.astype(np.uint8), "L")


def _fixed_point_kernel(sigma: float) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel: 2·⌊2.5σ + 0.5⌋ + 1 taps (A1111's size) of exp(−x²/2σ²), normalised, in units
    of 1/256, rounded from the outer taps inwards with the error carried (error diffusion), the centre tap taking
    what makes the sum exactly 256 (imgproc/smooth: getGaussianKernelBitExact, getGaussianKernelFixedPoint_ED)."""
    radius = int(2.5 * sigma + 0.5)
    offsets = np.arange(-radius, 0)
    half = np.exp(-(offsets.astype(np.float64) ** 2) / (2 * sigma**2))
    scale = 1 / (2 * half.sum() + 1)
    taps, error = [], 0.0
    for value in half * scale:
        adjusted = value * FIXED_ONE + error
        tap = int(np.rint(adjusted))
        error = adjusted - tap
        taps.append(tap)
    return np.array([*taps, FIXED_ONE - 2 * sum(taps), *taps[::-1]], dtype=np.int64)


def _blur_along(pixels: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    kernel = _fixed_point_kernel(sigma)
    radius = len(kernel) // 2
    n = pixels.shape[axis]
    index = np.arange(-radius, n + radius)
    if n > 1:  # OpenCV's BORDER_REFLECT_101, repeated for kernels wider than the image
        period = 2 * (n - 1)
        index = np.abs(index) % period
        index = np.where(index > n - 1, period - index, index)
    else:
        index = np.zeros_like(index)
    padded = np.take(pixels, index, axis=axis)
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=axis)  # (..., n, ..., taps)
    return (windows @ kernel + FIXED_ONE // 2) >> 8  # sums in 1/256 units, rounded half up to 8 bits


def a1111_mask(image: Image.Image, mask_round: bool = True) -> Image.Image:
    """The mask A1111 reads from an uploaded image (create_binary_mask(image, round=mask_round)): an RGBA image with
    transparency gives its alpha channel, thresholded above 128 (white = paint) when mask_round, else as it is; any
    other image its grey levels."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.getchannel("A")
        return alpha.point(lambda value: 255 if value > ALPHA_THRESHOLD else 0) if mask_round else alpha
    return image.convert("L")


def crop_region(mask: Image.Image, padding: int, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A1111's "only masked" box (x1, y1, x2, y2): the mask's bounding box grown by `padding` (within the image),
    then widened or heightened about its centre to the processing size's aspect ratio, shifted back inside the
    image (masking.get_crop_region_v2 and expand_crop_region). None for an all-black mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if padding:
        x1, y1, x2, y2 = max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), \
            min(y2 + padding, mask.height)
    width, height = size
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widen(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), mask.height)
    else:
        x1, x2 = _widen(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _widen(low: int, high: int, grow: int, limit: int) -> tuple[int, int]:
    """[low, high) grown by `grow` (half before, the rest after), moved back inside [0, limit) where it can be."""
    low, high = low - grow // 2, high + grow - grow // 2
    if high >= limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" (masking.fill): the pixels under the mask replaced by ever finer blurs of the unmasked image
    (premultiplied alpha, radii 256 down to 0), composited over each other."""
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in FILL_LAYERS:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


# ---- the plan around one generation ---------------------------------------------------------------------------------


@dataclass
class InpaintPlan:
    """One A1111 inpainting run's pictures: `images` and `masks` (soft, L) at the processing size go to the sampler;
    `finish` turns its decoded images into the outputs (pasted back into the originals' size, the kept pixels laid
    over them)."""

    options: InpaintOptions
    images: list[Image.Image]
    masks: list[Image.Image]
    overlays: list[Image.Image]  # RGBA: the original with alpha 1 − overlay mask
    boxes: list[tuple[int, int, int, int] | None]  # only masked: where each output goes in the original

    def finish(self, generated: list[Image.Image]) -> list[Image.Image]:
        """A1111's apply_overlay (with uncrop for "only masked")."""
        results = []
        for image, overlay, box in zip(generated, self.overlays, self.boxes, strict=True):
            if box is not None:
                x1, y1, x2, y2 = box
                canvas = Image.new("RGBA", overlay.size)
                canvas.paste(resize_image(image, (x2 - x1, y2 - y1), NO_UPSCALER, None, CROP_AND_RESIZE), (x1, y1))
                image = canvas
            image = image.convert("RGBA")
            image.alpha_composite(overlay)
            results.append(image.convert("RGB"))
        return results


def plan_inpainting(images: list[Image.Image], masks: list[Image.Image], size: tuple[int, int],
                    options: InpaintOptions) -> InpaintPlan:
    """A1111's preparation of one init image and mask per batch image (module docstring) for a W x H `size`.
    An all-black mask with only_masked falls back to the whole picture, as A1111 does."""
    resized, kept_masks, overlays, boxes = [], [], [], []
    mode = _pixel_mode(options.resize_mode)
    for image, mask in zip(images, masks, strict=True):
        mask = ImageOps.invert(mask.convert("L")) if options.invert else mask.convert("L")
        mask = blur_mask(mask, options.mask_blur_x, options.mask_blur_y)
        box = crop_region(mask, options.padding, size) if options.only_masked else None
        if box is not None:
            overlay_mask = mask
            mask = resize_image(mask.crop(box), size, NO_UPSCALER, None, RESIZE_AND_FILL).convert("L")
        else:
            mask = resize_image(mask, size, NO_UPSCALER, None, mode).convert("L")
            overlay_mask = Image.fromarray(np.minimum(np.asarray(mask, dtype=np.uint16) * 2, 255).astype(np.uint8))
            if options.resize_mode != LATENT_UPSCALE:  # mode 3: the image is encoded at its own size
                image = resize_image(image, size, NO_UPSCALER, None, mode)
        if overlay_mask.size != image.size:
            overlay_mask = resize_image(overlay_mask, image.size, NO_UPSCALER, None, mode).convert("L")
        overlay = Image.new("RGBa", image.size)
        overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask))
        if box is not None:
            image = resize_image(image.crop(box), size, NO_UPSCALER, None, RESIZE_AND_FILL)
        if options.masked_content == "fill":
            image = fill_masked(image, mask)
        resized.append(image.convert("RGB"))
        kept_masks.append(mask)
        overlays.append(overlay.convert("RGBA"))
        boxes.append(box)
    return InpaintPlan(options, resized, kept_masks, overlays, boxes)


def _pixel_mode(resize_mode: int) -> int:
    """The pixel resize A1111's resize_image does for an img2img resize mode: mode 3 falls in its last branch,
    resize and fill."""
    return RESIZE_AND_FILL if resize_mode == LATENT_UPSCALE else resize_mode


def check_latent_upscale(options: InpaintOptions, image_size: tuple[int, int], size: tuple[int, int], f: int,
                         inpainting_model: bool) -> None:
    """ValueError for an A1111 inpainting run with resize mode 3 that A1111 cannot run: an image with a side under
    f pixels (the VAE encodes it at its own size), and, over the whole picture with an image of another size than
    the output's W x H, masked content "fill" (masking.fill pastes the image through the W x H mask: Pillow's
    "images do not match") or an inpainting model (its masked image and mask differ in size)."""
    if options.resize_mode != LATENT_UPSCALE:
        return
    check_encodable(image_size, f)
    if options.only_masked or image_size == size:
        return
    reason = ("masked content 'fill'" if options.masked_content == "fill" else
              "an inpainting model" if inpainting_model else None)
    if reason is not None:
        raise ValueError(f"resize mode 3 (latent upscale) with {reason} over the whole picture needs the init image "
                         f"at the output size ({size[0]}x{size[1]}), got {image_size[0]}x{image_size[1]}: A1111 "
                         "fails there ('images do not match'); give another masked content, only masked, or "
                         "another resize mode")


def check_encodable(image_size: tuple[int, int], f: int) -> None:
    """ValueError unless an init image that resize mode 3 encodes at its own size has sides of at least f pixels."""
    if min(image_size) < f:
        raise ValueError(f"init_image is {image_size[0]}x{image_size[1]}; resize mode 3 (latent upscale) encodes it "
                         f"at its own size, which needs at least {f} pixels a side")


def resize_init_latents(latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Resize mode 3 after encoding: the init latents (B, C, h', w') of the images at their own size resized to the
    request's (h, w) = (H/f, W/f), as StableDiffusionProcessingImg2Img.init does (bilinear, no antialias)."""
    return interpolate_latents(latents, latent_size, LATENT_UPSCALE_INTERPOLATION)


def a1111_inpainting(request, width: int, height: int):
    """(request with its init images and masks prepared at width x height, InpaintPlan) for an A1111-convention
    request with a mask (`GenerationRequest`; its init_image / mask as PIL images or tensors, of any size). With
    only_masked and a mask that paints nothing, A1111 runs plain image to image: (request without mask, None)."""
    images, masks = inpainting_pictures(request.init_image, request.mask, request.num_images)
    options = request.inpaint or InpaintOptions()
    if options.only_masked and not any(_painted(mask, options) for mask in masks):
        # A1111: 'Unable to perform "Inpaint Only mask" because mask is blank, switch to img2img mode.'
        latent_resize = options.resize_mode == LATENT_UPSCALE
        if not latent_resize:
            images = [resize_image(image, (width, height), NO_UPSCALER, None, options.resize_mode) for image in images]
        init = torch.cat([from_pil(image.convert("RGB")) for image in images])
        return dataclasses.replace(request, init_image=init, mask=None, inpaint=None, latent_resize=latent_resize), None
    plan = plan_inpainting(images, masks, (width, height), options)
    init = torch.cat([from_pil(image) for image in plan.images])  # (B, 3, H, W)
    mask = torch.stack([torch.from_numpy(np.asarray(m, dtype=np.float32) / 255)[None] for m in plan.masks])
    return dataclasses.replace(request, init_image=init, mask=mask), plan  # mask: (B, 1, H, W), soft


def _painted(mask: Image.Image, options: InpaintOptions) -> bool:
    """Whether a mask paints anything once inverted and blurred as `options` say."""
    mask = ImageOps.invert(mask.convert("L")) if options.invert else mask.convert("L")
    return blur_mask(mask, options.mask_blur_x, options.mask_blur_y).getbbox() is not None


def inpainting_pictures(init_image, mask, batch: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """One RGB init image and one L mask per batch image, from PIL images or tensors ((B|1, 3, H, W) in [-1, 1],
    (B|1, 1, H, W) in [0, 1]); ValueError when the counts or the sizes do not match."""
    images = _pictures(init_image, batch, "init_image")
    masks = [m if isinstance(m, Image.Image) else Image.fromarray((m[0].float().clamp(0, 1) * 255).round()
                                                                   .to(torch.uint8).numpy(), "L")
             for m in _pictures(mask, batch, "mask", rgb=False)]
    for image, mask in zip(images, masks, strict=True):
        if mask.size != image.size:
            raise ValueError(f"mask is {mask.width}x{mask.height} but init_image is {image.width}x{image.height}; "
                             "they must be the same size")
    return images, masks


def _pictures(picture, batch: int, name: str, rgb: bool = True) -> list:
    """One PIL image (or, for a mask tensor, one (1, H, W) tensor) per batch image."""
    if isinstance(picture, Image.Image):
        return [picture] * batch
    tensor = picture if picture.ndim == 4 else picture.reshape(1, -1, *picture.shape[-2:])
    if tensor.shape[1] != (3 if rgb else 1):
        raise ValueError(f"{name} has {tensor.shape[1]} channels; it must have {3 if rgb else 1}")
    if tensor.shape[0] not in (1, batch):
        raise ValueError(f"{name} holds {tensor.shape[0]} pictures for a batch of {batch}; give 1 or {batch}")
    tensor = tensor.expand(batch, *tensor.shape[1:])
    return to_pil(tensor.float()) if rgb else list(tensor)


def program_latent_mask(mask: torch.Tensor, latent_size: tuple[int, int], convention: str,
                        mask_round: bool = True) -> torch.Tensor:
    """The latent blend mask (B, 1, h, w) A1111 or ComfyUI makes of a pixel mask (B, 1, H, W) in [0, 1]: A1111's
    PIL resize of the mask image (bicubic, Pillow's default for RGB), rounded to 0/1 when mask_round (processing.py,
    latmask); ComfyUI's bilinear interpolation, left soft (comfy/sampler_helpers.py, prepare_mask)."""
    if convention == "comfyui":
        return torch.nn.functional.interpolate(mask.float(), size=latent_size, mode="bilinear")
    h, w = latent_size
    masks = []
    for image in mask.float():
        pixels = Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy(), "L").convert("RGB")
        resized = np.asarray(pixels.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)[..., 0] / 255
        masks.append(torch.from_numpy(np.around(resized) if mask_round else resized)[None])
    return torch.stack(masks)  # (B, 1, h, w)
