"""The pinned digits extractor: the shipped weights, checked by hash; features that are not degenerate; and an FID
that rises with every kind of damage to real digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.quality import features as features_module
from analysis.quality.features import PINNED_DIGITS_SHA256, DigitsExtractor
from analysis.quality.scores import Reference, fid
from mediator_models.data import digits


@pytest.fixture(scope="module")
def extractor():
    return DigitsExtractor.pinned()


@pytest.fixture(scope="module")
def reference(extractor):
    return Reference.from_features(extractor.features_of(digits("heldout")))


def test_the_shipped_classifier_is_as_accurate_on_held_out_digits_as_it_claims(extractor):
    """The accuracy stored beside the pinned weights (and quoted in every report) is what they really score."""
    heldout = digits("heldout")
    with torch.no_grad():
        measured = (extractor.net(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    assert measured == pytest.approx(extractor.accuracy, abs=1e-6) and measured >= 0.95
    assert PINNED_DIGITS_SHA256[:12] in extractor.label


def test_weights_that_are_not_the_pinned_ones_are_refused(tmp_path, monkeypatch):
    altered = tmp_path / "digits.pt"
    altered.write_bytes(features_module.PINNED_DIGITS_WEIGHTS.read_bytes() + b"\0")
    monkeypatch.setattr(features_module, "PINNED_DIGITS_WEIGHTS", altered)
    with pytest.raises(ValueError, match="not the pinned .*restore the file from git"):
        DigitsExtractor.pinned()


def test_features_are_not_degenerate(extractor):
    held = extractor.features_of(digits("heldout"))
    assert held.shape == (359, 128)
    assert (held.std(0) > 1e-3).all()  # no dead feature
    assert np.linalg.matrix_rank(np.cov(held, rowvar=False)) == 128


def damaged(images: torch.Tensor, kind: str, level: float) -> torch.Tensor:
    """Digits in [−1, 1] damaged by blur (σ px), pixel noise (std) or nothing."""
    if level == 0:
        return images
    if kind == "blur":
        radius = 3
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * level**2))
        kernel = kernel / kernel.sum()
        out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    generator = torch.Generator().manual_seed(0)
    return (images + level * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


@pytest.mark.parametrize("kind,levels", [("blur", (0, 0.6, 1.0, 1.6)), ("noise", (0, 0.1, 0.25, 0.5))])
def test_fid_rises_monotonically_with_blur_and_noise(extractor, reference, kind, levels):
    train = digits("train")
    scores = []
    for level in levels:
        images = ((damaged(train.images, kind, level) + 1) * 127.5).round().to(torch.uint8)
        scores.append(fid(extractor.features_of(images), reference))
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def test_fid_rises_monotonically_as_classes_are_dropped(extractor, reference):
    train = digits("train")
    scores = []
    for dropped in (0, 2, 4, 6):
        keep = train.labels >= dropped  # drop digits 0 .. dropped−1
        images = ((train.images[keep] + 1) * 127.5).round().to(torch.uint8)
        scores.append(fid(extractor.features_of(images), reference))
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


# ---- the pinned textures extractor (native-resolution data; needs scikit-image, requirements.txt) ----------

needs_skimage = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("skimage") is None,
    reason="scikit-image==0.26.0 (requirements.txt) is not installed: rebuild the environment",
)


@pytest.fixture(scope="module")
def textures_extractor():
    from analysis.quality.features import TexturesExtractor

    return TexturesExtractor.pinned()


@pytest.fixture(scope="module")
def textures_reference(textures_extractor):
    from mediator_models.data import textures

    return Reference.from_features(textures_extractor.features_of(textures("heldout")))


@needs_skimage
def test_the_shipped_textures_classifier_is_as_accurate_on_held_out_patches_as_it_claims(textures_extractor):
    from analysis.quality.features import MIN_TEXTURES_ACCURACY, PINNED_TEXTURES_SHA256
    from mediator_models.data import textures

    heldout = textures("heldout")
    with torch.no_grad():
        measured = (textures_extractor.net(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    assert measured == pytest.approx(textures_extractor.accuracy, abs=1e-6) and measured >= MIN_TEXTURES_ACCURACY
    assert PINNED_TEXTURES_SHA256[:12] in textures_extractor.label
    assert features_module.PINNED_TEXTURES_WEIGHTS.stat().st_size < 1_000_000


def test_textures_weights_that_are_not_the_pinned_ones_are_refused(tmp_path, monkeypatch):
    from analysis.quality.features import TexturesExtractor

    altered = tmp_path / "textures.pt"
    altered.write_bytes(features_module.PINNED_TEXTURES_WEIGHTS.read_bytes() + b"\0")
    monkeypatch.setattr(features_module, "PINNED_TEXTURES_WEIGHTS", altered)
    with pytest.raises(ValueError, match="not the pinned .*restore the file from git"):
        TexturesExtractor.pinned()


@needs_skimage
def test_torch_fidelity_scores_the_textures_with_the_pinned_features(textures_extractor, textures_reference):
    import torch_fidelity

    from analysis.quality.features import FEATURE_NAME, TEXTURES_EXTRACTOR, register_textures_extractor
    from analysis.quality.images import load_images
    from mediator_models.data import textures

    register_textures_extractor()
    train = textures("train")
    metrics = torch_fidelity.calculate_metrics(
        input1=load_images(train),
        input2=load_images(textures("heldout")),
        fid=True,
        feature_extractor=TEXTURES_EXTRACTOR,
        feature_extractor_weights_path=str(textures_extractor.path),
        feature_layer_fid=FEATURE_NAME,
        verbose=False,
        cuda=False,
    )
    ours = fid(textures_extractor.features_of(train), textures_reference)
    assert metrics["frechet_inception_distance"] == pytest.approx(ours, rel=1e-3)


@needs_skimage
@pytest.mark.parametrize("kind,levels", [("blur", (0, 0.6, 1.0, 1.6)), ("noise", (0, 0.1, 0.25, 0.5))])
def test_textures_fid_rises_monotonically_with_blur_and_noise(textures_extractor, textures_reference, kind, levels):
    from mediator_models.data import textures

    train = textures("train")
    scores = []
    for level in levels:
        images = ((damaged(train.images, kind, level) + 1) * 127.5).round().to(torch.uint8)
        scores.append(fid(textures_extractor.features_of(images), textures_reference))
    print(f"textures FID under {kind} {levels}: {[round(s, 2) for s in scores]}")
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


@needs_skimage
def test_textures_fid_rises_monotonically_as_classes_are_dropped(textures_extractor, textures_reference):
    from mediator_models.data import textures

    train = textures("train")
    scores = []
    for dropped in (0, 2, 4, 6):
        keep = train.labels >= dropped  # drop photographs 0 .. dropped−1
        images = ((train.images[keep] + 1) * 127.5).round().to(torch.uint8)
        scores.append(fid(textures_extractor.features_of(images), textures_reference))
    print(f"textures FID with 0, 2, 4, 6 photographs dropped: {[round(s, 2) for s in scores]}")
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


@needs_skimage
def test_evaluate_scores_textures_with_their_own_pinned_features(tmp_path, capsys):
    """`attnmed evaluate --extractor textures --reference textures-heldout`: real training patches score a small
    FID against the held-out ones, through the pinned textures CNN (named in the output)."""
    import json

    from analysis.cli import main
    from mediator_models.data import textures
    from mediator_models.sample import to_uint8

    images, _ = textures("train").batch(list(range(0, 4000, 8)))  # 500 patches of every photograph
    np.savez(tmp_path / "real.npz", arr_0=to_uint8(images))
    assert (
        main(["evaluate", str(tmp_path / "real.npz"), "--extractor", "textures", "--reference", "textures-heldout"])
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    assert "textures-cnn sha256 66a8b0c5444f" in json.dumps(metrics) and 0 < metrics["fid"] < 40
