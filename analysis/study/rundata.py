"""Readers of a study's run folder (written by analysis.study.reproduce), for the report and the notebooks.

One home for knowing where a run keeps things, so the report reads a run folder without importing the
pipeline that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
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
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "final_loss": records[-1]["loss"] if records else None,
                    "steps_per_sec": float(np.mean([r["steps_per_sec"] for r in records])) if records else None,
                }
            )
    return rows


def read_sidecar(sample_folder: Path) -> dict:
    return json.loads((Path(sample_folder) / "samples.json").read_text())


def switch_table(sidecar: dict, levels: list[float], moves: int) -> pd.DataFrame:
    """One row per (sample, move) of a switching run: the evaluation index of the move and its noise level
    (NaN where the sample never made that move)."""
    rows = []
    for sample in sidecar.get("per_sample", []):
        for move in range(moves):
            step = sample["switch_steps"][move] if len(sample["switch_steps"]) > move else None
            rows.append(
                {
                    "index": sample["index"],
                    "move": move,
                    "step": step,
                    "noise_level": levels[step] if step is not None else np.nan,
                }
            )
    return pd.DataFrame(rows, columns=["index", "move", "step", "noise_level"])


def distance_table(sidecar: dict, levels: list[float]) -> pd.DataFrame:
    """One row per (sample, step) of an adaptive run: the rule's distance d_k on the state, the injected noise
    and the drift (the trace starts at the third evaluation, the first with two differences behind it)."""
    rows = []
    for sample in sidecar.get("per_sample", []):
        for offset, (state, noise, drift) in enumerate(sample.get("distances", [])):
            step = offset + 2
            rows.append(
                {
                    "index": sample["index"],
                    "step": step,
                    "noise_level": levels[step],
                    "state": state,
                    "noise": noise,
                    "drift": drift,
                }
            )
    return pd.DataFrame(rows, columns=["index", "step", "noise_level", "state", "noise", "drift"])


REFERENCE_RUNS = {"default": "figures/data", "paper-grid": "figures/paper-grid/data"}  # the committed reference runs


def notebook_data(data: str | Path | None, root: Path) -> Path:
    """The data folder a notebook reads: `data` (a folder, or a reference run's name: "default" or "paper-grid"),
    else the folder or name in the ATTNMED_DATA environment variable, else the default reference run."""
    import os

    chosen = data or os.environ.get("ATTNMED_DATA") or "default"
    if str(chosen) in REFERENCE_RUNS:
        return Path(root) / REFERENCE_RUNS[str(chosen)]
    return Path(chosen)


def study_of(data: Path) -> dict | None:
    """The study configuration a data folder's redundancy table was made by (None for a table made elsewhere)."""
    sidecar = Path(data) / "redundancy.parquet.json"
    return json.loads(sidecar.read_text()).get("study") if sidecar.exists() else None
