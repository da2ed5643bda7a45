"""Prompt adherence of a model on the shapes grammar: the table in docs/embedded_model.md.

    .venv/bin/python scripts/shapes_adherence.py                                   # the embedded default
    .venv/bin/python scripts/shapes_adherence.py runs/sd/unet/model.safetensors --prompts seen --per-kind 100
    .venv/bin/python scripts/shapes_adherence.py --phrasing canonical paraphrased --sampler euler --guidance-scale 7.5

Prints the evaluator's Markdown table per prompt set; --json writes the summaries, --grid a PNG per set of the
first 16 images of each prompt kind, two rows of 8 per kind (single, count, pair, relation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import kedavra
from kedavra.api import DEFAULT_MODEL
from kedavra.data.shapes import parse_prompt
from kedavra.evaluation.adherence import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    HELD_OUT_CHOICES,
    PHRASINGS,
    measure_adherence,
)
from kedavra.formats.grid import image_grid

GRID_PER_KIND = 16  # images of each prompt kind in a --grid figure


def position_split(result) -> dict:
    """The position category apart for two-object relations and for placed single objects (both count as
    `position` in the evaluator's table): {"relations" | "placements": {"accuracy", "images"}}."""
    split = {}
    for name, kind in (("relations", "relation"), ("placements", "single")):
        scored = [r["position"] for r, p in zip(result.report.results, result.prompts, strict=True)
                  if "position" in r and parse_prompt(p).kind == kind]
        if scored:
            split[name] = {"accuracy": sum(scored) / len(scored), "images": len(scored)}
    return split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model name or path (default: the embedded default)")
    parser.add_argument("--prompts", nargs="+", default=["held-out", "seen"], choices=sorted(HELD_OUT_CHOICES))
    parser.add_argument("--phrasing", nargs="+", default=["canonical"], choices=PHRASINGS,
                        help="prompt wordings: canonical, and/or paraphrased (the grammar's other wordings)")
    parser.add_argument("--per-kind", type=int, default=50, help="prompts of each kind (single, count, pair, relation)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the summaries here")
    parser.add_argument("--grid", type=Path, default=None, help="write PREFIX-<prompts>.png grids")
    args = parser.parse_args(argv)
    try:
        pipe = kedavra.load(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype)
        summaries = {}
        for which in args.prompts:
            for phrasing in args.phrasing:
                result = measure_adherence(pipe, per_kind=args.per_kind, prompts=which, seed=args.seed,
                                           steps=args.steps, sampler=args.sampler,
                                           guidance_scale=args.guidance_scale, phrasing=phrasing)
                name = which if len(args.phrasing) == 1 else f"{which}-{phrasing}"
                summaries[name] = result.summary()
                print(f"## {which} prompts, {phrasing} ({len(result.images)} images, {result.seconds:.1f} s)\n")
                print(result.report.table() + "\n")
                split = position_split(result)
                summaries[name]["position_split"] = split
                print(", ".join(f"position on {k}: {v['accuracy']:.3f} ({v['images']})" for k, v in split.items())
                      + "\n", flush=True)
                if args.grid:
                    shown = [image for kind in range(4)
                             for image in result.images[kind * args.per_kind : kind * args.per_kind + GRID_PER_KIND]]
                    image_grid(shown, columns=8).save(f"{args.grid}-{name}.png")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
