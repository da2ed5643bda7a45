"""Text to image (and image to image): the only module that knows every part.

    prompt -> tokenizer -> text encoder -> context (B, L, D)
    seed -> noise z (B, C, h, w) -> sampler driving the U-Net with classifier-free guidance -> latents
    latents -> VAE decoder -> image

The U-Net runs on the conditional and the unconditional (negative-prompt) context in one batch and the two
predictions are combined by `kedavra.diffusion.guidance.classifier_free_guidance` (Ho and Salimans 2022, eq. 6)
inside the model the sampler drives (kedavra.pipeline.guided_unet).
Settings arrive as a checked `GenerationRequest` (kedavra.pipeline.request); nothing here checks them again.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from kedavra.adapters.lora_file import LoraFile, find_loras, locate_lora, read_lora
from kedavra.adapters.merge import LoraMerger, LoraUse
from kedavra.adapters.prompt_tags import LoraTag, batch_lora_tags
from kedavra.adapters.textual_inversion import Embedding, EmbeddingLibrary, LoadReport
from kedavra.diffusion.brownian import BrownianTreeNoise
from kedavra.diffusion.rng import ComfyNoiseSampler, ImageNoise, comfyui_inpaint_noise, comfyui_noise
from kedavra.diffusion.samplers import StepCallback, sample
from kedavra.diffusion.samplers.registry import SET_ALPHA_TO_ONE_SAMPLERS, inpaints_from_noise
from kedavra.diffusion.sigmas import a1111_img2img_steps
from kedavra.diffusion.timesteps import check_steps
from kedavra.formats.images import from_pil, to_pil
from kedavra.mapped_memory import drop_unused_pages
from kedavra.networks.acceleration import optimize_for_inference
from kedavra.networks.int8 import quantise_unet
from kedavra.networks.model import StableDiffusion
from kedavra.networks.taesd import TinyAutoencoder, load_tiny_autoencoder
from kedavra.networks.vae_tiling import Tiling
from kedavra.pipeline.device import INT8, default_device, default_dtype, network_dtype, parse_precision, trim_heap
from kedavra.pipeline.guided_unet import GuidedUNet, ModelSwitch
from kedavra.pipeline.hires import crop_latents, upscale_latents
from kedavra.pipeline.inpainting import a1111_inpainting, program_latent_mask, resize_init_latents
from kedavra.pipeline.prompt_weighting import TextConditioning, encode_conditioning
from kedavra.pipeline.request import GenerationRequest
from kedavra.upscaling.named import UpscalerCache, resize_image
from kedavra.validation import MAX_SEED, check_bool, check_number

BASE_MICRO_CONDITIONING = 6  # SDXL base: original size, crop top-left, target size (ModelConfig.micro_conditioning)
REFINER_MICRO_CONDITIONING = 5  # SDXL refiner: original size, crop top-left, aesthetic score
LORA_HASHES_KEY = "Lora hashes"  # A1111's infotext key: "NAME: SHORTHASH, ..." of the LoRAs applied
TI_HASHES_KEY = "TI hashes"  # A1111's infotext key: "NAME: SHORTHASH, ..." of the embeddings the prompts used
# Images larger than this on a side go through the VAE in 512-pixel tiles (diffusers' enable_vae_tiling sizes),
# which bounds the decoder's activation memory; smaller ones are processed whole, exactly.
VAE_TILING = Tiling(tile_size=512, overlap=128, threshold=1024)


@dataclass
class GenerationResult:
    """What a pipeline call returns: the images, the seed of each, and the final latents; `parameters`: what the
    infotext should add for the adapters used (A1111's "Lora hashes")."""

    images: list[Image.Image]
    seeds: list[int]
    latents: torch.Tensor
    parameters: dict[str, str] = field(default_factory=dict)


class Pipeline:
    """Generate images with a `StableDiffusion` model (see `__call__`)."""

    def __init__(self, model: StableDiffusion, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, optimize: bool = True,
                 lora_dir: str | os.PathLike | None = None, embeddings_dir: str | os.PathLike | None = None):
        """device: "cpu", "cuda", ... (default: CUDA if present); dtype: "fp32", "bf16", "fp16" or a torch dtype
        (default: bf16 where the hardware runs it natively, e.g. a CPU with AMX, else fp32), or "int8" (CPU only,
        opt-in: networks in the CPU's default precision whose U-Net runs its large conv and linear layers as int8
        products, kedavra.networks.int8; `self.dtype` is then bf16 or fp32 and `self.int8` True). The samplers'
        arithmetic stays in fp32 whatever the networks run in.
        optimize: on a CPU, keep the U-Net's and the VAE's conv and linear weights in oneDNN's packed layout
        (kedavra.networks.acceleration), in place of the plain ones once they have run (one copy of the weights):
        the same images, bitwise or within a bf16 rounding step at a few elements (speed and memory:
        docs/benchmark.md). The model is changed in place, as `.to()` already is.
        lora_dir: the folder where `<lora:NAME:WEIGHT>` tags in prompts find NAME (A1111's models/Lora); also settable
        as `pipe.lora_dir`. embeddings_dir: textual-inversion embeddings to load (A1111's embeddings/ folder): a
        prompt uses one by naming it; files that cannot be used are in `embeddings_report.failed`."""
        check_bool("optimize", optimize)
        self.device = torch.device(device) if device is not None else default_device()
        precision = parse_precision(dtype) or default_dtype(self.device)
        self.int8 = precision == INT8
        if self.int8 and self.device.type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU only (oneDNN's int8 kernels), not on {self.device}: use "
                             "bf16 or fp16 there")
        self.dtype = network_dtype(precision)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if self.device.type == "cpu":  # oneDNN's convolutions run fastest on channels-last activations
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.vae.to(memory_format=torch.channels_last)
        drop_unused_pages([self.model])  # the checkpoint's mapped pages that conversions above copied away
        if self.int8:  # before packing, which then packs the layers that stay in float
            quantise_unet(self.model.unet)
        if optimize:  # a no-op off the CPU
            for part in (self.model.unet, self.model.vae):
                optimize_for_inference(part, self.device, self.dtype)
        self.config = model.config
        self.lora_dir = None if lora_dir is None else Path(lora_dir)
        self._loras: list[LoraUse] = []  # load_lora's, applied to every generation, before a prompt's tags
        self._lora_files: dict[Path, tuple[float, LoraFile]] = {}  # file -> (mtime, contents) read for tags
        self._merger: LoraMerger | None = None
        self._upscalers: UpscalerCache | None = None  # hires fix's pixel upscalers, loaded when first used
        self.preview_decoder: TinyAutoencoder | None = None  # TAESD for live previews (load_preview_decoder)
        # textual inversion: the embeddings a prompt may name
        self.embeddings = EmbeddingLibrary(widths=tuple(encoder.width for encoder in self.config.text_encoders))
        self.embeddings_report = LoadReport(())
        if embeddings_dir is not None:
            self.embeddings_report = self.embeddings.load_dir(embeddings_dir)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's downsampling factor (8 for SD), one latent cell.
        The U-Net takes any latent size (it resizes its up path to its skips, as diffusers' U-Net does)."""
        return self.config.vae.downsample_factor

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], negative_prompts: Sequence[str],
                    clip_skip: int | None = None) -> TextConditioning:
        """The text side of guidance (kedavra.pipeline.prompt_weighting): each text encoder's hidden states for the
        prompts and the negative prompts, (B, 77·k, D), concatenated over SDXL's two encoders, with A1111's
        emphasis syntax "(word:1.3)", "[word]", BREAK, and prompts longer than 75 tokens in chunks of 77; for a
        U-Net with SDXL's added embedding, also the last encoder's pooled projections (B, P)."""
        model = self.model
        encoders = [(model.tokenizer, model.text_encoder)]
        if model.text_encoder_2 is not None:
            encoders.append((model.tokenizer_2, model.text_encoder_2))
        return encode_conditioning(encoders, list(prompts), list(negative_prompts), clip_skip=clip_skip,
                                   pooled=self.config.micro_conditioning > 0, embeddings=self.embeddings or None)

    def load_textual_inversion(self, path: str | os.PathLike, name: str | None = None) -> Embedding:
        """Add a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds, SDXL clip_l /
        clip_g; kedavra.adapters.textual_inversion); prompts use it by its name (default: the file's stem)."""
        return self.embeddings.load(path, name)

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str], clip_skip: int | None = None):
        """(context, negative context), each (B, 77·k, D), of `encode_text`. Plain prompts of up to 75 tokens give
        exactly text_encoder(tokenizer(prompt)) for a model with one text encoder."""
        text = self.encode_text(prompts, negative_prompts, clip_skip)
        return text.context, text.uncond_context

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 num_images: int = 1, callback: StepCallback | None = None, **settings) -> GenerationResult:
        """Generate `num_images` images for `prompt` (a list of prompts gives one image each).

        settings: the fields of `GenerationRequest` (steps, sampler, guidance_scale, seed, width, height,
            init_image, strength, mask, guidance_rescale, clip_skip, karras, eta), checked there.
        Image i uses seed + i (A1111's convention); its noise and every random draw of its sampler come
        from a CPU generator seeded with it, so a seed gives the same image on any device, and a batch the
        same images as single calls.
        init_image, strength: image to image; strength (default 0.8, or 1.0 with a mask) is the fraction of the
            steps run from the noised image (1 with a mask starts from pure noise on kedavra's samplers, as
            diffusers' inpainting pipelines do; otherwise from the image noised to the first level).
        mask: inpainting (needs init_image): white (>= 0.5) where to paint, black where to keep the image; an
            inpainting model (9-channel U-Net) sees the mask and the masked image, any other model has the kept
            region put back after every step.
        guidance_rescale: φ of Lin et al. 2023 (sec. 3.4, eq. 15-16); 0.7 is their choice for v-prediction and
            zero-terminal-SNR models.
        clip_skip: take the text encoder's output that many layers from the end (A1111's "Clip skip"; default
            the model's own, 1 = the last layer).
        hires: A1111's hires fix, a second pass at a larger size (kedavra.pipeline.hires.HiresFix); its steps are
            reported to `callback` after the first pass's, counting from 0 again.
        callback(step): called after every step with its `StepRecord`, cond and uncond filled in (see `generate`).
        """
        request = GenerationRequest.build(prompt, negative_prompt, num_images=num_images, **settings)
        return self.generate(request, callback)

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """`request` checked against this model, with its defaults filled in (`GenerationRequest.for_model`):
        call it to refuse bad settings before other work; `generate` calls it too. LoRAs named by the prompts'
        `<lora:...>` tags are looked up (and read) here."""
        checked = request.for_model(self.config)
        self._tag_uses(batch_lora_tags(checked.prompts)[1])
        if checked.hires is not None:  # the second pass's settings too, before the first pass runs
            hires = checked.hires
            try:
                geometry = hires.geometry(checked.width, checked.height, self.config.vae.downsample_factor)
                second = hires.second_request(checked, geometry).for_model(self.config)
                if second.sampler_spec is not None:  # kedavra's plans: the longer schedule within the timesteps
                    check_steps(a1111_img2img_steps(second.steps, hires.strength, fix_steps=True)[0],
                                self.config.schedule.num_train_timesteps)
            except ValueError as error:
                raise ValueError(f"hires fix: {error}") from None
            self._tag_uses(batch_lora_tags(second.prompts)[1])
        return checked

    @torch.no_grad()
    def generate(self, request: GenerationRequest, callback: StepCallback | None = None,
                 refiner: Pipeline | None = None) -> GenerationResult:
        """The images `request` asks for. callback(step) gets every step's `StepRecord` with the U-Net's
        conditional and unconditional outputs at the step's own level (cond, uncond; uncond None when guidance is
        off); a tensor it returns replaces the sample.

        refiner: a second model that takes over the sampling run where `request.refiner_switch_at` of the training
        timesteps lie behind (the SDXL refiner; A1111's refiner_checkpoint / refiner_switch_at, diffusers'
        denoising_end / denoising_start): evaluations at timesteps t >= T (1 - switch_at) use this model, the
        rest the refiner, each with its own text conditioning, in one run of the sampler (A1111's way: a
        multistep sampler keeps its history across the switch)."""
        asked_sizes = (request.original_size, request.target_size)  # None: the image's size, at each pass
        request = self.check(request)
        inpainting = None
        if request.a1111_inpainting:  # A1111's mask blur, crop, fill; its latent mask and overlay below
            request, inpainting = a1111_inpainting(request, request.width, request.height)
        if self.config.micro_conditioning == REFINER_MICRO_CONDITIONING and request.init_image is None:
            raise ValueError(f"{self.config.family} is an SDXL refiner: it refines an image (give init_image), or "
                             "serves as the refiner of an SDXL base model (refiner=...)")
        batch, f = request.num_images, self.config.vae.downsample_factor
        seed = secrets.randbelow(MAX_SEED + 1 - batch) if request.seed is None else request.seed
        seeds, subseeds = request.image_seeds(seed)
        generators = [torch.Generator().manual_seed(s) for s in seeds]

        latent_size = (request.height // f, request.width // f)
        init_latents = latent_mask = extra_channels = None
        if request.init_image is not None:  # encoded before the noise is drawn, as diffusers' img2img does
            images = request.init_image.to(self.device)
            # a full-strength run on kedavra's plans starts from pure noise (inpaints_from_noise): an inpainting
            # U-Net then needs only the masked image, and diffusers' pipeline draws no init posterior either
            from_noise = request.schedule_type is None and inpaints_from_noise(request.mask, request.strength)
            if not (self.config.inpainting and from_noise):
                init_latents = self._encode_images(images, generators, any_size=request.resizes_latents)
            if init_latents is not None and request.resizes_latents:  # A1111's resize mode 3, "latent upscale"
                init_latents = resize_init_latents(init_latents, latent_size)
        noise, noise_sampler, brownian = self._draw_noise(request, seeds, subseeds, generators,
                                                          (self.config.vae.latent_channels, *latent_size))
        mask_round = inpainting is None or inpainting.options.mask_round
        if request.mask is not None:
            # (B, 1, H, W), 1 = paint, binarised; A1111 with mask_round false gives an SD 1.x / 2.x inpainting model
            # the soft mask (inpainting_image_conditioning's round_image_mask), SDXL's the rounded one
            soft = not mask_round and not self.config.micro_conditioning
            pixel_mask = (request.mask if soft else request.mask >= 0.5).float().to(self.device)
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=latent_size)
            if self.config.inpainting:  # the U-Net sees the mask and the image with the painted part blacked out
                masked_latents = self._encode_images(images * (1 - pixel_mask), generators)
                extra_channels = torch.cat([latent_mask, masked_latents], dim=1)

        prompts, parameters = self._prepare_loras(request)
        denoise = self.guided_unet(request.replace(prompts=prompts), extra_channels, record=callback is not None)
        ti_hashes = self.embeddings.ti_hashes(denoise.embeddings) if denoise.embeddings else ""
        if ti_hashes:
            parameters[TI_HASHES_KEY] = ti_hashes
        if refiner is not None:
            if request.hires is not None:
                raise ValueError("hires fix with a refiner is not supported: run the refiner on the first pass "
                                 "without hires fix, or hires fix without the refiner")
            denoise = ModelSwitch(denoise, self._refiner_unet(refiner, request, callback is not None),
                                  round(self.config.schedule.num_train_timesteps * (1 - request.refiner_switch_at)))
        blend_mask = None
        if request.mask is not None and request.schedule_type is not None:  # A1111 / ComfyUI: every model blends
            blend_mask = program_latent_mask(request.mask, latent_size, request.convention, mask_round).to(self.device)
        elif latent_mask is not None and not self.config.inpainting:
            blend_mask = latent_mask
        if inpainting is not None and inpainting.options.masked_content in ("latent noise", "latent nothing"):
            # A1111: the masked latents replaced by the seeds' noise (without variation seed) or zeros
            replacement = torch.zeros_like(init_latents)
            if inpainting.options.masked_content == "latent noise":
                replacement = noise if not request.subseed_strength else self._draw_noise(
                    request.replace(subseed_strength=0.0), seeds, None, generators, tuple(noise.shape[1:]))[0]
            init_latents = init_latents * (1 - blend_mask) + replacement * blend_mask
        inpaint_noise = None
        if blend_mask is not None and request.comfyui_noise and request.k_sampler.comfyui_inpaint_noise:
            inpaint_noise = comfyui_inpaint_noise(seeds[0], tuple(noise.shape)).to(self.device)  # ComfyUI's ddim
        latents = self._sample(request, denoise, noise, noise_sampler, brownian, generators, callback,
                               init=init_latents, strength=request.strength, mask=blend_mask,
                               inpaint_noise=inpaint_noise)
        if request.hires is not None:
            latents = self._hires_pass(request, asked_sizes, latents, seeds, subseeds, callback)
        if self.device.type == "cpu":  # the heap's freed sampling activations go back before the VAE takes its own
            trim_heap()  # (SDXL at 768: 0.4 GiB off the peak, docs/benchmark.md)
        images = to_pil(self.decode(latents))
        if inpainting is not None:
            images = inpainting.finish(images)
        return GenerationResult(images, seeds, latents, parameters)

    def _sample(self, request: GenerationRequest, denoise, noise: torch.Tensor, noise_sampler, brownian,
                generators: list[torch.Generator], callback: StepCallback | None, init: torch.Tensor | None = None,
                strength: float | None = None, mask: torch.Tensor | None = None, fix_steps: bool = False,
                inpaint_noise: torch.Tensor | None = None):
        """One run of the request's sampler on this model's schedule (kedavra.diffusion.samplers.sample)."""
        return sample(
            denoise, noise, sampler=request.sampler, steps=request.steps, schedule=self.config.schedule,
            prediction_type=self.config.prediction_type, spacing=request.spacing or self.config.spacing,
            steps_offset=self.config.steps_offset, karras=request.karras, eta=request.eta, init=init,
            strength=strength if init is not None else 1.0, mask=mask, generator=generators,
            callback=denoise.reporting(callback) if callback is not None else None,
            schedule_type=request.schedule_type, convention=request.convention, noise_sampler=noise_sampler,
            brownian=brownian, sdxl=self.config.micro_conditioning > 0, final_sigma=self._final_sigma(request),
            diffusers_rules=self.config.timestep_rules == "diffusers", sigmas=request.sigmas, fix_steps=fix_steps,
            churn=request.churn, eta_ancestral=request.eta_ancestral, inpaint_noise=inpaint_noise,
        )

    def _draw_noise(self, request: GenerationRequest, seeds: list[int], subseeds: list[int] | None,
                    generators: list[torch.Generator], shape: tuple[int, ...]):
        """(initial noise (B, *shape), the sampler's noise source or None for `generators`, the SDE samplers'
        Brownian noise or None) as the request's convention draws them."""
        batch = len(seeds)
        if request.comfyui_noise:  # ComfyUI's: the batch's noise from one generator, its per-step sampler noise
            noise = comfyui_noise(seeds[0], (batch, *shape)).to(self.device)
            return noise, ComfyNoiseSampler((batch, *shape), seeds[0], request.rng), self._brownian(request, seeds)
        if request.uses_image_noise:  # A1111's noise: its RNG source, variation seed, ENSD, per-step draws
            image_noise = ImageNoise(shape, seeds, request.rng, subseeds, request.subseed_strength,
                                     eta_noise_seed_delta=request.eta_noise_seed_delta)
            return image_noise.first().to(self.device), image_noise.as_noise_sampler(), self._brownian(request, seeds)
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(self.device)
        return noise, None, None

    def _hires_pass(self, request: GenerationRequest, asked_sizes, latents: torch.Tensor, seeds: list[int],
                    subseeds: list[int] | None, callback: StepCallback | None) -> torch.Tensor:
        """A1111's hires fix on the first pass's latents (kedavra.pipeline.hires): upscale, crop, then image to
        image at the larger size with fresh noise from the same seeds, running exactly the hires steps."""
        hires, f = request.hires, self.config.vae.downsample_factor
        geometry = hires.geometry(request.width, request.height, f)
        if hires.latent_mode is not None:
            init = upscale_latents(latents, hires.latent_mode, geometry, f)
        else:
            images = [resize_image(image, geometry.upscaled, hires.upscaler, self.upscalers)
                      for image in to_pil(self.decode(latents))]
            pixels = torch.cat([from_pil(image) for image in images]).to(self.device)
            init = self._encode_images(pixels, [torch.Generator().manual_seed(s) for s in seeds])
        init = crop_latents(init, geometry)
        second = hires.second_request(request, geometry, asked_sizes).for_model(self.config)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise, noise_sampler, brownian = self._draw_noise(second, seeds, subseeds, generators, tuple(init.shape[1:]))
        prompts, _ = self._prepare_loras(second)
        denoise = self.guided_unet(second.replace(prompts=prompts), record=callback is not None)
        return self._sample(second, denoise, noise, noise_sampler, brownian, generators, callback, init=init,
                            strength=hires.strength, fix_steps=True)

    @property
    def upscalers(self) -> UpscalerCache:
        """The pixel upscalers hires fix uses, the last one kept loaded (bf16 when the model runs in bf16)."""
        if self._upscalers is None:
            self._upscalers = UpscalerCache("bf16" if self.dtype == torch.bfloat16 else "fp32")
        return self._upscalers

    def _final_sigma(self, request: GenerationRequest) -> str:
        """Where kedavra's plan ends: at σ = 0, except DDIM and PNDM under a folder's set_alpha_to_one=False
        (diffusers' final_alpha_cumprod = ᾱ_0, as Stable Diffusion's scheduler configs have it)."""
        own_final = self.config.timestep_rules == "diffusers" and request.sampler in SET_ALPHA_TO_ONE_SAMPLERS
        return "sigma_min" if own_final and not self.config.set_alpha_to_one else "zero"

    @staticmethod
    def _brownian(request: GenerationRequest, seeds: list[int]):
        """The Brownian-tree noise of SDE samplers: one tree per image seeded with its seed (A1111), or one for the
        batch on the CPU seeded with the first seed (ComfyUI)."""
        if request.convention == "comfyui":
            return lambda x, sigma_min, sigma_max: BrownianTreeNoise(x, sigma_min, sigma_max, seeds[0], device="cpu")
        return lambda x, sigma_min, sigma_max: BrownianTreeNoise(x, sigma_min, sigma_max, seeds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE decoder; never black or NaN: if the decoder's output in
        the working precision is not finite (fp16 overflows in SD's VAE), decode again in fp32."""
        vae = self.model.vae
        images = vae.decode_latents(latents.to(self.dtype), tiling=VAE_TILING).float()
        if not torch.isfinite(images).all() and self.dtype != torch.float32:
            vae.float()
            try:
                images = vae.decode_latents(latents.float(), tiling=VAE_TILING)
            finally:
                vae.to(self.dtype)
        return images

    def load_preview_decoder(self, path: str | os.PathLike) -> TinyAutoencoder:
        """Decode live previews (`preview`) with the tiny autoencoder at `path` (TAESD for SD 1.x / 2.x, TAESDXL for
        SDXL: a diffusers AutoencoderTiny folder or a taesd*_decoder .pth / .safetensors file; kedavra.networks.taesd)
        instead of the full VAE. ValueError when its latents cannot be this model's (other channels or factor)."""
        taesd = load_tiny_autoencoder(path)
        vae = self.config.vae
        if taesd.decoder is None:
            raise ValueError(f"{path}: an encoder-only tiny autoencoder; previews need its decoder (taesd_decoder)")
        if (taesd.config.latent_channels, taesd.config.upsample_factor) != (vae.latent_channels, vae.downsample_factor):
            raise ValueError(f"{path}: a tiny autoencoder for {taesd.config.latent_channels}-channel latents at "
                             f"1/{taesd.config.upsample_factor} scale; {self.config.family}'s are "
                             f"{vae.latent_channels}-channel at 1/{vae.downsample_factor}")
        self.preview_decoder = taesd.to(device=self.device, dtype=self.dtype)
        return taesd

    @torch.no_grad()
    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Images of latents (B, C, h, w), e.g. a step's x̂_0, for a live preview: with the preview decoder (TAESD)
        when one is loaded, else through the full VAE (`decode`)."""
        if self.preview_decoder is not None:
            return self.preview_decoder.preview(latents)
        return to_pil(self.decode(latents))

    def guided_unet(self, request: GenerationRequest, extra_channels: torch.Tensor | None = None,
                    record: bool = False) -> GuidedUNet:
        """The model the sampler drives for `request` (checked for this model): the U-Net with the request's text
        conditioning and classifier-free guidance folded in."""
        text = self.encode_text(request.prompts, request.negative_prompts, request.clip_skip)
        return GuidedUNet(self.model.unet, self.dtype, text.context, text.uncond_context, request.guidance_scale,
                          request.guidance_rescale, extra_channels, added=self._added_conditioning(request, text),
                          record=record, embeddings=text.embeddings, step_cache=request.step_cache)

    def _refiner_unet(self, refiner: Pipeline, request: GenerationRequest, record: bool) -> GuidedUNet:
        """The refiner's guided U-Net for `request`, once it is known to share this model's latent space."""
        if not isinstance(refiner, Pipeline):
            raise ValueError(f"refiner must be a Pipeline, got {type(refiner).__name__}")
        if refiner.config.micro_conditioning == BASE_MICRO_CONDITIONING:
            raise ValueError(f"the refiner {refiner.config.family} is an SDXL base model; the refiner stage needs "
                             "the SDXL refiner (or another model of this latent space)")
        ours, theirs = self.config.vae, refiner.config.vae
        if (ours.latent_channels, ours.scaling_factor) != (theirs.latent_channels, theirs.scaling_factor):
            raise ValueError(f"the refiner {refiner.config.family} works in another latent space "
                             f"({theirs.latent_channels} channels, scale {theirs.scaling_factor}) than "
                             f"{self.config.family} ({ours.latent_channels}, {ours.scaling_factor})")
        if refiner.device != self.device:
            raise ValueError(f"the refiner runs on {refiner.device}, this model on {self.device}: load both on one")
        # the refiner runs with its own load_lora LoRAs; the prompt's tags name LoRAs for the base model
        prompts, _ = batch_lora_tags(request.prompts)
        refiner_request = request.replace(prompts=prompts, init_image=None, mask=None, strength=None,
                                          inpaint=None, latent_resize=False)
        return refiner.guided_unet(refiner_request.for_model(refiner.config), record=record)

    def _added_conditioning(self, request: GenerationRequest, text: TextConditioning):
        """(prompt side, negative side) of SDXL's added conditioning: the pooled text (B, P) and the micro-
        conditioning numbers (B, 5 or 6) of `GenerationRequest.time_ids`; None for a model without it."""
        count = self.config.micro_conditioning
        if count == 0:
            return None
        time_ids, negative_time_ids = request.time_ids(count)
        batch = text.pooled.shape[0]

        def side(pooled: torch.Tensor, ids: list[float]) -> dict[str, torch.Tensor]:
            ids = torch.tensor([ids], dtype=torch.float32, device=self.device).expand(batch, -1)  # (B, n)
            return {"text_embeds": pooled, "time_ids": ids}

        return side(text.pooled, time_ids), side(text.uncond_pooled, negative_time_ids)

    def _encode_images(self, images: torch.Tensor, generators: list[torch.Generator],
                       any_size: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) scaled latents, image i's posterior drawn with generator i
        (any_size: H, W not multiples of f, h, w rounded down, as A1111's resize mode 3 encodes)."""
        vae = self.model.vae
        return torch.cat([
            vae.encode_to_latents(images[i : i + 1].to(self.dtype), generator=g, tiling=VAE_TILING,
                                  any_size=any_size).float()
            for i, g in enumerate(generators)
        ])

    # ---- LoRAs (kedavra.adapters) -------------------------------------------------------------------------------

    @property
    def lora_merger(self) -> LoraMerger:
        if self._merger is None:
            self._merger = LoraMerger(self.model)
        return self._merger

    @property
    def loras(self) -> list[LoraUse]:
        """The LoRAs `load_lora` applied, in order (each generation adds its prompt's tags after them)."""
        return list(self._loras)

    def load_lora(self, lora: str | os.PathLike | LoraFile, weight: float = 1.0, *,
                  text_encoder_weight: float | None = None, strict: bool = True) -> LoraFile:
        """Merge a LoRA into this model's weights, for every generation until `unload_lora` (kedavra.adapters).

        lora: a file (kohya / A1111, LyCORIS LoHa / LoKr / full / DoRA, diffusers / PEFT; .safetensors or .pt), a
            name in `lora_dir`, or a `read_lora` result. weight: its strength on the U-Net's layers, and on the text
            encoders' unless `text_encoder_weight` is given (A1111's `<lora:NAME:TE:UNET>`). strict: refuse a file
            with layers that match none of this model's (False: apply the rest, the skipped names in a warning).
        Returns the file read; the merge happens now, so a LoRA for another architecture is refused here."""
        check_number("LoRA weight", weight)
        file = lora if isinstance(lora, LoraFile) else self._lora_file(lora)
        use = LoraUse(file, weight if text_encoder_weight is None else text_encoder_weight, weight)
        _, unmatched = self.lora_merger.resolve(file, strict)
        self.lora_merger.apply([*self._loras, use], strict=False)
        self._loras.append(use)
        if unmatched:
            warnings.warn(f"LoRA {file.name!r}: {len(unmatched)} layers match no layer of this model and were "
                          f"skipped: {', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}", stacklevel=2)
        return file

    def unload_lora(self, name: str | None = None) -> None:
        """Take out the LoRA `name` (its file stem) that `load_lora` merged, or all of them (None); the weights
        come back bitwise as they were."""
        if name is not None and all(use.lora.name != name for use in self._loras):
            loaded = ", ".join(use.lora.name for use in self._loras) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        self._loras = [use for use in self._loras if name is not None and use.lora.name != name]
        self.lora_merger.apply(self._loras, strict=False)

    def available_loras(self) -> dict[str, Path]:
        """Name -> file of every LoRA in `lora_dir` ({} without one)."""
        return {} if self.lora_dir is None else find_loras(self.lora_dir)

    def _lora_file(self, lora: str | os.PathLike) -> LoraFile:
        """A LoRA file by path or by its name in `lora_dir`, read once while the file is unchanged."""
        path = locate_lora(lora, self.lora_dir)
        mtime = path.stat().st_mtime
        cached = self._lora_files.get(path)
        if cached is None or cached[0] != mtime:
            cached = self._lora_files[path] = (mtime, read_lora(path))
        return cached[1]

    def _tag_uses(self, tags: Sequence[LoraTag]) -> list[LoraUse]:
        return [LoraUse(self._lora_file(tag.name), tag.text_encoder_weight, tag.unet_weight) for tag in tags]

    def _prepare_loras(self, request: GenerationRequest) -> tuple[tuple[str, ...], dict[str, str]]:
        """Merge `load_lora`'s LoRAs and those the prompts' tags name; (the prompts without tags, the infotext's
        "Lora hashes" of every LoRA applied, as A1111 writes it: "NAME: SHORTHASH, ...")."""
        prompts, tags = batch_lora_tags(request.prompts)
        uses = [*self._loras, *self._tag_uses(tags)]
        if uses or self._merger is not None:
            self.lora_merger.apply(uses)
        if not uses:
            return prompts, {}
        names = dict.fromkeys(f"{use.lora.name.replace(':', '').replace(',', '')}: {use.lora.short_hash}"
                              for use in uses)
        return prompts, {LORA_HASHES_KEY: ", ".join(names)}
