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


def test_files_that_are_not_inception_weights_are_refused_naming_the_file(tmp_path, random_inception, capsys):
    from analysis.cli import main
    from analysis.quality.evaluate import Extractor

    (tmp_path / "notes.pth").write_text("not weights\n")
    torch.save({}, tmp_path / "empty.pth")
    partial = torch.load(random_inception, weights_only=True)
    partial.pop("fc.weight")
    partial["extra"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"notes.pth cannot be read as torch weights \(UnpicklingError"):
        AdmInception(tmp_path / "notes.pth", "cpu")
    with pytest.raises(ValueError, match=r"empty.pth holds no Inception-v3 weights: 0 of 566 expected tensors"):
        Extractor.inception(str(tmp_path / "empty.pth"))
    with pytest.raises(ValueError, match=r"holds 565 of 566 .*1 missing \(e.g. fc.weight\), 1 unexpected \(e.g. extra"):
        AdmInception(tmp_path / "partial.pth", "cpu")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    argv = ["evaluate", str(tmp_path / "s.npz"), "--adm", "--reference", "r.npz", "--inception-weights"]
    assert main([*argv, str(tmp_path / "empty.pth")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("attnmed evaluate: error: Inception weights ") and "\n" not in error
    assert "give the pt_inception-2015-12-05 weights torch-fidelity uses" in error


def test_adm_metrics_skip_precision_and_recall_below_four_images_and_refuse_foreign_statistics(
    tmp_path, random_inception, monkeypatch
):
    import analysis.quality.adm as adm

    monkeypatch.setattr(adm, "frechet_distance", lambda *stats: 0.0)  # scipy's sqrtm at 2048 takes 15 s on CPU
    rng = np.random.default_rng(4)
    inception = AdmInception(random_inception, "cpu")
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    reference = write_reference_batch(images, inception, tmp_path / "ref.npz")
    metrics = adm_metrics(images[:3], reference, inception)
    assert metrics["precision"] is None and metrics["recall"] is None and metrics["inception_score"] >= 1.0
    assert metrics["skipped"]["precision"].endswith("the samples have 3")
    np.savez(tmp_path / "digits.npz", arr_0=images, mu=np.zeros(128), sigma=np.eye(128))
    with pytest.raises(
        ValueError, match="digits.npz holds mu/sigma of 128 features; ADM's reference batches hold 2048"
    ):
        adm_metrics(images, tmp_path / "digits.npz", inception)
