"""One generation's settings, checked once where they enter: `GenerationRequest`.

Every way in builds one: `Pipeline.__call__` from its keyword arguments, `kedavra generate` from its flags and a
PNG's parameters, the server from an HTTP body, `kedavra viz` from its options. Its constructor refuses what no
model could run (a negative seed, a sampler nobody knows, η with a sampler that has none); `for_model` then checks
what depends on the model (sizes on its VAE's grid, steps within its training timesteps, an inpainting model's
mask), fills the model's defaults and turns images into tensors. The pipeline trusts what it is given.

    request = GenerationRequest.build("a red circle", steps=20, seed=1)      # str prompt: num_images copies
    pipe.generate(request)                                                   # same as pipe("a red circle", ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kedavra.adapters.prompt_tags import batch_lora_tags
from kedavra.diffusion.rng import RNG_SOURCES
from kedavra.diffusion.samplers import SAMPLERS, SamplerSpec, check_eta, resolve_sampler
from kedavra.diffusion.samplers.euler import Churn
from kedavra.diffusion.samplers.k_diffusion import (
    A1111_ETA_ANCESTRAL,
    ETA_K_SAMPLERS,
    KSamplerSpec,
    check_eta_ancestral,
    k_sampler_names,
    resolve_k_sampler,
)
from kedavra.diffusion.sigmas import AUTOMATIC, CONVENTIONS, resolve_schedule_type
from kedavra.diffusion.timesteps import SPACINGS, check_steps
from kedavra.formats.images import from_pil
from kedavra.pipeline.hires import HiresFix
from kedavra.pipeline.inpainting import InpaintOptions, check_encodable, check_latent_upscale, inpainting_pictures
from kedavra.upscaling.named import LATENT_UPSCALE
from kedavra.validation import (
    MAX_SEED,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_optional_int,
    check_seed,
)

MAX_SIDE = 2048  # largest width/height accepted, in pixels: beyond it a CPU run takes hours
MAX_IMAGES = 64  # largest batch accepted in one call
DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "euler"  # the plainest update, one U-Net evaluation per step (Karras et al. 2022, Alg. 2)
DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default (A1111's is 7)
DEFAULT_IMG2IMG_STRENGTH = 0.8  # share of the steps run from the noised init image (A1111's and diffusers' 0.75-0.8)
DEFAULT_INPAINT_STRENGTH = 1.0  # inpainting starts the painted region from pure noise
# SDXL refiner's aesthetic-score conditioning: diffusers' StableDiffusionXLImg2ImgPipeline defaults (and A1111's
# sdxl_refiner_high/low_aesthetic_score settings): the prompt side asks for a good image, the negative side a poor one.
DEFAULT_REFINER_SWITCH_AT = 0.8  # A1111's refiner_switch_at default; diffusers' SDXL example's denoising_end
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5

Picture = Image.Image | torch.Tensor


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """What to generate, checked (see the module docstring). One image per prompt.

    prompts, negative_prompts  one negative prompt per prompt (the unconditional side of guidance); prompts may carry
                               A1111's `<lora:NAME:WEIGHT>` tags, the same set in every prompt of a batch
                               (kedavra.adapters.prompt_tags; the pipeline merges the LoRAs and encodes the rest)
    sampler, karras            kedavra's sampler name (any diffusers / A1111 / ComfyUI name is resolved to it; a
                               " Karras" suffix sets karras: Karras et al. 2022 σ spacing); None: the model's own
                               (a diffusers folder's scheduler, ModelConfig.sampler), else DEFAULT_SAMPLER, filled
                               in by `for_model`
    guidance_scale             w of classifier-free guidance (Ho and Salimans 2022, eq. 6); 1 turns it off
    guidance_rescale           φ of Lin et al. 2023, sec. 3.4 (0 = off)
    eta                        DDIM's η (Song et al. 2021, eq. 16), ddim only (A1111's "Eta DDIM")
    eta_ancestral              A1111's η of its ancestral and SDE samplers (Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE,
                               DPM++ 2M / 3M SDE, DPM fast / adaptive) run with a schedule type: the share of the
                               step's noise drawn afresh (A1111's "Eta", its setting eta_ancestral, default 1)
    seed                       image i uses seed + i (A1111's convention); None: a random one at generation
    width, height              pixels; None: the model's image size
    init_image, mask, strength image to image and inpainting: PIL images or tensors (init: (B|1, 3, H, W) in
                               [-1, 1]; mask: white / 1 where to paint); strength None: 0.8, or 1.0 with a mask
    clip_skip                  A1111's "Clip skip" (None: the model's own)
    original_size, crop_top_left, target_size
                               SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2), (height, width) and (top,
                               left) in pixels as diffusers orders them; None: the image's size, (0, 0), the
                               image's size (diffusers' and A1111's defaults). Ignored by models without it.
    aesthetic_score, negative_aesthetic_score
                               the SDXL refiner's aesthetic conditioning of the prompt and the negative prompt
    spacing                    the timestep spacing instead of the model's (diffusers' timestep_spacing: "leading",
                               "trailing", "linspace"); few-step distilled models (SDXL-Turbo, Lightning) want
                               "trailing", which starts at the last training timestep (Lin et al. 2023, sec. 3.3)
    refiner_switch_at          with a refiner (`Pipeline.generate`): the share of the training timesteps, counted
                               from the noisiest, that the base model denoises before the refiner takes over
    schedule_type, convention  run the sampler as A1111 ("a1111") or ComfyUI ("comfyui") does, on the σ's of this
                               schedule type ("Automatic", "Karras", "sgm_uniform", ...; kedavra.diffusion.sigmas);
                               None: kedavra's own plans (diffusers' trajectories). A sampler only A1111 / ComfyUI
                               list ("DPM2", "LMS", "DPM++ 3M SDE", "Restart", ...) gets "Automatic" when it is None;
                               samplers A1111 runs on timesteps (DDIM, UniPC) ignore it.
    rng                        where the noise comes from, as A1111's "Random number generator source": "CPU"
                               (torch's CPU generator: kedavra's default), "GPU" or "NV" (what an NVIDIA card draws,
                               emulated: kedavra.diffusion.rng)
    subseed, subseed_strength  A1111's variation seed and strength (slerp towards the variation seed's noise)
    eta_noise_seed_delta       A1111's ENSD: sampler noise after the initial noise restarts from seed + delta
    sigmas                     explicit noise levels, one per step, descending (e.g. an optimised few-step schedule,
                               kedavra.diffusion.step_schedule); kedavra's plans only, without karras
    hires                      A1111's hires fix (kedavra.pipeline.hires.HiresFix): a second pass at a larger size;
                               text to image only. width / height are the first pass's, as in A1111
    step_cache                 DeepCache (kedavra.networks.step_cache): a full U-Net call every `step_cache` calls,
                               the others reuse its deep features (0 or 1: off); faster, and the image changes
    churn                      Karras et al. 2022's s_churn, s_tmin, s_tmax, s_noise (kedavra.diffusion.samplers.
                               euler.Churn), A1111's "Sigma churn" settings: for A1111 / ComfyUI samplers (a schedule
                               type), applied as A1111 applies them (Euler, Heun, DPM2; s_noise also ancestral / SDE)
    inpaint                    A1111's inpainting settings (kedavra.pipeline.inpainting.InpaintOptions: mask blur,
                               "only masked" and its padding, masked content, invert, resize mode) for a mask with an
                               A1111 sampler; None: the mask as given over the whole picture
    latent_resize              A1111's resize mode 3, "Just resize (latent upscale)", for an init_image without a
                               mask: encoded at its own size (any, at least f a side), its latents resized bilinearly
                               to height/f x width/f; with a mask it is InpaintOptions(resize_mode=3)
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int = DEFAULT_STEPS
    sampler: str | None = None
    karras: bool = False
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    guidance_rescale: float = 0.0
    eta: float = 0.0
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    init_image: Picture | None = None
    mask: Picture | None = None
    strength: float | None = None
    clip_skip: int | None = None
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE
    refiner_switch_at: float = DEFAULT_REFINER_SWITCH_AT
    spacing: str | None = None
    schedule_type: str | None = None
    convention: str = "a1111"
    rng: str = "CPU"
    subseed: int | None = None
    subseed_strength: float = 0.0
    eta_noise_seed_delta: int = 0
    sigmas: tuple[float, ...] | None = None
    hires: HiresFix | None = None
    step_cache: int = 0
    churn: Churn | None = None
    inpaint: InpaintOptions | None = None
    eta_ancestral: float = A1111_ETA_ANCESTRAL
    latent_resize: bool = False

    def __post_init__(self):
        prompts, negatives = tuple(self.prompts), tuple(self.negative_prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {self.prompts!r}")
        if not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"negative_prompt must be a str or a list of str, got {self.negative_prompts!r}")
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        check_int("num_images", len(prompts), 1, MAX_IMAGES)
        batch_lora_tags(prompts)  # <lora:NAME:WEIGHT> tags: their syntax, and one set per batch
        check_int("steps", self.steps, 1)
        sampler, schedule_type, karras_from_name = (self._sampling() if self.sampler is not None
                                                    else (None, self.schedule_type, False))
        check_bool("karras", self.karras)
        check_number("guidance_scale", self.guidance_scale, low=0)
        check_number("guidance_rescale", self.guidance_rescale, 0, 1)
        if sampler is None:  # the model's sampler: checked once for_model has filled it in
            if self.schedule_type is not None:
                resolve_schedule_type(self.schedule_type)
        elif schedule_type is None:
            check_eta(resolve_sampler(sampler)[0], self.eta)
        elif self.karras:
            raise ValueError(f"karras does not apply with a schedule type ({self.schedule_type!r}): the schedule type "
                             "sets the σ's")
        elif check_number("eta", self.eta, low=0) and sampler not in ETA_K_SAMPLERS:
            raise ValueError(f"eta={self.eta} does not apply to {sampler} with a schedule type "
                             f"({self.schedule_type!r}): it draws its own noise (A1111's eta applies to "
                             f"{', '.join(ETA_K_SAMPLERS)})")
        check_choice("sampling convention", self.convention, CONVENTIONS)
        if schedule_type is not None:
            check_eta_ancestral(resolve_k_sampler(sampler, self.convention)[0], self.eta_ancestral, self.convention)
        elif sampler is not None and check_number("eta_ancestral", self.eta_ancestral, low=0) != A1111_ETA_ANCESTRAL:
            raise ValueError(f"eta_ancestral={self.eta_ancestral} applies to A1111's ancestral and SDE samplers run "
                             f"as A1111 runs them (a schedule type), not kedavra's {sampler} (its η is eta)")
        check_choice("rng", self.rng, RNG_SOURCES)
        check_seed("subseed", self.subseed, optional=True)
        check_number("subseed_strength", self.subseed_strength, 0, 1)
        if self.subseed_strength and self.subseed is None:
            raise ValueError(f"subseed_strength={self.subseed_strength} needs a subseed (the variation seed)")
        check_int("eta_noise_seed_delta", self.eta_noise_seed_delta, 0, MAX_SEED)
        if schedule_type is not None and self.convention == "comfyui" and (
                self.subseed_strength or self.eta_noise_seed_delta):
            raise ValueError("variation seeds and ENSD are A1111's; ComfyUI's noise (convention 'comfyui') has "
                             "neither")
        if self.sigmas is not None:
            levels = self.sigmas.tolist() if isinstance(self.sigmas, torch.Tensor) else self.sigmas
            if isinstance(levels, str) or not isinstance(levels, Sequence) or len(levels) != self.steps:
                raise ValueError(f"sigmas must give one noise level per step ({self.steps}), got {self.sigmas!r}")
            levels = tuple(check_number("sigmas value", level, low=0, low_inclusive=False) for level in levels)
            if any(b >= a for a, b in zip(levels, levels[1:], strict=False)):
                raise ValueError(f"sigmas must descend strictly, got {levels}")
            if schedule_type is not None or self.karras or karras_from_name:
                raise ValueError("sigmas replace the plan's noise levels: not with a schedule type or karras")
            object.__setattr__(self, "sigmas", levels)
        check_int("step_cache", self.step_cache, 0)  # U-Net calls per full call; 0 or 1: off
        if self.churn is not None:
            if not isinstance(self.churn, Churn):
                raise ValueError(f"churn must be a Churn (kedavra.diffusion.samplers.euler), got {self.churn!r}")
            if not self.churn.is_default and schedule_type is None:
                raise ValueError("s_churn, s_tmin, s_tmax and s_noise apply to A1111's / ComfyUI's samplers: give a "
                                 "schedule type (e.g. Automatic)")
        if self.hires is not None:
            if not isinstance(self.hires, HiresFix):
                raise ValueError(f"hires must be a HiresFix (kedavra.pipeline.hires), got {type(self.hires).__name__}")
            if self.init_image is not None:
                raise ValueError("hires fix is text to image's second pass, not for init_image: upscale the image "
                                 "(kedavra upscale), then run image to image at the larger size")
        if self.inpaint is not None:
            if not isinstance(self.inpaint, InpaintOptions):
                raise ValueError(f"inpaint must be an InpaintOptions (kedavra.pipeline.inpainting), got "
                                 f"{type(self.inpaint).__name__}")
            settings = "mask blur, only masked, masked content, mask rounding and the mask's resize mode"
            if self.mask is None and not self.inpaint.is_default:
                raise ValueError(f"{settings} need a mask")
            if not self.inpaint.is_default and (schedule_type is None or self.convention != "a1111"):
                raise ValueError(f"{settings} are A1111's inpainting settings: give an A1111 sampler with a schedule "
                                 "type (e.g. sampler 'Euler a' with schedule type 'Automatic'; convention 'a1111')")
        if check_bool("latent_resize", self.latent_resize) and (self.init_image is None or self.mask is not None):
            raise ValueError("latent_resize (resize mode 3, latent upscale) resizes an init_image without a mask; "
                             "with a mask give inpaint=InpaintOptions(resize_mode=3) and an A1111 sampler"
                             if self.init_image is not None else "latent_resize needs init_image")
        check_seed("seed", self.seed, optional=True)
        for name in ("width", "height"):
            check_optional_int(name, getattr(self, name), 1, MAX_SIDE, none_means="the model's image size")
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Image.Image | torch.Tensor):
                raise ValueError(f"{name} must be a PIL image or a tensor, got {type(value).__name__}")
        if self.strength is not None:
            if self.init_image is None:
                raise ValueError(f"strength={self.strength} needs init_image: it sets how much of that image is "
                                 "repainted")
            check_number("strength", self.strength, 0, 1)
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask needs init_image: inpainting repaints part of a given image")
        check_optional_int("clip_skip", self.clip_skip, 1, none_means="the model's own")
        for name, low in (("original_size", 1), ("crop_top_left", 0), ("target_size", 1)):
            value = getattr(self, name)
            if value is None and name != "crop_top_left":
                continue
            if not isinstance(value, tuple | list) or len(value) != 2:
                raise ValueError(f"{name} must be a pair of integers (height, width), got {value!r}")
            for part in value:
                check_int(f"{name} value", part, low, 8 * MAX_SIDE)
            object.__setattr__(self, name, tuple(int(part) for part in value))
        check_number("aesthetic_score", self.aesthetic_score)
        check_number("negative_aesthetic_score", self.negative_aesthetic_score)
        check_number("refiner_switch_at", self.refiner_switch_at, 0, 1)
        if self.spacing is not None:
            check_choice("timestep spacing", self.spacing, SPACINGS)
        set_field = object.__setattr__  # normalising a frozen instance's own fields while it is being built
        set_field(self, "prompts", prompts)
        set_field(self, "negative_prompts", negatives)
        set_field(self, "sampler", sampler)
        set_field(self, "schedule_type", schedule_type)
        set_field(self, "karras", self.karras or karras_from_name)
        if self.init_image is not None and self.strength is None:
            set_field(self, "strength", DEFAULT_INPAINT_STRENGTH if self.mask is not None else DEFAULT_IMG2IMG_STRENGTH)

    @classmethod
    def build(cls, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *, num_images: int = 1,
              **settings) -> GenerationRequest:
        """A request from `Pipeline.__call__`'s arguments: a str prompt is repeated `num_images` times (a list gives
        one image per prompt), a str negative prompt once per prompt."""
        if isinstance(prompt, str):
            prompts = [prompt] * check_int("num_images", num_images, 1, MAX_IMAGES)
        elif isinstance(prompt, Sequence):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        if isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        elif isinstance(negative_prompt, Sequence):
            negatives = list(negative_prompt)
        else:
            raise ValueError(f"negative_prompt must be a str or a list of str, got {negative_prompt!r}")
        unknown = set(settings) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        return cls(tuple(prompts), tuple(negatives), **settings)

    @property
    def num_images(self) -> int:
        return len(self.prompts)

    def _sampling(self) -> tuple[str, str | None, bool]:
        """(sampler name, resolved schedule type or None, karras from the name): an A1111 / ComfyUI sampler with a
        schedule type (or one only they list) takes their path; any other runs on kedavra's plans."""
        schedule_type = None if self.schedule_type is None else resolve_schedule_type(self.schedule_type)
        try:
            kedavra_spec, karras_from_name = resolve_sampler(self.sampler)
        except ValueError:
            kedavra_spec, karras_from_name = None, False
        if schedule_type is not None or kedavra_spec is None:
            try:
                k_spec, carried = resolve_k_sampler(self.sampler, self.convention)
            except ValueError:
                if kedavra_spec is None:
                    allowed = f"{', '.join(SAMPLERS)} (kedavra), {', '.join(k_sampler_names())} (A1111 / ComfyUI)"
                    raise ValueError(f"unknown sampler {self.sampler!r}; allowed: {allowed}, optionally with "
                                     "' Karras'") from None
                return kedavra_spec.name, None, karras_from_name  # A1111 runs DDIM, UniPC, ... on timesteps
            return k_spec.name, carried or schedule_type or AUTOMATIC, False
        return kedavra_spec.name, None, karras_from_name

    @property
    def uses_image_noise(self) -> bool:
        """Whether the noise is drawn as A1111 draws it (kedavra.diffusion.rng.ImageNoise) rather than from one CPU
        generator per image (the same numbers as A1111's "CPU" source without variation seed or ENSD)."""
        return (self.schedule_type is not None or self.rng != "CPU" or bool(self.subseed_strength)
                or bool(self.eta_noise_seed_delta))

    @property
    def comfyui_noise(self) -> bool:
        """Whether the noise is drawn as ComfyUI draws it (a ComfyUI-convention run): the whole batch's initial noise
        from one CPU generator seeded with the seed, and its sampler's per-step noise (kedavra.diffusion.rng)."""
        return self.schedule_type is not None and self.convention == "comfyui"

    def image_seeds(self, seed: int) -> tuple[list[int], list[int] | None]:
        """(seed of each image, variation seed of each image or None) for a batch starting at `seed`: A1111's rule
        (modules/processing.py): seed + i, except that with a variation strength every image keeps `seed` and the
        variation seeds count up instead. ComfyUI draws a batch from one seed: every image has it."""
        n = self.num_images
        if self.comfyui_noise:
            return [seed] * n, None
        if self.subseed_strength:
            return [seed] * n, [(self.subseed + i) % (MAX_SEED + 1) for i in range(n)]
        return [(seed + i) % (MAX_SEED + 1) for i in range(n)], None

    @property
    def resizes_latents(self) -> bool:
        """Whether init_image is encoded at its own size and its latents resized to the request's (A1111's resize
        mode 3): `latent_resize`, or an A1111 inpainting request's InpaintOptions.resize_mode."""
        return self.latent_resize or (self.a1111_inpainting and self.inpaint is not None
                                      and self.inpaint.resize_mode == LATENT_UPSCALE)

    @property
    def a1111_inpainting(self) -> bool:
        """Whether the request inpaints as A1111 does (a mask, an A1111 sampler with a schedule type): its mask
        settings (`inpaint`), latent mask and final overlay (kedavra.pipeline.inpainting)."""
        return self.mask is not None and self.schedule_type is not None and self.convention == "a1111"

    @property
    def sampler_spec(self) -> SamplerSpec | None:
        """kedavra's sampler, or None when the request runs an A1111 / ComfyUI sampler (`k_sampler`)."""
        return None if self.schedule_type is not None else resolve_sampler(self.sampler)[0]

    @property
    def k_sampler(self) -> KSamplerSpec | None:
        """The A1111 / ComfyUI sampler of a request with a schedule type, else None."""
        return resolve_k_sampler(self.sampler, self.convention)[0] if self.schedule_type is not None else None

    def replace(self, **changes) -> GenerationRequest:
        """A copy with some fields changed, checked again."""
        return dataclasses.replace(self, **changes)

    def for_model(self, config) -> GenerationRequest:
        """This request checked against a model's `ModelConfig`, with its defaults filled in: width and height set
        (multiples of the VAE's downsampling factor), steps within the training timesteps, clip_skip within the
        text encoder's layers, an inpainting model given a mask, and init_image / mask as (B, 3, H, W) in [-1, 1]
        and (B, 1, H, W) in [0, 1] tensors on the CPU, at width x height; an A1111 inpainting request's pictures
        are left as given (any size, the same for both) for the pipeline to prepare."""
        if self.sampler is None:
            return dataclasses.replace(self, sampler=config.sampler or DEFAULT_SAMPLER).for_model(config)
        f = config.vae.downsample_factor
        width = config.image_size if self.width is None else self.width
        height = config.image_size if self.height is None else self.height
        for name, side in (("width", width), ("height", height)):
            check_int(name, side, f, MAX_SIDE, multiple_of=f, note=" (the VAE's downsampling factor)")
        check_steps(self.steps, config.schedule.num_train_timesteps)
        if self.clip_skip is not None:
            check_int("clip_skip", self.clip_skip, 1, getattr(config.text_encoder, "num_layers", 1)
                      if getattr(config.text_encoder, "kind", "clip") == "clip" else 1)
        if self.hires is not None:
            self.hires.geometry(width, height, f)  # the second pass's size within bounds
        if config.inpainting and self.mask is None:
            raise ValueError(f"{config.family} is an inpainting model: give init_image and mask")
        init_image = mask = None
        if self.a1111_inpainting:  # prepared by the pipeline (kedavra.pipeline.inpainting), from any size
            init_image, mask = self.init_image, self.mask
            image_size = inpainting_pictures(init_image, mask, self.num_images)[0][0].size
            check_latent_upscale(self.inpaint or InpaintOptions(), image_size, (width, height), f, config.inpainting)
        elif self.init_image is not None:
            init_image = _image_batch(self.init_image, self.num_images, None if self.latent_resize else (width, height))
            if self.latent_resize:
                check_encodable((init_image.shape[-1], init_image.shape[-2]), f)
            if self.mask is not None:
                mask = _mask_batch(self.mask, self.num_images, width, height)
        return dataclasses.replace(self, width=width, height=height, init_image=init_image, mask=mask,
                                   original_size=self.original_size or (height, width),
                                   target_size=self.target_size or (height, width))

    def time_ids(self, micro_conditioning: int) -> tuple[list[float], list[float]]:
        """SDXL's micro-conditioning numbers for the prompt and the negative prompt (Podell et al. 2023, sec. 2.2):
        6 for the base, original size + crop top-left + target size; 5 for the refiner, original size + crop
        top-left + aesthetic score (diffusers' _get_add_time_ids order). Call on a request `for_model` filled."""
        common = [*self.original_size, *self.crop_top_left]
        if micro_conditioning == 6:
            return common + [*self.target_size], common + [*self.target_size]
        return common + [self.aesthetic_score], common + [self.negative_aesthetic_score]


def _image_batch(image: Picture, batch: int, size: tuple[int, int] | None) -> torch.Tensor:
    """An init image (PIL, or a (B|1, 3, H, W) / (3, H, W) tensor in [-1, 1]) as a (B, 3, H, W) tensor in [-1, 1],
    of `size` (width, height), or of any size for None."""
    tensor = from_pil(image) if isinstance(image, Image.Image) else (image if image.ndim == 4 else image[None])
    if tensor.ndim != 4 or tensor.shape[-3] != 3 or size not in (None, tensor.shape[:-3:-1]):
        raise ValueError(f"init_image is {tensor.shape[-1]}x{tensor.shape[-2]} with {tensor.shape[-3]} channels; "
                         "it must be RGB" + (f" {size[0]}x{size[1]} (the requested size)" if size else ""))
    if tensor.shape[0] not in (1, batch):
        raise ValueError(f"init_image holds {tensor.shape[0]} images for a batch of {batch}; give 1 or {batch}")
    return tensor.float().expand(batch, -1, -1, -1)


def _mask_batch(mask: Picture, batch: int, width: int, height: int) -> torch.Tensor:
    """A mask (PIL image, white = paint, or a (B|1, 1, H, W) / (H, W) tensor in [0, 1]) -> (B, 1, H, W) in [0, 1]
    (grey levels kept: ComfyUI blends with them; kedavra's plans binarise it at 0.5, as SD's pipelines do)."""
    if isinstance(mask, Image.Image):
        tensor = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]
    else:
        tensor = mask.float().reshape(-1, 1, *mask.shape[-2:]) if mask.ndim >= 2 else mask
    if tensor.ndim != 4 or tensor.shape[-2:] != (height, width):
        raise ValueError(f"mask is {tuple(tensor.shape[-2:])[::-1]} (width, height); it must be {width}x{height}, "
                         "the size of the image")
    if tensor.shape[0] not in (1, batch):
        raise ValueError(f"mask holds {tensor.shape[0]} masks for a batch of {batch}; give 1 or {batch}")
    return tensor.float().clamp(0, 1).expand(batch, -1, -1, -1)

