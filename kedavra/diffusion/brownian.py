"""A seeded Brownian tree: the noise of the SDE samplers of A1111 and ComfyUI (DPM++ SDE, 2M SDE, 3M SDE).

A Brownian motion W on [t0, t1] is fixed by its increments W(s, t) = W(t) - W(s) ~ N(0, |t - s| I), independent
over disjoint intervals. An SDE sampler that takes a step σ -> σ_next needs the increment over that step, and a
sampler that evaluates a midpoint (DPM++ SDE) needs increments over sub-steps that add up to the whole step's:
drawing fresh Gaussian noise per call would make them independent, which they are not.

A Brownian tree (Kidger et al. 2021, "Efficient and Accurate Gradients for Neural SDEs", sec. 3 and Algorithm 1,
"the Brownian interval") holds the motion as a binary tree of intervals. The root holds W(t0, t1) drawn from its
seed; a node [s, t] split at u hands its increment to its children by the Brownian bridge,

    W(s, u) = (u - s)/(t - s) · W(s, t) + √((u - s)(t - u)/(t - s)) · Z,    W(u, t) = W(s, t) - W(s, u),

with Z ~ N(0, I) drawn from a seed of the node itself, so any node's value is recomputed from its ancestors alone.
An increment over [ta, tb] is the sum of the increments of the nodes that tile it. Karras et al. 2022 ("Elucidating
the Design Space of Diffusion-Based Generative Models") frame sampling as solving an SDE in σ; Katherine Crowson's
k-diffusion runs its DPM++ SDE samplers (Lu et al. 2022, "DPM-Solver++") on torchsde's `BrownianTree`, through
k-diffusion's `BatchedBrownianTree` and `BrownianTreeNoiseSampler`, and A1111 and ComfyUI use those classes.

What is reproduced, bit for bit, from torchsde 0.2.6 `BrownianTree` (= `BrownianInterval` with halfway_tree=True,
tol=1e-6, pool_size=24, levy_area_approximation="none") and k-diffusion 0.1.1.post1:

- seeds: the root draws its increment with the first of the three words of numpy's
  `SeedSequence(entropy, pool_size=24).generate_state(3)`; a node at depth d with path key k (root 0; a left child
  2k, a right child 2k + 1) draws its children's Z with the first word of
  `SeedSequence(entropy, spawn_key=(k, d), pool_size=24).generate_state(4)`; each word seeds a fresh
  `torch.Generator(device)` for one `torch.randn(shape, dtype)`.
- the root increment: randn · √(t1 - t0), with the unrounded t0, t1.
- tolerance: every time (node edges, query points) is rounded with `round(t, 6)` (6 = -int(log10 tol)).
- the halfway tree: every node is split at round((start + end)/2), whatever was queried, so the numbers depend on
  the seed and the query points alone, not on the order of queries; an interval [ta, tb] is tiled by the dyadic
  nodes met descending from the root, summed left to right, each node's value computed with the same float
  operations in the same order as torchsde.
- queries: times outside [t0, t1] are clamped to it (torchsde warns and clamps); a query whose ends are equal, or
  round to the same point, gives zeros (torchsde gives zeros up to a rounding residue, ~1e-19 measured in float64,
  or for some points splits without end until RecursionError).
- k-diffusion: σ's become float32 0-d tensors (`torch.as_tensor` of a Python float); t = transform(σ); the trees
  span the sorted (t(σ_min), t(σ_max)) and each answer is W(sorted query) · (sign of the span · sign of the query)
  / √|t(σ_next) - t(σ)|, the last in float32 tensor arithmetic; a list of seeds gives one tree per batch row, each
  of the row's shape, stacked; one int seed gives one tree of the whole batch's shape.

torchsde keeps computed node values in an LRU cache of 45 entries; a node evicted from it is recomputed from its
parent by the same operations, so the cache changes speed, never numbers. The cache here is the same size.
Not reproduced (no k-diffusion path uses them): space-time and full Lévy area, the non-halfway dependency tree of
plain `BrownianInterval`, and user-given root increments (`w1`).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from kedavra.validation import check_number, is_int

TOLERANCE = 1e-6  # resolution of query times: torchsde.BrownianTree's default tol
POOL_SIZE = 24  # entropy pool of numpy's SeedSequence: torchsde.BrownianTree's default pool_size
CACHE_SIZE = 45  # node values kept: torchsde.BrownianInterval's default cache_size
RANGE_SLACK = 1e-5  # relative slack for query times past the tree's ends (σ -> -log σ -> σ float32 round trips)


def check_seed(name: str, seed) -> int:
    """`seed` as an int when it is a non-negative integer (any size: numpy's SeedSequence takes them all, and
    ComfyUI's seeds reach 2**64 - 1), else ValueError."""
    if not is_int(seed) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer (numpy SeedSequence entropy), got {seed!r}")
    return int(seed)


class _Node:
    """An interval [start, end] of the tree; once split, its midway, children and the seed of their bridge noise."""

    __slots__ = ("start", "end", "parent", "is_left", "key", "depth", "midway", "left", "right", "seed")

    def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool):
        self.start, self.end, self.parent, self.is_left = start, end, parent, is_left
        self.key = 0 if parent is None else 2 * parent.key + (0 if is_left else 1)  # path from the root, in bits
        self.depth = 0 if parent is None else parent.depth + 1
        self.midway = self.left = self.right = self.seed = None


class BrownianInterval:
    """A Brownian motion on [t0, t1] of the given shape, seeded by `entropy`: `tree(ta, tb)` is W(tb) - W(ta).

    The same numbers as `torchsde.BrownianTree(t0, zeros(shape, dtype, device), t1, entropy=entropy)(ta, tb)` for
    every query in any order (see the module docstring for what is reproduced). t0 < t1 are floats; ta <= tb.
    """

    def __init__(self, t0: float, t1: float, shape: Sequence[int], *, entropy: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tol: float = TOLERANCE, pool_size: int = POOL_SIZE,
                 cache_size: int = CACHE_SIZE):
        t0, t1 = check_number("t0", t0), check_number("t1", t1)
        if not t0 < t1:
            raise ValueError(f"a Brownian interval needs t0 < t1, got t0={t0!r}, t1={t1!r}")
        self.shape = tuple(int(n) for n in shape)
        self.entropy = check_seed("entropy", entropy)
        self.dtype, self.device = dtype, torch.device(device)
        self._digits = -int(math.log10(check_number("tol", tol, low=0, low_inclusive=False)))
        self._pool_size, self._cache_size = pool_size, cache_size
        self._cache: OrderedDict[_Node, torch.Tensor] = OrderedDict()
        self._root = _Node(self._round(t0), self._round(t1), None, True)
        root_seed = np.random.SeedSequence(entropy=self.entropy, pool_size=pool_size).generate_state(3)[0]
        self._root_increment = self._randn(root_seed) * math.sqrt(t1 - t0)  # W(t0, t1) ~ N(0, (t1 - t0) I)

    @property
    def t0(self) -> float:
        return self._root.start

    @property
    def t1(self) -> float:
        return self._root.end

    def __call__(self, ta: float, tb: float) -> torch.Tensor:
        """W(tb) - W(ta), with ta and tb clamped to [t0, t1] and rounded to the tolerance."""
        ta, tb = float(ta), float(tb)
        if not ta <= tb:
            raise ValueError(f"a Brownian increment needs ta <= tb, got ta={ta!r}, tb={tb!r}")
        ta = self._round(min(max(ta, self.t0), self.t1))
        tb = self._round(min(max(tb, self.t0), self.t1))
        if ta == tb:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        pieces: list[_Node] = []
        self._tile(self._root, ta, tb, pieces)
        increment = self._increment(pieces[0])
        for node in pieces[1:]:
            increment = increment + self._increment(node)
        return increment

    def _round(self, t: float) -> float:
        return round(t, self._digits)

    def _randn(self, seed) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(int(seed))
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=generator)

    def _split(self, node: _Node) -> float:
        """The node's midway, splitting it at its rounded halfway point if it has no children yet."""
        if node.midway is None:
            node.midway = self._round(0.5 * (node.end + node.start))
            node.left = _Node(node.start, node.midway, node, True)
            node.right = _Node(node.midway, node.end, node, False)
            spawned = np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.key, node.depth),
                                             pool_size=self._pool_size)
            node.seed = spawned.generate_state(4)[0]  # torchsde's W seed; the H and Lévy-area seeds go unused
        return node.midway

    def _tile(self, node: _Node, ta: float, tb: float, pieces: list[_Node]) -> None:
        """Append to `pieces`, left to right, the nodes under `node` that tile [ta, tb] (within the node)."""
        if ta == node.start and tb == node.end:
            pieces.append(node)
            return
        midway = self._split(node)
        if tb <= midway:
            self._tile(node.left, ta, tb, pieces)
        elif ta >= midway:
            self._tile(node.right, ta, tb, pieces)
        else:
            self._tile(node.left, ta, midway, pieces)
            self._tile(node.right, midway, tb, pieces)

    def _increment(self, node: _Node) -> torch.Tensor:
        """W over the node: from its nearest ancestor with a known value, down by the Brownian bridge."""
        path = []
        while node.parent is not None and node not in self._cache:
            path.append(node)
            node = node.parent
        increment = self._root_increment if node.parent is None else self._cache[node]
        for child in reversed(path):
            increment = self._bridge(child.parent, increment, child.is_left)
            self._remember(child, increment)
        return increment

    def _bridge(self, parent: _Node, increment: torch.Tensor, left: bool) -> torch.Tensor:
        """A child's increment from its parent's W(s, t), split at u (Kidger et al. 2021, the Brownian bridge):
        W(s, u) = (u - s)/(t - s) W(s, t) + √((u - s)(t - u)/(t - s)) Z and W(u, t) = W(s, t) - W(s, u)."""
        h_reciprocal = 1 / (parent.end - parent.start)
        left_diff = parent.midway - parent.start
        right_diff = parent.end - parent.midway
        mean = left_diff * increment * h_reciprocal
        variance = left_diff * right_diff * h_reciprocal
        left_increment = mean + math.sqrt(variance) * self._randn(parent.seed)
        return left_increment if left else increment - left_increment

    def _remember(self, node: _Node, increment: torch.Tensor) -> None:
        """Keep a node's value, dropping the oldest kept one past `cache_size` (torchsde's _LRUDict)."""
        if node in self._cache:
            del self._cache[node]
        elif len(self._cache) >= self._cache_size:
            self._cache.popitem(last=False)
        self._cache[node] = increment


def _as_time(sigma) -> torch.Tensor:
    """σ as the float32 0-d tensor k-diffusion makes of it (`torch.as_tensor` of a Python float)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be a number or a one-element tensor, got shape {tuple(sigma.shape)}")
        sigma = sigma.item()
    return torch.tensor(check_number("sigma", sigma), dtype=torch.float32)


def _check_seeds(seed, batch: int | None) -> list[int] | None:
    """The per-row seeds of a list (one per batch row), or None for a single int seed."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        check_seed("seed", seed)
        return None
    if not isinstance(seed, (list, tuple)):
        raise ValueError(f"seed must be a non-negative integer or a list of them (one per batch row), got {seed!r}")
    if batch is None:
        raise ValueError(f"a list of seeds needs x with a batch dimension, got a 0-d x and seed={seed!r}")
    if len(seed) != batch:
        raise ValueError(f"a list of seeds needs one seed per batch row ({batch} rows), got {len(seed)}: {seed!r}")
    return [check_seed(f"seed[{i}]", s) for i, s in enumerate(seed)]


class BrownianTreeNoise:
    """Noise for SDE samplers from seeded Brownian trees: k-diffusion's `BrownianTreeNoiseSampler`, as A1111
    (seed = the batch's list of per-image seeds, trees on x's device) and ComfyUI (seed = one int, device="cpu")
    build it.

    `noise(x, sigma, sigma_next)` is W(t(σ) -> t(σ_next)) / √|t(σ_next) - t(σ)|, shaped like x: standard normal
    per element, and the increments of consecutive calls add up like one Brownian path (with σ decreasing, the
    step σ -> σ_next reads the path backwards: W(σ_next, σ) negated, as k-diffusion does).

    x: a tensor of the sampler's state shape and dtype. sigma_min < sigma_max: the positive ends of the schedule
    (k-diffusion: the smallest positive σ and the largest). seed: one non-negative int (one tree for the whole
    batch) or a list of them, one per batch row (one tree per row, row i the same as a batch of one with seed[i]).
    transform: σ -> the sampler's time, on float32 0-d tensors (None: t = σ). device: where the trees draw their
    noise (None: x's device, as A1111; ComfyUI draws on "cpu").
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | str | None = None):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} "
                             f"{getattr(x, 'dtype', '')}".rstrip())
        sigma_min = check_number("sigma_min", sigma_min, low=0, low_inclusive=False)
        sigma_max = check_number("sigma_max", sigma_max, low=0, low_inclusive=False)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be less than sigma_max, got sigma_min={sigma_min!r}, "
                             f"sigma_max={sigma_max!r}")
        seeds = _check_seeds(seed, x.shape[0] if x.ndim else None)
        self.shape = tuple(x.shape)
        self._transform = transform if transform is not None else (lambda t: t)
        t_min, t_max = self._transform(_as_time(sigma_min)), self._transform(_as_time(sigma_max))
        if not (torch.isfinite(t_min) and torch.isfinite(t_max) and t_min != t_max):
            raise ValueError(f"transform must map sigma_min={sigma_min!r} and sigma_max={sigma_max!r} to two distinct "
                             f"finite times, got {t_min.item()!r} and {t_max.item()!r}")
        self._sign = 1 if t_min < t_max else -1
        low, high = sorted((t_min.item(), t_max.item()))
        self._slack = RANGE_SLACK * max(abs(low), abs(high), high - low)
        device = x.device if device is None else torch.device(device)
        self._batched = seeds is not None
        tree_shape = self.shape[1:] if self._batched else self.shape
        self._trees = [BrownianInterval(low, high, tree_shape, entropy=s, dtype=x.dtype, device=device)
                       for s in (seeds if self._batched else [check_seed("seed", seed)])]

    def __call__(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """The step's standardised Brownian increment, a tensor shaped like x on x's device."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"x must have the shape the noise was built for, {self.shape}, got {tuple(x.shape)}")
        t, t_next = self._transform(_as_time(sigma)), self._transform(_as_time(sigma_next))
        low, high, sign = (t, t_next, 1) if t < t_next else (t_next, t, -1)
        tree = self._trees[0]
        if not (low.item() >= tree.t0 - self._slack and high.item() <= tree.t1 + self._slack):
            raise ValueError(f"sigma={sigma!r} and sigma_next={sigma_next!r} must lie in the noise's span, times "
                             f"[{tree.t0}, {tree.t1}], got times {t.item()!r} and {t_next.item()!r}")
        if low == high:
            raise ValueError(f"sigma and sigma_next must differ (as float32), got {sigma!r} and {sigma_next!r}")
        if self._batched:
            increment = torch.stack([tree(low.item(), high.item()) for tree in self._trees])  # (B, ...)
        else:
            increment = tree(low.item(), high.item())
        increment = increment * (self._sign * sign)
        return (increment / (t_next - t).abs().sqrt()).to(x.device)
