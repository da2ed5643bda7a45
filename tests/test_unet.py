"""Tests for kedavra.networks.unet and kedavra.networks.transformer.

Parity oracle: diffusers' UNet2DConditionModel built offline from a matching config, every parameter
re-randomised under a fixed seed (diffusers zero-inits nothing we rely on, but LDM-style zero inits
would hide weights from the comparison). LDM-layout oracle: tests/sd_keys.py's map to the original layout, and
diffusers' own ldm -> diffusers converter (`convert_ldm_unet_checkpoint`), which must turn our test's diffusers ->
ldm map back into the original.
"""

import dataclasses
import json
import math

import pytest
import sd_keys
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_models import diffusers_unet

from kedavra.networks.unet import UNet, Upsample, timestep_embedding
from kedavra.networks.unet_config import PRESETS, UNetConfig
from kedavra.networks.unet_keys import convert_unet_state_dict

TINY = UNetConfig.from_preset("tiny")
# An SD 2.x-shaped tiny model: 16-wide heads instead of a head count, Linear projections.
TINY_LINEAR = dataclasses.replace(TINY, num_heads=None, head_dim=16, use_linear_projection=True)
TINY_INPAINT = dataclasses.replace(TINY, in_channels=9)
# SD 1.5's four levels and attention pattern at tiny widths: three halvings, so odd sides round up thrice.
TINY_DEEP = dataclasses.replace(TINY, channel_multipliers=(1, 2, 2, 2), attention_per_level=(False, True, True, False))
PARITY_ATOL = 1e-4  # fp32, the brief's bound
LDM_PREFIX = "model.diffusion_model."  # CompVis single-file U-Net prefix


def build_reference(config: UNetConfig) -> UNet2DConditionModel:
    """diffusers' U-Net for `config`, on the meta device (no memory, no values)."""
    with torch.device("meta"):
        return diffusers_unet(config)


def reference_unet(config: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' U-Net for `config`, every parameter drawn under `seed` (norm gains near 1)."""
    ref = build_reference(config).to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=generator)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return ref


def kedavra_from(state: dict, config: UNetConfig, layout: str = "diffusers") -> UNet:
    """Our U-Net holding the tensors of `state` (shared, not copied)."""
    with torch.device("meta"):
        ours = UNet(config)
    ours.load_state_dict(convert_unet_state_dict(state, layout, config), strict=True, assign=True)
    return ours.eval()


def diffusers_to_ldm(state: dict, config: UNetConfig) -> dict:
    """diffusers names -> CompVis names: through ours (the diffusers layout, which the parity tests check) and
    tests/sd_keys.py's map of ours to the original layout, written independently of kedavra.networks.unet_keys."""
    modules = sd_keys.unet_modules(config)
    return {sd_keys.unet_key(k, modules): v for k, v in convert_unet_state_dict(state, "diffusers", config).items()}


def inputs(config: UNetConfig, batch=1, size: int | tuple[int, int] = 16, tokens=7, seed=1):
    """(x, context) drawn under `seed`; size is the latent side, or (H, W)."""
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=generator)
    context = torch.randn(batch, tokens, config.context_dim, generator=generator)
    return x, context


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|)."""
    diff = (ours - ref).abs().max().item()
    return diff, diff / ref.abs().max().item()


def check_parity(
    config: UNetConfig, size: int | tuple[int, int], tokens: int, t, batch=1, layouts=("diffusers", "ldm")
) -> list[tuple[float, float]]:
    """Assert our U-Net matches diffusers' within PARITY_ATOL; return (abs, rel) error per layout."""
    ref = reference_unet(config)
    found = []
    x, context = inputs(config, batch, size, tokens)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        assert expected.abs().max() > 0.1  # the comparison is not between near-zero outputs
        for layout in layouts:
            state = ref.state_dict() if layout == "diffusers" else diffusers_to_ldm(ref.state_dict(), config)
            got = kedavra_from(state, config, layout)(x, t, context)
            assert got.shape == expected.shape
            abs_err, rel_err = errors(got, expected)
            assert abs_err < PARITY_ATOL, (layout, abs_err, rel_err)
            found.append((abs_err, rel_err))
    return found


# ---- config ---------------------------------------------------------------------------------------


def test_presets_match_the_reference_configs():
    sd15, sd21 = PRESETS["sd15"], PRESETS["sd21"]
    assert sd15.level_channels == (320, 640, 1280, 1280)  # CompVis v1-inference.yaml
    assert sd15.heads(640) == (8, 80)  # SD 1.x: 8 heads at every width
    assert sd21.heads(640) == (10, 64)  # SD 2.x: 64-wide heads
    assert sd21.context_dim == 1024 and sd21.use_linear_projection
    assert PRESETS["sd15-inpaint"].in_channels == 9 and PRESETS["sd21-inpaint"].in_channels == 9
    assert dataclasses.replace(PRESETS["sd21-inpaint"], in_channels=4) == sd21
    assert TINY.context_dim == 64 and TINY.downsample_factor == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_heads": None}, "exactly one of num_heads"),
        ({"head_dim": 64}, "exactly one of num_heads"),
        ({"attention_per_level": (True, False)}, "one per level"),
        ({"num_heads": 7}, "not divisible by num_heads=7"),
        ({"base_channels": 48}, "norm_groups=32"),
        ({"res_blocks_per_level": 0}, "res_blocks_per_level"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["sd15"], **changes)


def test_config_survives_a_json_round_trip():
    config = PRESETS["sd21"]
    assert UNetConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="sd15"):
        UNetConfig.from_preset("sd3")


# ---- timestep embedding ---------------------------------------------------------------------------


def test_timestep_embedding_values():
    # By hand: dim 4 -> frequencies 10000^0 = 1 and 10000^(-1/2) = 0.01; cosines first.
    got = timestep_embedding(torch.tensor([0.0, 1.0]), 4)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]])
    torch.testing.assert_close(got, expected)


def test_timestep_embedding_matches_diffusers_for_fractional_t():
    t = torch.tensor([0.0, 0.5, 17.25, 998.7])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 320), ref, rtol=0, atol=0)


# ---- parity ---------------------------------------------------------------------------------------


def test_tiny_parity_fractional_t_both_layouts():
    check_parity(TINY, size=16, tokens=7, t=torch.tensor([3.5, 871.25]), batch=2)


def test_tiny_parity_scalar_t_is_broadcast():
    ref = reference_unet(TINY, seed=3)
    ours = kedavra_from(ref.state_dict(), TINY)
    x, context = inputs(TINY, batch=2, size=8)
    with torch.no_grad():
        expected = ref(x, torch.tensor(500), context).sample
        torch.testing.assert_close(ours(x, torch.tensor(500), context), expected, rtol=0, atol=PARITY_ATOL)
        torch.testing.assert_close(ours(x, 500.0, context), expected, rtol=0, atol=PARITY_ATOL)


def test_tiny_linear_projection_head_dim_parity():
    check_parity(TINY_LINEAR, size=8, tokens=5, t=torch.tensor([250.75]))


def test_tiny_inpaint_parity():
    check_parity(TINY_INPAINT, size=12, tokens=7, t=torch.tensor([10.0]), layouts=("diffusers",))


@pytest.mark.parametrize(("source", "target"), [(TINY, TINY_LINEAR), (TINY_LINEAR, TINY)])
def test_ldm_projection_reshaped_between_conv_and_linear(source, target):
    """An SD 1.x-style file (1x1 conv proj) loads into a Linear-proj config and vice versa."""
    # TINY and TINY_LINEAR differ only in how heads are named and the projection form: both have 4
    # heads of 16 at width 64, so the same numbers give the same function.
    assert target.heads(64) == source.heads(64)
    ref = reference_unet(source)
    ldm = diffusers_to_ldm(ref.state_dict(), source)
    key = "down_blocks.1.attentions.0.proj_in.weight"
    assert convert_unet_state_dict(ldm, "ldm", target)[key].shape == (
        (64, 64) if target.use_linear_projection else (64, 64, 1, 1)
    )
    x, context = inputs(source, size=8)
    with torch.no_grad():
        got = kedavra_from(ldm, target, "ldm")(x, 9.0, context)
        expected = ref(x, 9.0, context).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=PARITY_ATOL)


def test_ldm_inverse_map_agrees_with_diffusers_converter():
    """diffusers' own ldm -> diffusers converter undoes our test's inverse map (tiny and SD 1.5)."""
    for config in (TINY, PRESETS["sd15"], PRESETS["sd21"]):
        ref_state = build_reference(config).state_dict()
        ldm = diffusers_to_ldm(ref_state, config)
        back = convert_ldm_unet_checkpoint(
            {LDM_PREFIX + k: v for k, v in ldm.items()}, {"layers_per_block": config.res_blocks_per_level}
        )
        assert back.keys() == ref_state.keys()
        assert all(back[k] is ref_state[k] for k in ref_state)


def test_sd15_ldm_names_on_meta():
    """Full SD 1.5 key set in CompVis names converts and loads strictly (no memory: meta tensors)."""
    config = PRESETS["sd15"]
    ldm = diffusers_to_ldm(build_reference(config).state_dict(), config)
    # Names from the CompVis sd-v1-5 checkpoint: the upsampler after a block without attention sits
    # at position 1, after one with attention at position 2; input_blocks runs 0..11.
    for key in (
        "input_blocks.3.0.op.weight",
        "input_blocks.11.0.in_layers.0.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "middle_block.1.proj_in.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.bias",
        "out.2.bias",
    ):
        assert key in ldm, key
    assert "output_blocks.11.2.conv.weight" not in ldm
    state = convert_unet_state_dict(ldm, "ldm", config)
    with torch.device("meta"):
        UNet(config).load_state_dict(state, strict=True, assign=True)


def test_conversion_shares_tensors():
    ref_state = reference_unet(TINY).state_dict()
    for layout in ("diffusers", "ldm"):
        source = ref_state if layout == "diffusers" else diffusers_to_ldm(ref_state, TINY)
        converted = convert_unet_state_dict(source, layout, TINY)
        ptrs = {t.data_ptr() for t in source.values()}
        assert all(t.data_ptr() in ptrs for t in converted.values())


def test_conversion_errors_name_the_keys():
    state = dict(reference_unet(TINY).state_dict())
    with pytest.raises(ValueError, match="allowed"):
        convert_unet_state_dict(state, "compvis", TINY)
    del state["conv_in.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \[conv_in.weight\], 1 unexpected keys \[extra"):
        convert_unet_state_dict(state, "diffusers", TINY)
    prefixed = {LDM_PREFIX + k: v for k, v in diffusers_to_ldm(reference_unet(TINY).state_dict(), TINY).items()}
    with pytest.raises(ValueError, match="strip the 'model.diffusion_model.' prefix"):
        convert_unet_state_dict(prefixed, "ldm", TINY)
    with pytest.raises(ValueError, match="wrong shape"):  # a 9-channel file into a 4-channel config
        convert_unet_state_dict(reference_unet(TINY_INPAINT).state_dict(), "diffusers", TINY)


# ---- runtime options ------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    ref = reference_unet(TINY)
    x, context = inputs(TINY, batch=2, size=8)
    t = torch.tensor([5.0, 600.0])
    grads = []
    for checkpointing in (False, True):
        ours = kedavra_from(ref.state_dict(), TINY).train()
        ours.enable_gradient_checkpointing(checkpointing)
        ours.zero_grad()
        ours(x, t, context).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_attention_slicing_gives_the_same_output():
    ours = kedavra_from(reference_unet(TINY).state_dict(), TINY)
    x, context = inputs(TINY, size=16)
    with torch.no_grad():
        whole = ours(x, 100, context)
        ours.set_attention_slice_size(5)  # 64 tokens at the attention level -> slices of 5, 5, ..., 4
        sliced = ours(x, 100, context)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="slice_size"):
        ours.set_attention_slice_size(0)


def test_channels_last_gives_the_same_output():
    ours = kedavra_from(reference_unet(TINY_LINEAR).state_dict(), TINY_LINEAR)
    x, context = inputs(TINY_LINEAR, size=16)
    with torch.no_grad():
        expected = ours(x, 42.0, context)
        ours = ours.to(memory_format=torch.channels_last)
        got = ours(x.contiguous(memory_format=torch.channels_last), 42.0, context)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bf16_autocast_runs_and_stays_close():
    ours = kedavra_from(reference_unet(TINY).state_dict(), TINY)
    x, context = inputs(TINY, size=16)
    with torch.no_grad():
        expected = ours(x, 300.0, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(x, 300.0, context)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 has 8 mantissa bits


# ---- shapes, bad input, meta ----------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    tokens=st.integers(1, 9),
)
def test_output_shape_across_sizes(batch, height, width, tokens):
    ours = UNet(TINY).eval()
    x = torch.randn(batch, TINY.in_channels, height, width)
    context = torch.randn(batch, tokens, TINY.context_dim)
    with torch.no_grad():
        out = ours(x, torch.full((batch,), 7.0), context)
    assert out.shape == (batch, TINY.out_channels, height, width)


@pytest.mark.parametrize(
    ("x_shape", "context_shape", "t", "message"),
    [
        ((1, 3, 8, 8), (1, 7, 64), 1.0, r"\(B, 4, H, W\), got shape \(1, 3, 8, 8\)"),
        ((1, 4, 0, 7), (1, 7, 64), 1.0, r"H, W = \(0, 7\) must each be at least 1"),
        ((1, 4, 8, 8), (1, 7, 768), 1.0, r"context_dim=64\), got shape \(1, 7, 768\)"),
        ((2, 4, 8, 8), (1, 7, 64), 1.0, r"B=2"),
        ((2, 4, 8, 8), (2, 7, 64), torch.ones(3), r"scalar or shape \(2,\), got \(3,\)"),
    ],
)
def test_bad_input_is_rejected(x_shape, context_shape, t, message):
    ours = UNet(TINY)
    with pytest.raises(ValueError, match=message):
        ours(torch.zeros(x_shape), t, torch.zeros(context_shape))


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd15-inpaint"])
def test_meta_construction_matches_reference_size(name):
    config = PRESETS[name]
    with torch.device("meta"):
        ours = UNet(config)
    ref = build_reference(config)
    assert all(p.is_meta for p in ours.parameters())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    # Parameter counts of the released SD 1.5 / 2.1 U-Nets (diffusers UNet2DConditionModel).
    assert count == {"sd15": 859_520_964, "sd21": 865_910_724}.get(name, count)


# ---- full size ------------------------------------------------------------------------------------


@pytest.mark.slow  # 860M parameters: 30-50 s and ~4 GiB each on a 2-core CPU
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_parity(name):
    check_parity(PRESETS[name], size=32, tokens=77, t=torch.tensor([421.5]))


# ---- any latent size -----------------------------------------------------------------------------


def test_upsample_to_double_is_the_plain_path_and_odd_sizes_take_nearest_rows():
    """A size of exactly 2H x 2W gives the scale-2 result bit for bit; another size picks source row
    floor(i * H / H_out) (torch's nearest, as diffusers' Upsample2D with output_size)."""
    upsample = Upsample(1)
    with torch.no_grad():  # an identity 3x3 conv, so the output is the resized input itself
        upsample.conv.weight.zero_()
        upsample.conv.weight[0, 0, 1, 1] = 1.0
        upsample.conv.bias.zero_()
        x = torch.arange(6.0).reshape(1, 1, 2, 3)
        assert torch.equal(upsample(x, (4, 6)), upsample(x))
        # rows floor(i * 2/3) for i < 3 -> 0, 0, 1; columns floor(j * 3/5) for j < 5 -> 0, 0, 1, 1, 2
        expected = torch.tensor([[0.0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])
        assert torch.equal(upsample(x, (3, 5))[0, 0], expected)


@pytest.mark.parametrize(
    ("config", "size", "batch"),
    [
        (TINY, (13, 21), 2),  # 13x21 -> 7x11 and back
        (TINY_LINEAR, (40, 57), 1),
        (TINY_DEEP, (13, 21), 1),  # 13x21, 7x11, 4x6, 2x3: rounded up at every level
        (TINY_DEEP, (1, 3), 1),
    ],
)
def test_parity_at_latent_sizes_the_down_path_cannot_halve(config, size, batch):
    check_parity(config, size, tokens=7, t=torch.arange(batch) * 400.0 + 12.5, batch=batch, layouts=("diffusers",))


@pytest.mark.slow  # 860M parameters: 40-60 s and ~4 GiB on a 2-core CPU
def test_sd15_parity_at_an_odd_latent_size():
    # 136x104 pixels: 17x13, 9x7, 5x4, 3x2 down the path, so every level's upsampler resizes.
    check_parity(PRESETS["sd15"], size=(17, 13), tokens=77, t=torch.tensor([421.5]), layouts=("diffusers",))
