"""The pipeline: guidance, seeds and batches, precision, image to image, inpainting, and bad input."""

import dataclasses
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from random_models import tiny_model

from kedavra.formats.images import from_pil, to_pil
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.pipeline.device import release_memory
from kedavra.pipeline.guided_unet import GuidedUNet
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import MAX_SIDE, GenerationRequest


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_model(), dtype="fp32")


def test_batch_equals_single_calls_with_the_same_seeds(pipe):
    batch = pipe("a red circle", seed=10, num_images=3, steps=6, sampler="euler_a")
    assert batch.seeds == [10, 11, 12]
    for i, seed in enumerate(batch.seeds):
        single = pipe("a red circle", seed=seed, steps=6, sampler="euler_a")
        # equal up to float rounding: a batch runs other matrix kernels than a single image. The random model's
        # latents reach |30| after euler_a, so the rounding is measured against that scale (seen: 3.4e-6 of it on an
        # AMD EPYC, where MKL's fp32 kernels for 1 and 3 images differ); another seed's latents differ by O(1).
        scale = single.latents.abs().max()
        assert (batch.latents[i : i + 1] - single.latents).abs().max() <= 2e-5 * scale


def test_same_seed_same_image_other_seed_other_image(pipe):
    a, b, c = (pipe("a blue square", seed=s, steps=5).latents for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_guidance_scale_one_is_the_conditional_model_alone(pipe):
    """w = 1 in ε̃ = ε(∅) + w(ε(c) - ε(∅)) leaves ε(c): the negative prompt must not matter."""
    a = pipe("a circle", negative_prompt="", guidance_scale=1.0, seed=3, steps=4).latents
    b = pipe("a circle", negative_prompt="something else entirely", guidance_scale=1.0, seed=3, steps=4).latents
    assert torch.equal(a, b)
    c = pipe("a circle", negative_prompt="something else entirely", guidance_scale=5.0, seed=3, steps=4).latents
    assert not torch.allclose(a, c)


def test_guidance_rescale_zero_is_plain_guidance_and_one_matches_the_conditional_std(pipe):
    a = pipe("a circle", seed=3, steps=4, guidance_rescale=0.0).latents
    b = pipe("a circle", seed=3, steps=4).latents
    assert torch.equal(a, b)
    context, uncond_context = pipe.encode_prompts(["a circle"], [""])
    guided = GuidedUNet(pipe.model.unet, pipe.dtype, context, uncond_context, 7.5, 1.0, None)
    unguided = GuidedUNet(pipe.model.unet, pipe.dtype, context, uncond_context, 1.0, 0.0, None)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    seen = guided(x, t), unguided(x, t)
    assert seen[0].std().item() == pytest.approx(seen[1].std().item(), rel=1e-4)  # Lin et al. 2023, eq. 15


def test_bf16_stays_close_to_fp32():
    model = tiny_model()
    fp32 = Pipeline(model, dtype="fp32")("a circle", seed=4, steps=5, guidance_scale=3.0).latents
    bf16 = Pipeline(model, dtype="bf16")("a circle", seed=4, steps=5, guidance_scale=3.0).latents
    assert (bf16 - fp32).abs().max() / fp32.abs().max() < 0.05  # bf16 keeps 8 bits of mantissa


def test_image_to_image_small_strength_stays_near_the_image(pipe):
    image = pipe("a circle", seed=5, steps=6).images[0]
    with torch.no_grad():
        start = pipe.model.vae.encode_to_latents(from_pil(image), generator=torch.Generator().manual_seed(6))
    near = pipe("a circle", seed=6, steps=10, init_image=image, strength=0.2).latents
    far = pipe("a circle", seed=6, steps=10, init_image=image, strength=1.0).latents
    assert (near - start).abs().mean() < 0.5 * (far - start).abs().mean()


@pytest.mark.parametrize("family", ["tiny", "tiny-inpaint"])
def test_inpainting_keeps_the_unmasked_latents(family):
    pipe = Pipeline(tiny_model(family), dtype="fp32")
    init = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 32, 16))  # paint the top half
    result = pipe("a circle", seed=7, steps=6, init_image=init, mask=mask)
    assert result.images[0].size == (32, 32)
    if family == "tiny":  # an ordinary model gets the kept latents put back exactly
        with torch.no_grad():
            kept = pipe.model.vae.encode_to_latents(from_pil(init), generator=torch.Generator().manual_seed(7))
        assert torch.allclose(result.latents[..., 8:, :], kept[..., 8:, :], atol=1e-5)


def test_pil_round_trip():
    image = Image.fromarray((torch.arange(48).reshape(4, 4, 3) * 5).byte().numpy())
    assert list(to_pil(from_pil(image))[0].getdata()) == list(image.getdata())


@pytest.mark.parametrize("kwargs,message", [
    ({"width": 31}, r"width must be a multiple of 2 \(the VAE's downsampling factor\) from 2 to 2048, got 31"),
    ({"height": 0}, "height must be an integer from 1 to 2048"),
    ({"width": 4096}, r"width must be an integer from 1 to 2048 \(or None for the model's image size\), got 4096"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"steps": 1001}, "steps must be an integer from 1 to 1000"),
    ({"sampler": "dpm_solver_v3"}, "unknown sampler 'dpm_solver_v3'"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"num_images": 0}, "num_images must be an integer from 1 to 64"),
    ({"seed": -1}, "seed must be an integer from 0 to 4294967295"),
    ({"guidance_rescale": 2}, r"guidance_rescale must be a number in \[0, 1\]"),
    ({"mask": Image.new("L", (32, 32))}, "mask needs init_image"),
    ({"init_image": Image.new("RGB", (64, 64))}, "init_image is 64x64 with 3 channels; it must be RGB 32x32"),
    ({"init_image": Image.new("RGB", (32, 32)), "mask": Image.new("L", (16, 16))}, "it must be 32x32"),
    ({"init_image": Image.new("RGB", (32, 32)), "strength": 1.5}, r"strength must be a number in \[0, 1\]"),
    ({"negative_prompt": ["a", "b"]}, "got 2 negative prompts for 1 prompts"),
])
def test_bad_requests_are_refused_before_work(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a circle", **{"steps": 2, **kwargs})


def test_an_inpainting_model_needs_a_mask():
    with pytest.raises(ValueError, match="tiny-inpaint is an inpainting model: give init_image and mask"):
        Pipeline(tiny_model("tiny-inpaint"), dtype="fp32")("a circle", steps=2)


def test_decode_falls_back_to_fp32_when_the_working_precision_overflows(monkeypatch):
    pipe = Pipeline(tiny_model(), dtype="bf16")
    original = pipe.model.vae.decode_latents

    def overflow_in_bf16(latents, **kw):
        out = original(latents, **kw)
        return out.fill_(float("inf")) if latents.dtype == torch.bfloat16 else out

    monkeypatch.setattr(pipe.model.vae, "decode_latents", overflow_in_bf16)
    images = pipe.decode(torch.randn(1, 4, 16, 16))
    assert torch.isfinite(images).all() and next(pipe.model.vae.parameters()).dtype == torch.bfloat16


def test_strength_without_an_init_image_is_refused(pipe):
    with pytest.raises(ValueError, match="strength=0.5 needs init_image"):
        pipe("a circle", steps=2, strength=0.5)


def test_clip_skip_changes_the_context(pipe):
    a = pipe.encode_prompts(["a circle"], [""], clip_skip=1)[0]
    b = pipe.encode_prompts(["a circle"], [""], clip_skip=2)[0]
    assert a.shape == b.shape and not torch.allclose(a, b)


# ---- sizes: any multiple of the VAE's factor, as in diffusers and A1111 ------------------------------


@pytest.fixture(scope="module")
def pipe_f8():
    """tiny with a four-level VAE: f = 8 as in SD, so sizes must be multiples of 8 (not of 8 x the U-Net's 2)."""
    tiny = ModelConfig.from_preset("tiny")
    vae = dataclasses.replace(tiny.vae, channel_multipliers=(1, 1, 2, 2))
    config = dataclasses.replace(tiny, family="tiny-f8", vae=vae)
    torch.manual_seed(0)
    return Pipeline(StableDiffusion(config), dtype="fp32")


def test_any_multiple_of_the_vae_factor_gives_an_image_of_that_size(pipe, pipe_f8):
    # tiny (f = 2): 38x54 pixels -> 19x27 latents, which the U-Net's downsampler rounds up to 10x14
    result = pipe("a circle", seed=1, steps=2, width=38, height=54)
    assert result.images[0].size == (38, 54) and result.latents.shape == (1, 4, 27, 19)
    # f = 8: 40x56 pixels (not multiples of 16) -> 5x7 latents
    result = pipe_f8("a circle", seed=1, steps=2, width=40, height=56)
    assert result.images[0].size == (40, 56) and result.latents.shape == (1, 4, 7, 5)


@pytest.mark.parametrize(("name", "side"), [
    ("width", 0), ("height", -8), ("width", 30), ("height", 12), ("width", MAX_SIDE + 8), ("height", 8.0),
])
def test_sizes_off_the_vae_grid_or_out_of_range_are_refused(pipe_f8, name, side):
    # off the grid: refused against the model; out of range or not an integer: refused when the request is built
    message = (rf"{name} must be (a multiple of 8 \(the VAE's downsampling factor\) from 8 to {MAX_SIDE}|an integer "
               rf"from 1 to {MAX_SIDE} \(or None for the model's image size\)), got {side}")
    with pytest.raises(ValueError, match=message):
        pipe_f8.check(GenerationRequest.build("a circle", steps=2, **{"width": 64, "height": 64, name: side}))


def test_a_request_may_override_the_models_timestep_spacing(pipe):
    """Trailing spacing starts at the last training timestep (Lin et al. 2023, sec. 3.3), what few-step distilled
    models (SDXL-Turbo, Lightning) were trained for; the model's own leading spacing with offset 1 does not."""
    first_t = []
    pipe("a circle", seed=1, steps=4, spacing="trailing", callback=lambda step: first_t.append(step.t))
    pipe("a circle", seed=1, steps=4, callback=lambda step: first_t.append(step.t))
    assert first_t[0] == 999 and first_t[4] == 751  # leading, offset 1: 750 + 1
    with pytest.raises(ValueError, match="unknown timestep spacing 'sgm'"):
        pipe("a circle", steps=4, spacing="sgm")


def test_comfyui_runs_draw_the_batch_noise_as_comfyui(pipe, monkeypatch):
    """convention "comfyui": the initial noise is ComfyUI's prepare_noise (the whole batch from one CPU generator
    seeded with the seed) and every image reports that seed; A1111's variation seed / ENSD are refused there."""
    import kedavra.pipeline.pipeline as pipeline_module
    from kedavra.diffusion.rng import comfyui_noise

    seen = {}
    real_sample = pipeline_module.sample

    def spy(denoise, noise, **options):
        seen["noise"], seen["noise_sampler"] = noise.clone(), options["noise_sampler"]
        return real_sample(denoise, noise, **options)

    monkeypatch.setattr(pipeline_module, "sample", spy)
    result = pipe("a red circle", steps=2, sampler="euler_ancestral", schedule_type="normal", convention="comfyui",
                  seed=5, num_images=2)
    assert result.seeds == [5, 5]
    shape = (2, pipe.config.vae.latent_channels, *result.latents.shape[2:])
    assert torch.equal(seen["noise"], comfyui_noise(5, shape))
    assert type(seen["noise_sampler"]).__name__ == "ComfyNoiseSampler"
    with pytest.raises(ValueError, match="ComfyUI's noise"):
        pipe("a red circle", steps=2, sampler="euler", schedule_type="normal", convention="comfyui", seed=5,
             subseed=3, subseed_strength=0.5)


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; malloc_trim is glibc's")
def test_release_memory_brings_a_large_jobs_memory_back(pipe):
    """After a 384x384 job on the tiny model, release_memory (the server's worker calls it after every job) returns
    the freed activations: resident memory ends within 60 MB of where it started."""
    pipe("warm up", steps=1, width=32, height=32)
    release_memory()
    before = resident_mb()
    pipe("a large job", steps=1, width=384, height=384)
    grown = resident_mb() - before
    release_memory()
    assert grown > 100, f"the job added only {grown:.0f} MB: too small to show anything"
    assert resident_mb() - before < 60, f"still {resident_mb() - before:.0f} MB above (the job added {grown:.0f})"


def test_a1111_inpainting_keeps_the_original_pixels_and_masks_as_a1111(pipe):
    """With A1111's sampling (a schedule type) the kept region is pasted back from the original (A1111's overlay),
    the blend mask is A1111's rounded bicubic resize, ComfyUI's a soft bilinear one."""
    from kedavra.pipeline.inpainting import program_latent_mask

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:21, 5:19] = 255
    result = pipe("a red circle", steps=3, seed=2, sampler="Euler", schedule_type="Automatic", init_image=init,
                  mask=Image.fromarray(mask), strength=0.8)
    out, original = np.asarray(result.images[0]), np.asarray(init)
    assert np.array_equal(out[mask == 0], original[mask == 0])
    assert not np.array_equal(out[mask > 0], original[mask > 0])
    pixel_mask = torch.from_numpy(mask / 255.0).float()[None, None]
    a1111 = program_latent_mask(pixel_mask, (16, 16), "a1111")
    comfy = program_latent_mask(pixel_mask, (16, 16), "comfyui")
    assert set(a1111.unique().tolist()) == {0.0, 1.0} and a1111.shape == (1, 1, 16, 16)
    assert ((comfy > 0) & (comfy < 1)).any()
