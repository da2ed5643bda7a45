"""SDXL's text side: both encoders read at the penultimate layer without the final LayerNorm, bigG's pooled and
projected embedding, SDXL's single-file layouts, and configs read from diffusers' text_encoder(_2)/config.json.

The references are transformers' CLIPTextModel and CLIPTextModelWithProjection, which diffusers'
StableDiffusionXLPipeline runs: it conditions on `hidden_states[-2]` of each and on the second's `text_embeds`
(Podell et al. 2023, Sec. 2.1). They are built from small configs with seeded random weights (test_text_encoder's
helpers); the real ViT-L/14 and bigG/14 sizes are built on the meta device only (bigG is 2.8 GB in fp32).
"""

import dataclasses
import json

import pytest
import torch
import transformers
from reference_models import clip_text_config
from test_text_encoder import loaded, reference_model, to_open_clip_names, token_ids

from kedavra.networks.text_encoder import (
    PRESETS,
    TextEncoder,
    TextEncoderConfig,
    convert_text_encoder_state_dict,
    with_sdxl_readout,
)

REL_TOLERANCE = 1e-5  # fp32: max |ours - theirs| / max |theirs|

# The CLIPTextConfig dicts of the published diffusers folders (config.json, transformers-version fields left out):
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0.
_COMMON = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "initializer_factor": 1.0,
           "initializer_range": 0.02, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
           "model_type": "clip_text_model", "pad_token_id": 1, "vocab_size": 49408}
SD15_TEXT_ENCODER = {**_COMMON, "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
                     "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                     "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
                     "torch_dtype": "float32"}
SD21_TEXT_ENCODER = {**_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
                     "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
                     "projection_dim": 512, "torch_dtype": "float32"}
SDXL_TEXT_ENCODER = {**SD15_TEXT_ENCODER, "torch_dtype": "float16"}
SDXL_TEXT_ENCODER_2 = {**_COMMON, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                       "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                       "num_hidden_layers": 32, "projection_dim": 1280, "torch_dtype": "float16"}

# Small stand-ins for the pair: ViT-L-like (quick-GELU, no projection) and bigG-like (GELU, projection).
SMALL_L = with_sdxl_readout(dataclasses.replace(TextEncoderConfig.from_preset("tiny"), num_layers=3))
SMALL_G = with_sdxl_readout(dataclasses.replace(TextEncoderConfig.from_preset("tiny"), num_layers=4,
                                                activation="gelu", projection_dim=48))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert error < REL_TOLERANCE, f"max relative error {error:.3g}"


def layouts(state: dict) -> dict[str, dict]:
    """The reference's weights in every layout that stores such an encoder: transformers' names with and without
    `text_model.` (diffusers folders, SD 1.x and SDXL embedders.0 single files) and OpenCLIP's (SDXL embedders.1)."""
    plain = {k.removeprefix("text_model."): v for k, v in state.items()}
    prefixed = {(k if k == "text_projection.weight" else f"text_model.{k}"): v for k, v in plain.items()}
    return {"diffusers": plain, "ldm_sd1": prefixed, "ldm_sd2": to_open_clip_names(state)}


def reference_outputs(config: TextEncoderConfig, ids: torch.Tensor):
    """(state dict, hidden_states[-2], pooled embedding) of a random transformers model shaped like `config`: what
    diffusers' StableDiffusionXLPipeline reads (text_embeds when projected, else pooler_output)."""
    reference = reference_model(config, with_projection=config.projection_dim is not None)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
    pooled = out.text_embeds if config.projection_dim is not None else out.pooler_output
    assert out.hidden_states[-2].std() > 0.5 and len(out.hidden_states) == config.num_layers + 1
    return reference.state_dict(), out.hidden_states[-2], pooled


# ---- Parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SMALL_L, SMALL_G], ids=["vit-l-like", "bigg-like"])
@pytest.mark.parametrize("pad", ["sd15", "sd21"], ids=["eos-padded", "zero-padded"])
def test_penultimate_and_pooled_match_transformers_in_every_layout(config, pad):
    ids = token_ids(pad)  # the end token at positions 6, 20 and 76
    state, penultimate, pooled = reference_outputs(config, ids)
    for layout, source in layouts(state).items():
        model = loaded(config, source, layout)
        with torch.no_grad():
            hidden, embedding = model.encode(ids)
            assert_close(hidden, penultimate)
            assert_close(embedding, pooled)
            assert torch.equal(model(ids), hidden)  # forward gives the same readout, in a shorter pass


def test_sdxl_single_file_prefixes_convert_after_stripping():
    """sd_xl_base_1.0.safetensors: ViT-L under conditioner.embedders.0.transformer. (transformers' names, read as
    ldm_sd1), bigG under conditioner.embedders.1.model. (OpenCLIP's, read as ldm_sd2, all 32 resblocks kept)."""
    ids = token_ids("sd21")
    embedders = {0: ("transformer.", "ldm_sd1", SMALL_L), 1: ("model.", "ldm_sd2", SMALL_G)}
    file, expected = {}, {}
    for index, (inner, layout, config) in embedders.items():
        state, penultimate, pooled = reference_outputs(config, ids)
        expected[index] = penultimate, pooled
        file.update({f"conditioner.embedders.{index}.{inner}{k}": v for k, v in layouts(state)[layout].items()})
    for index, (inner, layout, config) in embedders.items():
        prefix = f"conditioner.embedders.{index}.{inner}"
        state = {k.removeprefix(prefix): v for k, v in file.items() if k.startswith(prefix)}
        model = loaded(config, state, layout)
        with torch.no_grad():
            hidden, embedding = model.encode(ids)
        assert_close(hidden, expected[index][0])
        assert_close(embedding, expected[index][1])
    with pytest.raises(ValueError, match=r"strip the 'conditioner\.embedders\.N\.transformer\.'"):
        convert_text_encoder_state_dict(file, "ldm_sd2", SMALL_G)


def test_readout_arguments_override_the_config():
    """clip_skip and apply_final_norm choose any hidden state, normed or not; SD 1.x's default is unchanged."""
    ids = token_ids("sd15")
    config = SMALL_G
    reference = reference_model(config, with_projection=True)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
    model = loaded(config, reference.state_dict(), "diffusers")
    norm = reference.text_model.final_layer_norm
    with torch.no_grad():
        for clip_skip in range(1, config.num_layers + 1):
            raw = out.hidden_states[-clip_skip]
            assert_close(model(ids, clip_skip=clip_skip), raw)
            assert_close(model(ids, clip_skip=clip_skip, apply_final_norm=True), norm(raw))
        sd1_readout = dataclasses.replace(config, clip_skip=1, apply_final_norm=True)
        hidden, embedding = loaded(sd1_readout, reference.state_dict(), "diffusers").encode(ids)
        assert_close(hidden, out.last_hidden_state)
        assert_close(embedding, out.text_embeds)  # the pooled output never depends on the readout
    with pytest.raises(ValueError, match="apply_final_norm must be True or False, got 0"):
        model(ids, apply_final_norm=0)


# ---- The real sizes, without memory ----------------------------------------------------------------


@pytest.mark.parametrize(("preset", "folder_config"), [("sdxl-l", SDXL_TEXT_ENCODER),
                                                       ("sdxl-g", SDXL_TEXT_ENCODER_2)])
def test_real_sizes_load_from_both_layouts_on_meta(preset, folder_config):
    config = TextEncoderConfig.from_preset(preset)
    projected = config.projection_dim is not None
    cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    with torch.device("meta"):
        reference = cls(transformers.CLIPTextConfig(**folder_config))
        ours = TextEncoder(config)
    state = reference.state_dict()
    assert sum(t.numel() for t in ours.state_dict().values()) == sum(t.numel() for t in state.values())
    for layout in ("diffusers", "ldm_sd2") if projected else ("diffusers", "ldm_sd1"):
        model = loaded(config, layouts(state)[layout], layout)
        ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
        hidden, embedding = model.encode(ids)
        assert hidden.shape == (2, 77, config.width)
        assert embedding.shape == (2, config.projection_dim or config.width)
    # SDXL's U-Net cross-attends to both readouts concatenated (context_dim 2048) and takes bigG's embedding
    assert PRESETS["sdxl-l"].width + PRESETS["sdxl-g"].width == 2048 and PRESETS["sdxl-g"].projection_dim == 1280


# ---- Configs from diffusers folders ----------------------------------------------------------------


def test_published_folder_configs_are_the_presets():
    read = TextEncoderConfig.from_diffusers
    assert read(SD15_TEXT_ENCODER) == PRESETS["sd15"]
    assert read(SD21_TEXT_ENCODER) == PRESETS["sd21"]  # CLIPTextModel: its projection_dim 512 is unused
    assert with_sdxl_readout(read(SDXL_TEXT_ENCODER)) == PRESETS["sdxl-l"]
    assert with_sdxl_readout(read(SDXL_TEXT_ENCODER_2)) == PRESETS["sdxl-g"]
    assert read(SDXL_TEXT_ENCODER_2).clip_skip == 1  # config.json does not say which layer a pipeline reads


def test_absent_keys_take_clip_text_config_defaults():
    assert TextEncoderConfig.from_diffusers({}) == TextEncoderConfig.from_diffusers(
        transformers.CLIPTextConfig().to_dict())


@pytest.mark.parametrize("eos_token_id", [2, 49407], ids=["legacy-eos", "end-token-eos"])
def test_a_saved_folder_config_builds_a_model_that_matches(eos_token_id, tmp_path):
    """text_encoder_2/ as transformers' save_pretrained writes it (`architectures` included); under either of
    transformers' pooling rules (argmax id for eos_token_id 2, else the first eos_token_id) the embedding matches."""
    reference_config = clip_text_config(SMALL_G)
    reference_config.eos_token_id = eos_token_id
    torch.manual_seed(0)
    reference = transformers.CLIPTextModelWithProjection(reference_config).eval()
    reference.save_pretrained(tmp_path)
    config = TextEncoderConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert with_sdxl_readout(config) == SMALL_G
    model = loaded(config, reference.state_dict(), "diffusers")
    ids = token_ids("sd15")  # padded with the end token: the first one is the pooled position
    with torch.no_grad():
        out = reference(ids)
        hidden, embedding = model.encode(ids)
    assert_close(hidden, out.last_hidden_state)
    assert_close(embedding, out.text_embeds)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_act", "relu", "hidden_act 'relu'; allowed: quick_gelu, gelu"),
        ("hidden_act", "gelu_new", "hidden_act 'gelu_new'"),
        ("model_type", "t5", "model_type 't5'"),
        ("architectures", ["CLIPModel"], r"architectures=\['CLIPModel'\] .* CLIPTextModelWithProjection"),
        ("hidden_size", 0, "hidden_size must be an integer >= 1, got 0"),
        ("num_hidden_layers", 2.0, "num_hidden_layers must be an integer"),
        ("num_attention_heads", 7, "hidden_size=1280 is not divisible by num_attention_heads=7"),
        ("projection_dim", None, "projection_dim must be an integer >= 1, got None"),
        ("layer_norm_eps", 0, "layer_norm_eps must be a finite number > 0"),
        ("layer_norm_eps", "1e-5", "layer_norm_eps"),
        ("eos_token_id", 7, "eos_token_id=7 is not supported; allowed: 2 .* 49407"),
        ("eos_token_id", [49407], r"eos_token_id=\[49407\]"),
    ],
)
def test_unsupported_values_are_refused_by_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TextEncoderConfig.from_diffusers({**SDXL_TEXT_ENCODER_2, field: value})


def test_projection_dim_of_a_model_without_projection_is_not_read():
    assert TextEncoderConfig.from_diffusers({**SD21_TEXT_ENCODER, "projection_dim": None}) == PRESETS["sd21"]
    with pytest.raises(ValueError, match="JSON object"):
        TextEncoderConfig.from_diffusers([SD15_TEXT_ENCODER])


def test_bad_readout_config_names_the_field():
    with pytest.raises(ValueError, match="apply_final_norm must be True or False, got 'no'"):
        dataclasses.replace(PRESETS["sdxl-g"], apply_final_norm="no")
