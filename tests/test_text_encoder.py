"""CLIP text encoder: parity with transformers' CLIPTextModel, checkpoint layouts, clip skip, errors.

The reference is transformers' CLIPTextModel (what diffusers runs for SD 1.x and 2.x) built from
tests/reference_models.py's CLIPTextConfig with seeded random weights. Inputs are real, padded token ids from
kedavra's tokenizer.
"""

import dataclasses

import pytest
import torch
import transformers
from reference_models import clip_text_config

from kedavra.networks.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    convert_text_encoder_state_dict,
    to_diffusers_state_dict,
)
from kedavra.networks.tokenizer import Tokenizer

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 4K, highly detailed, trending on artstation",
    "cat " * 80,  # truncated: the end token sits at the last position
]
TOLERANCE = 1e-4  # fp32, max abs difference


def reference_model(config: TextEncoderConfig, with_projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(clip_text_config(config)).eval()
    with torch.no_grad():  # transformers initialises LayerNorms to (1, 0) and biases to 0: make them count
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def token_ids(preset: str) -> torch.Tensor:
    with pytest.warns(UserWarning, match="dropped"):
        return Tokenizer.from_preset(preset)(PROMPTS)


def loaded(config: TextEncoderConfig, state, layout: str) -> TextEncoder:
    with torch.device("meta"):
        model = TextEncoder(config)
    model.load_state_dict(convert_text_encoder_state_dict(state, layout, config), strict=True, assign=True)
    return model.eval()


def to_open_clip_names(state, extra_layers: int = 0) -> dict[str, torch.Tensor]:
    """transformers' names -> OpenCLIP's (the SD 2.x single file, `cond_stage_model.model.` stripped):
    q/k/v packed into in_proj, text_projection stored as (D, P); plus what the file holds and SD 2.x
    does not use (resblocks past ours, logit_scale)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        "logit_scale": torch.tensor(4.6052),
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].t().contiguous()
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(len(layers) + extra_layers):
        theirs, ours = f"transformer.resblocks.{i}", f"encoder.layers.{min(i, len(layers) - 1)}"
        for leaf in ("weight", "bias"):
            qkv = [state[f"{ours}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"{theirs}.attn.in_proj_{leaf}"] = torch.cat(qkv)
            out[f"{theirs}.attn.out_proj.{leaf}"] = state[f"{ours}.self_attn.out_proj.{leaf}"]
            for hf_name, oc_name in renames.items():
                out[f"{theirs}.{oc_name}.{leaf}"] = state[f"{ours}.{hf_name}.{leaf}"]
    return out


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    error = (ours - theirs).abs().max().item()
    assert error < TOLERANCE, f"max abs error {error:.3g}"


def check_parity(config: TextEncoderConfig, preset: str, layouts=("diffusers",)) -> None:
    reference = reference_model(config)
    ids = token_ids(preset)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        penultimate = reference.final_layer_norm(expected.hidden_states[-2])
    assert expected.last_hidden_state.std() > 0.5  # not a degenerate random model
    state = reference.state_dict()
    sources = {
        "diffusers": state,
        "ldm_sd1": {f"text_model.{k}": v for k, v in state.items()},
        "ldm_sd2": to_open_clip_names(state, extra_layers=1),
    }
    for layout in layouts:
        model = loaded(config, sources[layout], layout)
        with torch.no_grad():
            hidden = model(ids)
            assert_close(hidden, expected.last_hidden_state)
            assert_close(model.pool(hidden, ids), expected.pooler_output)
            assert_close(model(ids, clip_skip=2), penultimate)


# ---- Parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_tiny_matches_transformers_in_every_layout(activation):
    config = dataclasses.replace(TextEncoderConfig.from_preset("tiny"), activation=activation)
    check_parity(config, "sd15" if activation == "quick_gelu" else "sd21", ("diffusers", "ldm_sd1", "ldm_sd2"))


@pytest.mark.slow
def test_sd15_matches_transformers():
    check_parity(TextEncoderConfig.from_preset("sd15"), "sd15", ("diffusers", "ldm_sd1"))


@pytest.mark.slow
def test_sd21_matches_transformers():
    # diffusers' SD 2.x text encoder: 23 layers, GELU, width 1024, 16 heads, MLP 4096; the file has 24
    check_parity(TextEncoderConfig.from_preset("sd21"), "sd21", ("diffusers", "ldm_sd2"))


def test_projection_matches_clip_text_model_with_projection():
    config = dataclasses.replace(TextEncoderConfig.from_preset("tiny"), projection_dim=48)
    reference = reference_model(config, with_projection=True)
    ids = token_ids("sd21")
    with torch.no_grad():
        expected = reference(ids).text_embeds
    state = reference.state_dict()
    for layout, source in (("diffusers", state), ("ldm_sd2", to_open_clip_names(state))):
        model = loaded(config, source, layout)
        with torch.no_grad():
            assert_close(model.project(TextEncoder.pool(model(ids), ids)), expected)


def test_pool_takes_the_first_end_token():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    ids = torch.tensor([[49406, 320, 49407, 49407, 49407], [49406, 320, 2368, 49407, 0]])
    assert TextEncoder.pool(hidden, ids).tolist() == [hidden[0, 2].tolist(), hidden[1, 3].tolist()]


# ---- Checkpoint layouts ----------------------------------------------------------------------------


def test_old_checkpoint_extras_are_accepted():
    """SD 1.x files carry transformers' position_ids buffer; some lack the `text_model.` prefix."""
    config = TextEncoderConfig.from_preset("tiny")
    state = reference_model(config).state_dict()
    state["embeddings.position_ids"] = torch.arange(77)[None]
    model = loaded(config, state, "ldm_sd1")
    assert torch.equal(model.layers[1].mlp.fc_out.bias, state["encoder.layers.1.mlp.fc2.bias"])


def test_conversion_makes_views_not_copies():
    config = TextEncoderConfig.from_preset("tiny")
    source = to_open_clip_names(reference_model(config).state_dict(), extra_layers=1)
    converted = convert_text_encoder_state_dict(source, "ldm_sd2", config)
    in_proj = source["transformer.resblocks.1.attn.in_proj_weight"]
    assert converted["layers.1.attn.v_proj.weight"].untyped_storage().data_ptr() == in_proj.untyped_storage().data_ptr()
    assert converted["token_embedding.weight"] is source["token_embedding.weight"]


def test_diffusers_round_trip():
    config = TextEncoderConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = TextEncoder(config)
    saved = to_diffusers_state_dict(model.state_dict(), config)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in saved
    reference = transformers.CLIPTextModel(clip_text_config(config))
    reference.load_state_dict({k.removeprefix("text_model."): v for k, v in saved.items()}, strict=True)
    ids = token_ids("sd15")
    with torch.no_grad():
        assert_close(model(ids), reference(ids).last_hidden_state)


def test_missing_and_unexpected_keys_are_listed():
    config = TextEncoderConfig.from_preset("tiny")
    complete = reference_model(config).state_dict()
    state = dict(complete)
    del state["encoder.layers.0.mlp.fc1.weight"]
    state["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \[encoder.layers.0.mlp.fc1.weight\].*1 unexpected"):
        convert_text_encoder_state_dict(state, "diffusers", config)
    prefixed = {f"cond_stage_model.model.{k}": v for k, v in to_open_clip_names(complete).items()}
    with pytest.raises(ValueError, match="strip the"):
        convert_text_encoder_state_dict(prefixed, "ldm_sd2", config)
    with pytest.raises(ValueError, match="layout 'ldm'"):
        convert_text_encoder_state_dict(state, "ldm", config)


def test_wrong_shapes_are_listed():
    state = reference_model(TextEncoderConfig.from_preset("tiny")).state_dict()
    wider = dataclasses.replace(TextEncoderConfig.from_preset("tiny"), width=128)
    with pytest.raises(ValueError, match=r"wrong shape: .*embeddings.token_embedding.weight: \(49408, 64\)"):
        convert_text_encoder_state_dict(state, "diffusers", wider)


# ---- Config and inputs -----------------------------------------------------------------------------


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = TextEncoder(TextEncoderConfig.from_preset("sd21"))
    assert model.position_embedding.is_meta and len(model.layers) == 23


def test_clip_skip_default_comes_from_config():
    config = dataclasses.replace(TextEncoderConfig.from_preset("tiny"), clip_skip=2)
    torch.manual_seed(0)
    model = TextEncoder(config)
    ids = Tokenizer.from_preset("sd15")("a photo of a cat")
    assert torch.equal(model(ids), model(ids, clip_skip=2))
    assert not torch.equal(model(ids), model(ids, clip_skip=1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 0),
        ("num_heads", 5),  # 64 is not divisible by 5
        ("num_layers", 2.0),
        ("activation", "relu"),
        ("layer_norm_eps", 0.0),
        ("clip_skip", 3),  # tiny has 2 layers
        ("projection_dim", -1),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TextEncoderConfig.from_preset("tiny"), **{field: value})


def test_bad_inputs_are_rejected():
    model = TextEncoder(TextEncoderConfig.from_preset("tiny"))
    ids = torch.zeros(1, 77, dtype=torch.long)
    with pytest.raises(ValueError, match="clip_skip"):
        model(ids, clip_skip=3)
    with pytest.raises(ValueError, match="at most 77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match="no text projection"):
        model.project(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="sd15"):
        TextEncoderConfig.from_preset("sdxl")
