"""The most prompt adherence a model's VAE leaves room for: the shapes evaluator on VAE reconstructions of the
data set's own test images (the images score 1.000 in every category; whatever the reconstructions lose, no U-Net
sampling through this decoder can win back). The "VAE ceiling" table of docs/embedded_model.md.

    .venv/bin/python scripts/vae_adherence_ceiling.py                              # the embedded default's VAE
    .venv/bin/python scripts/vae_adherence_ceiling.py runs/vae/model.safetensors -n 1000

Each image goes through the encoder's posterior mean and the decoder, in fp32.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from PIL import Image

from kedavra.api import DEFAULT_MODEL, resolve_model
from kedavra.checkpoint import load_model
from kedavra.data.shapes import ShapesDataset
from kedavra.evaluation.shapes_eval import evaluate_batch

BATCH = 100


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> an 8-bit RGB image."""
    values = ((pixels.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).round()  # (H, W, 3)
    return Image.fromarray(values.astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model name or path (its VAE is used)")
    parser.add_argument("-n", "--images", type=int, default=400, help="test-split images (default 400)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    vae = load_model(resolve_model(args.model)).vae.float().eval()
    data = ShapesDataset(split="test", size=args.images)
    items = [data[i] for i in range(args.images)]
    originals, reconstructions = [], []
    for start in range(0, args.images, BATCH):
        images = torch.stack([item["image"] for item in items[start:start + BATCH]])  # (B, 3, H, W)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(images).mean)
        originals += [to_image(x) for x in images]
        reconstructions += [to_image(x) for x in decoded]
    captions = [item["caption"] for item in items]
    print(f"{args.model}: {args.images} test images of the shapes data set\n")
    print("the images themselves:\n" + evaluate_batch(originals, captions).table() + "\n")
    print("their VAE reconstructions:\n" + evaluate_batch(reconstructions, captions).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
