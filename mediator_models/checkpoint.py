"""Loading public and training checkpoints strictly, with errors that say what went wrong; atomic saving.

Accepted inputs: the official DiT/SiT files (a plain state dict, e.g. the 292 tensors of DiT-XL-2-256x256.pt),
training checkpoints of DiT, SiT, the public mediator code and attnmed ({"model", "ema", "opt", "args", ...}),
optionally saved from a DistributedDataParallel wrapper (`module.` prefix).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

StateDict = Mapping[str, torch.Tensor]

# Position-bound mediator tables: (dimension holding the grid axis) in the stored 5-D shape.
_GRID_BOUND_BIASES = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model; the message lists both and a likely cause."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load on the CPU, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path (nothing is downloaded here)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a corrupt or truncated file
        raise RuntimeError(f"could not read checkpoint {path}: {error}. Is it a complete torch.save file?") from error


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
    info["attention"] = "full" if mediator is None else f"mediator n={mediator.shape[1]}"
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
        "attention": "full" if config.attention == "full" else f"mediator n={config.mediators}",
        "out_channels": config.out_channels,
    }
    hints = {
        "depth": "a different model size (S/B/L/XL)",
        "hidden_size": "a different model size (S/B/L/XL)",
        "patch_size": "a different patch size (/2, /4, /8)",
        "num_tokens": "another resolution (pass adapt_resolution=True to fine-tune across resolutions)",
        "attention": "another attention kind or mediator count (attention=..., mediators=...)",
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
    """Load official DiT/SiT weights, mediator checkpoints or training checkpoints into `model`, strictly.

    `use_ema` picks the EMA weights of a training checkpoint (the ones to sample from). With
    `adapt_resolution`, weights saved at another resolution are adapted first (see
    `adapt_to_resolution`); otherwise any mismatch raises `CheckpointMismatchError`.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        checkpoint = read_checkpoint(path_or_state_dict)
    else:
        checkpoint = path_or_state_dict
    state = extract_state_dict(checkpoint, use_ema=use_ema)
    if adapt_resolution:
        state = adapt_to_resolution(model, state)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, then rename: a kill at any moment keeps the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
