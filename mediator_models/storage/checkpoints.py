"""Loading public and training checkpoints strictly, with errors that say what went wrong; atomic saving.

Accepted inputs: the official DiT/SiT files (a plain state dict, e.g. the 292 tensors of DiT-XL-2-256x256.pt),
training checkpoints of DiT, SiT, the public mediator code and attnmed ({"model", "ema", "opt", "args", ...}),
optionally saved from a DistributedDataParallel wrapper (`module.` prefix).
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mediator_models.storage.diffusers_weights import is_diffusers_dit, read_diffusers_folder, state_from_diffusers
from mediator_models.storage.errors import CheckpointError, CheckpointMismatchError
from mediator_models.storage.runfolder import atomic_write

StateDict = Mapping[str, torch.Tensor]

# Position-bound mediator tables: (dimension holding the grid axis) in the stored 5-D shape.
_GRID_BOUND_BIASES = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


# What a checkpoint's checksum covers: everything that is loaded back (not the RNG states, which are only
# restored for exactness and are checked by their own types on load).
CHECKSUMMED = ("model", "ema", "opt", "step", "args", "model_config", "process")


def _feed(hasher, value: Any) -> None:
    """Feed a nested structure of tensors, containers and plain values into `hasher`, in a fixed order."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, Mapping):
        hasher.update(f"D{len(value)}".encode())
        for key in sorted(value, key=str):
            hasher.update(f"K{key!s}".encode())
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}".encode())
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(f"V{value!r}".encode())


def checkpoint_checksum(checkpoint: Mapping[str, Any]) -> str:
    """sha256 over the checkpoint's weights, optimizer state, step and configuration (see CHECKSUMMED)."""
    hasher = hashlib.sha256()
    _feed(hasher, {key: checkpoint[key] for key in CHECKSUMMED if key in checkpoint})
    return hasher.hexdigest()


def weights_digest(state_dict: StateDict) -> str:
    """A short sha256 of a state dict's names, dtypes, shapes and values: which weights made a result."""
    hasher = hashlib.sha256()
    _feed(hasher, dict(state_dict))
    return hasher.hexdigest()[:16]


def _diagnose_unreadable(path: Path) -> str:
    """Why torch.load failed on `path`, in words."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes): its write was interrupted or its copy failed"
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except zipfile.BadZipFile:
            return f"the file is truncated ({size} bytes; its end is missing): copy it again or use an earlier one"
        if damaged is not None:
            return f"the file is damaged (entry {damaged} fails its check): copy it again or use an earlier one"
        return "the file is damaged: torch cannot unpickle it"
    if head[:1] == b"\x80":
        return "the file is damaged or truncated (a legacy torch.save file that does not unpickle)"
    return f"not a torch checkpoint (it starts with {head!r}; torch.save files start with b'PK')"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load on the CPU; a missing, empty, truncated, non-torch or damaged file raises one clear line.

    attnmed checkpoints carry a `checksum` of what they hold (`checkpoint_checksum`), verified here, so
    bytes altered after saving are caught even where the file still unpickles. Official DiT/SiT files
    carry none and load as they are.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path (nothing is downloaded here)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; pass the .pt file inside it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # torch raises many types for a corrupt or truncated file
        raise CheckpointError(f"cannot read checkpoint {path}: {_diagnose_unreadable(path)}") from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict or a training checkpoint"
        )
    if "checksum" in checkpoint and checkpoint_checksum(checkpoint) != checkpoint["checksum"]:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its contents no longer match the checksum saved "
            "with them (bytes changed after saving); use an earlier checkpoint"
        )
    return checkpoint


def extract_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights inside any accepted checkpoint layout, with a DDP `module.` prefix removed.

    Training checkpoints keep both the raw and the EMA weights; the EMA ones are what the papers sample from.
    """
    if "ema" in checkpoint and use_ema:
        weights = checkpoint["ema"]
    elif "model" in checkpoint:
        weights = checkpoint["model"]
    elif "ema" in checkpoint:
        weights = checkpoint["ema"]
    elif "state_dict" in checkpoint:
        weights = checkpoint["state_dict"]
    else:
        weights = checkpoint
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        keys = sorted(checkpoint)[:8]
        raise CheckpointMismatchError(
            f"no state dict found in the checkpoint (top-level keys: {keys}); expected a plain state dict or a "
            "dict with 'model'/'ema' entries"
        )
    return {k.removeprefix("module."): v for k, v in weights.items()}


def describe_state_dict(state: StateDict) -> dict[str, Any]:
    """What architecture a state dict was saved from, read off its shapes (for error messages)."""
    info: dict[str, Any] = {}
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if blocks:
        info["depth"] = max(blocks) + 1
    if "x_embedder.proj.weight" in state:
        w = state["x_embedder.proj.weight"]
        info.update(hidden_size=w.shape[0], in_channels=w.shape[1], patch_size=w.shape[-1])
    if "pos_embed" in state:
        info["num_tokens"] = state["pos_embed"].shape[1]
    if "y_embedder.embedding_table.weight" in state:
        info["embedding_rows"] = state["y_embedder.embedding_table.weight"].shape[0]
    mediator = state.get("blocks.0.attn.an_bias")
    conv = "blocks.0.attn.dwc.weight" in state
    if "blocks.0.attn.v.weight" in state:
        info["attention"] = "conv only"
    elif mediator is None:
        info["attention"] = "full + conv" if conv else "full"
    elif "blocks.0.attn.qkv.weight" in state:
        info["attention"] = f"mediator n={mediator.shape[1]}" + ("" if conv else ", no conv")
    if "final_layer.linear.weight" in state and "patch_size" in info:
        info["out_channels"] = state["final_layer.linear.weight"].shape[0] // info["patch_size"] ** 2
    return info


def _likely_cause(model: nn.Module, state: StateDict) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return ""
    found = describe_state_dict(state)
    expected = {
        "depth": config.depth,
        "hidden_size": config.hidden_size,
        "in_channels": config.in_channels,
        "patch_size": config.patch_size,
        "num_tokens": config.num_tokens,
        "embedding_rows": config.num_classes + int(config.class_dropout_prob > 0),
        "attention": config.attention_label,
        "out_channels": config.out_channels,
    }
    hints = {
        "depth": "a different model size (S/B/L/XL)",
        "hidden_size": "a different model size (S/B/L/XL)",
        "patch_size": "a different patch size (/2, /4, /8)",
        "num_tokens": "another resolution (pass adapt_resolution=True to fine-tune across resolutions)",
        "attention": "another attention kind, mediator count or conv setting (attention=..., mediators=..., depthwise_conv=...)",
        "embedding_rows": "another num_classes or class_dropout_prob (the null class row exists only with dropout)",
        "out_channels": "another learn_sigma setting",
        "in_channels": "another in_channels (4 for SD-VAE latents)",
    }
    lines = [
        f"  {key}: checkpoint has {found[key]}, model has {want} -> {hints[key]}"
        for key, want in expected.items()
        if key in found and found[key] != want
    ]
    if not lines:
        return ""
    return "Likely cause, read off the shapes:\n" + "\n".join(lines)


def _natural_order(keys) -> list[str]:
    """Sort parameter names with numbers compared as numbers (blocks.2 before blocks.10)."""
    return sorted(keys, key=lambda k: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", k)])


def check_state_dict(model: nn.Module, state: StateDict) -> None:
    """Raise `CheckpointMismatchError` unless keys and shapes agree exactly (a strict load)."""
    own = model.state_dict()  # in the network's order: embedders, blocks, final layer
    missing = [k for k in own if k not in state]
    unexpected = _natural_order(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:12]) + (f"\n    ... and {len(items) - 12} more" if len(items) > 12 else "")
        return f"  {title} ({len(items)}):\n    {shown}" if items else ""

    label = getattr(getattr(model, "config", None), "label", type(model).__name__)
    parts = [f"checkpoint does not match {label}:"]
    parts += [listing("missing keys", missing), listing("unexpected keys", unexpected)]
    parts += [listing("shape mismatches", mismatched), _likely_cause(model, state)]
    raise CheckpointMismatchError("\n".join(p for p in parts if p))


def adapt_to_resolution(model: nn.Module, state: StateDict) -> dict[str, torch.Tensor]:
    """Adapt a state dict saved at another resolution to `model`'s, as the public 256→512 fine-tuning does.

    The sin-cos `pos_embed` is recomputed for the new grid (it is a fixed function of the grid, not learned);
    the per-row and per-column mediator tables are resized along their grid axis by linear interpolation with
    aligned corners. The 7×7 mediator tables need nothing: they are resized to the grid at every forward.
    """
    own = model.state_dict()
    adapted = dict(state)
    for key, value in state.items():
        if key not in own or own[key].shape == value.shape:
            continue
        if key == "pos_embed":
            adapted[key] = own[key].clone()
            continue
        suffix = key.rsplit(".", 1)[-1]
        if suffix in _GRID_BOUND_BIASES:
            axis = _GRID_BOUND_BIASES[suffix]
            size = own[key].shape[axis]
            moved = value.movedim(axis, -1)  # (..., old grid)
            flat = moved.reshape(-1, 1, moved.shape[-1])
            resized = F.interpolate(flat.float(), size=size, mode="linear", align_corners=True)
            adapted[key] = resized.reshape(*moved.shape[:-1], size).movedim(-1, axis).to(value.dtype)
    return adapted


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    use_ema: bool = True,
    adapt_resolution: bool = False,
) -> nn.Module:
    """Load official DiT/SiT weights, mediator checkpoints, training checkpoints or a diffusers DiT (its saved
    folder or state dict, see `mediator_models.storage.diffusers_weights`) into `model`, strictly.

    `use_ema` picks the EMA weights of a training checkpoint (the ones to sample from). With
    `adapt_resolution`, weights saved at another resolution are adapted first (see
    `adapt_to_resolution`); otherwise any mismatch raises `CheckpointMismatchError`.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)) and Path(path_or_state_dict).is_dir():
        checkpoint, _ = read_diffusers_folder(path_or_state_dict)
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        checkpoint = read_checkpoint(path_or_state_dict)
    else:
        checkpoint = path_or_state_dict
    if is_diffusers_dit(checkpoint):  # diffusers' DiTTransformer2DModel names: convert onto ours (strictly below)
        checkpoint = state_from_diffusers(checkpoint, model.config)
    state = extract_state_dict(checkpoint, use_ema=use_ema)
    if adapt_resolution:
        state = adapt_to_resolution(model, state)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, then rename: a kill at any moment keeps the old file."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))
