"""Request bodies into the worker's tasks, checked against the loaded model, and outcomes into A1111's info.

    txt2img_task(Txt2ImgRequest, pipe, catalog, settings) / img2img_task(Img2ImgRequest, pipe, catalog, settings)
        -> GenerationTask (or a 422; the catalog names the refiner_checkpoint; settings: the server's A1111
        settings set by POST /options, which a request's override_settings override)
    generation_info(task, outcome, notes, inpainting_model) -> A1111's Processed.js() dict

The bodies' ranges are checked by their schemas; what depends on the model (sizes a multiple of its VAE factor,
an inpainting model needing a mask) and on several fields together (strength leaving a step to run) is checked
here, in that order: sampler and schedule type, sizes, init images, mask, then the settings as a whole. The
generation request itself is built in one place, `request_from_payload`.

Sampling follows A1111 1.10: a sampler A1111 (or ComfyUI) lists runs its way, on the schedule type's σ's
("Automatic" when none is given: the sampler's own) with the noise of A1111's "Random number generator source"
(default GPU, emulated bit for bit: kedavra.diffusion.rng), variation seed and eta noise seed delta. kedavra's
other samplers (DDPM, DDIM, UniPC, LCM, TCD) run on kedavra's plans, where "Karras" means Karras σ spacing.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps

from kedavra.diffusion.rng import RNG_SOURCES
from kedavra.diffusion.samplers import SAMPLERS, resolve_sampler
from kedavra.diffusion.samplers.euler import Churn
from kedavra.diffusion.samplers.k_diffusion import A1111_ETA_ANCESTRAL, k_sampler_names, resolve_k_sampler
from kedavra.diffusion.sigmas import AUTOMATIC, resolve_schedule_type, schedule_type_label
from kedavra.diffusion.timesteps import start_index_for_strength
from kedavra.formats.images import from_pil
from kedavra.formats.png_info import KEDAVRA_VERSION
from kedavra.pipeline.hires import DEFAULT_HIRES_UPSCALER, LATENT_UPSCALE_MODES, HiresFix, resolve_hires_upscaler
from kedavra.pipeline.infotext import A1111_DEFAULT_RNG, AUTOMATIC_KARRAS, request_parameters
from kedavra.pipeline.inpainting import InpaintOptions, a1111_mask
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import MAX_SIDE, GenerationRequest
from kedavra.serving.errors import body_error, field_error
from kedavra.serving.schemas import (
    A1111_CLIP_SKIP_SETTING,
    A1111_ENSD_SETTING,
    A1111_RNG_SETTING,
    CHURN_SETTINGS,
    USE_SAME_SAMPLER,
    USE_SAME_SCHEDULER,
    GenerationBody,
    Img2ImgRequest,
    Txt2ImgRequest,
    decode_image,
)
from kedavra.serving.worker import GenerationOutcome, GenerationTask, ModelCatalog
from kedavra.upscaling.named import LATENT_UPSCALE, NO_UPSCALER, resize_image, upscaler_labels
from kedavra.validation import MAX_SEED, check_choice, check_int, check_number

Size = tuple[int, int]  # (width, height) in pixels
KEDAVRA_PLAN_SCHEDULES = (AUTOMATIC, "uniform", "karras")  # the schedule types kedavra's own plans carry out


@dataclass(frozen=True)
class Sampling:
    """How a request samples: the sampler's name, the schedule type of an A1111 / ComfyUI run (None: kedavra's
    plans, Karras σ's when `karras`), and the noise settings (A1111's randn_source, ENSD, clip skip)."""

    sampler: str
    schedule_type: str | None
    karras: bool
    rng: str = A1111_DEFAULT_RNG
    eta_noise_seed_delta: int = 0
    clip_skip: int | None = None
    churn: Churn | None = None
    eta_ddim: float = 0.0  # A1111's settings for a request without eta
    eta_ancestral: float = A1111_ETA_ANCESTRAL


@dataclass(frozen=True)
class Admission:
    """Per-model bounds on the work one request may ask for, so that a valid request cannot tie the worker up for
    minutes (a 2048x2048 image on a 32-pixel model): both refused with 422 naming the limit, before any work.

    side_factor  width and height at most this multiple of the model's native side (its training size)
    max_cost     pixels x steps x images of one batch, counted in native images: (w·h / native²)·steps·batch_size
                 (batches of n_iter run one by one and can be interrupted between them)
    The defaults allow every A1111 slider at twice the native side (4 native images x 150 steps x 8 images)."""

    side_factor: float = 4.0
    max_cost: float = 4.0 * 150 * 8

    def __post_init__(self):
        check_number("side_factor", self.side_factor, low=1)
        check_number("max_cost", self.max_cost, low=0, low_inclusive=False)

    def max_side(self, pipe: Pipeline) -> int:
        """The largest width or height for `pipe`'s model: side_factor x its native side, within MAX_SIDE."""
        return min(MAX_SIDE, int(self.side_factor * pipe.config.image_size))

    def check_cost(self, body: GenerationBody, pipe: Pipeline, size: Size, steps: int,
                   hires: tuple[Size, int] | None = None) -> None:
        """422 naming the limit when the batch's work exceeds max_cost; hires: the second pass's (size, steps)."""
        passes = [(size, steps)] + ([hires] if hires is not None else [])
        cost = sum(w * h * n for (w, h), n in passes) / pipe.config.image_size**2 * body.batch_size
        if cost > self.max_cost:
            work = " + ".join(f"{w}x{h} pixels x {n} steps" for (w, h), n in passes)
            raise body_error(f"the request asks for {cost:g} native-image steps per batch (({work}) x "
                             f"{body.batch_size} images, the model's native size being {pipe.config.image_size}); "
                             f"this server allows at most {self.max_cost:g} for it (kedavra serve --max-cost); use "
                             "fewer steps, images or pixels")


def txt2img_task(body: Txt2ImgRequest, pipe: Pipeline, catalog: ModelCatalog,
                 settings: Mapping[str, Any] | None = None, admission: Admission = Admission()) -> GenerationTask:
    """`body` checked against `pipe` and resolved (a random seed for -1, the model's size by default)."""
    sampling = resolve_sampling(body, settings)
    if body.enable_hr and (body.firstphase_width or body.firstphase_height):  # A1111's older fields: the first pass
        body = body.model_copy(update={"width": body.firstphase_width or body.width,
                                       "height": body.firstphase_height or body.height})
    size = request_size(body, pipe, admission=admission)
    hires = hires_fix(body, pipe, size, admission) if body.enable_hr else None
    second = None
    if hires is not None:
        second = (hires.geometry(*size, pipe.config.vae.downsample_factor).final, hires.steps or body.steps)
    admission.check_cost(body, pipe, size, body.steps, second)
    return checked_task(body, pipe, catalog, sampling, size, hires=hires)


def hires_fix(body: Txt2ImgRequest, pipe: Pipeline, size: Size, admission: Admission) -> HiresFix:
    """The request's hires fix (A1111's hr_* fields; "Use same ..." and "" mean the first pass's), its upscaler one
    of /sdapi/v1/upscalers or a latent mode, its size within this model's largest side; 422 naming the field."""
    upscaler = body.hr_upscaler or DEFAULT_HIRES_UPSCALER
    try:
        upscaler = resolve_hires_upscaler(upscaler)
    except ValueError as error:
        raise field_error("hr_upscaler", str(error), body.hr_upscaler) from None
    if upscaler not in LATENT_UPSCALE_MODES and upscaler not in upscaler_labels():  # no file paths over HTTP
        raise field_error("hr_upscaler", f"unknown upscaler {body.hr_upscaler!r}; known: "
                                         f"{', '.join([*LATENT_UPSCALE_MODES, *upscaler_labels()])}", body.hr_upscaler)
    if body.denoising_strength <= 0:
        raise field_error("denoising_strength", "hires fix needs a denoising strength above 0 (0 would run no step; "
                                                "/sdapi/v1/extra-single-image upscales alone)", body.denoising_strength)
    hires = HiresFix(scale=body.hr_scale, resize_x=body.hr_resize_x, resize_y=body.hr_resize_y, upscaler=upscaler,
                     steps=body.hr_second_pass_steps, strength=body.denoising_strength,
                     sampler=None if body.hr_sampler_name in (None, "", USE_SAME_SAMPLER) else body.hr_sampler_name,
                     schedule_type=None if body.hr_scheduler in (None, "", USE_SAME_SCHEDULER) else body.hr_scheduler,
                     prompt=body.hr_prompt or None, negative_prompt=body.hr_negative_prompt or None)
    field = "hr_scale" if hires.by_scale else "hr_resize_x"
    try:
        geometry = hires.geometry(*size, pipe.config.vae.downsample_factor)
    except ValueError as error:
        raise field_error(field, str(error), body.hr_scale if hires.by_scale else body.hr_resize_x) from None
    largest = admission.max_side(pipe)
    if max(geometry.upscaled) > largest:
        raise field_error(field, f"hires fix makes the image {geometry.upscaled[0]}x{geometry.upscaled[1]}; this "
                                 f"server allows sides up to {largest} for this model (kedavra serve "
                                 "--max-side-factor)", body.hr_scale if hires.by_scale else body.hr_resize_x)
    return hires


def img2img_task(body: Img2ImgRequest, pipe: Pipeline, catalog: ModelCatalog,
                 settings: Mapping[str, Any] | None = None, admission: Admission = Admission()) -> GenerationTask:
    """`body` checked and resolved. With an A1111 sampler and a mask, the init images and the mask go to the pipeline
    at their own size with A1111's inpainting settings (mask blur, only masked, masked content, invert, resize mode,
    mask rounding: kedavra.pipeline.inpainting); otherwise the init images are brought to the request's size by the
    resize mode (3, latent upscale, without a mask: at their own size, the pipeline resizes their latents) and the
    mask (white = paint) is resized nearest-neighbour and inverted when asked."""
    sampling = resolve_sampling(body, settings)
    decoded = [decode_image(text).convert("RGB") for text in body.init_images]
    width, height = request_size(body, pipe, decoded[0].size, admission)
    admission.check_cost(body, pipe, (width, height), body.steps)
    if len(decoded) not in (1, body.batch_size):
        raise field_error("init_images", f"give 1 init image or one per batch image ({body.batch_size}), "
                                         f"got {len(decoded)}", len(decoded))
    try:
        start_index_for_strength(body.steps, body.denoising_strength)
    except ValueError as error:
        raise field_error("denoising_strength", str(error), body.denoising_strength) from None
    mask = inpaint = None
    if body.mask is not None:
        mask = a1111_mask(decode_image(body.mask), body.mask_round or sampling.schedule_type is None)
        if mask.size not in (decoded[0].size, (width, height)):  # another size cannot say which pixels it means
            raise field_error("mask", f"the mask is {mask.width}x{mask.height}; give it the size of init_images[0] "
                                      f"({decoded[0].width}x{decoded[0].height}) or of the output ({width}x{height})",
                              mask.size)
        if sampling.schedule_type is not None:  # A1111's sampling: A1111's inpainting, from the pictures as sent
            if len({image.size for image in decoded}) > 1:
                raise field_error("init_images", "inpainting needs the init images at one size (the mask's)",
                                  [image.size for image in decoded])
            inpaint = body.inpaint_options()
            mask = mask.resize(decoded[0].size, Image.Resampling.NEAREST)
            return checked_task(body, pipe, catalog, sampling, (width, height), tuple(decoded), mask,
                                body.denoising_strength, inpaint=inpaint)
        if body.resize_mode == LATENT_UPSCALE:
            raise field_error("resize_mode", "resize_mode 3 (latent upscale) with a mask runs with A1111's samplers; "
                                             f"{body.sampler} is kedavra's: give resize_mode 0, 1 or 2, or an A1111 "
                                             "sampler", body.resize_mode)
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    latent_resize = body.resize_mode == LATENT_UPSCALE
    if latent_resize and len({image.size for image in decoded}) > 1:
        raise field_error("init_images", "resize_mode 3 (latent upscale) encodes the init images at their own size: "
                                         "give them at one size", [image.size for image in decoded])
    init_images = tuple(image if image.size == (width, height) or latent_resize else
                        resize_image(image, (width, height), NO_UPSCALER, None, body.resize_mode) for image in decoded)
    return checked_task(body, pipe, catalog, sampling, (width, height), init_images, mask, body.denoising_strength,
                        latent_resize=latent_resize)


def resolve_sampling(body: GenerationBody, settings: Mapping[str, Any] | None = None) -> Sampling:
    """The request's sampling (module docstring), from its sampler_name, scheduler and override_settings over the
    server's `settings`; 422 naming the field. A1111's rule for its older names that carry a schedule type
    ("DPM++ 2M Karras"): the name's type holds when the scheduler is "Automatic" or absent."""
    try:
        schedule_type = resolve_schedule_type(body.scheduler or AUTOMATIC)
    except ValueError as error:
        raise field_error("scheduler", str(error), body.scheduler) from None
    given = {name: getattr(body, name) for name in CHURN_SETTINGS if getattr(body, name) is not None}
    noise = noise_settings({**(settings or {}), **(body.override_settings or {}), **given})
    k_spec = carried = None
    with contextlib.suppress(ValueError):
        k_spec, carried = resolve_k_sampler(body.sampler, "a1111")
    # kedavra's own plans for its samplers and for ComfyUI-only names kedavra also has ("uni_pc": diffusers' UniPC)
    if k_spec is None or (not k_spec.a1111 and _is_kedavra_sampler(body.sampler)):
        try:
            spec, karras_from_name = resolve_sampler(body.sampler)
        except ValueError:
            allowed = f"{', '.join(k_sampler_names())} (A1111 / ComfyUI), {', '.join(SAMPLERS)} (kedavra)"
            raise field_error("sampler_name", f"unknown sampler {body.sampler!r}; allowed: {allowed}",
                              body.sampler) from None
        automatic_karras = schedule_type == AUTOMATIC and spec.name in AUTOMATIC_KARRAS
        return Sampling(spec.name, None, karras_from_name or schedule_type == "karras" or automatic_karras, **noise)
    if carried is not None and schedule_type == AUTOMATIC:
        schedule_type = resolve_schedule_type(carried)
    return Sampling(k_spec.name, schedule_type, False, **noise)


def _is_kedavra_sampler(name: str) -> bool:
    """Whether kedavra's own samplers know `name` ("uni_pc" is kedavra's diffusers UniPC here, not ComfyUI's)."""
    try:
        resolve_sampler(name)
    except ValueError:
        return False
    return True


def noise_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling's rng, eta_noise_seed_delta and clip_skip from A1111's settings (module docstring); 422 naming
    override_settings for a bad value. Keys other than SAMPLING_SETTINGS are left to the notes."""
    try:
        rng = check_choice(A1111_RNG_SETTING, settings.get(A1111_RNG_SETTING, A1111_DEFAULT_RNG), RNG_SOURCES)
        ensd = check_int(A1111_ENSD_SETTING, settings.get(A1111_ENSD_SETTING, 0), 0, MAX_SEED)
        clip_skip = settings.get(A1111_CLIP_SKIP_SETTING)
        if clip_skip is not None:
            clip_skip = check_int(A1111_CLIP_SKIP_SETTING, clip_skip, 1)
        values = {name: check_number(name, settings.get(name, default), low=0)
                  for name, default in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", 0.0), ("s_noise", 1.0))}
        churn = Churn(values["s_churn"], values["s_tmin"], values["s_tmax"] or math.inf, values["s_noise"])
        eta_ddim = check_number("eta_ddim", settings.get("eta_ddim", 0.0), low=0)
        eta_ancestral = check_number("eta_ancestral", settings.get("eta_ancestral", A1111_ETA_ANCESTRAL), low=0)
    except ValueError as error:
        raise field_error("override_settings", str(error), dict(settings)) from None
    return {"rng": rng, "eta_noise_seed_delta": ensd, "clip_skip": clip_skip, "churn": churn, "eta_ddim": eta_ddim,
            "eta_ancestral": eta_ancestral}


def request_size(body: GenerationBody, pipe: Pipeline, init_size: Size | None = None,
                 admission: Admission = Admission()) -> Size:
    """(width, height): the request's, else the init image's, else the model's; multiples of its VAE factor, at
    most the admission's largest side for this model."""
    default = init_size or (pipe.config.image_size, pipe.config.image_size)
    width, height = body.width or default[0], body.height or default[1]
    multiple, largest = pipe.size_multiple, admission.max_side(pipe)
    for name, side, given in (("width", width, body.width), ("height", height, body.height)):
        if side % multiple or not multiple <= side <= largest:
            origin = "" if given else " (the size of init_images[0]; set width and height to resize it)"
            bound = f" ({admission.side_factor:g}x this model's native {pipe.config.image_size}; kedavra serve " \
                    "--max-side-factor)" if largest < MAX_SIDE else ""
            raise field_error(name, f"{name} must be a multiple of {multiple} (this model's VAE factor) from "
                                    f"{multiple} to {largest}{bound}, got {side}{origin}", side)
    return width, height


def checked_task(body: GenerationBody, pipe: Pipeline, catalog: ModelCatalog, sampling: Sampling, size: Size,
                 init_images: tuple[Image.Image, ...] = (), mask: Image.Image | None = None,
                 strength: float | None = None, hires: HiresFix | None = None,
                 inpaint: InpaintOptions | None = None, latent_resize: bool = False) -> GenerationTask:
    """The task for `body` once its parts are resolved, after the checks that need them all; 422 otherwise."""
    if pipe.config.inpainting and mask is None:
        raise field_error("mask", f"the loaded model ({pipe.config.family}) is an inpainting model: use img2img "
                                  "with init_images and a mask")
    refiner = None
    if body.refiner_checkpoint:
        try:
            refiner = catalog.find(body.refiner_checkpoint)
        except ValueError as error:
            raise field_error("refiner_checkpoint", str(error), body.refiner_checkpoint) from None
    if refiner is not None and hires is not None:
        raise field_error("refiner_checkpoint", "hires fix with a refiner is not supported here: send one of "
                                                "enable_hr or refiner_checkpoint", body.refiner_checkpoint)
    return GenerationTask(request_from_payload(body, pipe, sampling, size, init_images, mask, strength, hires,
                                               inpaint, latent_resize),
                          body.n_iter, refiner)


def request_from_payload(body: GenerationBody, pipe: Pipeline, sampling: Sampling, size: Size,
                         init_images: tuple[Image.Image, ...], mask: Image.Image | None,
                         strength: float | None, hires: HiresFix | None = None,
                         inpaint: InpaintOptions | None = None, latent_resize: bool = False) -> GenerationRequest:
    """The generation request of one HTTP request (each batch's; seed: the first image's), checked against the
    loaded model: a random seed for -1, eta for DDIM and for A1111's samplers that take one, init images
    as one image or one per batch slot; 422 with loc ["body"] for what the request or the model refuses."""
    seed = secrets.randbelow(MAX_SEED + 1) if body.seed < 0 else body.seed
    subseed = secrets.randbelow(MAX_SEED + 1) if body.subseed < 0 else body.subseed
    # A1111: a request's eta, else its setting, goes to DDIM (eta_ddim) and to the samplers that take an η
    # (eta_ancestral: Euler a, the SDE samplers, ...); the others have none
    eta, eta_ancestral = 0.0, A1111_ETA_ANCESTRAL
    if sampling.sampler.lower() == "ddim":
        eta = body.eta if body.eta is not None else sampling.eta_ddim
    elif sampling.schedule_type is not None and resolve_k_sampler(sampling.sampler)[0].eta:
        eta_ancestral = body.eta if body.eta is not None else sampling.eta_ancestral
    init_image = None
    if len(init_images) == 1:
        init_image = init_images[0]
    elif init_images:
        init_image = torch.cat([from_pil(image) for image in init_images])  # (B, 3, H, W), one per batch slot
    try:
        request = GenerationRequest.build(
            body.prompt, body.negative_prompt, num_images=body.batch_size, steps=body.steps,
            sampler=sampling.sampler, schedule_type=sampling.schedule_type, karras=sampling.karras,
            guidance_scale=body.cfg_scale, eta=eta, seed=seed, width=size[0], height=size[1], init_image=init_image,
            mask=mask, strength=strength, refiner_switch_at=body.refiner_switch_at, rng=sampling.rng,
            eta_noise_seed_delta=sampling.eta_noise_seed_delta, clip_skip=sampling.clip_skip,
            subseed=subseed if body.subseed_strength else None, subseed_strength=body.subseed_strength, hires=hires,
            churn=sampling.churn if sampling.schedule_type is not None else None, inpaint=inpaint,
            eta_ancestral=eta_ancestral, latent_resize=latent_resize)
        request_parameters(request, 0, seed, *size, None, None)  # refuses text the PNG's parameters cannot hold
        return pipe.check(request)  # also finds the LoRAs of <lora:NAME:...> tags in the server's LoRA folder
    except (ValueError, FileNotFoundError) as error:
        raise body_error(str(error)) from None


def request_notes(body: GenerationBody, request: GenerationRequest) -> list[str]:
    """The response's notes: settings accepted but not carried out."""
    notes = body.ignored_settings()
    spec, k_spec = request.sampler_spec, request.k_sampler
    stochastic = k_spec.ancestral if k_spec is not None else spec.stochastic
    takes_eta = request.sampler.lower() == "ddim" or (k_spec is not None and k_spec.eta)
    if body.eta not in (None, 1.0) and stochastic and not takes_eta:
        notes.append(f"eta applies to DDIM and to A1111's ancestral and SDE samplers; "
                     f"{request.sampler if k_spec else spec.a1111 or spec.name} adds its full ancestral noise (eta 1)")
    if isinstance(body, Img2ImgRequest) and body.mask is not None and k_spec is None:
        notes.append(f"mask_blur, inpaint_full_res, inpainting_fill, mask_round apply with A1111's samplers; "
                     f"{spec.a1111 or spec.name} (kedavra's, diffusers' trajectory) used the mask as sent")
    if k_spec is None and body.scheduler and resolve_schedule_type(body.scheduler) not in KEDAVRA_PLAN_SCHEDULES:
        notes.append(f"scheduler {body.scheduler!r} does not apply to {spec.a1111 or spec.name}, which runs on its "
                     "own timesteps; it was ignored")
    return notes


def generation_info(task: GenerationTask, outcome: GenerationOutcome, notes: list[str],
                    inpainting_model: bool) -> dict[str, Any]:
    """A1111's `Processed.js()` for the images made (see modules/processing.py), plus `interrupted` and `notes`."""
    s = task.request
    spec = s.sampler_spec
    count = len(outcome.seeds)
    subseeds = outcome.subseeds if s.subseed_strength else [-1] * count
    return {
        "prompt": s.prompts[0], "all_prompts": [s.prompts[0]] * count,
        "negative_prompt": s.negative_prompts[0], "all_negative_prompts": [s.negative_prompts[0]] * count,
        "seed": outcome.seeds[0] if count else s.seed, "all_seeds": outcome.seeds,
        "subseed": subseeds[0] if count else -1, "all_subseeds": subseeds, "subseed_strength": s.subseed_strength,
        "width": s.width, "height": s.height, "sampler_name": s.sampler if spec is None else spec.a1111 or spec.name,
        "scheduler": schedule_type_label(s.schedule_type) if spec is None else "Karras" if s.karras else "Uniform",
        "cfg_scale": s.guidance_scale, "steps": s.steps, "batch_size": s.num_images, "n_iter": task.n_iter,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": outcome.model.model_name, "sd_model_hash": outcome.model.short_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": s.strength if s.hires is None else s.hires.strength,
        "extra_generation_params": dict(outcome.parameters),
        "index_of_first_image": 0,
        "infotexts": outcome.infotexts, "styles": [], "job_timestamp": outcome.job_timestamp,
        "clip_skip": s.clip_skip or 1,
        "is_using_inpainting_conditioning": inpainting_model and s.mask is not None,
        "version": KEDAVRA_VERSION, "interrupted": outcome.interrupted, "notes": notes,
    }
