"""FID, KID, precision and recall through torch-fidelity, and the results table.

Every number states which feature extractor made it and from how many images. Samples and references can be
a folder of images, an `.npz` (`arr_0`, uint8 NHWC, as `attnmed sample` writes), an in-memory uint8 tensor,
a dataset split, or (reference only, FID only) an ADM reference batch `.npz` holding `mu` and `sigma`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features import DIGITS_EXTRACTOR, FEATURE_NAME, DigitsExtractor, _register_digits_extractor

class ImageSet(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) for torch-fidelity."""

    def __init__(self, images: torch.Tensor, origin: str = "the images"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{origin}: expected uint8 images (N, C, H, W) or (N, H, W, C), got {images.dtype} "
                             f"{tuple(images.shape)}")  # fmt: skip
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW
        if images.shape[1] not in (1, 3):
            raise ValueError(f"{origin}: images have {min(images.shape[1], images.shape[-1])} channels; the metrics take "
                             "grey or RGB (drop the alpha channel of RGBA images first)")  # fmt: skip
        if len(images) < 2:
            raise ValueError(f"{origin}: {len(images)} image(s); FID needs at least 2 (a covariance), and a "
                             "meaningful one hundreds")  # fmt: skip
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        self.images = images.contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def load_images(source) -> ImageSet:
    """An ImageSet from a folder, an npz (`arr_0`), a uint8 tensor, or a TensorSource in [−1, 1]."""
    if isinstance(source, ImageSet):
        return source
    if hasattr(source, "images") and hasattr(source, "labels"):  # a dataset split in model units
        return ImageSet(((source.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    if isinstance(source, torch.Tensor):
        return ImageSet(source)
    path = Path(source)
    if path.suffix == ".npz":
        return ImageSet(torch.from_numpy(_read_npz_images(path)), str(path))
    if path.is_dir():
        return ImageSet(torch.from_numpy(_read_image_folder(path)), str(path))
    raise FileNotFoundError(f"{path} is neither an image folder nor an .npz")


def _read_npz_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} has no 'arr_0' images (an ADM reference with mu/sigma works for FID only)")
            return data["arr_0"]
    except ValueError:
        raise
    except Exception as error:  # zipfile / pickle errors of a truncated or damaged file
        raise ValueError(f"{path} cannot be read as an .npz ({type(error).__name__}: {error}); is it complete?") from None


def _read_image_folder(path: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no images (.png, .jpg) in {path}")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except Exception as error:
            raise ValueError(f"{file} is not a readable image ({error}); remove or replace it") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(f"{file} is {arrays[-1].shape[1]}×{arrays[-1].shape[0]} but {files[0].name} is "
                             f"{arrays[0].shape[1]}×{arrays[0].shape[0]}; all images of a set must share one size")  # fmt: skip
    return np.stack(arrays)


@dataclass
class Extractor:
    """Which features the metrics use, and what to report about them."""

    name: str  # torch-fidelity's registry name
    weights_path: str | None
    label: str
    accuracy: float | None = None

    @classmethod
    def digits(cls, image_size: int = 16) -> "Extractor":
        """The pinned digits classifier (its sha256 is checked at load and named in the label)."""
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"--image-size must be at least 8 (the digits are 8×8; the study uses 16), got {image_size!r}")
        _register_digits_extractor()
        pinned = DigitsExtractor.pinned(image_size)
        return cls(DIGITS_EXTRACTOR, str(pinned.path), pinned.label, pinned.accuracy)

    @classmethod
    def inception(cls, weights_path: str | None = None) -> "Extractor":
        """torch-fidelity's InceptionV3; `weights_path` to its .pth, else torch-fidelity's cache must hold it."""
        if weights_path is not None and not Path(weights_path).exists():
            raise FileNotFoundError(f"Inception weights {weights_path} not found")
        if weights_path is None:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
            if not cached.exists():
                raise FileNotFoundError(
                    "torch-fidelity's Inception weights are not in its cache and cannot be downloaded here; pass "
                    "the local path to weights-inception-2015-12-05-6726825d.pth, or use the digits extractor")
            weights_path = str(cached)
        return cls("inception-v3-compat", weights_path, "inception-v3 (torch-fidelity)")


def kid_subset_size(num_samples: int, num_reference: int) -> int:
    """torch-fidelity's 1000, but at most half the smaller set: a subset as large as a whole set makes every
    subset the same and the KID std meaningless (the digits' reference has 359 images)."""
    return max(2, min(1000, min(num_samples, num_reference) // 2))


def compute_metrics(samples, reference, extractor: Extractor, *, kid: bool = True, prc: bool = True,
                    batch_size: int = 64) -> dict[str, Any]:
    """FID (and KID, precision, recall) of `samples` against `reference` with `extractor`'s features."""
    import torch_fidelity

    sample_set = load_images(samples)
    if isinstance(reference, (str, Path)) and Path(reference).suffix == ".npz":
        with np.load(reference) as data:
            if "mu" in data and "sigma" in data:
                return _fid_against_statistics(sample_set, data["mu"], data["sigma"], extractor, batch_size)
    reference_set = load_images(reference)
    feature = FEATURE_NAME if extractor.name == DIGITS_EXTRACTOR else None
    layers = {f"feature_layer_{m}": feature for m in ("fid", "kid", "prc")} if feature else {}
    metrics = torch_fidelity.calculate_metrics(
        input1=sample_set, input2=reference_set, cuda=torch.cuda.is_available(), batch_size=batch_size,
        fid=True, kid=kid, prc=prc, feature_extractor=extractor.name,
        feature_extractor_weights_path=extractor.weights_path, verbose=False,
        kid_subset_size=kid_subset_size(len(sample_set), len(reference_set)), save_cpu_ram=True, **layers,
    )  # fmt: skip
    return {
        "fid": metrics["frechet_inception_distance"],
        "kid": metrics.get("kernel_inception_distance_mean"),
        "kid_std": metrics.get("kernel_inception_distance_std"),
        "precision": metrics.get("precision"),
        "recall": metrics.get("recall"),
        "extractor": extractor.label,
        "extractor_accuracy": extractor.accuracy,
        "num_samples": len(sample_set),
        "num_reference": len(reference_set),
    }


def _fid_against_statistics(sample_set, mu, sigma, extractor: Extractor, batch_size: int) -> dict[str, Any]:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    layer = FEATURE_NAME if extractor.name == DIGITS_EXTRACTOR else "2048"
    fe = create_feature_extractor(extractor.name, [layer], cuda=torch.cuda.is_available(),
                                  feature_extractor_weights_path=extractor.weights_path, verbose=False)  # fmt: skip
    features = get_featuresdict_from_dataset(sample_set, fe, batch_size=batch_size, cuda=torch.cuda.is_available(),
                                             save_cpu_ram=True, verbose=False)[layer]  # fmt: skip
    stats = {k: np.asarray(v, dtype=np.float64) for k, v in fid_features_to_statistics(features).items()}
    reference = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    fid = fid_statistics_to_metric(stats, reference, verbose=False)["frechet_inception_distance"]
    return {"fid": fid, "kid": None, "kid_std": None, "precision": None, "recall": None, "extractor": extractor.label,
            "extractor_accuracy": extractor.accuracy, "num_samples": len(sample_set), "num_reference": None}  # fmt: skip
