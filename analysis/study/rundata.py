"""The layout of a study's run folder (written by analysis.study.reproduce) and its readers, for the pipeline,
the report and the notebooks.

One home for knowing where a run keeps things: the pipeline writes and the report reads through the same
functions, so the report reads a run folder without importing the pipeline that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# ---- where a run keeps things --------------------------------------------------------------------------------


def run_folder(run_root: str | Path, preset: str, key: str) -> Path:
    """The run folder of a study: named by its preset and its configuration's key, so a changed study starts anew."""
    return Path(run_root) / f"reproduce-{preset}-{key}"


def study_path(run_dir: Path) -> Path:
    """The study configuration the run folder was made by."""
    return Path(run_dir) / "study.json"


def timings_path(run_dir: Path) -> Path:
    """Seconds of work per stage."""
    return Path(run_dir) / "timings.json"


def train_folder(run_dir: Path, seed: int, variant: str) -> Path:
    """Where one trained variant of one training seed keeps its checkpoints and its log."""
    return Path(run_dir) / "train" / f"seed{seed}" / variant


def final_checkpoint(run_dir: Path, seed: int, variant: str, steps: int) -> Path:
    """The checkpoint a variant's training ends with (mediator_models.train names them by step)."""
    return train_folder(run_dir, seed, variant) / "checkpoints" / f"{steps:07d}.pt"


def train_variant(config, seed: int, out: Path, *, attention: str, mediators, **settings) -> None:
    """Train one network of a study into `out` (resuming where a killed run stopped) on the study's one recipe:
    its model, data, image size, batch, steps, learning rate and EMA, logged every 50 steps. `settings`: the rest
    of TrainConfig (checkpoint cadence, the conv of an ablation, ...)."""
    from mediator_models.train import TrainConfig, checkpoint_paths, train

    cfg = TrainConfig(
        model=config.model,
        attention=attention,
        mediators=mediators,
        data=config.data,
        image_size=config.image_size,
        global_batch_size=config.batch_size,
        steps=config.train_steps,
        lr=config.lr,
        ema_decay=config.ema_decay,
        seed=seed,
        log_every=50,
        out=str(out),
        **settings,
    )
    train(cfg, resume=bool(checkpoint_paths(out)))


def log_path(run_dir: Path, seed: int, variant: str) -> Path:
    """A trained variant's loss and speed log (JSON lines)."""
    return train_folder(run_dir, seed, variant) / "log.jsonl"


def record_table_path(run_dir: Path, variant: str) -> Path:
    """A variant's recorded redundancy table (first training seed)."""
    return Path(run_dir) / "record" / f"{variant}.parquet"


def kept_maps_folder(run_dir: Path) -> Path:
    """The raw attention maps the recorder kept, one file per part of a (network, step, layer)."""
    return Path(run_dir) / "record" / "maps"


def schedules_folder(run_dir: Path) -> Path:
    """The derived schedules, one JSON file each."""
    return Path(run_dir) / "schedules"


def sample_folder(run_dir: Path, cell: tuple[int, int], run: str) -> Path:
    """Where a run keeps the samples of one (training seed, sampling seed) cell."""
    return Path(run_dir) / "samples" / f"train{cell[0]}-sample{cell[1]}" / run


def along_folder(run_dir: Path, cell: tuple[int, int], run: str, step: int) -> Path:
    """Samples of a run from its checkpoint at `step` along training (the claims family only)."""
    return Path(run_dir) / "samples" / f"train{cell[0]}-sample{cell[1]}" / f"step{step:07d}" / run


def along_path(run_dir: Path) -> Path:
    """The claims family's paired differences at each point along training."""
    return Path(run_dir) / "along_training.csv"


def sidecar_path(folder: Path) -> Path:
    """A sample folder's record of how its samples were made (mediator_models.sample writes it last)."""
    return Path(folder) / "samples.json"


def features_path(folder: Path, extractor_sha256: str) -> Path:
    """A sample folder's features under one extractor, cached beside the samples."""
    return Path(folder) / f"features-{extractor_sha256[:12]}.npy"


def results_path(run_dir: Path) -> Path:
    """Per-cell metrics and per-run summaries."""
    return Path(run_dir) / "results.csv"


def differences_path(run_dir: Path) -> Path:
    """The paired comparisons with their verdicts."""
    return Path(run_dir) / "differences.csv"


def data_folder(figures_dir: Path) -> Path:
    """The tables behind a published report's figures and verdicts, which the notebooks read."""
    return Path(figures_dir) / "data"


# ---- readers ---------------------------------------------------------------------------------------------------


def load_kept_maps(run_dir: Path) -> list[dict]:
    """The raw attention maps the recorder kept (first part of each (network, step, layer))."""
    return [torch.load(p, weights_only=False) for p in sorted(kept_maps_folder(run_dir).glob("*_part000.pt"))]


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


def training_summary(run_dir: Path, seeds, variants: list[str]) -> list[dict]:
    """One row per (variant, training seed): final logged loss and mean training speed."""
    rows = []
    for seed in seeds:
        for name in variants:
            records = read_log(log_path(run_dir, seed, name))
            if not records and not log_path(run_dir, seed, name).exists():
                continue  # an exploratory variant, not trained at this seed
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
    """How a sample folder's samples were made: its sampler, schedule, cost and per-sample records."""
    return json.loads(sidecar_path(sample_folder).read_text())


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
