"""The noise of A1111 and ComfyUI (kedavra.diffusion.rng): Philox, A1111's NV generator, ImageNoise, ComfyUI."""

import math
import time

import numpy as np
import pytest
import torch

from kedavra.diffusion.rng import (
    RNG_SOURCES,
    ComfyNoiseSampler,
    ImageNoise,
    PhiloxGenerator,
    comfyui_noise,
    make_generator,
    philox4x32_10,
    slerp,
)

# ---------------------------------------------------------------------------------------------------- Philox4x32-10

# Random123's known-answer vectors (DEShawResearch Random123, tests/kat_vectors, the "philox4x32 10" lines):
# counter (4 words), key (2 words) -> output (4 words).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert philox4x32_10(counter, key).tolist() == list(expected)


def test_philox_many_counters_at_once_equal_one_at_a_time():
    counters = np.array([kat[0] for kat in PHILOX_KAT]).T  # (4, 3)
    keys = np.array([kat[1] for kat in PHILOX_KAT]).T  # (2, 3)
    expected = np.array([kat[2] for kat in PHILOX_KAT]).T
    assert np.array_equal(philox4x32_10(counters, keys), expected)
    # one key broadcast over many counters
    shared = philox4x32_10(counters, [0xA4093822, 0x299F31D0])
    assert shared[:, 2].tolist() == list(PHILOX_KAT[2][2])


@pytest.mark.parametrize("counter, key, message", [
    ([0, 0, 0], [0, 0], "counter must be 4 integer words"),
    ([0, 0, 0, 0], [0], "key must be 2 integer words"),
    ([0, 0, 0, 2**32], [0, 0], "counter words must be from 0 to 0xffffffff"),
    ([0, 0, 0, 0], [-1, 0], "key words must be from 0"),
    ([0.5, 0, 0, 0], [0, 0], "counter must be 4 integer words"),
])
def test_philox_rejects_words_that_are_not_32_bit(counter, key, message):
    with pytest.raises(ValueError, match=message):
        philox4x32_10(counter, key)


# ------------------------------------------------------------------------------------------- A1111's NV generator

# torch.randn on CUDA, seed 0, as printed by a libtorch program (torch 2.2.1+cu121, an sm_75 card) in Kapil Sharma's
# "CUDA Mode - Fusing Kernels" notebook (github.com/kapilsh/cuda-mode-lecture, FusedKernels.ipynb, the
# dlrm_kernels_test output): x = randn({8, 10}) then y = randn({10}), to 4 decimals. The same x's first 64 numbers
# appear as an (8, 8) torch.randn(device="cuda") in the same notebook's Python cells.
CUDA_SEED0_X = [
    -0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284, -1.0745, -0.3631,
    -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820, -0.1271, 1.2169, 1.4353, 1.0605,
    -0.4941, -1.4244, -0.7244, -1.2973, 0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373,
    1.3506, -0.2879, -0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150,
    0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554, -0.1836, 0.3824,
    0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863, -0.5499, -0.3231, -0.5469, 0.9049,
    0.2837, 0.1210, 0.4730, -1.0823, -0.0334, -0.9734, 0.9559, -1.1795, -1.0064, 0.1160,
    0.6852, -0.4124, -0.6738, -0.5404, 0.6898, -1.5517, 0.3805, -0.0436, 0.3597, -0.5043,
]
CUDA_SEED0_Y = [0.1808, -0.5523, 0.9238, -0.7350, 1.3800, 0.8676, 0.1297, -0.9406, 0.8109, 0.8821]
PRINT_ROUNDING = 0.5e-4 + 1e-6  # half a unit of the 4th decimal, plus the emulation's few-ulp difference from CUDA

# The "Expected output" in the docstring of A1111's modules/rng_philox.py for Generator(seed=0).randn((3, 4)), to
# 8 digits. A1111's own code computes Box-Muller in float64 and differs from these by up to about 3e-7.
A1111_DOCSTRING_SEED0 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]

# PhiloxGenerator(0).randn((2, 4)), recorded from this implementation; during development it was compared with
# A1111's rng_philox.Generator(0) (v1.10, numpy 2.4) and agreed bit for bit, for seeds 0, 1, 12345, 2**32 - 1 and
# 2**32 + 31337 over three (4, 64, 64) draws.
NV_SEED0_EXACT = [
    [-0.9246624112129211, -0.42534396052360535, -2.643845796585083, 0.14518387615680695],
    [-0.12086650729179382, -0.5797256827354431, -0.6228513121604919, -0.32838714122772217],
]


def test_philox_generator_reproduces_published_cuda_randn_at_two_offsets():
    generator = PhiloxGenerator(0)
    x, y = generator.randn((8, 10)), generator.randn((10,))
    torch.testing.assert_close(x, torch.tensor(CUDA_SEED0_X).reshape(8, 10), rtol=0, atol=PRINT_ROUNDING)
    torch.testing.assert_close(y, torch.tensor(CUDA_SEED0_Y), rtol=0, atol=PRINT_ROUNDING)


def test_philox_generator_matches_a1111_documented_output():
    draw = PhiloxGenerator(0).randn((3, 4))
    torch.testing.assert_close(draw, torch.tensor(A1111_DOCSTRING_SEED0), rtol=0, atol=5e-7)


def test_philox_generator_first_numbers_are_exact():
    draw = PhiloxGenerator(0).randn((2, 4))
    assert draw.dtype == torch.float32
    assert torch.equal(draw, torch.tensor(NV_SEED0_EXACT, dtype=torch.float32))


def test_philox_generator_advances_one_counter_per_draw():
    generator = PhiloxGenerator(1234)
    first, second = generator.randn((4, 8, 8)), generator.randn((4, 8, 8))
    assert generator.offset == 2
    assert not torch.equal(first, second)
    assert torch.equal(second, PhiloxGenerator(1234, offset=1).randn((4, 8, 8)))
    # element i is counter (offset, 0, i, 0): the numbers do not depend on the shape, only on the count
    assert torch.equal(PhiloxGenerator(1234).randn((256,))[:100], PhiloxGenerator(1234).randn((100,)))


def test_philox_generator_key_uses_both_words_of_a_64_bit_seed():
    low_only = PhiloxGenerator(7).randn((16,))
    assert not torch.equal(PhiloxGenerator(7 + 2**32).randn((16,)), low_only)


def test_philox_generator_is_standard_normal():
    draw = PhiloxGenerator(42).randn((1000, 1000)).double()
    assert abs(draw.mean().item()) < 5e-3  # 5 standard errors of 1e-3
    assert abs(draw.std().item() - 1) < 5e-3
    assert abs((draw > 0).double().mean().item() - 0.5) < 5e-3


def test_philox_generator_draws_an_sdxl_latent_quickly():
    start = time.perf_counter()
    PhiloxGenerator(3).randn((4, 128, 128))
    assert time.perf_counter() - start < 1.0  # about 10 ms on one core


def test_make_generator_sources():
    assert RNG_SOURCES == ("CPU", "GPU", "NV")
    shape = (4, 8, 8)
    cpu = make_generator(99, "CPU")
    expected = torch.Generator().manual_seed(99)
    assert torch.equal(cpu.randn(shape), torch.randn(shape, generator=expected))
    assert torch.equal(cpu.randn(shape), torch.randn(shape, generator=expected))
    assert torch.equal(make_generator(99, "GPU").randn(shape), PhiloxGenerator(99).randn(shape))
    assert torch.equal(make_generator(99, "NV").randn(shape), PhiloxGenerator(99).randn(shape))
    with pytest.raises(ValueError, match="unknown rng source 'cuda'; allowed: CPU, GPU, NV"):
        make_generator(99, "cuda")


# ------------------------------------------------------------------------------------------------------- slerp


def test_slerp_endpoints():
    low, high = PhiloxGenerator(1).randn((4, 8, 8)), PhiloxGenerator(2).randn((4, 8, 8))
    torch.testing.assert_close(slerp(0.0, low, high), low)
    torch.testing.assert_close(slerp(1.0, low, high), high)


def test_slerp_is_per_column_along_dim_1():
    # columns along dim 1 of (1, 2, 2): low's are e1, high's are e2 (orthogonal, Ω = π/2), so halfway each column
    # is (e1 + e2) sin(π/4) / sin(π/2) = (e1 + e2) / √2
    low = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    high = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    torch.testing.assert_close(slerp(0.5, low, high), torch.full((1, 2, 2), 1 / math.sqrt(2)))


def test_slerp_nearly_parallel_falls_back_to_a1111s_reversed_linear_mix():
    low = PhiloxGenerator(5).randn((4, 8, 8))
    # parallel columns (cosine 1): A1111 returns low·val + high·(1 - val) = 0.25 low + 0.75 · 2 low = 1.75 low
    torch.testing.assert_close(slerp(0.25, low, 2 * low), 1.75 * low)


# ------------------------------------------------------------------------------------------------------ ImageNoise

SHAPE = (4, 8, 8)  # (C, h, w): a 64×64 image's latent


def test_image_noise_cpu_source_is_torch_randn_per_seed():
    noise = ImageNoise(SHAPE, [10, 11], source="CPU")
    first, step = noise.first(), noise.next()
    for i, seed in enumerate([10, 11]):
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(first[i], torch.randn(SHAPE, generator=generator))
        assert torch.equal(step[i], torch.randn(SHAPE, generator=generator))
    assert first.shape == (2, *SHAPE) and first.dtype == torch.float32


@pytest.mark.parametrize("source", ["GPU", "NV"])
def test_image_noise_gpu_and_nv_sources_are_the_philox_emulation(source):
    noise = ImageNoise(SHAPE, [10, 11], source=source)
    first, step = noise.first(), noise.next()
    for i, seed in enumerate([10, 11]):
        generator = PhiloxGenerator(seed)
        assert torch.equal(first[i], generator.randn(SHAPE))
        assert torch.equal(step[i], generator.randn(SHAPE))


def test_image_noise_default_source_is_gpu():
    assert torch.equal(ImageNoise(SHAPE, [3]).first(), ImageNoise(SHAPE, [3], source="NV").first())


def test_image_noise_batch_equals_single_runs():
    batch = ImageNoise(SHAPE, [5, 6], subseeds=[7, 8], subseed_strength=0.3, eta_noise_seed_delta=31337)
    singles = [ImageNoise(SHAPE, [seed], subseeds=[sub], subseed_strength=0.3, eta_noise_seed_delta=31337)
               for seed, sub in [(5, 7), (6, 8)]]
    assert torch.equal(batch.first(), torch.cat([single.first() for single in singles]))
    for _ in range(2):
        assert torch.equal(batch.next(), torch.cat([single.next() for single in singles]))


def test_subseed_strength_zero_gives_the_seed_noise():
    plain = ImageNoise(SHAPE, [20]).first()
    assert torch.equal(ImageNoise(SHAPE, [20], subseeds=[21], subseed_strength=0.0).first(), plain)


def test_subseed_strength_one_gives_the_subseed_noise():
    mixed = ImageNoise(SHAPE, [20], subseeds=[21], subseed_strength=1.0).first()
    torch.testing.assert_close(mixed[0], PhiloxGenerator(21).randn(SHAPE), rtol=1e-5, atol=1e-5)


def test_subseed_mix_is_slerp_of_the_two_noises():
    mixed = ImageNoise(SHAPE, [20], subseeds=[21], subseed_strength=0.4).first()
    expected = slerp(0.4, PhiloxGenerator(20).randn(SHAPE), PhiloxGenerator(21).randn(SHAPE))
    assert torch.equal(mixed[0], expected)


def test_subseed_does_not_change_the_step_noise():
    plain, varied = ImageNoise(SHAPE, [20]), ImageNoise(SHAPE, [20], subseeds=[21], subseed_strength=0.5)
    plain.first(), varied.first()
    assert torch.equal(plain.next(), varied.next())


def test_eta_noise_seed_delta_restarts_the_step_noise_from_seed_plus_delta():
    plain, ensd = ImageNoise(SHAPE, [40]), ImageNoise(SHAPE, [40], eta_noise_seed_delta=31337)
    assert torch.equal(plain.first(), ensd.first())
    step = ensd.next()
    assert not torch.equal(plain.next(), step)
    generator = PhiloxGenerator(40 + 31337)
    assert torch.equal(step[0], generator.randn(SHAPE))
    assert torch.equal(ensd.next()[0], generator.randn(SHAPE))


def test_eta_noise_seed_delta_may_carry_a_seed_past_32_bits():
    noise = ImageNoise(SHAPE, [2**32 - 1], source="CPU", eta_noise_seed_delta=2)
    noise.first()
    generator = torch.Generator().manual_seed(2**32 + 1)
    assert torch.equal(noise.next()[0], torch.randn(SHAPE, generator=generator))


def test_seed_resize_from_a_smaller_image_pastes_its_noise_in_the_centre():
    # 32×32 pixels -> a (4, 4, 4) noise centred on the 8×8 latent at rows and columns 2..5; around it, the seed's
    # own (4, 8, 8) draw, which is also the generator's first draw, so next() is its second
    noise = ImageNoise(SHAPE, [50], seed_resize_from=(32, 32))
    first = noise.first()[0]
    canvas = PhiloxGenerator(50)
    expected = canvas.randn(SHAPE)
    expected[:, 2:6, 2:6] = PhiloxGenerator(50).randn((4, 4, 4))
    assert torch.equal(first, expected)
    assert torch.equal(noise.next()[0], canvas.randn(SHAPE))


def test_seed_resize_from_a_larger_image_crops_its_centre():
    # 96×96 pixels -> (4, 12, 12); offset floor((8 - 12)/2) = -2, so the latent is rows and columns 2..9
    first = ImageNoise(SHAPE, [50], seed_resize_from=(96, 96)).first()[0]
    assert torch.equal(first, PhiloxGenerator(50).randn((4, 12, 12))[:, 2:10, 2:10])


def test_seed_resize_from_an_odd_larger_size_leaves_a1111s_last_row_and_column():
    # 88×88 pixels -> (4, 11, 11); floor((8 - 11)/2) = -2 keeps 11 - 4 = 7 rows and columns (noise 2..8) at 0..6;
    # row and column 7 keep the seed's own (4, 8, 8) draw
    first = ImageNoise(SHAPE, [50], seed_resize_from=(88, 88)).first()[0]
    expected = PhiloxGenerator(50).randn(SHAPE)
    expected[:, 0:7, 0:7] = PhiloxGenerator(50).randn((4, 11, 11))[:, 2:9, 2:9]
    assert torch.equal(first, expected)


def test_seed_resize_from_the_same_size_or_half_off_is_plain_noise():
    plain = ImageNoise(SHAPE, [50]).first()
    assert torch.equal(ImageNoise(SHAPE, [50], seed_resize_from=(64, 64)).first(), plain)
    assert torch.equal(ImageNoise(SHAPE, [50], seed_resize_from=(0, 96)).first(), plain)


def test_seed_resize_with_a_variation_seed_mixes_at_the_other_size():
    first = ImageNoise(SHAPE, [50], subseeds=[51], subseed_strength=0.5, seed_resize_from=(96, 96)).first()[0]
    mixed = slerp(0.5, PhiloxGenerator(50).randn((4, 12, 12)), PhiloxGenerator(51).randn((4, 12, 12)))
    assert torch.equal(first, mixed[:, 2:10, 2:10])


def test_next_before_first_is_first_and_first_is_drawn_once():
    noise = ImageNoise(SHAPE, [60])
    assert torch.equal(noise.next(), ImageNoise(SHAPE, [60]).first())
    with pytest.raises(RuntimeError, match="already drawn"):
        noise.first()


def test_as_noise_sampler_gives_next_on_xs_dtype():
    noise = ImageNoise(SHAPE, [70, 71])
    reference = ImageNoise(SHAPE, [70, 71])
    x = reference.first().double()
    noise.first()
    sampler = noise.as_noise_sampler()
    step = sampler(x, 14.6, 10.0)
    assert step.dtype == torch.float64 and step.device == x.device
    assert torch.equal(step, reference.next().double())
    with pytest.raises(ValueError, match=r"this noise is \(2, 4, 8, 8\), the sampler's x is \(1, 4, 8, 8\)"):
        sampler(x[:1], 10.0, 5.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"seeds": [-1]}, r"seeds\[0\] must be an integer from 0 to 4294967295, got -1"),
    ({"seeds": [1, 2**32]}, r"seeds\[1\] must be an integer from 0 to 4294967295, got 4294967296"),
    ({"seeds": 5}, "seeds must be a non-empty list of seeds"),
    ({"seeds": []}, "seeds must be a non-empty list of seeds"),
    ({"source": "cuda"}, "unknown rng source 'cuda'; allowed: CPU, GPU, NV"),
    ({"subseed_strength": 1.5}, r"subseed_strength must be a number in \[0, 1\], got 1.5"),
    ({"subseed_strength": True}, r"subseed_strength must be a number in \[0, 1\], got True"),
    ({"subseeds": [1, 2]}, r"subseeds must give one seed per image \(1\), got 2"),
    ({"subseeds": [2.5]}, r"subseeds\[0\] must be an integer"),
    ({"seed_resize_from": (4, 64)}, "seed_resize_from must be 0 \\(off\\) or at least 8 pixels each way"),
    ({"seed_resize_from": 64}, "seed_resize_from must be \\(height, width\\) in pixels or 0 for off, got 64"),
    ({"seed_resize_from": (-8, 64)}, r"seed_resize_from\[0\] must be an integer >= 0, got -8"),
    ({"shape": (4, 8)}, r"shape must be \(C, h, w\): 3 positive integers, got \(4, 8\)"),
    ({"shape": (4, 0, 8)}, r"shape\[1\] must be an integer >= 1, got 0"),
    ({"eta_noise_seed_delta": -1}, "eta_noise_seed_delta must be an integer from 0 to 4294967295, got -1"),
])
def test_image_noise_rejects_bad_input(kwargs, message):
    arguments = {"shape": SHAPE, "seeds": [1], **kwargs}
    with pytest.raises(ValueError, match=message):
        ImageNoise(**arguments)


# --------------------------------------------------------------------------------------------------------- ComfyUI


def test_comfyui_noise_is_one_cpu_draw_of_the_whole_batch():
    shape = (3, 4, 8, 8)
    expected = torch.randn(shape, generator=torch.Generator().manual_seed(123))
    assert torch.equal(comfyui_noise(123, shape), expected)


def test_comfyui_noise_takes_64_bit_seeds():
    seed = 156680208700286  # a ComfyUI-sized seed
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(comfyui_noise(seed, (1, 4, 8, 8)), expected)


def test_comfyui_batch_index_picks_images_of_a_batch_drawn_one_by_one():
    generator = torch.Generator().manual_seed(9)
    one_by_one = [torch.randn((1, 4, 8, 8), generator=generator) for _ in range(3)]
    assert torch.equal(comfyui_noise(9, (1, 4, 8, 8), batch_index=[2]), one_by_one[2])
    assert torch.equal(comfyui_noise(9, (3, 4, 8, 8), batch_index=[1, 0, 1]), torch.cat(
        [one_by_one[1], one_by_one[0], one_by_one[1]]))
    # with C·h·w a multiple of 16, torch's CPU randn gives the same numbers drawn whole or image by image
    assert torch.equal(comfyui_noise(9, (1, 4, 8, 8), batch_index=[2]), comfyui_noise(9, (3, 4, 8, 8))[2:3])


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_index": [0, 1]}, r"batch_index must give one image index per row \(1\), got \[0, 1\]"),
    ({"batch_index": [-1]}, r"batch_index\[0\] must be an integer >= 0, got -1"),
    ({"seed": 2**64}, "seed must be an integer from 0 to 18446744073709551615, got 18446744073709551616"),
    ({"shape": (4, 8, 8)}, r"shape must be \(B, C, h, w\): 4 positive integers"),
])
def test_comfyui_noise_rejects_bad_input(kwargs, message):
    arguments = {"seed": 1, "shape": (1, 4, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        comfyui_noise(**arguments)


def test_comfy_noise_sampler_on_an_nvidia_card_is_philox_over_the_whole_batch():
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    sampler = ComfyNoiseSampler(x, 77)
    generator = PhiloxGenerator(77)
    for sigma, sigma_next in [(14.6, 7.0), (7.0, 3.0)]:
        step = sampler(x, sigma, sigma_next)
        assert step.dtype == torch.float16
        assert torch.equal(step, generator.randn((2, 4, 8, 8)).half())


def test_comfy_noise_sampler_on_the_cpu_seeds_with_seed_plus_one():
    sampler = ComfyNoiseSampler((2, 4, 8, 8), 77, source="CPU")
    generator = torch.Generator().manual_seed(78)
    x = torch.zeros(2, 4, 8, 8)
    for _ in range(2):
        assert torch.equal(sampler(x, 1.0, 0.5), torch.randn((2, 4, 8, 8), generator=generator))


def test_comfy_noise_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match=r"seed must be an integer \(seed \+ 1 seeds ComfyUI's CPU generator\)"):
        ComfyNoiseSampler((1, 4, 8, 8), 2**64 - 1, source="CPU")
    with pytest.raises(ValueError, match="unknown rng source 'mps'"):
        ComfyNoiseSampler((1, 4, 8, 8), 1, source="mps")
    sampler = ComfyNoiseSampler((1, 4, 8, 8), 1)
    with pytest.raises(ValueError, match=r"this noise is \(1, 4, 8, 8\), the sampler's x is \(2, 4, 8, 8\)"):
        sampler(torch.zeros(2, 4, 8, 8), 1.0, 0.5)
