"""Request bodies into the worker's tasks, checked against the loaded model, and outcomes into A1111's info.

    txt2img_task(Txt2ImgRequest, pipe, catalog) / img2img_task(Img2ImgRequest, pipe, catalog) -> GenerationTask
    (or a 422; the catalog names the refiner_checkpoint)
    generation_info(task, outcome, notes, inpainting_model) -> A1111's Processed.js() dict

The bodies' ranges are checked by their schemas; what depends on the model (sizes a multiple of its VAE factor,
an inpainting model needing a mask) and on several fields together (strength leaving a step to run) is checked
here, in that order: sampler and schedule type, sizes, init images, mask, then the settings as a whole. The
generation request itself is built in one place, `request_from_payload`.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
from PIL import Image, ImageOps

from kedavra.diffusion.samplers import SamplerSpec, resolve_sampler
from kedavra.diffusion.timesteps import start_index_for_strength
from kedavra.formats.images import from_pil
from kedavra.formats.png_info import KEDAVRA_VERSION
from kedavra.pipeline.infotext import request_parameters, schedule_karras
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import MAX_SIDE, GenerationRequest
from kedavra.serving.errors import body_error, field_error
from kedavra.serving.schemas import (
    SCHEDULERS,
    GenerationBody,
    Img2ImgRequest,
    Txt2ImgRequest,
    decode_image,
)
from kedavra.serving.worker import GenerationOutcome, GenerationTask, ModelCatalog
from kedavra.validation import MAX_SEED

Sampling = tuple[SamplerSpec, bool]  # (the sampler, whether its σ spacing is Karras')
Size = tuple[int, int]  # (width, height) in pixels


def txt2img_task(body: Txt2ImgRequest, pipe: Pipeline, catalog: ModelCatalog) -> GenerationTask:
    """`body` checked against `pipe` and resolved (a random seed for -1, the model's size by default)."""
    sampling = resolve_sampling(body)
    return checked_task(body, pipe, catalog, sampling, request_size(body, pipe))


def img2img_task(body: Img2ImgRequest, pipe: Pipeline, catalog: ModelCatalog) -> GenerationTask:
    """`body` checked and resolved, its init images resized to the request's size (A1111's resize_mode 0, "just
    resize"), its mask (white = paint) decoded and inverted when asked."""
    sampling = resolve_sampling(body)
    decoded = [decode_image(text).convert("RGB") for text in body.init_images]
    width, height = request_size(body, pipe, decoded[0].size)
    if len(decoded) not in (1, body.batch_size):
        raise field_error("init_images", f"give 1 init image or one per batch image ({body.batch_size}), "
                                         f"got {len(decoded)}", len(decoded))
    try:
        start_index_for_strength(body.steps, body.denoising_strength)
    except ValueError as error:
        raise field_error("denoising_strength", str(error), body.denoising_strength) from None
    init_images = tuple(image if image.size == (width, height) else
                        image.resize((width, height), Image.Resampling.LANCZOS) for image in decoded)
    mask = None
    if body.mask is not None:
        mask = decode_image(body.mask).convert("L").resize((width, height), Image.Resampling.NEAREST)
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    return checked_task(body, pipe, catalog, sampling, (width, height), init_images, mask, body.denoising_strength)


def resolve_sampling(body: GenerationBody) -> Sampling:
    """The request's sampler and whether its schedule type means Karras σ spacing (A1111's "automatic": the
    sampler's own choice); 422 naming sampler_name or scheduler."""
    try:
        spec, karras_from_name = resolve_sampler(body.sampler)
    except ValueError as error:
        raise field_error("sampler_name", str(error), body.sampler) from None
    name = (body.scheduler or "automatic").strip().lower()
    if name not in SCHEDULERS:
        raise field_error("scheduler", f"unknown schedule type {body.scheduler!r}; allowed: "
                                       f"{', '.join(SCHEDULERS.values())} (or their lower-case names)", body.scheduler)
    return spec, schedule_karras(SCHEDULERS[name], spec, karras_from_name)


def request_size(body: GenerationBody, pipe: Pipeline, init_size: Size | None = None) -> Size:
    """(width, height): the request's, else the init image's, else the model's; multiples of its VAE factor."""
    default = init_size or (pipe.config.image_size, pipe.config.image_size)
    width, height = body.width or default[0], body.height or default[1]
    multiple = pipe.size_multiple
    for name, side, given in (("width", width, body.width), ("height", height, body.height)):
        if side % multiple or not multiple <= side <= MAX_SIDE:
            origin = "" if given else " (the size of init_images[0]; set width and height to resize it)"
            raise field_error(name, f"{name} must be a multiple of {multiple} (this model's VAE factor) from "
                                    f"{multiple} to {MAX_SIDE}, got {side}{origin}", side)
    return width, height


def checked_task(body: GenerationBody, pipe: Pipeline, catalog: ModelCatalog, sampling: Sampling, size: Size,
                 init_images: tuple[Image.Image, ...] = (), mask: Image.Image | None = None,
                 strength: float | None = None) -> GenerationTask:
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
    return GenerationTask(request_from_payload(body, pipe, sampling, size, init_images, mask, strength), body.n_iter,
                          refiner)


def request_from_payload(body: GenerationBody, pipe: Pipeline, sampling: Sampling, size: Size,
                         init_images: tuple[Image.Image, ...], mask: Image.Image | None,
                         strength: float | None) -> GenerationRequest:
    """The generation request of one HTTP request (each batch's; seed: the first image's), checked against the
    loaded model: a random seed for -1, eta for DDIM only (the other samplers' noise is their own), init images
    as one image or one per batch slot; 422 with loc ["body"] for what the request or the model refuses."""
    sampler, karras = sampling
    seed = secrets.randbelow(MAX_SEED + 1) if body.seed < 0 else body.seed
    eta = (body.eta if body.eta is not None else 0.0) if sampler.name == "ddim" else 0.0
    init_image = None
    if len(init_images) == 1:
        init_image = init_images[0]
    elif init_images:
        init_image = torch.cat([from_pil(image) for image in init_images])  # (B, 3, H, W), one per batch slot
    try:
        request = GenerationRequest.build(
            body.prompt, body.negative_prompt, num_images=body.batch_size, steps=body.steps, sampler=sampler.name,
            karras=karras, guidance_scale=body.cfg_scale, eta=eta, seed=seed, width=size[0], height=size[1],
            init_image=init_image, mask=mask, strength=strength, refiner_switch_at=body.refiner_switch_at)
        request_parameters(request, 0, seed, *size, None, None)  # refuses text the PNG's parameters cannot hold
        return pipe.check(request)  # also finds the LoRAs of <lora:NAME:...> tags in the server's LoRA folder
    except (ValueError, FileNotFoundError) as error:
        raise body_error(str(error)) from None


def request_notes(body: GenerationBody, spec: SamplerSpec) -> list[str]:
    """The response's notes: settings accepted but not carried out."""
    notes = body.ignored_settings()
    if body.eta not in (None, 1.0) and spec.stochastic and spec.name != "ddim":
        notes.append(f"eta applies to DDIM only; {spec.a1111 or spec.name} adds its full ancestral noise (eta 1)")
    return notes


def generation_info(task: GenerationTask, outcome: GenerationOutcome, notes: list[str],
                    inpainting_model: bool) -> dict[str, Any]:
    """A1111's `Processed.js()` for the images made (see modules/processing.py), plus `interrupted` and `notes`."""
    s = task.request
    spec = s.sampler_spec
    count = len(outcome.seeds)
    return {
        "prompt": s.prompts[0], "all_prompts": [s.prompts[0]] * count,
        "negative_prompt": s.negative_prompts[0], "all_negative_prompts": [s.negative_prompts[0]] * count,
        "seed": outcome.seeds[0] if count else s.seed, "all_seeds": outcome.seeds,
        "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": s.width, "height": s.height, "sampler_name": spec.a1111 or spec.name,
        "scheduler": SCHEDULERS["karras"] if s.karras else SCHEDULERS["uniform"],
        "cfg_scale": s.guidance_scale, "steps": s.steps, "batch_size": s.num_images, "n_iter": task.n_iter,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": outcome.model.model_name, "sd_model_hash": outcome.model.short_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": s.strength, "extra_generation_params": dict(outcome.parameters),
        "index_of_first_image": 0,
        "infotexts": outcome.infotexts, "styles": [], "job_timestamp": outcome.job_timestamp, "clip_skip": 1,
        "is_using_inpainting_conditioning": inpainting_model and s.mask is not None,
        "version": KEDAVRA_VERSION, "interrupted": outcome.interrupted, "notes": notes,
    }
