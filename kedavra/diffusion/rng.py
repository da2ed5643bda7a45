"""The initial and per-step noise of AUTOMATIC1111's web UI (A1111, v1.10) and ComfyUI, so a seed read from their
PNGs gives the same noise here.

Sources of A1111's setting "Random number generator source" (`randn_source`), as RNG_SOURCES:

    "CPU"  torch.randn on a CPU torch.Generator seeded with the seed (torch's mt19937, which keeps only the seed's
           low 32 bits); the same numbers on every machine.
    "GPU"  torch.randn on the GPU A1111 ran on: on an NVIDIA card, a CUDA torch.Generator seeded with the seed.
           This project runs on CPUs, so "GPU" means what an NVIDIA card draws: the Philox emulation below, the
           same numbers as "NV". (A1111 on Apple's MPS draws "GPU" noise on the CPU: use "CPU" for those PNGs.)
    "NV"   A1111's `rng_philox`: torch's CUDA randn recomputed on the CPU with numpy, for any machine. Its
           Box-Muller step runs in float64 on float32 constants and is rounded to float32; CUDA's runs in float32,
           so the two differ by a few float32 ulps (about 3e-7 at 1); `PhiloxGenerator` is A1111's, bit for bit.

torch's CUDA randn of n float32 numbers from a generator (seed s, Philox offset o) gives element i the first
Box-Muller normal of Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") at
counter (o, 0, i, 0) and key (s mod 2³², s div 2³²), as cuRAND's `curand_init(s, i, o)` then `curand_normal4`; each
call advances the offset by one counter. That holds while n is at most the kernel's grid (256 threads × blocks per
SM × SMs, e.g. 43,008 on an RTX 3060, 125,952 on an RTX 3090, 270,336 on an H100 SXM); past it PyTorch's
grid-stride loop hands element i + k·grid the k-th normal of thread i, which neither A1111's NV nor this module
reproduces. An SD 1.x latent at 512² (16,384 numbers) fits every card; an SDXL latent at 1024² (65,536) or
ComfyUI's whole-batch per-step draws can exceed a small card's grid, where the card's own numbers differ.

A1111 draws per image (`ImageNoise`): image i's initial noise comes from a generator seeded with its own seed, so
a batch gives the same images as single runs, and every later draw (the fresh noise of ancestral and churn
samplers, which A1111 routes through `torch.randn_like` to `p.rng.next()`) continues that image's generator.

ComfyUI (`comfyui_noise`, `ComfyNoiseSampler`) draws the initial noise of the whole batch at once on the CPU
(`comfy.sample.prepare_noise`) whatever the device, and the per-step noise of ancestral samplers from a generator on
the sampler's device seeded with the seed (`default_noise_sampler` in comfy/k_diffusion/sampling.py): a CUDA one on
an NVIDIA card (the "GPU" source here; older ComfyUI drew from torch's global CUDA generator, which
`prepare_noise` seeds alike, so the same numbers), a CPU one on a CPU-only run, seeded with seed + 1 since ComfyUI
PR #11528 (before it, with the seed itself, so the first step repeated the initial noise). Its "ddim" sampler noises
an inpainting mask's kept region with noise of its own (`comfyui_inpaint_noise`): torch.randn of the batch from
torch.manual_seed(seed + 1), on the CPU whatever the device.

Not here: the Brownian-tree noise of the SDE samplers (kedavra.diffusion.brownian), which A1111 and ComfyUI seed
from the image seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kedavra.validation import MAX_SEED, check_choice, check_int, check_number, check_seed, is_int

RNG_SOURCES = ("CPU", "GPU", "NV")
MAX_GENERATOR_SEED = 2**64 - 1  # torch generators and Philox keys take 64-bit seeds (A1111 adds ENSD to a seed)
MAX_COMFYUI_SEED = 2**64 - 1  # ComfyUI's seed widgets: "max": 0xffffffffffffffff

# Philox4x32 constants (Salmon et al. 2011; Random123's philox.h, PHILOX_M4x32_0/1 and PHILOX_W32_0/1).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments: φ - 1 and √3 - 1 as 32-bit fractions
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

# cuRAND's Box-Muller constants as float32, which A1111's rng_philox uses (curand_normal.h: CURAND_2POW32_INV and
# CURAND_2POW32_INV_2PI).
TWO_POW32_INV = np.float32(2.3283064e-10)
TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)

LATENT_FACTOR = 8  # A1111 divides "resize seed from" pixels by 8 (hard-coded, whatever the model's VAE factor)
SLERP_PARALLEL_DOT = 0.9995  # A1111's slerp falls back to a linear mix when the mean cosine exceeds this

NoiseFunction = Callable[[torch.Tensor, float, float], torch.Tensor]  # kedavra.diffusion.samplers.noise's protocol


def philox4x32_10(counter, key) -> np.ndarray:
    """The Philox4x32-10 block function (Salmon et al. 2011, "Philox"): 10 rounds of two 32×32→64-bit multiplies,
    with the key bumped by the Weyl constants between rounds.

    counter: four 32-bit words, shape (4,) or (4, ...) for many blocks at once; key: two words, shape (2,) or (2, ...)
    broadcasting against counter[0]. Returns the four output words, uint32, shaped like the counter.
    """
    words = _words("counter", counter, 4)
    k0, k1 = _words("key", key, 2)
    c0, c1, c2, c3 = words
    for round_index in range(PHILOX_ROUNDS):
        if round_index:  # key schedule: k_j = k_0 + j·W (mod 2³²) for round j
            k0 = (k0 + PHILOX_W[0]) & MASK32
            k1 = (k1 + PHILOX_W[1]) & MASK32
        product0 = c0 * PHILOX_M[0]  # exact in uint64: both factors are below 2³²
        product1 = c2 * PHILOX_M[1]
        c0, c1, c2, c3 = (product1 >> 32) ^ c1 ^ k0, product1 & MASK32, (product0 >> 32) ^ c3 ^ k1, product0 & MASK32
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3)).astype(np.uint32)


def _words(name: str, value, count: int) -> np.ndarray:
    """`value` as uint64 words, `count` along the first axis, each from 0 to 2³² - 1."""
    array = np.asarray(value)
    if array.ndim == 0 or array.shape[0] != count or array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be {count} integer words (shape ({count},) or ({count}, ...)), "
                         f"got shape {array.shape} of {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > MASK32):
        raise ValueError(f"{name} words must be from 0 to {MASK32:#x}, got values from {array.min()} to {array.max()}")
    return array.astype(np.uint64)


def _box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first normal of cuRAND's Box-Muller pair from two uint32 words, as A1111 computes it: the float32
    constants above, the arithmetic in float64 (numpy promotes uint32 × float32 to float64), rounded to float32."""
    u = x.astype(np.float64) * np.float64(TWO_POW32_INV) + np.float64(TWO_POW32_INV / 2)  # in (0, 1]
    v = y.astype(np.float64) * np.float64(TWO_POW32_INV_2PI) + np.float64(TWO_POW32_INV_2PI / 2)  # in (0, 2π]
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """torch.randn on an NVIDIA GPU recomputed on the CPU: A1111's "NV" source (modules/rng_philox.py).

    Draw k (k = offset, from 0) of n numbers gives element i the first Box-Muller normal of
    philox4x32_10(counter=(k, 0, i, 0), key=(seed mod 2³², seed div 2³²)); every draw advances the offset by one.
    """

    def __init__(self, seed: int, offset: int = 0):
        self.seed = check_int("seed", seed, 0, MAX_GENERATOR_SEED)
        self.offset = check_int("offset", offset, 0, 2**64 - 1)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """A float32 CPU tensor of `shape` of standard normals; advances the offset by one."""
        shape = tuple(check_int(f"shape[{i}]", size, 0) for i, size in enumerate(shape))
        index = np.arange(math.prod(shape), dtype=np.uint64)
        counter = np.empty((4, index.size), dtype=np.uint64)
        counter[0] = self.offset & MASK32
        counter[1] = self.offset >> 32
        counter[2] = index & MASK32  # cuRAND's subsequence: one per element
        counter[3] = index >> 32
        key = np.array([self.seed & MASK32, self.seed >> 32], dtype=np.uint64)
        words = philox4x32_10(counter, key)
        self.offset += 1
        return torch.from_numpy(_box_muller_sin(words[0], words[1]).reshape(shape))  # words 2 and 3 unused


class CPUGenerator:
    """torch.randn from a CPU torch.Generator seeded with `seed`: A1111's "CPU" source."""

    def __init__(self, seed: int):
        self.seed = check_int("seed", seed, 0, MAX_GENERATOR_SEED)
        self.generator = torch.Generator("cpu").manual_seed(self.seed)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """A float32 CPU tensor of `shape` of standard normals."""
        return torch.randn(tuple(shape), generator=self.generator)


def make_generator(seed: int, source: str = "GPU") -> CPUGenerator | PhiloxGenerator:
    """A generator for one of RNG_SOURCES seeded with `seed`, drawing with `.randn(shape)` (float32, CPU)."""
    source = check_choice("rng source", source, RNG_SOURCES)
    return CPUGenerator(seed) if source == "CPU" else PhiloxGenerator(seed)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed mix: spherical interpolation from `low` (val 0) to `high` (val 1) (Shoemake 1985,
    "Animating rotation with quaternion curves": sin((1-t)Ω)/sin Ω · p0 + sin(tΩ)/sin Ω · p1, cos Ω = p̂0·p̂1).

    Kept as A1111 computes it, since it fixes the numbers: on a per-image (C, H, W) noise the vectors are the
    columns along dim 1 (H), one angle Ω per (channel, column). When the mean cosine exceeds 0.9995 it returns
    low·val + high·(1 - val), weights the other way round from the interpolation (A1111's quirk).
    """
    low_unit = low / torch.linalg.vector_norm(low, dim=1, keepdim=True)
    high_unit = high / torch.linalg.vector_norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > SLERP_PARALLEL_DOT:
        return low * val + high * (1 - val)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    high_weight = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


def _check_shape(name: str, shape, ndim: int, letters: str) -> tuple[int, ...]:
    """`shape` as a tuple of `ndim` positive ints, else ValueError naming it."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) != ndim:
        raise ValueError(f"{name} must be {letters}: {ndim} positive integers, got {shape!r}")
    return tuple(check_int(f"{name}[{i}]", size, 1) for i, size in enumerate(shape))


def _check_seeds(name: str, seeds) -> list[int]:
    """`seeds` as a list of A1111 seeds (0 to MAX_SEED), at least one."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"{name} must be a non-empty list of seeds (integers from 0 to {MAX_SEED}), got {seeds!r}")
    return [check_seed(f"{name}[{i}]", seed) for i, seed in enumerate(seeds)]


def _check_seed_resize_from(value) -> tuple[int, int]:
    """(h, w) in pixels, or (0, 0) for off: A1111 resizes only when both are positive."""
    if is_int(value) and value == 0:
        return 0, 0
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"seed_resize_from must be (height, width) in pixels or 0 for off, got {value!r}")
    height, width = (check_int(f"seed_resize_from[{i}]", size, 0) for i, size in enumerate(value))
    if height and width and min(height, width) < LATENT_FACTOR:
        raise ValueError(f"seed_resize_from must be 0 (off) or at least {LATENT_FACTOR} pixels each way, "
                         f"got {value!r}")
    return (height, width) if height and width else (0, 0)


class ImageNoise:
    """A1111's per-image noise (modules/rng.py `ImageRNG`): the initial noise of a batch and the fresh noise of
    every later sampler step, image i from its own generator.

    shape: (C, h, w), one image's latent; seeds: one per image; source: one of RNG_SOURCES; subseeds: the
    variation seeds, one per image (None for none); subseed_strength: from 0 (the seed's noise) to 1 (the
    subseed's); seed_resize_from: (height, width) in pixels of the image the seed's noise was made for, or 0;
    eta_noise_seed_delta: A1111's "Eta noise seed delta" (ENSD) setting.

    A1111 (modules/processing.py) numbers image k of a job seed + k and subseed + k, except that with a subseed
    strength other than 0 every image keeps the seed itself; a batch passes its slice of those lists.
    """

    def __init__(self, shape, seeds, source: str = "GPU", subseeds=None, subseed_strength: float = 0.0,
                 seed_resize_from=0, eta_noise_seed_delta: int = 0):
        self.shape = _check_shape("shape", shape, 3, "(C, h, w)")
        self.seeds = _check_seeds("seeds", seeds)
        self.source = check_choice("rng source", source, RNG_SOURCES)
        self.subseeds = None if subseeds is None else _check_seeds("subseeds", subseeds)
        if self.subseeds is not None and len(self.subseeds) != len(self.seeds):
            raise ValueError(f"subseeds must give one seed per image ({len(self.seeds)}), got {len(self.subseeds)}")
        self.subseed_strength = check_number("subseed_strength", subseed_strength, 0, 1)
        self.seed_resize_from = _check_seed_resize_from(seed_resize_from)
        self.eta_noise_seed_delta = check_int("eta_noise_seed_delta", eta_noise_seed_delta, 0, MAX_SEED)
        self._generators = [make_generator(seed, self.source) for seed in self.seeds]
        self._drew_first = False

    def _seed_noise_shape(self) -> tuple[int, int, int]:
        """The shape the seed's noise is drawn at: (C, h, w), or the "resize seed from" size over 8."""
        height, width = self.seed_resize_from
        if not height:
            return self.shape
        return self.shape[0], height // LATENT_FACTOR, width // LATENT_FACTOR

    def first(self) -> torch.Tensor:
        """The initial noise, (B, C, h, w) float32 on the CPU; then, with ENSD, the generators restart from
        seed + ENSD. A second call is an error (the first noise is drawn once)."""
        if self._drew_first:
            raise RuntimeError("first() was already drawn; next() gives the following noise")
        self._drew_first = True
        seed_shape = self._seed_noise_shape()
        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self._generators, strict=True)):
            if seed_shape == self.shape:
                noise = generator.randn(self.shape)
            else:  # A1111 draws the other size from a fresh generator, and the target size from this one below
                noise = make_generator(seed, self.source).randn(seed_shape)
            if self.subseeds is not None and self.subseed_strength != 0:
                subnoise = make_generator(self.subseeds[i], self.source).randn(seed_shape)
                noise = slerp(self.subseed_strength, noise, subnoise)
            if seed_shape != self.shape:
                noise = _paste_centered(noise, generator.randn(self.shape))
            images.append(noise)
        if self.eta_noise_seed_delta:
            self._generators = [make_generator(seed + self.eta_noise_seed_delta, self.source) for seed in self.seeds]
        return torch.stack(images)  # (B, C, h, w)

    def next(self) -> torch.Tensor:
        """The next noise of every image, (B, C, h, w) float32 on the CPU; the first call before first() gives
        first(), as A1111's ImageRNG.next()."""
        if not self._drew_first:
            return self.first()
        return torch.stack([generator.randn(self.shape) for generator in self._generators])

    def as_noise_sampler(self) -> NoiseFunction:
        """The per-step noise as `noise(x, sigma, sigma_next)` (kedavra.diffusion.samplers.noise): next(), on x's
        device and dtype; x must be (B, C, h, w) of this noise."""
        batch_shape = (len(self.seeds), *self.shape)

        def noise(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
            if tuple(x.shape) != batch_shape:
                raise ValueError(f"this noise is {batch_shape}, the sampler's x is {tuple(x.shape)}")
            return self.next().to(device=x.device, dtype=x.dtype)

        return noise


def _paste_centered(noise: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """A1111's "resize seed from": `noise` (C, h', w') centred on `canvas` (C, h, w), cropped where larger. The
    offsets are floor((h - h')/2) and floor((w - w')/2) as A1111 computes them, so cropping a noise larger by an
    odd count leaves the canvas's last row or column showing."""
    (_, height, width), (_, noise_height, noise_width) = canvas.shape, noise.shape
    rows = _centered_spans(height, noise_height)
    columns = _centered_spans(width, noise_width)
    canvas[:, rows[0], columns[0]] = noise[:, rows[1], columns[1]]
    return canvas


def _centered_spans(size: int, noise_size: int) -> tuple[slice, slice]:
    """(slice of the canvas, slice of the noise) along one axis."""
    shift = (size - noise_size) // 2  # floor, as A1111's // on a possibly negative difference
    length = noise_size if shift >= 0 else noise_size + 2 * shift
    start, noise_start = max(shift, 0), max(-shift, 0)
    return slice(start, start + length), slice(noise_start, noise_start + length)


def comfyui_noise(seed: int, shape, batch_index=None) -> torch.Tensor:
    """ComfyUI's initial noise (comfy/sample.py `prepare_noise`): torch.randn of the whole (B, C, h, w) batch from
    a CPU generator seeded with `seed`, float32 on the CPU.

    batch_index (a latent's "batch_index", one per row): row j is the noise of image batch_index[j] of a batch
    drawn image by image, from image 0 to the largest index.
    """
    seed = check_int("seed", seed, 0, MAX_COMFYUI_SEED)
    shape = _check_shape("shape", shape, 4, "(B, C, h, w)")
    generator = torch.Generator("cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(shape, generator=generator)
    if isinstance(batch_index, (str, bytes)) or not isinstance(batch_index, Sequence) or len(batch_index) != shape[0]:
        raise ValueError(f"batch_index must give one image index per row ({shape[0]}), got {batch_index!r}")
    indices = [check_int(f"batch_index[{j}]", index, 0) for j, index in enumerate(batch_index)]
    wanted, rows = set(indices), {}
    for index in range(max(indices) + 1):
        row = torch.randn((1, *shape[1:]), generator=generator)  # (1, C, h, w)
        if index in wanted:
            rows[index] = row
    return torch.cat([rows[index] for index in indices])


def comfyui_inpaint_noise(seed: int, shape) -> torch.Tensor:
    """The noise ComfyUI's "ddim" adds to an inpainting mask's kept region (comfy/samplers.py, KSAMPLER.sample with
    inpaint_options {"random": True}: KSamplerX0Inpaint's noise, in x_0 + σ·noise at every evaluation) instead of the
    initial noise: torch.randn of the whole (B, C, h, w) batch from the CPU generator torch.manual_seed(seed + 1),
    float32 on the CPU. That is `comfyui_noise` of seed + 1 (without batch_index: ComfyUI draws this one whole)."""
    seed = check_int("seed", seed, 0, MAX_COMFYUI_SEED - 1, note=" (seed + 1 seeds ComfyUI's inpainting noise)")
    return comfyui_noise(seed + 1, shape)


class ComfyNoiseSampler:
    """ComfyUI's per-step noise for ancestral samplers given a seed (comfy/k_diffusion/sampling.py
    `default_noise_sampler`): torch.randn of the whole batch's shape from one generator, as
    `noise(x, sigma, sigma_next)`.

    x_or_shape: the sampler's x, or its shape (B, C, h, w). source "GPU" (or "NV"): ComfyUI on an NVIDIA card, a
    CUDA generator seeded with the seed (the Philox emulation); "CPU": ComfyUI on the CPU, a CPU generator seeded
    with seed + 1.
    """

    def __init__(self, x_or_shape, seed: int, source: str = "GPU"):
        shape = x_or_shape.shape if isinstance(x_or_shape, torch.Tensor) else x_or_shape
        self.shape = _check_shape("x shape", shape, 4, "(B, C, h, w)")
        self.source = check_choice("rng source", source, RNG_SOURCES)
        if self.source == "CPU":  # ComfyUI seeds its CPU generator with seed + 1, which must fit in 64 bits
            seed = check_int("seed", seed, 0, MAX_COMFYUI_SEED - 1, note=" (seed + 1 seeds ComfyUI's CPU generator)")
            self._generator = torch.Generator("cpu").manual_seed(seed + 1)
        else:
            self._philox = PhiloxGenerator(check_int("seed", seed, 0, MAX_COMFYUI_SEED))
        self.seed = seed

    def __call__(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """The next noise, shaped like x, on x's device and dtype."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"this noise is {self.shape}, the sampler's x is {tuple(x.shape)}")
        if self.source == "CPU":
            return torch.randn(self.shape, generator=self._generator, dtype=x.dtype).to(x.device)
        return self._philox.randn(self.shape).to(device=x.device, dtype=x.dtype)
