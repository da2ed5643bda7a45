"""kedavra.checkpoint's answers to bad input: files that are no checkpoint, Git-LFS pointers, truncated or corrupt
safetensors, other architectures, missing and unexpected keys, bad arguments (the oracles and fixtures are
tests/reference_models.py's; pickled code that must be refused without running: test_torch_pickle.py)."""

import json

import pytest
import torch
from reference_models import (
    write_diffusers,
    write_original,
)
from safetensors.torch import save_file

from kedavra.checkpoint import (
    CheckpointError,
    SafetensorsFile,
    load_model,
)
from kedavra.networks.model import PRESETS


def test_not_a_checkpoint(tmp_path):
    cases = {
        "image.safetensors": (b"\x89PNG\r\n\x1a\n" + bytes(100), "a PNG image, not a checkpoint"),
        "notes.ckpt": (b"just some notes\n", "not a checkpoint: a text file"),
        "page.safetensors": (b"<!DOCTYPE html><html>404</html>", "an HTML page"),
        "empty.safetensors": (b"", "empty file"),
        "noise.bin": (bytes(range(150, 250)), r"unrecognised content"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name}: .*{message}"):
            load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such file"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers model folder: no unet/"):
        load_model(tmp_path)


def test_git_lfs_pointer(tmp_path):
    pointer = tmp_path / "v1-5-pruned-emaonly.safetensors"
    pointer.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa\nsize 4265146304\n"
    )
    with pytest.raises(CheckpointError, match=r"v1-5-pruned-emaonly.safetensors: a Git LFS pointer.*`git lfs pull`"):
        load_model(pointer)


def test_truncated_and_corrupt_safetensors(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"cut.safetensors: truncated \.safetensors: the header describes \d+ "
        r"bytes of tensor data but the file holds only \d+",
    ):
        load_model(cut)
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"header_cut.safetensors: truncated .* the header alone should be"):
        load_model(header_cut)
    bloated = tmp_path / "bloated.safetensors"
    bloated.write_bytes((2 * len(data)).to_bytes(8, "little") + data[8:])  # a header longer than the file
    with pytest.raises(CheckpointError, match=rf"bloated.safetensors: truncated .* should be {2 * len(data)} bytes"):
        load_model(bloated)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(data[:9] + b"\xff" * 20 + data[29:])
    with pytest.raises(
        CheckpointError, match="garbled.safetensors: corrupt .safetensors: the header is not valid JSON"
    ):
        load_model(garbled)


def test_wrong_architecture_names_what_was_expected(tmp_path):
    sd3 = {
        "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(6, 2),
        "model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 2),
    }
    save_file(sd3, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"sd3.safetensors: this looks like a Stable Diffusion 3 .* kedavra does not run it as a full model.* "
        r"stored as model\.diffusion_model\.\* \(U-Net\), first_stage_model",
    ):
        load_model(tmp_path / "sd3.safetensors")
    sdxl_text_only = {"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8),
                      "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}
    save_file(sdxl_text_only, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint: no first_stage_model.* and no "
                                              r"conditioner\.embedders\.0\.\* \(text encoder\)"):
        load_model(tmp_path / "sdxl.safetensors")
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(())}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="lora.safetensors: this looks like a LoRA"):
        load_model(tmp_path / "lora.safetensors")
    save_file({"weight": torch.ones(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"other.safetensors: unknown architecture: no U-Net weights \(1 keys"):
        load_model(tmp_path / "other.safetensors")


def test_unknown_width_is_an_unknown_architecture(tiny_refs, tmp_path):
    tensors = dict(
        SafetensorsFile(write_original(tmp_path / "a.safetensors", tiny_refs["tiny"], PRESETS["tiny"])).tensors()
    )
    key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    tensors[key] = torch.zeros(64, 48)
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"b.safetensors: unknown architecture \(U-Net cross-attention width 48"):
        load_model(tmp_path / "b.safetensors")


def test_missing_and_unexpected_keys_are_counted_and_named(tiny_file, tmp_path):
    tensors = {k: v.clone() for k, v in SafetensorsFile(tiny_file).tensors().items()}
    dropped = sorted(k for k in tensors if k.startswith("model.diffusion_model.output_blocks.1."))
    for key in dropped:
        del tensors[key]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=rf"missing.safetensors: U-Net state dict .* {len(dropped)} missing keys "
        r"\[output_blocks\.1\.0\.emb_layers",
    ):
        load_model(tmp_path / "missing.safetensors")
    tensors = {k: v.clone() for k, v in SafetensorsFile(tiny_file).tensors().items()}
    tensors["model.diffusion_model.extra.weight"] = torch.zeros(2)
    tensors["mystery"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"extra.safetensors: 1 unexpected keys outside .*: mystery"):
        load_model(tmp_path / "extra.safetensors")
    del tensors["mystery"]
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \[extra.weight\]"):
        load_model(tmp_path / "extra.safetensors")


def test_diffusers_folder_whose_vocabulary_does_not_fit_its_text_encoder(tiny_refs, tmp_path):
    folder = write_diffusers(tmp_path / "model", tiny_refs["tiny"], PRESETS["tiny"])
    tokens = {"a</w>": 0, "b</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(CheckpointError, match="merges.txt: missing: a BPE vocabulary of the model's own"):
        load_model(folder)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(tokens))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match=r"text encoder \(vocab_size=49408.*does not fit the tokenizer "
                                              r"\(vocabulary 4, max_length 77\)"):
        load_model(folder)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown family 'sd3'; allowed: sd15, "):
        load_model("x.safetensors", family="sd3")
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        load_model("x.safetensors", prediction_type="x0")
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        load_model("x.safetensors", dtype=torch.int8)
