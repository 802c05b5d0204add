"""Evaluation: the offline digits extractor, FID/KID/PRC through torch-fidelity, every input form."""

from __future__ import annotations

import json

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


def test_a_sample_folder_resumed_with_fewer_samples_is_scored_by_its_samples_json(tmp_path):
    from helpers import tiny_model

    from mediator_models.sample import LoadedModel, sample_to_folder
    from mediator_models.sampling.generation import ProcessConfig, SamplerConfig

    loaded = LoadedModel(tiny_model("SiT-T/4", input_size=16, in_channels=1), ProcessConfig("SiT"), "tiny", "w")
    sampler = SamplerConfig(kind="ode", steps=2)
    folder = tmp_path / "samples"
    sample_to_folder(loaded, folder, num_samples=8, sampler=sampler, progress=False)
    sample_to_folder(loaded, folder, num_samples=4, sampler=sampler, progress=False)  # the resume
    assert len(list(folder.glob("*.png"))) == 8
    with np.load(folder / "samples.npz") as data:
        npz = data["arr_0"]
    assert len(npz) == 4
    np.testing.assert_array_equal(load_images(folder).images.permute(0, 2, 3, 1).numpy(), npz)
    (folder / "samples.npz").unlink()  # without the npz: the PNGs samples.json lists, not every PNG
    np.testing.assert_array_equal(load_images(folder).images.permute(0, 2, 3, 1).numpy(), npz)
    np.savez(folder / "samples.npz", arr_0=np.concatenate([npz, npz]))
    with pytest.raises(ValueError, match="samples.npz holds 8 images but samples.json says 4"):
        load_images(folder)
    (folder / "samples.json").unlink()
    with pytest.raises(ValueError, match="unfinished `attnmed sample` folder"):
        load_images(folder)


def test_too_few_images_for_precision_and_recall_skip_them_saying_why(tmp_path, capsys):
    from analysis.cli import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", arr_0=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    assert main(["evaluate", str(tmp_path / "three.npz")]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["precision"] is None and printed["recall"] is None and np.isfinite(printed["fid"])
    assert "at least 4 images in each set; the samples have 3" in printed["skipped"]["recall"]
    assert "precision and recall not scored: k-nearest-neighbour manifolds (k = 3)" in captured.err
    four = torch.from_numpy(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    scored = compute_metrics(four, four[:3], Extractor.digits(), kid=False)
    assert scored["skipped"]["precision"].endswith("the reference has 3")
    scored = compute_metrics(four, four, Extractor.digits(), kid=False)
    assert scored["skipped"] == {} and scored["precision"] == 1.0


def test_reference_statistics_of_another_feature_size_are_refused_saying_what_they_are(tmp_path, capsys):
    from analysis.cli import main

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((8, 16, 16, 3), np.uint8))
    images = np.zeros((5, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "adm.npz", mu=np.zeros(2048), sigma=np.eye(2048), arr_0=images)
    assert main(["evaluate", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "adm.npz")]) == 2
    error = capsys.readouterr().err
    assert "adm.npz holds precomputed statistics of 2048 features (mu (2048,), sigma (2048, 2048) and arr_0)" in error
    assert "makes 128; they are InceptionV3 pool_3 statistics" in error and "--extractor inception" in error
    np.savez(tmp_path / "flat.npz", mu=np.zeros((1, 128)), sigma=np.eye(128))
    with pytest.raises(ValueError, match=r"flat.npz: mu \(1, 128\) and sigma \(128, 128\) are not the statistics"):
        compute_metrics(tmp_path / "s.npz", tmp_path / "flat.npz", Extractor.digits())
    np.savez(tmp_path / "digits.npz", mu=np.zeros(128), sigma=np.eye(128))  # this extractor's size: used
    scored = compute_metrics(tmp_path / "s.npz", tmp_path / "digits.npz", Extractor.digits())
    assert np.isfinite(scored["fid"]) and set(scored["skipped"]) == {"kid", "precision", "recall"}
    assert "is statistics (mu, sigma), which give FID only" in scored["skipped"]["kid"]
