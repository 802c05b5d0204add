"""Evaluation: the offline digits extractor, FID/KID/PRC through torch-fidelity, every input form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.evaluate import Extractor, compute_metrics, load_images
from mediator_models.data import digits


@pytest.fixture(scope="module")
def extractor():
    return Extractor.digits()


def test_digits_extractor_is_accurate_and_says_so(extractor):
    assert extractor.accuracy >= 0.95
    assert f"{extractor.accuracy:.1%}" in extractor.label


def test_real_digits_score_far_better_than_noise(extractor):
    heldout = digits("heldout")
    real = compute_metrics(digits("train"), heldout, extractor)
    noise = compute_metrics(torch.randint(0, 256, (200, 16, 16, 3), dtype=torch.uint8), heldout, extractor)
    assert real["fid"] < 0.05 * noise["fid"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and noise["precision"] < 0.05
    assert real["num_samples"] == 1438 and real["num_reference"] == 359
    assert real["extractor"] == extractor.label


def test_folder_npz_and_tensor_inputs_agree(tmp_path, extractor):
    images = load_images(digits("heldout")).images[:120]  # (N, 3, H, W) uint8
    nhwc = images.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "s.npz", arr_0=nhwc)
    (tmp_path / "folder").mkdir()
    for i, image in enumerate(nhwc):
        Image.fromarray(image).save(tmp_path / "folder" / f"{i:04d}.png")
    reference = digits("train")
    values = [compute_metrics(source, reference, extractor, kid=False, prc=False)["fid"]
              for source in (tmp_path / "s.npz", tmp_path / "folder", torch.from_numpy(nhwc))]  # fmt: skip
    assert values[0] == pytest.approx(values[1]) == pytest.approx(values[2])


def test_reference_statistics_npz_gives_the_same_fid(tmp_path, extractor):
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    reference = load_images(digits("heldout"))
    fe = create_feature_extractor(extractor.name, ["features"], cuda=False, feature_extractor_weights_path=extractor.weights_path)
    features = get_featuresdict_from_dataset(reference, fe, 64, False, True, False)["features"].double().numpy()
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    samples = digits("train")
    direct = compute_metrics(samples, reference, extractor, kid=False, prc=False)["fid"]
    via_stats = compute_metrics(samples, tmp_path / "ref.npz", extractor)["fid"]
    assert via_stats == pytest.approx(direct, rel=1e-4)


def test_missing_inception_weights_and_bad_inputs_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Extractor.inception(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path)
    np.savez(tmp_path / "x.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        load_images(tmp_path / "x.npz")
