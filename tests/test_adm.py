"""The ADM evaluator's metrics: formulas equal to an independent implementation (torch-fidelity's) on random
features, and the whole path (Inception activations, reference batch, five metrics, CLI) on a randomly
initialised Inception, since the real weights cannot be downloaded here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis.quality.adm import (
    AdmInception,
    adm_metrics,
    frechet_distance,
    inception_score,
    precision_recall,
    statistics,
    write_reference_batch,
)


def test_fid_and_inception_score_equal_torch_fidelity():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 1.0, (400, 24)), rng.normal(0.0, 1.2, (300, 24))
    theirs = fid_statistics_to_metric(
        fid_features_to_statistics(torch.from_numpy(a)), fid_features_to_statistics(torch.from_numpy(b)), verbose=False
    )
    ours = frechet_distance(*statistics(a), *statistics(b))
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    logits = rng.normal(0, 3, (10000, 50))
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=2, shuffle=False)  # ADM: 2 splits of 5000
    assert inception_score(logits) == pytest.approx(theirs["inception_score_mean"], rel=1e-6)


def test_precision_and_recall_equal_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(1)
    reference, samples = rng.normal(0, 1, (150, 16)), rng.normal(0.4, 1.1, (120, 16))
    theirs = calculate_precision_recall_full(torch.from_numpy(samples), torch.from_numpy(reference), 3, 10000)
    assert precision_recall(reference, samples) == pytest.approx(theirs, rel=1e-6)


def test_activations_are_adms_pool_spatial_and_unbiased_logits(random_inception):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    activations = AdmInception(random_inception, "cpu").activations(images, batch_size=1)
    assert activations.pool.shape == (2, 2048) and activations.spatial.shape == (2, 17 * 17 * 7)
    assert activations.logits.shape == (2, 1008)
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "768"], feature_extractor_weights_path=str(random_inception)
    ).eval()
    with torch.no_grad():
        pool, _ = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(activations.pool, pool.double().numpy(), rtol=1e-5, atol=1e-6)


def test_the_five_metrics_against_a_reference_batch_end_to_end(tmp_path, random_inception, capsys):
    from analysis.cli import main

    rng = np.random.default_rng(3)
    inception = AdmInception(random_inception, "cpu")
    reference = write_reference_batch(
        rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), inception, tmp_path / "ref.npz"
    )
    samples = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    metrics = adm_metrics(samples, reference, inception)
    assert set(metrics) >= {"fid", "sfid", "inception_score", "precision", "recall"}
    assert all(np.isfinite(metrics[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall"))
    assert metrics["num_reference"] == 8 and metrics["inception_score"] >= 1.0
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "samples.npz"),
                "--reference",
                str(reference),
                "--adm",
                "--inception-weights",
                str(random_inception),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["sfid"] == pytest.approx(metrics["sfid"], rel=1e-9)
