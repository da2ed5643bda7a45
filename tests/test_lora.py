"""LoRA files applied to kedavra's models: each adapter type's ΔW against an independent computation of it, layer
names in every naming, the merge and its bitwise restore (packed bf16 weights included), the errors, A1111's prompt
tags, the infotext's "Lora hashes", the command line and the server. Parity with diffusers / peft on whole images is
in tests/test_lora_parity.py.

Models are tiny with random weights (tests/random_models.py); LoRA files are written here with known tensors.
"""

import hashlib
import json
import struct
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kedavra.adapters.lora_file import LoraFileError, find_loras, read_lora
from kedavra.adapters.lora_targets import kohya_names, target_table
from kedavra.adapters.prompt_tags import LoraTag, batch_lora_tags, split_lora_tags
from kedavra.checkpoint import save_model
from kedavra.cli import main
from kedavra.formats.png_info import read_parameters
from kedavra.pipeline.pipeline import LORA_HASHES_KEY, Pipeline
from tests.random_models import tiny_model

RANK = 4
Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"  # a (64, 64) Linear of the tiny U-Net
Q_KOHYA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
CONV = "unet.down_blocks.1.resnets.0.conv1"  # a (64, 32, 3, 3) Conv2d
CONV_KOHYA = "lora_unet_down_blocks_1_resnets_0_conv1"
TE_Q = "text_encoder.layers.0.attn.q_proj"  # a (64, 64) Linear of the tiny text encoder
TE_Q_KOHYA = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
GEN = {"steps": 2, "seed": 3, "width": 32, "height": 32}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def weight(model, path):
    return model.get_submodule(path).weight


def originals(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_restored(model, before):
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.fixture
def model():
    return tiny_model("tiny")


def lora_tensors(seed=0, alpha=2.0):
    """A kohya LoRA on one Linear and one conv (LoCon) of the U-Net and one text encoder Linear."""
    return {
        f"{Q_KOHYA}.lora_down.weight": randn(RANK, 64, seed=seed),
        f"{Q_KOHYA}.lora_up.weight": randn(64, RANK, seed=seed + 1),
        f"{Q_KOHYA}.alpha": torch.tensor(alpha),
        f"{CONV_KOHYA}.lora_down.weight": randn(RANK, 32, 3, 3, seed=seed + 2),
        f"{CONV_KOHYA}.lora_up.weight": randn(64, RANK, 1, 1, seed=seed + 3),
        f"{TE_Q_KOHYA}.lora_down.weight": randn(RANK, 64, seed=seed + 4),
        f"{TE_Q_KOHYA}.lora_up.weight": randn(64, RANK, seed=seed + 5),
    }


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "Lora"
    folder.mkdir()
    save_file(lora_tensors(), folder / "style.safetensors", metadata={"ss_network_dim": str(RANK)})
    return folder


# ---- each type's ΔW ----------------------------------------------------------------------------------------------


def test_lora_and_locon_deltas(model, lora_dir):
    """W' = W + s (α/r) Σ_k up[:, k] ⊗ down[k] for a Linear; a LoCon conv's ΔW is the 3x3 down conv followed by the
    1x1 up conv, checked by running the two convolutions."""
    t, before = lora_tensors(), originals(model)
    Pipeline(model, dtype="fp32", optimize=False).load_lora(lora_dir / "style.safetensors", 0.7)
    outer = sum(torch.outer(t[f"{Q_KOHYA}.lora_up.weight"][:, k], t[f"{Q_KOHYA}.lora_down.weight"][k])
                for k in range(RANK))
    torch.testing.assert_close(weight(model, Q), before[f"{Q}.weight"] + 0.7 * (2.0 / RANK) * outer)
    x = randn(1, 32, 8, 8, seed=9)
    down, up = t[f"{CONV_KOHYA}.lora_down.weight"], t[f"{CONV_KOHYA}.lora_up.weight"]
    sequential = F.conv2d(F.conv2d(x, down, padding=1), up)
    merged = F.conv2d(x, weight(model, CONV) - before[f"{CONV}.weight"], padding=1)
    torch.testing.assert_close(merged, 0.7 * sequential, rtol=1e-4, atol=1e-4)  # no alpha: scale 1


def test_locon_cp_form(model, tmp_path):
    """lora_mid between down (1x1) and up (1x1): three convolutions in a row."""
    down, mid, up = randn(RANK, 32, 1, 1, seed=1), randn(RANK, RANK, 3, 3, seed=2), randn(64, RANK, 1, 1, seed=3)
    save_file({f"{CONV_KOHYA}.lora_down.weight": down, f"{CONV_KOHYA}.lora_mid.weight": mid,
               f"{CONV_KOHYA}.lora_up.weight": up, f"{CONV_KOHYA}.alpha": torch.tensor(8.0)},
              tmp_path / "cp.safetensors")
    before = weight(model, CONV).clone()
    Pipeline(model, dtype="fp32", optimize=False).load_lora(tmp_path / "cp.safetensors")
    x = randn(1, 32, 8, 8, seed=9)
    expected = 2.0 * F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)  # α/r = 8/4
    torch.testing.assert_close(F.conv2d(x, weight(model, CONV) - before, padding=1), expected, rtol=1e-4, atol=1e-3)


def test_loha_delta(model, tmp_path):
    """ΔW = (α/r) (W1a W1b) ⊙ (W2a W2b), element by element."""
    w = {"hada_w1_a": randn(64, RANK, seed=1), "hada_w1_b": randn(RANK, 64, seed=2),
         "hada_w2_a": randn(64, RANK, seed=3), "hada_w2_b": randn(RANK, 64, seed=4)}
    save_file({f"{Q_KOHYA}.{k}": v for k, v in w.items()} | {f"{Q_KOHYA}.alpha": torch.tensor(1.0)},
              tmp_path / "loha.safetensors")
    before = weight(model, Q).clone()
    Pipeline(model, dtype="fp32", optimize=False).load_lora(tmp_path / "loha.safetensors")
    i, j = 5, 17
    first = sum(w["hada_w1_a"][i, k] * w["hada_w1_b"][k, j] for k in range(RANK))
    second = sum(w["hada_w2_a"][i, k] * w["hada_w2_b"][k, j] for k in range(RANK))
    torch.testing.assert_close(weight(model, Q)[i, j] - before[i, j], first * second / RANK, rtol=1e-4, atol=1e-5)


def test_loha_cp_form(model, tmp_path):
    """hada_t1 / hada_t2 rebuild each conv factor: W[p, r, k, l] = Σ_ij t[i, j, k, l] a[i, p] b[j, r]."""
    t1, t2 = randn(RANK, RANK, 3, 3, seed=1), randn(RANK, RANK, 3, 3, seed=2)
    a1, b1, a2, b2 = randn(RANK, 64, seed=3), randn(RANK, 32, seed=4), randn(RANK, 64, seed=5), randn(RANK, 32, seed=6)
    save_file({f"{CONV_KOHYA}.hada_t1": t1, f"{CONV_KOHYA}.hada_t2": t2, f"{CONV_KOHYA}.hada_w1_a": a1,
               f"{CONV_KOHYA}.hada_w1_b": b1, f"{CONV_KOHYA}.hada_w2_a": a2, f"{CONV_KOHYA}.hada_w2_b": b2},
              tmp_path / "loha_cp.safetensors")
    before = weight(model, CONV).clone()
    Pipeline(model, dtype="fp32", optimize=False).load_lora(tmp_path / "loha_cp.safetensors")

    def factor(t, a, b, p, r, k, l):
        return sum(t[i, j, k, l] * a[i, p] * b[j, r] for i in range(RANK) for j in range(RANK))

    p, r, k, l = 10, 3, 2, 0
    expected = factor(t1, a1, b1, p, r, k, l) * factor(t2, a2, b2, p, r, k, l)  # no alpha: scale 1
    torch.testing.assert_close(weight(model, CONV)[p, r, k, l] - before[p, r, k, l], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decomposed", [True, False])
def test_lokr_delta(model, tmp_path, decomposed):
    """ΔW = scale · W1 ⊗ W2: block (a, b) of ΔW is W1[a, b] · W2; scale α/r when W2 is a rank-r product, 1 when both
    factors are whole (A1111's network_lokr)."""
    w1, w2_a, w2_b = randn(4, 8, seed=1), randn(16, 2, seed=2), randn(2, 8, seed=3)
    tensors = {f"{Q_KOHYA}.lokr_w1": w1, f"{Q_KOHYA}.alpha": torch.tensor(1.0)}
    if decomposed:
        tensors |= {f"{Q_KOHYA}.lokr_w2_a": w2_a, f"{Q_KOHYA}.lokr_w2_b": w2_b}
    else:
        tensors[f"{Q_KOHYA}.lokr_w2"] = w2_a @ w2_b
    save_file(tensors, tmp_path / "lokr.safetensors")
    before = weight(model, Q).clone()
    Pipeline(model, dtype="fp32", optimize=False).load_lora(tmp_path / "lokr.safetensors")
    delta = weight(model, Q) - before
    scale = 0.5 if decomposed else 1.0  # α / r = 1 / 2
    for a, b in ((0, 0), (3, 7), (2, 5)):
        block = delta[a * 16:(a + 1) * 16, b * 8:(b + 1) * 8]
        torch.testing.assert_close(block, scale * w1[a, b] * (w2_a @ w2_b), rtol=1e-4, atol=1e-5)


def test_full_diff_and_bias(model, tmp_path):
    diff, diff_b = randn(64, 64, seed=1), randn(64, seed=2)
    save_file({f"{Q_KOHYA}.diff": diff}, tmp_path / "full.safetensors")
    proj = "text_encoder.layers.0.mlp.fc_in"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.diff": randn(256, 64, seed=3),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.diff_b": diff_b.repeat(4)}, tmp_path / "bias.safetensors")
    before = originals(model)
    pipe = Pipeline(model, dtype="fp32", optimize=False)
    pipe.load_lora(tmp_path / "full.safetensors", 0.5)
    pipe.load_lora(tmp_path / "bias.safetensors")
    torch.testing.assert_close(weight(model, Q), before[f"{Q}.weight"] + 0.5 * diff)
    torch.testing.assert_close(model.get_submodule(proj).bias, before[f"{proj}.bias"] + diff_b.repeat(4))
    pipe.unload_lora()
    assert_restored(model, before)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora(model, tmp_path, axis):
    """W' = m (W + ΔW) / ‖W + ΔW‖ with the norm per output row (m: one per output channel, PEFT) or per input column
    (m: one per input channel, older LyCORIS / A1111); strength s gives W + s (W' - W)."""
    down, up = randn(RANK, 64, seed=1), randn(64, RANK, seed=2)
    m = randn(64, seed=3).abs() + 0.5
    scale = m[:, None] if axis == "output" else m[None, :]
    save_file({f"{Q_KOHYA}.lora_down.weight": down, f"{Q_KOHYA}.lora_up.weight": up,
               f"{Q_KOHYA}.dora_scale": scale}, tmp_path / "dora.safetensors")
    before = weight(model, Q).clone()
    Pipeline(model, dtype="fp32", optimize=False).load_lora(tmp_path / "dora.safetensors", 0.5)
    combined = before + up @ down
    if axis == "output":
        decomposed = torch.stack([m[o] * combined[o] / combined[o].norm() for o in range(64)])
    else:
        decomposed = torch.stack([m[i] * combined[:, i] / combined[:, i].norm() for i in range(64)], dim=1)
    torch.testing.assert_close(weight(model, Q), before + 0.5 * (decomposed - before), rtol=1e-5, atol=1e-5)


# ---- names -------------------------------------------------------------------------------------------------------


def test_peft_and_kohya_names_apply_the_same(tmp_path):
    """diffusers / PEFT dotted names (lora_A / lora_B, component prefixes), diffusers' older lora.down / lora.up and
    kohya's names give bitwise the same weights."""
    t = lora_tensors()
    dotted = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    peft = {f"{dotted}.lora_A.weight": t[f"{Q_KOHYA}.lora_down.weight"],
            f"{dotted}.lora_B.weight": t[f"{Q_KOHYA}.lora_up.weight"],
            "unet.down_blocks.1.resnets.0.conv1.lora.down.weight": t[f"{CONV_KOHYA}.lora_down.weight"],
            "unet.down_blocks.1.resnets.0.conv1.lora.up.weight": t[f"{CONV_KOHYA}.lora_up.weight"],
            f"{te}.lora_A.weight": t[f"{TE_Q_KOHYA}.lora_down.weight"],
            f"{te}.lora_B.weight": t[f"{TE_Q_KOHYA}.lora_up.weight"]}
    kohya = dict(t)
    del kohya[f"{Q_KOHYA}.alpha"]  # PEFT files carry no alpha: scale 1
    save_file(peft, tmp_path / "peft.safetensors")
    save_file(kohya, tmp_path / "kohya.safetensors")
    models = []
    for name in ("peft", "kohya"):
        model = tiny_model("tiny")
        Pipeline(model, dtype="fp32", optimize=False).load_lora(tmp_path / f"{name}.safetensors")
        models.append(model.state_dict())
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key


def test_sdxl_names():
    """SDXL: kohya's SGM U-Net names and lora_te1_ / lora_te2_ find the same layers as diffusers' dotted names
    (tiny-sdxl: one res block per level, so input_blocks 1 conv, 2 downsampler, 3 the attention level)."""
    model = tiny_model("tiny-sdxl")
    table = target_table(model)
    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert table["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"] == path
    assert table["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == path
    assert table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] == path
    assert table["lora_unet_middle_block_1_proj_in"] == "unet.mid_block.attentions.0.proj_in"
    assert table["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == "text_encoder.layers.0.attn.q_proj"
    assert table["lora_te2_text_model_encoder_layers_0_mlp_fc2"] == "text_encoder_2.layers.0.mlp.fc_out"
    out_proj = "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj"
    assert table[out_proj] == "text_encoder_2.layers.0.attn.out_proj"
    names = kohya_names(model)
    assert names[path] == "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # kohya's SDXL naming
    assert names["text_encoder_2.layers.0.attn.q_proj"] == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    assert all(table[name] == path for path, name in names.items())
    sd1 = kohya_names(tiny_model("tiny"))
    assert sd1[Q] == Q_KOHYA and sd1[TE_Q] == TE_Q_KOHYA  # kohya's SD 1.x naming: diffusers' names


# ---- merge and restore -------------------------------------------------------------------------------------------


def test_bf16_packed_merge_matches_a_merged_model_and_restores_bitwise(lora_dir):
    """With bf16 packed CPU weights: a LoRA'd pipeline gives the latents of a pipeline whose weights were merged
    beforehand (so stale packed copies are never used), and unloading gives back the first latents bitwise."""
    model = tiny_model("tiny")
    pipe = Pipeline(model, dtype="bf16")
    before, plain = originals(model), pipe("a cat", **GEN).latents
    pipe.load_lora(lora_dir / "style.safetensors", 0.8)
    with_lora = pipe("a cat", **GEN).latents
    merged_state = originals(model)
    pipe.unload_lora()
    assert_restored(model, before)
    assert torch.equal(pipe("a cat", **GEN).latents, plain)
    other = tiny_model("tiny")
    other.load_state_dict(merged_state)
    assert torch.equal(Pipeline(other, dtype="bf16")("a cat", **GEN).latents, with_lora)
    assert not torch.equal(with_lora, plain)


def test_stacked_loras_add_and_unload_one(model, tmp_path):
    save_file(lora_tensors(seed=0), tmp_path / "a.safetensors")
    save_file(lora_tensors(seed=10), tmp_path / "b.safetensors")
    before = originals(model)
    pipe = Pipeline(model, dtype="fp32", optimize=False)
    pipe.load_lora(tmp_path / "a.safetensors", 0.5)
    only_a = weight(model, Q).clone()
    pipe.load_lora(tmp_path / "b.safetensors", 0.25)
    delta_b = weight(model, Q) - only_a
    pipe.unload_lora("a")
    torch.testing.assert_close(weight(model, Q) - before[f"{Q}.weight"], delta_b, rtol=1e-5, atol=1e-6)
    assert [use.lora.name for use in pipe.loras] == ["b"]
    with pytest.raises(ValueError, match="no LoRA named 'a' is loaded"):
        pipe.unload_lora("a")
    pipe.unload_lora()
    assert_restored(model, before)


def test_text_encoder_and_unet_weights_apart(model, lora_dir):
    """A1111's <lora:NAME:TE:UNET>: 0 for the text encoder leaves its layers bitwise alone."""
    before = originals(model)
    Pipeline(model, dtype="fp32", optimize=False).load_lora(lora_dir / "style.safetensors", 1.0,
                                                             text_encoder_weight=0.0)
    assert torch.equal(weight(model, TE_Q), before[f"{TE_Q}.weight"])
    assert not torch.equal(weight(model, Q), before[f"{Q}.weight"])


# ---- errors ------------------------------------------------------------------------------------------------------


def test_files_that_are_no_lora(tmp_path):
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(LoraFileError, match="has no LoRA tensors.*model.diffusion_model.conv_in.weight"):
        read_lora(tmp_path / "ckpt.safetensors")
    save_file({f"{Q_KOHYA}.oft_blocks": torch.zeros(1)}, tmp_path / "oft.safetensors")
    with pytest.raises(LoraFileError, match="is OFT, which kedavra does not apply"):
        read_lora(tmp_path / "oft.safetensors")
    save_file({f"{Q_KOHYA}.lora_down.weight": torch.zeros(4, 64)}, tmp_path / "half.safetensors")
    with pytest.raises(LoraFileError, match="lacks lora_up.weight"):
        read_lora(tmp_path / "half.safetensors")
    (tmp_path / "text.safetensors").write_text("not weights")
    with pytest.raises(ValueError, match="text.safetensors"):
        read_lora(tmp_path / "text.safetensors")


def test_unmatched_layers_refused_or_skipped(model, tmp_path):
    tensors = lora_tensors() | {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8),
                                "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4)}
    save_file(tensors, tmp_path / "extra.safetensors")
    pipe = Pipeline(model, dtype="fp32", optimize=False)
    before = originals(model)
    with pytest.raises(LoraFileError, match=r"1 of its 4 layers match no layer.*lora_unet_no_such_layer"):
        pipe.load_lora(tmp_path / "extra.safetensors")
    assert_restored(model, before)
    with pytest.warns(UserWarning, match="lora_unet_no_such_layer"):
        pipe.load_lora(tmp_path / "extra.safetensors", strict=False)
    assert not torch.equal(weight(model, Q), before[f"{Q}.weight"])


def test_lora_for_another_architecture(model, tmp_path):
    """An SDXL LoRA on SD 1.x: its bigG layers (lora_te2_) name no layer, and the refusal names SDXL (lora_te1_ alone
    would not: diffusers writes it for SD 1.x too, and it is read there); an SD 2.x-shaped one on SD 1.x names does
    not fit. Both errors name the LoRA's architecture, and the model is left as it was."""
    te1, te2 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{te1}.lora_down.weight": torch.zeros(4, 768), f"{te1}.lora_up.weight": torch.zeros(768, 4),
               f"{te2}.lora_down.weight": torch.zeros(4, 1280), f"{te2}.lora_up.weight": torch.zeros(5120, 4)},
              tmp_path / "xl.safetensors")
    pipe = Pipeline(model, dtype="fp32", optimize=False)
    with pytest.raises(LoraFileError, match=r"\(a LoRA for SDXL\): 1 of its 2 layers match no layer of this tiny"):
        pipe.load_lora(tmp_path / "xl.safetensors")
    with pytest.raises(LoraFileError, match=r"'xl' \(made for SDXL\) does not fit this tiny model at text_encoder"):
        pipe.load_lora(tmp_path / "xl.safetensors", strict=False)
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd2 = {f"{k}.lora_down.weight": torch.zeros(4, 1024), f"{k}.lora_up.weight": torch.zeros(64, 4)}
    save_file(lora_tensors() | sd2, tmp_path / "sd2.safetensors")
    before = originals(model)
    with pytest.raises(LoraFileError, match=r"'sd2' \(made for SD 2.x\) does not fit this tiny model at unet\."):
        pipe.load_lora(tmp_path / "sd2.safetensors")
    assert_restored(model, before)


def test_lora_folder_duplicates_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    save_file(lora_tensors(), tmp_path / "one.safetensors")
    save_file(lora_tensors(), tmp_path / "sub" / "two.safetensors")
    assert set(find_loras(tmp_path)) == {"one", "two"}
    save_file(lora_tensors(), tmp_path / "sub" / "one.safetensors")
    with pytest.raises(ValueError, match="two LoRA files are named 'one'"):
        find_loras(tmp_path)
    pipe = Pipeline(tiny_model("tiny"), dtype="fp32", optimize=False)
    with pytest.raises(FileNotFoundError, match="no LoRA folder is set"):
        pipe("a <lora:one:1>", **GEN)


# ---- prompt tags -------------------------------------------------------------------------------------------------


def test_tag_forms():
    assert split_lora_tags("a cat <lora:x>, <lora:y:0.5>") == ("a cat , ", (LoraTag("x"), LoraTag("y", 0.5, 0.5)))
    assert split_lora_tags("<lora:x:0.2:0.9>")[1] == (LoraTag("x", 0.2, 0.9),)
    assert split_lora_tags("<lora:x:te=0.3:unet=-1>")[1] == (LoraTag("x", 0.3, -1.0),)
    assert split_lora_tags("<lyco:x:te=0.3>")[1] == (LoraTag("x", 0.3, 0.3),)
    assert split_lora_tags("plain (text:1.2)") == ("plain (text:1.2)", ())
    for bad, message in (("<lora:x:abc>", "'abc' is not a number"), ("<hypernet:x:1>", "not 'hypernet'"),
                         ("<lora:x:1:1:8>", "dynamic rank"), ("<lora:x:dyn=8>", "named argument 'dyn'"),
                         ("<lora:x:inf>", "'inf' is not a number")):
        with pytest.raises(ValueError, match=message):
            split_lora_tags(bad)
    with pytest.raises(ValueError, match="prompt 1 of the batch names the LoRAs none"):
        batch_lora_tags(("a <lora:x:1>", "b"))


def test_tags_in_prompts(model, lora_dir):
    """A tag merges its LoRA for that call (and is not encoded as text); weight 0, or no tag, gives the plain image;
    the result's parameters carry A1111's Lora hashes: the SHA-256 of the tensor data after the header."""
    pipe = Pipeline(model, dtype="fp32", lora_dir=lora_dir)
    plain = pipe("a cat", **GEN)
    zero = pipe("a cat <lora:style:0>", **GEN)
    assert torch.equal(zero.latents, plain.latents)
    styled = pipe("a cat <lora:style:0.8>", **GEN)
    assert not torch.equal(styled.latents, plain.latents)
    data = (lora_dir / "style.safetensors").read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    assert styled.parameters == {LORA_HASHES_KEY: f"style: {hashlib.sha256(data[8 + header:]).hexdigest()[:12]}"}
    assert torch.equal(pipe("a cat", **GEN).latents, plain.latents)  # the tag's LoRA is gone again
    assert plain.parameters == {}
    save_file(lora_tensors(), lora_dir / "kohya.safetensors", metadata={"sshs_model_hash": "ab" * 32})
    assert pipe("a <lora:kohya:1>", **GEN).parameters[LORA_HASHES_KEY] == "kohya: " + "ab" * 6


# ---- command line and server -------------------------------------------------------------------------------------


def test_generate_command(tmp_path, lora_dir, capsys):
    model_path = tmp_path / "tiny.safetensors"
    save_model(tiny_model("tiny"), model_path)
    common = ["--model", model_path, "--steps", "2", "--seed", "1", "--precision", "fp32", "-q"]
    assert main(["generate", "a cat <lora:style:0.6>", "--lora-dir", str(lora_dir), *map(str, common),
                 "-o", str(tmp_path / "tag.png")]) == 0
    params = read_parameters(tmp_path / "tag.png")
    assert params.prompt == "a cat <lora:style:0.6>" and params.extra[LORA_HASHES_KEY].startswith("style: ")
    assert main(["generate", "--from-png", str(tmp_path / "tag.png"), "--lora-dir", str(lora_dir),
                 *map(str, common), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "tag.png").read_bytes()
    assert main(["generate", "a cat", "--lora", f"{lora_dir / 'style.safetensors'}:0.6", *map(str, common),
                 "-o", str(tmp_path / "flag.png")]) == 0
    assert read_parameters(tmp_path / "flag.png").extra[LORA_HASHES_KEY] == params.extra[LORA_HASHES_KEY]
    capsys.readouterr()
    assert main(["generate", "--from-png", str(tmp_path / "flag.png"), *map(str, common),
                 "-o", str(tmp_path / "noted.png")]) == 0
    assert "outside its prompt's tags; give them with --lora" in capsys.readouterr().err
    for argv, message in ((["--lora", "missing"], "LoRA 'missing': no such file, and no LoRA folder is set"),
                          (["--lora", "style:x", "--lora-dir", str(lora_dir)], "the weight after the last ':'"),
                          (["--lora-dir", str(tmp_path / "nope")], "--lora-dir .* does not exist")):
        assert main(["generate", "a cat", *argv, *map(str, common), "-o", str(tmp_path / "x.png")]) == 2
        assert message.split(".*")[0] in capsys.readouterr().err


def test_server_loras(tmp_path, lora_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kedavra.api import load
    from kedavra.serving.app import ServerConfig, create_app
    from kedavra.serving.worker import ModelCatalog, Worker

    model_path = tmp_path / "tiny.safetensors"
    save_model(tiny_model("tiny"), model_path)
    loader = lambda path: load(path, dtype="fp32", lora_dir=lora_dir)  # noqa: E731
    catalog = ModelCatalog(None, initial=model_path)
    worker = Worker(loader(model_path), catalog.identify(catalog.entries()[0]), catalog, loader)
    app = create_app(worker, ServerConfig(api_key=None, max_body_bytes=2**20))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        listing = client.get("/sdapi/v1/loras").json()
        assert listing == [{"name": "style", "alias": "style", "path": str(lora_dir / "style.safetensors"),
                            "metadata": {"ss_network_dim": str(RANK)}}]
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        body = {"prompt": "a cat <lora:style:0.5>", "steps": 2, "seed": 1, "width": 32, "height": 32}
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200
        info = json.loads(response.json()["info"])
        assert info["extra_generation_params"][LORA_HASHES_KEY].startswith("style: ")
        assert "Lora hashes: \"style: " in info["infotexts"][0]
        missing = client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a <lora:nope:1>"})
        assert missing.status_code == 422 and "no LoRA of that name" in missing.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker.stop()


def test_a_safetensors_header_length_starting_with_byte_0x80_is_not_a_pickle(tmp_path):
    """A header of 0x180 bytes starts the file with 0x80, the pickle protocol opcode: still read as safetensors, its
    metadata kept (one file in 256 has such a length)."""
    from kedavra.checkpoint.weights import read_weights

    header = json.dumps({"__metadata__": {"ss_network_dim": "4"},
                         "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x180 - len(header))
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.5))
    weights = read_weights(tmp_path / "w.safetensors")
    assert weights.container == "safetensors" and weights.metadata == {"ss_network_dim": "4"}
    assert weights.tensors["w"].tolist() == [1.5]
