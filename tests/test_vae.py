"""Tests for kedavra.networks.vae: parity with diffusers' AutoencoderKL, key conversion, posterior (tiling:
tests/test_vae_tiling.py)."""

import functools
import re

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from kedavra.networks.vae import (
    SD_LATENT_SCALE,
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    get_vae_config,
)
from kedavra.networks.vae_keys import convert_vae_state_dict

PARITY_ATOL = 1e-4  # fp32, from the brief; measured error is 0 (same op sequence as diffusers)

# diffusers AutoencoderKL configs equal to kedavra's presets. "sd" is the SD 1.x / 2.x VAE config
# (stable-diffusion-v1-5 and stable-diffusion-2-1 vae/config.json).
REFERENCE_CONFIGS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64),
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
}


@functools.cache
def reference_vae(preset: str) -> DiffusersAutoencoderKL:
    """diffusers' AutoencoderKL for a preset, with seeded random weights (GroupNorm affines perturbed too)."""
    settings_ = REFERENCE_CONFIGS[preset]
    levels = len(settings_["block_out_channels"])
    torch.manual_seed(0)
    model = DiffusersAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        scaling_factor=SD_LATENT_SCALE,
        **settings_,
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # GroupNorm init is weight 1, bias 0: randomise so a swapped affine shows
                param.add_(0.1 * torch.randn_like(param))
    return model


def kedavra_vae(state: dict, layout: str, config: VAEConfig) -> AutoencoderKL:
    """kedavra's model built on the meta device and loaded from `state` (strict), as a loader would."""
    with torch.device("meta"):
        model = AutoencoderKL(config)
    model.load_state_dict(convert_vae_state_dict(state, layout, config), strict=True, assign=True)
    return model.eval()


def diffusers_to_ldm(state: dict, num_levels: int) -> dict:
    """Inverse key map: diffusers AutoencoderKL names -> CompVis ldm names (first_stage_model.* stripped).

    ldm names from ldm/modules/diffusionmodules/model.py: down.i.block.j, down.i.downsample,
    mid.block_1 / attn_1 / block_2, up.i.block.j with up.0 the full-resolution level (diffusers'
    last up block), nin_shortcut, norm_out; attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1).
    """
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, tensor in state.items():
        ldm = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        ldm = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", ldm)
        ldm = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
            ldm,
        )
        ldm = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", ldm)
        match = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", ldm)
        if match:
            ldm = f"{match[1]}.mid.attn_1.{attention[match[2]]}.{match[3]}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        ldm = ldm.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out[ldm] = tensor
    return out


def max_errors(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|)."""
    abs_err = (ours - reference).abs().max().item()
    return abs_err, abs_err / reference.abs().max().item()


SAMPLE_SEED = 3
SD_VAE_PARAMETERS = 83_653_863  # parameters of diffusers' AutoencoderKL with the SD 1.x / 2.x config


def reference_outputs(reference: DiffusersAutoencoderKL, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' posterior (mean, logvar, std, a seeded sample) and its decode of the mean."""
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        return {
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "std": posterior.std,
            "sample": posterior.sample(generator=torch.Generator().manual_seed(SAMPLE_SEED)),
            "decoded": reference.decode(posterior.mean).sample,
        }


def assert_parity(model: AutoencoderKL, expected: dict[str, torch.Tensor], images: torch.Tensor) -> None:
    """kedavra's outputs equal `expected` (from reference_outputs) to PARITY_ATOL in fp32."""
    with torch.no_grad():
        posterior = model.encode(images)
        ours = {
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "std": posterior.std,
            "sample": posterior.sample(torch.Generator().manual_seed(SAMPLE_SEED)),
            "decoded": model.decode(expected["mean"]),
        }
    for name, reference in expected.items():
        assert ours[name].shape == reference.shape, name
        abs_err, rel_err = max_errors(ours[name], reference)
        assert abs_err <= PARITY_ATOL, f"{name}: max abs {abs_err:.3g}, max rel {rel_err:.3g}"


# ----------------------------------------------------------------------------------------------------
# Config


def test_sd_preset_matches_the_sd_vae_config():
    config = get_vae_config("sd")
    assert config.block_channels == (128, 256, 512, 512)  # diffusers block_out_channels
    assert (config.num_res_blocks, config.latent_channels, config.norm_groups) == (2, 4, 32)
    assert config.downsample_factor == 8
    assert config.scaling_factor == 0.18215  # v1-inference.yaml scale_factor


def test_tiny_preset_keeps_mid_block_attention():
    model = AutoencoderKL(get_vae_config("tiny"))
    assert isinstance(model.encoder.mid_block.attention.to_q, torch.nn.Linear)
    assert isinstance(model.decoder.mid_block.attention.to_q, torch.nn.Linear)


@pytest.mark.parametrize(
    "overrides, names",
    [
        (dict(latent_channels=0), ["latent_channels", "0"]),
        (dict(channel_multipliers=()), ["channel_multipliers", "()"]),
        (dict(channel_multipliers=[1, 2]), ["channel_multipliers", "[1, 2]"]),
        (dict(norm_groups=48), ["norm_groups=48", "(128, 256, 512, 512)"]),
        (dict(scaling_factor=-1.0), ["scaling_factor", "-1.0"]),
        (dict(scaling_factor=float("nan")), ["scaling_factor", "nan"]),
        (dict(norm_eps=0.0), ["norm_eps", "0.0"]),
    ],
)
def test_config_rejects_bad_values(overrides, names):
    with pytest.raises(ValueError) as error:
        VAEConfig(**overrides)
    for name in names:
        assert name in str(error.value)


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'sdxl'.*sd, tiny"):
        get_vae_config("sdxl")


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers


def test_parity_tiny_diffusers_layout():
    reference = reference_vae("tiny")
    model = kedavra_vae(reference.state_dict(), "diffusers", get_vae_config("tiny"))
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_parity(model, reference_outputs(reference, images), images)


def test_any_size_encodes_as_diffusers_and_ldm_do():
    """any_size (A1111's resize mode 3 encodes the image at its own size): sides that are not multiples of f give
    ⌊H/f⌋ x ⌊W/f⌋ latents, diffusers' encoder's (its padded stride-2 convolutions are ldm's) to PARITY_ATOL."""
    reference = reference_vae("tiny")
    model = kedavra_vae(reference.state_dict(), "diffusers", get_vae_config("tiny"))
    f = model.config.downsample_factor
    images = torch.rand(1, 3, 37, 51, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        theirs = reference.encode(images).latent_dist
        ours = model.encode(images, any_size=True)
    assert ours.mean.shape == theirs.mean.shape == (1, 4, 37 // f, 51 // f)
    for mine, reference_value in ((ours.mean, theirs.mean), (ours.logvar, theirs.logvar)):
        assert max_errors(mine, reference_value)[0] <= PARITY_ATOL
    with pytest.raises(ValueError, match=r"multiples of"):
        model.encode(images)  # the default still asks for multiples of f
    with pytest.raises(ValueError, match=rf"images height and width must be at least {f} .*got 1 x 51"):
        model.encode(images[..., :1, :], any_size=True)


def test_scaled_latent_helpers_match_diffusers_pipeline_use():
    """encode_to_latents = posterior draw * 0.18215; decode_latents = decode(latents / 0.18215) in [-1, 1]."""
    reference = reference_vae("tiny")
    model = kedavra_vae(reference.state_dict(), "diffusers", get_vae_config("tiny"))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        drawn = model.encode_to_latents(images, torch.Generator().manual_seed(7), sample=True)
        mean = model.encode_to_latents(images, sample=False)
        decoded = model.decode_latents(drawn)
        ref_decoded = reference.decode(drawn / SD_LATENT_SCALE).sample.clamp(-1, 1)
    ref_drawn = posterior.sample(generator=torch.Generator().manual_seed(7)) * SD_LATENT_SCALE
    for ours, theirs in ((drawn, ref_drawn), (mean, posterior.mean * SD_LATENT_SCALE), (decoded, ref_decoded)):
        assert max_errors(ours, theirs)[0] <= PARITY_ATOL
    assert decoded.abs().max() <= 1.0


def test_parity_tiny_ldm_layout_round_trip():
    reference = reference_vae("tiny")
    config = get_vae_config("tiny")
    ldm_state = diffusers_to_ldm(reference.state_dict(), config.num_levels)
    # The inverse map agrees with diffusers' own ldm loader ...
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm_state.items()}, reference.config)
    assert back.keys() == reference.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in reference.state_dict().items())
    # ... and kedavra loads it (plus the training-only loss weights a CompVis checkpoint carries).
    ldm_state["loss.logvar"] = torch.zeros(())
    model = kedavra_vae(ldm_state, "ldm", config)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert_parity(model, reference_outputs(reference, images), images)


@pytest.mark.slow  # SD-size VAE (83.7 M parameters) in fp32 on a 128 x 128 image
def test_parity_sd_both_layouts():
    reference = reference_vae("sd")
    config = get_vae_config("sd")
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = reference_outputs(reference, images)
    assert_parity(kedavra_vae(reference.state_dict(), "diffusers", config), expected, images)
    ldm_state = diffusers_to_ldm(reference.state_dict(), config.num_levels)
    assert_parity(kedavra_vae(ldm_state, "ldm", config), expected, images)


# ----------------------------------------------------------------------------------------------------
# Key conversion


def test_old_diffusers_attention_names_are_accepted():
    reference = reference_vae("tiny")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, tensor in reference.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[key] = tensor
    model = kedavra_vae(state, "diffusers", get_vae_config("tiny"))
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert_parity(model, reference_outputs(reference, images), images)


def test_conversion_shares_storage_instead_of_copying():
    config = get_vae_config("tiny")
    state = reference_vae("tiny").state_dict()
    for layout, source in (("diffusers", state), ("ldm", diffusers_to_ldm(state, config.num_levels))):
        converted = convert_vae_state_dict(source, layout, config)
        source_pointers = {t.untyped_storage().data_ptr() for t in source.values()}
        assert all(t.untyped_storage().data_ptr() in source_pointers for t in converted.values()), layout


def test_conversion_reports_missing_and_unexpected_keys():
    state = dict(reference_vae("tiny").state_dict())
    del state["encoder.conv_in.weight"]
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        convert_vae_state_dict(state, "diffusers", get_vae_config("tiny"))
    message = str(error.value)
    assert "missing: 1 (encoder.conv_in.weight)" in message
    assert "unexpected: 1 (encoder.extra.weight)" in message


def test_conversion_reports_a_config_mismatch():
    state = reference_vae("tiny").state_dict()
    wider = VAEConfig(base_channels=64, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=8)
    with pytest.raises(ValueError, match=r"wrong shape: \d+ \(encoder\.conv_in\.weight: \(32, 3, 3, 3\)"):
        convert_vae_state_dict(state, "diffusers", wider)


def test_conversion_rejects_unknown_layout():
    with pytest.raises(ValueError, match=r"'compvis'.*diffusers, ldm"):
        convert_vae_state_dict({}, "compvis", get_vae_config("tiny"))


def test_sd_keys_convert_from_both_layouts_on_the_meta_device():
    """Full-size key maps without allocating weights: diffusers' SD VAE built on meta, both layouts."""
    settings_ = REFERENCE_CONFIGS["sd"]
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **settings_
        )
        model = AutoencoderKL(get_vae_config("sd"))
    state = reference.state_dict()
    assert sum(t.numel() for t in state.values()) == SD_VAE_PARAMETERS
    for layout, source in (("diffusers", state), ("ldm", diffusers_to_ldm(state, num_levels=4))):
        model.load_state_dict(convert_vae_state_dict(source, layout, get_vae_config("sd")), strict=True, assign=True)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == SD_VAE_PARAMETERS


# ----------------------------------------------------------------------------------------------------
# Posterior


def test_standard_normal_posterior_has_zero_kl():
    posterior = DiagonalGaussian(torch.zeros(2, 8, 4, 4))  # mean 0, logvar 0: exactly N(0, I)
    assert torch.equal(posterior.kl(), torch.zeros(2))


def test_kl_matches_torch_distributions():
    moments = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    other_moments = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))
    p, q = DiagonalGaussian(moments), DiagonalGaussian(other_moments)
    normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(normal(p.mean, p.std), normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(), expected)
    expected_pq = torch.distributions.kl_divergence(normal(p.mean, p.std), normal(q.mean, q.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(q), expected_pq)
    torch.testing.assert_close(p.kl(p), torch.zeros(2))


def test_sample_is_deterministic_per_generator_and_mode_is_mean():
    posterior = DiagonalGaussian(torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(0)))
    first = posterior.sample(torch.Generator().manual_seed(5))
    again = posterior.sample(torch.Generator().manual_seed(5))
    other = posterior.sample(torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert posterior.mode() is posterior.mean


def test_logvar_is_clamped_but_nan_is_not_hidden():
    logvar = torch.tensor([0.0, -100.0, 100.0, float("nan")]).view(1, 4, 1, 1)
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 1, 1), logvar], dim=1))
    assert posterior.logvar.flatten()[:3].tolist() == [0.0, -30.0, 20.0]  # ldm distributions.py clamp
    assert posterior.logvar.flatten()[3].isnan()


def test_decode_latents_keeps_nan():
    model = tiny_model()
    latents = torch.zeros(1, 4, 4, 4)
    latents[0, 0, 1, 1] = float("nan")
    with torch.no_grad():
        images = model.decode_latents(latents)
    assert images.isnan().any()
    assert images.nan_to_num(0.0).abs().max() <= 1.0


# ----------------------------------------------------------------------------------------------------
# Shapes and bad input


@functools.cache
def tiny_model() -> AutoencoderKL:
    return kedavra_vae(reference_vae("tiny").state_dict(), "diffusers", get_vae_config("tiny"))


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    height=st.integers(1, 5).map(lambda n: 8 * n),
    width=st.integers(1, 5).map(lambda n: 8 * n),
)
def test_shapes_hold_across_sizes(batch, height, width):
    model = tiny_model()
    f = model.config.downsample_factor
    images = torch.zeros(batch, 3, height, width)
    with torch.no_grad():
        posterior = model.encode(images)
        latents = model.encode_to_latents(images, generator=torch.Generator().manual_seed(0))
        decoded = model.decode_latents(latents)
    assert posterior.mean.shape == posterior.logvar.shape == (batch, 4, height // f, width // f)
    assert latents.shape == (batch, 4, height // f, width // f)
    assert decoded.shape == images.shape


def meta_sd_model() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(get_vae_config("sd"))


@pytest.mark.parametrize(
    "shape, pattern",
    [
        ((1, 3, 60, 64), r"multiples of 8 .*4-level.*got 60 x 64"),
        ((1, 3, 64, 36), r"multiples of 8 .*got 64 x 36"),
        ((1, 4, 64, 64), r"images must have 3 channels, got 4"),
        ((3, 64, 64), r"images must be a 4-D \(B, C, H, W\) tensor, got shape \(3, 64, 64\)"),
    ],
)
def test_encode_rejects_bad_images(shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        meta_sd_model().encode(torch.empty(shape, device="meta"))


def test_decode_rejects_wrong_latent_channels():
    with pytest.raises(ValueError, match=r"latents must have 4 channels, got 3"):
        meta_sd_model().decode_latents(torch.empty(1, 3, 8, 8, device="meta"))
