"""The seeded Brownian tree (kedavra.diffusion.brownian) against torchsde 0.2.6 and k-diffusion 0.1.1.post1.

Parity is bitwise (torch.equal): the same seeds, float32 σ's and query sequences give the same tensors as
k-diffusion's BrownianTreeNoiseSampler (A1111: a list of per-image seeds; ComfyUI: one int seed on the CPU) and as
torchsde.BrownianTree. The oracles are test-only; tests that need them skip when they are not installed.
"""

import math
import random
import warnings

import pytest
import torch
from k_diffusion_oracle import load_k_diffusion

from kedavra.diffusion.brownian import BrownianInterval, BrownianTreeNoise

SIGMA_MIN, SIGMA_MAX = 0.03, 14.6  # the schedule's ends in the issue
SHAPES_AND_SEEDS = [((1, 4, 8, 8), [1]), ((2, 4, 8, 8), [1, 2]), ((2, 4, 8, 8), 3), ((1, 4, 8, 8), 2**64 - 1)]
VARIANCE_MARGIN = 0.03  # relative; the sample variance of 65536 N(0, v) draws has std v·√(2/65536) ≈ 0.0055 v
CORRELATION_MARGIN = 0.02  # the sample correlation of 65536 independent pairs has std 1/256 ≈ 0.0039


@pytest.fixture(scope="module")
def sampling():
    return load_k_diffusion()[0]


def karras_sigmas(sampling, steps):
    """The float32 schedule A1111 and ComfyUI make (k-diffusion's get_sigmas_karras, a final 0 appended)."""
    return sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)


def consecutive_queries(sigmas):
    """DPM++ 2M SDE / 3M SDE: one query (σ_i, σ_{i+1}) per step with σ_{i+1} > 0."""
    return [(sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]


def midpoint_queries(sigmas, r=0.5):
    """DPM++ SDE in float32 tensor arithmetic, as k-diffusion's sample_dpmpp_sde: with t = -log σ_i,
    t_next = -log σ_{i+1}, h = t_next - t, s = t + r h and σ(t) = e^{-t}: σ(t) -> σ(s), σ(s) -> σ(t_next) (the
    issue's pattern) and σ(t) -> σ(t_next) (k-diffusion's second query)."""
    queries = []
    for sigma, sigma_next in consecutive_queries(sigmas):
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        s = t + (t_next - t) * r
        sigma_t, sigma_s, sigma_t_next = t.neg().exp(), s.neg().exp(), t_next.neg().exp()
        queries += [(sigma_t, sigma_s), (sigma_s, sigma_t_next), (sigma_t, sigma_t_next)]
    return queries


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("pattern", [consecutive_queries, midpoint_queries])
@pytest.mark.parametrize("shape,seed", SHAPES_AND_SEEDS)
def test_matches_k_diffusion_noise_sampler(sampling, steps, pattern, shape, seed):
    sigmas = karras_sigmas(sampling, steps)
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    x = torch.zeros(shape)
    theirs = sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed)
    ours = BrownianTreeNoise(x, sigma_min.item(), sigma_max.item(), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde warns where σ(-log σ_max) rounds just past σ_max, then clamps
        for sigma, sigma_next in pattern(sigmas):
            expected = theirs(sigma, sigma_next)
            assert torch.equal(ours(x, sigma.item(), sigma_next.item()), expected), (sigma, sigma_next)


def analytic_denoiser(x, sigma):
    """A smooth stand-in for a model: the posterior mean of x0 ~ N(0.3, 1) given x = x0 + σ ε."""
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (x + 0.3 * sigma**2) / (1 + sigma**2)


@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
@pytest.mark.parametrize("seed,cpu", [([5, 6], False), (7, True)])  # A1111 (per-image seeds), ComfyUI (cpu=True)
def test_k_diffusion_sde_samplers_run_the_same_with_our_noise(sampling, name, seed, cpu):
    sigmas = karras_sigmas(sampling, 12)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    theirs = sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed)
    ours = BrownianTreeNoise(x, sigma_min.item(), sigma_max.item(), seed, device="cpu" if cpu else None)
    sampler = getattr(sampling, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sampler(analytic_denoiser, x, sigmas, disable=True, noise_sampler=theirs)
        got = sampler(analytic_denoiser, x, sigmas, disable=True,
                      noise_sampler=lambda s, s_next: ours(x, s.item(), s_next.item()))
    assert torch.equal(got, expected)


def test_transform_to_log_time_matches_k_diffusion(sampling):
    """A decreasing transform (t = -log σ) flips the span's sign, as in k-diffusion."""
    sigmas = karras_sigmas(sampling, 10)
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    x = torch.zeros(2, 3)
    to_time = lambda sigma: sigma.log().neg()  # noqa: E731
    theirs = sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=11, transform=to_time)
    ours = BrownianTreeNoise(x, sigma_min.item(), sigma_max.item(), 11, transform=to_time)
    for sigma, sigma_next in consecutive_queries(sigmas):
        assert torch.equal(ours(x, sigma.item(), sigma_next.item()), theirs(sigma, sigma_next))


def test_interval_matches_torchsde_in_any_query_order():
    """Random queries (some past the ends, which both clamp; some one tolerance step wide) in random order, with
    a cache too small to hold the tree, so evicted nodes are recomputed: bitwise equal to torchsde.BrownianTree."""
    torchsde = pytest.importorskip("torchsde")
    rng = random.Random(0)
    for _ in range(4):
        entropy = rng.randrange(2**64)
        t0, t1 = sorted(rng.uniform(0, 20) for _ in range(2))
        theirs = torchsde.BrownianTree(torch.tensor(t0, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64),
                                       torch.tensor(t1, dtype=torch.float64), entropy=entropy)
        ours = BrownianInterval(t0, t1, (3, 5), entropy=entropy, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for query in range(40):
                ta, tb = sorted(rng.uniform(t0 - 0.1, t1 + 0.1) for _ in range(2))
                if query % 5 == 0:
                    tb = ta + rng.choice([1e-6, 2e-6, 3.3e-6])
                assert torch.equal(ours(ta, tb), theirs(ta, tb)), (ta, tb)


def test_numbers_do_not_depend_on_query_order():
    queries = [(0.1, 0.7), (2.0, 9.5), (0.5, 3.25), (0.03, 14.6), (7.0, 7.001)]
    forward = BrownianInterval(0.03, 14.6, (16,), entropy=4)
    backward = BrownianInterval(0.03, 14.6, (16,), entropy=4)
    first = [forward(*q) for q in queries]
    last = [backward(*q) for q in reversed(queries)][::-1]
    for a, b in zip(first, last, strict=True):
        assert torch.equal(a, b)


def test_increments_add_up():
    """W(a, b) + W(b, c) = W(a, c): one path, not independent draws (equal up to float32 rounding)."""
    tree = BrownianInterval(0.03, 14.6, (256,), entropy=9)
    for a, b, c in [(0.03, 1.0, 14.6), (0.2, 0.2001, 0.35), (3.0, 7.5, 7.75)]:
        torch.testing.assert_close(tree(a, b) + tree(b, c), tree(a, c), rtol=0, atol=1e-5)


def test_same_seed_same_noise_and_different_seeds_differ():
    x = torch.zeros(2, 4, 8, 8)
    a = BrownianTreeNoise(x, SIGMA_MIN, SIGMA_MAX, [1, 2])(x, 3.0, 2.0)
    again = BrownianTreeNoise(x, SIGMA_MIN, SIGMA_MAX, [1, 2])(x, 3.0, 2.0)
    other = BrownianTreeNoise(x, SIGMA_MIN, SIGMA_MAX, [1, 3])(x, 3.0, 2.0)
    assert torch.equal(a, again)
    assert torch.equal(a[0], other[0]) and not torch.equal(a[1], other[1])
    assert not torch.equal(a[0], a[1])


def test_each_row_is_its_own_tree():
    """Row i of a batch with seeds [a, b] is a batch of one with seed [a] (or [b]), over the same queries."""
    batch, row = torch.zeros(2, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    both = BrownianTreeNoise(batch, SIGMA_MIN, SIGMA_MAX, [21, 22])
    alone = [BrownianTreeNoise(row, SIGMA_MIN, SIGMA_MAX, [seed]) for seed in (21, 22)]
    for sigma, sigma_next in [(14.6, 9.0), (9.0, 4.5), (4.5, 0.03)]:
        noise = both(batch, sigma, sigma_next)
        for i in range(2):
            assert torch.equal(noise[i:i + 1], alone[i](row, sigma, sigma_next))


def test_increment_variance_is_interval_length():
    """Var W(s, t) = |t - s| per element (root, one-node and many-node intervals), and disjoint increments are
    uncorrelated; the standardised noise has unit variance and zero mean."""
    tree = BrownianInterval(0.03, 14.6, (65536,), entropy=123)
    for s, t in [(0.03, 14.6), (1.0, 2.5), (0.5, 0.5003), (0.03, 0.1)]:
        assert abs(tree(s, t).var().item() / (t - s) - 1) < VARIANCE_MARGIN, (s, t)
    first, second = tree(1.0, 2.0), tree(2.0, 3.7)
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1].item()
    assert abs(correlation) < CORRELATION_MARGIN
    x = torch.zeros(4, 16384)
    noise = BrownianTreeNoise(x, SIGMA_MIN, SIGMA_MAX, 5)(x, 6.0, 5.5)
    assert abs(noise.var().item() - 1) < VARIANCE_MARGIN and abs(noise.mean().item()) < 5 / 256


def test_decreasing_sigma_reads_the_path_backwards():
    x = torch.zeros(8)
    noise = BrownianTreeNoise(x, SIGMA_MIN, SIGMA_MAX, 1)
    assert torch.equal(noise(x, 2.0, 3.0), -noise(x, 3.0, 2.0))
    tree = BrownianInterval(0.03, 14.6, (8,), entropy=1)
    torch.testing.assert_close(noise(x, 3.0, 2.0), -tree(2.0, 3.0) / math.sqrt(1.0))


@pytest.mark.parametrize("kwargs,named", [
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_min=float("nan")), "nan"),
    (dict(sigma_max=float("inf")), "inf"),
    (dict(sigma_min=14.6, sigma_max=0.03), "sigma_min=14.6"),
    (dict(sigma_min=2.0, sigma_max=2.0), "sigma_max=2.0"),
    (dict(seed=-1), "-1"),
    (dict(seed=1.5), "1.5"),
    (dict(seed=True), "True"),
    (dict(seed=[1]), "[1]"),
    (dict(seed=[1, -2]), "seed[1]"),
    (dict(seed="7"), "'7'"),
    (dict(x=torch.zeros(2, 3, dtype=torch.int64)), "torch.int64"),
])
def test_bad_construction_raises_naming_the_value(kwargs, named):
    args = dict(x=torch.zeros(2, 3), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, seed=[1, 2]) | kwargs
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        BrownianTreeNoise(**args)


@pytest.mark.parametrize("call,named", [
    (lambda noise: noise(torch.zeros(3, 3), 2.0, 1.0), r"\(3, 3\)"),
    (lambda noise: noise(torch.zeros(2, 3), 2.0, 2.0), "2.0"),
    (lambda noise: noise(torch.zeros(2, 3), 20.0, 1.0), "20.0"),
    (lambda noise: noise(torch.zeros(2, 3), float("nan"), 1.0), "nan"),
])
def test_bad_call_raises_naming_the_value(call, named):
    noise = BrownianTreeNoise(torch.zeros(2, 3), SIGMA_MIN, SIGMA_MAX, [1, 2])
    with pytest.raises(ValueError, match=named):
        call(noise)


def test_bad_interval_raises_naming_the_value():
    with pytest.raises(ValueError, match="t1=1.0"):
        BrownianInterval(1.0, 1.0, (2,), entropy=0)
    with pytest.raises(ValueError, match="ta=2.0"):
        BrownianInterval(0.0, 3.0, (2,), entropy=0)(2.0, 1.0)
