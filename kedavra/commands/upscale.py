"""`kedavra upscale`: upscale images with Real-ESRGAN (kedavra.upscaling), as A1111's Extras tab does.

    kedavra upscale photo.png -o photo-x4.png                                  # RealESRGAN_x4plus, x4
    kedavra upscale a.png b.jpg -o big/ --upscaler realesr-animevideov3-x2 --scale 2
    kedavra upscale photo.png -o photo-x3.png --scale 3 --precision bf16       # x4 pass, then Lanczos to x3
    kedavra upscale photo.png -o out.png --upscaler RealESRGAN_x4plus.pth      # a downloaded state dict
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from kedavra.upscaling.upscaler import DEFAULT_OVERLAP, DEFAULT_TILE, PRECISIONS, load_upscaler, upscaler_names

DEFAULT_UPSCALER = "RealESRGAN_x4plus"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "upscale", help="upscale images with Real-ESRGAN (x4plus, anime 6B, animevideov3, or a .pth file)",
        description="Upscale images with Real-ESRGAN networks written in kedavra. A scale the model does not do "
                    "natively is reached as A1111 does: model passes until the image is at least that large, then a "
                    f"Lanczos resize. Known upscalers: {', '.join(upscaler_names())}; or a path to an ncnn .param, "
                    "a .pth or a .safetensors file.")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="image files to upscale")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output file for one input; for several inputs (or an existing folder), a folder that "
                             "receives NAME.png for each input")
    parser.add_argument("--upscaler", default=DEFAULT_UPSCALER, help=f"name or file (default {DEFAULT_UPSCALER})")
    parser.add_argument("--scale", type=float, default=None, help="factor (default: the model's own)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE,
                        help=f"tile side in input pixels, 0 for none (default {DEFAULT_TILE})")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP,
                        help=f"pixels neighbouring tiles share (default {DEFAULT_OVERLAP})")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="fp32, or bf16 (fast on CPUs with AMX / AVX512-BF16)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.set_defaults(func=run)


def _outputs(inputs: list[Path], output: Path) -> list[Path]:
    if len(inputs) == 1 and not output.is_dir():
        return [output]
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: {len(inputs)} inputs need a folder for -o, and this is a file")
    names = [path.stem + ".png" for path in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"inputs share a name ({', '.join(n for n in names if names.count(n) > 1)}); "
                         "upscale them into separate folders")
    return [output / name for name in names]


def run(args) -> int:
    if args.tile < 0 or args.tile_overlap < 0:
        raise ValueError(f"--tile {args.tile} and --tile-overlap {args.tile_overlap} must be 0 or more")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    inputs = [Path(p) for p in args.inputs]
    images = []
    for path in inputs:  # every input opened and checked before the model is loaded
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        except UnidentifiedImageError:
            raise ValueError(f"{path}: not an image PIL can read") from None
    outputs = _outputs(inputs, Path(args.output))
    upscaler = load_upscaler(args.upscaler, precision=args.precision, tile=args.tile or None,
                             overlap=args.tile_overlap)
    for image in images:  # the size limit, before any heavy work
        upscaler.plan(image.width, image.height, args.scale)
    for path, image, target in zip(inputs, images, outputs, strict=True):
        start = time.perf_counter()
        result = upscaler.upscale(image, args.scale)
        target.parent.mkdir(parents=True, exist_ok=True)
        result.save(target)
        print(f"{path} ({image.width}x{image.height}) -> {target} ({result.width}x{result.height}) with "
              f"{upscaler.name} {args.precision} in {time.perf_counter() - start:.1f} s")
    return 0
