"""U-Nets of SD's whole family as diffusers' UNet2DConditionModel configs describe them (kedavra.networks.unet_config):
per-level depths, heads and ResBlock counts, DownBlock2D levels, no mid block (BK-SDM), any level widths and SDXL's
"text_time" added embedding.

Oracles: diffusers' UNet2DConditionModel built from the same config dict with every parameter re-drawn under a fixed
seed, converted into kedavra through unet_keys from the diffusers layout; the original layout through tests/sd_keys.py
(written from openaimodel.py, independently of unet_keys) and diffusers' own original -> diffusers converter. Real
configs are the released unet/config.json files of SD 1.5, SD 2.1, SDXL base and refiner and BK-SDM-small, as dicts.
"""

import dataclasses
import inspect
import json

import pytest
import sd_keys
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from reference_models import randomize

from kedavra.networks.unet import UNet
from kedavra.networks.unet_config import DIFFUSERS_DEFAULTS, DIFFUSERS_FIXED, PRESETS, UNetConfig
from kedavra.networks.unet_keys import convert_unet_state_dict

REL_TOL = 1e-5  # fp32: max |ours - theirs| / max |theirs|, the brief's bound

# ---- released configs (unet/config.json, metadata keys dropped) ------------------------------------------------

SD15 = {  # runwayml/stable-diffusion-v1-5
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
}
SD21 = {  # stabilityai/stable-diffusion-2-1
    **SD15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "dual_cross_attention": False,
    "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True, "_diffusers_version": "0.10.0.dev0",
}
SDXL_BASE = {  # stabilityai/stable-diffusion-xl-base-1.0
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
}
SDXL_REFINER = {  # stabilityai/stable-diffusion-xl-refiner-1.0
    **SDXL_BASE, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
BK_SDM_SMALL = {**SD15, "layers_per_block": 1, "mid_block_type": None}  # nota-ai/bk-sdm-small

SDXL_BASE_CONFIG = UNetConfig(
    base_channels=320, channel_multipliers=(1, 2, 4), res_blocks_per_level=2, attention_per_level=(False, True, True),
    num_heads=None, head_dim=64, context_dim=2048, transformer_depth=(1, 2, 10), use_linear_projection=True,
    addition_time_embed_dim=256, addition_embed_input_dim=2816,  # 1280 pooled + 6 x 256
)
SDXL_REFINER_CONFIG = dataclasses.replace(
    SDXL_BASE_CONFIG, base_channels=384, channel_multipliers=(1, 2, 4, 4),
    attention_per_level=(False, True, True, False), context_dim=1280, transformer_depth=4,
    addition_embed_input_dim=2560,  # 1280 pooled + 5 x 256
)


@pytest.mark.parametrize(("config", "expected"), [
    (SD15, PRESETS["sd15"]),
    (SD21, PRESETS["sd21"]),
    (SDXL_BASE, SDXL_BASE_CONFIG),
    (SDXL_REFINER, SDXL_REFINER_CONFIG),
    (BK_SDM_SMALL, dataclasses.replace(PRESETS["sd15"], res_blocks_per_level=1, mid_block=False)),
], ids=["sd15", "sd21", "sdxl-base", "sdxl-refiner", "bk-sdm-small"])
def test_released_configs_map_to_the_expected_config(config, expected):
    assert UNetConfig.from_diffusers(config) == expected


def test_absent_keys_take_diffusers_defaults():
    signature = inspect.signature(UNet2DConditionModel.__init__).parameters
    for name, value in DIFFUSERS_DEFAULTS.items():
        default = signature[name].default
        assert (list(default) if isinstance(default, tuple) else default) == value, name
    for name, allowed in DIFFUSERS_FIXED.items():
        assert signature[name].default == allowed[0], name
    assert set(signature) - {"self"} == set(DIFFUSERS_DEFAULTS) | set(DIFFUSERS_FIXED) | {
        "sample_size", "addition_embed_type_num_heads"}
    # diffusers' default is SD 1.5's shape with a 1280-wide context
    assert UNetConfig.from_diffusers({}) == dataclasses.replace(PRESETS["sd15"], context_dim=1280)


@pytest.mark.parametrize(("field", "value"), [
    ("class_embed_type", "timestep"),
    ("encoder_hid_dim", 768),
    ("attention_type", "gated"),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("conv_in_kernel", 7),
    ("dual_cross_attention", True),
    ("only_cross_attention", True),
    ("flip_sin_to_cos", False),
    ("freq_shift", 1),
    ("time_cond_proj_dim", 256),
    ("addition_embed_type", "text"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D"] * 4),  # not the down blocks mirrored
    ("transformer_layers_per_block", [[1, 1], [2, 2], [1, 1], [1, 1]]),
    ("layers_per_block", [2, 2]),
    ("attention_head_dim", 7),  # divides no width
    ("block_out_channels", [320, 640]),
    ("unknown_field", 1),
])
def test_fields_outside_the_vocabulary_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        UNetConfig.from_diffusers({**SD15, field: value})


def test_text_time_needs_its_widths():
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=None"):
        UNetConfig.from_diffusers({**SDXL_BASE, "projection_class_embeddings_input_dim": None})


# ---- backward compatibility ---------------------------------------------------------------------------------------

NEW_FIELDS = ("block_out_channels", "mid_block", "norm_eps", "addition_time_embed_dim", "addition_embed_input_dim")


@pytest.mark.parametrize("name", [name for name, config in PRESETS.items() if config.addition_embed_input_dim is None])
def test_presets_read_from_json_without_the_new_fields(name):
    """A checkpoint written before the per-level fields holds only the old ones; it reads as the same config (the
    presets that existed then: SDXL's need the new fields)."""
    config = PRESETS[name]
    old = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(config))).items() if k not in NEW_FIELDS}
    assert UNetConfig(**old) == config
    assert UNetConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_config_checks_per_level_values():
    sd15 = PRESETS["sd15"]
    with pytest.raises(ValueError, match="transformer_depth"):
        dataclasses.replace(sd15, transformer_depth=(1, 2))
    with pytest.raises(ValueError, match="num_heads"):
        dataclasses.replace(sd15, num_heads=(8, 8, 8, 0))
    with pytest.raises(ValueError, match="channel_multipliers must be None"):
        dataclasses.replace(sd15, block_out_channels=(320, 480, 960, 960))
    with pytest.raises(ValueError, match="addition_embed_input_dim"):
        dataclasses.replace(sd15, addition_time_embed_dim=256)


# ---- full size on the meta device ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SDXL_BASE, SDXL_REFINER, BK_SDM_SMALL], ids=["sdxl-base", "sdxl-refiner", "bk"])
def test_full_size_names_and_shapes_on_meta(config):
    """Every diffusers tensor of the full-size model lands on one of ours, shape for shape, in both layouts."""
    ours = UNetConfig.from_diffusers(config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config).state_dict()
        model = UNet(ours)
    for layout in ("diffusers", "ldm"):
        state = ref if layout == "diffusers" else diffusers_to_ldm(ref, ours)
        model.load_state_dict(convert_unet_state_dict(state, layout, ours), strict=True, assign=True)
    if config is SDXL_BASE:
        assert sum(t.numel() for t in ref.values()) == 2_567_463_684  # SDXL base's U-Net
        ldm = diffusers_to_ldm(ref, ours)
        # Names from sd_xl_base_1.0.safetensors: input_blocks 0..8, the level without attention first.
        for key in ("input_blocks.3.0.op.weight", "input_blocks.4.1.proj_in.weight", "input_blocks.8.1.transformer_"
                    "blocks.9.attn2.to_k.weight", "middle_block.1.transformer_blocks.9.ff.net.2.bias",
                    "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_"
                    "connection.weight", "label_emb.0.0.weight", "label_emb.0.2.bias"):
            assert key in ldm, key
        assert ldm["input_blocks.4.1.proj_in.weight"].shape == (640, 640)  # Linear, as sgm stores it
        assert "input_blocks.9.0.in_layers.0.weight" not in ldm and "input_blocks.1.1.norm.weight" not in ldm


# ---- parity on tiny configs ---------------------------------------------------------------------------------------

TINY = dict(block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, attention_head_dim=4,
            cross_attention_dim=24, norm_num_groups=8)
TINY_SDXL = dict(  # SDXL's shape: a first level without attention, deeper transformers further down, Linear proj
    block_out_channels=[32, 64, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4], cross_attention_dim=40,
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8, upcast_attention=None,
)
TINY_REFINER = {**TINY_SDXL, "block_out_channels": [32, 64, 64, 96], "attention_head_dim": [2, 4, 4, 6],
                "down_block_types": TINY_SDXL["down_block_types"] + ["DownBlock2D"], "transformer_layers_per_block": 2,
                "up_block_types": ["UpBlock2D"] + TINY_SDXL["up_block_types"],
                "projection_class_embeddings_input_dim": 16 + 5 * 8}
CASES = {
    "sdxl": TINY_SDXL,
    "refiner": TINY_REFINER,  # the mid block attends at a level that does not
    "no-mid-block": {**TINY, "mid_block_type": None, "layers_per_block": 2},
    "heads-per-level": {**TINY, "down_block_types": ["CrossAttnDownBlock2D"] * 2,
                        "up_block_types": ["CrossAttnUpBlock2D"] * 2, "attention_head_dim": [2, 8]},
    "per-level-resnets": {**TINY_SDXL, "layers_per_block": [1, 2, 1], "transformer_layers_per_block": [1, 2, 1]},
    "odd-widths": {**TINY, "block_out_channels": [32, 48], "attention_head_dim": [4, 3], "norm_eps": 1e-6},
    "sd15": {**TINY, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 2, "attention_head_dim": 4,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
    "sd21": {**TINY, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 2, "attention_head_dim": [2, 4, 4, 4],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "use_linear_projection": True,
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "upcast_attention": True},
}


def reference(config: dict, seed: int = 0) -> UNet2DConditionModel:
    model = UNet2DConditionModel(**config)
    randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


def kedavra_from(state: dict, config: UNetConfig, layout: str) -> UNet:
    with torch.device("meta"):
        ours = UNet(config)
    ours.load_state_dict(convert_unet_state_dict(state, layout, config), strict=True, assign=True)
    return ours.eval()


def diffusers_to_ldm(state: dict, config: UNetConfig) -> dict:
    """diffusers names -> the original's, through ours (checked by the parity tests) and sd_keys' independent map."""
    modules = sd_keys.unet_modules(config)
    converted = convert_unet_state_dict(state, "diffusers", config)
    return {sd_keys.unet_key(k, modules): v for k, v in converted.items()}


def inputs(config: UNetConfig, batch: int = 2, size: tuple[int, int] = (12, 10)):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, *size, generator=generator)
    context = torch.randn(batch, 7, config.context_dim, generator=generator)
    added = None
    if config.has_added_embedding:
        n = (config.addition_embed_input_dim - 16) // config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, 16, generator=generator),
                 "time_ids": torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0][:n]] * batch)}
    return x, context, added


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers_in_both_layouts(name):
    config = CASES[name]
    ours_config = UNetConfig.from_diffusers(config)
    ref = reference(config)
    x, context, added = inputs(ours_config)
    t = torch.tensor([13.5, 870.0])
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs=added).sample
        assert expected.abs().max() > 0.1
        for layout in ("diffusers", "ldm"):
            state = ref.state_dict() if layout == "diffusers" else diffusers_to_ldm(ref.state_dict(), ours_config)
            got = kedavra_from(state, ours_config, layout)(x, t, context, added)
            relative = ((got - expected).abs().max() / expected.abs().max()).item()
            assert relative < REL_TOL, (layout, relative)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not isinstance(c.get("layers_per_block"), list)])
def test_original_layout_agrees_with_diffusers_converter(name):
    """diffusers' original -> diffusers converter (which reads SDXL's label_emb and missing attention, with one
    ResBlock count for every level) undoes sd_keys' map, tensor for tensor."""
    config = CASES[name]
    ours_config = UNetConfig.from_diffusers(config)
    with torch.device("meta"):
        ref_state = UNet2DConditionModel(**config).state_dict()
    ldm = diffusers_to_ldm(ref_state, ours_config)
    back = convert_ldm_unet_checkpoint({sd_keys.UNET_PREFIX + k: v for k, v in ldm.items()},
                                       {**config, "layers_per_block": config.get("layers_per_block", 2)})
    assert back.keys() == ref_state.keys()
    assert all(back[k] is ref_state[k] for k in ref_state)


def test_sdxl_added_embedding_is_what_the_paper_adds():
    """emb = time MLP(sinusoids(t)) + add MLP([pooled text, sinusoids(each time id)]): zeroing the add MLP's last
    layer removes the micro-conditioning's effect entirely; otherwise a crop coordinate changes the output."""
    config = UNetConfig.from_diffusers(TINY_SDXL)
    ours = kedavra_from(reference(TINY_SDXL).state_dict(), config, "diffusers")
    x, context, added = inputs(config)
    moved = {**added, "time_ids": added["time_ids"] + torch.tensor([0.0, 0, 0, 64, 0, 0])}
    with torch.no_grad():
        assert not torch.equal(ours(x, 5.0, context, added), ours(x, 5.0, context, moved))
        ours.add_embedding.linear_2.weight.zero_()
        ours.add_embedding.linear_2.bias.zero_()
        assert torch.equal(ours(x, 5.0, context, added), ours(x, 5.0, context, moved))


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: None, r"needs added_cond with exactly the keys \['text_embeds', 'time_ids'\]"),
    (lambda a: {"text_embeds": a["text_embeds"]}, r"exactly the keys .*got \['text_embeds'\]"),
    (lambda a: {**a, "extra": a["time_ids"]}, r"exactly the keys .*'extra'"),
    (lambda a: {**a, "time_ids": a["time_ids"][:, :5]}, r"P \+ n \* 8 = 64 .*got shapes \(2, 16\) and \(2, 5\)"),
    (lambda a: {**a, "text_embeds": a["text_embeds"][:1]}, r"B=2"),
])
def test_added_conditioning_is_checked(change, message):
    config = UNetConfig.from_diffusers(TINY_SDXL)
    with torch.device("meta"):
        ours = UNet(config)
    x, context, added = inputs(config)
    with pytest.raises(ValueError, match=message):
        ours(x.to("meta"), 5.0, context.to("meta"), change(added))


def test_a_unet_without_added_embedding_refuses_added_conditioning():
    config = UNetConfig.from_diffusers(TINY)
    ours = UNet(config)
    x, context, _ = inputs(config)
    with pytest.raises(ValueError, match="added_cond must be None"):
        ours(x, 5.0, context, {"text_embeds": torch.zeros(2, 16), "time_ids": torch.zeros(2, 6)})
