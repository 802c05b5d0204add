"""Readers of a study's run folder (written by analysis.reproduce), for the report and the notebooks.

One home for knowing where a run keeps things, so the report reads a run folder without importing the
pipeline that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def load_kept_maps(run_dir: Path) -> list[dict]:
    """The raw attention maps the recorder kept (first part of each (network, step, layer))."""
    return [torch.load(p, weights_only=False) for p in sorted((Path(run_dir) / "record" / "maps").glob("*_part000.pt"))]


def sample_images(sample_folder: Path, count: int = 32) -> np.ndarray:
    """The first `count` images (N, H, W, 3) uint8 of a sample folder's samples.npz."""
    with np.load(Path(sample_folder) / "samples.npz") as data:
        return data["arr_0"][:count]


def read_log(path: Path) -> list[dict]:
    """A training log's loss records (resume events carry no loss and are left out)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "event" not in r]


def training_summary(run_dir: Path, seeds, variants: dict[str, object]) -> list[dict]:
    """One row per (variant, training seed): final logged loss and mean training speed."""
    rows = []
    for seed in seeds:
        for name in variants:
            records = read_log(Path(run_dir) / "train" / f"seed{seed}" / name / "log.jsonl")
            rows.append({"model": name, "seed": seed, "final_loss": records[-1]["loss"] if records else None,
                         "steps_per_sec": float(np.mean([r["steps_per_sec"] for r in records])) if records else None})  # fmt: skip
    return rows
