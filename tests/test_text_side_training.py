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
from kedavra.training.stages import stage_configs, timestep_range


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
