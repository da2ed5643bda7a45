"""Tests for kedavra.networks.taesd: parity with diffusers' AutoencoderTiny and with taesd.py's nn.Sequential layout,
loading diffusers folders and the original single files, the refusals, and the preview helper."""

import base64
import dataclasses
import functools
import io
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderTiny
from PIL import Image
from random_models import tiny_model
from torch import nn

from kedavra.formats.images import to_pil
from kedavra.networks.model import ModelConfig, StableDiffusion
from kedavra.networks.taesd import (
    TINY_AUTOENCODER_PRESETS,
    TinyAutoencoder,
    TinyAutoencoderConfig,
    get_tiny_autoencoder_config,
    load_tiny_autoencoder,
)
from kedavra.pipeline.pipeline import Pipeline
from kedavra.serving.worker import preview_png

PARITY_ATOL = 1e-5  # fp32, from the brief; the op sequence is diffusers', so the measured error is 0
WIDTH = 8  # every stage's width in the fast tests (TAESD's is 64)
SMALL = dict(encoder_block_out_channels=(WIDTH,) * 4, decoder_block_out_channels=(WIDTH,) * 4)
# madebyollin/taesd README, "Comparison table": parameters of TAESD's encoder and decoder (4 latent channels).
TAESD_ENCODER_PARAMETERS, TAESD_DECODER_PARAMETERS = 1_222_532, 1_222_531

torch.set_num_threads(1)


@functools.cache
def reference(latent_channels: int = 4) -> AutoencoderTiny:
    """diffusers' AutoencoderTiny with WIDTH-wide stages and seeded random weights."""
    torch.manual_seed(0)
    return AutoencoderTiny(latent_channels=latent_channels, **SMALL).eval()


def inputs(latent_channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (2, 3, 32, 32) in [-1, 1] and latents (2, C_z, 4, 4) of SD's spread, some beyond the ±3 soft clamp."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    latents = torch.randn(2, latent_channels, 4, 4, generator=generator) * 3
    return images, latents


def ours_like(model: AutoencoderTiny) -> TinyAutoencoder:
    ours = TinyAutoencoder(TinyAutoencoderConfig.from_diffusers(dict(model.config)))
    ours.load_state_dict(model.state_dict())
    return ours.eval()


@torch.no_grad()
def assert_same_as_reference(ours: TinyAutoencoder, model: AutoencoderTiny, latent_channels: int = 4,
                             parts=("encoder", "decoder")) -> None:
    images, latents = inputs(latent_channels)
    if "decoder" in parts:
        expected = model.decode(latents).sample
        assert expected.std() > 1e-3  # random weights that do something, so the comparison can fail
        torch.testing.assert_close(ours.decode(latents), expected, atol=PARITY_ATOL, rtol=0)
    if "encoder" in parts:
        expected = model.encode(images).latents
        assert expected.std() > 1e-3
        torch.testing.assert_close(ours.encode(images), expected, atol=PARITY_ATOL, rtol=0)


# taesd.py (madebyollin/taesd) Encoder / Decoder, with the width a parameter (64 there) so tests stay fast.
class OriginalClamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class OriginalBlock(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        self.skip, self.fuse = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


def original_encoder(latent_channels: int, w: int) -> nn.Sequential:
    blocks = [OriginalBlock(w) for _ in range(9)]
    return nn.Sequential(conv(3, w), OriginalBlock(w), conv(w, w, stride=2, bias=False), *blocks[:3],
                         conv(w, w, stride=2, bias=False), *blocks[3:6], conv(w, w, stride=2, bias=False),
                         *blocks[6:], conv(w, latent_channels))


def original_decoder(latent_channels: int, w: int) -> nn.Sequential:
    blocks = [OriginalBlock(w) for _ in range(9)]
    up = [lambda: nn.Upsample(scale_factor=2), lambda: conv(w, w, bias=False)]
    return nn.Sequential(OriginalClamp(), conv(latent_channels, w), nn.ReLU(), *blocks[:3], *(f() for f in up),
                         *blocks[3:6], *(f() for f in up), *blocks[6:], *(f() for f in up), OriginalBlock(w),
                         conv(w, 3))


def original_state_dicts(model: AutoencoderTiny) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' state dict in taesd.py's names: the inverse of diffusers'
    scripts/convert_tiny_autoencoder_to_diffusers.py (encoder indices kept, decoder indices + 1)."""
    state, parts = model.state_dict(), {"encoder": {}, "decoder": {}}
    for key, tensor in state.items():
        part, _, index, rest = key.split(".", 3)  # "decoder", "layers", N, "conv.0.weight"
        parts[part][f"{int(index) + (part == 'decoder')}.{rest}"] = tensor
    return parts


def save(state: dict[str, torch.Tensor], path) -> None:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


# ---------------------------------------------------------------------------------------------------
# Architecture


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_parity_with_diffusers(latent_channels):
    model = reference(latent_channels)
    assert_same_as_reference(ours_like(model), model, latent_channels)


def test_default_shapes_match_diffusers_and_taesd_readme():
    ours, theirs = TinyAutoencoder(TINY_AUTOENCODER_PRESETS["taesd"]).state_dict(), AutoencoderTiny().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    model = TinyAutoencoder(TinyAutoencoderConfig())
    assert sum(p.numel() for p in model.encoder.parameters()) == TAESD_ENCODER_PARAMETERS
    assert sum(p.numel() for p in model.decoder.parameters()) == TAESD_DECODER_PARAMETERS


def test_presets():
    assert get_tiny_autoencoder_config("taesdxl") == get_tiny_autoencoder_config("taesd")  # only the weights differ
    assert get_tiny_autoencoder_config("taef1").latent_channels == 16
    with pytest.raises(ValueError, match="'taesdx'.*taesd, taesdxl"):
        get_tiny_autoencoder_config("taesdx")


@torch.no_grad()
def test_decoder_soft_clamps_its_input_to_three():
    """decode(z) = 2 · layers(tanh(z / 3) · 3) - 1: latents far beyond ±3 reach the layers as ±3 exactly (tanh
    saturates to 1 in fp32); within, the clamp is soft."""
    ours = ours_like(reference())
    _, latents = inputs()
    layers = ours.decoder.layers
    torch.testing.assert_close(ours.decode(latents), layers(torch.tanh(latents / 3) * 3) * 2 - 1, atol=0, rtol=0)
    torch.testing.assert_close(ours.decode(latents * 1e4), layers(latents.sign() * 3) * 2 - 1, atol=0, rtol=0)
    assert not torch.equal(ours.decode(latents), layers(latents.clamp(-3, 3)) * 2 - 1)  # soft, not a hard clamp


def test_latent_png_scaling_matches_diffusers():
    model, ours = reference(), ours_like(reference())
    _, latents = inputs()
    torch.testing.assert_close(ours.scale_latents(latents), model.scale_latents(latents), atol=0, rtol=0)
    unit = torch.linspace(0, 1, 11)
    torch.testing.assert_close(ours.unscale_latents(unit), model.unscale_latents(unit), atol=0, rtol=0)
    torch.testing.assert_close(ours.unscale_latents(unit), torch.linspace(-3, 3, 11))  # ±latent_magnitude


@torch.no_grad()
def test_unequal_widths_chain_stages():
    config = TinyAutoencoderConfig(encoder_block_out_channels=(4, 8, 8, 6), decoder_block_out_channels=(6, 8, 4, 4),
                                   num_encoder_blocks=(1, 1, 0, 1), num_decoder_blocks=(1, 0, 1, 1))
    images, latents = inputs()
    model = TinyAutoencoder(config)
    assert model.encode(images).shape == (2, 4, 4, 4)
    assert model.decode(latents).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("changes, message", [
    (dict(latent_channels=0), r"latent_channels must be an integer >= 1, got 0"),
    (dict(encoder_block_out_channels=[64] * 4), r"encoder_block_out_channels must be a non-empty tuple"),
    (dict(num_decoder_blocks=(3, 3, 1)), r"decoder_block_out_channels .* one entry per stage each, got 4 and 3"),
    (dict(num_encoder_blocks=(1, -1, 3, 3)), r"num_encoder_blocks must be a non-empty tuple of ints >= 0"),
    (dict(scaling_factor=0.0), r"scaling_factor must be a finite number > 0, got 0.0"),
    (dict(latent_magnitude=float("nan")), r"latent_magnitude must be a finite number > 0"),
    (dict(upsampling_scaling_factor=True), r"upsampling_scaling_factor must be an integer"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        TinyAutoencoderConfig(**changes)


@pytest.mark.parametrize("config, message", [
    ({"_class_name": "AutoencoderKL"}, r"_class_name 'AutoencoderKL' is not a tiny autoencoder"),
    ({"act_fn": "silu"}, r"act_fn='silu' is not supported; allowed: 'relu'"),
    ({"upsample_fn": "bilinear"}, r"upsample_fn='bilinear' is not supported; allowed: 'nearest'"),
])
def test_from_diffusers_refusals(config, message):
    with pytest.raises(ValueError, match=message):
        TinyAutoencoderConfig.from_diffusers(config)


# ---------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("safe", [True, False])
def test_diffusers_folder(tmp_path, safe):
    model = reference(16)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    loaded = load_tiny_autoencoder(tmp_path)
    assert loaded.config == TinyAutoencoderConfig(latent_channels=16, **SMALL)
    assert_same_as_reference(loaded, model, 16)


def test_original_names_are_taesd_py_layout():
    """The names built from diffusers' conversion rule are exactly taesd.py's Sequential names and shapes."""
    names = original_state_dicts(reference())
    for part, build in (("encoder", original_encoder), ("decoder", original_decoder)):
        original = build(4, WIDTH).state_dict()
        assert {k: v.shape for k, v in names[part].items()} == {k: v.shape for k, v in original.items()}
    assert "1.weight" in names["decoder"] and "3.conv.0.weight" in names["decoder"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_single_files(tmp_path, suffix):
    model = reference()
    for part, state in original_state_dicts(model).items():
        path = tmp_path / f"taesd_{part}{suffix}"
        save(state, path)
        loaded = load_tiny_autoencoder(path)
        assert loaded.config == TinyAutoencoderConfig(**SMALL)
        assert_same_as_reference(loaded, model, parts=(part,))


@torch.no_grad()
def test_taesd_py_modules_run_the_same(tmp_path):
    """Weights of taesd.py's own Sequential modules (not converted from diffusers) give their outputs."""
    torch.manual_seed(2)
    encoder, decoder = original_encoder(16, WIDTH), original_decoder(16, WIDTH)
    torch.save(encoder.state_dict(), tmp_path / "taef1_encoder.pth")
    torch.save(decoder.state_dict(), tmp_path / "taef1_decoder.pth")
    images, latents = inputs(16)
    expected = decoder(latents).mul(2).sub(1)  # taesd.py's [0, 1] -> [-1, 1]
    assert expected.std() > 1e-3
    loaded = load_tiny_autoencoder(tmp_path / "taef1_decoder.pth", latent_channels=16)
    torch.testing.assert_close(loaded.decode(latents), expected, atol=PARITY_ATOL, rtol=0)
    loaded = load_tiny_autoencoder(tmp_path / "taef1_encoder.pth")
    torch.testing.assert_close(loaded.encode(images), encoder((images + 1) / 2), atol=PARITY_ATOL, rtol=0)


def test_diffusers_names_in_one_file(tmp_path):
    save(reference().state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    assert_same_as_reference(load_tiny_autoencoder(tmp_path / "diffusion_pytorch_model.safetensors"), reference())


def test_decoder_only_file_refuses_encode(tmp_path):
    save(original_state_dicts(reference())["decoder"], tmp_path / "taesd_decoder.pth")
    model = load_tiny_autoencoder(tmp_path / "taesd_decoder.pth")
    assert model.encoder is None
    with pytest.raises(ValueError, match="no encoder: it was built decoder-only.*to encode"):
        model.encode(inputs()[0])


def test_encoder_only_file_refuses_decode(tmp_path):
    save(original_state_dicts(reference())["encoder"], tmp_path / "taesd_encoder.safetensors")
    model = load_tiny_autoencoder(tmp_path / "taesd_encoder.safetensors")
    with pytest.raises(ValueError, match="no decoder: it was built encoder-only"):
        model.decode(inputs()[1])


def test_file_of_another_architecture(tmp_path):
    path = tmp_path / "model.safetensors"
    save({"conv_first.weight": torch.zeros(4, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a TAESD file \(keys like body\.0\.rdb1\.conv1"
                                         r"\.weight, conv_first\.weight\)"):
        load_tiny_autoencoder(path)


def test_sequential_file_of_another_shape(tmp_path):
    state = original_state_dicts(reference())["decoder"]
    state["3.conv.0.weight"] = torch.zeros(8, 8, 1, 1)
    save(state, tmp_path / "taesd_decoder.pth")
    with pytest.raises(ValueError, match=r"taesd_decoder\.pth: decoder layers\.2\.conv\.0\.weight has shape "
                                         r"\(8, 8, 1, 1\), TinyDecoder needs \(8, 8, 3, 3\)"):
        load_tiny_autoencoder(tmp_path / "taesd_decoder.pth")
    del state["3.conv.0.weight"]
    save(state, tmp_path / "taesd_decoder.pth")
    with pytest.raises(ValueError, match=r"do not match TAESD's TinyDecoder: 1 missing keys \[layers\.2\.conv\.0"):
        load_tiny_autoencoder(tmp_path / "taesd_decoder.pth")


def test_latent_channels_must_agree(tmp_path):
    save(original_state_dicts(reference())["decoder"], tmp_path / "taesd_decoder.pth")
    with pytest.raises(ValueError, match="with 4 latent channels, latent_channels=16 was asked for"):
        load_tiny_autoencoder(tmp_path / "taesd_decoder.pth", latent_channels=16)


def test_folder_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tiny_autoencoder(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="a folder without config.json"):
        load_tiny_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(FileNotFoundError, match="config.json but no weights; expected diffusion_pytorch_model"):
        load_tiny_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match=r"config\.json: _class_name 'AutoencoderKL' is not a tiny autoencoder"):
        load_tiny_autoencoder(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Preview


def test_preview_is_to_pil_of_decode():
    ours = ours_like(reference())
    _, latents = inputs()
    images = ours.preview(latents.double())  # any dtype in: cast to the decoder's
    assert [image.size for image in images] == [(32, 32)] * 2
    with torch.no_grad():
        expected = to_pil(ours.decode(latents))
    assert [image.tobytes() for image in images] == [image.tobytes() for image in expected]


def test_preview_runs_in_the_decoders_dtype_and_applies_the_pipeline_scaling():
    config = TinyAutoencoderConfig(scaling_factor=2.0, shift_factor=0.5, **SMALL)
    ours = TinyAutoencoder(config, encoder=False)
    ours.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in reference().state_dict().items()
                                  if k.startswith("decoder.")})
    ours = ours.to(torch.bfloat16)
    _, latents = inputs()
    images = ours.preview(latents)
    with torch.no_grad():
        expected = to_pil(ours.decode((latents / 2 + 0.5).to(torch.bfloat16)))  # scaled in the input's dtype
    assert [image.tobytes() for image in images] == [image.tobytes() for image in expected]


def f8_pipeline() -> Pipeline:
    """A tiny random model whose VAE has SD's factor 8 (TAESD's), fp32."""
    tiny = ModelConfig.from_preset("tiny")
    vae = dataclasses.replace(tiny.vae, channel_multipliers=(1, 1, 2, 2))
    torch.manual_seed(0)
    return Pipeline(StableDiffusion(dataclasses.replace(tiny, family="tiny-f8", vae=vae)), dtype="fp32")


def test_pipeline_and_server_previews_decode_with_taesd(tmp_path):
    """pipe.load_preview_decoder: pipe.preview (the CLI's --preview, the server's /progress image) is TAESD's decode
    of the latents, not the VAE's; a model of another latent factor is refused, naming both."""
    reference().save_pretrained(tmp_path / "taesd")
    pipe = f8_pipeline()
    latents = inputs()[1][:1]
    vae_preview = np.asarray(pipe.preview(latents)[0])
    pipe.load_preview_decoder(tmp_path / "taesd")
    with torch.no_grad():
        expected = np.asarray(to_pil(reference().decode(latents).sample)[0])
    assert np.array_equal(np.asarray(pipe.preview(latents)[0]), expected)
    assert not np.array_equal(vae_preview, expected)
    served = Image.open(io.BytesIO(base64.b64decode(preview_png(pipe, latents)))).convert("RGB")
    assert np.array_equal(np.asarray(served), expected)
    with pytest.raises(ValueError, match="4-channel latents at 1/8 scale; tiny's are 4-channel at 1/2"):
        Pipeline(tiny_model(), dtype="fp32").load_preview_decoder(tmp_path / "taesd")
