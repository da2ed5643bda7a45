"""A whole text-to-image run against diffusers' StableDiffusionPipeline: the same weights (a tiny model
with random weights, saved as a diffusers folder and loaded by kedavra's checkpoint loader), prompt,
negative prompt, sampler, steps, guidance scale and seeds give the same latents and the same image."""


import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from reference_models import tiny_sd_pipelines, write_clip_tokenizer  # noqa: E402

IMAGE_TOL = 1e-4  # decoded images in [0, 1], fp32
LATENT_REL_TOL = 1e-4


def clip_tokenizer(folder):
    """transformers' CLIPTokenizer built offline from kedavra's vendored CLIP vocabulary."""
    return write_clip_tokenizer(folder)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(kedavra Pipeline, diffusers StableDiffusionPipeline) over the same tiny random weights."""
    return tiny_sd_pipelines(tmp_path_factory)


@pytest.mark.parametrize("sampler,scheduler_class", [
    ("euler", "EulerDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler")])
def test_text_to_image_matches_diffusers(both, sampler, scheduler_class):
    ours, reference = both
    reference.scheduler = getattr(diffusers, scheduler_class).from_config(reference.scheduler.config)
    seed, size = 42, ours.config.image_size
    kwargs = dict(prompt="a red circle above a blue square", negative_prompt="blurry", guidance_scale=7.5)
    theirs = reference(**kwargs, num_inference_steps=12, height=size, width=size, num_images_per_prompt=2,
                       generator=[torch.Generator().manual_seed(seed + i) for i in range(2)], output_type="latent")
    result = ours(**kwargs, steps=12, sampler=sampler, seed=seed, num_images=2)
    rel = ((result.latents - theirs.images).abs().max() / theirs.images.abs().max()).item()
    print(f"{sampler}: latent max relative error {rel:.2e}")
    assert rel < LATENT_REL_TOL
    ref_decoded = reference.vae.decode(theirs.images / reference.vae.config.scaling_factor).sample
    ref_images = (ref_decoded / 2 + 0.5).clamp(0, 1)
    our_images = ours.model.vae.decode_latents(result.latents) / 2 + 0.5
    image_error = (our_images - ref_images).abs().max().item()
    print(f"{sampler}: image max abs error {image_error:.2e}")
    assert image_error < IMAGE_TOL
    assert result.seeds == [42, 43]


FOLDER_SCHEDULERS = [  # (diffusers scheduler class, its config as a folder ships it)
    ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),  # SD 1.x folders
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),  # SD 2.x base folders
    ("DPMSolverMultistepScheduler", dict(steps_offset=1, use_karras_sigmas=True)),
    ("UniPCMultistepScheduler", dict(timestep_spacing="linspace")),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing")),  # SD-Turbo's kind
]


@pytest.mark.parametrize("scheduler_class,settings", FOLDER_SCHEDULERS, ids=[c for c, _ in FOLDER_SCHEDULERS])
def test_a_folders_own_scheduler_is_the_default_and_matches_diffusers(tmp_path, scheduler_class, settings):
    """kedavra.load(folder) and a request without a sampler run the folder's scheduler_config.json as diffusers'
    StableDiffusionPipeline runs it (its class, spacing, Karras σ's, final level, timestep rules)."""
    from diffusers import StableDiffusionPipeline
    from reference_models import reference_models, write_diffusers

    import kedavra
    from kedavra.networks.model import PRESETS

    config = PRESETS["tiny"]
    refs = reference_models(config, seed=1)
    folder = write_diffusers(tmp_path / "folder", refs, config)
    scheduler = getattr(diffusers, scheduler_class)(beta_start=0.00085, beta_end=0.012,
                                                    beta_schedule="scaled_linear", **settings)
    scheduler.save_pretrained(folder / "scheduler")
    text, unet, vae = refs
    reference = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(tmp_path / "tok"),
                                        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    ours = kedavra.load(folder, dtype="fp32")
    size, kwargs = ours.config.image_size, dict(prompt="a red circle", negative_prompt="blurry", guidance_scale=5.0)
    theirs = reference(**kwargs, num_inference_steps=10, height=size, width=size,
                       generator=torch.Generator().manual_seed(3), output_type="latent").images
    result = ours(**kwargs, steps=10, seed=3)  # no sampler: the folder's
    rel = ((result.latents - theirs).abs().max() / theirs.abs().max()).item()
    print(f"{scheduler_class}: latent max relative error {rel:.2e}")
    assert rel < LATENT_REL_TOL
