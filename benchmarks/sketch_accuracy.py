"""How accurate the sketched spectral measures are on maps from a trained model, against the exact SVD.

Above `SKETCH_ABOVE_TOKENS` query rows the recorder's spectral measures (stable, energy, effective and numerical
rank) come from `completed_spectrum`: the top singular values from a randomized range finder, the rest of the
energy spread evenly. This trains a small SiT on the digits at 16×16 with patch 1 (256 tokens), keeps every layer's
maps at four sampling steps, and compares each measure from the Gram matrix's eigenvalues (what `singular_values`
computes in float64) and from sketches of rank 16, 32 and 64 (a sixteenth to a
quarter of the tokens: the recorder's sketch of 256 is a sixteenth at 4096 tokens) with the exact one, per map. Writes the "sketch_accuracy" section of RESULTS.md.

    python benchmarks/sketch_accuracy.py [--steps 300] [--samples 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.metrics import SPECTRAL_METRICS, completed_spectrum, gram_singular_values, measure  # noqa: E402
from benchmarks.common import markdown_table, trained_map_payloads, write_section  # noqa: E402

RANKS = (16, 32, 64)


def _share(error: float) -> str:
    """A relative error as a percentage, or in scientific notation where a percentage would print 0.00%."""
    return f"{error:.2%}" if error >= 5e-5 or error == 0 else f"{error:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--maps", type=Path, default=None, help="keep the trained maps here, and reuse them if there")
    args = parser.parse_args()
    if args.maps is not None and args.maps.exists():
        maps = torch.load(args.maps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            payloads = trained_map_payloads(args.steps, args.samples, Path(tmp))
            maps = torch.cat([p["effective"].double().flatten(0, 1) for p in payloads])
        if args.maps is not None:
            torch.save(maps, args.maps)
    started = time.perf_counter()
    exact = measure(maps, SPECTRAL_METRICS, sigma=torch.linalg.svdvals(maps))
    svd_seconds = time.perf_counter() - started
    routes = {"Gram (float64, all values)": lambda: gram_singular_values(maps)}
    # The sketches from float32 maps, as the recorder's maps are (the range finder runs in their precision).
    recorded = maps.float()
    routes.update({rank: lambda rank=rank: completed_spectrum(recorded, rank) for rank in RANKS})
    rows = []
    for rank, spectrum in routes.items():
        started = time.perf_counter()
        sketched = measure(maps, SPECTRAL_METRICS, sigma=spectrum())
        seconds = time.perf_counter() - started
        for name in SPECTRAL_METRICS:
            error = ((sketched[name] - exact[name]).abs() / exact[name].clamp_min(1e-12)).numpy()
            rows.append(
                [
                    rank,
                    name,
                    f"{float(exact[name].median()):.3g}",
                    _share(np.median(error)),
                    _share(np.percentile(error, 95)),
                    _share(error.max()),
                    f"{seconds:.2f}",
                ]
            )
    table = markdown_table(
        ["spectrum", "measure", "exact (median)", "median error", "95th pct", "max", "seconds (all measures)"],
        rows,
    )
    body = (
        f"SiT-T/1 trained {args.steps} steps on the digits at 16×16 (256 tokens), SDE 20 steps, {args.samples} "
        f"samples; {len(maps)} maps kept at four steps in every layer. Relative error per map of each measure from "
        "the eigenvalues of the float64 Gram matrix (the recorder's route up to 2048 tokens) and from the completed "
        f"sketched spectrum of the float32 maps (its route above) against the float64 SVD ({svd_seconds:.2f} s for all measures).\n\n"
        + table
    )
    print(body)
    write_section("sketch_accuracy", body)


if __name__ == "__main__":
    main()
