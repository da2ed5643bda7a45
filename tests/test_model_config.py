"""ModelConfig and StableDiffusion (kedavra/networks/model.py): the presets and the JSON round trip every checkpoint
relies on, refusals of bad values and of components that do not fit, and full-size builds on the meta device against
the reference implementations' parameter counts (tests/reference_models.py)."""

import dataclasses
import json

import pytest
import torch
from reference_models import reference_models

from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json_exactly(name):
    config = PRESETS[name]
    assert config.family == name
    back = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert back.unet.channel_multipliers == config.unet.channel_multipliers  # a tuple again, not a list


def test_preset_facts():
    assert PRESETS["sd21"].prediction_type == "v" and PRESETS["sd21"].image_size == 768  # v2-inference-v.yaml
    assert PRESETS["sd21-base"].prediction_type == "eps" and PRESETS["sd21-base"].image_size == 512
    assert PRESETS["sd15-inpaint"].inpainting and PRESETS["sd21-inpaint"].inpainting and not PRESETS["sd15"].inpainting
    for config in PRESETS.values():
        assert sum(text.width for text in config.text_encoders) == config.unet.context_dim
        assert (config.spacing, config.steps_offset) == ("leading", 1)  # SD's scheduler_config.json


def test_config_from_dict_rejects_unknown_and_missing_keys():
    data = PRESETS["tiny"].to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\] in ModelConfig;"):
        ModelConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['heads'\] in ModelConfig.unet; allowed: .*num_heads"):
        ModelConfig.from_dict({**data, "unet": {**data["unet"], "heads": 3}})
    with pytest.raises(ValueError, match="lacks the 'vae' section"):
        ModelConfig.from_dict({k: v for k, v in data.items() if k != "vae"})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prediction_type": "x0"}, "prediction_type must be one of"),
        ({"spacing": "even"}, "spacing must be one of"),
        ({"image_size": 30}, "image_size must be a positive multiple of 4"),
        ({"family": ""}, "family must be a non-empty str"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["tiny"], **changes)


def test_config_rejects_components_that_do_not_fit():
    tiny = PRESETS["tiny"]
    with pytest.raises(ValueError, match="text encoder width 768 must equal the U-Net's context_dim 64"):
        dataclasses.replace(tiny, text_encoder=PRESETS["sd15"].text_encoder)
    with pytest.raises(ValueError, match="do not fit the VAE's 4 latent channels"):
        dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, in_channels=5))


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_model_builds_on_meta_with_the_reference_parameter_count(name):
    config = PRESETS[name]
    with torch.device("meta"):
        model = StableDiffusion(config)
    assert all(p.is_meta for p in model.parameters())
    refs = reference_models(config, device="meta")
    for ours, ref in zip((model.text_encoder, model.unet, model.vae), refs, strict=True):
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    if name == "sd15":  # SD 1.5: 123,060,480 text + 859,520,964 U-Net + 83,653,863 VAE
        assert sum(p.numel() for p in model.parameters()) == 1_066_235_307
