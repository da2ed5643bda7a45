"""Two clusters in the plane ("cats" and "dogs"), their forward-process marginals and their exact denoiser.

The data is a mixture of isotropic Gaussians p(x_0) = Σ_k w_k N(x_0; μ_k, s_k² I). Under the forward process
x_t = √ᾱ x_0 + √(1-ᾱ) ε (DDPM eq. 4) everything stays Gaussian given the component k, so:

    marginal    p_t(x_t) = Σ_k w_k N(x_t; √ᾱ μ_k, v_k I),  v_k = ᾱ s_k² + 1 - ᾱ
    denoiser    E[x_0 | x_t] = Σ_k p(k | x_t) [μ_k + (√ᾱ s_k² / v_k)(x_t - √ᾱ μ_k)]
                E[ε | x_t]   = Σ_k p(k | x_t) (√(1-ᾱ) / v_k)(x_t - √ᾱ μ_k)
    weights     p(k | x_t) = w_k N(x_t; √ᾱ μ_k, v_k I) / p_t(x_t)

Derivation: given k, (x_0, x_t) is jointly Gaussian with Cov(x_0, x_t) = √ᾱ s_k² I, Cov(ε, x_t) = √(1-ᾱ) I and
Var(x_t) = v_k I, so the conditional means are the linear-Gaussian formula (Bishop 2006, "Pattern Recognition
and Machine Learning", eq. 2.81: E[a | b] = μ_a + Σ_ab Σ_bb⁻¹ (b - μ_b)); the law of total expectation mixes
them with Bayes' weights p(k | x_t). The mixture is also what Tweedie's formula gives from the marginal,
E[x_0 | x_t] = (x_t + (1-ᾱ) ∇ log p_t(x_t)) / √ᾱ (Efron 2011, "Tweedie's formula and selection bias"; in the
VE view, Karras et al. 2022, eq. 3); the tests check both that and a Monte Carlo estimate.

Both means are finite at ᾱ = 0 and ᾱ = 1 (v_k >= min(s_k², 1) > 0, and the ε formula has no 1/√(1-ᾱ)), so
`ExactModel` is safe on zero-terminal-SNR schedules and at the clean end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kedavra.diffusion.forward_process import check_prediction_type, training_target
from kedavra.diffusion.schedule import NoiseSchedule, check_timesteps
from kedavra.validation import check_int

BETWEEN_STDS = 2.5  # a sample "between the modes" lies more than this many stds from both means along their axis


@dataclass(frozen=True)
class GaussianMixture:
    """Σ_k w_k N(μ_k, s_k² I): means (K, D) as nested tuples, stds (K,) isotropic, weights (K,) summing to 1."""

    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        means = tuple(tuple(float(c) for c in m) for m in self.means)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", tuple(float(s) for s in self.stds))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not means or not means[0]:
            raise ValueError(f"a mixture needs at least one component of dimension >= 1, got means={self.means!r}")
        if len({len(m) for m in means}) != 1:
            raise ValueError(f"all means must have the same dimension, got {[len(m) for m in means]}")
        if not all(math.isfinite(c) for m in means for c in m):
            raise ValueError(f"means must be finite, got {means}")
        if len(self.stds) != len(means) or len(self.weights) != len(means):
            raise ValueError(
                f"need one std and one weight per mean: {len(means)} means, {len(self.stds)} stds, "
                f"{len(self.weights)} weights"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.stds):
            raise ValueError(f"stds must be finite and > 0, got {self.stds}")
        if not all(math.isfinite(w) and w > 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-6:
            raise ValueError(f"weights must be > 0 and sum to 1, got {self.weights} (sum {sum(self.weights)})")

    @property
    def num_components(self) -> int:
        return len(self.means)

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def tensors(self, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(means (K, D), stds (K,), weights (K,)) as tensors."""
        kw = {"dtype": dtype, "device": device}
        return torch.tensor(self.means, **kw), torch.tensor(self.stds, **kw), torch.tensor(self.weights, **kw)

    def sample_with_components(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32):
        """(x (n, D), k (n,)): n samples and the component each came from, drawn with `generator` (CPU)."""
        check_int("number of samples", n, low=0)
        means, stds, weights = self.tensors(torch.float64)
        k = torch.multinomial(weights, n, replacement=True, generator=generator) if n else torch.zeros(0).long()
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = means[k] + stds[k, None] * z  # (n, D)
        return x.to(dtype), k

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """n samples, shape (n, D)."""
        return self.sample_with_components(n, generator, dtype)[0]

    def mean(self) -> torch.Tensor:
        """E[x] = Σ_k w_k μ_k, float64 (D,)."""
        means, _, weights = self.tensors()
        return weights @ means

    def covariance(self) -> torch.Tensor:
        """Cov[x] = Σ_k w_k (s_k² I + μ_k μ_kᵀ) - E[x]E[x]ᵀ (law of total variance), float64 (D, D)."""
        means, stds, weights = self.tensors()
        second = torch.einsum("k,kd,ke->de", weights, means, means) + (weights @ stds**2) * torch.eye(
            self.dim, dtype=means.dtype
        )
        m = self.mean()
        return second - torch.outer(m, m)

    def marginal(self, alpha_bar: float) -> GaussianMixture:
        """The law of x_t = √ᾱ x_0 + √(1-ᾱ) ε: Σ_k w_k N(√ᾱ μ_k, (ᾱ s_k² + 1-ᾱ) I) (DDPM eq. 4 per component)."""
        alpha_bar = float(alpha_bar)
        if not 0 <= alpha_bar <= 1:
            raise ValueError(f"alpha_bar must lie in [0, 1], got {alpha_bar}")
        scale = math.sqrt(alpha_bar)
        means = tuple(tuple(scale * c for c in m) for m in self.means)
        stds = tuple(math.sqrt(alpha_bar * s**2 + 1 - alpha_bar) for s in self.stds)
        return GaussianMixture(means, stds, self.weights)

    def component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log(w_k N(x; μ_k, s_k² I)) for each sample and component, float64 (B, K)."""
        means, stds, weights = self.tensors(torch.float64, x.device)
        x = x.to(torch.float64)
        sq_dist = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # (B, K)
        var = stds**2
        return weights.log() - 0.5 * self.dim * torch.log(2 * math.pi * var) - sq_dist / (2 * var)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x of shape (B, D), float64 (B,), by log-sum-exp over the components."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)


def denoise(mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact posterior means (E[x_0 | x_t], E[ε | x_t]) for data from `mixture` (formulas in the module
    docstring). x_t: (B, D); alpha_bar: a float or a tensor (B,) in [0, 1]. Computed in float64, returned in
    x_t's dtype."""
    x = x_t.to(torch.float64)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device)
    if ((alpha_bar < 0) | (alpha_bar > 1)).any() or not torch.isfinite(alpha_bar).all():
        raise ValueError(f"alpha_bar must lie in [0, 1], got {alpha_bar.flatten()[:8].tolist()}")
    means, stds, weights = mixture.tensors(torch.float64, x.device)
    # Components lead (K, B, ...) so the sums over them run over the outer axis, which is fast on the CPU.
    alpha_bar = alpha_bar.reshape(1, -1, 1)  # (1, B|1, 1)
    scale, noise_scale = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    var = alpha_bar * stds[:, None, None] ** 2 + 1 - alpha_bar  # v_k = ᾱ s_k² + 1 - ᾱ, (K, B|1, 1)
    offset = x[None] - scale * means[:, None, :]  # x_t - √ᾱ μ_k, (K, B, D)
    sq_dist = offset.square() @ torch.ones(mixture.dim, dtype=x.dtype, device=x.device)  # (K, B)
    log_lik = (
        weights.log()[:, None] - 0.5 * mixture.dim * torch.log(2 * math.pi * var[..., 0]) - sq_dist / (2 * var[..., 0])
    )  # log w_k N(x_t; √ᾱ μ_k, v_k I), (K, B)
    posterior = (log_lik - torch.logsumexp(log_lik, dim=0)).exp()[..., None]  # p(k | x_t) by Bayes, (K, B, 1)
    x0_given_k = means[:, None, :] + scale * stds[:, None, None] ** 2 / var * offset  # Bishop 2006, eq. 2.81
    eps_given_k = noise_scale / var * offset  # Cov(ε, x_t | k) Var(x_t | k)⁻¹ (x_t - E[x_t | k])
    x0 = (posterior * x0_given_k).sum(0)  # law of total expectation, (B, D)
    eps = (posterior * eps_given_k).sum(0)
    return x0.to(x_t.dtype), eps.to(x_t.dtype)


def mode_axis(mixture: GaussianMixture, num_stds: float = BETWEEN_STDS) -> tuple[torch.Tensor, float, float]:
    """(u, low, high) for a two-component mixture: u (D,) the unit vector from mean 0 to mean 1, and the open
    interval of positions x·u more than `num_stds` stds from both means ("between the modes"; for means (∓2, 0)
    with std 0.4 and 2.5 stds: u = (1, 0), the interval (-1, 1))."""
    if mixture.num_components != 2:
        raise ValueError(f"'between the modes' needs a mixture of exactly 2 components, got {mixture.num_components}")
    if not num_stds > 0:
        raise ValueError(f"num_stds must be > 0, got {num_stds}")
    means = mixture.tensors()[0]
    gap = (means[1] - means[0]).norm().item()
    u = (means[1] - means[0]) / gap
    start = (means[0] @ u).item()
    low, high = start + num_stds * mixture.stds[0], start + gap - num_stds * mixture.stds[1]
    if low >= high:
        raise ValueError(f"the means are only {gap:.3g} apart: no point lies {num_stds} stds from both")
    return u, low, high


def fraction_between(x: torch.Tensor, mixture: GaussianMixture, num_stds: float = BETWEEN_STDS) -> float:
    """The fraction of samples x (B, D) between the modes of a two-component mixture (see `mode_axis`)."""
    u, low, high = mode_axis(mixture, num_stds)
    position = x.to(torch.float64) @ u.to(x.device)  # (B,)
    return ((position > low) & (position < high)).double().mean().item() if len(x) else 0.0


def expected_fraction_between(mixture: GaussianMixture, num_stds: float = BETWEEN_STDS) -> float:
    """The fraction of the mixture's own samples that `fraction_between` counts (normal CDFs per component)."""
    u, low, high = mode_axis(mixture, num_stds)
    total = 0.0
    for weight, std, mean in zip(mixture.weights, mixture.stds, mixture.means, strict=True):
        centre = sum(c * d for c, d in zip(mean, u.tolist(), strict=True))
        total += weight * (_normal_cdf((high - centre) / std) - _normal_cdf((low - centre) / std))
    return total


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@dataclass(frozen=True)
class ExactModel:
    """The exact denoiser of `mixture` as a model callable `model(x_t, t)`, for the samplers (no training).

    t: (B,) training timesteps of `schedule`, possibly fractional: ᾱ is `schedule.alpha_bar` at integer t (exact,
    and 0 at a zero-terminal-SNR last step) and `schedule.alpha_bar_at` (log-σ interpolation) between them.
    Returns the ε-, x_0- or v-prediction (`prediction_type`), the minimum-mean-squared-error one.
    """

    mixture: GaussianMixture
    schedule: NoiseSchedule
    prediction_type: str = "eps"

    def __post_init__(self):
        object.__setattr__(self, "prediction_type", check_prediction_type(self.prediction_type))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if len(t) > 1 and bool((t == t[0]).all()):  # one level for the whole batch, as samplers ask: (1,)
            t = t[:1]
        alpha_bar = alpha_bar_of(self.schedule, t).to(x_t.device)  # (B,) or (1,), float64
        x0, eps = denoise(self.mixture, x_t, alpha_bar)
        return training_target(eps, x0, alpha_bar.to(x_t.dtype), self.prediction_type)


def alpha_bar_of(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at timesteps t (B,), float64: the table value at integer t, log-σ interpolation between them."""
    t = torch.as_tensor(t).detach().cpu().to(torch.float64)
    check_timesteps(t, schedule.num_train_timesteps)
    integer = t == t.round()
    table = schedule.alpha_bar[t.round().long()]
    if integer.all():
        return table
    return torch.where(integer, table, schedule.alpha_bar_at(torch.where(integer, t.new_zeros(()), t)))


# The project's two clusters: "cats" on the left, "dogs" on the right, 10 stds apart.
TWO_MODES = GaussianMixture(means=((-2.0, 0.0), (2.0, 0.0)), stds=(0.4, 0.4), weights=(0.5, 0.5))
MODE_NAMES = ("cats", "dogs")
