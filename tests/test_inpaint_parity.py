"""Inpainting against diffusers' StableDiffusionInpaintPipeline (SD 1.x) and StableDiffusionXLInpaintPipeline on the
same tiny random weights: a 9-channel inpainting U-Net (the mask and the masked image's latents as extra input
channels) and, for SD 1.x, a plain 4-channel U-Net with the kept region put back after every step (diffusers' legacy
path: init_latents_proper noised to the next timestep with the run's noise, the final latents
(1 - mask) · init + mask · latents). Euler with guidance and a negative prompt, strength 1 (pure noise) and below
(the init image noised to the first timestep), batch 2 with one generator per image; final latents within
LATENT_REL_TOL and diffusers' own decoded output within IMAGE_TOL.

Where the two differ by design, the test asks diffusers for what kedavra does:
- A batch with one init image: kedavra encodes image i with generator i (its posterior sample; a batch gives the
  same images as single calls), diffusers encodes the single image once with generator 0 and repeats the latents.
  Giving diffusers the image and the mask once per batch image makes it draw as kedavra does.
- StableDiffusionXLInpaintPipeline's default strength is 0.9999 (one step fewer than asked, from the noised init),
  kedavra's inpainting default is 1.0: strength is passed to both.
"""

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from reference_models import randomize, reference_models, write_diffusers  # noqa: E402
from test_pipeline_parity import IMAGE_TOL, LATENT_REL_TOL, clip_tokenizer  # noqa: E402
from test_sdxl_pipeline import TEXT, UNET, VAE, bigg, kedavra_model  # noqa: E402

from kedavra.checkpoint import load_model  # noqa: E402
from kedavra.checkpoint.diffusers_config import same_architecture  # noqa: E402
from kedavra.networks.model import PRESETS  # noqa: E402
from kedavra.networks.unet_config import INPAINT_IN_CHANNELS, UNetConfig  # noqa: E402
from kedavra.pipeline.pipeline import Pipeline  # noqa: E402
from kedavra.viz.sample_image import draw_sample_image  # noqa: E402

SIZE = 32  # the tiny presets' image size
STEPS = 8
BATCH = 2
PAINTED = (8, 4, 23, 19)  # the mask's white rectangle (left, top, right, bottom), inclusive, in pixels
PROMPTS = dict(prompt="a red circle above a blue square", negative_prompt="blurry")
STRENGTHS = [1.0, 0.6]
SDXL_STRENGTHS = [*STRENGTHS, 0.9999]  # 0.9999: StableDiffusionXLInpaintPipeline's default


def euler_scheduler():
    """SD's Euler settings as its scheduler configs ship them (leading spacing, steps_offset 1)."""
    return diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            timestep_spacing="leading", steps_offset=1)


def inpaint_inputs() -> tuple[Image.Image, Image.Image]:
    """(init image, mask): kedavra's test picture and a black mask with a white (paint) rectangle."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle(PAINTED, fill=255)
    return draw_sample_image(SIZE), mask


class FinalLatents:
    """diffusers' callback_on_step_end keeping the latents after the last step (after the 4-channel blend)."""

    def __call__(self, pipe, step, t, tensors):
        self.latents = tensors["latents"].clone()
        return {}


def run_both(ours: Pipeline, reference, strength: float, guidance_scale: float, seed: int):
    """(kedavra's result, diffusers' final latents, diffusers' decoded images in [0, 1]) for one inpainting run."""
    image, mask = inpaint_inputs()
    final = FinalLatents()
    theirs = reference(**PROMPTS, image=[image] * BATCH, mask_image=[mask] * BATCH, strength=strength,
                       guidance_scale=guidance_scale, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                       num_images_per_prompt=BATCH, output_type="pt", callback_on_step_end=final,
                       generator=[torch.Generator().manual_seed(seed + i) for i in range(BATCH)]).images
    result = ours(**PROMPTS, init_image=image, mask=mask, strength=strength, guidance_scale=guidance_scale,
                  steps=STEPS, sampler="euler", seed=seed, num_images=BATCH)
    return result, final.latents, theirs


def assert_parity(ours: Pipeline, result, their_latents: torch.Tensor, their_images: torch.Tensor, label: str):
    rel = ((result.latents - their_latents).abs().max() / their_latents.abs().max()).item()
    image_error = ((ours.decode(result.latents) / 2 + 0.5) - their_images).abs().max().item()
    print(f"{label}: latent max relative error {rel:.2e}, image max abs error {image_error:.2e}")
    assert rel < LATENT_REL_TOL
    assert image_error < IMAGE_TOL


@pytest.fixture(scope="module", params=["tiny-inpaint", "tiny"])
def sd_pair(request, tmp_path_factory):
    """(kedavra Pipeline read from a diffusers folder, diffusers StableDiffusionInpaintPipeline) over the same random
    weights: the 9-channel inpainting U-Net, or the plain 4-channel one (diffusers' legacy blending path)."""
    config = PRESETS[request.param]
    refs = reference_models(config, seed=1)
    folder = write_diffusers(tmp_path_factory.mktemp(request.param), refs, config)
    scheduler = euler_scheduler()
    scheduler.save_pretrained(folder / "scheduler")
    text, unet, vae = refs
    reference = diffusers.StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(tmp_path_factory.mktemp("tok")), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    ours = Pipeline(load_model(folder), dtype="fp32")
    assert ours.config.inpainting == (unet.config.in_channels == INPAINT_IN_CHANNELS)
    return ours, reference


@pytest.mark.parametrize("strength", STRENGTHS)
def test_sd_inpainting_matches_diffusers(sd_pair, strength):
    ours, reference = sd_pair
    result, latents, images = run_both(ours, reference, strength, guidance_scale=7.5, seed=42)
    assert_parity(ours, result, latents, images, f"{ours.config.family} strength {strength}")
    assert result.seeds == [42, 43]


SDXL_INPAINT_UNET = {**UNET, "in_channels": INPAINT_IN_CHANNELS}


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """(kedavra Pipeline, diffusers StableDiffusionXLInpaintPipeline) over the same random weights: tiny-sdxl with
    a 9-channel U-Net input (sdxl-inpaint's shape at test sizes)."""
    generator = torch.Generator().manual_seed(11)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))
    text_2 = bigg(generator)
    unet, vae = diffusers.UNet2DConditionModel(**SDXL_INPAINT_UNET), diffusers.AutoencoderKL(**VAE)
    for module in (text, unet, vae):
        randomize(module, generator)
        module.eval()
    base = PRESETS["tiny-sdxl"]
    config = dataclasses.replace(base, family="tiny-sdxl-inpaint",
                                 unet=dataclasses.replace(base.unet, in_channels=INPAINT_IN_CHANNELS))
    model = kedavra_model(config, {"text_encoder": text, "text_encoder_2": text_2, "unet": unet, "vae": vae})
    folder = tmp_path_factory.mktemp("tok")
    tokenizer = clip_tokenizer(folder / "1")
    tokenizer_2 = transformers.CLIPTokenizer(str(folder / "1" / "vocab.json"), str(folder / "1" / "merges.txt"),
                                             pad_token="!", model_max_length=77)  # OpenCLIP pads with id 0
    # requires_aesthetics_score=False: the base's micro-conditioning (original size, crop, target size; both sides
    # default to the image's size and (0, 0)), the aesthetic score being the refiner's. force_zeros_for_empty_prompt
    # only acts on an absent negative prompt (kedavra encodes "" instead); the test gives one.
    reference = diffusers.StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=euler_scheduler(), requires_aesthetics_score=False, force_zeros_for_empty_prompt=False,
        add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    return Pipeline(model, dtype="fp32"), reference


def test_the_sdxl_inpainting_config_is_what_a_diffusers_folder_describes(sdxl_pair):
    ours, _ = sdxl_pair
    described = UNetConfig.from_diffusers(dict(diffusers.UNet2DConditionModel(**SDXL_INPAINT_UNET).config))
    assert same_architecture(described, ours.config.unet)
    assert ours.config.inpainting and ours.config.micro_conditioning == 6


@pytest.mark.parametrize("strength", SDXL_STRENGTHS)
def test_sdxl_inpainting_matches_diffusers(sdxl_pair, strength):
    ours, reference = sdxl_pair
    result, latents, images = run_both(ours, reference, strength, guidance_scale=5.0, seed=7)
    assert_parity(ours, result, latents, images, f"sdxl strength {strength}")
