"""The prepared GPU check of the study at the paper's scale: DiT-XL/2 at 256 px, and a transformer of PixArt's
size at 1024 px, with random weights.

Times `attnmed record` over a few samples and steps with all measures (DiT-XL/2 at 256 tokens: 8 images × 50
guided steps; PixArt's size, DiT-XL/2's 28 layers, width 1152 and 16 heads on a 128×128 latent, 4096 tokens: 8
images × 20 guided steps, where JSD, entropy and cosine come from sampled query rows and the spectra from
sketches), and a sampling run that switches networks with a schedule, and reports wall-clock and peak GPU memory,
written as the "gpu_check" section of RESULTS.md. Random weights: the point is cost and memory, not findings. On a
CPU it runs at a toy scale (`--tiny`) so the script itself is tested; only a GPU run writes the section.

    python benchmarks/gpu_check.py            # on a GPU machine (a few minutes on one H100)
    python benchmarks/gpu_check.py --tiny     # the same plumbing with a tiny model, anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.cli import main as attnmed  # noqa: E402
from benchmarks.common import markdown_table, write_section  # noqa: E402
from mediator_models import build_model  # noqa: E402
from mediator_models.sampling.switching import MediatorSchedule  # noqa: E402


def timed(args: list[str]) -> tuple[float, float]:
    """(seconds, peak GPU memory in GB) of one attnmed command."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if attnmed(args) != 0:
        raise SystemExit(f"attnmed {' '.join(args)} failed")
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")
    return seconds, peak


def _stand_in_vae(folder: Path) -> Path:
    """A random AutoencoderKL with the SD VAE's 8× downsampling and 4 latent channels but 25k parameters: the
    samples are latents, which are decoded before they are written (nothing is downloaded, and the timing stays
    the transformer's)."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    ).save_pretrained(str(folder))
    return folder


def _checkpoint(path: Path, name: str, size: int, attention: str = "full", count: int | None = None) -> Path:
    """A random network saved self-describing, as `attnmed train` writes them."""
    torch.manual_seed(0)
    model = build_model(name, input_size=size, attention=attention, mediators=count)
    torch.save(
        {"model": model.state_dict(), "model_config": model.config.to_dict(), "process": {"family": "DiT"}}, path
    )
    return path


def run(tiny: bool, folder: Path) -> list[list[object]]:
    name, size = ("DiT-T/2", 8) if tiny else ("DiT-XL/2", 32)
    samples, steps, batch = (2, 4, 2) if tiny else (8, 50, 8)
    checkpoints = {
        "full": _checkpoint(folder / "full.pt", name, size),
        "med64": _checkpoint(folder / "med64.pt", name, size, "mediator", 16 if tiny else 64),
    }
    vae = _stand_in_vae(folder / "vae")
    common = ["--steps", str(steps), "--cfg-scale", "1.5"]
    rows = []
    # (label, checkpoint, samples, steps, batch, guidance, table)
    records = [(f"record {name} (all metrics, guided)", checkpoints["full"], samples, steps, batch, "1.5", "table")]
    large_size = 16 if tiny else 128  # 1024 px through an 8× VAE: 4096 tokens at patch 2
    large = _checkpoint(folder / "large.pt", name, large_size)
    large_label = f"record {name} @{large_size} ({(large_size // 2) ** 2} tokens, PixArt's size; all metrics, guided)"
    records.append((large_label, large, 2 if tiny else 8, 2 if tiny else 20, 2 if tiny else 8, "4.5", "large"))
    for label, checkpoint, count, record_steps, record_batch, guidance, table in records:
        seconds, peak = timed(
            [
                "record",
                "--ckpt",
                str(checkpoint),
                "--steps",
                str(record_steps),
                "--cfg-scale",
                guidance,
                "--samples",
                str(count),
                "--batch-size",
                str(record_batch),
                "--metrics",
                "all",
                "--out",
                str(folder / f"{table}.parquet"),
            ]
        )
        rows.append([label, count, record_steps, f"{seconds:.1f}", f"{peak:.1f}"])
    schedule = MediatorSchedule.from_boundaries([16 if tiny else 64, None], [0.5], name="n=64 then full")
    schedule.save(folder / "schedule.json")
    seconds, peak = timed(
        [
            "sample",
            "--ckpt",
            str(checkpoints["med64"]),
            "--ckpt",
            str(checkpoints["full"]),
            *common,
            "--num-samples",
            str(samples),
            "--batch-size",
            str(batch),
            "--schedule",
            str(folder / "schedule.json"),
            "--vae",
            str(vae),
            "--out",
            str(folder / "samples"),
        ]
    )
    gflops = json.loads((folder / "samples" / "samples.json").read_text())["gflops_per_image"]
    rows.append(
        [f"sample {name} with a schedule ({gflops:.0f} GFLOPs/image)", samples, steps, f"{seconds:.1f}", f"{peak:.1f}"]
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model: test the plumbing on any machine")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = run(options.tiny, Path(tmp))
    text = markdown_table(["check", "samples", "steps", "seconds", "peak GPU GB"], table)
    print(text)
    if torch.cuda.is_available() and not options.tiny:
        write_section("gpu_check", "Random weights; guidance 1.5 (4.5 at PixArt's size).\n\n" + text)
