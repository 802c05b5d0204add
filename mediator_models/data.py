"""Datasets for training and evaluation: the embedded digits, ImageFolder trees, and VAE latents.

Every source is an indexable set of (image or latent in model units, label) pairs, so the training loop can
draw any batch by index: that is what makes resumed runs exact. Images are scaled to [−1, 1]; latents are
SD-VAE latents times 0.18215 (docs/reference.md §1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mediator_models.progress import progress_bar
from mediator_models.storage.checkpoints import atomic_save
from mediator_models.storage.errors import ConfigurationMismatchError, SettingError
from mediator_models.storage.runfolder import (
    FolderLock,
    atomic_write_json,
    claim_identity,
    clean_stale_temporaries,
    differences,
)

LATENT_SCALE = 0.18215
VAE_DOWNSAMPLING = 8  # the SD VAE's latents are 1/8 of the image side
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class TensorSource:
    """An in-memory dataset: `images` (N, C, H, W) in model units and `labels` (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    description: str
    flippable: bool = False  # whether a horizontal flip is a valid augmentation for this data

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int], flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        if flip is not None and self.flippable:
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, self.labels[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


# ---- the embedded default: scikit-learn's handwritten digits -----------------------------------------------


def digits(split: str = "train", image_size: int = 16, holdout_fraction: float = 0.2, seed: int = 0) -> TensorSource:
    """scikit-learn's 1797 real 8×8 digits (shipped with it, no download), upsampled bilinearly to
    `image_size`, scaled from [0, 16] to [−1, 1]. A fixed seeded split keeps `holdout_fraction` of each
    class aside as the held-out set (the FID reference). `split`: "train", "heldout" or "all"."""
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}; choose 'train', 'heldout' or 'all'")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).clamp(-1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if split != "all":
        rng = np.random.default_rng(seed)
        heldout = np.zeros(len(labels), dtype=bool)
        for c in range(10):  # stratified: the same fraction of every class
            members = np.flatnonzero(bunch.target == c)
            heldout[rng.permutation(members)[: int(round(holdout_fraction * len(members)))]] = True
        keep = torch.from_numpy(heldout if split == "heldout" else ~heldout)
        images, labels = images[keep], labels[keep]
    return TensorSource(images, labels, 10, f"digits[{split}] {image_size}x{image_size}", flippable=False)


# ---- native-resolution data: patches of the photographs scikit-image ships ---------------------------------

# Class name -> (file in skimage/data, its sha256 in scikit-image 0.26.0, its licence as skimage's docstring
# states it). Only photographs released as CC0 or into the public domain are used, and only PNGs (JPEG decoders
# differ in their last bit between libjpeg builds). Left out: moon and page (no licence stated), coins and ihc
# ("no known copyright restrictions" is not a licence), rocket, retina and hubble (JPEG), microaneurysms (too
# small), and the synthetic images.
TEXTURE_PHOTOGRAPHS = {
    "brick": ("brick.png", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", "CC0 (CC0Textures)"),
    "grass": ("grass.png", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89", "CC0 (DeviantArt)"),
    "gravel": ("gravel.png", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12", "CC0 (CC0Textures)"),
    "camera": ("camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", "CC0 (L. Varshney)"),
    "astronaut": ("astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", "public domain"),
    "chelsea": ("chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", "CC0"),
    "coffee": ("coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", "CC0 (R. Michetti)"),
    "text": ("text.png", "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1", "public domain"),
}
TEXTURE_PATCH = 32  # side of a patch in the photograph's pixels: 32×32 images are native, 16×16 a 2× box filter
TEXTURE_BLOCK = 64  # photographs are tiled into blocks this side; a patch lies wholly inside one block
TEXTURE_PATCHES = {"train": 500, "heldout": 125}  # per class: 4000 training and 1000 held-out patches


def skimage_data_folder() -> Path:
    """The folder of sample images inside the installed scikit-image, found without importing it (its import
    needs dependencies attnmed does not have)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the textures data are patches of scikit-image's sample photographs, but scikit-image is not installed: "
            "pip install --no-deps scikit-image==0.26.0 (requirements.txt)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def texture_photograph(name: str) -> np.ndarray:
    """One of `TEXTURE_PHOTOGRAPHS` as grey uint8 (H, W), refused unless its sha256 is the pinned one (another
    scikit-image release could change the images, and FIDs against them would not be comparable)."""
    import hashlib

    from PIL import Image

    file, pinned, _ = TEXTURE_PHOTOGRAPHS[name]
    path = skimage_data_folder() / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed scikit-image; reinstall scikit-image==0.26.0")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != pinned:
        raise ValueError(
            f"{path} has sha256 {digest[:12]}…, not the {pinned[:12]}… of scikit-image 0.26.0: the textures would "
            "differ from the pinned ones; install scikit-image==0.26.0"
        )
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))  # ITU-R 601 luma, exact in integers


def texture_blocks(height: int, width: int, split: str) -> list[tuple[int, int]]:
    """Top-left corners of the blocks of a photograph that belong to `split`: every fifth diagonal of the block
    grid is held out, so both splits cover the whole picture and no patch of one overlaps a patch of the other."""
    blocks = [(r, c) for r in range(height // TEXTURE_BLOCK) for c in range(width // TEXTURE_BLOCK)]
    chosen = [(r, c) for r, c in blocks if ((r - c) % 5 == 0) == (split == "heldout")]
    return [(r * TEXTURE_BLOCK, c * TEXTURE_BLOCK) for r, c in chosen]


def textures(split: str = "train", image_size: int = 16, seed: int = 0) -> TensorSource:
    """Patches of eight photographs scikit-image ships (brick, grass, gravel, camera, astronaut, chelsea, coffee,
    text; all CC0 or public domain, see `TEXTURE_PHOTOGRAPHS`); class = source photograph. Seeded random 32×32
    crops in grey (five of the eight are grey only, so colour would name the class), box-filtered to
    `image_size` (at most 32) and scaled to [−1, 1]. Unlike the upsampled digits they carry detail at 16×16: the
    pixel matrix of the 4000 training patches has full rank 256. Held-out patches (1000) come from other
    blocks of each photograph than training ones (`texture_blocks`). `split`: "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}; choose 'train', 'heldout' or 'all'")
    if not isinstance(image_size, int) or not 4 <= image_size <= TEXTURE_PATCH:
        raise SettingError(
            "image_size",
            f"{image_size!r}: the textures are {TEXTURE_PATCH}-px patches, so sizes 4 to {TEXTURE_PATCH} work (16 "
            f"for the 256-token study, {TEXTURE_PATCH} native); larger ones would only upsample them",
        )
    splits = ("train", "heldout") if split == "all" else (split,)
    patches, labels = [], []
    for label, name in enumerate(TEXTURE_PHOTOGRAPHS):
        photograph = texture_photograph(name)
        for part in splits:
            corners = texture_blocks(*photograph.shape, part)
            count = TEXTURE_PATCHES[part]
            rng = np.random.default_rng([seed, label, ("train", "heldout").index(part)])
            block = rng.integers(len(corners), size=count)
            offset = rng.integers(TEXTURE_BLOCK - TEXTURE_PATCH + 1, size=(count, 2))
            for b, (dy, dx) in zip(block, offset):
                top, left = corners[b][0] + dy, corners[b][1] + dx
                patches.append(photograph[top : top + TEXTURE_PATCH, left : left + TEXTURE_PATCH])
            labels += [label] * count
    images = torch.from_numpy(np.stack(patches)[:, None]).float() / 127.5 - 1.0  # (N, 1, 32, 32)
    if image_size != TEXTURE_PATCH:
        images = F.interpolate(images, size=(image_size, image_size), mode="area")  # a box filter
    description = f"textures[{split}] {image_size}x{image_size}"
    return TensorSource(images, torch.tensor(labels), len(TEXTURE_PHOTOGRAPHS), description, flippable=False)


# ---- ImageFolder trees with ADM's preprocessing ------------------------------------------------------------


def center_crop_arr(pil_image, image_size: int):
    """ADM's centre crop: halve with a box filter while the image is at least twice the target, resize the
    short side to `image_size` with bicubic, then crop the centre."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of a class-per-subfolder tree (ImageNet's train layout), with clear errors."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"data folder {root} has no class subfolders; expected ROOT/CLASS_NAME/IMAGE files")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
                labels.append(label)
    if not files:
        raise ValueError(f"data folder {root} has class folders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files, labels, classes


class ImageFolderSource:
    """Images loaded on demand, ADM centre-cropped to `image_size`, scaled to [−1, 1]; flips are applied by
    the caller's flip mask so that augmentation is reproducible from the step number."""

    flippable = True

    def __init__(self, root: str | Path, image_size: int):
        self.files, self.labels_list, self.classes = list_image_folder(root)
        self.root = Path(root)
        self.image_size = image_size
        self.num_classes = len(self.classes)
        self.description = (
            f"ImageFolder {root} ({len(self.files)} images, {self.num_classes} classes) at {image_size}px"
        )

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def load(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[index]) as image:
                image = center_crop_arr(image.convert("RGB"), self.image_size)
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {self.files[index]}: {error}") from error
        arr = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
        return arr / 127.5 - 1.0

    def batch(self, indices: Sequence[int], flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self.load(int(i)) for i in indices])
        if flip is not None:
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, torch.tensor([self.labels_list[int(i)] for i in indices], dtype=torch.long)


# ---- VAE latents -------------------------------------------------------------------------------------------


def load_vae(name_or_path: str, device: torch.device | str = "cpu"):
    """A diffusers AutoencoderKL from a local folder or a hub id (hub ids need the network or a warm cache); a
    folder holding another kind of model (a UNet, a transformer) is refused, naming the class it holds."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as error:  # pragma: no cover - diffusers is in requirements.txt
        raise ImportError("latent training needs diffusers: pip install diffusers") from error
    try:
        found = AutoencoderKL.load_config(name_or_path).get("_class_name")
        vae = None
        if found in (None, "AutoencoderKL"):
            vae = AutoencoderKL.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"could not load the VAE {name_or_path!r} ({error}). Pass a local folder holding config.json and the "
            "weights (e.g. a downloaded stabilityai/sd-vae-ft-ema); this machine downloads nothing."
        ) from error
    if vae is None:  # from_pretrained would build an AutoencoderKL from a UNet's config and fail only when encoding
        pipeline = (Path(name_or_path).parent / "model_index.json").exists()
        hint = f" (this is a pipeline's {Path(name_or_path).name}/ folder: pass its vae/ folder)" if pipeline else ""
        raise SettingError(
            "vae",
            f"{name_or_path} holds a {found} (its config.json), not a VAE: pass an AutoencoderKL folder, e.g. a "
            f"downloaded stabilityai/sd-vae-ft-ema or a pipeline's vae/ folder{hint}",
        )
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [−1, 1] -> latents in model units (a posterior sample × 0.18215, as DiT trains on)."""
    return vae.encode(images).latent_dist.sample(generator=generator) * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents in model units -> images in [−1, 1]."""
    return vae.decode(latents / LATENT_SCALE).sample.clamp(-1, 1)


def latent_side(image_size: int, downsampling: int = VAE_DOWNSAMPLING) -> int:
    """The side of the latents of `image_size`-px images, refusing sizes the VAE does not divide (it would cut
    the latents short, and the model's patch grid would not fit them)."""
    if image_size % downsampling:
        raise SettingError(
            "image_size",
            f"{image_size} px is not a multiple of {downsampling}, the VAE's downsampling, so its latents would be "
            f"cut to {image_size // downsampling}×{image_size // downsampling}; sizes that work are multiples of "
            f"{downsampling}, and multiples of {2 * downsampling} for the /2 models (e.g. 256 or 512)",
        )
    return image_size // downsampling


def vae_downsampling(vae) -> int:
    """How many times smaller than the image a diffusers AutoencoderKL's latents are (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def cache_identity(source: ImageFolderSource, vae_name: str | None, seed: int = 0) -> dict:
    """What fixes a latent cache's contents: the images, their size, the VAE and the seed of its samples."""
    vae = vae_name if vae_name is None or not Path(vae_name).exists() else str(Path(vae_name).resolve())
    return {
        "data": str(source.root.resolve()),
        "num_images": len(source),
        "classes": source.classes,
        "image_size": source.image_size,
        "vae": vae,
        "seed": seed,
    }


CACHE_FIX = "cache into another folder, or delete this one to encode it again"


def check_latent_cache(out_dir: str | Path, identity: dict) -> None:
    """Refuse, before the VAE is loaded, an output that is a file or holds latents of another configuration
    (a finished cache from before caches recorded their identity is compared on what its meta.json holds)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder; name a folder for the latent cache")
    saved_path = out_dir / "cache.json"
    if saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except json.JSONDecodeError:
            raise ConfigurationMismatchError(f"{saved_path} is damaged; {CACHE_FIX}") from None
    elif (out_dir / "meta.json").exists():
        meta = json.loads((out_dir / "meta.json").read_text())
        saved = {key: meta[key] for key in ("num_images", "classes", "image_size") if key in meta}
        identity = {key: identity[key] for key in saved}
    else:
        return
    lines = differences(saved, identity)
    if lines:
        raise ConfigurationMismatchError(
            f"{out_dir} holds latents of another configuration:\n  " + "\n  ".join(lines) + f"\n{CACHE_FIX}"
        )


def cache_latents(
    source: ImageFolderSource,
    vae,
    out_dir: str | Path,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    vae_name: str | None = None,
) -> Path:
    """One pass of the VAE over a folder, storing the latents of each image and of its mirror image, so that
    training with flips never runs the VAE. Written in chunks and resumable; finished by `meta.json`.

    The folder is locked while it is written, and records its configuration (`cache.json`, see
    `cache_identity`; `vae_name` defaults to the folder the VAE was loaded from): a folder holding latents of
    another configuration is refused, never mixed with new ones or reported as done.
    """
    out_dir = Path(out_dir)
    latent_side(source.image_size, vae_downsampling(vae))
    identity = cache_identity(source, vae_name or vae.config.get("_name_or_path"), seed)
    check_latent_cache(out_dir, identity)
    with FolderLock(out_dir, "attnmed cache-latents"):
        check_latent_cache(out_dir, identity)  # again under the lock: another writer may have finished meanwhile
        if (out_dir / "meta.json").exists():
            return out_dir
        claim_identity(out_dir / "cache.json", identity, what="latents", fix=CACHE_FIX)
        clean_stale_temporaries(out_dir)
        device = next(vae.parameters()).device
        chunks = sorted(out_dir.glob("chunk-*.pt"))
        done = sum(torch.load(c)["labels"].numel() for c in chunks)
        bar = progress_bar(len(source), f"latents of {source.root}", initial=done) if progress else None
        for start in range(done, len(source), batch_size):
            indices = list(range(start, min(start + batch_size, len(source))))
            images, labels = source.batch(indices)
            generator = torch.Generator(device=device).manual_seed(seed + start)
            plain = encode(vae, images.to(device), generator)
            mirrored = encode(vae, images.flip(-1).to(device), generator)
            chunk = {"latents": torch.stack([plain, mirrored], dim=1).cpu(), "labels": labels}
            atomic_save(chunk, out_dir / f"chunk-{start:09d}.pt")
            if bar is not None:
                bar.update(len(indices))
        if bar is not None:
            bar.close()
        meta = {
            "num_images": len(source),
            "num_classes": source.num_classes,
            "classes": source.classes,
            "image_size": source.image_size,
            "scale": LATENT_SCALE,
            "description": source.description,
        }
        atomic_write_json(out_dir / "meta.json", meta)
    return out_dir


def load_latent_cache(path: str | Path) -> TensorSource:
    """A cache written by `cache_latents` as an in-memory source; flips pick the mirrored latent."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{path} is not a finished latent cache (no meta.json); run `attnmed cache-latents` again"
        )
    meta = json.loads(meta_path.read_text())
    chunks = [torch.load(c) for c in sorted(path.glob("chunk-*.pt"))]
    latents = torch.cat([c["latents"] for c in chunks])  # (N, 2, C, h, w): plain and mirrored
    labels = torch.cat([c["labels"] for c in chunks])
    description = f"latents {path} ({len(labels)} images at {meta['image_size']}px)"
    return LatentPairSource(latents, labels, meta["num_classes"], description, meta["image_size"])


class LatentPairSource(TensorSource):
    """Cached latents with their mirrored twins: a flip selects the twin instead of flipping the latent.
    `image_size` is the side in pixels of the images they encode."""

    def __init__(self, pairs: torch.Tensor, labels: torch.Tensor, num_classes: int, description: str, image_size: int):
        super().__init__(pairs[:, 0], labels, num_classes, description, flippable=True)
        self.pairs = pairs
        self.image_size = image_size

    def batch(self, indices, flip=None):
        index = torch.as_tensor(indices, dtype=torch.long)
        which = flip.long() if flip is not None else torch.zeros(len(index), dtype=torch.long)
        return self.pairs[index, which], self.labels[index]


# The datasets that ship with attnmed's requirements, by their `--data` name: (split, image_size) -> TensorSource.
EMBEDDED = {"digits": digits, "textures": textures}


def open_source(data: str, image_size: int, vae_name: str | None = None):
    """The training source a `--data` argument names: "digits", "textures", a latent cache, or an ImageFolder
    tree."""
    if data in EMBEDDED:
        return EMBEDDED[data]("train", image_size)
    path = Path(data)
    if (path / "meta.json").exists():
        return load_latent_cache(path)
    return ImageFolderSource(path, image_size)
