"""The safetensors container (kedavra/checkpoint/safetensors_io.py): weights alias the memory-mapped file where the
dtypes agree (copy-on-write: the file is never written) and are converted a tensor at a time where they do not;
save_model never rewrites bytes a model aliases; the reader and writer agree with the safetensors library; a
full-size fp16 file loads into an fp32 model near the fp32 size (slow)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from reference_models import write_original
from safetensors import safe_open
from safetensors.torch import save_file

from kedavra.checkpoint import SafetensorsFile, load_model, save_model, write_safetensors
from kedavra.networks.model import PRESETS

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_saving_over_the_file_the_model_aliases(tiny_file, tmp_path):
    """Weights alias the mapped file; save_model writes a new file and renames it over the old one, so the
    model never reads bytes being rewritten."""
    path = tmp_path / "k.safetensors"
    save_model(load_model(tiny_file), path)
    model = load_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in load_model(path).state_dict().items())


def mapped_ranges(path: pathlib.Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (Linux /proc/self/maps)."""
    ranges = []
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_weights_alias_the_file_when_dtypes_agree_and_are_converted_otherwise(tiny_refs, tmp_path):
    path = write_original(tmp_path / "h.safetensors", tiny_refs["tiny"], PRESETS["tiny"], dtype=torch.float16)
    reference = SafetensorsFile(path).tensor("model.diffusion_model.input_blocks.0.0.weight").clone()
    as_stored = load_model(path, dtype=torch.float16)
    converted = load_model(path)  # fp16 file -> fp32 model: a copy per tensor
    ranges = mapped_ranges(path.resolve())
    inside = lambda t: any(low <= t.data_ptr() < high for low, high in ranges)  # noqa: E731
    assert all(inside(p) for p in as_stored.parameters())  # no copy at all
    assert not any(inside(p) for p in converted.parameters())
    assert as_stored.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(as_stored.unet.conv_in.weight, reference)
    assert all(p.dtype == torch.float32 for p in converted.parameters())
    assert torch.equal(converted.unet.conv_in.weight, reference.float())


def test_reader_aliases_mapped_pages_without_copying(tiny_file):
    file = SafetensorsFile(tiny_file)
    a = file.tensor("model.diffusion_model.input_blocks.0.0.weight")
    b = file.tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert a.data_ptr() == b.data_ptr()  # two views of the same mapped bytes
    a.add_(1.0)  # copy-on-write: the file is untouched
    assert torch.equal(SafetensorsFile(tiny_file).tensor("model.diffusion_model.input_blocks.0.0.weight") + 1, a)


def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 3, generator=generator).bfloat16(),
        "i64": torch.arange(5),
        "u8": torch.arange(3, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"a": "b"})
    ours = SafetensorsFile(tmp_path / "lib.safetensors")
    assert ours.metadata == {"a": "b"}
    assert all(torch.equal(ours.tensor(k), t) and ours.tensor(k).dtype == t.dtype for k, t in tensors.items())
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"c": "d"})
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata() == {"c": "d"}
        assert all(torch.equal(f.get_tensor(k), t) and f.get_tensor(k).dtype == t.dtype for k, t in tensors.items())


@pytest.mark.slow  # SD 1.5 fp16 file (2.1 GB) into an fp32 model in a fresh process: ~1 min
def test_full_size_load_peak_memory_is_bounded():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "measure_load_memory.py"), "--dtypes", "float16", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=170,
    )
    rows = json.loads(result.stdout.splitlines()[-1])
    assert rows[0]["ratio"] <= 1.3, rows
