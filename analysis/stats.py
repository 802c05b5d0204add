"""Sample-quality metrics on extracted features, and paired intervals that decide claims.

Metrics (each equal to torch-fidelity's on the same features; tests/test_stats.py checks it):
- `fid`: ‖μ_s − μ_r‖² + tr Σ_s + tr Σ_r − 2 tr (Σ_r^½ Σ_s Σ_r^½)^½, with the reference's square root computed
  once, so a bootstrap replicate costs one symmetric eigendecomposition.
- `kid`: unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³, averaged over random subsets smaller than
  either set (torch-fidelity uses subsets of 1000 on ImageNet; with a 359-image reference a subset of the whole
  set would make every subset identical and the std meaningless), returned with its std over subsets.
- `precision` / `recall`: the k-nearest-neighbour manifolds of Kynkäänniemi et al. (k = 3, as torch-fidelity
  and ADM): precision is the share of samples inside the reference manifold (one yes/no per sample), recall the
  share of reference images inside the samples' manifold.

Paired intervals: a study has cells (training seed × sampling seed); within a cell, two runs A and B see the same
noise and labels for sample i. `paired_bootstrap` resamples training seeds, then sampling seeds within each, then
images within each cell (the same images for A and B), and returns the mean over cells of metric(A) − metric(B)
with a 95% percentile interval, shifted by the bootstrap's own estimate of its bias. Recall is resampled over seeds only (duplicated images would shrink the samples'
own neighbourhoods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

NEIGHBOURHOOD = 3  # k of the k-NN manifolds (torch-fidelity's prc_neighborhood, ADM's evaluator)
LOWER_IS_BETTER = {"fid": True, "kid": True, "precision": False, "recall": False}


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
    return np.sqrt(np.concatenate([np.partition(_squared_distances(features[i : i + block], features), k, axis=1)[:, k]
                                   for i in range(0, len(features), block)]))  # fmt: skip


def inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int = 4096) -> np.ndarray:
    """For each point: does it fall inside some centre's ball (the k-NN manifold of the centres)? Distances are
    computed as in `knn_radii`, so a point exactly at a radius compares equal."""
    points = np.asarray(points, dtype=np.float64)
    return np.concatenate([(np.sqrt(_squared_distances(points[i : i + block], centres)) <= radii[None, :]).any(1)
                           for i in range(0, len(points), block)])  # fmt: skip


def frechet_to_reference(mu: np.ndarray, sigma: np.ndarray, reference: Reference) -> float:
    """‖μ − μ_r‖² + tr Σ + tr Σ_r − 2 tr (Σ_r^½ Σ Σ_r^½)^½: one symmetric eigendecomposition per call."""
    inner = reference.sigma_sqrt @ sigma @ reference.sigma_sqrt
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    return float(((mu - reference.mu) ** 2).sum() + np.trace(sigma) + np.trace(reference.sigma) - 2 * trace_sqrt)


def fid(features: np.ndarray, reference: Reference) -> float:
    features = np.asarray(features, dtype=np.float64)
    return frechet_to_reference(features.mean(0), np.cov(features, rowvar=False), reference)


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between sets of any sizes (the diagonals are left out of the within-set means)."""
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (len(x) * (len(x) - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (len(y) * (len(y) - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kid(features: np.ndarray, reference: Reference, subset_size: int = 100, subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
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
    return {"fid": fid(features, reference), "kid": kid_mean, "kid_std": kid_std,
            "precision": float(precision_indicators(features, reference).mean()),
            "recall": recall(features, reference)}  # fmt: skip


# ---- paired intervals -----------------------------------------------------------------------------------------

Cells = Mapping[tuple[int, int], np.ndarray]  # (training seed, sampling seed) -> features (N, D) of one run


class CellMetrics:
    """One run's features in one cell, prepared so that a metric of any bootstrap resample (given as how many
    times each image is drawn, `counts`) costs one small matrix product (one eigendecomposition for FID)."""

    def __init__(self, features: np.ndarray, reference: Reference):
        self.features = np.asarray(features, dtype=np.float64)
        self.reference = reference
        self.n = len(self.features)
        self.precision = precision_indicators(self.features, reference).astype(np.float64)
        self.recall = recall(self.features, reference)
        self.k_xx = _poly_kernel(self.features, self.features)
        self.k_xy_rows = _poly_kernel(self.features, reference.features).mean(1)
        k_yy = _poly_kernel(reference.features, reference.features)
        m = len(reference.features)
        self.within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))

    def value(self, metric: str, counts: np.ndarray) -> float:
        total = counts.sum()
        if metric == "precision":
            return float(counts @ self.precision / total)
        if metric == "recall":
            return self.recall  # seeds only: duplicated images would shrink the samples' own neighbourhoods
        if metric == "kid":
            # Unbiased MMD² of the resample, leaving out pairs of the same image as the diagonal is left out.
            pairs = total**2 - (counts**2).sum()
            within_x = (counts @ self.k_xx @ counts - (counts**2 * np.diag(self.k_xx)).sum()) / pairs
            return float(within_x + self.within_y - 2 * counts @ self.k_xy_rows / total)
        if metric == "fid":  # the weighted mean and covariance of the resample
            mu = counts @ self.features / total
            centred = self.features - mu
            return frechet_to_reference(mu, (centred * counts[:, None]).T @ centred / (total - 1), self.reference)
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(LOWER_IS_BETTER)}")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval from the hierarchical bootstrap (bias-shifted percentiles)."""

    point: float
    low: float
    high: float
    replicates: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _resample_plan(cells: Sequence[tuple[int, int]], sizes: Mapping[tuple[int, int], int],
                   rng: np.random.Generator) -> list[tuple[tuple[int, int], np.ndarray]]:
    """One bootstrap replicate: training seeds, then sampling seeds within each, then images within each cell
    (as counts per image)."""
    by_train: dict[int, list[int]] = {}
    for train_seed, sample_seed in cells:
        by_train.setdefault(train_seed, []).append(sample_seed)
    train_seeds = sorted(by_train)
    plan = []
    for train_seed in rng.choice(train_seeds, len(train_seeds), replace=True):
        sample_seeds = by_train[int(train_seed)]
        for sample_seed in rng.choice(sample_seeds, len(sample_seeds), replace=True):
            cell = (int(train_seed), int(sample_seed))
            n = sizes[cell]
            plan.append((cell, np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)))
    return plan


def prepare(cells: Cells, reference: Reference) -> dict[tuple[int, int], CellMetrics]:
    return {cell: CellMetrics(features, reference) for cell, features in cells.items()}


def paired_bootstrap(metric: str, a: Mapping[tuple[int, int], CellMetrics],
                     b: Mapping[tuple[int, int], CellMetrics] | Sequence[tuple[float, Mapping]] | None,
                     replicates: int = 200, seed: int = 0) -> Interval:
    """Mean over cells of metric(A) − metric(B) (or of metric(A) alone when `b` is None), with a 95% interval
    from a hierarchical bootstrap that draws the same images for A and B (they share noise and labels). `b` may
    be a weighted combination [(w, B₁), (w', B₂), …] (e.g. a cost frontier interpolated between two runs)."""
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(LOWER_IS_BETTER)}")
    baselines = [] if b is None else ([(1.0, b)] if isinstance(b, Mapping) else list(b))
    cells = sorted(a)
    sizes = {cell: a[cell].n for cell in cells}
    for _, other in baselines:
        if set(a) != set(other):
            raise ValueError(f"paired runs need the same cells; {sorted(set(a) ^ set(other))} are not in both")
        unequal = [cell for cell in cells if other[cell].n != sizes[cell]]
        if unequal:
            raise ValueError(f"paired runs need the same images per cell; {unequal} differ in count")

    def value(cell, counts) -> float:
        return a[cell].value(metric, counts) - sum(w * other[cell].value(metric, counts) for w, other in baselines)

    point = float(np.mean([value(cell, np.ones(sizes[cell])) for cell in cells]))
    rng = np.random.default_rng(seed)
    draws = [np.mean([value(cell, counts) for cell, counts in _resample_plan(cells, sizes, rng)])
             for _ in range(replicates)]  # fmt: skip
    # Resampling images with replacement raises FID by itself (repeated images shrink the spread), so the draws
    # sit above the estimate; the percentile interval is moved back by that bias (the draws' median − estimate).
    bias = float(np.median(draws)) - point
    low, high = np.percentile(draws, [2.5, 97.5]) - bias
    return Interval(point, float(low), float(high), replicates)


def verdict(difference: Interval, metric: str, claims_improvement: bool = True) -> str:
    """What a paired difference A − B says about "A is better than B" (the paper's claim) or "A is no worse".

    holds: the interval lies on the better side of zero; fails: on the worse side; otherwise the run cannot
    tell, and says how large a difference it could have seen. A worse point estimate is never called a tie.
    """
    lower_better = LOWER_IS_BETTER[metric]
    better = difference.high < 0 if lower_better else difference.low > 0
    worse = difference.low > 0 if lower_better else difference.high < 0
    if better:
        return "holds"
    if worse:
        return "fails"
    if claims_improvement:
        return "not reproduced here"
    return "unresolved at this sample size"


def detectable(difference: Interval) -> str:
    """The smallest difference this run could have told from zero: about the interval's half-width."""
    return f"±{difference.half_width:.3g}"
