"""Image sets as the quality metrics read them: uint8 (N, 3, H, W) from a folder, an `.npz` (`arr_0`, uint8
NHWC, as `attnmed sample` writes), an in-memory uint8 tensor or a dataset split in model units.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class ImageSet(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) for torch-fidelity."""

    def __init__(self, images: torch.Tensor, origin: str = "the images"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"{origin}: expected uint8 images (N, C, H, W) or (N, H, W, C), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW
        if images.shape[1] not in (1, 3):
            raise ValueError(
                f"{origin}: images have {min(images.shape[1], images.shape[-1])} channels; the metrics take "
                "grey or RGB (drop the alpha channel of RGBA images first)"
            )
        if len(images) < 2:
            raise ValueError(
                f"{origin}: {len(images)} image(s); FID needs at least 2 (a covariance), and a meaningful one hundreds"
            )
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        self.images = images.contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def load_images(source) -> ImageSet:
    """An ImageSet from a folder (of an `attnmed sample` run: the images its samples.json counts), an npz
    (`arr_0`), a uint8 tensor, or a TensorSource in [−1, 1]."""
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
        raise ValueError(
            f"{path} cannot be read as an .npz ({type(error).__name__}: {error}); is it complete?"
        ) from None


def _read_image_folder(path: Path) -> np.ndarray:
    if (path / "samples.json").exists():
        return _read_sample_folder(path)
    if (path / "sampling.json").exists():
        raise ValueError(
            f"{path} is an unfinished `attnmed sample` folder (sampling.json but no samples.json); run the same "
            "attnmed sample command again to finish it, then evaluate the folder"
        )
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"no images (.png, .jpg) in {path}")
    return _stack_images(files)


def _read_sample_folder(path: Path) -> np.ndarray:
    """The images an `attnmed sample` folder's samples.json says it holds: its npz, or where that is gone the PNGs
    0..num_samples−1. PNGs beyond num_samples are not read: a resume with fewer samples leaves those of the longer
    run in the folder (sample i is the same image in both: it is drawn from seed + i)."""
    sidecar = path / "samples.json"
    try:
        count = int(json.loads(sidecar.read_text())["num_samples"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{sidecar} is not a readable attnmed samples.json ({type(error).__name__}: {error}); run the "
            "attnmed sample command that made the folder again to rewrite it"
        ) from None
    npz = path / "samples.npz"
    if npz.is_file():
        images = _read_npz_images(npz)
        if len(images) != count:
            raise ValueError(
                f"{npz} holds {len(images)} images but {sidecar.name} says {count}; run the attnmed sample "
                "command that made the folder again to rewrite both"
            )
        return images
    files = [path / f"{i:06d}.png" for i in range(count)]  # attnmed sample's names (mediator_models/sample.py)
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise ValueError(
            f"{path}: {sidecar.name} says {count} samples but samples.npz and {len(missing)} of their PNGs "
            f"(first: {missing[0]}) are missing; run the attnmed sample command that made the folder again"
        )
    return _stack_images(files)


def _stack_images(files: list[Path]) -> np.ndarray:
    """(N, H, W, 3) uint8 of image files that must share one size."""
    from PIL import Image

    arrays = []
    for file in files:
        try:
            with Image.open(file) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except Exception as error:
            raise ValueError(f"{file} is not a readable image ({error}); remove or replace it") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(
                f"{file} is {arrays[-1].shape[1]}×{arrays[-1].shape[0]} but {files[0].name} is "
                f"{arrays[0].shape[1]}×{arrays[0].shape[0]}; all images of a set must share one size"
            )
    return np.stack(arrays)
