"""kedavra.mapped_memory: pages of a registered private file map are dropped (written copy-on-write pages read the
file's bytes again afterwards, which shows the drop happened), nothing outside registered maps is touched, and a
pipeline on a checkpoint of its own dtype keeps giving the same images after its packed layers drop their mapped
weights."""

import mmap
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kedavra import mapped_memory
from kedavra.mapped_memory import PAGE, drop_pages, drop_unused_pages, register_map

pytestmark = pytest.mark.skipif(not mapped_memory.CAN_DROP or sys.platform != "linux",
                                reason="MADV_DONTNEED on private file maps (Linux)")

PAGES = 8
FILE_VALUE, WRITTEN = 1.0, 7.0


@pytest.fixture
def mapped(tmp_path):
    """A registered private map of a file of PAGES pages of float32 ones, and a float32 tensor viewing all of it."""
    path = tmp_path / "weights.bin"
    path.write_bytes(torch.full((PAGES * PAGE // 4,), FILE_VALUE).numpy().tobytes())
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    register_map(buffer)
    return buffer, torch.frombuffer(buffer, dtype=torch.float32)


def test_drop_pages_drops_whole_pages_inside_the_tensor_only(mapped):
    buffer, whole = mapped
    per_page = PAGE // 4
    whole.fill_(WRITTEN)  # every page copied on write: after a drop a page reads the file again
    view = whole[per_page // 2 : 3 * per_page + per_page // 2]  # pages 1 and 2 whole, halves of 0 and 3
    assert drop_pages(view) == 2 * PAGE
    assert (whole[per_page : 3 * per_page] == FILE_VALUE).all()
    assert (whole[:per_page] == WRITTEN).all() and (whole[3 * per_page :] == WRITTEN).all()


def test_tensors_outside_registered_maps_are_left_alone():
    tensor = torch.full((PAGES * PAGE // 4,), WRITTEN)
    assert drop_pages(tensor) == 0
    assert (tensor == WRITTEN).all()
    layer = nn.Linear(64, 64)
    before = layer.weight.detach().clone()
    assert drop_unused_pages([layer]) == 0
    assert torch.equal(layer.weight, before)


def test_drop_unused_pages_keeps_what_modules_use(mapped):
    """Whole storages count as used (a view may reach anywhere in its storage): the loader's tensors each have one of
    their own, so only the gaps between them go."""
    buffer, whole = mapped
    per_page = PAGE // 4
    whole.fill_(WRITTEN)
    module = nn.Module()  # parameters on pages 1 and 4-5, each its own view of the map as the loader makes them
    module.a = nn.Parameter(torch.frombuffer(buffer, dtype=torch.float32, count=per_page, offset=PAGE),
                            requires_grad=False)
    module.b = nn.Parameter(torch.frombuffer(buffer, dtype=torch.float32, count=2 * per_page, offset=4 * PAGE),
                            requires_grad=False)
    assert drop_unused_pages([module]) == (PAGES - 3) * PAGE
    assert (module.a == WRITTEN).all() and (module.b == WRITTEN).all()
    for page in (0, 2, 3, 6, 7):
        assert (whole[page * per_page : (page + 1) * per_page] == FILE_VALUE).all(), page


def test_a_pipeline_on_a_mapped_checkpoint_gives_the_same_images(tmp_path, tiny_file):
    """A tiny model saved in bf16 and loaded in bf16 aliases the file; its packed, evicting pipeline drops those
    pages and still gives bitwise the images of an unpacked pipeline on the same file, twice."""
    import kedavra
    from kedavra.checkpoint import load_model, save_model

    path = tmp_path / "tiny-bf16.safetensors"
    save_model(load_model(tiny_file).to(torch.bfloat16), path)
    packed = kedavra.load(path, dtype="bf16", device="cpu")
    plain = kedavra.load(path, dtype="bf16", device="cpu", optimize=False)
    for seed in (0, 1):
        ours = packed("a red circle", steps=3, seed=seed, width=64, height=64).images[0]
        reference = plain("a red circle", steps=3, seed=seed, width=64, height=64).images[0]
        assert np.array_equal(np.asarray(ours), np.asarray(reference))

