"""Real-ESRGAN against bicubic and Lanczos on real photographs downscaled x4: PSNR, SSIM and a figure to look at.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/upscale_quality.py --threads 1 --size 256 \\
        --figure docs/figures/upscale_quality.png

Each photograph (scikit-image's astronaut, coffee, chelsea, rocket and motorcycle) is cropped to --size x --size
around a detail, downscaled x4 by PIL's bicubic (a = -0.5, its kernel widened by the factor when reducing, so
antialiased like MATLAB's imresize), then upscaled back x4 by PIL's bicubic, PIL's Lanczos and each Real-ESRGAN
model kedavra ships (untiled, --precision fp32 by default). Metrics on the 8-bit results, with a border of SHAVE
pixels left out as super-resolution papers do (they shave `scale` pixels):

- PSNR on RGB, and on the luma Y of ITU-R BT.601 in studio range (MATLAB's rgb2ycbcr), the channel SR papers report;
- SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural Similarity") on RGB, the
  mean over channels: scikit-image's structural_similarity with the paper's 11x11 Gaussian window, sigma 1.5.

The figure shows, per photograph, a zoomed window of the low-resolution input (nearest), bicubic, Real-ESRGAN
x4plus and the ground truth, with each result's PSNR / SSIM.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SCALE = 4
SHAVE = 4  # border pixels left out of every metric: `scale` pixels, as EDSR / RCAN / BasicSR evaluate x4
PEAK = 255.0  # 8-bit images
BT601_LUMA = (65.481, 128.553, 24.966)  # Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 (MATLAB's rgb2ycbcr)
BT601_BLACK = 16.0
SSIM_SIGMA = 1.5  # Wang et al. 2004, Sec. III-C: 11x11 circular-symmetric Gaussian window, standard deviation 1.5
# photograph -> the detail (row, column) its crop and the figure's window are centred on
PHOTOS = {
    "astronaut": (95, 205),  # the face
    "coffee": (270, 370),  # the spoon on the saucer
    "chelsea": (115, 170),  # the cat's eye and fur
    "rocket": (170, 318),  # the rocket's upper stage
    "motorcycle": (280, 400),  # the engine
}
UPSCALERS = ("RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3-x4")
FIGURE_MODEL = "RealESRGAN_x4plus"
WINDOW = 64  # high-resolution pixels per side of the figure's zoomed window
PANEL = 192  # displayed pixels per side of one figure panel (WINDOW zoomed x3 by nearest)
GAP, CAPTION = 4, 20  # figure spacing and caption height, pixels


def luma(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 255] -> (H, W) float64 BT.601 luma Y in [16, 235]."""
    return BT601_BLACK + image.astype(np.float64) @ np.array(BT601_LUMA) / PEAK


def _shave(image: np.ndarray, border: int) -> np.ndarray:
    return image[border:image.shape[0] - border, border:image.shape[1] - border]


def psnr(reference: np.ndarray, test: np.ndarray, border: int = SHAVE) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(255² / MSE), over all channels; inf for identical images."""
    if reference.shape != test.shape:
        raise ValueError(f"PSNR of images of shapes {reference.shape} and {test.shape}; they must match")
    difference = _shave(reference, border).astype(np.float64) - _shave(test, border).astype(np.float64)
    mse = float(np.mean(difference**2))
    return float("inf") if mse == 0 else 10 * np.log10(PEAK**2 / mse)


def ssim(reference: np.ndarray, test: np.ndarray, border: int = SHAVE) -> float:
    """SSIM of two (H, W, 3) RGB images in [0, 255] (Wang et al. 2004, eq. 13 with its Gaussian window and
    constants K1 = 0.01, K2 = 0.03), the mean over channels and pixels."""
    from skimage.metrics import structural_similarity

    if reference.shape != test.shape:
        raise ValueError(f"SSIM of images of shapes {reference.shape} and {test.shape}; they must match")
    return float(structural_similarity(_shave(reference, border).astype(np.float64),
                                       _shave(test, border).astype(np.float64), channel_axis=-1, data_range=PEAK,
                                       gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False))


def photograph(name: str) -> np.ndarray:
    from skimage import data

    return data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()


def crop_box(shape: tuple[int, ...], centre: tuple[int, int], size: int) -> tuple[int, int]:
    """(top, left) of a size x size box centred on `centre`, moved inside an image of `shape` (H, W, ...)."""
    return tuple(min(max(c - size // 2, 0), limit - size) for c, limit in zip(centre, shape[:2], strict=True))


def check_size(size: int) -> int:
    smallest = min(min(photograph(name).shape[:2]) for name in PHOTOS)
    if size % SCALE or not WINDOW <= size <= smallest:
        raise SystemExit(f"--size {size}: must be a multiple of {SCALE} from {WINDOW} to {smallest} (the smallest "
                         "photograph's side)")
    return size


def upscale_all(ground_truth: Image.Image, upscalers: dict) -> tuple[Image.Image, dict[str, Image.Image], dict]:
    """The x4-downscaled input, and each method's x4 result and seconds."""
    low = ground_truth.resize((ground_truth.width // SCALE, ground_truth.height // SCALE), Image.Resampling.BICUBIC)
    methods = {"bicubic": lambda image: image.resize(ground_truth.size, Image.Resampling.BICUBIC),
               "Lanczos": lambda image: image.resize(ground_truth.size, Image.Resampling.LANCZOS),
               **{name: upscaler.upscale for name, upscaler in upscalers.items()}}
    results, seconds = {}, {}
    for method, run in methods.items():
        start = time.perf_counter()
        results[method] = run(low)
        seconds[method] = time.perf_counter() - start
    return low, results, seconds


def print_table(title: str, scores: dict[str, dict[str, float]], digits: int) -> None:
    """A markdown table: one row per method, one column per photograph, then the mean."""
    photos = list(next(iter(scores.values())))
    print(f"\n{title}\n\n| method | " + " | ".join(photos) + " | mean |")
    print("|---|" + "---|" * (len(photos) + 1))
    for method, row in scores.items():
        values = [*row.values(), float(np.mean(list(row.values())))]
        print(f"| {method} | " + " | ".join(f"{v:.{digits}f}" for v in values) + " |")


def _window(image: Image.Image, box: tuple[int, int], scale: int) -> Image.Image:
    """The figure's window at `box` (top, left in ground-truth pixels) of an image `scale` times smaller, zoomed to
    one panel by nearest."""
    top, left = box[0] // scale, box[1] // scale
    side = WINDOW // scale
    return image.crop((left, top, left + side, top + side)).resize((PANEL, PANEL), Image.Resampling.NEAREST)


def save_figure(path: Path, rows: list[tuple[tuple[int, int], list[tuple[str, Image.Image, int]]]]) -> None:
    """One row per photograph: the window's (top, left) in ground-truth pixels, and its panels as (caption, image,
    how many times smaller than the ground truth the image is)."""
    headers = ["input (x4 smaller, nearest)", "bicubic (PIL)", FIGURE_MODEL.replace("RealESRGAN_", "Real-ESRGAN "),
               "ground truth"]
    font = ImageFont.load_default(size=13)
    width = len(headers) * (PANEL + GAP) + GAP
    height = CAPTION + len(rows) * (PANEL + CAPTION + GAP) + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, header in enumerate(headers):
        draw.text((GAP + column * (PANEL + GAP), 3), header, fill="black", font=font)
    for row, (box, panels) in enumerate(rows):
        y = CAPTION + row * (PANEL + CAPTION + GAP)
        for column, (caption, image, scale) in enumerate(panels):
            x = GAP + column * (PANEL + GAP)
            canvas.paste(_window(image, box, scale), (x, y))
            draw.text((x, y + PANEL + 3), caption, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def measure(size: int, upscalers: dict) -> tuple[dict, list]:
    """Every method on every photograph: tables[metric][method][photograph], and the figure's rows."""
    methods = ["bicubic", "Lanczos", *upscalers]
    tables = {metric: {method: {} for method in methods} for metric in ("psnr_rgb", "psnr_y", "ssim", "seconds")}
    rows = []
    for name, centre in PHOTOS.items():
        image = photograph(name)
        top, left = crop_box(image.shape, centre, size)
        truth = image[top:top + size, left:left + size]
        low, results, seconds = upscale_all(Image.fromarray(truth), upscalers)
        for method, result in results.items():
            output = np.asarray(result)
            tables["psnr_rgb"][method][name] = psnr(truth, output)
            tables["psnr_y"][method][name] = psnr(luma(truth), luma(output))
            tables["ssim"][method][name] = ssim(truth, output)
            tables["seconds"][method][name] = seconds[method]
        if FIGURE_MODEL in results:
            box = crop_box((size, size), (centre[0] - top, centre[1] - left), WINDOW)
            box = (box[0] - box[0] % SCALE, box[1] - box[1] % SCALE)  # on the input's pixel grid
            captions = {m: f"PSNR {tables['psnr_rgb'][m][name]:.2f} dB, SSIM {tables['ssim'][m][name]:.3f}"
                        for m in ("bicubic", FIGURE_MODEL)}
            rows.append((box, [(name, low, SCALE), (captions["bicubic"], results["bicubic"], 1),
                               (captions[FIGURE_MODEL], results[FIGURE_MODEL], 1), ("", Image.fromarray(truth), 1)]))
    return tables, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--size", type=int, default=256, help="side of the ground-truth crop, a multiple of 4")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--upscalers", nargs="+", default=list(UPSCALERS))
    parser.add_argument("--figure", type=Path, default=None, help=f"where to save the figure (PNG; needs "
                                                                  f"{FIGURE_MODEL} among --upscalers)")
    args = parser.parse_args()
    import torch

    from kedavra.upscaling import load_upscaler

    if args.figure is not None and FIGURE_MODEL not in args.upscalers:
        raise SystemExit(f"--figure shows {FIGURE_MODEL}, which is not among --upscalers {' '.join(args.upscalers)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = check_size(args.size)
    upscalers = {name: load_upscaler(name, precision=args.precision, tile=None) for name in args.upscalers}
    tables, rows = measure(size, upscalers)
    print(f"{len(PHOTOS)} photographs, {size}x{size} crops downscaled x{SCALE} by PIL bicubic (antialiased), "
          f"{SHAVE}-pixel border shaved; Real-ESRGAN {args.precision}, untiled; {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    print_table("PSNR on RGB, dB (higher is closer to the original)", tables["psnr_rgb"], 2)
    print_table("PSNR on BT.601 luma Y, dB", tables["psnr_y"], 2)
    print_table("SSIM on RGB (1 = identical)", tables["ssim"], 4)
    print_table("Seconds per image", tables["seconds"], 2)
    if args.figure is not None:
        save_figure(args.figure, rows)
        print(f"\nfigure: {args.figure} ({args.figure.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
