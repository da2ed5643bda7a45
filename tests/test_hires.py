"""Hires fix (kedavra.pipeline.hires): A1111's target sizes and crops, its second pass against a transcription of
A1111's sample_hr_pass driving k-diffusion's own Euler, the pixel upscalers' resize rule, and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from k_diffusion_oracle import load_k_diffusion
from PIL import Image
from random_models import tiny_model

from kedavra.pipeline.hires import LATENT_UPSCALE_MODES, HiresFix, HiresGeometry, crop_latents
from kedavra.pipeline.infotext import request_parameters
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import GenerationRequest
from kedavra.upscaling.named import UpscalerCache, resize_image


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_model(), dtype="fp32")


@pytest.mark.parametrize("size, hires, upscaled, truncate, final", [
    ((512, 512), HiresFix(scale=2), (1024, 1024), (0, 0), (1024, 1024)),
    ((512, 512), HiresFix(scale=1.3), (665, 665), (0, 0), (664, 664)),  # ⌊665 / 8⌋ latent cells
    ((512, 768), HiresFix(resize_x=1024), (1024, 1536), (0, 0), (1024, 1536)),
    ((512, 768), HiresFix(resize_y=1024), (682, 1024), (0, 0), (680, 1024)),
    ((512, 512), HiresFix(resize_x=1024, resize_y=768), (1024, 1024), (0, 32), (1024, 768)),  # cover, crop rows
    ((768, 512), HiresFix(resize_x=1024, resize_y=1024), (1536, 1024), (64, 0), (1024, 1024)),  # cover, crop cols
])
def test_target_sizes_follow_a1111(size, hires, upscaled, truncate, final):
    geometry = hires.geometry(*size, 8)
    assert (geometry.upscaled, geometry.truncate, geometry.final) == (upscaled, truncate, final)


def test_crop_takes_the_middle_with_the_odd_cell_off_the_end():
    latents = torch.arange(6 * 8.0).reshape(1, 1, 6, 8)
    geometry = HiresGeometry((8, 6), (3, 1), (5, 5))
    cropped = crop_latents(latents, geometry)
    assert torch.equal(cropped, latents[..., 0:5, 1:6])  # rows: 0 off the top, 1 off the bottom; cols: 1 and 2


def test_hires_settings_are_checked_where_they_enter():
    with pytest.raises(ValueError, match="unknown upscaler 'Bogus'.*Latent \\(nearest\\)"):
        HiresFix(upscaler="Bogus")
    with pytest.raises(ValueError, match="denoising strength must be a number in \\(0, 1\\]"):
        HiresFix(strength=0)
    with pytest.raises(ValueError, match="hires scale"):
        HiresFix(scale=-1)
    with pytest.raises(ValueError, match="each side must be from 8 to 2048"):
        HiresFix(scale=5).geometry(512, 512, 8)
    with pytest.raises(ValueError, match="not for init_image"):
        GenerationRequest.build("a", init_image=Image.new("RGB", (32, 32)), hires=HiresFix())
    assert HiresFix(upscaler="latent (BICUBIC)").upscaler == "Latent (bicubic)"
    assert HiresFix(upscaler="realesrgan_x4plus").upscaler == "R-ESRGAN 4x+"  # kedavra's name -> A1111's label
    assert HiresFix(prompt="").prompt is None  # A1111: an empty hr_prompt is the first pass's


class GuidedStandIn(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser reads from an LDM model, answering with kedavra's guided U-Net."""

    def __init__(self, guided, alpha_bar):
        super().__init__()
        self.guided, self.alphas_cumprod = guided, alpha_bar.float()

    def apply_model(self, x, t, cond=None, **kwargs):
        return self.guided(x, t)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)"])
def test_second_pass_is_a1111s_sample_hr_pass(pipe, upscaler):
    """A1111 1.10's txt2img with hires fix, transcribed: the first pass's latents interpolated, fresh noise from the
    seed at the new shape (its CPU RNG), sample_img2img handed hr steps (a schedule of ⌊steps / min(s, 0.999)⌋,
    its last `steps` run), k-diffusion's Euler on A1111's σ's from CompVisDenoiser."""
    sampling, external = load_k_diffusion()
    seed, steps, hr_steps, strength = 5, 6, 4, 0.55
    base = dict(steps=steps, seed=seed, sampler="Euler", schedule_type="Automatic", rng="CPU", width=16, height=16)
    first = pipe("a red square", **base)
    hires = HiresFix(scale=1.5, upscaler=upscaler, steps=hr_steps, strength=strength)
    ours = pipe("a red square", **base, hires=hires)

    mode, antialias = LATENT_UPSCALE_MODES[upscaler]
    f = pipe.config.vae.downsample_factor
    init = F.interpolate(first.latents, size=(24 // f, 24 // f), mode=mode, antialias=antialias)
    noise = torch.randn((1, *init.shape[1:]), generator=torch.Generator().manual_seed(seed))
    second = GenerationRequest.build("a red square", **{**base, "width": 24, "height": 24}).for_model(pipe.config)
    wrap = external.CompVisDenoiser(GuidedStandIn(pipe.guided_unet(second), pipe.config.schedule.alpha_bar))
    total, t_enc = int(hr_steps / min(strength, 0.999)), hr_steps - 1
    sigmas = wrap.get_sigmas(total)[total - t_enc - 1:]
    theirs = sampling.sample_euler(wrap, init + noise * sigmas[0], sigmas, extra_args={"cond": None}, disable=True)
    assert ours.latents.shape == theirs.shape == (1, 4, 24 // f, 24 // f)
    assert ((ours.latents - theirs).abs().max() / theirs.abs().max()).item() < 1e-5
    assert ours.images[0].size == (24, 24)


def test_second_pass_runs_exactly_the_hires_steps_with_its_own_sampler_and_prompt(pipe):
    records = []
    pipe("a cat", steps=5, seed=1, width=16, height=16, callback=lambda step: records.append(step.count),
         hires=HiresFix(steps=3, sampler="dpmpp_2m", prompt="a dog", upscaler="Latent (nearest)"))
    assert records == [5] * 5 + [3] * 3
    records.clear()
    pipe("a cat", steps=5, seed=1, width=16, height=16, callback=lambda step: records.append(step.count),
         hires=HiresFix(strength=0.3))  # steps 0: the first pass's count, run exactly
    assert records == [5] * 10


def test_hires_prompt_and_pixel_upscaler_change_the_image(pipe):
    base = dict(steps=4, seed=2, width=16, height=16)
    plain = pipe("a cat", **base, hires=HiresFix(upscaler="Latent")).latents
    other_prompt = pipe("a cat", **base, hires=HiresFix(upscaler="Latent", prompt="a dog")).latents
    pixel = pipe("a cat", **base, hires=HiresFix(upscaler="Lanczos")).latents
    assert plain.shape == other_prompt.shape == pixel.shape == (1, 4, 16, 16)
    assert not torch.allclose(plain, other_prompt) and not torch.allclose(plain, pixel)


def test_infotext_writes_a1111s_hires_keys():
    request = GenerationRequest.build("a cat", steps=20, sampler="Euler a", schedule_type="Automatic", seed=1,
                                      hires=HiresFix(scale=2, steps=10, strength=0.45, upscaler="R-ESRGAN 4x+",
                                                     sampler="DPM++ 2M", prompt="a dog"))
    params = request_parameters(request, 0, 1, 512, 512, None, None)
    assert params.denoising_strength == 0.45
    assert params.extra["Hires upscale"] == "2" and params.extra["Hires steps"] == "10"
    assert params.extra["Hires upscaler"] == "R-ESRGAN 4x+" and params.extra["Hires sampler"] == "DPM++ 2M"
    assert params.extra["Hires schedule type"] == "Karras"  # DPM++ 2M's Automatic; the first pass's is Automatic
    assert params.extra["Hires prompt"] == "a dog" and "Hires negative prompt" not in params.extra
    resized = request.replace(hires=HiresFix(resize_x=1024, resize_y=768))
    extra = request_parameters(resized, 0, 1, 512, 512, None, None).extra
    assert extra["Hires resize"] == "1024x768" and "Hires upscale" not in extra and "Hires steps" not in extra


def test_pixel_resize_follows_a1111s_upscaler_rule():
    """resize_image(0, ...): the plain resizers scale once, then Lanczos to the multiple of 8 below, then to the
    size; 'None' is a single Lanczos resize."""
    image = Image.effect_noise((32, 24), 60).convert("RGB")
    cache = UpscalerCache()

    def same(a, b):
        return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))

    assert same(resize_image(image, (64, 48), "Nearest", cache), image.resize((64, 48), Image.Resampling.NEAREST))
    # x1.5 = 48x36: Nearest to 48x36, Lanczos to the multiple of 8 below (48x32), then Lanczos to 48x36
    expected = image.resize((48, 36), Image.Resampling.NEAREST).resize((48, 32), Image.Resampling.LANCZOS) \
        .resize((48, 36), Image.Resampling.LANCZOS)
    assert same(resize_image(image, (48, 36), "Nearest", cache), expected)
    assert same(resize_image(image, (48, 36), "None", cache), image.resize((48, 36), Image.Resampling.LANCZOS))
    assert same(resize_image(image, (16, 12), "Nearest", cache), image.resize((16, 12), Image.Resampling.LANCZOS))
