"""Feature extractors for FID / KID / precision / recall, registered with torch-fidelity.

- "inception": torch-fidelity's own InceptionV3 (the FID standard). Its weights must be local: torch-fidelity's
  cache, or a path given with `weights_path` (this machine downloads nothing).
- "digits": a small CNN trained on the embedded digits' training split, whose pooled last layer (128
  features) stands in for Inception on 16×16 digits, where Inception features mean little. Its weights ship
  in the repository (analysis/quality/assets/digits-cnn-16px.pt) and are pinned by their sha256, checked at every
  load, so FIDs are comparable across machines; every number states the extractor's hash and its held-out
  accuracy. `python -m analysis.quality.features` retrains it (deterministically) and prints the hash to pin.
- "textures": the same network trained to name the source photograph of the native-resolution textures
  (mediator_models.data.textures), pinned the same way (analysis/quality/assets/textures-cnn-16px.pt);
  `python -m analysis.quality.features textures` retrains it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.quality.images import load_images

DIGITS_EXTRACTOR = "attnmed-digits"
FEATURE_NAME = "features"
MIN_ACCURACY = 0.95
ASSETS = Path(__file__).resolve().parent / "assets"
PINNED_DIGITS_WEIGHTS = ASSETS / "digits-cnn-16px.pt"
PINNED_DIGITS_SHA256 = "96c0232742c255597029bcaf3e9d74784f8b53f4f78f4203a2194526eacad191"
TEXTURES_EXTRACTOR = "attnmed-textures"
MIN_TEXTURES_ACCURACY = 0.75  # flat patches (sky, walls, backgrounds) look alike in the four portraits and scenes
PINNED_TEXTURES_WEIGHTS = ASSETS / "textures-cnn-16px.pt"
PINNED_TEXTURES_SHA256 = "66a8b0c5444f8a0afc0f7160b06180312431e65a70f02fe349d088ba6363105f"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of TF's pt_inception


class DigitsNet(nn.Module):
    """Three conv layers (GELU, so no feature is ever dead), global average pooling to 128 features, and a
    linear classifier over the 10 digits."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
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
    its held-out accuracy (about 97%)."""
    from mediator_models.data import digits

    torch.manual_seed(seed)
    train, heldout = digits("train", image_size), digits("heldout", image_size)
    net = DigitsNet(image_size)

    def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.roll(images, shifts=torch.randint(-1, 2, (2,), generator=generator).tolist(), dims=(-2, -1))

    return net, _fit_classifier(net, lambda epoch: train, heldout, epochs, seed, shift)


def _fit_classifier(net: nn.Module, epoch_data: Callable, heldout, epochs: int, seed: int, augment: Callable) -> float:
    """Train `net` with AdamW and a one-cycle learning rate, batches of 64 in a seeded order, `augment`ing each
    batch (images, generator) -> images; `epoch_data(epoch)` is the training set of each epoch (the same one, or
    fresh crops). Returns the accuracy on `heldout`. Deterministic for a seed (the pinned weights are retrained
    bit for bit)."""
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    first = epoch_data(0)
    batches_per_epoch = (len(first) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * batches_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        train = first if epoch == 0 else epoch_data(epoch)
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(net(augment(train.images[index], generator)), train.labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        return (net(heldout.images).argmax(1) == heldout.labels).float().mean().item()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digits_classifier(image_size: int = 16) -> tuple[DigitsNet, float, Path, str]:
    """The pinned classifier shipped with attnmed: (network, held-out accuracy, weights path, sha256).
    Refuses weights whose hash is not the pinned one (FIDs would not be comparable)."""
    if image_size != 16:
        raise ValueError(f"the pinned digits extractor works at 16×16; got --image-size {image_size}")
    state, digest = load_pinned_state(PINNED_DIGITS_WEIGHTS, PINNED_DIGITS_SHA256, "digits")
    net = DigitsNet(state["image_size"])
    net.load_state_dict(state["weights"])
    return net.eval(), state["heldout_accuracy"], PINNED_DIGITS_WEIGHTS, digest


@dataclass
class DigitsExtractor:
    """The pinned digits classifier as a feature extractor: features of image sets, and how to cite it."""

    net: DigitsNet
    accuracy: float
    path: Path
    sha256: str

    @classmethod
    def pinned(cls, image_size: int = 16) -> "DigitsExtractor":
        net, accuracy, path, digest = digits_classifier(image_size)
        return cls(net, accuracy, path, digest)

    @property
    def label(self) -> str:
        return f"digits-cnn sha256 {self.sha256[:12]} (held-out accuracy {self.accuracy:.1%})"

    @torch.no_grad()
    def features_of(self, source, batch_size: int = 500) -> np.ndarray:
        """(N, 128) float64 features of anything `load_images` reads (folder, npz, split)."""
        images = load_images(source).images
        parts = [
            self.net.features(_uint8_to_model(images[i : i + batch_size], self.net.image_size))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(parts).double().numpy()


@lru_cache(maxsize=1)
def inception_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor torch-fidelity's InceptionV3 loads, from its architecture built on the meta
    device (no weights are read, nothing is allocated)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Architecture(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None  # only the architecture is wanted here

    nothing = io.BytesIO()
    torch.save({}, nothing)
    nothing.seek(0)
    with torch.device("meta"):
        network = Architecture("inception-v3-compat", ["2048"], feature_extractor_weights_path=nothing)
    return {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}


def check_inception_weights(path: str | Path) -> Path:
    """`path`, once it is known to hold torch-fidelity's InceptionV3 weights: every tensor its architecture loads,
    with its shape, and nothing else (nanoGPT's check: compare the key sets before loading, name what differs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {path} not found; pass the local {INCEPTION_WEIGHTS_FILE} (nothing is downloaded here)"
        )
    fix = f"give the pt_inception-2015-12-05 weights torch-fidelity uses ({INCEPTION_WEIGHTS_FILE})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # text, truncated files, pickles of other objects
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"Inception weights {path} cannot be read as torch weights ({type(error).__name__}: {reason[:120]}); {fix}"
        ) from None
    expected = inception_tensor_shapes()
    if not isinstance(state, dict):
        raise ValueError(f"Inception weights {path} holds a {type(state).__name__}, not a state dict; {fix}")
    shapes = {name: tuple(value.shape) for name, value in state.items() if isinstance(value, torch.Tensor)}
    matching = [name for name, shape in expected.items() if shapes.get(name) == shape]
    if len(matching) == len(expected) == len(state):
        return path
    if not matching:
        raise ValueError(
            f"Inception weights {path} holds no Inception-v3 weights: 0 of {len(expected)} expected tensors "
            f"({len(state)} entries of other names or shapes); {fix}"
        )
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [name for name in expected if name in shapes and shapes[name] != expected[name]]
    differences = [
        f"{len(names)} {what} (e.g. {names[0]})"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
        if names
    ]
    raise ValueError(
        f"Inception weights {path} holds {len(matching)} of {len(expected)} expected Inception-v3 tensors: "
        f"{', '.join(differences)}; {fix}"
    )


def register_digits_extractor() -> None:
    """Make the pinned digits classifier available to torch-fidelity under the name `DIGITS_EXTRACTOR`."""

    def load(weights: Path) -> DigitsNet:
        state = torch.load(weights, weights_only=False)
        net = DigitsNet(state["image_size"])
        net.load_state_dict(state["weights"])
        return net

    _register_pinned_cnn(DIGITS_EXTRACTOR, "digits", load)


def _register_pinned_cnn(name: str, what: str, load: Callable[[Path], DigitsNet]) -> None:
    """Register with torch-fidelity a feature extractor whose network `load` builds from the weights' path (the
    pinned CNNs: their pooled 128 features, under FEATURE_NAME)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name in FEATURE_EXTRACTORS_REGISTRY:
        return

    class PinnedCNNFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            weights = kwargs.get("feature_extractor_weights_path")
            if not weights:
                raise ValueError(f"the {what} extractor needs feature_extractor_weights_path (its pinned weights)")
            self.net = load(Path(weights))

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

    torch_fidelity.register_feature_extractor(name, PinnedCNNFeatureExtractor)


# ---- the textures extractor: the digits' network, naming the source photograph of a patch ----------------


class TexturesNet(DigitsNet):
    """DigitsNet's body (its pooled 128 features are the FID features) with one output per source photograph."""

    def __init__(self, image_size: int = 16, num_classes: int = 8):
        super().__init__(image_size)
        self.head = nn.Linear(128, num_classes)


def train_textures_classifier(image_size: int = 16, epochs: int = 30, seed: int = 0) -> tuple[TexturesNet, float]:
    """Train on the textures' training blocks, with fresh crops of them every epoch (the training split drawn
    with seeds `seed`, `seed` + 1, ...; held-out blocks are never seen), random horizontal flips and a one-cycle
    learning rate; no shifts, whose wrap-around would add seams no photograph has. Returns the network and its
    accuracy on the held-out split."""
    from mediator_models.data import textures

    torch.manual_seed(seed)
    heldout = textures("heldout", image_size, seed)
    net = TexturesNet(image_size, heldout.num_classes)

    def flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mirrored = torch.rand(len(images), generator=generator) < 0.5
        return torch.where(mirrored[:, None, None, None], images.flip(-1), images)

    def fresh_crops(epoch: int):
        return textures("train", image_size, seed + epoch)

    return net, _fit_classifier(net, fresh_crops, heldout, epochs, seed, flip)


def load_pinned_state(path: Path, pinned_sha256: str, what: str) -> tuple[dict, str]:
    """The state saved at `path` and its sha256, refused unless the file is there and its hash is the pinned one
    (FIDs made with other weights would not be comparable)."""
    if not path.is_file():
        raise FileNotFoundError(f"the {what} extractor {path} is missing from this checkout; restore it from git")
    digest = file_sha256(path)
    if digest != pinned_sha256:
        raise ValueError(
            f"{path} has sha256 {digest[:12]}…, not the pinned {pinned_sha256[:12]}…: FIDs would "
            "not be comparable with the committed ones; restore the file from git"
        )
    return torch.load(path, weights_only=False), digest


def textures_classifier(image_size: int = 16) -> tuple[TexturesNet, float, Path, str]:
    """The pinned textures classifier: (network, held-out accuracy, weights path, sha256)."""
    if image_size != 16:
        raise ValueError(f"the pinned textures extractor works at 16×16; got --image-size {image_size}")
    state, digest = load_pinned_state(PINNED_TEXTURES_WEIGHTS, PINNED_TEXTURES_SHA256, "textures")
    net = TexturesNet(state["image_size"], state["num_classes"])
    net.load_state_dict(state["weights"])
    return net.eval(), state["heldout_accuracy"], PINNED_TEXTURES_WEIGHTS, digest


@dataclass
class TexturesExtractor(DigitsExtractor):
    """The pinned textures classifier as a feature extractor (features_of as the digits one)."""

    @classmethod
    def pinned(cls, image_size: int = 16) -> "TexturesExtractor":
        net, accuracy, path, digest = textures_classifier(image_size)
        return cls(net, accuracy, path, digest)

    @property
    def label(self) -> str:
        return f"textures-cnn sha256 {self.sha256[:12]} (held-out accuracy {self.accuracy:.1%})"


# The pinned extractor of each embedded dataset (mediator_models.data.EMBEDDED), by its name.
PINNED_EXTRACTORS = {"digits": DigitsExtractor, "textures": TexturesExtractor}


def register_textures_extractor() -> None:
    """Make the pinned textures classifier available to torch-fidelity under the name `TEXTURES_EXTRACTOR`
    (pass feature_layer_fid=FEATURE_NAME and the pinned weights' path, as for the digits); its hash is checked
    again when torch-fidelity loads it."""

    def load(weights: Path) -> DigitsNet:
        state, _ = load_pinned_state(weights, PINNED_TEXTURES_SHA256, "textures")
        net = TexturesNet(state["image_size"], state["num_classes"])
        net.load_state_dict(state["weights"])
        return net

    _register_pinned_cnn(TEXTURES_EXTRACTOR, "textures", load)


def _retrain_and_pin(kind: str) -> None:
    """Retrain the digits or textures extractor into analysis/quality/assets and print the hash to pin here."""
    from mediator_models.storage.checkpoints import atomic_save

    train, minimum, path, constant = {
        "digits": (train_digits_classifier, MIN_ACCURACY, PINNED_DIGITS_WEIGHTS, "PINNED_DIGITS_SHA256"),
        "textures": (
            train_textures_classifier,
            MIN_TEXTURES_ACCURACY,
            PINNED_TEXTURES_WEIGHTS,
            "PINNED_TEXTURES_SHA256",
        ),
    }[kind]
    net, accuracy = train(16)
    if accuracy < minimum:
        raise SystemExit(f"held-out accuracy {accuracy:.1%} is below {minimum:.0%}; not written")
    state = {
        "weights": {k: v.clone() for k, v in net.state_dict().items()},
        "heldout_accuracy": accuracy,
        "image_size": 16,
    }
    if kind == "textures":  # the digits' file predates it and keeps its pinned bytes
        state["num_classes"] = net.head.out_features
    atomic_save(state, path)
    print(f"held-out accuracy {accuracy:.2%}; {constant} = {file_sha256(path)!r}")


if __name__ == "__main__":
    import sys

    _retrain_and_pin("textures" if sys.argv[1:] == ["textures"] else "digits")
