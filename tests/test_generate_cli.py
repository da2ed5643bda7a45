"""`kedavra generate` end to end on a tiny model with random weights: files and names written, the PNG parameters
per image, bitwise reproduction (same seed, --from-png, an A1111-written text), image to image, inpainting, and
one line + exit status 2 for every kind of bad input. Also the grid layout (A1111's default rule).

Exactness checks run in fp32 (`--precision fp32`); one run uses bf16 (the default on a CPU with AMX).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from kedavra import __version__
from kedavra.api import load, model_identity
from kedavra.checkpoint import save_model
from kedavra.cli import build_parser, main
from kedavra.commands.generate_request import resolve_request
from kedavra.formats.grid import grid_shape, image_grid
from kedavra.formats.png_info import GenerationParameters, format_parameters, model_hash, read_parameters, read_png_text
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.viz.sample_image import draw_sample_image

PROMPT = "a red circle above a blue square"
STEPS = "3"  # enough for every sampler path to run more than one step, cheap at 32 px
SIZE = 32  # the tiny preset's image size
WEIGHT_STD = 0.05  # random weights: small enough that activations stay finite, large enough that images are not flat
# Inpainting, measured with this file's model and settings (fp32, seed 3, 3 steps): pixels at least 4 px from the
# 16x16 mask differ from the same run with nothing masked (the VAE round trip of the init image) by at most 3
# levels (mean 1.7); regenerating everything (an all-white mask) moves them by up to 12 (mean 3.8). The decoder's
# GroupNorm statistics and mid-block attention span the whole image, so far pixels move a little, never 0.
KEPT_TOLERANCE = 5  # levels of 255: the measured 3 plus room for other BLAS/oneDNN kernels
MASK_MARGIN = 4  # pixels: the border of the mask where the decoder's convolutions mix painted and kept latents
FAR_FROM_FULL = 8  # levels: the measured 12 for a full regeneration, less room
BF16_TOLERANCE = 4  # levels of 255: bf16 networks against fp32, measured max 1 (mean 0.03) at 2 steps


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The tiny preset with every weight ~ N(0, WEIGHT_STD²), the U-Net's zero-initialised output convs too."""
    torch.manual_seed(0)
    model = StableDiffusion(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=WEIGHT_STD)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Input files: a 32x32 picture, masks, and files that are not what they claim."""
    folder = tmp_path_factory.mktemp("inputs")
    draw_sample_image(SIZE).save(folder / "init.png")
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[8:24, 8:24] = 255  # paint the centre 16x16
    Image.fromarray(square).save(folder / "mask.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / "black.png")
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(folder / "white.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "small_mask.png")
    Image.new("RGB", (SIZE, SIZE)).save(folder / "no_parameters.png")
    (folder / "not_an_image.png").write_text("hello")
    return folder


def generate(*argv) -> int:
    return main(["generate", *map(str, argv)])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def single(model_file, tmp_path_factory):
    """One fp32 image with non-default settings, and what the command printed."""
    out = tmp_path_factory.mktemp("single") / "cat.png"
    argv = [PROMPT, "--model", model_file, "--negative", "blurry, lowres", "--steps", STEPS, "--sampler", "euler_a",
            "--cfg-scale", "5", "--guidance-rescale", "0.5", "--seed", "7", "--precision", "fp32", "-q", "-o", out]
    assert generate(*argv) == 0
    return out, argv


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--from-png", "--init-image", "--mask", "--grid", "--precision", "examples:"):
        assert option in text


def test_one_image_carries_its_parameters(single, model_file):
    out, _ = single
    image = Image.open(out)
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    assert pixels(out).std() > 1  # not a flat image: the randomised output convs reach the pixels
    params = read_parameters(out)
    assert params == GenerationParameters(
        prompt=PROMPT, negative_prompt="blurry, lowres", steps=3, sampler="Euler a", cfg_scale=5.0, seed=7,
        width=SIZE, height=SIZE, model_hash=model_hash(model_file), model="tiny",
        extra={"CFG rescale": "0.5", "RNG": "CPU"}, version=f"kedavra {__version__}")


def test_same_seed_gives_the_same_pixels(single, tmp_path, capsys):
    out, argv = single
    again = tmp_path / "again.png"
    assert generate(*argv[:-1], again) == 0
    assert capsys.readouterr().out.strip() == f"{again}  seed 7"
    assert np.array_equal(pixels(again), pixels(out))


def test_from_png_reproduces_the_pixels(single, model_file, tmp_path):
    out, _ = single
    again = tmp_path / "from_png.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "-o", again) == 0
    assert np.array_equal(pixels(again), pixels(out))
    assert read_png_text(again) == read_png_text(out)


def test_from_png_flags_override(single, model_file, tmp_path):
    """A flag given wins over the PNG; the rest still comes from the PNG."""
    out, _ = single
    args = build_parser().parse_args(["generate", "--from-png", str(out), "--steps", "5", "--no-karras",
                                      "--sampler", "DPM++ 2M Karras"])
    request = resolve_request(args, read_parameters(out), [])
    assert (request.steps, request.sampler, request.karras) == (5, "dpmpp_2m", False)
    assert (request.prompts, request.negative_prompts, request.guidance_scale) == ((PROMPT,), ("blurry, lowres",), 5.0)
    assert (request.seed, request.guidance_rescale) == (7, 0.5)


@pytest.mark.parametrize(("sampler", "schedule_type", "expected"), [
    ("DPM++ 2M Karras", None, ("dpmpp_2m", None, True, "CPU")),  # no schedule type: kedavra's plans, Karras σ's
    ("DPM++ 2M", None, ("dpmpp_2m", None, False, "CPU")),
    ("DPM++ 2M", "Karras", ("DPM++ 2M", "karras", False, "GPU")),  # A1111 v1.9 on: its sampler, its GPU noise
    ("DPM++ 2M", "Automatic", ("DPM++ 2M", "automatic", False, "GPU")),
    ("Euler a", "Automatic", ("Euler a", "automatic", False, "GPU")),
    ("Euler", "Uniform", ("Euler", "uniform", False, "GPU")),
    ("DPM2 a", "Exponential", ("DPM2 a", "exponential", False, "GPU")),
    ("DPM++ 3M SDE", None, ("DPM++ 3M SDE", "automatic", False, "CPU")),  # only A1111 has it: its way
])
def test_a1111_sampler_and_schedule_type(sampler, schedule_type, expected):
    png = GenerationParameters(prompt="a", steps=20, sampler=sampler, schedule_type=schedule_type, cfg_scale=7,
                               seed=1, width=512, height=512)
    notes = []
    request = resolve_request(build_parser().parse_args(["generate", "--from-png", "a.png"]), png, notes)
    assert (request.sampler, request.schedule_type, request.karras, request.rng) == expected
    assert not notes


def test_a1111_text_with_an_old_sampler_name(model_file, tmp_path, capsys):
    """A1111 before v1.9 folded the schedule into the name: "DPM++ 2M Karras" means dpmpp_2m with Karras σ."""
    text = ("a castle on a hill\nNegative prompt: fog\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, "
            "Size: 32x32, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 1, Version: v1.5.1")
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", text)
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "a1111.png", pnginfo=chunks)
    assert generate("--from-png", tmp_path / "a1111.png", "--model", model_file, "--precision", "fp32", "-q",
                    "-o", tmp_path / "from_a1111.png") == 0
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "6ce0161689" in notes[0] and "will differ" in notes[0]
    assert generate("a castle on a hill", "--negative", "fog", "--steps", STEPS, "--sampler", "dpmpp_2m", "--karras",
                    "--cfg-scale", "7", "--seed", "42", "--model", model_file, "--precision", "fp32", "-q",
                    "-o", tmp_path / "direct.png") == 0
    assert np.array_equal(pixels(tmp_path / "from_a1111.png"), pixels(tmp_path / "direct.png"))
    params = read_parameters(tmp_path / "direct.png")
    # kedavra's own plans name Karras σ's as A1111 did before v1.9; a "Schedule type" would mean A1111's sampler
    assert (params.sampler, params.schedule_type, params.seed) == ("DPM++ 2M Karras", None, 42)


def test_batch_with_grid(single, model_file, tmp_path, capsys):
    out = tmp_path / "batch.png"
    assert generate(PROMPT, "--model", model_file, "--negative", "blurry, lowres", "--steps", STEPS, "--sampler",
                    "euler_a", "--cfg-scale", "5", "--guidance-rescale", "0.5", "--seed", "7", "-n", "3", "--grid",
                    "--precision", "fp32", "-q", "-o", out) == 0
    paths = [tmp_path / f"batch-{i}.png" for i in range(3)]
    assert capsys.readouterr().out.splitlines() == [
        *(f"{path}  seed {seed}" for path, seed in zip(paths, (7, 8, 9), strict=True)),
        f"{tmp_path / 'batch-grid.png'}  grid of 3"]
    assert not out.exists()
    assert [read_parameters(path).seed for path in paths] == [7, 8, 9]
    assert np.array_equal(pixels(paths[0]), pixels(single[0]))  # image i of a batch = a single run with seed + i
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))
    grid = pixels(tmp_path / "batch-grid.png")
    assert grid.shape == (2 * SIZE, 2 * SIZE, 3)  # 3 images: A1111's round(√3) = 2 rows of 2
    tiles = [grid[:SIZE, :SIZE], grid[:SIZE, SIZE:], grid[SIZE:, :SIZE]]
    assert all(np.array_equal(tile, pixels(path)) for tile, path in zip(tiles, paths, strict=True))
    assert (grid[SIZE:, SIZE:] == 0).all()
    assert read_parameters(tmp_path / "batch-grid.png").seed == 7  # A1111 gives a grid its first image's text


def test_folder_output_in_bf16(model_file, tmp_path, capsys):
    """-o FOLDER numbers the files on from the highest NNNNN- there; bf16 writes the same text as fp32 and pixels
    within BF16_TOLERANCE of fp32's."""
    (tmp_path / "00041-5.png").write_bytes(b"")
    common = [PROMPT, "--model", model_file, "--steps", "2", "--seed", "5", "-q"]
    assert generate(*common, "-n", "2", "--precision", "bf16", "-o", tmp_path) == 0
    names = [tmp_path / "00042-5.png", tmp_path / "00043-6.png"]
    assert capsys.readouterr().out.splitlines() == [f"{names[0]}  seed 5", f"{names[1]}  seed 6"]
    params = read_parameters(names[1])
    assert (params.seed, params.sampler, params.steps, params.cfg_scale) == (6, "DPM++ 2M", 2, 7.5)
    assert generate(*common, "--precision", "fp32", "-o", tmp_path / "fp32.png") == 0
    assert read_png_text(tmp_path / "fp32.png") == read_png_text(names[0])
    assert np.abs(pixels(names[0]) - pixels(tmp_path / "fp32.png")).max() <= BF16_TOLERANCE


def test_image_to_image_and_back_from_its_png(model_file, images, tmp_path, capsys):
    out = tmp_path / "img2img.png"
    assert generate(PROMPT, "--model", model_file, "--init-image", images / "init.png", "--strength", "0.5",
                    "--steps", "4", "--seed", "11", "--precision", "fp32", "-q", "-o", out) == 0
    params = read_parameters(out)
    assert (params.denoising_strength, params.steps, params.seed) == (0.5, 4, 11)
    again = tmp_path / "again.png"
    assert generate("--from-png", out, "--init-image", images / "init.png", "--model", model_file,
                    "--precision", "fp32", "-q", "-o", again) == 0
    assert np.array_equal(pixels(again), pixels(out))
    capsys.readouterr()
    assert generate("--from-png", out, "--model", model_file, "-o", tmp_path / "x.png") == 2  # init image needed
    assert "Denoising strength 0.5" in capsys.readouterr().err


def test_a1111_inpainting_settings_are_written_and_read_back(model_file, images, tmp_path):
    """--mask-blur, --only-masked, --masked-padding, --masked-content: the output keeps the init image's size (the
    crop is generated at --width x --height and pasted back), the PNG records A1111's keys, and --from-png with the
    same init image and mask gives the same pixels."""
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert generate(PROMPT, "--model", model_file, "--init-image", images / "init.png", "--mask", images / "mask.png",
                    "--sampler", "Euler a", "--schedule-type", "Automatic", "--steps", "4", "--seed", "3",
                    "--width", "16", "--height", "16",
                    "--mask-blur", "2", "--only-masked", "--masked-padding", "4", "--masked-content", "latent-noise",
                    "-o", first) == 0
    assert Image.open(first).size == (SIZE, SIZE)
    extra = read_parameters(first).extra
    assert {key: extra[key] for key in ("Mask blur", "Inpaint area", "Masked area padding", "Masked content")} == {
        "Mask blur": "2", "Inpaint area": "Only masked", "Masked area padding": "4", "Masked content": "latent noise"}
    assert generate("--from-png", first, "--model", model_file, "--init-image", images / "init.png", "--mask",
                    images / "mask.png", "-o", again) == 0
    assert np.array_equal(pixels(first), pixels(again))


def test_latent_upscale_and_mask_round_flags_reach_the_pipeline(model_file, images, tmp_path):
    """--resize-mode latent-upscale: without a mask the request's latent_resize (the image kept at its own size for
    the pipeline), with a mask A1111's InpaintOptions resize mode 3; --no-mask-round its mask_round. A1111 writes
    neither into the infotext. A run with latent-upscale is the pipeline's with latent_resize."""
    odd = Image.open(images / "init.png").resize((27, 45))
    args = build_parser().parse_args(["generate", PROMPT, "--resize-mode", "latent-upscale"])
    assert resolve_request(args, None, [], init_image=odd).latent_resize
    masked = build_parser().parse_args(["generate", PROMPT, "--resize-mode", "latent-upscale", "--no-mask-round",
                                        "--sampler", "Euler", "--schedule-type", "Automatic"])
    request = resolve_request(masked, None, [], init_image=odd, mask=Image.new("L", odd.size, 255))
    assert not request.latent_resize and (request.inpaint.resize_mode, request.inpaint.mask_round) == (3, False)
    assert resolve_request(build_parser().parse_args(["generate", PROMPT]), None, [], init_image=odd,
                           mask=Image.new("L", odd.size, 255)).inpaint is None  # mask_round's default: none given
    odd.save(tmp_path / "odd.png")
    out = tmp_path / "latent.png"
    assert generate(PROMPT, "--model", model_file, "--init-image", tmp_path / "odd.png", "--width", SIZE, "--height",
                    SIZE, "--resize-mode", "latent-upscale", "--sampler", "Euler", "--schedule-type", "Automatic",
                    "--steps", STEPS, "--seed", "3", "--strength", "0.6", "--precision", "fp32", "-q", "-o", out) == 0
    assert "Resize mode" not in read_parameters(out).extra
    pipe = load(model_file, dtype="fp32")
    direct = pipe(PROMPT, init_image=odd, latent_resize=True, width=SIZE, height=SIZE, sampler="Euler",
                  schedule_type="Automatic", rng="CPU", steps=int(STEPS), seed=3, strength=0.6, guidance_scale=7.5)
    assert np.array_equal(pixels(out), np.asarray(direct.images[0]).astype(np.int16))


def test_eta_of_a1111s_ancestral_samplers_is_written_and_read_back(model_file, tmp_path):
    first, again, default = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "default.png"
    common = ["--model", model_file, "--sampler", "Euler a", "--schedule-type", "Automatic", "--steps", "4", "--seed",
              "8"]
    assert generate(PROMPT, *common, "--eta", "0.5", "-o", first) == 0
    assert read_parameters(first).extra["Eta"] == "0.5"
    assert generate("--from-png", first, "--model", model_file, "-o", again) == 0
    assert generate(PROMPT, *common, "-o", default) == 0
    assert np.array_equal(pixels(first), pixels(again)) and not np.array_equal(pixels(first), pixels(default))
    assert "Eta" not in read_parameters(default).extra


def test_inpainting_keeps_the_unmasked_pixels(model_file, images, tmp_path):
    """Compared with the same run keeping everything (an all-black mask: the VAE round trip of the init image),
    pixels far from the mask barely move, while regenerating everything (an all-white mask) moves them more."""
    for name in ("mask", "black", "white"):
        assert generate(PROMPT, "--model", model_file, "--init-image", images / "init.png", "--mask",
                        images / f"{name}.png", "--steps", STEPS, "--seed", "3", "--precision", "fp32", "-q",
                        "-o", tmp_path / f"{name}.png") == 0
    assert read_parameters(tmp_path / "mask.png").denoising_strength == 1.0  # inpainting's default strength
    kept = pixels(tmp_path / "black.png")
    far = np.ones((SIZE, SIZE), bool)
    far[8 - MASK_MARGIN : 24 + MASK_MARGIN, 8 - MASK_MARGIN : 24 + MASK_MARGIN] = False
    inpainted = np.abs(pixels(tmp_path / "mask.png") - kept).max(axis=-1)
    regenerated = np.abs(pixels(tmp_path / "white.png") - kept).max(axis=-1)
    assert inpainted[far].max() <= KEPT_TOLERANCE
    assert regenerated[far].max() >= FAR_FROM_FULL
    assert inpainted[8:24, 8:24].mean() > 2 * inpainted[far].mean()  # the masked square was repainted


# name -> (argv builder, text the one stderr line must hold). `m` is a missing --model: the check runs before the
# model is looked up; `real` the tiny model file, for the checks that need its config.
BAD_INPUTS = {
    "width not a multiple": (lambda f: [PROMPT, *f.real, "--width", "31"], "got 31"),  # tiny: VAE f 2
    "steps past training": (lambda f: [PROMPT, *f.real, "--steps", "1001"], "got 1001"),  # 1000 timesteps
    "width zero": (lambda f: [PROMPT, *f.m, "--width", "0"], "width must be an integer from 1 to 2048"),
    "height negative": (lambda f: [PROMPT, *f.m, "--height", "-8"], "got -8"),
    "width above limit": (lambda f: [PROMPT, *f.m, "--width", "4096"], "got 4096"),
    "steps zero": (lambda f: [PROMPT, *f.m, "--steps", "0"], "steps must be an integer >= 1, got 0"),
    "strength above 1": (lambda f: [PROMPT, *f.m, *f.init, "--strength", "1.5"], "got 1.5"),
    "strength below 0": (lambda f: [PROMPT, *f.m, *f.init, "--strength", "-0.1"], "got -0.1"),
    "strength runs no step": (lambda f: [PROMPT, *f.m, *f.init, "--strength", "0.1", "--steps", "5"], "strength 0.1"),
    "strength without init": (lambda f: [PROMPT, *f.m, "--strength", "0.5"], "needs init_image"),
    "mask of another size": (lambda f: [PROMPT, *f.m, *f.init, "--mask", f.images / "small_mask.png"], "16x16"),
    "mask without init": (lambda f: [PROMPT, *f.m, "--mask", f.images / "mask.png"], "mask needs init_image"),
    "mask blur without mask": (lambda f: [PROMPT, *f.m, *f.init, "--mask-blur", "4"], "--mask-blur set(s) how a mask"),
    "unknown masked content": (lambda f: [PROMPT, *f.m, *f.init, "--mask", f.images / "mask.png", "--sampler",
                                          "Euler", "--masked-content", "noise"], "unknown masked_content 'noise'"),
    "mask settings on kedavra's plans": (lambda f: [PROMPT, *f.m, *f.init, "--mask", f.images / "mask.png",
                                                    "--only-masked"], "are A1111's inpainting settings"),
    "mask rounding without mask": (lambda f: [PROMPT, *f.m, *f.init, "--no-mask-round"], "--mask-round set(s)"),
    "latent upscale on kedavra's plans with a mask": (lambda f: [PROMPT, *f.m, *f.init, "--mask",
                                                                 f.images / "mask.png", "--resize-mode",
                                                                 "latent-upscale"], "are A1111's inpainting settings"),
    "init not an image": (lambda f: [PROMPT, *f.m, "--init-image", f.images / "not_an_image.png"], "not_an_image"),
    "init missing": (lambda f: [PROMPT, *f.m, "--init-image", f.images / "nowhere.png"], "nowhere.png"),
    "unknown sampler": (lambda f: [PROMPT, *f.m, "--sampler", "warp_drive"], "warp_drive"),
    "eta with a non-ddim sampler": (lambda f: [PROMPT, *f.m, "--eta", "0.5"], "eta=0.5 applies only to the ddim"),
    "seed negative": (lambda f: [PROMPT, *f.m, "--seed", "-1"], "got -1"),
    "no images": (lambda f: [PROMPT, *f.m, "-n", "0"], "num_images must be an integer from 1 to 64, got 0"),
    "cfg negative": (lambda f: [PROMPT, *f.m, "--cfg-scale", "-2"], "got -2.0"),
    "guidance rescale above 1": (lambda f: [PROMPT, *f.m, "--guidance-rescale", "2"], "got 2.0"),
    "unknown precision": (lambda f: [PROMPT, *f.m, "--precision", "fp8"], "fp8"),
    "unknown device": (lambda f: [PROMPT, *f.m, "--device", "warp9"], "warp9"),
    "unknown family": (lambda f: [PROMPT, *f.m, "--family", "sd3"], "sd3"),
    "unknown prediction type": (lambda f: [PROMPT, *f.m, "--prediction-type", "x0"], "x0"),
    "no prompt": (lambda f: [*f.m], "give a prompt"),
    "prompt line the PNG cannot hold": (lambda f: ["a cat\nNegative prompt: x", *f.m], "Negative prompt: x"),
    "png without parameters": (lambda f: ["--from-png", f.images / "no_parameters.png", *f.m], "no_parameters.png"),
    "png that is no png": (lambda f: ["--from-png", f.images / "not_an_image.png", *f.m], "not_an_image.png"),
    "output folder missing": (lambda f: [PROMPT, *f.m, "-o", f.out.parent / "nope" / "out.png"], "nope"),
    "output not png": (lambda f: [PROMPT, *f.m, "-o", f.out.with_suffix(".jpg")], "out.jpg"),
    "model missing": (lambda f: [PROMPT, *f.m], "missing.safetensors"),
    "unknown hires upscaler": (lambda f: [PROMPT, *f.m, "--hires-upscaler", "Bogus"], "unknown upscaler 'Bogus'"),
    "hires with an init image": (lambda f: [PROMPT, *f.m, *f.init, "--hires"], "with --init-image, upscale"),
    "hires flag with --no-hires": (lambda f: [PROMPT, *f.m, "--no-hires", "--hires-scale", "2"], "--no-hires with"),
    "hires past the size limit": (lambda f: [PROMPT, *f.real, "--hires-scale", "100"], "each side must be from 2"),
    "hires strength zero": (lambda f: [PROMPT, *f.m, "--hires", "--strength", "0"], "strength must be a number in"),
    "churn without a schedule type": (lambda f: [PROMPT, *f.m, "--s-churn", "1"], "give a schedule type"),
    "step cache negative": (lambda f: [PROMPT, *f.m, "--step-cache", "-1"], "step_cache must be an integer >= 0"),
    "taesd without preview": (lambda f: [PROMPT, *f.m, "--taesd", f.images], "give --preview FILE.png"),
    "preview not png": (lambda f: [PROMPT, *f.m, "--preview", f.out.with_suffix(".jpg")], "must be a .png file"),
    "preview every zero": (lambda f: [PROMPT, *f.m, "--preview", f.out, "--preview-every", "0"], "got 0"),
    "taesd missing": (lambda f: [PROMPT, *f.real, "--preview", f.out.with_name("p.png"), "--taesd",
                                 f.images / "nowhere"], "nowhere: no such file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_status_2(case, model_file, images, tmp_path, capsys):
    out = tmp_path / "out.png"
    files = SimpleNamespace(real=["--model", model_file], m=["--model", tmp_path / "missing.safetensors"],
                            init=["--init-image", images / "init.png"], images=images, out=out)
    build, needle = BAD_INPUTS[case]
    argv = build(files)
    assert generate(*argv, "-q", *([] if "-o" in argv else ["-o", out])) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kedavra generate: error: "), err
    assert needle in lines[0], lines[0]
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(("count", "shape"), [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)),
                                              (6, (2, 3)), (7, (3, 3)), (8, (3, 3)), (10, (3, 4)), (16, (4, 4))])
def test_grid_shape_follows_a1111(count, shape):
    """rows = round(√n), columns = ⌈n / rows⌉ (A1111 image_grid, default settings), worked by hand."""
    assert grid_shape(count) == shape


def test_image_grid_places_tiles_row_by_row():
    tiles = [Image.new("RGB", (3, 2), (10 * i, 0, 0)) for i in range(5)]
    grid = np.asarray(image_grid(tiles, columns=2, padding=1, background=(0, 0, 255)))
    assert grid.shape == (3 * 2 + 4, 2 * 3 + 3, 3)  # 3 rows of 2 tiles, 1 px around and between
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[1, 5].tolist() == [10, 0, 0]
    assert grid[4, 1].tolist() == [20, 0, 0] and grid[7, 1].tolist() == [40, 0, 0]
    assert grid[7, 5].tolist() == [0, 0, 255] and grid[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match="one size"):
        image_grid([Image.new("RGB", (2, 2)), Image.new("RGB", (3, 2))])


def test_format_of_the_written_text(single):
    """The chunk is exactly format_parameters of what read_parameters gives back (A1111's layout)."""
    out, _ = single
    text = read_png_text(out)["parameters"]
    assert text == format_parameters(read_parameters(out))
    assert text.startswith(f"{PROMPT}\nNegative prompt: blurry, lowres\nSteps: 3, Sampler: Euler a, CFG scale: 5, "
                           "Seed: 7, Size: 32x32, Model hash: ")


def test_model_identity_of_a_file_and_a_diffusers_folder(model_file, tmp_path):
    """A file: its stem and AutoV2 hash. A diffusers folder: its name and the hash of the U-Net weights file the
    loader reads (diffusion_pytorch_model.safetensors before .bin); none when the U-Net is sharded."""
    assert model_identity(model_file) == ("tiny", model_hash(model_file))
    unet = tmp_path / "my-model" / "unet"
    unet.mkdir(parents=True)
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"bin")
    assert model_identity(unet.parent) == ("my-model", model_hash(unet / "diffusion_pytorch_model.bin"))
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"safetensors")
    assert model_identity(unet.parent) == ("my-model", model_hash(unet / "diffusion_pytorch_model.safetensors"))
    sharded = tmp_path / "sharded" / "unet"
    sharded.mkdir(parents=True)
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    assert model_identity(sharded.parent) == ("sharded", None)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a", "DPM++ SDE", "DPM2 a"])
def test_a1111_sampling_round_trips_through_the_png(sampler, model_file, tmp_path):
    """An A1111-style run (schedule type, NV noise, variation seed, ENSD) writes A1111's fields, and --from-png
    reads them back into the same pixels; a different RNG source gives other pixels."""
    out = tmp_path / "a1111.png"
    common = ("--model", model_file, "--precision", "fp32", "-q", "--steps", STEPS, "--seed", "5")
    assert generate(PROMPT, *common, "--sampler", sampler, "--schedule-type", "Karras", "--rng", "NV",
                    "--variation-seed", "9", "--variation-strength", "0.3", "--ensd", "31337", "-o", out) == 0
    params = read_parameters(out)
    assert (params.sampler, params.schedule_type) == (sampler, "Karras")
    assert {key: params.extra[key] for key in ("RNG", "ENSD", "Variation seed", "Variation seed strength")} == {
        "RNG": "NV", "ENSD": "31337", "Variation seed": "9", "Variation seed strength": "0.3"}
    again = tmp_path / "again.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "-o", again) == 0
    assert np.array_equal(pixels(out), pixels(again))
    cpu = tmp_path / "cpu.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "--rng", "CPU",
                    "-o", cpu) == 0
    assert not np.array_equal(pixels(out), pixels(cpu))


def test_bad_sampling_flags_are_refused(model_file, capsys):
    common = (PROMPT, "--model", model_file, "-q")
    assert generate(*common, "--schedule-type", "Karas") != 0
    assert "unknown schedule type 'Karas'" in capsys.readouterr().err
    assert generate(*common, "--variation-strength", "0.5") != 0
    assert "needs a subseed" in capsys.readouterr().err


def test_log_uniform_sigmas_are_written_and_read_back(model_file, tmp_path, capsys):
    """--sigmas log-uniform fills in the model's levels; the PNG's "Sigmas" gives them back exactly."""
    from kedavra.checkpoint import load_model
    from kedavra.diffusion.step_schedule import log_uniform_sigmas, table_sigma_range

    out = tmp_path / "levels.png"
    common = ("--model", model_file, "--precision", "fp32", "-q", "--seed", "4")
    assert generate(PROMPT, *common, "--steps", 3, "--sampler", "unipc", "--sigmas", "log-uniform", "-o", out) == 0
    levels = [float(part) for part in read_parameters(out).extra["Sigmas"].split()]
    schedule = load_model(model_file).config.schedule
    assert levels == log_uniform_sigmas(*table_sigma_range(schedule), 3).tolist()
    again = tmp_path / "again.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "-o", again) == 0
    assert np.array_equal(pixels(out), pixels(again))
    assert generate(PROMPT, *common, "--steps", 2, "--sigmas", "3,x", "-o", out) != 0
    assert "--sigmas must be noise levels" in capsys.readouterr().err
    assert generate(PROMPT, *common, "--steps", 3, "--sigmas", "3 1", "-o", out) != 0
    assert "one noise level per step (3)" in capsys.readouterr().err


def test_hires_fix_round_trips_through_the_png(model_file, tmp_path):
    """--hires writes A1111's keys (Size: the first pass's), --from-png redoes both passes bit for bit, --no-hires
    gives the first pass alone, and an A1111-written text with Hires keys runs its hires fix."""
    out = tmp_path / "hires.png"
    common = ("--model", model_file, "--precision", "fp32", "-q", "--steps", STEPS, "--seed", "3")
    assert generate(PROMPT, *common, "--hires-scale", "1.5", "--hires-steps", "2", "--strength", "0.6",
                    "--hires-upscaler", "Lanczos", "--hires-sampler", "Euler a", "-o", out) == 0
    assert Image.open(out).size == (48, 48)
    params = read_parameters(out)
    assert (params.width, params.height, params.denoising_strength) == (SIZE, SIZE, 0.6)
    assert {key: params.extra[key] for key in params.extra if key.startswith("Hires")} == {
        "Hires upscale": "1.5", "Hires steps": "2", "Hires upscaler": "Lanczos", "Hires sampler": "Euler a"}
    again = tmp_path / "again.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "-o", again) == 0
    assert np.array_equal(pixels(out), pixels(again))
    first = tmp_path / "first.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "--no-hires",
                    "-o", first) == 0
    assert Image.open(first).size == (SIZE, SIZE) and "Hires upscale" not in read_parameters(first).extra
    a1111 = tmp_path / "a1111.png"
    text = (f"{PROMPT}\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 32x32, "
            "Denoising strength: 0.45, Hires upscale: 2, Hires upscaler: Latent, Version: v1.10.1")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(a1111, pnginfo=info)
    made = tmp_path / "made.png"
    assert generate("--from-png", a1111, "--model", model_file, "--precision", "fp32", "-q", "-o", made) == 0
    assert Image.open(made).size == (64, 64)
    assert read_parameters(made).extra["Hires upscaler"] == "Latent"


def test_preview_file_follows_the_sampling(model_file, tmp_path):
    """--preview rewrites one PNG (no parameters) with the first image's x̂_0 every --preview-every steps and at the
    last step of each pass; without --taesd it is the VAE's decode, so the last one is the image itself."""
    out, preview = tmp_path / "out.png", tmp_path / "preview.png"
    assert generate(PROMPT, "--model", model_file, "--precision", "fp32", "-q", "--steps", "4", "--seed", "2",
                    "--sampler", "euler", "--preview", preview, "--preview-every", "3", "-o", out) == 0
    assert Image.open(preview).size == (SIZE, SIZE) and "parameters" not in Image.open(preview).text
    assert np.array_equal(pixels(preview), pixels(out))  # Euler's last x̂_0 is the sample


def test_step_cache_round_trips_through_the_png(model_file, tmp_path):
    out = tmp_path / "cached.png"
    common = ("--model", model_file, "--precision", "fp32", "-q", "--steps", STEPS, "--seed", "6")
    assert generate(PROMPT, *common, "--step-cache", "2", "-o", out) == 0
    assert read_parameters(out).extra["Step cache"] == "2"
    again = tmp_path / "again.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "-o", again) == 0
    assert np.array_equal(pixels(out), pixels(again))


def test_sigma_churn_round_trips_through_the_png(model_file, tmp_path):
    out = tmp_path / "churn.png"
    common = ("--model", model_file, "--precision", "fp32", "-q", "--steps", STEPS, "--seed", "8")
    assert generate(PROMPT, *common, "--sampler", "Euler", "--schedule-type", "Karras", "--s-churn", "2",
                    "--s-tmax", "0", "-o", out) == 0
    extra = read_parameters(out).extra
    assert extra["Sigma churn"] == "2.0" and "Sigma tmax" not in extra  # 0: no bound, the default
    again = tmp_path / "again.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "-o", again) == 0
    assert np.array_equal(pixels(out), pixels(again))
    plain = tmp_path / "plain.png"
    assert generate("--from-png", out, "--model", model_file, "--precision", "fp32", "-q", "--s-churn", "0",
                    "-o", plain) == 0
    assert not np.array_equal(pixels(out), pixels(plain))
