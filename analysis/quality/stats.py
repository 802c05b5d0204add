"""Paired intervals that decide claims about models.

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

from analysis.quality.scores import (
    LOWER_IS_BETTER,
    Reference,
    frechet_to_reference,
    poly_kernel,
    precision_indicators,
    recall,
)

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
        self.k_xx = poly_kernel(self.features, self.features)
        self.k_xy_rows = poly_kernel(self.features, reference.features).mean(1)
        k_yy = poly_kernel(reference.features, reference.features)
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
class ConfidenceInterval:
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


def _resample_plan(
    cells: Sequence[tuple[int, int]], sizes: Mapping[tuple[int, int], int], rng: np.random.Generator
) -> list[tuple[tuple[int, int], np.ndarray]]:
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


def paired_bootstrap(
    metric: str,
    a: Mapping[tuple[int, int], CellMetrics],
    b: Mapping[tuple[int, int], CellMetrics] | Sequence[tuple[float, Mapping]] | None,
    replicates: int = 200,
    seed: int = 0,
) -> ConfidenceInterval:
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
    draws = [
        np.mean([value(cell, counts) for cell, counts in _resample_plan(cells, sizes, rng)]) for _ in range(replicates)
    ]
    # Resampling images with replacement raises FID by itself (repeated images shrink the spread), so the draws
    # sit above the estimate; the percentile interval is moved back by that bias (the draws' median − estimate).
    bias = float(np.median(draws)) - point
    low, high = np.percentile(draws, [2.5, 97.5]) - bias
    return ConfidenceInterval(point, float(low), float(high), replicates)


def verdict(difference: ConfidenceInterval, metric: str, claims_improvement: bool = True) -> str:
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


def detectable(difference: ConfidenceInterval) -> str:
    """The smallest difference this run could have told from zero: about the interval's half-width."""
    return f"±{difference.half_width:.3g}"
