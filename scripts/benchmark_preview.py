"""What a live preview costs: TAESD's decoder against SD's VAE decoder and one guided U-Net step, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_preview.py --threads 1 --size 512
    .venv/bin/python scripts/benchmark_preview.py --size 512          # torch's default thread count

SD 1.5's VAE and U-Net at their real shapes with random weights (the cost of a convolution does not depend on its
weights) and TAESD at its real shape (kedavra.networks.taesd), on one 512x512 image's 64x64 latents, in fp32 and bf16,
as the pipeline runs them (channels-last, oneDNN-packed weights: Pipeline's own set-up). Prints seconds per call
(best of --repeats after a warm-up) and the ratios VAE / TAESD and U-Net step / TAESD.
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time

from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.networks.taesd import TinyAutoencoder, get_tiny_autoencoder_config
from kedavra.pipeline.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size} image")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, args.size // 8, args.size // 8), generator=generator)
    print("| precision | TAESD decode | VAE decode | U-Net step (guided) | VAE / TAESD | U-Net step / TAESD |")
    print("|---|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        taesd, vae, step = measure(precision, latents, generator, args.repeats)
        print(f"| {precision} | {taesd:.3f} s | {vae:.3f} s | {step:.3f} s | {vae / taesd:.1f}x | "
              f"{step / taesd:.1f}x |")


def measure(precision: str, latents: torch.Tensor, generator: torch.Generator, repeats: int):
    """(TAESD decode, VAE decode, guided U-Net call) seconds in `precision`."""
    torch.manual_seed(0)
    pipe = Pipeline(StableDiffusion(ModelConfig.from_preset("sd15")), dtype=precision)
    pipe.preview_decoder = TinyAutoencoder(get_tiny_autoencoder_config("taesd"), encoder=False).eval().to(
        dtype=pipe.dtype).to(memory_format=torch.channels_last)
    context = torch.randn((2, 77, 768), generator=generator).to(pipe.dtype)
    t = torch.tensor([500.0, 500.0])

    def unet_step():
        with torch.no_grad():
            pipe.model.unet(torch.cat([latents, latents]).to(pipe.dtype), t, context)

    return (best_time(lambda: pipe.preview(latents), repeats), best_time(lambda: pipe.decode(latents), repeats),
            best_time(unet_step, repeats))

if __name__ == "__main__":
    main()
