"""Metrics on features agree with torch-fidelity's; paired intervals cover what they should and decide honestly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.quality.scores import Reference, fid, kid, mmd2_unbiased, precision_indicators, recall
from analysis.quality.stats import CellMetrics, ConfidenceInterval, paired_bootstrap, verdict


def features(n, d=16, shift=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(shift, scale, (n, d))


def test_fid_equals_torch_fidelity_on_the_same_features():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    a, b = features(300, shift=0.3, seed=1), features(200, seed=2)
    theirs = fid_statistics_to_metric(
        fid_features_to_statistics(torch.from_numpy(a)), fid_features_to_statistics(torch.from_numpy(b)), verbose=False
    )
    assert fid(a, Reference.from_features(b)) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


def test_kid_mmd_equals_torch_fidelity_and_precision_recall_equal_its_knn_manifolds():
    from torch_fidelity.metric_kid import kernel_poly, mmd2
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    x, y = features(50, shift=0.2, seed=3), features(50, seed=4)
    kw = {"kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1}
    theirs = mmd2(kernel_poly(x, x, **kw), kernel_poly(x, y, **kw), kernel_poly(y, y, **kw))
    assert mmd2_unbiased(x, y) == pytest.approx(theirs, rel=1e-9)
    samples, ref = features(120, shift=0.5, seed=5), features(90, seed=6)
    precision, rec = calculate_precision_recall_full(torch.from_numpy(samples), torch.from_numpy(ref), 3, 10000)
    reference = Reference.from_features(ref)
    assert precision_indicators(samples, reference).mean() == pytest.approx(precision)
    assert recall(samples, reference) == pytest.approx(rec)


def test_kid_subsets_are_smaller_than_the_reference_and_report_a_spread():
    reference = Reference.from_features(features(60, seed=7))
    mean, std = kid(features(80, shift=0.4, seed=8), reference, subset_size=1000)
    assert std > 0  # subsets are capped below the set sizes, so they differ
    assert mean > 0


def cells_of(shift, seeds=((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)), n=120, base_seed=0):
    """Runs that share noise per cell: the same base draw, moved by `shift`."""
    return {cell: features(n, shift=0.0, seed=base_seed + 10 * cell[0] + cell[1]) + shift for cell in seeds}


def prepared(cells, reference):
    return {cell: CellMetrics(f, reference) for cell, f in cells.items()}


def test_a_real_difference_is_resolved_and_no_difference_is_not():
    reference = Reference.from_features(features(200, seed=99))
    near, far = prepared(cells_of(0.0), reference), prepared(cells_of(0.6), reference)
    worse = paired_bootstrap("fid", far, near, replicates=100)
    assert worse.low > 0 and verdict(worse, "fid") == "fails"
    better = paired_bootstrap("fid", near, far, replicates=100)
    assert better.high < 0 and verdict(better, "fid") == "holds"
    same = paired_bootstrap("fid", near, near, replicates=50)
    assert same.point == 0 and same.low == 0 and same.high == 0
    assert verdict(same, "fid") == "not reproduced here"
    assert verdict(same, "fid", claims_improvement=False) == "unresolved at this sample size"
    precision = paired_bootstrap("precision", near, far, replicates=100)
    assert precision.point > 0 and verdict(precision, "precision") == "holds"  # higher is better for precision


def test_pairing_cancels_the_noise_shared_by_both_runs():
    """Two runs that differ by a small shift but share their noise: the paired interval is narrower than the
    interval of either run's own FID, and resolves the shift."""
    reference = Reference.from_features(features(200, seed=99))
    a, b = prepared(cells_of(0.25), reference), prepared(cells_of(0.0), reference)
    paired = paired_bootstrap("fid", a, b, replicates=100)
    alone = paired_bootstrap("fid", a, None, replicates=100)
    assert paired.half_width < alone.half_width
    assert alone.low <= alone.point <= alone.high  # the bias-shifted interval holds its estimate
    assert paired.low > 0  # the shift is resolved thanks to the pairing


def test_unpaired_inputs_are_refused():
    reference = Reference.from_features(features(50, seed=1))
    a = prepared(cells_of(0.0, seeds=((0, 0), (1, 0))), reference)
    b = prepared(cells_of(0.0, seeds=((0, 0), (2, 0))), reference)
    with pytest.raises(ValueError, match="same cells"):
        paired_bootstrap("fid", a, b)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap("is", a, None)


def test_a_worse_point_estimate_is_never_called_a_tie():
    interval = ConfidenceInterval(point=0.4, low=-0.2, high=1.0, replicates=100)
    assert verdict(interval, "fid") == "not reproduced here"
    assert "tie" not in verdict(interval, "fid", claims_improvement=False)
