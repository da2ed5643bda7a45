"""`kedavra forward` and `kedavra viz FIGURE`: the visualisations, each written by one command.

    kedavra forward [--image PATH] -o OUT_DIR                 forward-process grid and schedule plots
    kedavra viz forward ...                                   the same, under the viz group
    kedavra viz reverse   PROMPT --model M -o reverse.png     x_t and x̂_0 per step: PNG strip + GIF
    kedavra viz attention PROMPT --model M -o attention.png   per-word cross-attention maps: PNG + GIF
    kedavra viz guidance  PROMPT --model M -o guidance.png    classifier-free guidance taken apart: PNG
    kedavra viz latents   [IMAGE] --model M -o latents.png    VAE latent channels and round trip: PNG

Each prints the files it wrote. Output folders are created. Bad input ends the command with one line on stderr
and exit status 2 (kedavra/cli.py), before the model loads where the check does not need the model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kedavra.api import choose_model, load, resolve_model
from kedavra.diffusion.schedule import SCHEDULE_PRESETS, get_schedule
from kedavra.pipeline.device import check_device, parse_precision
from kedavra.validation import check_int, check_seed
from kedavra.viz.attention import NORMALISATIONS, check_normalise, make_attention_figure
from kedavra.viz.forward import (
    DEFAULT_SEED,
    DEFAULT_SIZE,
    FRAME_TIMESTEPS,
    alpha_bar_table,
    check_size,
    load_image,
    make_forward_figures,
    parse_schedules,
    parse_timesteps,
)
from kedavra.viz.guidance import make_guidance_figure
from kedavra.viz.latents import load_image_for, make_latents_figure
from kedavra.viz.panels import DEFAULT_ROWS
from kedavra.viz.reverse import DEFAULT_COLUMNS, make_reverse_figure
from kedavra.viz.trace import DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, figure_request
from kedavra.viz.trace import DEFAULT_SEED as DEFAULT_GENERATION_SEED

DEFAULT_OUT_DIR = Path("out") / "forward"
DEFAULT_VIZ_DIR = Path("out") / "viz"  # default outputs: out/viz/FIGURE.png (and .gif)
FORWARD_DESCRIPTION = (
    "Write three PNGs: a grid of an image noised at several timesteps under each noise schedule (the same noise "
    "in every tile), the schedules' β_t, ᾱ_t and log-SNR curves, and the signal and noise weights √ᾱ_t and "
    "√(1-ᾱ_t). Prints the paths written.")


# The figures of a generation: name -> (help, description).
GENERATION_FIGURES = {
    "reverse": ("x_t and the predicted x̂_0 at each step of a generation, decoded (PNG strip + GIF)",
                "Generate PROMPT and draw, for the steps of the run, the latent x_t the U-Net saw and the clean x̂_0 "
                "it predicted, both decoded by the VAE: a PNG strip and a GIF with one frame per step beside it "
                "(same name, .gif)."),
    "attention": ("per-word cross-attention maps over the image, per step and averaged (PNG + GIF)",
                  "Generate PROMPT and draw which pixels attend to each word: the U-Net's cross-attention "
                  "probabilities for the prompt, averaged over heads and layers, laid over the image, at chosen "
                  "steps and averaged over all; a GIF with one frame per step beside the PNG."),
    "guidance": ("classifier-free guidance taken apart: cond, uncond, their difference, guided (PNG)",
                 "Generate PROMPT and draw, at chosen steps, the x̂_0 the conditional and the unconditional "
                 "predictions imply, the size of their difference as a heat map, and the guided x̂_0 = "
                 "uncond + w (cond - uncond)."),
}


def register(subparsers) -> None:
    forward = subparsers.add_parser(
        "forward", help="draw the forward (noising) process: an image noised at several t under each schedule",
        description=FORWARD_DESCRIPTION)
    add_forward_arguments(forward)
    viz = subparsers.add_parser(
        "viz", help="visualise a generation: reverse process, attention maps, guidance, latents, forward process",
        description="Draw one figure; `kedavra viz FIGURE --help` lists its options. docs/visualisations.md "
                    "shows each figure and says how to read it.")
    figures = viz.add_subparsers(dest="figure", metavar="FIGURE")
    viz.set_defaults(func=lambda args: _missing_figure(viz))
    add_forward_arguments(figures.add_parser("forward", help="the forward-process figures (as `kedavra forward`)",
                                             description=FORWARD_DESCRIPTION))
    parsers = {}
    for name, (summary, description) in GENERATION_FIGURES.items():
        parsers[name] = figures.add_parser(name, help=summary, description=description)
        _generation_arguments(parsers[name], name)
    parsers["reverse"].add_argument("--columns", type=int, default=DEFAULT_COLUMNS, metavar="N",
                                    help=f"steps shown in the PNG strip, spread over the run (default "
                                         f"{DEFAULT_COLUMNS}; the GIF has all)")
    _at_argument(parsers["attention"])
    parsers["attention"].add_argument(
        "--normalise", default=NORMALISATIONS[0], metavar="|".join(NORMALISATIONS),
        help="words: each word's share of the attention the pixel pays to the prompt's words (start token divided "
             "out); all: its share of all the attention, with the start, end and padding tokens as one more map "
             "(default %(default)s)")
    _at_argument(parsers["guidance"])
    latents = figures.add_parser(
        "latents", help="an image's VAE latent channels and its encode/decode round trip with the error (PNG)",
        description="Encode IMAGE with the model's VAE and draw the image, each latent channel, the decoded "
                    "round trip and its error (MSE and PSNR in the title).")
    latents.add_argument("image", nargs="?", default=None, metavar="IMAGE",
                         help="any image Pillow reads, centre-cropped to a square (default: a built-in drawing)")
    _model_arguments(latents)
    latents.add_argument("--size", type=int, default=None, metavar="PX",
                         help="side in pixels the image is resized to (default: the model's image size)")
    latents.add_argument("--sample-seed", type=int, default=None, metavar="N",
                         help="draw z from the posterior with this seed (default: its mean)")
    latents.add_argument("-o", "--output", default=str(DEFAULT_VIZ_DIR / "latents.png"), metavar="PATH.png",
                         help="the PNG to write (default %(default)s)")
    latents.set_defaults(func=run_latents)


def add_forward_arguments(parser) -> None:
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="RGB image to noise, centre-cropped to a square (default: a built-in drawing of a cat)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"tile side in pixels (default {DEFAULT_SIZE})")
    parser.add_argument("--timesteps", default=",".join(map(str, FRAME_TIMESTEPS)), metavar="T,T,...",
                        help="comma-separated integer timesteps in [0, T-1], one grid column each "
                             "(default %(default)s)")
    parser.add_argument("--schedules", default=",".join(SCHEDULE_PRESETS), metavar="NAME,NAME,...",
                        help="comma-separated schedule presets, one grid row each (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the one noise tensor ε (default 0)")
    parser.add_argument("-o", "--out-dir", default=str(DEFAULT_OUT_DIR), metavar="OUT_DIR",
                        help="folder for the PNGs (default %(default)s)")
    parser.add_argument("--table", action="store_true", help="also print a Markdown table of ᾱ_t and SNR (dB)")
    parser.set_defaults(func=run)


def run(args) -> int:
    size = check_size(args.size)
    schedule_names = parse_schedules(args.schedules)
    timesteps = parse_timesteps(args.timesteps, min(get_schedule(name).T for name in schedule_names))
    image = load_image(args.image, size) if args.image is not None else None
    paths = make_forward_figures(args.out_dir, image=image, size=size, timesteps=timesteps,
                                 schedule_names=schedule_names, seed=args.seed)
    for path in paths.values():
        print(path)
    if args.table:
        print(alpha_bar_table(schedule_names, timesteps))
    return 0


def _missing_figure(parser) -> int:
    parser.print_usage(sys.stderr)
    print("kedavra viz: error: name a figure: forward, reverse, attention, guidance or latents", file=sys.stderr)
    return 2


def _model_arguments(parser) -> None:
    parser.add_argument("--model", metavar="PATH_OR_NAME",
                        help="checkpoint file, diffusers folder or embedded model name (default: the embedded one)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, mps (default: CUDA if present)")
    parser.add_argument("--precision", default="auto", metavar="auto|fp32|bf16|fp16|int8",
                        help="network precision (default auto, as `kedavra generate`)")


def _generation_arguments(parser, figure: str) -> None:
    parser.add_argument("prompt", help="what to draw (A1111 emphasis syntax works, as in `kedavra generate`)")
    _model_arguments(parser)
    parser.add_argument("--negative", default="", metavar="TEXT", help="negative prompt (the unconditional side)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                        help=f"sampler steps (default {DEFAULT_STEPS})")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, metavar="NAME",
                        help=f"sampler name as for `kedavra generate` (default {DEFAULT_SAMPLER})")
    parser.add_argument("--cfg-scale", type=float, default=DEFAULT_GUIDANCE_SCALE, metavar="F",
                        help=f"classifier-free guidance scale w (default {DEFAULT_GUIDANCE_SCALE})")
    parser.add_argument("--seed", type=int, default=DEFAULT_GENERATION_SEED, metavar="N",
                        help=f"seed of the noise (default {DEFAULT_GENERATION_SEED})")
    parser.add_argument("--width", type=int, metavar="PX", help="image width (default: the model's image size)")
    parser.add_argument("--height", type=int, metavar="PX", help="image height (default: the model's image size)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_VIZ_DIR / f"{figure}.png"), metavar="PATH.png",
                        help="the PNG to write; a GIF goes beside it with the same name (default %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_generation_figure)


def _at_argument(parser) -> None:
    parser.add_argument("--at", default=None, metavar="STEP,STEP,...",
                        help=f"step numbers to show, 1 = the first (default: {DEFAULT_ROWS} spread over the run, "
                             "first and last included)")


def parse_at(text: str | None, steps: int) -> list[int] | None:
    """--at "1,10,20" -> 0-based step indices; ValueError unless each is an integer from 1 to `steps`."""
    if text is None:
        return None
    indices = []
    for item in text.split(","):
        try:
            number = int(item.strip())
        except ValueError:
            raise ValueError(f"--at {text!r}: {item.strip()!r} is not a step number; use 1 to {steps}") from None
        if not 1 <= number <= steps:
            raise ValueError(f"--at {text!r}: step {number} is not a step of a {steps}-step run; use 1 to {steps}")
        indices.append(number - 1)
    return indices


def _output(text: str) -> Path:
    path = Path(text).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"-o {text!r} must name a .png file")
    return path


def _load(args):
    device, dtype = check_device(args.device), parse_precision(args.precision)
    return load(resolve_model(choose_model(args.model, None)), device=device, dtype=dtype)


def run_generation_figure(args) -> int:
    output = _output(args.output)
    request = figure_request(args.prompt, args.negative, steps=args.steps, sampler=args.sampler,
                             guidance_scale=args.cfg_scale, seed=args.seed, width=args.width, height=args.height)
    options = {}
    if args.figure == "reverse":
        options["columns"] = check_int("--columns", args.columns, 1)
    else:
        options["at"] = parse_at(args.at, args.steps)
    if args.figure == "attention":
        options["normalise"] = check_normalise(args.normalise)
    if args.figure == "guidance" and args.cfg_scale == 1.0:
        raise ValueError("--cfg-scale 1 runs no unconditional prediction, so there is no guidance to take apart")
    pipe = _load(args)
    request = pipe.check(request)
    output.parent.mkdir(parents=True, exist_ok=True)
    make = {"reverse": make_reverse_figure, "attention": make_attention_figure, "guidance": make_guidance_figure}
    with tqdm(total=args.steps, desc=args.figure, unit="step", file=sys.stderr, disable=args.quiet) as bar:
        written = make[args.figure](pipe, request, output, on_step=lambda i, n: bar.update(1), **options)
    for path in written.values():
        print(path)
    return 0


def run_latents(args) -> int:
    output = _output(args.output)
    if args.image is not None and not Path(args.image).is_file():
        raise ValueError(f"image {args.image!r} does not exist; give an image file Pillow can read")
    check_seed("--sample-seed", args.sample_seed, optional=True)
    pipe = _load(args)
    image = load_image_for(pipe, args.image, args.size)
    generator = None if args.sample_seed is None else torch.Generator().manual_seed(args.sample_seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    path, trip = make_latents_figure(pipe, output, image, generator=generator)
    print(f"{path}  round trip MSE {trip.mse:.5f}, PSNR {trip.psnr:.2f} dB")
    return 0
