"""`kedavra generate`: text to image, image to image and inpainting from the command line.

    kedavra generate "a photo of a cat" --model v1-5-pruned-emaonly.safetensors -o cat.png
    kedavra generate "a cat, oil painting" --model m.safetensors --init-image cat.png --strength 0.6 -o art.png
    kedavra generate --from-png cat.png --model m.safetensors -o again.png     # the same pixels again

Every PNG carries its generation parameters in AUTOMATIC1111's "parameters" text (kedavra.formats.png_info), with the
seed of that image, so `--from-png` (or A1111's "PNG Info" tab) reads them back. The settings of a run come, in
order of precedence, from the flags given, the `--from-png` file, and the defaults below.

The flags, the PNG's parameters and the images become one `GenerationRequest`, checked before the model loads
wherever the check does not need the model (sizes, steps, strength, sampler, images, output folder, the PNG's
parameters); its model-dependent checks (a side that is not a multiple of the model's VAE factor, more steps than
training timesteps) run right after it loads (`Pipeline.check`), before sampling. Errors name the request's field
(`steps`, `guidance_scale`, ...), which the flag of the same name sets (`--cfg-scale` sets `guidance_scale`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from kedavra.adapters.lora_file import locate_lora
from kedavra.api import choose_model, load, model_identity, resolve_model
from kedavra.commands.generate_request import (
    DEFAULT_CFG_SCALE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    LOG_UNIFORM,
    RESIZE_MODE_FLAGS,
    lora_flag,
    resolve_request,
)
from kedavra.diffusion.rng import RNG_SOURCES
from kedavra.diffusion.sigmas import CONVENTIONS
from kedavra.diffusion.step_schedule import log_uniform_sigmas, table_sigma_range
from kedavra.diffusion.timesteps import SPACINGS, start_index_for_strength
from kedavra.formats.grid import image_grid
from kedavra.formats.png_info import read_parameters, write_png
from kedavra.networks.model import PRESETS, UNET_PREDICTION_TYPES
from kedavra.pipeline.device import check_device, parse_precision
from kedavra.pipeline.hires import (
    DEFAULT_HIRES_SCALE,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_HIRES_UPSCALER,
    LATENT_UPSCALE_MODES,
)
from kedavra.pipeline.infotext import (
    request_parameters,
)
from kedavra.pipeline.request import (
    DEFAULT_AESTHETIC_SCORE,
    DEFAULT_IMG2IMG_STRENGTH,
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    DEFAULT_REFINER_SWITCH_AT,
    GenerationRequest,
)
from kedavra.upscaling.named import JUST_RESIZE, NO_UPSCALER, resize_image
from kedavra.validation import MAX_SEED, check_choice

DEFAULT_OUTPUT = "."  # the current folder, files numbered as A1111 numbers them

NUMBERED_FILE = re.compile(r"(\d{5})-")  # A1111's output names: 00000-SEED.png, counting up in a folder

EXAMPLES = """examples:
  kedavra generate "a photo of a cat" --model v1-5-pruned-emaonly.safetensors -o cat.png
  kedavra generate "a castle" --model m.safetensors -n 4 --grid --seed 7 -o castle.png
  kedavra generate "a cat in a hat" --model m.safetensors --init-image cat.png --strength 0.6 -o hat.png
  kedavra generate "a red ball" --model m.safetensors --init-image room.png --mask mask.png -o ball.png
  kedavra generate --from-png cat.png --model v1-5-pruned-emaonly.safetensors -o cat-again.png
  kedavra generate --from-png cat.png --model m.safetensors --steps 30 --sampler "DPM++ 2M Karras" -o cat-30.png
  kedavra generate "a cat <lora:watercolor:0.8>" --model m.safetensors --lora-dir models/Lora -o cat.png
  kedavra generate "a cat" --model m.safetensors --lora watercolor.safetensors:0.8 -o cat.png
  kedavra generate "a castle" --model m.safetensors --hires --hires-upscaler "R-ESRGAN 4x+" --strength 0.4 -o big.png
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="text to image, image to image and inpainting with an SD 1.x / 2.x / XL model",
        description="Generate images from a prompt with a Stable Diffusion 1.x / 2.x / XL checkpoint (a single\n"
                    ".safetensors/.ckpt file, a diffusers folder or kedavra's format). Each PNG carries its\n"
                    "parameters in A1111's 'parameters' text; --from-png reproduces an image from them.\n"
                    "Prints each file written with its seed; a progress bar goes to stderr.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default=None,
                        help="what to draw; A1111's (word:1.3) emphasis and BREAK work (needed unless --from-png)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="PATH_OR_NAME",
                       help="checkpoint file, diffusers folder or embedded model name (default: the embedded "
                            "kedavra-shapes, docs/embedded_model.md)")
    model.add_argument("--family", metavar="NAME",
                       help=f"model family instead of the detected one: {', '.join(PRESETS)}")
    model.add_argument("--prediction-type", metavar="TYPE",
                       help=f"what the U-Net predicts, instead of the detected: {', '.join(UNET_PREDICTION_TYPES)}")
    model.add_argument("--refiner", metavar="PATH_OR_NAME",
                       help="a second model that takes over the sampling run (the SDXL refiner; A1111's Refiner)")
    model.add_argument("--refiner-switch-at", type=float, metavar="F",
                       help=f"share of the training timesteps, from the noisiest, the model denoises before the "
                            f"refiner takes over (default {DEFAULT_REFINER_SWITCH_AT})")
    adapters = parser.add_argument_group("LoRAs and embeddings (kedavra.adapters; docs/adapters.md)")
    adapters.add_argument("--lora", action="append", default=[], metavar="FILE_OR_NAME[:WEIGHT]",
                          help="merge a LoRA / LyCORIS / DoRA file (or a name in --lora-dir) at WEIGHT (default 1); "
                               "repeat for several. Prompts may also say <lora:NAME:WEIGHT>, as in A1111")
    adapters.add_argument("--lora-dir", metavar="DIR",
                          help="where <lora:NAME:...> prompt tags (and --lora NAME) find NAME.safetensors / .pt "
                               "(A1111's models/Lora)")
    adapters.add_argument("--embeddings-dir", metavar="DIR",
                          help="textual-inversion embeddings (.pt / .safetensors / .bin, A1111's embeddings/ folder); "
                               "a prompt uses one by writing its file name")
    adapters.add_argument("--lora-nonstrict", action="store_true",
                          help="apply a LoRA whose file has layers this model lacks, skipping them with a warning "
                               "(default: refuse it, naming them)")
    model.add_argument("--device", metavar="DEVICE",
                       help="cpu, cuda, cuda:1, mps (default: CUDA if present, else the CPU)")
    model.add_argument("--precision", default="auto", metavar="auto|fp32|bf16|fp16|int8",
                       help="network precision (default auto: bf16 where the hardware runs it fast, fp16 on GPUs "
                            "without bf16, else fp32; int8, CPU only, opt-in: the U-Net's large layers as int8 "
                            "products, faster and less exact, docs/benchmark.md)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--negative", metavar="TEXT", help="negative prompt: what to steer away from")
    sampling.add_argument("--steps", type=int, metavar="N", help=f"sampler steps (default {DEFAULT_STEPS})")
    sampling.add_argument("--sampler", metavar="NAME",
                          help=f"kedavra, A1111, ComfyUI or diffusers name, e.g. euler_a, 'DPM++ 2M Karras' "
                               f"(default {DEFAULT_SAMPLER}; `kedavra samplers` lists them)")
    sampling.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                          help="Karras et al. 2022 noise levels on kedavra's plans")
    sampling.add_argument("--schedule-type", metavar="NAME",
                          help="run the sampler as A1111 / ComfyUI do, on this schedule type's σ's: A1111's "
                               "Automatic, Uniform, Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, "
                               "Align Your Steps, Simple, Normal, DDIM, Beta, or ComfyUI's scheduler names")
    sampling.add_argument("--convention", choices=CONVENTIONS,
                          help="with --schedule-type: whose conventions to follow (default a1111)")
    sampling.add_argument("--rng", choices=RNG_SOURCES,
                          help="noise source, as A1111's setting: CPU (default), GPU or NV (an NVIDIA card's "
                               "torch.randn, emulated)")
    sampling.add_argument("--variation-seed", type=int, metavar="N", help="A1111's variation seed (subseed)")
    sampling.add_argument("--variation-strength", type=float, metavar="F",
                          help="how far towards the variation seed's noise, in [0, 1]")
    sampling.add_argument("--ensd", type=int, metavar="N",
                          help="A1111's eta noise seed delta: sampler noise after the first restarts from seed + N")
    sampling.add_argument("--cfg-scale", type=float, metavar="F",
                          help=f"classifier-free guidance scale w (default {DEFAULT_CFG_SCALE}; 1 = no guidance)")
    sampling.add_argument("--guidance-rescale", type=float, metavar="F",
                          help="Lin et al. 2023 guidance rescale φ in [0, 1] (default 0; 0.7 for v-models)")
    sampling.add_argument("--eta", type=float, metavar="F",
                          help="η: DDIM's (default 0), or that of A1111's ancestral and SDE samplers run with a "
                               "schedule type (Euler a, DPM++ 2M SDE, ...: the share of fresh noise, default 1)")
    sampling.add_argument("--sigmas", metavar="LEVELS",
                          help="explicit noise levels, one per step, descending, separated by spaces or commas; or "
                               "'log-uniform' (uniform in log σ between the model's σ_max and σ_min: the spacing that "
                               "helps at few steps, docs/samplers.md)")
    sampling.add_argument("--s-churn", type=float, metavar="F",
                          help="with --schedule-type: Karras et al. 2022's churn for Euler, Heun, DPM2 (A1111's "
                               "'Sigma churn'; default 0), within --s-tmin / --s-tmax (default 0, inf)")
    sampling.add_argument("--s-tmin", type=float, metavar="F", help="with --s-churn: churn only where σ >= F")
    sampling.add_argument("--s-tmax", type=float, metavar="F",
                          help="with --s-churn: churn only where σ <= F (0: no bound, as in A1111)")
    sampling.add_argument("--s-noise", type=float, metavar="F",
                          help="with --schedule-type: scale of the churn's and the ancestral / SDE samplers' fresh "
                               "noise (A1111's 'Sigma noise'; default 1)")
    sampling.add_argument("--step-cache", type=int, metavar="N",
                          help="DeepCache (Ma et al. 2023): a full U-Net call every N calls, the others reuse its "
                               "deep features: faster, and the image changes (docs/benchmark.md; default off)")
    sampling.add_argument("--spacing", metavar="|".join(SPACINGS),
                          help="timestep spacing instead of the model's; trailing for few-step distilled models "
                               "(SDXL-Turbo, Lightning)")
    sampling.add_argument("--seed", type=int, metavar="N",
                          help=f"seed of the first image, 0 to {MAX_SEED}; image i uses seed + i (default: random)")
    sampling.add_argument("--width", type=int, metavar="PX",
                          help="image width (default: the init image's, else the model's image size)")
    sampling.add_argument("--height", type=int, metavar="PX", help="image height (default as --width)")
    sampling.add_argument("-n", "--num-images", type=int, default=1, metavar="N",
                          help="images in the batch (default 1)")
    sdxl = parser.add_argument_group("SDXL micro-conditioning (Podell et al. 2023, sec. 2.2; other models ignore it)")
    sdxl.add_argument("--original-size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                      help="the size the U-Net is told the training image had (default: the output size)")
    sdxl.add_argument("--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"),
                      help="the crop offset it is told the training image had (default 0 0: centred, uncropped)")
    sdxl.add_argument("--target-size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                      help="the target size it is told (default: the output size)")
    sdxl.add_argument("--aesthetic-score", type=float, metavar="F",
                      help=f"the refiner's aesthetic score for the prompt (default {DEFAULT_AESTHETIC_SCORE}; the "
                           f"negative prompt gets {DEFAULT_NEGATIVE_AESTHETIC_SCORE})")
    image = parser.add_argument_group("image to image and inpainting")
    image.add_argument("--init-image", metavar="PATH", help="start from this image (resized to --width/--height)")
    image.add_argument("--strength", type=float, metavar="F",
                       help=f"how much of the init image to repaint, in [0, 1] (default {DEFAULT_IMG2IMG_STRENGTH}, "
                            f"or {DEFAULT_INPAINT_STRENGTH} with --mask)")
    image.add_argument("--mask", metavar="PATH",
                       help="inpainting: white where to paint, black where to keep the init image (same size)")
    image.add_argument("--resize-mode", choices=RESIZE_MODE_FLAGS, default=None,
                       help="how an init image (and mask) of another size than --width/--height is brought to it, "
                            "as A1111's Resize mode (default just-resize: stretched; latent-upscale: the image "
                            "encoded at its own size, its latents resized)")
    a1111 = parser.add_argument_group("A1111's inpainting settings (with --mask and an A1111 sampler such as "
                                      "'Euler a'; docs/generate.md)")
    a1111.add_argument("--mask-blur", type=int, metavar="PX",
                       help="blur the mask with a Gaussian of this σ in pixels (A1111's Mask blur; default 0)")
    a1111.add_argument("--only-masked", action=argparse.BooleanOptionalAction, default=None,
                       help="Inpaint area 'Only masked': paint a crop around the mask at --width x --height and "
                            "paste it back into the full-size image (default: whole picture)")
    a1111.add_argument("--masked-padding", type=int, metavar="PX",
                       help="pixels around the mask's box in the --only-masked crop (default 0)")
    a1111.add_argument("--masked-content", metavar="KIND",
                       help="what the painted region starts from: fill, original (default), 'latent noise', "
                            "'latent nothing'")
    a1111.add_argument("--invert-mask", action=argparse.BooleanOptionalAction, default=None,
                       help="paint where the mask is black (A1111's Mask mode 'Inpaint not masked')")
    a1111.add_argument("--mask-round", action=argparse.BooleanOptionalAction, default=None,
                       help="--no-mask-round blends on the soft (blurred) latent mask instead of rounding it to 0 / 1 "
                            "(A1111's mask_round; default on)")
    hires = parser.add_argument_group("hires fix (A1111's: a second pass at a larger size; docs/generate.md)")
    hires.add_argument("--hires", action=argparse.BooleanOptionalAction, default=None,
                       help="upscale the first pass and run image to image on it (any --hires-* flag turns it on; "
                            "--no-hires generates a PNG's first pass only); --strength sets its denoising strength "
                            f"(default {DEFAULT_HIRES_STRENGTH})")
    hires.add_argument("--hires-scale", type=float, metavar="F",
                       help=f"the first pass's size times F (default {DEFAULT_HIRES_SCALE:g})")
    hires.add_argument("--hires-resize", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                       help="a target size instead (0 for one side: from the other; both: scaled to cover, then "
                            "cropped, as A1111 does)")
    hires.add_argument("--hires-upscaler", metavar="NAME",
                       help=f"{', '.join(LATENT_UPSCALE_MODES)}, or a pixel upscaler: None, Lanczos, Nearest, "
                            f"R-ESRGAN 4x+, ... or an upscaler file (default {DEFAULT_HIRES_UPSCALER})")
    hires.add_argument("--hires-steps", type=int, metavar="N",
                       help="steps of the second pass, run exactly (default: the first pass's)")
    hires.add_argument("--hires-sampler", metavar="NAME", help="the second pass's sampler (default: the first's)")
    hires.add_argument("--hires-schedule-type", metavar="NAME",
                       help="the second pass's schedule type (default: the first's)")
    hires.add_argument("--hires-prompt", metavar="TEXT", help="the second pass's prompt (default: the prompt)")
    hires.add_argument("--hires-negative", metavar="TEXT",
                       help="the second pass's negative prompt (default: the negative prompt)")
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help="a .png file (several images: PATH_STEM-0.png, PATH_STEM-1.png, ...) or an "
                             "existing folder (files 00000-SEED.png, ...) (default: the current folder)")
    output.add_argument("--grid", action="store_true", help="also write the batch as one grid PNG (PATH_STEM-grid.png)")
    output.add_argument("--from-png", metavar="IMAGE.png",
                        help="take the parameters from a PNG this tool or A1111 wrote; flags given override them")
    output.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    output.add_argument("--preview", metavar="FILE.png",
                        help="live preview: rewrite this PNG with the first image's predicted x0 as sampling goes")
    output.add_argument("--preview-every", type=int, default=1, metavar="STEPS",
                        help="with --preview: every this many steps (default 1)")
    output.add_argument("--taesd", metavar="PATH",
                        help="with --preview: decode it with this tiny autoencoder (a taesd_decoder.pth / "
                             "taesdxl_decoder.pth file or a diffusers AutoencoderTiny folder; default the full VAE)")
    parser.set_defaults(func=run)


# ---- files ------------------------------------------------------------------------------------------------------


def check_output(output: str) -> Path:
    """The output path: an existing folder, or a .png file in an existing folder."""
    path = Path(output).expanduser()
    if path.is_dir():
        return path
    if output.endswith(("/", "\\")):
        raise ValueError(f"output folder {output} does not exist")
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {output!r} must be a .png file or an existing folder")
    if not path.parent.is_dir():
        raise ValueError(f"output folder {path.parent} does not exist (for {output})")
    return path


def output_paths(output: Path, seeds: list[int]) -> tuple[list[Path], Path]:
    """(a path per image, the grid's path): OUT.png, or OUT-0.png, OUT-1.png, ... for several images and
    OUT-grid.png; in a folder NNNNN-SEED.png numbered on from the highest NNNNN- there, then NNNNN-grid.png."""
    if output.is_dir():
        first = 1 + max((int(match[1]) for p in output.iterdir() if (match := NUMBERED_FILE.match(p.name))),
                        default=-1)
        images = [output / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
        return images, output / f"{first + len(seeds):05d}-grid.png"
    if len(seeds) == 1:
        images = [output]
    else:
        images = [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(seeds))]
    return images, output.with_name(f"{output.stem}-grid{output.suffix}")


def read_image(path: str, what: str, mode: str) -> Image.Image:
    """The image file at `path` in `mode` ("RGB", "L"), turned upright by its EXIF orientation; ValueError naming
    the file when it is missing or not an image Pillow reads."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert(mode)
    except (OSError, Image.DecompressionBombError, SyntaxError) as error:  # Pillow raises SyntaxError on bad headers
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"cannot read {what} {path}: {reason}") from None


# ---- the command ------------------------------------------------------------------------------------------------


def run(args) -> int:
    png = read_parameters(args.from_png) if args.from_png is not None else None
    notes: list[str] = []
    init_image, mask = read_inputs(args.init_image, args.mask)
    request = resolve_request(args, png, notes, init_image, mask)
    request_parameters(request, 0, 0, 1, 1, None, None)  # refuses a prompt the PNG text cannot hold, before any work
    output = check_output(args.output)
    for flag, folder in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise ValueError(f"{flag} {folder!r} does not exist or is not a folder")
    loras = [(locate_lora(name, args.lora_dir), weight) for name, weight in map(lora_flag, args.lora)]
    preview = check_preview(args)
    device, dtype = check_device(args.device), parse_precision(args.precision)
    if args.family is not None:
        check_choice("--family", args.family, PRESETS)
    if args.prediction_type is not None:
        check_choice("--prediction-type", args.prediction_type, UNET_PREDICTION_TYPES)
    steps_to_run = request.steps
    if init_image is not None:
        steps_to_run -= start_index_for_strength(request.steps, request.strength)  # refuses one that runs none
    model_path = resolve_model(choose_model(args.model, png))
    model_name, model_hash_ = model_identity(model_path)
    if png is not None and png.model_hash and model_hash_ and png.model_hash != model_hash_:
        notes.append(f"{args.from_png} was made with model {png.model or '?'} (hash {png.model_hash}); this run uses "
                     f"{model_name} (hash {model_hash_}), so the image will differ")
    for note in notes:
        print(f"kedavra generate: note: {note}", file=sys.stderr)

    refiner = refiner_text = None
    if args.refiner is not None:
        refiner_path = resolve_model(args.refiner)
        refiner_name, refiner_hash = model_identity(refiner_path)
        refiner_text = f"{refiner_name} [{refiner_hash}]" if refiner_hash else refiner_name
    pipe = load(model_path, device=device, dtype=dtype, family=args.family, prediction_type=args.prediction_type,
                lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir)
    for path, reason in pipe.embeddings_report.failed.items():
        print(f"kedavra generate: note: embedding {path} not loaded: {reason}", file=sys.stderr)
    for lora, weight in loras:
        pipe.load_lora(lora, weight, strict=not args.lora_nonstrict)
    if args.refiner is not None:
        refiner = load(refiner_path, device=device, dtype=dtype)
    if args.taesd is not None:
        pipe.load_preview_decoder(args.taesd)
    request = _sized(request, pipe.config.image_size,
                     RESIZE_MODE_FLAGS.index(args.resize_mode) if args.resize_mode is not None else JUST_RESIZE)
    if args.sigmas is not None and args.sigmas.strip().lower() == LOG_UNIFORM:
        request = request.replace(sigmas=tuple(log_uniform_sigmas(*table_sigma_range(pipe.config.schedule),
                                                                  request.steps).tolist()))
    if pipe.config.sampler is not None and args.sampler is None and (png is None or not png.sampler):
        # a diffusers folder samples with its own scheduler unless --sampler names another, as diffusers does
        request = request.replace(sampler=pipe.config.sampler)
        if not args.quiet:
            print(f"kedavra generate: sampler {pipe.config.sampler} (the model folder's scheduler; --sampler picks "
                  "another)", file=sys.stderr)
    try:
        request = pipe.check(request)
    except ValueError as error:
        if init_image is not None and None in (args.width, args.height):
            raise ValueError(f"{error} (from init image {args.init_image}; --width/--height resize it)") from None
        raise

    if request.sampler_spec is not None and init_image is None and request.steps > 1:
        steps_to_run += request.sampler_spec.extra_evaluations  # PNDM reports each of its n+1 evaluations
    if request.hires is not None:
        steps_to_run += request.hires.steps or request.steps
    with tqdm(total=steps_to_run, desc="sampling", unit="step", file=sys.stderr, disable=args.quiet) as bar:
        result = pipe.generate(request, callback=step_reporter(bar, pipe, preview, args.preview_every),
                               refiner=refiner)

    image_paths, grid_path = output_paths(output, result.seeds)
    for index, (image, seed, path) in enumerate(zip(result.images, result.seeds, image_paths, strict=True)):
        write_png(image, path, request_parameters(request, index, seed, request.width, request.height, model_name,
                                                  model_hash_, refiner_text, result.parameters))
        print(f"{path}  seed {seed}")
    if args.grid:  # A1111 gives a grid its first image's text
        first = request_parameters(request, 0, result.seeds[0], request.width, request.height, model_name, model_hash_,
                                   refiner_text, result.parameters)
        write_png(image_grid(result.images), grid_path, first)
        print(f"{grid_path}  grid of {len(result.images)}")
    return 0


def check_preview(args) -> Path | None:
    """--preview's file (a .png in an existing folder), --preview-every and --taesd, checked before any work."""
    if args.preview_every < 1:
        raise ValueError(f"--preview-every must be 1 or more steps, got {args.preview_every}")
    if args.taesd is not None:
        if args.preview is None:
            raise ValueError("--taesd decodes the --preview image; give --preview FILE.png with it")
        if not Path(args.taesd).expanduser().exists():
            raise ValueError(f"--taesd {args.taesd}: no such file or folder")
    if args.preview is None:
        return None
    path = Path(args.preview).expanduser()
    if path.suffix.lower() != ".png" or not path.parent.is_dir():
        raise ValueError(f"--preview {args.preview!r} must be a .png file in an existing folder")
    return path


def step_reporter(bar, pipe, preview: Path | None, every: int):
    """The sampling callback: the progress bar, and every `every` steps (and at each pass's last step) the first
    image's x̂_0 decoded into the --preview file (TAESD with --taesd, else the VAE), written atomically."""

    def on_step(step) -> None:
        bar.update(1)
        if preview is not None and ((step.index + 1) % every == 0 or step.index + 1 == step.count):
            write_png(pipe.preview(step.x0[:1])[0], preview, None)

    return on_step


def read_inputs(init_path: str | None, mask_path: str | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image (RGB) and the mask (L), refusing a mask of another size than the image."""
    init_image = read_image(init_path, "init image", "RGB") if init_path is not None else None
    mask = read_image(mask_path, "mask", "L") if mask_path is not None else None
    if mask is not None and init_image is not None and mask.size != init_image.size:
        raise ValueError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but init image {init_path} is "
                         f"{init_image.size[0]}x{init_image.size[1]}; they must be the same size")
    return init_image, mask


def _sized(request: GenerationRequest, model_size: int, resize_mode: int = JUST_RESIZE) -> GenerationRequest:
    """The request at its size: --width/--height (or the PNG's), else the init image's size, else the model's image
    size; an init image (and mask) of another size is brought to it by `resize_mode` (A1111's resize_image; a mask
    just resized nearest-neighbour), except for A1111 inpainting, which does that itself (kedavra.pipeline.
    inpainting: it blurs and crops at the image's own size first), and for resize mode 3 (latent_resize: the
    pipeline resizes the image's latents)."""
    image, mask = request.init_image, request.mask
    default_width, default_height = image.size if image is not None else (model_size, model_size)
    width, height = request.width or default_width, request.height or default_height
    if image is not None and image.size != (width, height) and not (request.a1111_inpainting or
                                                                     request.latent_resize):
        image = resize_image(image, (width, height), NO_UPSCALER, None, resize_mode)
        mask = (None if mask is None else mask.resize((width, height), Image.Resampling.NEAREST)
                if resize_mode == JUST_RESIZE else resize_image(mask, (width, height), NO_UPSCALER, None,
                                                                resize_mode).convert("L"))
    return request.replace(width=width, height=height, init_image=image, mask=mask)
