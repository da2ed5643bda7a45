"""The shapes data set's figures and the evaluator's accuracy on its own images: what docs/data.md shows.

    .venv/bin/python scripts/shapes_data_report.py                    # figures + 2,000 test renders per size
    .venv/bin/python scripts/shapes_data_report.py --images 300 --no-figures

Writes docs/figures/data/shapes_32.png and shapes_64.png (train items 0-23, 8 to a row, 32 px tiles shown at 2x,
with their captions printed), then scores `--images` test-split renders per size (ground truth from scene(i))
and the wrong prompts built from each (a mirrored placement, a reversed relation, objects swapped), printing the
Markdown tables of docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

from kedavra.data import get_dataset
from kedavra.data.shapes import PromptSpec, ShapesConfig, ShapesDataset
from kedavra.evaluation.shapes_eval import CATEGORIES, evaluate_batch, score_objects
from kedavra.formats.grid import image_grid

FIGURE_ITEMS = 24
FIGURE_COLUMNS = 8
FIGURE_TILE = 64  # pixels a tile is shown at
FIGURE_PADDING = 2
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "next to": "above"}
MIRRORED = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def write_figures(folder: Path) -> list[str]:
    """The 32 and 64 px figures of train items 0-23; returns their captions (the same at both sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for size in (32, 64):
        data = get_dataset("shapes", image_size=size)
        items = [data[i] for i in range(FIGURE_ITEMS)]
        captions = [item["caption"] for item in items]
        tiles = [Image.fromarray(((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8"))
                 .resize((FIGURE_TILE, FIGURE_TILE), Image.Resampling.NEAREST) for item in items]
        image_grid(tiles, columns=FIGURE_COLUMNS, padding=FIGURE_PADDING).save(folder / f"shapes_{size}.png")
    return captions


def wrong_positions(spec: PromptSpec):
    """Prompts whose position the image of `spec` must fail."""
    if spec.kind == "single" and spec.placement not in (None, "middle"):
        yield PromptSpec("single", spec.objects, placement=" ".join(MIRRORED[w] for w in spec.placement.split()))
    if spec.kind == "relation":
        yield PromptSpec("relation", spec.objects, relation=OPPOSITE[spec.relation])
        if spec.relation != "next to":
            yield PromptSpec("relation", spec.objects[::-1], relation=spec.relation)


def measure(images: int) -> None:
    reports, rejected = {}, {}
    for size in (32, 64):
        data = ShapesDataset(ShapesConfig(image_size=size), split="test", size=images, seed=0)
        scenes = [data.scene(i) for i in range(images)]
        start = time.perf_counter()
        reports[size] = evaluate_batch([s.render() for s in scenes], [data.caption(i, s) for i, s in enumerate(scenes)])
        wrong = [score_objects(found, w, size)["position"]
                 for found, s in zip(reports[size].objects, scenes, strict=True) for w in wrong_positions(s.spec)]
        rejected[size] = (len(wrong) - sum(wrong), len(wrong))
        print(f"{size} px: {images} images scored in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("| category | images | 32x32 | 64x64 |\n|---|---:|---:|---:|")
    for category in CATEGORIES:
        counts = reports[32].counts.get(category, 0)
        print(f"| {category} | {counts:,} | {reports[32].accuracy.get(category, float('nan')):.3f} | "
              f"{reports[64].accuracy.get(category, float('nan')):.3f} |")
    print(f"| overall | {images:,} | {reports[32].overall:.3f} | {reports[64].overall:.3f} |")
    for size, (fails, total) in rejected.items():
        print(f"\nwrong positions rejected at {size}x{size}: {fails}/{total}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2_000, help="test renders scored per size (default 2,000)")
    parser.add_argument("--figures", type=Path, default=Path("docs/figures/data"), help="where the figures go")
    parser.add_argument("--no-figures", action="store_true", help="only measure")
    args = parser.parse_args(argv)
    if args.images < 1:
        print(f"error: --images must be at least 1, got {args.images}", file=sys.stderr)
        return 2
    if not args.no_figures:
        captions = write_figures(args.figures)
        print("figure captions: " + "; ".join(f'"{c}"' for c in captions) + "\n")
    measure(args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
