"""The ADM evaluator's five metrics (guided-diffusion `evaluations/evaluator.py`, the one behind the DiT, SiT and
mediator papers' tables) computed in PyTorch with torch-fidelity's InceptionV3, against an ADM reference batch.

Conventions, each as ADM's evaluator has them:
- Images: uint8 NHWC in `arr_0`, resized to 299×299 inside the network with TensorFlow 1.x's bilinear resize
  (torch-fidelity reproduces the TF graph's resize and input scaling bit for bit).
- FID: the 2048 `pool_3` features; mean and covariance (ddof 1) against the reference batch's `mu`/`sigma`;
  Fréchet distance with `scipy.linalg.sqrtm` (ε = 1e-6 on the diagonals if the product is singular).
- sFID: TF's `mixed_6/conv` feature map, the ReLU output of the 1×1 branch of the seventh mixed block. The TF
  graph numbers its mixed blocks mixed, mixed_1 … mixed_10; torchvision names them Mixed_5b … Mixed_7c, so
  mixed_6 is `Mixed_6d` and its `conv` is `branch1x1` (192 channels at 17×17). ADM keeps the first 7 channels and
  flattens them in NHWC order: 17·17·7 = 2023 values per image, against `mu_s`/`sigma_s`.
- Inception Score: softmax of the logits without bias (`softmax/logits/MatMul`, torch-fidelity's
  `logits_unbiased`), over consecutive splits of 5000 images (ADM's split size; 10 splits for 50K), the mean of
  exp(mean KL(p(y|x) ‖ p(y))).
- Precision / recall: k-NN manifolds with k = 3 on the pool features against the reference batch's images
  (10,000 in ADM's ImageNet batches): precision is the share of samples inside the reference manifold, recall the
  share of reference images inside the samples'. ADM compares squared distances computed in float16 where they
  are finite; here they are computed in float64 (float16 rounding can move points near a radius).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.quality.features import check_inception_weights
from analysis.quality.scores import (
    NEIGHBOURHOOD,
    inside_manifold,
    knn_radii,
    precision_recall_shortfall,
    statistics_size,
)
from mediator_models.storage.runfolder import atomic_write

SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]
FEATURE_SIZES = {"pool": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS}  # what mu/sigma and mu_s/sigma_s describe
INCEPTION_SCORE_SPLIT = 5000  # ADM: compute_inception_score(split_size=5000)


@dataclass
class Activations:
    """What ADM's evaluator reads off each image: pool (N, 2048), spatial (N, 2023), logits (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray


class AdmInception:
    """torch-fidelity's InceptionV3 (the TF FID network ported bit for bit) with a hook that also returns
    `mixed_6/conv` (see the module docstring). The weights file must be local; nothing is downloaded."""

    def __init__(self, weights_path: str | Path, device: torch.device | str | None = None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = check_inception_weights(weights_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = (
            FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
            .to(self.device)
            .eval()
        )
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        # (B, 192, 17, 17) -> first 7 channels, NHWC order, flattened: ADM's spatial[..., :7].reshape(B, -1)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @torch.no_grad()
    def activations(self, images: np.ndarray, batch_size: int = 64) -> Activations:
        """Activations of uint8 images (N, H, W, 3)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
        pool, spatial, logits = [], [], []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).to(self.device)
            features, unbiased = self.net(batch)
            pool.append(features.double().cpu().numpy())
            spatial.append(self._spatial.double().cpu().numpy())
            logits.append(unbiased.double().cpu().numpy())
        return Activations(np.concatenate(pool), np.concatenate(spatial), np.concatenate(logits))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """ADM's (and TTUR's) Fréchet distance between two Gaussians, with scipy's matrix square root."""
    from scipy import linalg

    diff = np.atleast_1d(mu1) - np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"singular product in the Fréchet distance; adding {eps} to the covariance diagonals", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the Fréchet distance has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def inception_score(logits: np.ndarray, split_size: int = INCEPTION_SCORE_SPLIT) -> float:
    """Mean over consecutive splits of `split_size` images of exp(E_x KL(p(y|x) ‖ p(y)))."""
    logits = np.asarray(logits, dtype=np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(0, keepdims=True))
        scores.append(np.exp((p * (part - log_marginal)).sum(1).mean()))
    return float(np.mean(scores))


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURHOOD) -> tuple[float, float]:
    """ADM's ManifoldEstimator with nhood_sizes=(k,): (precision, recall) of samples against a reference set."""
    precision = inside_manifold(samples, reference, knn_radii(reference, k)).mean()
    recall = inside_manifold(reference, samples, knn_radii(samples, k)).mean()
    return float(precision), float(recall)


def read_reference_batch(path: str | Path, inception: AdmInception) -> tuple[Activations, dict[str, np.ndarray]]:
    """The reference batch's image activations and its statistics (`mu`, `sigma`, `mu_s`, `sigma_s` from the file,
    as ADM uses them, or computed from its images where the file has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} not found")
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path} has no 'arr_0' images: precision and recall need the reference images")
        images = data["arr_0"]
        stored = {key: data[key] for key in ("mu", "sigma", "mu_s", "sigma_s") if key in data}
    sizes = {"mu": FEATURE_SIZES["pool"], "mu_s": FEATURE_SIZES["spatial"]}
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mu_key in stored and sigma_key in stored:
            size = statistics_size(stored[mu_key], stored[sigma_key], f"{path} ({mu_key}, {sigma_key})")
            if size != sizes[mu_key]:
                raise ValueError(
                    f"{path} holds {mu_key}/{sigma_key} of {size} features; ADM's reference batches hold "
                    f"{FEATURE_SIZES['pool']} (mu, sigma: pool_3) and {FEATURE_SIZES['spatial']} (mu_s, sigma_s: "
                    "mixed_6/conv), so these were made by another network; give an ADM reference batch"
                )
    activations = inception.activations(images)
    stats = dict(stored)
    if not {"mu", "sigma"} <= set(stored):
        stats["mu"], stats["sigma"] = statistics(activations.pool)
    if not {"mu_s", "sigma_s"} <= set(stored):
        stats["mu_s"], stats["sigma_s"] = statistics(activations.spatial)
    return activations, stats


def adm_metrics(samples: np.ndarray, reference_batch: str | Path, inception: AdmInception) -> dict[str, Any]:
    """FID, sFID, Inception Score, precision and recall of uint8 samples (N, H, W, 3), as ADM's evaluator.
    Precision and recall on sets smaller than k + 1 images are None, and "skipped" says why."""
    reference, stats = read_reference_batch(reference_batch, inception)
    sample = inception.activations(samples)
    mu, sigma = statistics(sample.pool)
    mu_s, sigma_s = statistics(sample.spatial)
    shortfall = precision_recall_shortfall(len(sample.pool), len(reference.pool))
    precision, recall = precision_recall(reference.pool, sample.pool) if shortfall is None else (None, None)
    return {
        "fid": frechet_distance(mu, sigma, stats["mu"], stats["sigma"]),
        "sfid": frechet_distance(mu_s, sigma_s, stats["mu_s"], stats["sigma_s"]),
        "inception_score": inception_score(sample.logits),
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_reference": len(reference.pool),
        "skipped": {} if shortfall is None else {"precision": shortfall, "recall": shortfall},
    }


def write_reference_batch(images: np.ndarray, inception: AdmInception, path: str | Path) -> Path:
    """An ADM-layout reference batch of uint8 images (N, H, W, 3): arr_0 and their statistics."""
    activations = inception.activations(images)
    mu, sigma = statistics(activations.pool)
    mu_s, sigma_s = statistics(activations.spatial)
    return atomic_write(
        path, lambda handle: np.savez(handle, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    )
