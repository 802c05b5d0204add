"""Sample-quality scores on extracted features: FID, KID, precision and recall.

Metrics (each equal to torch-fidelity's on the same features; tests/test_stats.py checks it):
- `fid`: ‖μ_s − μ_r‖² + tr Σ_s + tr Σ_r − 2 tr (Σ_r^½ Σ_s Σ_r^½)^½, with the reference's square root computed
  once, so a bootstrap replicate costs one symmetric eigendecomposition.
- `kid`: unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³, averaged over random subsets smaller than
  either set (torch-fidelity uses subsets of 1000 on ImageNet; with a 359-image reference a subset of the whole
  set would make every subset identical and the std meaningless), returned with its std over subsets.
- `precision` / `recall`: the k-nearest-neighbour manifolds of Kynkäänniemi et al. (k = 3, as torch-fidelity
  and ADM): precision is the share of samples inside the reference manifold (one yes/no per sample), recall the
  share of reference images inside the samples' manifold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEIGHBOURHOOD = 3  # k of the k-NN manifolds (torch-fidelity's prc_neighborhood, ADM's evaluator)
LOWER_IS_BETTER = {"fid": True, "kid": True, "precision": False, "recall": False}


def precision_recall_shortfall(num_samples: int, num_reference: int, k: int = NEIGHBOURHOOD) -> str | None:
    """Why precision and recall cannot be scored on sets of these sizes, or None when they can: each image's
    radius is the distance to its k-th nearest other image of its own set, so each set needs k + 1 images."""
    small = [
        f"the {what} {count}"
        for what, count in (("samples have", num_samples), ("reference has", num_reference))
        if count <= k
    ]
    if not small:
        return None
    return f"k-nearest-neighbour manifolds (k = {k}) need at least {k + 1} images in each set; {' and '.join(small)}"


def statistics_size(mu, sigma, origin: str) -> int:
    """The feature count D of Gaussian statistics `mu` (D,) and `sigma` (D, D); other shapes are refused with a
    line naming `origin` (the file they came from)."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(
            f"{origin}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not the statistics of one feature "
            "set (mu (D,), sigma (D, D))"
        )
    return len(mu)


@dataclass
class Reference:
    """A reference set's features and what every metric needs from it, computed once."""

    features: np.ndarray  # (M, D) float64
    mu: np.ndarray
    sigma: np.ndarray
    sigma_sqrt: np.ndarray
    radii: np.ndarray  # distance of each reference point to its k-th nearest other reference point

    @classmethod
    def from_features(cls, features: np.ndarray) -> "Reference":
        features = np.asarray(features, dtype=np.float64)
        if len(features) < NEIGHBOURHOOD + 2:
            raise ValueError(f"a reference needs at least {NEIGHBOURHOOD + 2} images, got {len(features)}")
        sigma = np.cov(features, rowvar=False)
        return cls(features, features.mean(0), sigma, _psd_sqrt(sigma), knn_radii(features))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def knn_radii(features: np.ndarray, k: int = NEIGHBOURHOOD, block: int = 4096) -> np.ndarray:
    """Distance of each point to its k-th nearest other point (the point itself is the 0th), in row blocks so
    that 50,000 points never need the whole distance matrix at once."""
    features = np.asarray(features, dtype=np.float64)
    return np.sqrt(
        np.concatenate(
            [
                np.partition(_squared_distances(features[i : i + block], features), k, axis=1)[:, k]
                for i in range(0, len(features), block)
            ]
        )
    )


def inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int = 4096) -> np.ndarray:
    """For each point: does it fall inside some centre's ball (the k-NN manifold of the centres)? Distances are
    computed as in `knn_radii`, so a point exactly at a radius compares equal."""
    points = np.asarray(points, dtype=np.float64)
    return np.concatenate(
        [
            (np.sqrt(_squared_distances(points[i : i + block], centres)) <= radii[None, :]).any(1)
            for i in range(0, len(points), block)
        ]
    )


def frechet_to_reference(mu: np.ndarray, sigma: np.ndarray, reference: Reference) -> float:
    """‖μ − μ_r‖² + tr Σ + tr Σ_r − 2 tr (Σ_r^½ Σ Σ_r^½)^½: one symmetric eigendecomposition per call."""
    inner = reference.sigma_sqrt @ sigma @ reference.sigma_sqrt
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    return float(((mu - reference.mu) ** 2).sum() + np.trace(sigma) + np.trace(reference.sigma) - 2 * trace_sqrt)


def fid(features: np.ndarray, reference: Reference) -> float:
    features = np.asarray(features, dtype=np.float64)
    return frechet_to_reference(features.mean(0), np.cov(features, rowvar=False), reference)


def poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between sets of any sizes (the diagonals are left out of the within-set means)."""
    k_xx, k_yy, k_xy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (len(x) * (len(x) - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (len(y) * (len(y) - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kid(
    features: np.ndarray, reference: Reference, subset_size: int = 100, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD² over `subsets` random subsets of `subset_size` from each set."""
    features = np.asarray(features, dtype=np.float64)
    size = min(subset_size, len(features) - 1, len(reference.features) - 1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = features[rng.choice(len(features), size, replace=False)]
        y = reference.features[rng.choice(len(reference.features), size, replace=False)]
        values.append(mmd2_unbiased(x, y))
    return float(np.mean(values)), float(np.std(values))


def precision_indicators(features: np.ndarray, reference: Reference) -> np.ndarray:
    """For each sample: does it fall inside some reference point's k-NN ball?"""
    return inside_manifold(features, reference.features, reference.radii)


def recall(features: np.ndarray, reference: Reference) -> float:
    """Share of reference points inside some sample's k-NN ball (radii measured among the samples)."""
    return float(inside_manifold(reference.features, features, knn_radii(features)).mean())


def all_metrics(features: np.ndarray, reference: Reference, kid_subset_size: int = 100) -> dict[str, float]:
    kid_mean, kid_std = kid(features, reference, kid_subset_size)
    return {
        "fid": fid(features, reference),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": float(precision_indicators(features, reference).mean()),
        "recall": recall(features, reference),
    }


def real_data_floor(
    real_features: np.ndarray, reference: Reference, count: int, draws: int = 20, seed: int = 0
) -> tuple[float, float]:
    """(mean, SD) of the FID of `count` real images, drawn without replacement from another split of the same
    data, against the reference: what a perfect model would score at this image count (its finite-sample bias)."""
    real_features = np.asarray(real_features, dtype=np.float64)
    if count > len(real_features):
        raise ValueError(f"the floor at {count} images needs that many real images; {len(real_features)} given")
    rng = np.random.default_rng(seed)
    values = [fid(real_features[rng.choice(len(real_features), count, replace=False)], reference) for _ in range(draws)]
    return float(np.mean(values)), float(np.std(values, ddof=1))


def fid_infinity(features: np.ndarray, reference: Reference, points: int = 10, draws: int = 3, seed: int = 0) -> float:
    """FID extrapolated to infinitely many samples (Chong & Forsyth, CVPR 2020, "Effectively Unbiased FID"):
    FID of random subsets of `points` sizes from half the set to all of it is fitted linearly in 1/N, and the
    intercept is returned. The bias of FID at N images is close to linear in 1/N, so the intercept is free of it."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if n < 20:
        raise ValueError(f"FID∞ needs at least 20 images to extrapolate from, got {n}")
    rng = np.random.default_rng(seed)
    sizes = np.linspace(n // 2, n, points).astype(int)
    inverse, values = [], []
    for size in sizes:
        for _ in range(draws if size < n else 1):
            inverse.append(1.0 / size)
            values.append(fid(features[rng.choice(n, size, replace=False)], reference))
    slope, intercept = np.polyfit(inverse, values, 1)
    return float(intercept)
