"""How accurate the recorder's sampled JSD is on maps from a trained model at 256 tokens (the paper's grid).

Trains a small SiT on the digits at 16×16 with patch 1 (256 tokens; a few hundred steps, enough for local and
global attention patterns to form), samples with the recorder keeping every layer's maps at four steps, and
compares the 2048-pair estimate (`analysis.metrics.RECORDING_JSD_PAIRS`, pairs drawn per map) with the exact
all-pairs mean: per map, and for the mean over the kept maps of each (step, layer), which is what a table row
holds. Writes the "jsd_accuracy" section of RESULTS.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.metrics import RECORDING_JSD_PAIRS, jsd_redundancy  # noqa: E402
from benchmarks.common import markdown_table, trained_map_payloads, write_section  # noqa: E402

# Fewer pairs than the recorder's default, for `attnmed record --jsd-pairs N`: the error each count costs.
FEWER_PAIRS = (512, 1024)


def main(steps: int = 300, samples: int = 8) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        payloads = trained_map_payloads(steps, samples, Path(tmp))
        rows, per_map = [], []
        by_count = {count: ([], []) for count in (*FEWER_PAIRS, RECORDING_JSD_PAIRS)}  # per-map, row-mean errors
        for payload in payloads:
            maps = payload["effective"].double()  # (samples, heads, 256, 256)
            exact = jsd_redundancy(maps, max_pairs=None)
            estimates = {count: jsd_redundancy(maps, max_pairs=count) for count in by_count}
            for count, (maps_errors, mean_errors) in by_count.items():
                maps_errors.append(((estimates[count] - exact).abs() / exact).flatten())
                mean_errors.append(abs(float(estimates[count].mean() / exact.mean()) - 1))
            estimate = estimates[RECORDING_JSD_PAIRS]
            relative = ((estimate - exact).abs() / exact).flatten()
            per_map.append(relative)
            rows.append(
                [
                    payload["step"],
                    payload["layer"],
                    f"{payload['noise_level']:.2f}",
                    f"{float(exact.mean()):.4f}",
                    f"{float(estimate.mean()):.4f}",
                    f"{abs(float(estimate.mean() / exact.mean()) - 1):.3%}",
                    f"{float(relative.max()):.2%}",
                ]
            )
    errors = torch.cat(per_map).numpy()
    summary = (
        f"Per map ({len(errors)} maps of 256 tokens): median error {np.median(errors):.2%}, 95th percentile "
        f"{np.percentile(errors, 95):.2%}, max {errors.max():.2%}. Mean over the {samples}×heads maps of a (step, "
        f"layer), what a table row holds: max error {max(float(r[5].rstrip('%')) for r in rows):.3f}%."
    )
    table = markdown_table(
        ["step", "layer", "noise", "exact JSD", f"{RECORDING_JSD_PAIRS}-pair JSD", "error of the mean", "worst map"],
        rows,
    )
    counts = []
    for count, (maps_errors, mean_errors) in by_count.items():
        pooled = torch.cat(maps_errors).numpy()
        counts.append(
            [
                count,
                f"{np.median(pooled):.2%}",
                f"{np.percentile(pooled, 95):.2%}",
                f"{pooled.max():.2%}",
                f"{max(mean_errors):.3%}",
            ]
        )
    count_table = markdown_table(
        ["pairs per map", "median error", "95th pct", "max", "error of a row's mean (worst)"], counts
    )
    body = (
        f"SiT-T/1 trained {steps} steps on the digits at 16×16 (256 tokens), SDE 20 steps, {samples} samples; "
        f"maps kept at four steps in every layer. {summary}\n\n{table}\n\n"
        f"With fewer pairs per map (`attnmed record --jsd-pairs N`; {RECORDING_JSD_PAIRS} is the default), on the "
        f"same maps (each count's pairs drawn per map from its contents):\n\n{count_table}"
    )
    print(body)
    write_section("jsd_accuracy", body)


if __name__ == "__main__":
    main()
