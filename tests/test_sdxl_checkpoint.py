"""Loading SDXL checkpoints with kedavra.checkpoint: Stability's SGM single files (base, refiner), diffusers folders
(StableDiffusionXLPipeline, the refiner's StableDiffusionXLImg2ImgPipeline), kedavra's own format, what is detected,
and the files that are not an SD model at all.

Oracles: transformers' CLIPTextModel / CLIPTextModelWithProjection and diffusers' UNet2DConditionModel (text_time
added embedding) and AutoencoderKL, shaped like the tiny-sdxl preset with every parameter re-drawn under a fixed seed
(tests/reference_models.py), saved by their own save_pretrained and as an SGM single file (U-Net and VAE keys from
tests/sd_keys.py, bigG's OpenCLIP names from test_text_encoder.to_open_clip_names), loaded with load_model and
compared output by output. Full-size SDXL is only ever built on the meta device here.
"""

import dataclasses
from pathlib import Path

import pytest
import sd_keys
import torch
from reference_models import (
    SGM_TEXT_PREFIXES,
    max_errors,
    sdxl_reference_models,
    sgm_state_dict,
    write_sdxl_diffusers,
    write_sgm_original,
)
from safetensors.torch import save_file
from test_text_encoder import to_open_clip_names

from kedavra.checkpoint import CheckpointError, load_model, save_model
from kedavra.checkpoint.detect import _decide
from kedavra.checkpoint.sources import _open_original
from kedavra.checkpoint.weights import _Weights
from kedavra.networks.model import PRESETS, ModelConfig, StableDiffusion

PARITY_RTOL = 1e-5  # fp32: max abs error / max |reference|, every component output
PROMPTS = ["a photo of an astronaut riding a horse", ""]


@pytest.fixture(scope="module")
def refs():
    return {"tiny-sdxl": sdxl_reference_models(PRESETS["tiny-sdxl"], seed=3),
            "tiny-sdxl-refiner": sdxl_reference_models(PRESETS["tiny-sdxl-refiner"], seed=4)}


@pytest.fixture(scope="module")
def sgm_file(refs, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"
    return write_sgm_original(path, refs["tiny-sdxl"], PRESETS["tiny-sdxl"], to_open_clip_names)


def assert_sdxl_parity(model: StableDiffusion, refs) -> None:
    """Each component's output equals its reference's within PARITY_RTOL: the text encoders' penultimate hidden
    states without the final norm (transformers' hidden_states[-2]) and pooled embeddings (text_embeds with a
    projection), the U-Net with the added conditioning, the VAE's decoder."""
    config = model.config
    generator = torch.Generator().manual_seed(11)
    pairs = {}
    tokenizers = {"text_encoder": model.tokenizer, "text_encoder_2": model.tokenizer_2}
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(config, name) is None:
                continue
            ids = tokenizers[name](PROMPTS)
            hidden, pooled = getattr(model, name).encode(ids)
            expected = refs[name](ids, output_hidden_states=True)
            pairs[f"{name}.hidden"] = (hidden, expected.hidden_states[-2])
            reference_pooled = expected.text_embeds if getattr(config, name).projection_dim else expected.pooler_output
            pairs[f"{name}.pooled"] = (pooled, reference_pooled)
        latent = config.image_size // config.vae.downsample_factor
        x = torch.randn(2, config.unet.in_channels, latent, latent, generator=generator)
        context = torch.randn(2, 77, config.unet.context_dim, generator=generator)
        text_embeds = torch.randn(2, config.text_encoders[-1].projection_dim, generator=generator)
        size = float(config.image_size)
        values = [size, size, 0.0, 0.0, size, size] if config.micro_conditioning == 6 else [size, size, 0.0, 0.0, 6.0]
        time_ids = torch.tensor([values, values[::-1]])
        t = torch.tensor([10.0, 980.0])
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        pairs["unet"] = (model.unet(x, t, context, added_cond=added),
                         refs["unet"](x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample)
        z = torch.randn(1, config.vae.latent_channels, latent, latent, generator=generator)
        pairs["vae.decode"] = (model.vae.decode(z), refs["vae"].decode(z).sample)
    errors = {name: max_errors(ours, ref) for name, (ours, ref) in pairs.items()}
    for name, (_, relative) in errors.items():
        assert relative <= PARITY_RTOL, (name, errors)


# ---- loading, with parity ------------------------------------------------------------------------------------------


def test_sgm_single_file_loads_as_sdxl_with_parity(refs, sgm_file):
    model = load_model(sgm_file)
    assert model.config == PRESETS["tiny-sdxl"]
    assert model.config.vae.scaling_factor == 0.13025
    assert "family: tiny-sdxl (detected: " in model.source and "a second (OpenCLIP) one" in model.source
    assert_sdxl_parity(model, refs["tiny-sdxl"])


def test_diffusers_folder_loads_as_sdxl_with_parity(refs, tmp_path):
    folder = write_sdxl_diffusers(tmp_path / "sdxl", refs["tiny-sdxl"], PRESETS["tiny-sdxl"],
                                  force_zeros_for_empty_prompt=True)
    model = load_model(folder)
    # SDXL's EulerDiscreteScheduler config: its sampler, with diffusers' timestep rules
    assert model.config == dataclasses.replace(PRESETS["tiny-sdxl"], spacing="leading", steps_offset=1,
                                               sampler="euler", timestep_rules="diffusers")
    assert "described by the folder's unet/, text_encoder/, text_encoder_2/ and vae/ config.json" in model.source
    assert "model_index.json force_zeros_for_empty_prompt=true" in model.source
    assert_sdxl_parity(model, refs["tiny-sdxl"])


def test_diffusers_folder_not_a_preset_is_described_with_both_tokenizers(refs, tmp_path):
    config = PRESETS["tiny-sdxl"]
    folder = write_sdxl_diffusers(tmp_path / "my-sdxl", refs["tiny-sdxl"], config)
    (folder / "unet" / "config.json").write_text(
        (folder / "unet" / "config.json").read_text().replace('"norm_eps": 1e-05', '"norm_eps": 1e-06'))
    model_config = load_model(folder).config
    assert model_config.family == "my-sdxl"
    assert model_config.unet.norm_eps == 1e-6
    assert (model_config.tokenizer.pad_with, model_config.tokenizer_2.pad_with) == ("eos", "zero")
    for text in model_config.text_encoders:  # SDXL's readout: the penultimate layer, no final LayerNorm
        assert (text.clip_skip, text.apply_final_norm) == (2, False)


def test_refiner_single_file_and_folder_load_with_parity(refs, tmp_path):
    config = PRESETS["tiny-sdxl-refiner"]
    path = write_sgm_original(tmp_path / "refiner.safetensors", refs["tiny-sdxl-refiner"], config, to_open_clip_names)
    assert any(k.startswith("conditioner.embedders.0.model.") for k in sgm_state_dict(
        refs["tiny-sdxl-refiner"], config, to_open_clip_names))
    model = load_model(path)
    assert model.config == config and model.text_encoder_2 is None
    assert_sdxl_parity(model, refs["tiny-sdxl-refiner"])
    folder = write_sdxl_diffusers(tmp_path / "refiner", refs["tiny-sdxl-refiner"], config,
                                  requires_aesthetics_score=True)
    model = load_model(folder)
    assert model.config == dataclasses.replace(config, sampler="euler", timestep_rules="diffusers")
    assert "text_encoder_2/ is the only text encoder" in model.source
    assert "model_index.json requires_aesthetics_score=true" in model.source
    assert_sdxl_parity(model, refs["tiny-sdxl-refiner"])


def test_kedavra_round_trip_keeps_text_encoder_2(sgm_file, tmp_path):
    model = load_model(sgm_file)
    save_model(model, tmp_path / "saved.safetensors")
    back = load_model(tmp_path / "saved.safetensors")
    assert back.config == model.config
    state, saved = model.state_dict(), back.state_dict()
    assert set(saved) == set(state) and any(k.startswith("text_encoder_2.") for k in saved)
    assert all(torch.equal(saved[k], state[k]) for k in state)


def test_prediction_type_from_metadata_or_argument(refs, tmp_path):
    config = PRESETS["tiny-sdxl"]
    path = write_sgm_original(tmp_path / "v.safetensors", refs["tiny-sdxl"], config, to_open_clip_names,
                              metadata={"modelspec.prediction_type": "v"})
    model = load_model(path)
    assert model.config.prediction_type == "v"
    assert "metadata modelspec.prediction_type='v'" in model.source
    assert load_model(path, prediction_type="eps").config.prediction_type == "eps"


def test_family_without_a_second_text_encoder_is_refused(sgm_file):
    with pytest.raises(CheckpointError, match=r"holds weights for text_encoder, text_encoder_2, unet, vae, but "
                                              r"family tiny has text_encoder, unet, vae"):
        load_model(sgm_file, family="tiny")


# ---- detection of the full-size families (meta tensors: no memory) -------------------------------------------------


def full_size_sgm_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A full-size SGM single file's keys and shapes on the meta device, from kedavra's own parameter names."""
    with torch.device("meta"):
        model = StableDiffusion(config)
    modules = sd_keys.unet_modules(config.unet)
    state = {sd_keys.UNET_PREFIX + sd_keys.unet_key(k, modules): v for k, v in model.unet.state_dict().items()}
    for key, tensor in model.vae.state_dict().items():
        name, is_conv = sd_keys.vae_key(key, config.vae)
        state[sd_keys.VAE_PREFIX + name] = tensor[:, :, None, None] if is_conv else tensor
    encoders = [("clip", model.text_encoder), ("openclip_2", model.text_encoder_2)]
    if config.text_encoder_2 is None:
        encoders = [("openclip", model.text_encoder)]
    for style, encoder in encoders:
        text, prefix = encoder.state_dict(), SGM_TEXT_PREFIXES[style]
        if style == "clip":
            state.update({prefix + sd_keys.clip_key(k): v for k, v in text.items()})
        else:  # bigG: OpenCLIP names; its text_projection is (width, projection) = (1280, 1280)
            width = encoder.config.width
            state.update({prefix + k: v for k, v in sd_keys.openclip_state(text, encoder.config.num_layers - 1,
                                                                           width).items()})
    return state


def detected(state: dict[str, torch.Tensor], metadata=None) -> ModelConfig:
    source = _open_original(Path("model.safetensors"), _Weights(state, "safetensors", metadata=metadata or {}))
    return _decide(source, None, None).config


@pytest.mark.parametrize("name", ["sdxl", "sdxl-inpaint", "sdxl-refiner"])
def test_full_size_families_are_detected_from_keys_and_shapes(name):
    config = detected(full_size_sgm_state(PRESETS[name]))
    assert config == PRESETS[name]
    assert (config.prediction_type, config.vae.scaling_factor) == ("eps", 0.13025)


def test_distilled_sdxl_loads_as_sdxl_with_its_markers():
    """Turbo / Lightning share the base's weights layout: detected as sdxl. SGM's denoiser.sigmas buffer is ignored;
    the v_pred / ztsnr marker keys of v-prediction fine-tunes are read."""
    state = full_size_sgm_state(PRESETS["sdxl"])
    state["denoiser.sigmas"] = torch.empty(1000, device="meta")
    assert detected(state).family == "sdxl"
    state |= {"v_pred": torch.empty(0, device="meta"), "ztsnr": torch.empty(0, device="meta")}
    config = detected(state)
    assert (config.family, config.prediction_type, config.schedule.zero_terminal_snr) == ("sdxl", "v", True)


# ---- what is not an SD model ---------------------------------------------------------------------------------------

NOT_SD = {
    "sd3": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (6, 2),
             "first_stage_model.decoder.conv_in.weight": (2, 2)}, "a Stable Diffusion 3 \\(MMDiT\\) checkpoint"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (6, 2), "img_in.weight": (2, 2)}, "a Flux transformer"),
    "flux_comfy": ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (6, 2)}, "a Flux checkpoint"),
    "cascade_c": ({"clip_txt_mapper.weight": (2, 2), "down_blocks.0.0.channelwise.0.weight": (2,)},
                  "a Stable Cascade stage C"),
    "cascade_b": ({"effnet_mapper.0.weight": (2, 2)}, "a Stable Cascade stage B"),
    "pixart": ({"x_embedder.proj.weight": (2, 2), "blocks.0.attn.qkv.weight": (6, 2)}, "a DiT-style transformer"),
    "sdxl_lora": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 2),
                   "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 2)}, "an SDXL LoRA"),
    "peft_lora": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 2)}, "a LoRA"),
    "sdxl_embedding": ({"clip_g": (2, 1280), "clip_l": (2, 768)}, "an SDXL textual-inversion embedding"),
    "embedding": ({"emb_params": (2, 768)}, "a textual-inversion embedding"),
}


@pytest.mark.parametrize("name", sorted(NOT_SD))
def test_other_models_and_add_ons_are_named_and_refused(name, tmp_path):
    shapes, what = NOT_SD[name]
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}.safetensors: this looks like {what}.*kedavra does not run it "
                                              r"as a full model"):
        load_model(tmp_path / f"{name}.safetensors")


def test_transformer_pipeline_folder_is_refused(tmp_path):
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)
    (tmp_path / "sd3" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(CheckpointError, match=r"sd3: a diffusers folder of a transformer .*StableDiffusion3Pipeline"
                                              r".*kedavra does not run it as a full model"):
        load_model(tmp_path / "sd3")
