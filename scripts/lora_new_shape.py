"""A LoRA that teaches the embedded model `kedavra-shapes` a shape it has never seen, the hexagon, with its prompt
adherence before and after (docs/adapters.md, "A LoRA for the embedded model").

    .venv/bin/python scripts/lora_new_shape.py --out out/lora_hexagon --json out/lora_hexagon/result.json \
        --figure docs/figures/lora_hexagon.png           # one thread: ~11 min of training, ~3.5 min of measuring

1. Writes a folder of captioned 32x32 images (`kedavra train --data FOLDER`'s <stem>.png + <stem>.txt convention):
   hexagons drawn exactly as the shapes data set draws its shapes (its prompt sampler, sizes, placement, palette and
   backgrounds; kedavra/data/shapes.py), captioned in its grammar ("a red hexagon", "a large blue hexagon", "two
   green hexagons"), in every colour but HELD_OUT_COLOURS; and, mixed in against forgetting, the first images of the
   data set's own train split (with seed 0, images the model was trained on).
2. Trains a LoRA on it through the real command, `kedavra train --init kedavra-shapes --lora RANK
   --lora-text-encoder --data FOLDER ...` (the text encoder has never seen the word "hexagon": its tokens "hex" and
   "agon" were never in a caption).
3. Measures, with the same prompts and seeds, the model alone and with the LoRA merged (`Pipeline.load_lora`):
   hexagon prompts in the trained and the held-out colours, scored by the shapes evaluator with the hexagon among its
   templates; circle prompts, to see how often the evaluator reads a hexagon where none was asked for; and the
   data set's own held-out and seen prompts (kedavra.evaluation.adherence, today's evaluator), for what the LoRA
   costs on what the model already knew.
4. Prints a Markdown table, writes --json and a before/after figure (--figure).

Everything is a function of --seed. Pass --lora FILE to measure a LoRA trained before instead of training one.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import kedavra
from kedavra.api import DEFAULT_MODEL, resolve_model
from kedavra.checkpoint import load_model
from kedavra.cli import main as kedavra_main
from kedavra.data.folder import image_to_tensor
from kedavra.data.shapes import (
    PALETTE,
    PROMPT_KINDS,
    SHAPES,
    PromptSpec,
    Scene,
    ShapesConfig,
    ShapesDataset,
    prompt_to_scene,
    sample_prompt,
)
from kedavra.evaluation.adherence import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, measure_adherence
from kedavra.evaluation.shapes_eval import CATEGORIES, detect_objects, score_objects
from kedavra.formats.grid import image_grid
from kedavra.validation import check_int

HEXAGON = "hexagon"  # an outline of kedavra.data.shape_drawing.OUTLINES that the data set's SHAPES leave out
# The shapes grammar's PromptSpec only names SHAPES, so a hexagon prompt is held as the prompt of a stand-in shape
# and said and drawn with the hexagon in its place: the prompt sampler, sizes, placement and backgrounds are the
# data set's own, and they never depend on the shape. A circle, because "circle"/"circles" is a whole word.
STAND_IN = "circle"
HELD_OUT_COLOURS = ("orange", "purple", "white")  # never worn by a hexagon in the folder: asked for in evaluation
TRAINED_COLOURS = tuple(c for c in PALETTE if c not in HELD_OUT_COLOURS)
CANDIDATES = (*SHAPES, HEXAGON)  # the evaluator's templates when it looks for hexagons
# The data set's kinds that name one shape (single, count), in its proportions (0.4 : 0.2).
HEXAGON_KIND_WEIGHTS = (2 / 3, 1 / 3, 0.0, 0.0)
FOLDER_STREAM = 100  # seed streams of their own: the folder's hexagons, the evaluation prompts, the VAE's test
PROMPT_STREAM = 101
CEILING_STREAM = 102
FIGURE_COLUMNS = 8
FIGURE_SCALE = 2  # the 32 px images enlarged (nearest neighbour) in the figure


def hexagon_config(colours: tuple[str, ...]) -> ShapesConfig:
    """The shapes data set's config for one-shape prompts of the stand-in shape in `colours`."""
    return ShapesConfig(shapes=(STAND_IN,), colours=colours, kind_weights=HEXAGON_KIND_WEIGHTS,
                        placement_probability=0.0, hold_out=False)


def hexagon_caption(spec: PromptSpec) -> str:
    """The caption of a stand-in prompt with the hexagon in its place: 'two red circles' -> 'two red hexagons'."""
    return re.sub(rf"\b{STAND_IN}", HEXAGON, spec.caption)


def hexagon_scene(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A scene that realises the stand-in prompt `spec` exactly as the data set would (prompt_to_scene), every
    object a hexagon. Its `caption` is still the stand-in's; `hexagon_caption` says it."""
    scene = prompt_to_scene(spec, rng, hexagon_config(tuple(PALETTE)))  # the colour is named: any palette will do
    return replace(scene, objects=tuple(replace(o, shape=HEXAGON) for o in scene.objects))


def hexagon_prompts(colours: tuple[str, ...], per_kind: int, seed: int) -> list[PromptSpec]:
    """`per_kind` stand-in prompts of each kind (single, count) in `colours`, from the evaluation's seed stream."""
    rng = np.random.default_rng([seed, PROMPT_STREAM])
    prompts = []
    for kind in ("single", "count"):
        only = replace(hexagon_config(colours), kind_weights=tuple(float(k == kind) for k in PROMPT_KINDS))
        prompts += [sample_prompt(only, rng) for _ in range(per_kind)]
    return prompts


def write_folder(folder: Path, *, hexagons: int, grammar: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write `hexagons` hexagon images in TRAINED_COLOURS and the first `grammar` images of the shapes data set's
    train split (seed `seed`) as NAME.png + NAME.txt into the new or empty `folder`; returns (NAME, caption) pairs.
    Hexagon i is drawn from its own generator, as the data set draws item i."""
    check_int("hexagons", hexagons, low=1)
    check_int("grammar", grammar, low=0)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"folder {folder} is not empty; give a new one (its files would be trained on too)")
    folder.mkdir(parents=True, exist_ok=True)
    config = hexagon_config(TRAINED_COLOURS)
    written = []
    for index in range(hexagons):
        rng = np.random.default_rng([seed, FOLDER_STREAM, index])
        spec = sample_prompt(config, rng)
        written.append((f"hexagon_{index:04d}", hexagon_caption(spec), hexagon_scene(spec, rng)))
    if grammar:
        data = ShapesDataset(split="train", size=grammar, seed=seed)
        scenes = [data.scene(index) for index in range(grammar)]
        written += [(f"shapes_{index:04d}", scene.caption, scene) for index, scene in enumerate(scenes)]
    for name, caption, scene in written:
        scene.render().save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return [(name, caption) for name, caption, _ in written]


def score_hexagon_prompt(image, spec: PromptSpec) -> dict[str, bool]:
    """The evaluator's categories for a hexagon prompt held as the stand-in prompt `spec`: objects detected with
    the hexagon among the templates, hexagon and stand-in names swapped, scored against `spec` (so a drawn circle
    counts as what it is, a shape that was not asked for)."""
    swap = {HEXAGON: STAND_IN, STAND_IN: HEXAGON}
    objects = [replace(o, shape=swap.get(o.shape, o.shape)) for o in detect_objects(image, CANDIDATES)]
    return score_objects(objects, spec)


def generate(pipe, captions: list[str], seed: int, batch_size: int = 50) -> list[Image.Image]:
    """Image i of `captions` with seed `seed + i`, in adherence's settings (kedavra.evaluation.adherence)."""
    size = pipe.model.config.image_size
    images = []
    for first in range(0, len(captions), batch_size):
        result = pipe(captions[first:first + batch_size], steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER,
                      guidance_scale=DEFAULT_GUIDANCE, seed=seed + first, width=size, height=size)
        images += result.images
    return images


def summarise(results: list[dict[str, bool]]) -> dict:
    """Accuracy and count per category, and the share of images passing all their categories."""
    accuracy, counts = {}, {}
    for category in CATEGORIES:
        scored = [r[category] for r in results if category in r]
        if scored:
            counts[category], accuracy[category] = len(scored), sum(scored) / len(scored)
    return {"accuracy": accuracy, "counts": counts, "overall": sum(all(r.values()) for r in results) / len(results),
            "images": len(results)}


def measure_hexagons(pipe, per_kind: int, seed: int) -> tuple[dict, dict[str, list[Image.Image]]]:
    """Hexagon prompts in the trained and the held-out colours, and circle prompts in all colours (how often is a
    hexagon found where none was asked for): {set: summary}, {set: images}."""
    summaries, images = {}, {}
    for name, colours in (("trained colours", TRAINED_COLOURS), ("held-out colours", HELD_OUT_COLOURS)):
        specs = hexagon_prompts(colours, per_kind, seed)
        images[name] = generate(pipe, [hexagon_caption(s) for s in specs], seed)
        summaries[name] = summarise([score_hexagon_prompt(im, s) for im, s in zip(images[name], specs, strict=True)])
    specs = hexagon_prompts(tuple(PALETTE), per_kind, seed)
    images["circles"] = generate(pipe, [s.caption for s in specs], seed)
    found = [detect_objects(im, CANDIDATES) for im in images["circles"]]
    summaries["circles"] = summarise([score_objects(objects, spec) for objects, spec in zip(found, specs, strict=True)])
    with_hexagon = [any(o.shape == HEXAGON for o in objects) for objects in found]
    summaries["circles"]["hexagon_found"] = sum(with_hexagon) / len(found)
    return summaries, images


def vae_ceiling(model: str, per_kind: int, seed: int) -> dict:
    """The evaluator on the model's VAE reconstructions (posterior mean, fp32) of drawn hexagon scenes, one per
    evaluation prompt: how many hexagons the decoder, which the LoRA leaves as it is, can show at all."""
    vae = load_model(resolve_model(model)).vae.float().eval()
    summaries = {}
    for name, colours in (("trained colours", TRAINED_COLOURS), ("held-out colours", HELD_OUT_COLOURS)):
        specs = hexagon_prompts(colours, per_kind, seed)
        scenes = [hexagon_scene(s, np.random.default_rng([seed, CEILING_STREAM, i])) for i, s in enumerate(specs)]
        images = torch.stack([image_to_tensor(scene.render()) for scene in scenes])  # (B, 3, H, W)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(images).mean)  # (B, 3, H, W)
        summaries[name] = summarise([score_hexagon_prompt(x, s) for x, s in zip(decoded, specs, strict=True)])
    return summaries


def measure(pipe, args) -> tuple[dict, dict[str, list[Image.Image]]]:
    """Every measurement of one model state: the hexagon sets and the data set's held-out and seen prompts."""
    start = time.perf_counter()
    summaries, images = measure_hexagons(pipe, args.hexagon_per_kind, args.seed)
    for which in ("held-out", "seen"):
        result = measure_adherence(pipe, per_kind=args.per_kind, prompts=which, seed=args.seed)
        summaries[f"grammar {which}"] = result.summary()
        images[f"grammar {which}"] = result.images
    summaries["seconds"] = round(time.perf_counter() - start, 1)
    return summaries, images


def train_command(args, folder: Path, run_dir: Path) -> list[str]:
    """`kedavra train`'s arguments for the LoRA run."""
    command = ["train", "--init", DEFAULT_MODEL, "--lora", str(args.rank), "--data", str(folder),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
               "--seed", str(args.seed), "--sample-interval", "0", "--checkpoint-interval", str(args.steps),
               "--threads", str(args.threads), "--no-progress", "-o", str(run_dir)]
    for flag in ("lora_text_encoder", "lora_conv"):
        if getattr(args, flag):
            command.insert(5, "--" + flag.replace("_", "-"))
    return command


def train_lora(args, folder: Path, run_dir: Path) -> tuple[Path, dict]:
    """Run `kedavra train` in this process; (the LoRA file, what the run did)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"run folder {run_dir} is not empty (kedavra train would resume it); give a new --out")
    command = train_command(args, folder, run_dir)
    print("kedavra " + " ".join(command), flush=True)
    start = time.perf_counter()
    status = kedavra_main(command)
    seconds = time.perf_counter() - start
    if status != 0:
        raise ValueError(f"kedavra train exited with status {status}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [line["loss"] for line in lines if line.get("loss") is not None]  # one per --log-interval steps
    tail = losses[-max(1, len(losses) // 10):] or [math.nan]
    report = {"command": "kedavra " + " ".join(command), "seconds": round(seconds, 1),
              "first_logged_loss": losses[0] if losses else math.nan, "last_tenth_mean_loss": sum(tail) / len(tail)}
    return run_dir / "lora.safetensors", report


def figure(before: dict[str, list[Image.Image]], after: dict[str, list[Image.Image]]) -> Image.Image:
    """Rows: hexagon prompts before, after (the first four trained-colour, then four held-out-colour singles),
    then the data set's held-out prompts before, after (its first single-object prompts)."""
    half = FIGURE_COLUMNS // 2
    rows = []
    for images in (before, after):
        rows += images["trained colours"][:half] + images["held-out colours"][:half]
    for images in (before, after):
        rows += images["grammar held-out"][:FIGURE_COLUMNS]
    grid = image_grid(rows, columns=FIGURE_COLUMNS, padding=1, background=(255, 255, 255))
    return grid.resize((grid.width * FIGURE_SCALE, grid.height * FIGURE_SCALE), Image.Resampling.NEAREST)


def standard_error(p: float, n: int) -> float:
    """The binomial standard error of a share p measured on n images."""
    return math.sqrt(p * (1 - p) / n)


def table(before: dict, after: dict) -> str:
    """The Markdown table: per set and category, images, before and after with their standard errors."""
    lines = ["| prompts | category | images | before | after |", "|---|---|---:|---|---|"]
    for name in ("trained colours", "held-out colours", "circles", "grammar held-out", "grammar seen"):
        label = {"trained colours": "hexagon, trained colours", "held-out colours": "hexagon, held-out colours",
                 "circles": "circle (control)"}.get(name, name.replace("grammar", "data set,"))
        b, a = before[name], after[name]
        rows = [(c, b["counts"][c], b["accuracy"][c], a["accuracy"][c]) for c in b["accuracy"]]
        if name == "circles":
            rows = [r for r in rows if r[0] == "single_object"]
            rows.append(("hexagon found", b["images"], b["hexagon_found"], a["hexagon_found"]))
        rows.append(("overall", b["images"], b["overall"], a["overall"]))
        for category, n, p_before, p_after in rows:
            digits = 3 if category in ("overall", "hexagon found") else 2
            lines.append(f"| {label} | {category} | {n} | {p_before:.{digits}f} ± {standard_error(p_before, n):.2f} | "
                         f"{p_after:.{digits}f} ± {standard_error(p_after, n):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/lora_hexagon"), help="folder for the data and the run")
    parser.add_argument("--seed", type=int, default=0, help="the folder's, the run's and the evaluation's seed")
    parser.add_argument("--hexagons", type=int, default=300, help="hexagon images in the folder")
    parser.add_argument("--grammar", type=int, default=300, help="images of the shapes data set mixed in")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-text-encoder", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lora-conv", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hexagon-per-kind", type=int, default=100, help="hexagon prompts of each kind (single, "
                        "count) per colour set")
    parser.add_argument("--per-kind", type=int, default=50, help="the data set's prompts of each kind per set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lora", type=Path, default=None, help="measure this LoRA instead of training one")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--figure", type=Path, default=None, help="write the before/after figure here")
    args = parser.parse_args(argv)
    try:
        torch.set_num_threads(check_int("--threads", args.threads, 1))
        result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "held_out_colours": HELD_OUT_COLOURS}
        lora = args.lora
        if lora is None:
            folder = args.out / "data"
            written = write_folder(folder, hexagons=args.hexagons, grammar=args.grammar, seed=args.seed)
            result["folder"] = {"path": str(folder), "images": len(written), "hexagons": args.hexagons,
                                "grammar": args.grammar, "first_captions": [c for _, c in written[:5]]}
            lora, result["training"] = train_lora(args, folder, args.out / "run")
        result["vae_ceiling"] = vae_ceiling(DEFAULT_MODEL, args.hexagon_per_kind, args.seed)
        pipe = kedavra.load(DEFAULT_MODEL)
        before, images_before = measure(pipe, args)
        pipe.load_lora(lora)
        after, images_after = measure(pipe, args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result.update(lora=str(lora), before=before, after=after)
    print(table(before, after))
    for name, summary in result["vae_ceiling"].items():
        print(f"VAE ceiling, hexagon {name}: overall {summary['overall']:.2f} of {summary['images']} drawn scenes "
              f"through the VAE ({', '.join(f'{c} {p:.2f}' for c, p in summary['accuracy'].items())})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        figure(images_before, images_after).save(args.figure, optimize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
