"""A request in A1111's words: the PNG "parameters" text of an image (kedavra.formats.png_info) made from a
`GenerationRequest`, and A1111's "Schedule type" read back as Karras spacing or not.

A1111 (v1.9 on) writes a "Schedule type" always; "Automatic" and "Uniform" mean the sampler's own spacing, except
that its 'DPM++ 2M' defaults to Karras (modules/sd_samplers_kdiffusion.py: {'scheduler': 'karras'}).
"""

from __future__ import annotations

from collections.abc import Mapping

from kedavra.diffusion.samplers.euler import Churn
from kedavra.diffusion.samplers.k_diffusion import A1111_ETA_ANCESTRAL, effective_schedule_type
from kedavra.diffusion.sigmas import AUTOMATIC, schedule_type_label
from kedavra.formats.png_info import GenerationParameters
from kedavra.pipeline.request import GenerationRequest

KARRAS_SCHEDULE = "Karras"  # A1111's "Schedule type" value for Karras σ spacing
AUTOMATIC_KARRAS = ("dpmpp_2m",)  # samplers whose "Automatic" schedule is Karras in A1111
ETA_KEY = "Eta DDIM"  # A1111 (modules/sd_samplers_compvis.py) writes DDIM's η under this key when it is not 0
ETA_ANCESTRAL_KEY = "Eta"  # A1111 (sd_samplers_kdiffusion.py): the ancestral / SDE samplers' η when it is not 1
REFINER_KEY = "Refiner"  # A1111 (modules/processing.py): "Refiner: NAME [HASH]" when a refiner ran
REFINER_SWITCH_KEY = "Refiner switch at"  # A1111: the refiner_switch_at it ran with
SPACING_KEY = "Timestep spacing"  # ours: written only when a request overrides the model's spacing
SIGMAS_KEY = "Sigmas"  # ours: a request's explicit noise levels, space-separated, each as Python writes the float
RNG_KEY, ENSD_KEY = "RNG", "ENSD"  # A1111's keys for the noise source and the eta noise seed delta
VARIATION_SEED_KEY, VARIATION_STRENGTH_KEY = "Variation seed", "Variation seed strength"  # A1111's subseed keys
A1111_DEFAULT_RNG = "GPU"  # what an A1111 PNG without "RNG" was made with
CONVENTION_KEY = "Sampling convention"  # ours: "comfyui" when the sampler ran as ComfyUI runs it
# A1111's keys for Karras et al. 2022's churn settings, written when not the default and the sampler takes them
CHURN_KEYS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
STEP_CACHE_KEY = "Step cache"  # ours: DeepCache's interval (a full U-Net call every N calls) when one was used
GUIDANCE_RESCALE_KEY = "CFG rescale"  # SD.Next's key for Lin et al. 2023's φ (A1111 itself has no such option)


def noise_parameters(request: GenerationRequest, index: int) -> dict[str, str]:
    """A1111's infotext fields for the noise (modules/processing.py): "RNG" (kedavra writes it always, so that its
    own PNGs read back with the source they were made with; A1111 omits its default "GPU"), "ENSD", and "Variation
    seed" / "Variation seed strength"; and "Sampling convention" when a ComfyUI-style run made the image."""
    fields = {RNG_KEY: request.rng}
    if request.eta_noise_seed_delta:
        fields[ENSD_KEY] = str(request.eta_noise_seed_delta)
    if request.subseed_strength:
        fields[VARIATION_SEED_KEY] = str(request.image_seeds(request.seed or 0)[1][index])
        fields[VARIATION_STRENGTH_KEY] = repr(float(request.subseed_strength))
    if request.schedule_type is not None and request.convention != "a1111":
        fields[CONVENTION_KEY] = request.convention
    return fields


def request_parameters(request: GenerationRequest, index: int, seed: int, width: int, height: int,
                       model: str | None, model_hash: str | None, refiner: str | None = None,
                       generated: Mapping[str, str] | None = None) -> GenerationParameters:
    """What goes into the PNG of the request's image `index`, made with `seed` at width x height (and `refiner`,
    A1111's "NAME [HASH]" of the refiner, when one ran; `generated`: what the pipeline adds, GenerationResult's
    `parameters`, e.g. "Lora hashes"). Raises ValueError when the text cannot be written (GenerationParameters'
    checks), so an edge may call it early."""
    extra = dict(generated or {})
    if refiner is not None:
        extra[REFINER_KEY] = refiner
        extra[REFINER_SWITCH_KEY] = repr(float(request.refiner_switch_at))
    if request.guidance_rescale:
        extra[GUIDANCE_RESCALE_KEY] = repr(float(request.guidance_rescale))
    if request.eta:
        extra[ETA_KEY] = repr(float(request.eta))
    if request.eta_ancestral != A1111_ETA_ANCESTRAL:
        extra[ETA_ANCESTRAL_KEY] = repr(float(request.eta_ancestral))
    if request.spacing is not None:
        extra[SPACING_KEY] = request.spacing
    extra.update(churn_parameters(request))
    if request.step_cache > 1:
        extra[STEP_CACHE_KEY] = str(request.step_cache)
    if request.sigmas is not None:
        extra[SIGMAS_KEY] = " ".join(repr(float(level)) for level in request.sigmas)
    extra.update(noise_parameters(request, index))
    if request.mask is not None and request.inpaint is not None:
        extra.update(request.inpaint.infotext())
    sampler, schedule_type = sampler_label(request)
    strength = request.strength
    if request.hires is not None:  # A1111's "Denoising strength" is the hires pass's in a txt2img infotext
        hires, strength = request.hires, request.hires.strength
        second = request.replace(sampler=hires.sampler or request.sampler, eta=0.0, sigmas=None, hires=None,
                                 schedule_type=hires.schedule_type or request.schedule_type)
        extra.update(hires.infotext(sampler, schedule_type, *sampler_label(second), request.prompts[index],
                                    request.negative_prompts[index]))
    return GenerationParameters(
        prompt=request.prompts[index], negative_prompt=request.negative_prompts[index], steps=request.steps,
        sampler=sampler, schedule_type=schedule_type,
        cfg_scale=request.guidance_scale, seed=seed, width=width, height=height, model_hash=model_hash, model=model,
        denoising_strength=strength, clip_skip=request.clip_skip, extra=extra)


def sampler_label(request: GenerationRequest) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as the infotext names the request's sampling."""
    if request.schedule_type is not None:  # an A1111 / ComfyUI sampler, named as they name it
        # A1111 writes the schedule type "Automatic" resolved to (Karras for DPM++ 2M), and "Automatic" where the
        # sampler has none of its own (the model's σ table, "Uniform")
        kind = effective_schedule_type(request.k_sampler, request.schedule_type, request.convention)
        automatic = request.schedule_type == AUTOMATIC and kind == "uniform"
        return request.sampler, schedule_type_label(AUTOMATIC if automatic else kind)
    # kedavra's own plans: no "Schedule type" (that would read back as an A1111 run); Karras σ's in the name,
    # as A1111 named its samplers before 1.9 ("DPM++ 2M Karras")
    spec = request.sampler_spec
    return f"{spec.a1111 or spec.name}{' ' + KARRAS_SCHEDULE if request.karras else ''}", None


def churn_parameters(request: GenerationRequest) -> dict[str, str]:
    """A1111's "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise": the settings that differ from the default
    and that the request's sampler takes (all four for Euler, Heun, DPM2; "Sigma noise" for the ancestral / SDE
    samplers), as A1111 writes them (sd_samplers_kdiffusion.py)."""
    churn, spec = request.churn, request.k_sampler
    if churn is None or spec is None or not spec.churn:
        return {}
    default = Churn()
    names = CHURN_KEYS if spec.churn == "all" else {"s_noise": CHURN_KEYS["s_noise"]}
    return {key: repr(float(getattr(churn, name))) for name, key in names.items()
            if getattr(churn, name) != getattr(default, name)}
