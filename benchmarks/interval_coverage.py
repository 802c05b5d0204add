"""Coverage of the seed-level 95% intervals at each preset's design, with the variances of its committed run.

For every paired FID comparison of a committed run (figures/data, figures/paper-grid/data) the variance
components of its per-cell differences (between training seeds; within a seed: sampling seed and images) are
measured, and 4000 studies of the preset's design are simulated from them; the table gives the share whose
interval covers the true difference, with normal and with skewed (log-normal) seed effects: the median and the
range over the run's comparisons. Run: .venv/bin/python benchmarks/interval_coverage.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.quality.stats import simulate_coverage, variance_components  # noqa: E402
from analysis.study.claims import cell_rows, cell_values, comparisons, runs_of  # noqa: E402
from benchmarks.common import markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Each preset's committed run; its design (training seeds × sampling seeds per cell) is read from the run itself,
# so the simulation follows the run when the preset grows more seeds.
PRESETS = {"default": "figures/data", "paper-grid": "figures/paper-grid/data"}


def design_of(cells: dict) -> tuple[int, int]:
    """(training seeds, sampling seeds per training seed) of one run's per-cell values {(train, sample): value}."""
    by_seed: dict = {}
    for train_seed, sample_seed in cells:
        by_seed.setdefault(train_seed, set()).add(sample_seed)
    per_seed = {len(samples) for samples in by_seed.values()}
    if len(per_seed) != 1:
        raise ValueError(f"unbalanced design: sampling seeds per training seed {sorted(per_seed)}")
    return len(by_seed), per_seed.pop()


def coverage_rows(studies: int = 4000) -> list[list[object]]:
    rows = []
    for preset, folder in PRESETS.items():
        results = pd.read_csv(ROOT / folder / "results.csv")
        cells, runs = cell_rows(results), runs_of(results)
        fid = {run: cell_values(group, "fid") for run, group in cells.groupby("run")}
        normal, skewed, components, designs = [], [], [], set()
        for name, weights, _, _ in comparisons(runs, cells, "full"):
            shared = set.intersection(*(set(fid[run]) for run in (name, *weights)))  # as the claims pair them
            per_cell = {c: fid[name][c] - sum(w * fid[b][c] for b, w in weights.items()) for c in shared}
            seeds, sampling = design_of(per_cell)
            designs.add((seeds, sampling))
            between, within = variance_components(per_cell)
            if between + within == 0:  # the same images on both sides
                continue
            components.append((between, within))
            normal.append(simulate_coverage(between, within, seeds, sampling, studies))
            skewed.append(simulate_coverage(between, within, seeds, sampling, studies, seed_effects="skewed"))
        between, within = np.median(components, axis=0)
        rows.append(
            [
                preset,
                ", ".join(f"{seeds} × {sampling}" for seeds, sampling in sorted(designs)),
                len(normal),
                f"{between:.2f} / {within:.2f}",
                f"{np.median(normal):.3f} [{min(normal):.3f}, {max(normal):.3f}]",
                f"{np.median(skewed):.3f} [{min(skewed):.3f}, {max(skewed):.3f}]",
            ]
        )
    return rows


if __name__ == "__main__":
    header = [
        "preset",
        "training × sampling seeds",
        "comparisons",
        "median SD between / within seeds (FID)",
        "coverage, normal seed effects: median [range]",
        "coverage, skewed seed effects: median [range]",
    ]
    table = markdown_table(header, coverage_rows())
    print(table)
    write_section(
        "interval_coverage",
        table + "\n\nNominal 95%. Each comparison's variance components come from its committed per-cell FIDs; 4000 "
        "simulated studies each. The t-interval is exact for normal seed effects, whatever the within-seed noise; "
        "with skewed (log-normal) seed effects at these few seeds it under-covers (the last column: 83–89% on "
        "2026-12-08, against 95% nominal). With one sampling seed per training seed the within-seed part cannot be told apart and is read as 0. tests/test_stats.py checks 93–97% "
        "for med16 − full on both presets, and with FID computed from drawn features.",
    )
