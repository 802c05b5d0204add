"""Datasets: the embedded digits, ImageFolder trees with ADM preprocessing, VAE latents (offline, tiny VAE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mediator_models.data import (
    ImageFolderSource,
    cache_latents,
    center_crop_arr,
    digits,
    load_latent_cache,
    load_vae,
    open_source,
)


def test_digits_are_real_scaled_and_split_without_overlap():
    train, heldout, everything = digits("train"), digits("heldout"), digits("all")
    assert len(train) + len(heldout) == len(everything) == 1797
    assert train.images.shape[1:] == (1, 16, 16) and train.images.min() == -1 and train.images.max() == 1
    assert heldout.labels.bincount().min() >= 34  # stratified: about 20% of each class
    flat = lambda s: {tuple(row) for row in s.images.flatten(1).numpy().round(4)}  # noqa: E731
    assert not flat(train) & flat(heldout)
    torch.testing.assert_close(digits("heldout").images, heldout.images)  # the split is fixed


def test_digits_at_native_size_are_the_sklearn_pixels():
    from sklearn.datasets import load_digits

    native = digits("all", image_size=8)
    expected = torch.tensor(load_digits().images, dtype=torch.float32) / 8.0 - 1.0
    torch.testing.assert_close(native.images[:, 0], expected)


def make_folder(root, sizes=((40, 30), (20, 50)), classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_center_crop_follows_adm():
    image = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint8).reshape(60, 100, 3) % 255)
    cropped = center_crop_arr(image, 16)
    assert cropped.size == (16, 16)
    # 100×60: the short side is ≥ 2·16, so one box halving (50×30), then bicubic to 27×16 and a centre crop.
    big = center_crop_arr(Image.new("RGB", (300, 200)), 64)
    assert big.size == (64, 64)


def test_image_folder_reads_classes_crops_and_flips(tmp_path):
    source = ImageFolderSource(make_folder(tmp_path / "data"), image_size=16)
    assert (len(source), source.num_classes, source.classes) == (4, 2, ["cat", "dog"])
    images, labels = source.batch([0, 3])
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]
    assert images.min() >= -1 and images.max() <= 1
    flipped, _ = source.batch([0, 3], flip=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], images[0].flip(-1))
    torch.testing.assert_close(flipped[1], images[1])


def test_bad_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing", 16)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderSource(tmp_path / "flat", 16)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(tmp_path / "empty", 16)
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        ImageFolderSource(tmp_path / "broken", 16).batch([0])


def test_latent_cache_holds_each_image_and_its_mirror_and_resumes(tmp_path, tiny_vae_path):
    source = ImageFolderSource(make_folder(tmp_path / "data"), image_size=32)
    vae = load_vae(str(tiny_vae_path))
    out = cache_latents(source, vae, tmp_path / "latents", batch_size=3)
    cache = load_latent_cache(out)
    assert len(cache) == 4 and cache.image_shape == (4, 4, 4) and cache.num_classes == 2
    plain, labels = cache.batch([1, 2])
    mirrored, _ = cache.batch([1, 2], flip=torch.tensor([True, True]))
    assert labels.tolist() == [0, 1] and not torch.allclose(plain, mirrored)
    assert open_source(str(out), 32).description == cache.description
    # A finished cache is not recomputed.
    stamp = (out / "meta.json").stat().st_mtime_ns
    cache_latents(source, vae, out, batch_size=3)
    assert (out / "meta.json").stat().st_mtime_ns == stamp


def test_missing_vae_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        load_vae(str(tmp_path / "no-vae"))


def test_a_latent_cache_of_another_configuration_is_refused_never_mixed(tmp_path, tiny_vae_path):
    from mediator_models.storage.errors import ConfigurationMismatchError, SettingError

    folder = make_folder(tmp_path / "data")
    vae = load_vae(str(tiny_vae_path))
    out = cache_latents(ImageFolderSource(folder, 32), vae, tmp_path / "latents", batch_size=3)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigurationMismatchError, match="image_size: .*32.*64|image_size"):
        cache_latents(ImageFolderSource(folder, 64), vae, out, batch_size=3)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing added, nothing reported as done
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        cache_latents(ImageFolderSource(folder, 32), vae, tmp_path / "file")
    with pytest.raises(SettingError, match="not a multiple of 8"):
        cache_latents(ImageFolderSource(folder, 20), vae, tmp_path / "odd")
    assert not (tmp_path / "odd").exists()


def test_cache_latents_into_a_file_is_refused_before_the_vae_loads(tmp_path, capsys, monkeypatch):
    from analysis.cli import main
    from mediator_models import data

    monkeypatch.setattr(data, "load_vae", lambda *a, **k: pytest.fail("the VAE was loaded before the checks"))
    make_folder(tmp_path / "images")
    (tmp_path / "taken").write_text("x")
    args = ["cache-latents", "--data", str(tmp_path / "images"), "--vae", str(tmp_path / "no-vae")]
    assert main([*args, "--image-size", "32", "--out", str(tmp_path / "taken")]) == 2
    assert f"--out {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err
    assert main([*args, "--image-size", "30", "--out", str(tmp_path / "cache")]) == 2
    assert "--image-size 30 px is not a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


# ---- the native-resolution textures (patches of scikit-image's photographs) --------------------------------

needs_skimage = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("skimage") is None,
    reason="scikit-image==0.26.0 (requirements.txt) is not installed: rebuild the environment",
)


@needs_skimage
def test_textures_are_patches_of_eight_photographs_split_without_overlap():
    from mediator_models.data import TEXTURE_BLOCK, TEXTURE_PHOTOGRAPHS, texture_blocks, texture_photograph, textures

    train, heldout, everything = textures("train"), textures("heldout"), textures("all")
    assert train.images.shape == (4000, 1, 16, 16) and heldout.images.shape == (1000, 1, 16, 16)
    assert len(everything) == 5000 and train.num_classes == 8 == len(TEXTURE_PHOTOGRAPHS)
    assert train.labels.bincount().tolist() == [500] * 8 and heldout.labels.bincount().tolist() == [125] * 8
    assert train.images.min() >= -1 and train.images.max() <= 1
    torch.testing.assert_close(textures("heldout").images, heldout.images)  # the split is fixed
    for name in TEXTURE_PHOTOGRAPHS:  # the splits' blocks of every photograph are disjoint and both present
        shape = texture_photograph(name).shape
        kept, held = set(texture_blocks(*shape, "train")), set(texture_blocks(*shape, "heldout"))
        assert kept and held and not kept & held
        assert len(kept | held) == (shape[0] // TEXTURE_BLOCK) * (shape[1] // TEXTURE_BLOCK)
    native = lambda s: {row.tobytes() for row in s.images.flatten(1).numpy()}  # noqa: E731
    assert not native(textures("train", 32)) & native(textures("heldout", 32))


@needs_skimage
def test_textures_carry_detail_at_16px_that_the_upsampled_digits_lack():
    """The 16×16 digits are bilinear upsamplings of 8×8 images (their pixel matrix has rank below 64); the
    textures' training patches span every direction of the 256-pixel space, and of the 1024 at 32×32."""
    from mediator_models.data import textures

    def rank(source):
        return np.linalg.matrix_rank(source.images.flatten(1).double().numpy(), rtol=1e-6)

    ranks = {
        "digits 16px": rank(digits("all")),
        "textures 16px": rank(textures()),
        "textures 32px": rank(textures("train", 32)),
    }
    print(f"numerical rank (rtol 1e-6) of the pixel matrix: {ranks}")
    assert ranks["digits 16px"] <= 64
    assert ranks["textures 16px"] == 256 and ranks["textures 32px"] > 256


@needs_skimage
def test_textures_refuse_sizes_that_would_upsample_them():
    from mediator_models.data import textures
    from mediator_models.storage.errors import SettingError

    with pytest.raises(SettingError, match="32-px patches"):
        textures("train", 64)


@needs_skimage
def test_textures_refuse_a_photograph_other_than_the_pinned_one(tmp_path, monkeypatch):
    from mediator_models import data

    for file, _, _ in data.TEXTURE_PHOTOGRAPHS.values():
        (tmp_path / file).write_bytes((data.skimage_data_folder() / file).read_bytes())
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "grass.png")
    monkeypatch.setattr(data, "skimage_data_folder", lambda: tmp_path)
    with pytest.raises(ValueError, match="grass.png has sha256 .*install scikit-image==0.26.0"):
        data.textures()


@needs_skimage
def test_open_source_names_the_textures_and_keeps_the_digits():
    textures = open_source("textures", 16)
    assert textures.description == "textures[train] 16x16" and len(textures) == 4000
    assert open_source("digits", 16).description == "digits[train] 16x16"
