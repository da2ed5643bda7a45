"""Loading Stable Diffusion checkpoints with kedavra.checkpoint: every format, what is detected, and parity.

Oracles: diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel, built offline for
kedavra's configs with every parameter re-drawn under a fixed seed, saved as a diffusers folder (their own
save_pretrained) and as an original single file (tests/sd_keys.py, itself checked here against diffusers' original ->
diffusers converters), then loaded with load_model and compared output by output; the ε-or-v probe against the
optimal denoisers of Gaussian data. Full-size cases are slow. Beside this file: test_model_config.py (ModelConfig),
test_safetensors_io.py (memory mapping, the reader and writer), test_torch_pickle.py (pickled checkpoints) and
test_checkpoint_errors.py (bad input).
"""

import dataclasses
import json
import math

import pytest
import sd_keys
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from reference_models import (
    assert_parity,
    kedavra_state,
    reference_models,
    write_diffusers,
    write_original,
)
from safetensors import safe_open

from kedavra.checkpoint import (
    CONFIG_KEY,
    PROBE_THRESHOLD,
    CheckpointError,
    SafetensorsFile,
    load_model,
    probe_prediction_type,
    save_model,
    write_safetensors,
)
from kedavra.diffusion.schedule import get_schedule
from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion

# ---- the original layout (tests/sd_keys.py) against diffusers' converters -----------------------------------


def check_original_layout(refs, config: ModelConfig) -> dict:
    """diffusers' original -> diffusers converters turn sd_keys' layout back into the reference state dicts."""
    text, unet, vae = refs
    original = sd_keys.original_state_dict(kedavra_state(refs, config), config)
    levels = config.vae.num_levels
    unet_back = convert_ldm_unet_checkpoint(original, {"layers_per_block": config.unet.res_blocks_per_level})
    vae_back = convert_ldm_vae_checkpoint(
        original, {"down_block_types": (0,) * levels, "up_block_types": (0,) * levels}
    )
    if config.text_encoder.activation == "quick_gelu":
        text_back = convert_ldm_clip_checkpoint(original)
    else:
        text_back = convert_open_clip_checkpoint(text, original)
    text_back = {k.removeprefix("text_model."): v for k, v in text_back.items()}  # transformers 5 drops it
    extra_layer = f"encoder.layers.{config.text_encoder.num_layers}."  # SD 2.x files hold one more, unused
    text_back = {k: v for k, v in text_back.items() if not k.startswith(extra_layer) and k != "text_projection.weight"}
    text_back.pop("embeddings.position_ids", None)
    for back, ref in ((unet_back, unet), (vae_back, vae), (text_back, text)):
        expected = ref.state_dict()
        assert set(back) == set(expected), sorted(set(back) ^ set(expected))[:5]
        for key, tensor in expected.items():
            assert back[key].shape == tensor.shape, key
            if not tensor.is_meta:
                assert torch.equal(back[key], tensor), key
    return original


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_original_layout_matches_diffusers_converters(tiny_refs, name):
    check_original_layout(tiny_refs[name], PRESETS[name])


@pytest.mark.parametrize(
    "name, text_keys",
    [
        ("sd15", 197),  # CLIP ViT-L/14: 12 layers x 16 + 4 embedding/final-norm tensors + position_ids
        ("sd21", 24 * 12 + 6),  # OpenCLIP ViT-H/14: 24 resblocks x 12 + 6 (SD uses 23 resblocks)
    ],
)
def test_full_size_original_key_set(name, text_keys):
    """The full key set of a real SD 1.5 / 2.1 file (686 U-Net, 248 VAE tensors; v1-5-pruned-emaonly and
    v2-1_768-ema-pruned), checked against diffusers' converters on the meta device, is what load_model eats."""
    config = PRESETS[name]
    refs = reference_models(config, device="meta")
    original = check_original_layout(refs, config)
    count = lambda prefix: sum(k.startswith(prefix) for k in original)  # noqa: E731
    assert (count("model.diffusion_model."), count("first_stage_model."), count("cond_stage_model.")) == (
        686,
        248,
        text_keys,
    )


# ---- loading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_original_single_file_loads_with_parity_and_detection(tiny_refs, tmp_path, name):
    path = write_original(tmp_path / "model.safetensors", tiny_refs[name], PRESETS[name])
    model = load_model(path)
    assert model.config == PRESETS[name]
    assert_parity(model, tiny_refs[name])
    assert "family: " + name + " (detected: U-Net cross-attention width 64" in model.describe()
    assert ("OpenCLIP" if name == "tiny-sd2" else "OpenAI CLIP") in model.describe()
    assert "the file's betas agree" in model.describe()


def test_inpainting_is_detected_from_the_first_conv(tmp_path):
    config = PRESETS["tiny-inpaint"]
    refs = reference_models(config)
    model = load_model(write_original(tmp_path / "inpaint.safetensors", refs, config))
    assert model.config == config and model.config.inpainting
    assert "9 input channels" in model.describe()
    assert_parity(model, refs)


def test_probe_settles_families_that_differ_only_in_prediction_type(tiny_refs, tmp_path, monkeypatch):
    """Like sd21 (v, 768) and sd21-base (eps, 512): same shapes, so the loaded U-Net is probed."""
    base = dataclasses.replace(PRESETS["tiny-sd2"], family="tiny-sd2-base", prediction_type="eps", image_size=16)
    monkeypatch.setitem(PRESETS, "tiny-sd2-base", base)
    model = load_model(write_original(tmp_path / "m.safetensors", tiny_refs["tiny-sd2"], PRESETS["tiny-sd2"]))
    assert "prediction type: " + model.config.prediction_type + " (probed: " in model.describe()
    family = {"v": "tiny-sd2", "eps": "tiny-sd2-base"}[model.config.prediction_type]
    assert model.config == PRESETS[family]


@pytest.mark.parametrize("name, prediction", [("tiny", "v_prediction"), ("tiny-sd2", "epsilon")])
def test_diffusers_folder_loads_with_parity_and_scheduler_settings(tiny_refs, tmp_path, name, prediction):
    folder = write_diffusers(tmp_path / "model", tiny_refs[name], PRESETS[name], prediction)
    model = load_model(folder)
    expected = {"v_prediction": "v", "epsilon": "eps"}[prediction]
    # the folder's DDIMScheduler(set_alpha_to_one=False): its sampler and final level, with diffusers' timestep rules
    assert model.config == dataclasses.replace(PRESETS[name], prediction_type=expected, spacing="trailing",
                                               sampler="ddim", timestep_rules="diffusers", set_alpha_to_one=False)
    assert f"prediction type: {expected} (scheduler/scheduler_config.json prediction_type='{prediction}')" in (
        model.describe()
    )
    assert "scheduler: DDIMScheduler -> sampler ddim, diffusers' timestep rules" in model.describe()
    assert_parity(model, tiny_refs[name])


def test_diffusers_folder_with_bin_weights_and_fp16_variant(tiny_refs, tmp_path):
    folder = write_diffusers(tmp_path / "model", tiny_refs["tiny"], PRESETS["tiny"])
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(tiny_refs["tiny"][1].state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    unet_file.unlink()
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae_file.rename(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    model = load_model(folder)
    first_line = model.source.splitlines()[0]
    assert first_line.endswith("(diffusers folder; safetensors/torch zip; 368 float32), loaded as float32 on cpu")
    assert_parity(model, tiny_refs["tiny"])


def test_metadata_and_arguments_override_the_family_default(tiny_refs, tmp_path):
    path = write_original(
        tmp_path / "m.safetensors", tiny_refs["tiny-sd2"], PRESETS["tiny-sd2"], {"modelspec.prediction_type": "epsilon"}
    )
    model = load_model(path)
    assert model.config.prediction_type == "eps"
    assert "metadata modelspec.prediction_type='epsilon'" in model.describe()
    model = load_model(path, prediction_type="v")
    assert model.config.prediction_type == "v" and "given by the prediction_type argument" in model.describe()
    model = load_model(path, family="tiny-sd2")
    assert "given by the family argument" in model.describe()
    with pytest.raises(
        CheckpointError, match=r"m\.safetensors: .*240 missing keys.*loading as family sd21, given by the"
    ):
        load_model(path, family="sd21")  # the wrong family: its converter names what does not match


def test_kedavra_format_round_trip_is_bitwise(tiny_file, tmp_path):
    model = load_model(tiny_file)
    save_model(model, tmp_path / "k.safetensors")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert ModelConfig.from_dict(json.loads(f.metadata()[CONFIG_KEY])) == model.config
    back = load_model(tmp_path / "k.safetensors")
    assert back.config == model.config
    assert "stored in the kedavra checkpoint" in back.describe()
    ours, theirs = model.state_dict(), back.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    half = load_model(tiny_file, dtype=torch.float16)
    save_model(half, tmp_path / "h.safetensors")
    back = load_model(tmp_path / "h.safetensors", dtype=torch.float16)
    assert all(torch.equal(t, back.state_dict()[k]) for k, t in half.state_dict().items())


# ---- ε or v ---------------------------------------------------------------------------------------------------


def gaussian_denoiser(prediction_type: str, variance: float, schedule):
    """The optimal predictor for data x0 ~ N(0, variance I): x̂0 = √ᾱ s² x / (ᾱ s² + 1 - ᾱ), then ε̂ or v̂."""

    def model(x, t):
        alpha_bar = schedule.alpha_bar_at(t).to(x.dtype)[:, None, None, None]
        x0 = alpha_bar.sqrt() * variance * x / (alpha_bar * variance + 1 - alpha_bar)
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return eps if prediction_type == "eps" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0

    return model


@pytest.mark.parametrize("variance", [0.25, 1.0, 2.0])
def test_probe_tells_eps_from_v_with_the_stated_slopes(variance):
    schedule = get_schedule("sd")
    alpha_bar = float(schedule.alpha_bar[-1])  # ≈ 0.0047
    k = variance / (alpha_bar * variance + 1 - alpha_bar)
    slopes = {  # the docstring's formulas
        "eps": (1 - alpha_bar * k) / math.sqrt(1 - alpha_bar),
        "v": math.sqrt(alpha_bar) * (1 - k) / math.sqrt(1 - alpha_bar),
    }
    for kind, expected in slopes.items():
        found, slope = probe_prediction_type(gaussian_denoiser(kind, variance, schedule), 4, schedule)
        assert found == kind
        assert slope == pytest.approx(expected, abs=1e-6)  # the model runs in float32
    assert slopes["eps"] > 0.99 and abs(slopes["v"]) < 0.07 and 0.07 < PROBE_THRESHOLD < 0.99


# ---- full size ------------------------------------------------------------------------------------------------


def write_random_original(path, config: ModelConfig, dtype: torch.dtype, seed: int = 0):
    """A random-weight original single file for `config`, written one tensor at a time (bounded memory)."""
    with torch.device("meta"):
        model = StableDiffusion(config)
    layout = sd_keys.original_state_dict(model.state_dict(), config, extras=False)
    layout = {
        k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype, device="meta")
        for k, v in layout.items()
    }
    generator = torch.Generator().manual_seed(seed)

    def fill(name, like):
        return (torch.randn(like.shape, generator=generator) * 0.02).to(like.dtype)

    write_safetensors(path, layout, fill=fill)
    return layout


@pytest.mark.slow  # writes and loads 2.1 / 2.6 GB: ~1 min each on a 2-core CPU, peak ~6 GB
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_random_checkpoint_loads_strictly(tmp_path, name):
    config = PRESETS[name]
    path = tmp_path / f"{name}.safetensors"
    write_random_original(path, config, torch.float16)
    model = load_model(path)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    described = model.describe()
    if name == "sd15":
        assert model.config == config
    else:  # SD 2.x 768-v and 512-base share the weights' shapes: the probe decides
        assert model.config.family in ("sd21", "sd21-base") and "(probed: " in described
    file = SafetensorsFile(path)
    assert torch.equal(model.unet.conv_out.weight, file.tensor("model.diffusion_model.out.2.weight").float())
    assert torch.equal(model.vae.decoder.conv_out.bias, file.tensor("first_stage_model.decoder.conv_out.bias").float())


def test_kedavra_load_reads_straight_into_the_pipelines_precision(tiny_refs, tmp_path):
    """kedavra.load converts each tensor as it reads it (never the whole model in fp32 first): the same weights
    as loading in fp32 and converting after, since an fp32 -> bf16 conversion is the same either way."""
    from kedavra.api import load

    folder = write_diffusers(tmp_path / "model", tiny_refs["tiny"], PRESETS["tiny"])
    pipe = load(folder, dtype="bf16")
    assert "loaded as bfloat16 on cpu" in pipe.model.source.splitlines()[0]
    converted = load_model(folder).to(torch.bfloat16).state_dict()
    loaded = pipe.model.state_dict()  # packed, evicted layers give their dense weights back for it
    assert loaded.keys() == converted.keys()
    assert all(loaded[k].dtype == converted[k].dtype and torch.equal(loaded[k], converted[k]) for k in converted)
    with pytest.raises(ValueError, match="unknown precision 'bf17'"):
        load(folder, dtype="bf17")  # refused before anything is read
