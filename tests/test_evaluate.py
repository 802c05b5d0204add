"""Evaluation: the offline digits extractor, FID/KID/PRC through torch-fidelity, every input form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.quality.evaluate import Extractor, compute_metrics
from analysis.quality.images import load_images
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
    values = [
        compute_metrics(source, reference, extractor, kid=False, prc=False)["fid"]
        for source in (tmp_path / "s.npz", tmp_path / "folder", torch.from_numpy(nhwc))
    ]
    assert values[0] == pytest.approx(values[1]) == pytest.approx(values[2])


def test_reference_statistics_npz_gives_the_same_fid(tmp_path, extractor):
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    reference = load_images(digits("heldout"))
    fe = create_feature_extractor(
        extractor.name, ["features"], cuda=False, feature_extractor_weights_path=extractor.weights_path
    )
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


def test_damaged_or_inconsistent_image_sets_name_the_file(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i:06d}.png")
    (folder / "000003.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="000003.png is not a readable image"):
        load_images(folder)
    (folder / "000003.png").unlink()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "000003.png")
    with pytest.raises(ValueError, match="000003.png is 32×32 but 000000.png is 16×16"):
        load_images(folder)
    images = np.zeros((4, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "good.npz", arr_0=images)
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz cannot be read as an .npz"):
        load_images(tmp_path / "cut.npz")
    np.savez(tmp_path / "rgba.npz", arr_0=np.zeros((4, 16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="rgba.npz: images have 4 channels"):
        load_images(tmp_path / "rgba.npz")
    np.savez(tmp_path / "one.npz", arr_0=images[:1])
    with pytest.raises(ValueError, match="one.npz: 1 image.*at least 2"):
        load_images(tmp_path / "one.npz")


def test_evaluate_command_refuses_a_zero_image_size(tmp_path, capsys):
    from analysis.cli import main

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    assert main(["evaluate", str(tmp_path / "s.npz"), "--image-size", "0"]) == 2
    assert "--image-size must be at least 8" in capsys.readouterr().err
