"""Sample-quality metrics on feature vectors: plain NumPy, no TensorFlow.

Each function takes features (or class probabilities) of two image sets, as float arrays
[N, D], and returns numbers; which network made the features is the caller's business
(components/evaluate.py). All of them are checked against known answers in
tests/test_gan_metrics.py.

- Fréchet distance (FID, Heusel et al. 2017) between Gaussians fitted to the two sets.
- Kernel distance (KID, Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial
  kernel, mean and standard deviation over random subsets.
- Inception-style score (Salimans et al. 2016) from a classifier's probabilities.
- Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al.
  2020), from k-nearest-neighbour balls around each sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Rows of the pairwise-distance matrix computed at once: 2048 x 10000 float32 is 80 MB.
_CHUNK = 2048


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"{name}: expected features [N >= 2, D], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: features contain NaN or infinity")
    return array


# ----------------------------------------------------------------------------- FID


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum as S_a S_b.
    Unlike scipy's general sqrtm this never goes complex on near-singular covariances
    (a feature that is constant in one set), and the distance of a set to itself is 0 to
    rounding error.
    """
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mean_a - mean_b
    distance = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    return max(float(distance), 0.0)


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D]."""
    features = _as_features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))


# ----------------------------------------------------------------------------- KID


def _polynomial_kernel_sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(sum of all entries, sum of the diagonal) of k(x, y) = (x.y / D + 1)^3, the KID
    paper's kernel. The scale and the +1 ride along in the matrix product ([x/sqrt(D), 1]
    . [y/sqrt(D), 1] = x.y/D + 1), so that only the cube is left to do entry by entry;
    float32 products (twice as fast as float64 here), float64 sums."""
    scale = np.float32(1.0 / np.sqrt(x.shape[1]))
    ones_x, ones_y = np.ones((len(x), 1), np.float32), np.ones((len(y), 1), np.float32)
    kernel = np.hstack([x * scale, ones_x]) @ np.hstack([y * scale, ones_y]).T
    cube = kernel * kernel
    cube *= kernel
    return float(cube.sum(dtype=np.float64)), float(np.trace(cube, dtype=np.float64))


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, n = len(x), len(y)
    x, y = x.astype(np.float32), y.astype(np.float32)
    xx_sum, xx_diag = _polynomial_kernel_sums(x, x)
    yy_sum, yy_diag = _polynomial_kernel_sums(y, y)
    xy_sum, _ = _polynomial_kernel_sums(x, y)
    within_x = (xx_sum - xx_diag) / (m * (m - 1))
    within_y = (yy_sum - yy_diag) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * xy_sum / (m * n))


@dataclass(frozen=True)
class KernelDistance:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KernelDistance:
    """Unbiased MMD² over `subsets` random subsets of each set (without replacement within
    a subset); a subset larger than a set shrinks to the set's size."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _unbiased_mmd2(
                a[rng.choice(len(a), size, replace=False)],
                b[rng.choice(len(b), size, replace=False)],
            )
            for _ in range(subsets)
        ]
    )
    return KernelDistance(float(values.mean()), float(values.std()), subsets, size)


# ----------------------------------------------------------------------------- IS


@dataclass(frozen=True)
class InceptionScore:
    mean: float
    std: float
    splits: int


def inception_score(probabilities: np.ndarray, splits: int = 10) -> InceptionScore:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` equal parts: 1 (no class information) up
    to the number of classes (confident, evenly spread predictions)."""
    probs = np.asarray(probabilities, dtype=np.float64)
    assert probs.ndim == 2, probs.shape
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("inception_score: each row must be a probability distribution")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        logs = np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(marginal, 1e-12, None))
        scores.append(math.exp(float((part * logs).sum(axis=1).mean())))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), splits)


# ----------------------------------------------------------------------------- PRDC


def _squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


class _DistanceOperand:
    """Points laid out so that one matrix product gives squared Euclidean distances:
    [-2x, |x|^2, 1] . [y, 1, |y|^2] = |x|^2 + |y|^2 - 2 x.y. With the norms inside the
    product, no pass over the [N, M] result is needed before comparing or partially
    sorting it (each such pass over 10^8 entries costs ~0.1-0.3 s). float32, as the
    networks' features are: twice as fast as float64. No square roots: comparisons and
    partial sorts work on squares alike. Entries may come out a rounding error below 0."""

    def __init__(self, points: np.ndarray):
        points = np.asarray(points, np.float32)
        norms = _squared_norms(points)[:, None]
        ones = np.ones_like(norms)
        self.left = np.hstack([-2.0 * points, norms, ones])
        self.right = np.hstack([points, ones, norms])

    def __len__(self) -> int:
        return len(self.left)

    def squared_distances(self, rows: slice, other: _DistanceOperand) -> np.ndarray:
        """[rows, len(other)]: from these points (`rows` of them) to every other point."""
        return self.left[rows] @ other.right.T


def knn_squared_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Each point's squared distance to its k-th nearest other point [N] (float32)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k = {k}: need 1 <= k < the number of samples ({len(features)})")
    points = _DistanceOperand(features)
    squared = np.empty(len(points), np.float32)
    for start in range(0, len(points), _CHUNK):
        rows = slice(start, start + _CHUNK)
        block = points.squared_distances(rows, points)
        # Index k of the sorted row: index 0 is the point itself (distance ~0).
        squared[rows] = np.partition(block, k, axis=1)[:, k]
    return np.maximum(squared, 0.0)


@dataclass(frozen=True)
class Manifolds:
    precision: float
    recall: float
    density: float
    coverage: float
    k: int


def prdc(
    real: np.ndarray, fake: np.ndarray, k: int = 5, real_squared_radii: np.ndarray | None = None
) -> Manifolds:
    """Precision, recall, density and coverage of `fake` against `real`.

    Around each real point lies a ball reaching its k-th nearest real neighbour, and
    likewise for fake points. Precision: the share of fake points inside some real ball.
    Recall: the share of real points inside some fake ball. Density: how many real balls
    contain a fake point, on average, over k (about 1 for matching distributions; it is
    not capped at 1). Coverage: the share of real balls that contain at least one fake
    point. `real_squared_radii` (from `knn_squared_radii(real, k)`) saves recomputing them
    when one real set is compared with several others. Distances go through in row
    blocks, so memory stays bounded for any size.
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"prdc: feature sizes differ: real {real.shape}, fake {fake.shape}")
    if real_squared_radii is None:
        real_squared_radii = knn_squared_radii(real, k)
    assert real_squared_radii.shape == (len(real),), (real_squared_radii.shape, real.shape)
    real_squared, fake_squared = real_squared_radii, knn_squared_radii(fake, k)
    real_points, fake_points = _DistanceOperand(real), _DistanceOperand(fake)
    fake_in_real_balls = np.zeros(len(fake), dtype=np.int64)
    real_in_fake_ball = np.zeros(len(real), dtype=bool)
    real_ball_covered = np.zeros(len(real), dtype=bool)
    for start in range(0, len(real), _CHUNK):
        rows = slice(start, start + _CHUNK)
        block = real_points.squared_distances(rows, fake_points)  # [chunk, F]
        radii = real_squared[rows, None]
        fake_in_real_balls += (block < radii).sum(axis=0)
        real_in_fake_ball[rows] = (block < fake_squared[None, :]).any(axis=1)
        real_ball_covered[rows] = block.min(axis=1) < radii[:, 0]
    return Manifolds(
        precision=float((fake_in_real_balls > 0).mean()),
        recall=float(real_in_fake_ball.mean()),
        density=float(fake_in_real_balls.mean() / k),
        coverage=float(real_ball_covered.mean()),
        k=k,
    )


# ----------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassHistogram:
    shares: tuple[float, ...]  # share of samples predicted as each class
    entropy: float  # of the shares, in bits: log2(classes) when even, 0 when collapsed
    normalized_entropy: float  # entropy / log2(classes): 1 is perfectly even
    smallest_share: float

    @property
    def classes_present(self) -> int:
        return sum(share > 0 for share in self.shares)


def class_histogram(probabilities: np.ndarray) -> ClassHistogram:
    """How a classifier spreads the samples over its classes (by argmax)."""
    probs = np.asarray(probabilities)
    assert probs.ndim == 2, probs.shape
    classes = probs.shape[1]
    counts = np.bincount(probs.argmax(axis=1), minlength=classes)
    shares = counts / counts.sum()
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log2(nonzero)).sum())
    return ClassHistogram(
        shares=tuple(float(s) for s in shares),
        entropy=entropy,
        normalized_entropy=entropy / math.log2(classes),
        smallest_share=float(shares.min()),
    )
