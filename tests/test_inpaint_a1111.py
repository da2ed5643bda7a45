"""A1111's inpainting settings (kedavra.pipeline.inpainting): the mask blur against OpenCV, the "only masked" crop,
resize modes (3, latent upscale, too), mask rounding, fill and the final overlay against a transcription of A1111 1.10
(modules/processing.py, masking.py, images.py), and whole runs through the pipeline: against the pipeline run on
A1111's prepared pictures, and, where the latents themselves change (resize mode 3, mask_round false), against
A1111's init and sample_img2img transcribed on k-diffusion's own Euler."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from k_diffusion_oracle import load_k_diffusion
from PIL import Image, ImageOps
from random_models import tiny_model
from test_hires import GuidedStandIn

from kedavra.formats.images import from_pil, to_pil
from kedavra.pipeline.inpainting import (
    A1111_API_DEFAULTS,
    InpaintOptions,
    a1111_mask,
    blur_mask,
    crop_region,
    fill_masked,
)
from kedavra.pipeline.pipeline import Pipeline
from kedavra.pipeline.request import GenerationRequest
from kedavra.upscaling.named import NO_UPSCALER, resize_image

LANCZOS = Image.Resampling.LANCZOS


# ---- A1111 1.10, transcribed (the reference) ----------------------------------------------------------------------


def a1111_resize_image(resize_mode, im, width, height):
    """modules/images.py resize_image with opts.upscaler_for_img2img None (its default): Lanczos. Any mode but 0
    and 1 (3 too) takes the last branch, resize and fill."""
    def resize(im, w, h):
        return im.resize((w, h), resample=LANCZOS)

    if resize_mode == 0:
        return resize(im, width, height)
    ratio, src_ratio = width / height, im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = resize(im, src_w, src_h)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
        res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                  box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
        res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                  box=(fill_width + src_w, 0))
    return res


def a1111_crop_region(mask, pad, processing_width, processing_height):
    """masking.get_crop_region_v2, then expand_crop_region."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    if pad:
        x1, y1, x2, y2 = max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.size[0]), min(y2 + pad, mask.size[1])
    image_width, image_height = mask.size
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height = (x2 - x1) / ratio_processing
        desired_height_diff = int(desired_height - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= image_height:
            diff = y2 - image_height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= image_height:
            y2 = image_height
    else:
        desired_width = (y2 - y1) * ratio_processing
        desired_width_diff = int(desired_width - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= image_width:
            diff = x2 - image_width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= image_width:
            x2 = image_width
    return x1, y1, x2, y2


def a1111_prepare(image, image_mask, width, height, blur, full_res, padding, invert, resize_mode=0):
    """StableDiffusionProcessingImg2Img.init's picture work for one image (inpainting_fill 1, original): the image the
    VAE encodes, the latent mask's source, the overlay and paste_to. The blur is OpenCV's, as A1111 calls it."""
    import cv2

    if invert:
        image_mask = ImageOps.invert(image_mask)
    if blur > 0:
        k = 2 * int(2.5 * blur + 0.5) + 1
        image_mask = Image.fromarray(cv2.GaussianBlur(np.array(image_mask), (k, 1), blur))
        image_mask = Image.fromarray(cv2.GaussianBlur(np.array(image_mask), (1, k), blur))
    paste_to = crop = None
    if full_res:
        mask_for_overlay = image_mask
        mask = image_mask.convert("L")
        crop = a1111_crop_region(mask, padding, width, height)
        x1, y1, x2, y2 = crop
        image_mask = a1111_resize_image(2, mask.crop(crop), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        image_mask = a1111_resize_image(resize_mode, image_mask, width, height)
        np_mask = np.clip(np.array(image_mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        mask_for_overlay = Image.fromarray(np_mask)
    if crop is None and resize_mode != 3:
        image = a1111_resize_image(resize_mode, image, width, height)
    if mask_for_overlay.size != (image.width, image.height):
        mask_for_overlay = a1111_resize_image(resize_mode, mask_for_overlay, image.width, image.height)
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    overlay = image_masked.convert("RGBA")
    if crop is not None:
        image = a1111_resize_image(2, image.crop(crop), width, height)
    return image, image_mask.convert("L"), overlay, paste_to


def a1111_img2img(pipe, prompt, image, latent_mask, width, height, seed, steps, strength, resize_mode, mask_round):
    """StableDiffusionProcessingImg2Img.init's latents (the VAE's posterior drawn as kedavra draws it: a generator
    seeded with the seed) and sample(): KDiffusionSampler.sample_img2img (A1111's "Automatic" σ's for Euler: the
    CompVisDenoiser's), CFGDenoiser blending the prediction with init_latent, the final sample blended again, and
    k-diffusion's own sample_euler; noise from A1111's CPU generator. latent_mask None: plain image to image."""
    sampling, external = load_k_diffusion()
    f = pipe.config.vae.downsample_factor
    init_latent = pipe.model.vae.encode_to_latents(from_pil(image), generator=torch.Generator().manual_seed(seed),
                                                   any_size=True)
    if resize_mode == 3:
        init_latent = F.interpolate(init_latent, size=(height // f, width // f), mode="bilinear")
    mask = nmask = None
    if latent_mask is not None:
        latmask = latent_mask.convert("RGB").resize((init_latent.shape[3], init_latent.shape[2]))
        latmask = np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0) / 255
        latmask = latmask[0]
        if mask_round:
            latmask = np.around(latmask)
        latmask = np.tile(latmask[None], (init_latent.shape[1], 1, 1))
        mask, nmask = torch.asarray(1.0 - latmask), torch.asarray(latmask)
    request = GenerationRequest.build(prompt, steps=steps, width=width, height=height, sampler="Euler",
                                      schedule_type="Automatic").for_model(pipe.config)
    wrap = external.CompVisDenoiser(GuidedStandIn(pipe.guided_unet(request), pipe.config.schedule.alpha_bar))

    def denoiser(x, sigma, **kwargs):
        denoised = wrap(x, sigma, **kwargs)
        return denoised if mask is None else denoised * nmask + init_latent * mask

    noise = torch.randn((1, *init_latent.shape[1:]), generator=torch.Generator().manual_seed(seed))
    t_enc = int(min(strength, 0.999) * steps)
    sigma_sched = wrap.get_sigmas(steps)[steps - t_enc - 1:]
    samples = sampling.sample_euler(denoiser, init_latent + noise * sigma_sched[0], sigma_sched,
                                    extra_args={"cond": None}, disable=True)
    return samples if mask is None else samples * nmask + init_latent * mask


def a1111_apply_overlay(image, paste_loc, overlay):
    """processing.py apply_overlay (and uncrop)."""
    if paste_loc is not None:
        x, y, w, h = paste_loc
        base_image = Image.new("RGBA", (overlay.width, overlay.height))
        base_image.paste(a1111_resize_image(1, image, w, h), (x, y))
        image = base_image
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


# ---- the parts ----------------------------------------------------------------------------------------------------


def random_mask(rng, size, blobs=3):
    mask = np.zeros(size[::-1], np.uint8)
    for _ in range(blobs):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        mask[y:y + rng.integers(1, size[1] // 2 + 2), x:x + rng.integers(1, size[0] // 2 + 2)] = 255
    return Image.fromarray(mask, "L")


@pytest.mark.parametrize("sigma", [1, 2, 4, 11, 40])
def test_the_mask_blur_is_opencvs_bit_for_bit(sigma):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (scripts/setup.sh --test) is the reference")
    rng = np.random.default_rng(sigma)
    for size in [(64, 48), (7, 30), (1, 5)]:  # narrower than the kernel too: OpenCV reflects again
        mask = random_mask(rng, size) if min(size) > 1 else Image.fromarray(rng.integers(0, 256, size[::-1],
                                                                                          dtype=np.uint8))
        k = 2 * int(2.5 * sigma + 0.5) + 1
        expected = cv2.GaussianBlur(cv2.GaussianBlur(np.array(mask), (k, 1), sigma), (1, k), sigma)
        ours = np.asarray(blur_mask(mask, sigma, sigma))
        assert np.array_equal(ours, expected), size


def test_blur_along_one_axis_only():
    mask = Image.new("L", (20, 20))
    mask.paste(255, (8, 8, 12, 12))
    blurred = np.asarray(blur_mask(mask, 3, 0))
    assert (blurred[8:12] > 0).sum() > 16 and not blurred[:8].any() and not blurred[12:].any()


def test_the_only_masked_box_is_a1111s():
    rng = np.random.default_rng(0)
    for _ in range(300):
        image_size = (int(rng.integers(8, 90)), int(rng.integers(8, 90)))
        processing = (int(rng.integers(1, 12)) * 8, int(rng.integers(1, 12)) * 8)
        mask = random_mask(rng, image_size, blobs=int(rng.integers(1, 3)))
        padding = int(rng.choice([0, 0, 3, 32]))
        assert crop_region(mask, padding, processing) == a1111_crop_region(mask, padding, *processing)
    assert crop_region(Image.new("L", (16, 16)), 4, (8, 8)) is None


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_resize_modes_are_a1111s(mode):
    rng = np.random.default_rng(mode)
    for source, target in [((40, 24), (32, 32)), ((24, 40), (32, 32)), ((30, 30), (48, 24)), ((33, 17), (16, 40))]:
        image = Image.fromarray(rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8))
        ours = resize_image(image, target, NO_UPSCALER, None, mode)
        assert np.array_equal(np.asarray(ours), np.asarray(a1111_resize_image(mode, image, *target)))
    with pytest.raises(ValueError, match="resize mode 3 is not one of 0, 1, 2"):
        resize_image(image, (8, 8), NO_UPSCALER, None, 3)


def test_fill_keeps_the_unmasked_pixels_and_fills_from_the_surroundings():
    image = Image.new("RGB", (64, 64), (200, 20, 20))
    image.paste((20, 20, 200), (32, 0, 64, 64))  # red left half, blue right half
    mask = Image.new("L", (64, 64))
    mask.paste(255, (4, 20, 20, 40))  # a hole in the red half
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    original = np.asarray(image).astype(int)
    kept = np.asarray(mask) == 0
    assert np.array_equal(filled[kept], original[kept])
    hole = filled[20:40, 4:20]
    assert (hole[..., 0] > 150).all() and (hole[..., 2] < 80).all()  # red from around it, not blue


def test_options_are_checked_and_read_back_from_their_infotext():
    for bad, message in [({"mask_blur_x": -1}, "mask_blur_x"), ({"padding": 1.5}, "padding"),
                         ({"masked_content": "noise"}, "masked_content"),
                         ({"resize_mode": 4}, r"resize_mode must be an integer \(0 just resize, .*3 just resize "
                                              r"\(latent upscale\)\) from 0 to 3, got 4"),
                         ({"mask_round": "no"}, "mask_round")]:
        with pytest.raises(ValueError, match=message):
            InpaintOptions(**bad)
    # A1111 writes neither its resize mode nor mask_round into the infotext; a PNG gives their defaults back
    assert InpaintOptions(resize_mode=3, mask_round=False).infotext() == {}
    assert InpaintOptions.from_infotext({}) == InpaintOptions()
    for options in [A1111_API_DEFAULTS, InpaintOptions(), InpaintOptions(mask_blur_x=8, mask_blur_y=8, padding=32,
                                                                          only_masked=True, invert=True,
                                                                          masked_content="latent noise")]:
        assert InpaintOptions.from_infotext(options.infotext()) == options
    assert A1111_API_DEFAULTS.infotext() == {"Mask blur": "4", "Inpaint area": "Only masked",
                                             "Masked area padding": "0", "Masked content": "fill"}
    with pytest.raises(ValueError, match="Inpaint area 'Everywhere'"):
        InpaintOptions.from_infotext({"Inpaint area": "Everywhere"})


# ---- whole runs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_model(), dtype="fp32")


def photo(size, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.mark.parametrize(("full_res", "blur", "padding", "invert", "resize_mode"),
                         [(True, 4, 0, False, 0), (True, 2, 6, True, 0), (False, 4, 0, False, 0),
                          (False, 3, 0, False, 2), (False, 0, 0, True, 1)])
def test_a_run_gives_a1111s_pictures_around_the_sampler(pipe, full_res, blur, padding, invert, resize_mode):
    """The pipeline's run with the settings equals a run on A1111's prepared pictures (transcribed above, OpenCV's
    blur) with no settings, decoded and overlaid as A1111 does: same latents, same final pixels."""
    pytest.importorskip("cv2", reason="opencv-python-headless (scripts/setup.sh --test) is the reference blur")
    image = photo((48, 40))
    mask = Image.new("L", image.size)
    mask.paste(255, (26, 10, 38, 22))
    options = InpaintOptions(mask_blur_x=blur, mask_blur_y=blur, only_masked=full_res, padding=padding,
                             invert=invert, resize_mode=resize_mode)
    common = {"steps": 4, "seed": 5, "sampler": "Euler", "schedule_type": "Automatic", "strength": 0.75,
              "width": 32, "height": 32}
    ours = pipe("a red circle", init_image=image, mask=mask, inpaint=options, **common)
    prepared, latent_source, overlay, paste_to = a1111_prepare(image, mask, 32, 32, blur, full_res, padding, invert,
                                                               resize_mode)
    reference = pipe("a red circle", init_image=prepared, mask=latent_source, **common)
    assert torch.equal(ours.latents, reference.latents)
    decoded = to_pil(pipe.decode(reference.latents))[0]
    expected = a1111_apply_overlay(decoded, paste_to, overlay)
    assert ours.images[0].size == (image.size if full_res else (32, 32))
    assert np.array_equal(np.asarray(ours.images[0]), np.asarray(expected))


LATENT_RUNS = [  # (init image size, mask blur, only masked, resize mode, mask_round)
    ((51, 37), 3, False, 3, True),  # latent upscale: encoded at 51x37 (25x18 latent cells), resized to 16x16
    ((51, 37), 3, False, 3, False),
    ((48, 40), 4, False, 0, False),  # the soft latent mask alone
    ((48, 40), 2, True, 3, False),  # only masked: the crop is at 32x32, the latent resize keeps its size
    ((32, 32), 0, False, 3, True),  # an image at the output size: the interpolation leaves it as it is
]


@pytest.mark.parametrize(("size", "blur", "full_res", "resize_mode", "mask_round"), LATENT_RUNS)
def test_latent_upscale_and_the_soft_latent_mask_are_a1111s(pipe, size, blur, full_res, resize_mode, mask_round):
    """Resize mode 3 and mask_round false change the latents themselves: the run equals A1111's init and
    sample_img2img transcribed on k-diffusion's Euler (a1111_img2img) from A1111's prepared pictures, and its pixels
    are A1111's overlay of its own latents decoded (mode 3: an overlay at the init image's size, laid at the top
    left of the output)."""
    pytest.importorskip("cv2", reason="opencv-python-headless (scripts/setup.sh --test) is the reference blur")
    image = photo(size, seed=1)
    mask = Image.new("L", size)
    mask.paste(255, (size[0] // 2, size[1] // 4, size[0] * 3 // 4, size[1] // 2))
    common = {"steps": 4, "seed": 5, "strength": 0.75, "width": 32, "height": 32}
    options = InpaintOptions(mask_blur_x=blur, mask_blur_y=blur, only_masked=full_res, resize_mode=resize_mode,
                             mask_round=mask_round)
    ours = pipe("a red circle", init_image=image, mask=mask, inpaint=options, sampler="Euler",
                schedule_type="Automatic", rng="CPU", **common)
    prepared, latent_source, overlay, paste_to = a1111_prepare(image, mask, 32, 32, blur, full_res, 0, False,
                                                               resize_mode)
    theirs = a1111_img2img(pipe, "a red circle", prepared, latent_source, resize_mode=resize_mode,
                           mask_round=mask_round, **common)
    assert ours.latents.shape == theirs.shape == (1, 4, 16, 16)
    assert ((ours.latents - theirs).abs().max() / theirs.abs().max()).item() < 1e-5
    expected = a1111_apply_overlay(to_pil(pipe.decode(ours.latents))[0], paste_to, overlay)
    assert ours.images[0].size == (size if full_res else (32, 32))
    assert np.array_equal(np.asarray(ours.images[0]), np.asarray(expected))


def test_mask_round_false_changes_the_run(pipe):
    image, mask = photo((32, 32), seed=2), Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 20, 20))
    common = {"steps": 3, "seed": 4, "sampler": "Euler", "schedule_type": "Automatic", "strength": 0.7}
    rounded, soft = (pipe("a circle", init_image=image, mask=mask, **common,
                          inpaint=InpaintOptions(mask_blur_x=4, mask_blur_y=4, mask_round=mask_round)).latents
                     for mask_round in (True, False))
    assert not torch.equal(rounded, soft)


@pytest.mark.parametrize("sampler", [("Euler", "Automatic"), ("euler", None)])
def test_plain_image_to_image_with_latent_upscale_is_a1111s(pipe, sampler):
    """latent_resize without a mask: A1111's transcription for its samplers; kedavra's own plans start from the same
    init latents (equal to a run whose image encodes to them: the same image at the output size, mode 3)."""
    image = photo((45, 27), seed=3)
    common = {"steps": 4, "seed": 6, "strength": 0.75, "width": 32, "height": 16}
    name, schedule_type = sampler
    ours = pipe("a blue square", init_image=image, latent_resize=True, sampler=name, schedule_type=schedule_type,
                **common)
    assert ours.latents.shape == (1, 4, 8, 16) and ours.images[0].size == (32, 16)
    if schedule_type is None:
        stretched = pipe("a blue square", init_image=image.resize((32, 16)), sampler=name, **common)
        assert not torch.equal(ours.latents, stretched.latents)  # not a pixel resize
        return
    theirs = a1111_img2img(pipe, "a blue square", image, None, resize_mode=3, mask_round=True, **common)
    assert ((ours.latents - theirs).abs().max() / theirs.abs().max()).item() < 1e-5


def test_latent_upscale_refuses_what_a1111_cannot_run(pipe):
    image, mask = photo((40, 24)), Image.new("L", (40, 24), 255)
    a1111 = {"sampler": "Euler", "schedule_type": "Automatic", "steps": 2, "width": 32, "height": 32}
    with pytest.raises(ValueError, match=r"resize mode 3 \(latent upscale\) with masked content 'fill' over the "
                                         r"whole picture needs the init image at the output size \(32x32\), got 40x24"):
        pipe("a", init_image=image, mask=mask, inpaint=InpaintOptions(resize_mode=3, masked_content="fill"), **a1111)
    with pytest.raises(ValueError, match=r"with a mask give inpaint=InpaintOptions\(resize_mode=3\)"):
        pipe("a", init_image=image, mask=mask, latent_resize=True, **a1111)
    with pytest.raises(ValueError, match="latent_resize needs init_image"):
        pipe("a", latent_resize=True, steps=2)
    with pytest.raises(ValueError, match="init_image is 1x24; resize mode 3 .* at least 2 pixels a side"):
        pipe("a", init_image=image.resize((1, 24)), latent_resize=True, **a1111)
    with pytest.raises(ValueError, match="init_image is 40x24 with 3 channels; it must be RGB 32x32"):
        pipe("a", init_image=image, **a1111)  # without latent_resize, the pixels must be the request's size


def test_rgba_masks_are_thresholded_only_with_mask_round():
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(9, 9, 9, alpha) for alpha in (0, 100, 129, 255)])
    assert np.asarray(a1111_mask(rgba)).ravel().tolist() == [0, 0, 255, 255]  # create_binary_mask: alpha > 128
    assert np.asarray(a1111_mask(rgba, mask_round=False)).ravel().tolist() == [0, 100, 129, 255]


def test_masked_content_changes_only_where_it_paints(pipe):
    image = photo((32, 32), seed=3)
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    common = {"steps": 3, "seed": 9, "sampler": "Euler", "schedule_type": "Automatic", "strength": 0.6}
    results = {content: pipe("a circle", init_image=image, mask=mask, inpaint=InpaintOptions(masked_content=content),
                             **common).images[0] for content in ("original", "fill", "latent noise", "latent nothing")}
    kept = np.asarray(mask) == 0
    for content, result in results.items():
        assert np.array_equal(np.asarray(result)[kept], np.asarray(image)[kept]), content
    arrays = [np.asarray(result) for result in results.values()]
    assert all(not np.array_equal(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])


def test_only_masked_with_a_blank_mask_is_plain_image_to_image(pipe):
    image = photo((32, 32), seed=4)
    common = {"steps": 3, "seed": 2, "sampler": "Euler", "schedule_type": "Automatic", "strength": 0.5}
    blank = pipe("a circle", init_image=image, mask=Image.new("L", (32, 32)),
                 inpaint=InpaintOptions(only_masked=True), **common)
    plain = pipe("a circle", init_image=image, **common)
    assert torch.equal(blank.latents, plain.latents)


def test_settings_need_an_a1111_sampler_and_a_mask(pipe):
    image = photo((32, 32))
    with pytest.raises(ValueError, match="are A1111's inpainting settings"):
        pipe("a circle", init_image=image, mask=Image.new("L", (32, 32), 255), inpaint=A1111_API_DEFAULTS, steps=2)
    with pytest.raises(ValueError, match="need a mask"):
        pipe("a circle", init_image=image, inpaint=A1111_API_DEFAULTS, sampler="Euler", schedule_type="Automatic")
    with pytest.raises(ValueError, match="mask is 16x16 but init_image is 32x32"):
        pipe("a circle", init_image=image, mask=Image.new("L", (16, 16)), inpaint=A1111_API_DEFAULTS,
             sampler="Euler", schedule_type="Automatic", steps=2)
