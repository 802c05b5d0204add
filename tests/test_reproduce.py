"""`attnmed reproduce --preset quick`: every stage end to end, consistent outputs, and a resumed rerun."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.cli import main
from mediator_models.switching import MediatorSchedule


@pytest.mark.slow
def test_quick_study_runs_end_to_end_and_its_outputs_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a figures/ folder would appear if the study wrote one by default
    runs = tmp_path / "runs"
    assert main(["reproduce", "--preset", "quick", "--runs", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    figures = run_dir / "report"  # figures stay in the run folder unless --figures publishes them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    results = pd.read_csv(run_dir / "results.csv")
    cells = results[results["train_seed"].astype(str) != "all"]
    summary = results[results["train_seed"].astype(str) == "all"].set_index("run")
    assert len(summary) == 3 + 1 + 3  # static n=4, n=16, full; one adaptive; three derived
    assert len(cells) == 7 * 2  # every run in every (training seed, sampling seed) cell
    assert set(zip(cells["train_seed"].astype(int), cells["sample_seed"].astype(int))) == {(0, 0), (1, 0)}
    assert cells["fid"].notna().all() and (cells["gflops_per_image"] > 0).all() and (cells["nfe"] == 12).all()
    assert (summary["fid_low"] <= summary["fid"]).all() and (summary["fid"] <= summary["fid_high"]).all()
    assert summary.loc[["med4", "med16"], "gflops_per_image"].lt(summary.loc["full", "gflops_per_image"]).all()
    assert results["extractor_sha256"].nunique() == 1 and (cells["seconds_per_image"] > 0).all()
    differences = pd.read_csv(run_dir / "differences.csv")
    versus_full = differences[(differences["baseline"] == "full") & (differences["metric"] == "fid")]
    assert set(versus_full["run"]) == set(summary.index) - {"full"}
    assert set(differences["verdict"]) <= {"holds", "fails", "not reproduced here"}
    # Models of different training seeds differ; sampling seeds give every run the same noise.
    seed0 = np.load(run_dir / "samples" / "train0-sample0" / "full" / "samples.npz")["arr_0"]
    seed1 = np.load(run_dir / "samples" / "train1-sample0" / "full" / "samples.npz")["arr_0"]
    assert not np.array_equal(seed0, seed1)
    for path in (run_dir / "schedules").glob("*.json"):
        schedule = MediatorSchedule.load(path)  # validates that the intervals tile [0, 1]
        assert schedule.intervals[0].high == 1.0 and schedule.intervals[-1].low == 0.0
    for name in ("redundancy_heatmap_full", "redundancy_curves_full", "measures_by_noise", "attention_maps",
                 "schedules", "fid_vs_gflops", "samples_full"):  # fmt: skip
        with Image.open(figures / f"{name}.png") as image:
            assert image.size[0] > 200 and image.size[1] > 100
            low, high = image.convert("L").getextrema()
            assert high - low > 50  # not blank
    report = (figures / "REPORT.md").read_text()
    assert "| claim (ECCV 2024, arXiv 2408.05710) | the paper's evidence (source) | this run" in report
    assert "data/differences.csv" in report and " tie" not in report.lower()
    assert "The same study at ImageNet scale" in report
    sidecar = json.loads((run_dir / "samples" / "train0-sample0" / "adaptive-1-0.7" / "samples.json").read_text())
    assert sidecar["schedule"]["name"] == "adaptive ρ=1/0.7"
    # A rerun finds every stage done and only redraws the figures.
    stamp = (run_dir / "results.csv").stat().st_mtime_ns
    published = tmp_path / "published"
    assert main(["reproduce", "--preset", "quick", "--runs", str(runs), "--figures", str(published)]) == 0
    assert (run_dir / "results.csv").stat().st_mtime_ns == stamp
    assert (published / "REPORT.md").read_text() == report and (published / "data" / "results.csv").exists()
