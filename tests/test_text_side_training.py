"""Training options for where layouts are decided (issue 19): the CLIP text encoder without its causal mask
(`TextEncoderConfig.causal`, `kedavra train --bidirectional-text`) and the range the unet stage draws its timesteps
from (`--min-timestep` / `--max-timestep`, kohya sd-scripts' names): configs, refusals, and runs that use them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_training import Squares, small_config

from kedavra.checkpoint import load_model
from kedavra.commands.demo import torch_threads
from kedavra.networks.model import PRESETS, ModelConfig
from kedavra.networks.text_encoder import TextEncoder, TextEncoderConfig
from kedavra.training import TrainConfig, train
from kedavra.training.models import model_config_for
from kedavra.training.stages import stage_configs
from kedavra.training.timestep_sampling import sample_timesteps, timestep_range


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_bidirectional_encoder_lets_early_tokens_see_later_ones():
    """The known answer: with the mask, token 1's state does not depend on token 5; without it, it does; the two
    configs give the same weights the same state at the last token only when nothing follows it."""
    causal = TextEncoderConfig.from_preset("tiny")
    torch.manual_seed(0)
    encoder = TextEncoder(causal).eval()
    bidirectional = TextEncoder(dataclasses.replace(causal, causal=False)).eval()
    bidirectional.load_state_dict(encoder.state_dict())
    ids = torch.tensor([[49406, 320, 736, 2446, 320, 1901, 3999, 49407]])  # start token, six ids, end token
    changed = ids.clone()
    changed[0, 5] = 1155
    with torch.no_grad():
        assert torch.equal(encoder(ids)[0, :5], encoder(changed)[0, :5])
        assert (bidirectional(ids)[0, 1] - bidirectional(changed)[0, 1]).abs().max() > 1e-3
        assert not torch.allclose(bidirectional(ids)[0, 1], encoder(ids)[0, 1])


def test_causal_config_checks_and_travels():
    assert all(getattr(p.text_encoder, "causal", True) for p in PRESETS.values())
    with pytest.raises(ValueError, match="TextEncoderConfig.causal"):
        TextEncoderConfig(causal="no")
    config = dataclasses.replace(PRESETS["small"], text_encoder=dataclasses.replace(PRESETS["small"].text_encoder,
                                                                                    causal=False))
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert "2x64 bidirectional," in config.describe() and "bidirectional" not in PRESETS["small"].describe()
    data = PRESETS["small"].to_dict()
    data["text_encoder"].pop("causal")  # a checkpoint saved before the field existed
    assert ModelConfig.from_dict(data).text_encoder.causal is True


@pytest.mark.parametrize(("changes", "message"), [
    ({"stage": "vae"}, r"bidirectional_text=True \(--bidirectional-text\).*got stage 'vae'"),
    ({"stage": "unet", "init": "kedavra-shapes"}, r"without init.*init 'kedavra-shapes'"),
    ({"stage": "unet", "vae": "v.safetensors", "text_encoder": "minilm"}, "text_encoder 'minilm'"),
])
def test_bidirectional_text_is_for_clip_from_scratch(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, bidirectional_text=True, **changes)
    with pytest.raises(ValueError, match="bidirectional_text must be"):
        small_config(tmp_path, bidirectional_text=1)


def test_stage_all_gives_the_text_and_timestep_options_to_the_unet_stage_only(tmp_path):
    vae, unet = stage_configs(TrainConfig(preset="small", stage="all", bidirectional_text=True, min_timestep=500,
                                          max_timestep=900, out_dir=str(tmp_path)))
    assert (vae.bidirectional_text, vae.min_timestep, vae.max_timestep) == (False, 0, None)
    assert (unet.bidirectional_text, unet.min_timestep, unet.max_timestep) == (True, 500, 900)
    assert model_config_for(unet).text_encoder.causal is False
    assert model_config_for(dataclasses.replace(unet, bidirectional_text=False)).text_encoder.causal is True


@pytest.mark.parametrize(("changes", "message"), [
    ({"min_timestep": -1}, r"min_timestep must be an integer >= 0, got -1"),
    ({"min_timestep": 1.5}, r"min_timestep must be an integer >= 0, got 1.5"),
    ({"min_timestep": 700, "max_timestep": 700}, r"max_timestep must be an integer \(more than min_timestep 700"),
    ({"max_timestep": 0}, r"max_timestep must be an integer \(more than min_timestep 0.*got 0"),
    ({"stage": "vae", "vae": None, "min_timestep": 10}, r"stage 'vae' draws no timesteps"),
])
def test_timestep_range_is_checked(tmp_path, changes, message):
    settings = {"stage": "unet", "vae": "v.safetensors"} | changes
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **settings)


def test_timestep_range_against_the_schedule(tmp_path):
    config = small_config(tmp_path, stage="unet", vae="v.safetensors")
    assert timestep_range(config, 1000) == (0, 1000)
    assert timestep_range(dataclasses.replace(config, min_timestep=700), 1000) == (700, 1000)
    assert timestep_range(dataclasses.replace(config, max_timestep=1000), 1000) == (0, 1000)
    for bad in ({"max_timestep": 1001}, {"min_timestep": 1000}):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1000\]: the model's schedule has 1000"):
            timestep_range(dataclasses.replace(config, **bad), 1000)


def test_a_run_draws_its_timesteps_from_the_range_and_exports_a_bidirectional_model(tmp_path, monkeypatch):
    seen = []
    original = torch.randint

    def recording_randint(low, high, size, **kwargs):
        values = original(low, high, size, **kwargs)
        seen.append((low, high, values.clone()))
        return values

    vae = train(small_config(tmp_path / "vae", steps=2), dataset=Squares())[0].model_path
    monkeypatch.setattr(torch, "randint", recording_randint)
    result = train(small_config(tmp_path / "unet", stage="unet", vae=str(vae), steps=3, min_timestep=990,
                                bidirectional_text=True), dataset=Squares())[0]
    drawn = [values for low, high, values in seen if (low, high) == (990, 1000)]
    assert len(drawn) == 3 and all(((v >= 990) & (v < 1000)).all() for v in drawn)
    assert all((low, high) != (0, 1000) for low, high, _ in seen)
    model = load_model(result.model_path)
    assert model.config.text_encoder.causal is False and model.text_encoder.layers[0].attn.causal is False


def test_uniform_sampling_draws_what_randint_draws(tmp_path):
    """The default keeps every run's random stream: the same numbers as torch.randint from the same generator."""
    config = small_config(tmp_path, stage="unet", vae="v.safetensors")
    got = sample_timesteps(config, 0, 1000, 64, torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))


def test_logit_normal_sampling_is_the_sigmoid_of_a_normal(tmp_path):
    """The known answer: t = ⌊sigmoid(m + s n) T⌋ for the generator's normals n (Esser et al. 2024, eq. 19); with
    m = 1 the median is ⌊sigmoid(1) T⌋ = 731, and a sub-range [low, high) maps u onto it."""
    config = small_config(tmp_path, stage="unet", vae="v.safetensors", timestep_sampling="logit-normal",
                          logit_mean=1.0, logit_std=0.5)
    got = sample_timesteps(config, 0, 1000, 4096, torch.Generator().manual_seed(0))
    n = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(got, (torch.sigmoid(1.0 + 0.5 * n) * 1000).floor().long())
    assert abs(got.float().median().item() - 731) <= 6
    ranged = sample_timesteps(config, 700, 1000, 4096, torch.Generator().manual_seed(0))
    assert torch.equal(ranged, 700 + (torch.sigmoid(1.0 + 0.5 * n) * 300).floor().long())
    assert ranged.min() >= 700 and ranged.max() <= 999


def test_mode_sampling_matches_eq_20_and_its_ends(tmp_path):
    """f(u) = 1 - u - c (cos²(πu/2) - 1 + u): f(0) = 1 and f(1) = 0 for every c; c = 0 is uniform in reverse;
    c > 0 draws the middle more often than the ends."""
    for scale in (0.0, 1.29, -1.0):
        config = small_config(tmp_path, stage="unet", vae="v.safetensors", timestep_sampling="mode", mode_scale=scale)
        got = sample_timesteps(config, 0, 1000, 8192, torch.Generator().manual_seed(1))
        u = torch.rand(8192, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        f = 1 - u - scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
        assert torch.equal(got, (f * 1000).floor().long().clamp(0, 999))
        middle = ((got >= 250) & (got < 750)).float().mean().item()
        if scale == 1.29:
            assert middle > 0.6
        elif scale == 0.0:
            assert abs(middle - 0.5) < 0.03


@pytest.mark.parametrize(("changes", "message"), [
    ({"timestep_sampling": "cosmap"}, r"unknown timestep_sampling 'cosmap'; allowed: uniform, logit-normal, mode"),
    ({"logit_mean": 1.0}, r"logit_mean=1.0 \(--logit-mean\) shapes the 'logit-normal' timestep density; "
                          r"timestep_sampling is 'uniform'"),
    ({"timestep_sampling": "logit-normal", "mode_scale": 0.5}, r"mode_scale=0.5 \(--mode-scale\) shapes the 'mode'"),
    ({"timestep_sampling": "logit-normal", "logit_std": 0.0}, r"logit_std must be a finite number > 0.0, got 0.0"),
    ({"timestep_sampling": "mode", "mode_scale": 2.0}, r"mode_scale must be a .*number.*-1.0.*1.75.*got 2.0"),
    ({"stage": "vae", "vae": None, "timestep_sampling": "mode"}, r"stage 'vae' draws no timesteps"),
])
def test_timestep_sampling_is_checked(tmp_path, changes, message):
    settings = {"stage": "unet", "vae": "v.safetensors"} | changes
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **settings)
