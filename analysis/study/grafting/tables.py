"""The grafting study's tables: per-run summaries and the paired differences over training seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.quality.stats import holm, per_seed_differences, seed_level_difference, seed_verdict
from analysis.study.claims import cell_values


@dataclass(frozen=True)
class Comparison:
    """One paired difference of the study: run − baseline over training seeds, and what it isolates."""

    run: str
    baseline: str
    question: str


def summarize(cells: pd.DataFrame, runs: dict[str, str]) -> pd.DataFrame:
    """Per run: the mean over training seeds of FID, FID∞ and GFLOPs per image, with the FID's 95% t-interval."""
    rows = []
    for run, schedule in runs.items():
        part = cells[cells["run"] == run]
        fid = seed_level_difference(part["fid"].tolist())
        rows.append(
            {
                "run": run,
                "schedule": schedule,
                "kind": _kind(run),
                "train_seed": "all",
                "fid": fid.point,
                "fid_low": fid.low,
                "fid_high": fid.high,
                "fid_infinity": float(part["fid_infinity"].mean()),
                "gflops_per_image": float(part["gflops_per_image"].mean()),
                "gflops_sd": float(part["gflops_per_image"].std(ddof=1)) if len(part) > 1 else 0.0,
                "num_samples": int(part["num_samples"].iloc[0]),
                "seeds": len(part),
            }
        )
    return pd.DataFrame(rows)


def _kind(run: str) -> str:
    if run.endswith(("-adaptive", "-derived")):
        return "schedule"
    if run in ("full", "shared-full"):
        return "full attention"
    return "static" if not run.startswith(("grafted", "distill")) else "grafted"


def differences(cells: pd.DataFrame, comparisons: list[Comparison]) -> pd.DataFrame:
    """Each comparison's paired seed-level difference on FID, FID∞ and GFLOPs, with Holm-adjusted verdicts on
    FID over the study's family of comparisons."""
    rows = []
    for comparison in comparisons:
        for metric in ("fid", "fid_infinity", "gflops_per_image"):
            values = {
                run: cell_values(cells[cells["run"] == run], metric) for run in (comparison.run, comparison.baseline)
            }
            per_seed = per_seed_differences(values[comparison.run], [(1.0, values[comparison.baseline])])
            difference = seed_level_difference(list(per_seed.values()))
            rows.append(
                {
                    "claim": comparison.question,
                    "run": comparison.run,
                    "baseline": comparison.baseline,
                    "metric": metric,
                    "difference": difference.point,
                    "low": difference.low,
                    "high": difference.high,
                    "p_value": difference.p_value,
                    "detectable": difference.detectable,
                    "seeds": difference.seeds,
                    "per_seed": " ".join(f"{v:+.4g}" for v in difference.per_seed),
                    "_difference": difference,
                }
            )
    table = pd.DataFrame(rows)
    fid = table["metric"] == "fid"
    table["p_holm"] = np.nan
    table.loc[fid, "p_holm"] = holm(table.loc[fid, "p_value"].tolist())
    table["verdict"] = [
        seed_verdict(row["_difference"], row["p_holm"], "fid") if row["metric"] == "fid" else "–"
        for _, row in table.iterrows()
    ]
    return table.drop(columns="_difference")
