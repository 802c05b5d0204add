"""FID, KID, precision and recall of an image set through torch-fidelity, as one dict of numbers.

Every number states which feature extractor made it and from how many images. Samples and references can be
a folder of images, an `.npz` (`arr_0`, uint8 NHWC, as `attnmed sample` writes), an in-memory uint8 tensor,
a dataset split, or (reference only, FID only) an ADM reference batch `.npz` holding `mu` and `sigma` of the
extractor's feature size (2048 for Inception; the digits extractor's 128 cannot use ADM's). A metric the sets cannot
give is None, and "skipped" names it and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.quality.features import (
    DIGITS_EXTRACTOR,
    FEATURE_NAME,
    INCEPTION_WEIGHTS_FILE,
    TEXTURES_EXTRACTOR,
    DigitsExtractor,
    TexturesExtractor,
    check_inception_weights,
    register_digits_extractor,
    register_textures_extractor,
)
from analysis.quality.images import load_images
from analysis.quality.scores import precision_recall_shortfall, statistics_size

INCEPTION_FEATURES = 2048  # torch-fidelity's InceptionV3 pool_3: the features FID (and ADM's mu/sigma) use


@dataclass
class Extractor:
    """Which features the metrics use, and what to report about them."""

    name: str  # torch-fidelity's registry name
    weights_path: str | None
    label: str
    accuracy: float | None = None
    feature_size: int | None = None  # features per image, which precomputed reference statistics must match

    @classmethod
    def digits(cls, image_size: int = 16) -> "Extractor":
        """The pinned digits classifier (its sha256 is checked at load and named in the label)."""
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(
                f"--image-size must be at least 8 (the digits are 8×8; the study uses 16), got {image_size!r}"
            )
        register_digits_extractor()
        pinned = DigitsExtractor.pinned(image_size)
        return cls(DIGITS_EXTRACTOR, str(pinned.path), pinned.label, pinned.accuracy, pinned.net.head.in_features)

    @classmethod
    def textures(cls, image_size: int = 16) -> "Extractor":
        """The pinned textures classifier (mediator_models.data.textures; its sha256 checked at load)."""
        register_textures_extractor()
        pinned = TexturesExtractor.pinned(image_size)
        return cls(TEXTURES_EXTRACTOR, str(pinned.path), pinned.label, pinned.accuracy, pinned.net.head.in_features)

    @property
    def is_pinned_cnn(self) -> bool:
        """One of attnmed's pinned CNNs, whose FID features are FEATURE_NAME (Inception's are its 2048)."""
        return self.name in (DIGITS_EXTRACTOR, TEXTURES_EXTRACTOR)

    @classmethod
    def inception(cls, weights_path: str | None = None) -> "Extractor":
        """torch-fidelity's InceptionV3; `weights_path` to its .pth, else torch-fidelity's cache must hold it."""
        if weights_path is None:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
            if not cached.exists():
                raise FileNotFoundError(
                    "torch-fidelity's Inception weights are not in its cache and cannot be downloaded here; pass "
                    f"the local path to {INCEPTION_WEIGHTS_FILE}, or use the digits extractor"
                )
            weights_path = str(cached)
        check_inception_weights(weights_path)
        return cls("inception-v3-compat", weights_path, "inception-v3 (torch-fidelity)", None, INCEPTION_FEATURES)


def kid_subset_size(num_samples: int, num_reference: int) -> int:
    """torch-fidelity's 1000, but at most half the smaller set: a subset as large as a whole set makes every
    subset the same and the KID std meaningless (the digits' reference has 359 images)."""
    return max(2, min(1000, min(num_samples, num_reference) // 2))


def compute_metrics(
    samples, reference, extractor: Extractor, *, kid: bool = True, prc: bool = True, batch_size: int = 64
) -> dict[str, Any]:
    """FID (and KID, precision, recall) of `samples` against `reference` with `extractor`'s features. A metric
    that the sets cannot give is None, and "skipped" says why: precision and recall on sets smaller than their
    k + 1 images, and everything but FID against a reference of precomputed statistics."""
    import torch_fidelity

    sample_set = load_images(samples)
    if isinstance(reference, (str, Path)) and Path(reference).suffix == ".npz":
        statistics = _reference_statistics(Path(reference), extractor)
        if statistics is not None:
            reason = (
                f"the reference {reference} is statistics (mu, sigma), which give FID only; give reference images "
                "for KID, precision and recall"
            )
            skipped = {
                metric: reason for metric, wanted in (("kid", kid), ("precision", prc), ("recall", prc)) if wanted
            }
            return _fid_against_statistics(sample_set, *statistics, extractor, batch_size) | {"skipped": skipped}
    reference_set = load_images(reference)
    skipped = {}
    shortfall = precision_recall_shortfall(len(sample_set), len(reference_set)) if prc else None
    if shortfall is not None:
        prc = False
        skipped = {"precision": shortfall, "recall": shortfall}
    feature = FEATURE_NAME if extractor.is_pinned_cnn else None
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
        "skipped": skipped,
    }


def _reference_statistics(path: Path, extractor: Extractor) -> tuple[np.ndarray, np.ndarray] | None:
    """The `mu`/`sigma` a reference .npz holds (an ADM reference batch, say), once they are known to describe
    features of `extractor`'s size; None when it holds none (or cannot be read: `load_images` then says why)."""
    try:
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                return None
            mu, sigma, names = data["mu"], data["sigma"], list(data.files)
    except Exception:
        return None
    size = statistics_size(mu, sigma, str(path))
    if extractor.feature_size is not None and size != extractor.feature_size:
        others = [name for name in names if name not in ("mu", "sigma")]
        held = f"mu {mu.shape}, sigma {sigma.shape}" + (f" and {', '.join(others)}" if others else "")
        fix = (
            "they are InceptionV3 pool_3 statistics, as ADM's reference batches hold: evaluate with --extractor "
            "inception --inception-weights FILE, or --adm (ADM's five metrics, with its arr_0 images)"
            if size == INCEPTION_FEATURES
            else "give statistics made with this extractor, or reference images"
        )
        raise ValueError(
            f"{path} holds precomputed statistics of {size} features ({held}), but the extractor "
            f"{extractor.label} makes {extractor.feature_size}; {fix}"
        )
    return mu, sigma


def _fid_against_statistics(sample_set, mu, sigma, extractor: Extractor, batch_size: int) -> dict[str, Any]:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    layer = FEATURE_NAME if extractor.is_pinned_cnn else "2048"
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
