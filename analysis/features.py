"""Feature extractors for FID / KID / precision / recall, registered with torch-fidelity.

- "inception": torch-fidelity's own InceptionV3 (the FID standard). Its weights must be local: torch-fidelity's
  cache, or a path given with `weights_path` (this machine downloads nothing).
- "digits": a small CNN trained here on the embedded digits' training split, whose penultimate layer (128
  features) stands in for Inception on 16×16 digits, where Inception features mean little. It is trained
  once per configuration, cached, and its held-out accuracy is reported beside every number it produces.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DIGITS_EXTRACTOR = "attnmed-digits"
FEATURE_NAME = "features"
MIN_ACCURACY = 0.95


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNMED_CACHE", Path.home() / ".cache" / "attnmed"))


class DigitsNet(nn.Module):
    """Three conv layers, global average pooling to 128 features, a linear classifier over 10 digits."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1, H, W) in [−1, 1] -> (B, 128)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _uint8_to_model(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3 or 1, H, W) uint8 -> (B, 1, size, size) grey in [−1, 1]."""
    x = images.float() / 127.5 - 1.0
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def train_digits_classifier(image_size: int = 16, epochs: int = 40, seed: int = 0) -> tuple[DigitsNet, float]:
    """Train on the digits' training split (±1 px shifts, one-cycle learning rate); returns the network and
    its held-out accuracy (about 96–97%)."""
    from mediator_models.data import digits

    torch.manual_seed(seed)
    train, heldout = digits("train", image_size), digits("heldout", image_size)
    net = DigitsNet(image_size)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    batches_per_epoch = (len(train) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * batches_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            x = train.images[index]
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(-2, -1))
            loss = F.cross_entropy(net(x), train.labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    return net, accuracy


def digits_classifier(image_size: int = 16, epochs: int = 40, seed: int = 0) -> tuple[DigitsNet, float, Path]:
    """The cached classifier for this configuration (trained on first use); refuses one below 95%."""
    from mediator_models.checkpoint import atomic_save

    key = hashlib.sha256(json.dumps({"size": image_size, "epochs": epochs, "seed": seed, "v": 2}).encode()).hexdigest()[:12]
    path = cache_dir() / f"digits-classifier-{key}.pt"
    if path.exists():
        state = torch.load(path, weights_only=False)
        net = DigitsNet(image_size)
        net.load_state_dict(state["weights"])
        return net.eval(), state["heldout_accuracy"], path
    net, accuracy = train_digits_classifier(image_size, epochs, seed)
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(f"the digits classifier reached only {accuracy:.1%} held-out accuracy (< 95%); "
                           "its features would not be trustworthy for FID")  # fmt: skip
    atomic_save({"weights": net.state_dict(), "heldout_accuracy": accuracy, "image_size": image_size}, path)
    return net, accuracy, path


def _register_digits_extractor() -> None:
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if DIGITS_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class DigitsFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            weights = kwargs.get("feature_extractor_weights_path")
            if not weights:
                raise ValueError("the digits extractor needs feature_extractor_weights_path (see digits_classifier)")
            state = torch.load(weights, weights_only=False)
            self.net = DigitsNet(state["image_size"])
            self.net.load_state_dict(state["weights"])

        @staticmethod
        def get_provided_features_list():
            return (FEATURE_NAME,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return FEATURE_NAME

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, images):
            return (self.net.features(_uint8_to_model(images, self.net.image_size)),)

    torch_fidelity.register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)
