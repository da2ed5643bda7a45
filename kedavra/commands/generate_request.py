"""The request a `kedavra generate` command line asks for: its flags over a `--from-png` file's parameters (A1111's
"parameters" text: kedavra.formats.png_info) over the defaults below, as one checked `GenerationRequest`; what a PNG
records that cannot be reproduced goes into the run's notes. The A1111 settings that travel in a PNG (sampler and
schedule type, noise source, variation seed, ENSD, churn, eta, hires fix, A1111's inpainting settings, sigmas) are
read here; kedavra.commands.generate does the files and the run.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from kedavra.adapters.prompt_tags import split_lora_tags
from kedavra.diffusion.samplers.euler import Churn
from kedavra.diffusion.samplers.k_diffusion import A1111_ETA_ANCESTRAL
from kedavra.formats.png_info import GenerationParameters
from kedavra.pipeline.hires import (
    DEFAULT_HIRES_SCALE,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_HIRES_UPSCALER,
    HiresFix,
)
from kedavra.pipeline.infotext import (
    A1111_DEFAULT_RNG,
    CHURN_KEYS,
    CONVENTION_KEY,
    ENSD_KEY,
    ETA_ANCESTRAL_KEY,
    ETA_KEY,
    GUIDANCE_RESCALE_KEY,
    REFINER_KEY,
    REFINER_SWITCH_KEY,
    RNG_KEY,
    SIGMAS_KEY,
    SPACING_KEY,
    STEP_CACHE_KEY,
    VARIATION_SEED_KEY,
    VARIATION_STRENGTH_KEY,
)
from kedavra.pipeline.inpainting import (
    INPAINT_AREA_KEY,
    MASK_BLUR_KEY,
    MASK_MODE_KEY,
    MASKED_CONTENT_KEY,
    PADDING_KEY,
    InpaintOptions,
)
from kedavra.pipeline.pipeline import LORA_HASHES_KEY
from kedavra.pipeline.request import (
    DEFAULT_AESTHETIC_SCORE,
    DEFAULT_REFINER_SWITCH_AT,
    GenerationRequest,
)
from kedavra.upscaling.named import LATENT_UPSCALE

DEFAULT_STEPS = 20
# DPM++ 2M (Lu et al. 2022, "DPM-Solver++", multistep 2nd order): deterministic, so an image depends on its seed's
# noise alone, and it converges in fewer steps than Euler, so 20 are enough.
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_CFG_SCALE = 7.5  # diffusers' StableDiffusionPipeline default (A1111's is 7)

HIRES_PREFIX = "Hires"  # A1111's hires-fix keys ("Hires upscale", "Hires steps", ...)


def resolve_request(args, png: GenerationParameters | None, notes: list[str], init_image: Image.Image | None = None,
                    mask: Image.Image | None = None) -> GenerationRequest:
    """Flags over the PNG's parameters over the defaults, as a checked request; what cannot be reproduced is added to
    `notes`. width / height stay None when neither the flags nor the PNG give them (see `run`)."""

    def pick(flag, from_png, default):
        return flag if flag is not None else from_png if from_png is not None else default

    extra = png.extra if png is not None else {}
    if args.prompt is None and png is None:
        raise ValueError("give a prompt, or --from-png IMAGE.png to take it from an image")
    sampler = pick(args.sampler, png and png.sampler, DEFAULT_SAMPLER)
    # A1111 (1.9 on) writes a "Schedule type", and kedavra writes one for the A1111 / ComfyUI runs: the image was
    # sampled their way. Without one (kedavra's own plans, or an older A1111) the name alone decides.
    png_schedule = png.schedule_type if png is not None and args.sampler is None else None
    schedule_type = pick(args.schedule_type, png_schedule, None)
    karras = bool(args.karras)
    if args.karras is False and sampler.lower().endswith(" karras"):  # --no-karras wins over the name's " Karras"
        sampler = sampler[: -len(" karras")]
    rng = pick(args.rng, extra.get(RNG_KEY), A1111_DEFAULT_RNG if png_schedule is not None else "CPU")
    variation_seed = pick(args.variation_seed, _number(extra, VARIATION_SEED_KEY), None)
    variation_strength = pick(args.variation_strength, _number(extra, VARIATION_STRENGTH_KEY), 0.0)
    strength = args.strength
    png_hires = any(key.startswith(HIRES_PREFIX) for key in extra)
    if png is not None and png.denoising_strength is not None and strength is None:
        if init_image is not None:
            strength = png.denoising_strength
        elif not png_hires:
            raise ValueError(f"{args.from_png} was made from an init image (Denoising strength "
                             f"{png.denoising_strength}); give it with --init-image (and --mask if it was inpainted)")
    hires = resolve_hires(args, extra if png_hires else {}, png and png.denoising_strength)
    if hires is not None:
        strength = None
    if REFINER_KEY in extra and args.refiner is None:
        notes.append(f"{args.from_png} was refined with {extra[REFINER_KEY]}; give it with --refiner to do the same")
    if png is not None and LORA_HASHES_KEY in extra:
        tagged = {tag.name for prompt in [png.prompt] for tag in split_lora_tags(prompt)[1]}
        flagged = {lora_flag(flag)[0] for flag in args.lora}
        untagged = [entry.strip() for entry in extra[LORA_HASHES_KEY].split(",")
                    if entry.split(":")[0].strip() not in tagged | flagged | {Path(f).stem for f in flagged}]
        if untagged:
            notes.append(f"{args.from_png} was made with the LoRAs {', '.join(untagged)} outside its prompt's tags; "
                         "give them with --lora to do the same")
    if png is not None and png.clip_skip not in (None, 1):
        notes.append(f"Clip skip {png.clip_skip} is not supported; using the text encoder's last layer")
    request = GenerationRequest.build(
        pick(args.prompt, png and png.prompt, ""),
        pick(args.negative, png and png.negative_prompt, ""),
        num_images=args.num_images,
        steps=pick(args.steps, png and png.steps, DEFAULT_STEPS),
        sampler=sampler, karras=karras, schedule_type=schedule_type,
        convention=pick(args.convention, extra.get(CONVENTION_KEY), "a1111"), rng=rng,
        subseed=None if variation_seed is None else int(variation_seed), subseed_strength=variation_strength,
        eta_noise_seed_delta=int(pick(args.ensd, _number(extra, ENSD_KEY), 0)),
        guidance_scale=pick(args.cfg_scale, png and png.cfg_scale, DEFAULT_CFG_SCALE),
        guidance_rescale=pick(args.guidance_rescale, _number(extra, GUIDANCE_RESCALE_KEY), 0.0),
        eta=pick(None if args.sampler is not None else _number(extra, ETA_KEY), None, 0.0),
        eta_ancestral=pick(None if args.sampler is not None else _number(extra, ETA_ANCESTRAL_KEY), None,
                           A1111_ETA_ANCESTRAL),
        seed=pick(args.seed, png and png.seed, None),
        width=pick(args.width, png and png.width, None),
        height=pick(args.height, png and png.height, None),
        init_image=init_image, mask=mask, strength=strength,
        original_size=_height_width(args.original_size), target_size=_height_width(args.target_size),
        crop_top_left=tuple(args.crop_top_left) if args.crop_top_left is not None else (0, 0),
        aesthetic_score=args.aesthetic_score if args.aesthetic_score is not None else DEFAULT_AESTHETIC_SCORE,
        refiner_switch_at=pick(args.refiner_switch_at, _number(extra, REFINER_SWITCH_KEY), DEFAULT_REFINER_SWITCH_AT),
        spacing=pick(args.spacing, extra.get(SPACING_KEY), None),
        sigmas=parse_sigmas(pick(args.sigmas, extra.get(SIGMAS_KEY), None)), hires=hires,
        step_cache=int(pick(args.step_cache, _number(extra, STEP_CACHE_KEY), 0)),
        churn=Churn(*(pick(getattr(args, name), _number(extra, key), getattr(Churn(), name)) or
                      (math.inf if name == "s_tmax" else 0.0) for name, key in CHURN_KEYS.items())),
        inpaint=resolve_inpaint(args, extra if mask is not None else {}, mask is not None),
        latent_resize=args.resize_mode == LATENT_UPSCALE_FLAG and init_image is not None and mask is None,
    )
    if args.eta is None:
        return request
    # --eta is the η of whatever the sampler has: A1111's ancestral / SDE samplers' (eta_ancestral), else DDIM's
    takes_ancestral = request.k_sampler is not None and request.k_sampler.eta
    return request.replace(**{"eta_ancestral" if takes_ancestral else "eta": args.eta})


def resolve_inpaint(args, extra: dict[str, str], masked: bool) -> InpaintOptions | None:
    """A1111's inpainting settings from the flags over the PNG's "Mask blur", "Inpaint area", ... (None: none given
    anywhere)."""
    flags = {"--mask-blur": args.mask_blur, "--only-masked": args.only_masked, "--masked-padding": args.masked_padding,
             "--masked-content": args.masked_content, "--invert-mask": args.invert_mask,
             "--mask-round": args.mask_round, "--resize-mode": args.resize_mode}
    given = [flag for flag, value in flags.items() if value is not None and flag != "--resize-mode"]
    if given and not masked:
        raise ValueError(f"{', '.join(given)} set(s) how a mask is used: give --mask (and --init-image)")
    if not masked or (not given and args.resize_mode is None and not set(extra) & set(INPAINT_KEYS)):
        return None
    png = InpaintOptions.from_infotext(extra)
    blur = args.mask_blur if args.mask_blur is not None else png.mask_blur_x
    content = png.masked_content if args.masked_content is None else args.masked_content.replace("-", " ")
    return InpaintOptions(
        mask_blur_x=blur, mask_blur_y=blur if args.mask_blur is not None else png.mask_blur_y,
        only_masked=png.only_masked if args.only_masked is None else args.only_masked,
        padding=png.padding if args.masked_padding is None else args.masked_padding, masked_content=content,
        invert=png.invert if args.invert_mask is None else args.invert_mask,
        resize_mode=RESIZE_MODE_FLAGS.index(args.resize_mode) if args.resize_mode is not None else png.resize_mode,
        mask_round=png.mask_round if args.mask_round is None else args.mask_round)


# A1111's resize modes 0, 1, 2, 3 (kedavra.upscaling.named: 3 resizes the latents, not the pixels)
RESIZE_MODE_FLAGS = ("just-resize", "crop-and-resize", "resize-and-fill", "latent-upscale")
LATENT_UPSCALE_FLAG = RESIZE_MODE_FLAGS[LATENT_UPSCALE]
INPAINT_KEYS = (MASK_BLUR_KEY, MASK_MODE_KEY, MASKED_CONTENT_KEY, INPAINT_AREA_KEY, PADDING_KEY)
HIRES_FLAGS = ("hires_scale", "hires_resize", "hires_upscaler", "hires_steps", "hires_sampler", "hires_schedule_type",
               "hires_prompt", "hires_negative")


def resolve_hires(args, extra: dict[str, str], png_strength: float | None) -> HiresFix | None:
    """The hires fix of a run: --hires, any --hires-* flag, or a PNG's "Hires ..." keys (A1111's infotext) turn it
    on, --no-hires off; flags over the PNG's keys over the defaults. --strength is its denoising strength (A1111's
    one "Denoising strength" field) when there is no init image."""
    flagged = [name for name in HIRES_FLAGS if getattr(args, name) is not None]
    if args.hires is False or not (args.hires or flagged or extra):
        if args.hires is False and flagged:
            raise ValueError(f"--no-hires with --{flagged[0].replace('_', '-')}: drop one of them")
        return None
    if args.init_image is not None:
        raise ValueError("hires fix (--hires, --hires-*, or the PNG's Hires keys) is text to image's second pass; "
                         "with --init-image, upscale the image first (kedavra upscale) or give --no-hires")

    def pick(flag, key, parse, default):
        if flag is not None:
            return flag
        if key not in extra:
            return default
        try:
            return parse(extra[key])
        except ValueError:
            raise ValueError(f"the PNG's {key!r} cannot be read: {extra[key]!r}") from None

    resize = args.hires_resize or pick(None, "Hires resize", lambda text: [int(v) for v in text.split("x")], [0, 0])
    if len(resize) != 2:
        raise ValueError(f"the PNG's 'Hires resize' must be WIDTHxHEIGHT, got {extra['Hires resize']!r}")
    strength = args.strength if args.strength is not None else png_strength
    return HiresFix(
        scale=pick(args.hires_scale, "Hires upscale", float, DEFAULT_HIRES_SCALE),
        resize_x=resize[0], resize_y=resize[1],
        upscaler=pick(args.hires_upscaler, "Hires upscaler", str, DEFAULT_HIRES_UPSCALER),
        steps=pick(args.hires_steps, "Hires steps", int, 0),
        strength=DEFAULT_HIRES_STRENGTH if strength is None else strength,
        sampler=pick(args.hires_sampler, "Hires sampler", str, None),
        schedule_type=pick(args.hires_schedule_type, "Hires schedule type", str, None),
        prompt=pick(args.hires_prompt, "Hires prompt", str, None),
        negative_prompt=pick(args.hires_negative, "Hires negative prompt", str, None))


LOG_UNIFORM = "log-uniform"  # --sigmas: levels uniform in log σ, filled in once the model (its σ range) is known


def parse_sigmas(text: str | None) -> tuple[float, ...] | None:
    """--sigmas (or a PNG's "Sigmas"): the levels as floats; None for none or for "log-uniform" (filled in by
    `run` once the model is loaded); ValueError naming the text otherwise."""
    if text is None or text.strip().lower() == LOG_UNIFORM:
        return None
    try:
        return tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"--sigmas must be noise levels (numbers separated by spaces or commas) or "
                         f"'{LOG_UNIFORM}', got {text!r}") from None


def lora_flag(flag: str) -> tuple[str, float]:
    """--lora's FILE_OR_NAME[:WEIGHT] as (file or name, weight); a Windows drive's colon is not a weight."""
    head, sep, tail = flag.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            return head, float(tail)
        except ValueError:
            raise ValueError(f"--lora {flag!r}: the weight after the last ':' must be a number, got {tail!r}") from None
    return flag, 1.0


def _height_width(width_height: list[int] | None) -> tuple[int, int] | None:
    """A WIDTH HEIGHT flag as the (height, width) pair GenerationRequest keeps (diffusers' order)."""
    return None if width_height is None else (width_height[1], width_height[0])


def _number(extra: dict[str, str], key: str) -> float | None:
    if key not in extra:
        return None
    try:
        return float(extra[key])
    except ValueError:
        raise ValueError(f"the PNG's {key!r} must be a number, got {extra[key]!r}") from None
