"""Seed-level paired intervals, multiplicity and verdicts: how a study decides claims about models (see below)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from analysis.quality.scores import (
    LOWER_IS_BETTER,
)

# ---- seed-level inference -------------------------------------------------------------------------------------
#
# The unit of replication of a claim about models is the training seed. With the cells of a study balanced
# (every training seed sampled with the same sampling seeds, the same number of images), the per-seed mean of the
# paired cell differences, d_t = mean_s [metric_A(t, s) − Σ w·metric_B(t, s)], are independent draws around the
# true difference, and each already carries its sampling-seed and image noise: whatever the image-level
# estimator's spread (FID's, recall's), it is inside d_t. So a t-interval over the n training seeds needs no
# model of the nested variances, and is exact when d_t is normal. The bootstrap over 2-3 seeds was not: the
# percentile range of n draws holds their centre with probability 1 − 2^(1−n) (50% at 2 seeds). Its coverage
# at the presets' sizes, with the variances measured in the committed runs, is measured by simulation
# (`simulate_coverage`, tests/test_stats.py, benchmarks/RESULTS.md).
#
# Multiplicity: a report decides a family of claims at once, so its p-values are adjusted by Holm's step-down
# method. Holm controls the family-wise error at 5% under any dependence between the claims (they share
# baselines and seeds, so they are dependent), and is uniformly more powerful than Bonferroni; the
# Benjamini–Hochberg false discovery rate would let a share of the "holds" and "fails" be wrong, which a
# reproduction report should not.

MIN_SEEDS_FOR_VERDICT = 3  # below this a t-interval has 1 degree of freedom and decides nothing in practice
VERDICT_METRICS = ("fid", "precision", "recall")  # KID is reported, not decided on (see `KID_EXCLUSION`)
KID_EXCLUSION = (
    "KID is reported but takes no part in the verdicts: on the digits features (norms about 42, x·y/d about 12) "
    "the cubic kernel (x·y/d + 1)³ is dominated by the feature norms, and real digits against the held-out ones "
    "score -4.7 ± 3.2 (×1e3, 250 images, 20 draws), a spread as large as the differences between models."
)


@dataclass(frozen=True)
class SeedLevelDifference:
    """The mean over training seeds of a paired difference, with its t-interval and test."""

    point: float
    low: float  # 95% t-interval over training seeds (n − 1 degrees of freedom); nan below 2 seeds
    high: float
    p_value: float  # two-sided test of no difference; nan below 2 seeds
    detectable: float  # the true difference this design detects with 80% power (two-sided 5%)
    per_seed: tuple[float, ...]

    @property
    def seeds(self) -> int:
        return len(self.per_seed)


def per_seed_differences(
    a: Mapping[tuple[int, int], float], baseline: Sequence[tuple[float, Mapping[tuple[int, int], float]]]
) -> dict[int, float]:
    """{training seed: mean over its sampling seeds of a − Σ w·b}, from per-cell values keyed (train, sample)."""
    for _, other in baseline:
        if set(a) != set(other):
            raise ValueError(f"paired runs need the same cells; {sorted(set(a) ^ set(other))} are not in both")
    by_seed: dict[int, list[float]] = {}
    for (train_seed, sample_seed), value in sorted(a.items()):
        paired = value - sum(w * other[(train_seed, sample_seed)] for w, other in baseline)
        by_seed.setdefault(int(train_seed), []).append(paired)
    sizes = {len(values) for values in by_seed.values()}
    if len(sizes) > 1:
        raise ValueError("every training seed needs the same sampling seeds (a balanced design)")
    return {seed: float(np.mean(values)) for seed, values in by_seed.items()}


def seed_level_difference(per_seed: Sequence[float], level: float = 0.95, power: float = 0.8) -> SeedLevelDifference:
    """Paired t-interval and test over training seeds, and the minimum detectable difference at `power`:
    (t_{1−α/2} + t_{power}) · s/√n with n − 1 degrees of freedom (the usual approximation to the noncentral t)."""
    from scipy import stats as scipy_stats

    values = np.asarray(per_seed, dtype=np.float64)
    n, point = len(values), float(values.mean())
    if n < 2:
        nan = float("nan")
        return SeedLevelDifference(point, nan, nan, nan, nan, tuple(values.tolist()))
    se = float(values.std(ddof=1) / np.sqrt(n))
    critical = scipy_stats.t.ppf(0.5 + level / 2, n - 1)
    if se == 0.0:  # every seed gave the same difference (e.g. two names for one schedule)
        p_value = 1.0 if point == 0.0 else 0.0
    else:
        p_value = float(2 * scipy_stats.t.sf(abs(point) / se, n - 1))
    detectable = float((critical + scipy_stats.t.ppf(power, n - 1)) * se)
    return SeedLevelDifference(
        point, float(point - critical * se), float(point + critical * se), p_value, detectable, tuple(values.tolist())
    )


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment: p_(i) ↦ max_{j ≤ i} min(1, (m − j + 1)·p_(j)); nan stays nan."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    order = present[np.argsort(p[present], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def seed_verdict(difference: SeedLevelDifference, adjusted_p: float, metric: str, alpha: float = 0.05) -> str:
    """holds / fails only with ≥ MIN_SEEDS_FOR_VERDICT training seeds and a family-adjusted p below `alpha`;
    otherwise the numbers stand without a verdict."""
    if difference.seeds < MIN_SEEDS_FOR_VERDICT:
        return f"no verdict ({difference.seeds} training seeds; {MIN_SEEDS_FOR_VERDICT} needed)"
    if not adjusted_p < alpha:
        return "not resolved"
    better = difference.point < 0 if LOWER_IS_BETTER[metric] else difference.point > 0
    return "holds" if better else "fails"


def variance_components(per_cell: Mapping[tuple[int, int], float]) -> tuple[float, float]:
    """(between-seed SD, within-seed SD) of per-cell paired differences, by one-way random-effects ANOVA over
    training seeds (cells nested in seeds; the within part holds sampling-seed and image noise together)."""
    by_seed: dict[int, list[float]] = {}
    for (train_seed, _), value in per_cell.items():
        by_seed.setdefault(train_seed, []).append(value)
    groups = [np.asarray(v) for _, v in sorted(by_seed.items())]
    per_group = len(groups[0])
    within = float(np.mean([g.var(ddof=1) for g in groups])) if per_group > 1 else 0.0
    means = np.array([g.mean() for g in groups])
    between = max(float(means.var(ddof=1)) - within / per_group, 0.0) if len(groups) > 1 else 0.0
    return float(np.sqrt(between)), float(np.sqrt(within))


def simulate_coverage(
    between_seed_sd: float,
    within_seed_sd: float,
    seeds: int,
    sampling_seeds: int,
    studies: int = 2000,
    effect: float = 1.0,
    seed_effects: str = "normal",
    seed: int = 0,
) -> float:
    """Share of simulated studies whose 95% seed-level interval covers the true difference `effect`.

    Each study draws a paired difference per cell, effect + u_t + e_ts, with u_t the training seed's share
    (normal, or a centred log-normal with the same SD when `seed_effects="skewed"`) and e_ts the sampling-seed and
    image noise of the cell, and runs `seed_level_difference` on the per-seed means."""
    rng = np.random.default_rng(seed)
    if seed_effects == "normal":
        u = rng.normal(0.0, between_seed_sd, (studies, seeds))
    elif seed_effects == "skewed":
        raw = rng.lognormal(0.0, 1.0, (studies, seeds))
        u = (raw - np.exp(0.5)) / np.sqrt((np.e - 1) * np.e) * between_seed_sd
    else:
        raise ValueError(f"seed_effects is 'normal' or 'skewed', not {seed_effects!r}")
    cells = effect + u[:, :, None] + rng.normal(0.0, within_seed_sd, (studies, seeds, sampling_seeds))
    covered = 0
    for study in cells.mean(axis=2):
        interval = seed_level_difference(study)
        covered += interval.low <= effect <= interval.high
    return covered / studies
