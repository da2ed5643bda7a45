"""Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") and Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs") between two
sets of Inception-v3 pool3 features (kedavra/evaluation/inception.py).

    net = load_inception()
    real, fake = inception_features(net, real_images), inception_features(net, generated_images)
    fid(real, fake)                    # float; 0 for identical sets
    kid(real, fake)                    # KernelDistance(mean, std, subset_size, subsets)

FID fits a Gaussian to each set (mean μ, covariance Σ with the unbiased 1/(n-1)) and takes the Fréchet (2-Wasserstein)
distance between them:  |μ1 - μ2|² + tr Σ1 + tr Σ2 - 2 tr (Σ1 Σ2)^½.
tr (Σ1 Σ2)^½ is taken without SciPy's sqrtm: Σ1 Σ2 is similar to the symmetric positive semi-definite
√Σ1 Σ2 √Σ1, so it is the sum of the square roots of that matrix's eigenvalues (eigh in float64, round-off negatives
set to 0). When either set has fewer images than the 2048 feature channels (every CPU-sized run here), the same
eigenvalues come from a small matrix: with centred features A (n1 x D) and B (n2 x D), Σ1 = AᵀA / (n1-1) and
Σ2 = BᵀB / (n2-1), and the non-zero eigenvalues of √Σ1 Σ2 √Σ1 are those of C Cᵀ / ((n1-1)(n2-1)) with C = A Bᵀ
(n1 x n2); `fid` takes that route, `frechet_distance` the D x D one, and a test holds them to each other.

FID is biased upwards at small n (its estimate of tr (Σ1 Σ2)^½ from n images falls short), so FIDs are comparable
only at equal n. KID is the unbiased estimate MMD²_u (Gretton et al. 2012, "A Kernel Two-Sample Test") with the cubic
polynomial kernel k(x, y) = (xᵀy / D + 1)³, averaged over random subsets of both sets (clean-fid's defaults, Parmar
et al. 2022: 100 subsets of min(n1, n2, 1000) images, drawn without replacement); its mean can be slightly negative
when the sets come from one distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kedavra.evaluation.inception import FEATURE_DIM, InceptionV3
from kedavra.validation import check_int

FEATURE_BATCH = 25  # images per Inception forward: ~0.3 s each on one CPU core, a few hundred MB of activations
KID_SUBSETS = 100  # clean-fid's num_subsets
KID_SUBSET_SIZE = 1000  # clean-fid's max_subset_size (Bińkowski et al.'s subset_size)
KID_DEGREE = 3  # the cubic polynomial kernel (Bińkowski et al. 2018, sec. 4)
KID_CACHED_KERNEL = 25_000_000  # kernel entries (200 MB in float64) up to which the whole sets' kernels are kept


def inception_features(net: InceptionV3, images, batch_size: int = FEATURE_BATCH,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, 2048) float64 pool3 features of N images: a list of PIL images, a uint8 (N, 3, H, W) tensor in [0, 255]
    or a float one in [-1, 1]. progress, when given, is called with the number of images done after each batch."""
    check_int("batch_size", batch_size, low=1)
    if len(images) == 0:
        raise ValueError("no images to take Inception features of")
    batches = []
    for first in range(0, len(images), batch_size):
        batches.append(net.features(images[first : first + batch_size]).double().numpy())
        if progress is not None:
            progress(min(first + batch_size, len(images)))
    return np.concatenate(batches)


def _check_features(features, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be an (N, D) array of N >= 2 feature vectors, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} holds non-finite values")
    return features


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(μ (D,), Σ (D, D)) of (N, D) features, float64; Σ with the unbiased 1/(N-1), as numpy.cov."""
    features = _check_features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigh, negatives from round-off -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(_symmetric(matrix))
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^½ = Σ √λ over the eigenvalues λ of the PSD √Σ1 Σ2 √Σ1 (similar to Σ1 Σ2)."""
    root = sqrt_psd(sigma1)
    eigenvalues = np.linalg.eigvalsh(_symmetric(root @ sigma2 @ root))
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|μ1 - μ2|² + tr Σ1 + tr Σ2 - 2 tr (Σ1 Σ2)^½, the Fréchet distance of two Gaussians (Heusel et al. 2017)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1 or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"means (D,) and covariances (D, D) of one D, got {mu1.shape}, {sigma1.shape}, {mu2.shape}, "
                         f"{sigma2.shape}")
    difference = mu1 - mu2
    value = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)  # round-off can leave -1e-12 for identical sets


def fid(features1, features2) -> float:
    """FID between two feature sets (N1, D) and (N2, D): `frechet_distance` of their Gaussian statistics."""
    a = _check_features(features1, "features1")
    b = _check_features(features2, "features2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}")
    n1, n2, width = a.shape[0], b.shape[0], a.shape[1]
    if min(n1, n2) > width:
        return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))
    mean1, mean2 = a.mean(axis=0), b.mean(axis=0)
    a, b = a - mean1, b - mean2  # centred: Σ1 = AᵀA / (n1-1), Σ2 = BᵀB / (n2-1)
    cross = a @ b.T  # C = A Bᵀ: (n1, n2)
    gram = cross @ cross.T if n1 <= n2 else cross.T @ cross  # C Cᵀ (n1, n1) or Cᵀ C (n2, n2): the same non-zero λ
    eigenvalues = np.linalg.eigvalsh(_symmetric(gram)) / ((n1 - 1) * (n2 - 1))
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    traces = (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1)  # tr Σ1 + tr Σ2
    difference = mean1 - mean2
    return max(float(difference @ difference + traces - 2 * trace_sqrt), 0.0)


@dataclass(frozen=True)
class KernelDistance:
    """KID: the mean and standard deviation of MMD²_u over `subsets` random subsets of `subset_size` of each set."""

    mean: float
    std: float
    subset_size: int
    subsets: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy / D + 1)³ for every pair of rows: (N1, D), (N2, D) -> (N1, N2) (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** KID_DEGREE


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """MMD²_u from the kernel matrices of m samples of each set: the means of k(x_i, x_j) and of k(y_i, y_j) over
    i != j, less twice the mean of k(x_i, y_j) over all pairs (Gretton et al. 2012)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid(features1, features2, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> KernelDistance:
    """KID between two feature sets: MMD²_u over `subsets` draws of min(N1, N2, subset_size) rows of each set
    without replacement, from numpy's generator seeded with `seed`. Up to KID_CACHED_KERNEL entries the kernel
    matrices of the whole sets are computed once and each subset reads its block of them."""
    x = _check_features(features1, "features1")
    y = _check_features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: {x.shape[1]} and {y.shape[1]}")
    check_int("KID subsets", subsets, low=1)
    check_int("KID subset_size", subset_size, low=2)  # MMD²_u averages over pairs of distinct rows
    m = min(x.shape[0], y.shape[0], subset_size)
    cached = max(x.shape[0], y.shape[0]) ** 2 <= KID_CACHED_KERNEL
    if cached:
        k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        i = rng.choice(x.shape[0], m, replace=False)
        j = rng.choice(y.shape[0], m, replace=False)
        if cached:
            blocks = k_xx[np.ix_(i, i)], k_yy[np.ix_(j, j)], k_xy[np.ix_(i, j)]
        else:
            blocks = polynomial_kernel(x[i], x[i]), polynomial_kernel(y[j], y[j]), polynomial_kernel(x[i], y[j])
        estimates.append(mmd2_unbiased(*blocks))
    return KernelDistance(float(np.mean(estimates)), float(np.std(estimates)), m, subsets)


__all__ = [
    "FEATURE_DIM",
    "KID_SUBSETS",
    "KID_SUBSET_SIZE",
    "KernelDistance",
    "fid",
    "frechet_distance",
    "gaussian_statistics",
    "inception_features",
    "kid",
    "mmd2_unbiased",
    "polynomial_kernel",
    "sqrt_psd",
    "trace_sqrt_product",
]
