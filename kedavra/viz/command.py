"""`kedavra forward`: draw the forward-process figures (noise grid, schedule curves, signal/noise weights)."""

from __future__ import annotations

from pathlib import Path

from kedavra.schedule import SCHEDULE_PRESETS, get_schedule
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

DEFAULT_OUT_DIR = Path("out") / "forward"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "forward", help="draw the forward (noising) process: an image noised at several t under each schedule",
        description="Write three PNGs: a grid of an image noised at several timesteps under each noise schedule "
                    "(the same noise in every tile), the schedules' β_t, ᾱ_t and log-SNR curves, and the signal "
                    "and noise weights √ᾱ_t and √(1-ᾱ_t). Prints the paths written.")
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
