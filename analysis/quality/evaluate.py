"""FID, KID, precision and recall of an image set through torch-fidelity, as one dict of numbers.

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

from analysis.quality.features import DIGITS_EXTRACTOR, FEATURE_NAME, DigitsExtractor, register_digits_extractor
from analysis.quality.images import load_images


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
            raise ValueError(
                f"--image-size must be at least 8 (the digits are 8×8; the study uses 16), got {image_size!r}"
            )
        register_digits_extractor()
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
                    "the local path to weights-inception-2015-12-05-6726825d.pth, or use the digits extractor"
                )
            weights_path = str(cached)
        return cls("inception-v3-compat", weights_path, "inception-v3 (torch-fidelity)")


def kid_subset_size(num_samples: int, num_reference: int) -> int:
    """torch-fidelity's 1000, but at most half the smaller set: a subset as large as a whole set makes every
    subset the same and the KID std meaningless (the digits' reference has 359 images)."""
    return max(2, min(1000, min(num_samples, num_reference) // 2))


def compute_metrics(
    samples, reference, extractor: Extractor, *, kid: bool = True, prc: bool = True, batch_size: int = 64
) -> dict[str, Any]:
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
        input1=sample_set,
        input2=reference_set,
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        fid=True,
        kid=kid,
        prc=prc,
        feature_extractor=extractor.name,
        feature_extractor_weights_path=extractor.weights_path,
        verbose=False,
        kid_subset_size=kid_subset_size(len(sample_set), len(reference_set)),
        save_cpu_ram=True,
        **layers,
    )
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
    fe = create_feature_extractor(
        extractor.name,
        [layer],
        cuda=torch.cuda.is_available(),
        feature_extractor_weights_path=extractor.weights_path,
        verbose=False,
    )
    features = get_featuresdict_from_dataset(
        sample_set, fe, batch_size=batch_size, cuda=torch.cuda.is_available(), save_cpu_ram=True, verbose=False
    )[layer]
    stats = {k: np.asarray(v, dtype=np.float64) for k, v in fid_features_to_statistics(features).items()}
    reference = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    fid = fid_statistics_to_metric(stats, reference, verbose=False)["frechet_inception_distance"]
    return {
        "fid": fid,
        "kid": None,
        "kid_std": None,
        "precision": None,
        "recall": None,
        "extractor": extractor.label,
        "extractor_accuracy": extractor.accuracy,
        "num_samples": len(sample_set),
        "num_reference": None,
    }
