"""Do position words move things? The same seeds drawn with prompts that differ only in a position word.

    .venv/bin/python scripts/shapes_layout_probe.py                       # the embedded default
    .venv/bin/python scripts/shapes_layout_probe.py runs/x/unet/model.safetensors --seeds 32

For each contrast (placements "on the left" / "on the right" and "at the top" / "at the bottom" of one object;
relations "A left of B" / "A right of B" and "A above B" / "A below B"), every seed is drawn once with each word, and
the evaluator's detector (kedavra.evaluation.shapes_eval) finds the named objects. Printed per contrast: the mean
shift along the contrast's axis between the two words (the object's centre for a placement, A's centre minus B's for
a relation; pixels, positive = the way the words say), and the share of seeds where it is 4 px or more that way. A
model whose layout comes from the seed alone scores 0 px and 0 %; one that follows the words moves things by about
a third of the 32-pixel image. Seeds where an object is not found are left out.

--inside also prints where a word is lost: for word pairs that differ in position (and, for scale, in colour or
shape), the relative difference of the text encoder's token states, and of the U-Net's x_0 prediction from the same
pure noise at t = 999, 800 and 600 (32 noise draws): rms(a - b) / rms(a), in fp32 (bf16's rounding, amplified by
1/√ᾱ_t in x_0, would be larger than the differences).

--leak prints what x_t alone says about the layout, which the words then need not: the data set's images for each
contrast's two prompts (LEAK_IMAGES of each) go through the model's VAE; a linear template (the difference of the two
prompts' mean latents, from half of them) tells the other half's x_t = √ᾱ_t z + √(1-ᾱ_t) ε apart at each of
LEAK_STEPS. A share near 0.5 means x_t hides the layout and only the words can place things; near 1, x_t shows it.
The template is not the best possible classifier, so the shares are lower bounds on what x_t reveals.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import kedavra
from kedavra.api import DEFAULT_MODEL
from kedavra.data.folder import image_to_tensor
from kedavra.data.shapes import prompt_to_scene
from kedavra.diffusion.forward_process import add_noise, to_x0_eps
from kedavra.evaluation.adherence import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from kedavra.evaluation.shapes_eval import detect_objects

OBJECTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"))
PAIRS = ((OBJECTS[0], OBJECTS[1]), (OBJECTS[2], OBJECTS[3]), (OBJECTS[1], OBJECTS[2]))
MOVED_PX = 4.0
# contrast: (kind, axis 0 = x / 1 = y, the word that should give the smaller coordinate, the larger one)
CONTRASTS = {
    "placement left / right": ("single", 0, "on the left", "on the right"),
    "placement top / bottom": ("single", 1, "at the top", "at the bottom"),
    "relation left of / right of": ("relation", 0, "left of", "right of"),
    "relation above / below": ("relation", 1, "above", "below"),
}


def find(objects, colour: str, shape: str):
    """The largest of the detected `objects` of that colour and shape (None if there is none)."""
    found = [o for o in objects if o.colour == colour and o.shape == shape]
    return max(found, key=lambda o: o.area) if found else None


def coordinate(image, kind: str, axis: int, subject, other) -> float | None:
    """The subject's centre along `axis`, minus the other object's for a relation; None where one is missing."""
    objects = detect_objects(image)  # once per image, for both named objects
    a = find(objects, *subject)
    b = find(objects, *other) if kind == "relation" else None
    if a is None or (kind == "relation" and b is None):
        return None
    return a.centre[axis] - (b.centre[axis] if b is not None else 0.0)


def probe(pipe, seeds: int, **settings) -> dict[str, tuple[float, float, int]]:
    """contrast -> (mean shift in px the way the words say, share moved >= MOVED_PX that way, seeds scored)."""
    out = {}
    for name, (kind, axis, low, high) in CONTRASTS.items():
        shifts = []
        cases = [(o, None) for o in OBJECTS] if kind == "single" else list(PAIRS)
        for subject, other in cases:
            for seed in range(seeds):
                values = []
                for word in (low, high):
                    prompt = (f"a {subject[0]} {subject[1]} {word}" if kind == "single"
                              else f"a {subject[0]} {subject[1]} {word} a {other[0]} {other[1]}")
                    image = pipe(prompt, seed=seed, **settings).images[0]
                    values.append(coordinate(image, kind, axis, subject, other))
                if None not in values:
                    shifts.append(values[1] - values[0])
        shifts = np.array(shifts)
        out[name] = (float(shifts.mean()) if len(shifts) else float("nan"),
                     float((shifts >= MOVED_PX).mean()) if len(shifts) else float("nan"), len(shifts))
    return out


INSIDE_PAIRS = (("a red circle on the left", "a red circle on the right"),
                ("a red circle at the top", "a red circle at the bottom"),
                ("a red circle left of a blue square", "a red circle right of a blue square"),
                ("a red circle above a blue square", "a red circle below a blue square"),
                ("a red circle", "a blue circle"), ("a red circle", "a red square"))
INSIDE_STEPS = (999, 800, 600)


@torch.no_grad()
def inside(pipe, draws: int = 32) -> list[str]:
    """Markdown rows: prompt pair, text-state difference, x_0-prediction difference at each of INSIDE_STEPS."""
    model = pipe.model
    dtype = next(model.unet.parameters()).dtype
    alpha_bar = model.config.schedule.alpha_bar.float()
    side = pipe.config.image_size // model.config.vae.downsample_factor
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(draws, model.config.unet.in_channels, side, side, generator=generator)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).float().pow(2).mean().sqrt() / a.float().pow(2).mean().sqrt())

    rows = []
    for first, second in INSIDE_PAIRS:
        contexts = [model.text_encoder(model.tokenizer([p]).to(pipe.device)) for p in (first, second)]  # (1, L, D)
        cells = [f"{rel(*contexts):.3f}"]
        for t in INSIDE_STEPS:
            a = alpha_bar[t]
            x0 = []
            for context in contexts:
                out = model.unet(x_t.to(pipe.device, dtype), torch.full((draws,), t, device=pipe.device),
                                 context.expand(draws, -1, -1)).float().cpu()
                x0.append(to_x0_eps(out, x_t, a, model.config.prediction_type)[0])
            cells.append(f"{rel(*x0):.3f}")
        rows.append(f"| {first} / {second.split(' ', 1)[1]} | " + " | ".join(cells) + " |")
    return rows


LEAK_PROMPTS = (INSIDE_PAIRS[0], INSIDE_PAIRS[1], INSIDE_PAIRS[2], INSIDE_PAIRS[3])
LEAK_STEPS = (999, 950, 900, 800, 700, 500)
LEAK_IMAGES = 400


@torch.no_grad()
def leak(pipe, images: int = LEAK_IMAGES) -> list[str]:
    """Markdown rows: prompt pair, then the share of held-out x_t a linear template assigns to the right prompt at
    each of LEAK_STEPS (fp32, VAE posterior means, fixed seeds)."""
    model = pipe.model
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    alpha_bar = model.config.schedule.alpha_bar.float()

    def latents(prompt: str) -> torch.Tensor:  # (images, C, h, w), scaled as the U-Net sees them
        batch = torch.stack([image_to_tensor(prompt_to_scene(prompt, rng).render()) for _ in range(images)])
        return model.vae.encode(batch.to(pipe.device, next(model.vae.parameters()).dtype)).mean.float().cpu() * (
            model.config.vae.scaling_factor)

    rows, half = [], images // 2
    for first, second in LEAK_PROMPTS:
        z = [latents(first), latents(second)]
        template = z[0][:half].mean(0) - z[1][:half].mean(0)  # (C, h, w)
        centre = (z[0][:half].mean(0) + z[1][:half].mean(0)) / 2
        cells = []
        for t in LEAK_STEPS:
            a = alpha_bar[t]
            right = 0
            for sign, held_out in ((1, z[0][half:]), (-1, z[1][half:])):
                noise = torch.randn(held_out.shape, generator=generator)
                score = ((add_noise(held_out, noise, a) - a.sqrt() * centre) * template).flatten(1).sum(1)  # (N,)
                right += int((sign * score > 0).sum())
            cells.append(f"{right / (2 * (images - half)):.2f}")
        rows.append(f"| {first} / {second.split(' ', 1)[1]} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="model name or path (default: the embedded default)")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per object or pair (default 16)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--inside", action="store_true", help="also where a word is lost: text states, x_0 predictions")
    parser.add_argument("--leak", action="store_true", help="only what x_t alone shows of the layout, at each t")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be at least 1, got {args.seeds}", file=sys.stderr)
        return 2
    try:
        if args.leak:
            rows = leak(kedavra.load(args.model or DEFAULT_MODEL, dtype=torch.float32))
            print("| prompts | " + " | ".join(f"t = {t}" for t in LEAK_STEPS) + " |")
            print("|---|" + "---|" * len(LEAK_STEPS))
            print("\n".join(rows))
            return 0
        pipe = kedavra.load(args.model or DEFAULT_MODEL)
        result = probe(pipe, args.seeds, steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"| contrast | mean shift the words' way (px) | moved >= {MOVED_PX:.0f} px that way | seeds scored |")
    print("|---|---|---|---|")
    for name, (shift, moved, n) in result.items():
        print(f"| {name} | {shift:+.1f} | {100 * moved:.0f} % | {n} |")
    if args.inside:
        print("\n| prompts | text states | " + " | ".join(f"x_0 at t = {t}" for t in INSIDE_STEPS) + " |")
        print("|---|---|" + "---|" * len(INSIDE_STEPS))
        print("\n".join(inside(kedavra.load(args.model or DEFAULT_MODEL, dtype=torch.float32))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
