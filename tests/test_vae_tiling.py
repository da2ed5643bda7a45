"""kedavra.networks.vae_tiling, the VAE's tiled encode and decode: tiles that cover the image with enough overlap,
blend weights that sum to one, results close to the untiled ones, and the lower peak memory that is tiling's point."""

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vae import meta_sd_model, tiny_model

from kedavra.networks.vae_tiling import Tiling, run_tiled, tile_starts


@given(length=st.integers(1, 300), tile=st.integers(1, 64), data=st.data())
def test_tile_starts_cover_with_full_tiles_and_enough_overlap(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    for previous, start in zip(starts, starts[1:], strict=False):
        assert previous < start and previous + size - start >= overlap


@settings(max_examples=25, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    tile=st.integers(2, 16),
    data=st.data(),
    scales=st.sampled_from([(1, 1), (1, 2), (2, 1)]),
)
def test_blend_weights_sum_to_one(grid, tile, data, scales):
    """With a tile-independent fn (a 1x1 conv after resampling), tiling must change nothing: no seams."""
    overlap = data.draw(st.integers(0, tile - 1))
    in_scale, out_scale = scales
    x = torch.randn(1, 2, grid[0] * in_scale, grid[1] * in_scale, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(1))

    def pointwise(t: torch.Tensor) -> torch.Tensor:
        size = (t.shape[-2] // in_scale * out_scale, t.shape[-1] // in_scale * out_scale)
        return torch.nn.functional.conv2d(torch.nn.functional.interpolate(t, size=size), weight)

    tiled = run_tiled(pointwise, x, tile, overlap, in_scale, out_scale)
    torch.testing.assert_close(tiled, pointwise(x), atol=1e-5, rtol=1e-5)


# Measured on the tiny preset with seeded random weights (tiny_model), 2 x 2 tiles of 64 px with
# 32 px overlap over a 96 x 96 image: decoding i.i.d. N(0, 1) latents (48 x 48), max abs 0.13 and
# mean abs 0.014 against an output std of 0.40; encoding uniform noise, max abs 0.048 and mean abs
# 0.0063 on posterior means of std 0.23. Not exact because each tile's GroupNorm statistics and
# mid-block attention see only that tile, not the whole image; the bounds leave about 2x headroom.
TILED_DECODE_MEAN_ABS, TILED_DECODE_MAX_ABS = 0.03, 0.27
TILED_ENCODE_MEAN_ABS, TILED_ENCODE_MAX_ABS = 0.013, 0.1
TWO_BY_TWO = Tiling(tile_size=64, overlap=32, threshold=0)


def test_tiled_decode_is_close_to_untiled():
    model = tiny_model()
    latents = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (model.decode(latents, TWO_BY_TWO) - model.decode(latents)).abs()
    assert error.mean() < TILED_DECODE_MEAN_ABS
    assert error.max() < TILED_DECODE_MAX_ABS


def test_tiled_encode_is_close_to_untiled():
    model = tiny_model()
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        error = (model.encode(images, TWO_BY_TWO).mean - model.encode(images).mean).abs()
    assert error.mean() < TILED_ENCODE_MEAN_ABS
    assert error.max() < TILED_ENCODE_MAX_ABS


def test_tiling_applies_only_above_the_threshold():
    model = tiny_model()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))  # 32 x 32 pixels
    with torch.no_grad():
        full = model.decode(latents)
        below = model.decode(latents, Tiling(tile_size=16, overlap=4, threshold=32))
        above = model.decode(latents, Tiling(tile_size=16, overlap=4, threshold=31))
    assert torch.equal(below, full)
    assert not torch.allclose(above, full)


def test_tiling_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"overlap must be an int in \[0, tile_size=64\), got 64"):
        Tiling(tile_size=64, overlap=64)
    with pytest.raises(ValueError, match=r"multiples of the downsample factor 8, got tile_size=100 overlap=16"):
        meta_sd_model().decode(torch.empty(1, 4, 8, 8, device="meta"), Tiling(100, 16))


# One fresh process decodes a 64 x 64 latent (128 x 128 px, tiny preset) tiled, then untiled, and
# prints how far each raised its peak resident set (VmHWM, which unlike ru_maxrss starts afresh at
# exec). Tiled runs first, so memory it freed can only lower the untiled figure: a conservative test.
PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    from kedavra.networks.vae import AutoencoderKL, get_vae_config
    from kedavra.networks.vae_tiling import Tiling

    def peak_rss_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    torch.manual_seed(0)
    model = AutoencoderKL(get_vae_config("tiny")).eval()
    latents = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        model.decode(latents[..., :16, :16], Tiling(32, 8, threshold=0))  # warm up both paths
        before = peak_rss_kib()
        model.decode(latents, Tiling(48, 16, threshold=0))
        tiled = peak_rss_kib() - before
        model.decode(latents)
        print(tiled, peak_rss_kib() - before)
    """
)


@pytest.mark.slow  # starts a fresh interpreter so that its peak memory means something: ~5 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_tiled_decode_lowers_peak_memory():
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    tiled, untiled = map(int, result.stdout.split())
    assert tiled < untiled / 2, (tiled, untiled)
