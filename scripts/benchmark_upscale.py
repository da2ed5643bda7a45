"""kedavra's upscalers (fp32 and bf16) against ncnn's CPU run of the same files, same image, same thread count.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_upscale.py --threads 1 --size 128

Prints seconds per image (best of --repeats after one warm-up run) and the ratios ncnn / kedavra (above 1: kedavra
is faster). The image is a crop of scikit-image's astronaut photograph; ncnn runs with fp16 storage and arithmetic
off, like the parity tests (its default fp16 paths would be faster and less exact).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image
from timing import best_time

from kedavra.upscaling.upscaler import KNOWN_UPSCALERS, from_image, load_upscaler, weights_folder


def ncnn_runner(stem: str, pixels: np.ndarray, threads: int):
    import ncnn  # the oracle; kedavra itself never imports it

    net = ncnn.Net()
    for option in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage",
                   "use_vulkan_compute"):
        setattr(net.opt, option, False)
    net.opt.num_threads = threads
    folder = weights_folder()
    net.load_param(str(folder / f"{stem}.param"))
    net.load_model(str(folder / f"{stem}.bin"))

    def run():
        extractor = net.create_extractor()
        extractor.input("data", ncnn.Mat(pixels))
        return extractor.extract("output")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=128, help="side of the square input crop")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--upscalers", nargs="+", default=["RealESRGAN_x4plus", "realesr-animevideov3-x4"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from skimage import data

    image = Image.fromarray(data.astronaut()[100:100 + args.size, 150:150 + args.size])
    tensor = from_image(image)
    pixels = np.ascontiguousarray(tensor[0].numpy())
    print(f"{args.size}x{args.size} input, {args.threads} thread(s), torch {torch.__version__}, untiled")
    print(f"{'upscaler':28s} {'ncnn fp32':>10s} {'kedavra fp32':>13s} {'kedavra bf16':>13s} "
          f"{'ncnn/fp32':>10s} {'ncnn/bf16':>10s}")
    for name in args.upscalers:
        stem = next(k.stem for k in KNOWN_UPSCALERS if k.name == name)
        ncnn_s = best_time(ncnn_runner(stem, pixels, args.threads), args.repeats)
        seconds = {}
        for precision in ("fp32", "bf16"):
            upscaler = load_upscaler(name, precision=precision, tile=None)
            seconds[precision] = best_time(lambda u=upscaler: u.upscale_tensor(tensor), args.repeats)
        print(f"{name:28s} {ncnn_s:9.2f}s {seconds['fp32']:12.2f}s {seconds['bf16']:12.2f}s "
              f"{ncnn_s / seconds['fp32']:9.2f}x {ncnn_s / seconds['bf16']:9.2f}x")


if __name__ == "__main__":
    main()
