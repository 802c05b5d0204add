"""`attnmed reproduce --preset quick`: every stage end to end, consistent outputs, and a resumed rerun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.cli import main
from mediator_models.sampling.switching import MediatorSchedule


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
    # Two training seeds: the numbers stand, nothing is decided (a verdict needs three and an adjusted p).
    assert all(v == "–" or v.startswith("no verdict") for v in differences["verdict"])
    assert (differences["seeds"] == 2).all() and differences["p_holm"].dropna().between(0, 1).all()
    # Models of different training seeds differ; sampling seeds give every run the same noise.
    seed0 = np.load(run_dir / "samples" / "train0-sample0" / "full" / "samples.npz")["arr_0"]
    seed1 = np.load(run_dir / "samples" / "train1-sample0" / "full" / "samples.npz")["arr_0"]
    assert not np.array_equal(seed0, seed1)
    for path in (run_dir / "schedules").glob("*.json"):
        schedule = MediatorSchedule.load(path)  # validates that the intervals tile [0, 1]
        assert schedule.intervals[0].high == 1.0 and schedule.intervals[-1].low == 0.0
    for name in (
        "redundancy_heatmap_full",
        "redundancy_curves_full",
        "measures_by_noise",
        "attention_maps",
        "schedules",
        "fid_vs_gflops",
        "claims_forest",
        "samples_full",
    ):
        with Image.open(figures / f"{name}.png") as image:
            assert image.size[0] > 200 and image.size[1] > 100
            low, high = image.convert("L").getextrema()
            assert high - low > 50  # not blank
    report = (figures / "REPORT.md").read_text()
    assert "| claim (ECCV 2024, arXiv 2408.05710) | the paper's evidence (source) | this run" in report
    assert "data/differences.csv" in report and " tie" not in report.lower()
    assert "**Statistics.** The unit of replication is the training seed (2 here)" in report
    assert "Real-data floor:" in report and "no verdict is possible" in report and "bootstrap" not in report
    assert "The same study at ImageNet scale" in report
    sidecar = json.loads((run_dir / "samples" / "train0-sample0" / "adaptive-1-0.7" / "samples.json").read_text())
    assert sidecar["schedule"]["name"] == "adaptive ρ=1/0.7"
    # A rerun finds every stage done and only redraws the figures.
    stamp = (run_dir / "results.csv").stat().st_mtime_ns
    published = tmp_path / "published"
    assert main(["reproduce", "--preset", "quick", "--runs", str(runs), "--figures", str(published)]) == 0
    assert (run_dir / "results.csv").stat().st_mtime_ns == stamp
    assert (published / "REPORT.md").read_text() == report and (published / "data" / "results.csv").exists()


def test_the_default_study_keeps_its_run_folder_name_and_bad_paper_grid_options_are_refused():
    from analysis.study.reproduce import PRESETS, StudyConfig

    # Options added for the paper-grid study leave the key of a study that does not use them unchanged, so the
    # committed reference run (figures/, made before they existed) still names its folder.
    assert StudyConfig().key() == "65a1e1df79"
    assert (
        PRESETS["paper-grid"].key()
        != StudyConfig(**{**PRESETS["paper-grid"].to_dict(), "premise": False, "recovery_thresholds": ()}).key()
    )
    grid = PRESETS["paper-grid"]
    assert grid.image_size // int(grid.model.rsplit("/", 1)[1]) == 16  # the paper's 16×16 token grid
    assert grid.mediator_counts == grid.adaptive_counts == (4, 16, 64)
    with pytest.raises(ValueError, match="each ρ needs 2 values"):
        StudyConfig(adaptive_counts=(4, 16, 64), adaptive_ratios=((1.0,),))
    with pytest.raises(ValueError, match="unknown ablations"):
        StudyConfig(ablations=("no-mlp",))
    with pytest.raises(ValueError, match="time-matched controls copy adaptive runs"):
        StudyConfig(adaptive_ratios=(), time_matched_controls=True)
    with pytest.raises(ValueError, match="need premise=True"):
        StudyConfig(recovery_thresholds=(0.1,))


def test_a_time_matched_control_switches_every_sample_at_the_adaptive_runs_median_steps():
    from analysis.study.reproduce import time_matched_schedule

    levels = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    sidecar = {
        "per_sample": [
            {"switch_steps": [5, 7]},
            {"switch_steps": [5, 8]},
            {"switch_steps": [6]},
            {"switch_steps": [4, 7]},
            {"switch_steps": [5, 9]},
        ]
    }
    schedule = time_matched_schedule(sidecar, [4, 16, 64], levels, "control")
    # Move 1: steps 4,5,5,5,6 -> 5 (between levels 0.6 and 0.5); move 2: 7,7,8,9,never -> 8 (0.3 | 0.2).
    assert [(round(i.high, 2), round(i.low, 2), i.mediators) for i in schedule.intervals] == [
        (1.0, 0.55, 4),
        (0.55, 0.25, 16),
        (0.25, 0.0, 64),
    ]
    never = time_matched_schedule({"per_sample": [{"switch_steps": []}] * 3}, [4, 16], levels, "control")
    assert never.count_at(0.05) == 4  # nobody moved: the control never moves either


def test_paper_grid_comparisons_isolate_the_conv_the_mediators_and_per_sample_timing():
    from analysis.study.claims import comparisons
    from analysis.study.results import Run, RunKind

    runs = [
        Run(n, k)
        for n, k in (
            ("med4", RunKind.STATIC),
            ("med16", RunKind.STATIC),
            ("full", RunKind.STATIC),
            ("med16-noconv", RunKind.ABLATION),
            ("full-conv", RunKind.ABLATION),
            ("conv", RunKind.ABLATION),
            ("adaptive-1-0.9", RunKind.ADAPTIVE),
        )
    ]
    runs.append(Run("control-adaptive-1-0.9", RunKind.CONTROL, control_of="adaptive-1-0.9"))
    cells = pd.DataFrame({"run": [r.name for r in runs], "gflops_per_image": [1, 2, 3, 2, 3, 0.5, 1.5, 1.5]})
    pairs = {(run, label, claim) for run, _, label, claim in comparisons(runs, cells, "full")}
    assert ("med16", "med16-noconv", "the conv's part: mediators with vs without it") in pairs
    assert ("med16", "conv", "the mediators' part: mediators + conv vs the conv alone") in pairs
    assert (
        "adaptive-1-0.9",
        "control-adaptive-1-0.9",
        "per-sample switching vs the same switch steps for every sample",
    ) in pairs
    frontier = {run for run, _, claim in pairs if claim.startswith("dynamic")}
    assert frontier == {"adaptive-1-0.9", "control-adaptive-1-0.9"}  # ablations are not schedules


@pytest.mark.slow
def test_a_paper_grid_study_in_miniature_reports_ablations_adaptive_diagnostics_and_the_premise(tmp_path):
    from analysis.study.reproduce import StudyConfig, run_study

    config = StudyConfig(
        model="SiT-T/2",
        data="textures",
        mediator_counts=(4, 16),
        family_counts=(16,),
        exploratory_seeds=1,
        along_training=(0.5,),
        along_samples=20,
        train_steps=10,
        batch_size=8,
        sampler_steps=8,
        record_samples=2,
        fid_samples=20,
        train_seeds=(0, 1),
        sample_seeds=(0,),
        adaptive_ratios=((1.0,),),
        jsd_quantiles=(),
        bootstrap_replicates=20,
        kid_subset_size=8,
        ablations=("noconv", "full-conv", "conv"),
        adaptive_counts=(4, 16),
        adaptive_drift_ratios=((0.9,),),
        time_matched_controls=True,
        premise=True,
        recovery_thresholds=(0.1,),
        budget_of=(4,),
    )
    report = run_study("miniature", tmp_path, config=config)
    run_dir = report.parent.parent
    summary = pd.read_csv(run_dir / "results.csv").query("train_seed == 'all'").set_index("run")
    assert {
        "med16-noconv",
        "full-conv",
        "conv",
        "adaptive-1",
        "control-adaptive-1",
        "adaptive-drift-0.9",
        "derived-recovery0.1",
        "derived-budget4",
    } <= set(summary.index)
    assert "derived-jsd" not in summary.index  # no quantile thresholds where they are not asked for
    assert summary.loc["conv", "gflops_per_image"] < summary.loc["med4", "gflops_per_image"]
    assert (summary["seconds_per_image"] > 0).all()
    text = report.read_text()
    for heading in ("## Ablations", "## The adaptive rule, diagnosed", "## The premise"):
        assert heading in text
    switches = pd.read_csv(report.parent / "data" / "switches.csv")
    distances = pd.read_csv(report.parent / "data" / "distances.csv")
    assert set(switches["run"]) == set(distances["run"]) == {"adaptive-1", "adaptive-drift-0.9"}
    # the adaptive runs are exploratory: sampled at the first training seed only
    assert (distances["noise"] > 0).all() and len(distances) == 2 * 1 * 20 * (8 - 2)  # runs × cells × samples × steps
    # Seeds before variants: the claims family at both training seeds, everything else at the first only.
    cells = pd.read_csv(run_dir / "results.csv").query("train_seed != 'all'")
    seeds = cells.groupby("run")["train_seed"].apply(lambda s: sorted(set(s.astype(int))))
    assert {run for run, s in seeds.items() if s == [0, 1]} == {"med16", "full", "full-conv"}
    assert {run for run, s in seeds.items() if s == [0]} == set(seeds.index) - {"med16", "full", "full-conv"}
    assert not (run_dir / "train" / "seed1" / "med4").exists()
    differences = pd.read_csv(run_dir / "differences.csv")
    outside = differences["note"].fillna("").str.startswith("exploratory")
    assert set(differences[outside]["run"]) | set(differences[outside]["baseline"]) >= {"med4", "conv"}
    assert differences[outside]["p_value"].isna().all() and (differences[outside]["seeds"] == 1).all()
    # The claims family along training: its differences at step 5 (from the checkpoint) and at the end.
    along = pd.read_csv(report.parent / "data" / "along_training.csv")
    assert sorted(along["step"].unique()) == [5, 10] and set(along["metric"]) == {"fid", "fid_infinity"}
    assert {("med16", "full-conv"), ("med16", "full"), ("full-conv", "full")} == set(
        zip(along["run"], along["baseline"])
    )
    assert not along.duplicated(["run", "baseline", "step", "metric"]).any()
    final = along[(along["step"] == 10) & (along["metric"] == "fid")].set_index(["run", "baseline"])
    decided = differences[differences["metric"] == "fid"].set_index(["run", "baseline"])
    assert final.loc[("med16", "full-conv"), "difference"] == pytest.approx(
        decided.loc[("med16", "full-conv"), "difference"]
    )
    assert "## The claims along training" in text and (report.parent / "along_training.png").exists()
    assert "pixel matrix has numerical rank 256 of 256" in text  # the textures carry detail at 16×16
    for name in ("switch_steps", "switch_distance", "recovery_rank", "recovery_pooled"):
        assert (report.parent / f"{name}.png").exists()
    # The control switches every sample where the adaptive run's median sample did.
    control = json.loads((run_dir / "samples" / "train0-sample0" / "control-adaptive-1" / "samples.json").read_text())
    assert control["schedule"]["intervals"][0]["mediators"] == 4 and len(control["schedule"]["intervals"]) == 2


@pytest.mark.parametrize("published", ["figures", "figures/paper-grid"])
def test_the_committed_reports_are_what_the_committed_claims_code_makes_of_their_cells(tmp_path, published):
    """Re-deciding a copy of a published run from its per-cell rows reproduces its differences, its summary rows
    and its report byte for byte: the committed verdicts are the seed-level method's, nothing else."""
    import shutil

    from analysis.study.claims import cell_rows, redecide
    from analysis.study.report import real_floor

    root = Path(__file__).resolve().parents[1] / published
    copy = tmp_path / "run"
    shutil.copytree(root / "data", copy / "data")
    shutil.copy(root / "REPORT.md", copy / "REPORT.md")
    study = json.loads((root / "data" / "redundancy.parquet.json").read_text())["study"]
    cells = cell_rows(pd.read_csv(copy / "data" / "results.csv"))
    floor = real_floor(study.get("data", "digits"), study["image_size"], cells)
    redecide(copy / "data", floor)
    for name in ("data/differences.csv", "data/results.csv", "REPORT.md"):
        assert (copy / name).read_text() == (root / name).read_text(), name


def test_an_unusable_figures_folder_is_refused_before_any_work(tmp_path, capsys):
    from analysis.cli import main

    (tmp_path / "taken").write_text("a file where the figures would go")
    assert (
        main(["reproduce", "--preset", "quick", "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "taken")])
        == 2
    )
    assert f"--figures {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before the run folder, let alone training, began


def _bundle(tmp_path, runs, sidecars, levels):
    """A study's results with only what the adaptive diagnostics read filled in."""
    from analysis.study.config import StudyConfig
    from analysis.study.results import StudyResults

    empty = pd.DataFrame()
    return StudyResults(
        config=StudyConfig(train_seeds=(0,), sample_seeds=(0,)),
        preset="test",
        run_dir=tmp_path / "never-written",
        figures_dir=tmp_path / "report",
        levels=levels,
        adaptive_order=[4, None],
        trained=["med4", "full"],
        full_model={},
        runs=runs,
        sidecars=sidecars,
        table=empty,
        derived={},
        expected_gflops={},
        results=empty,
        differences=empty,
        seconds=0.0,
    )


def test_the_report_diagnoses_the_runs_that_are_adaptive_by_kind_from_the_sidecars_it_is_handed(tmp_path):
    from analysis.study.report import adaptive_diagnostics
    from analysis.study.results import Run, RunKind

    levels = [1.0, 0.75, 0.5, 0.25]
    sample = {"index": 0, "switch_steps": [2], "distances": [(0.5, 0.4, 0.1), (0.3, 0.2, 0.1)]}
    runs = [
        Run("full", RunKind.STATIC, base=None),
        Run("rule-on-the-state", RunKind.ADAPTIVE, ratios=(0.9,)),
        Run("adaptive-lookalike", RunKind.DERIVED),  # named like an adaptive run, derived all the same
        Run("rule-on-the-drift", RunKind.DRIFT_ADAPTIVE, ratios=(0.9,)),
    ]
    sidecars = {(0, 0, run.name): {"per_sample": [sample]} for run in runs}
    diagnostics = adaptive_diagnostics(_bundle(tmp_path, runs, sidecars, levels))
    # Only the kinds that switch per sample, in the study's order, and nothing read from the (absent) run folder.
    assert diagnostics["switches"]["run"].drop_duplicates().tolist() == ["rule-on-the-state", "rule-on-the-drift"]
    assert diagnostics["switches"][["step", "noise_level"]].iloc[0].tolist() == [2, 0.5]
    assert diagnostics["distances"]["step"].tolist() == [2, 3, 2, 3]
    assert not (tmp_path / "never-written").exists()


def test_runs_read_back_from_a_results_table_keep_their_kind_and_the_run_a_control_copies():
    from analysis.study.claims import runs_of
    from analysis.study.results import Run, RunKind

    results = pd.DataFrame(
        {
            "run": ["med4", "adaptive-1", "control-adaptive-1", "adaptive-1"],
            "schedule": ["static n=4", "adaptive ρ=1", "static at the median switch steps of ρ=1", "adaptive ρ=1"],
            "kind": ["static", "adaptive (paper's rule)", "time-matched control", "adaptive (paper's rule)"],
        }
    )
    assert runs_of(results) == [
        Run("med4", RunKind.STATIC, "static n=4"),
        Run("adaptive-1", RunKind.ADAPTIVE, "adaptive ρ=1"),
        Run("control-adaptive-1", RunKind.CONTROL, "static at the median switch steps of ρ=1", control_of="adaptive-1"),
    ]
    with pytest.raises(ValueError):
        runs_of(results.assign(kind="not a kind"))


def test_the_pipeline_and_the_report_find_a_run_folders_parts_in_one_place(tmp_path):
    from analysis.study import rundata

    run_dir = rundata.run_folder(tmp_path, "quick", "0123456789")
    assert run_dir == tmp_path / "reproduce-quick-0123456789"
    folder = rundata.sample_folder(run_dir, (1, 0), "med4")
    assert folder == run_dir / "samples" / "train1-sample0" / "med4"
    assert rundata.sidecar_path(folder) == folder / "samples.json"
    assert rundata.log_path(run_dir, 2, "full") == rundata.train_folder(run_dir, 2, "full") / "log.jsonl"
    assert rundata.final_checkpoint(run_dir, 2, "full", 60).name == "0000060.pt"
    # What the pipeline writes where rundata says, the readers find.
    rundata.log_path(run_dir, 0, "full").parent.mkdir(parents=True)
    rundata.log_path(run_dir, 0, "full").write_text('{"loss": 1.5, "steps_per_sec": 2.0}\n{"event": "resume"}\n')
    assert rundata.training_summary(run_dir, [0], ["full"]) == [
        {"model": "full", "seed": 0, "final_loss": 1.5, "steps_per_sec": 2.0}
    ]
    folder.mkdir(parents=True)
    rundata.sidecar_path(folder).write_text('{"num_samples": 3}')
    assert rundata.read_sidecar(folder) == {"num_samples": 3}


@pytest.mark.parametrize("published", ["figures", "figures/paper-grid"])
def test_the_decision_figures_draw_every_claim_and_number_every_run(published):
    """The forest plot has one row per comparison with its own test (aliases left out), in the report's order;
    the cost–quality plot numbers every run and explains each number in its key, so no label overprints."""
    from analysis import plots

    data = Path(__file__).resolve().parents[1] / published / "data"
    differences, results = pd.read_csv(data / "differences.csv"), pd.read_csv(data / "results.csv")
    forest = plots.claims_forest(differences)
    tested = differences[(differences["metric"] == "fid") & (differences["verdict"] != "–")]
    labels = [t.get_text() for t in forest.axes[0].get_yticklabels()]
    assert labels == [f"{r} − {b}" for r, b in zip(tested["run"], tested["baseline"])]
    figure = plots.tradeoff(results)
    key = figure.axes[1].texts[0].get_text().splitlines()
    runs = results[results["train_seed"].astype(str) == "all"]
    assert len(key) == len(runs) and all(line.strip().split()[0] == str(i) for i, line in enumerate(key, 1))


def test_the_premise_section_says_which_counts_tell_nothing_about_the_output():
    """At d = 32 (SiT-T/1: width 128, 4 heads) the n = 64 premise rows cannot speak to A·V, which has rank ≤ 32."""
    from analysis.study.report import premise_lines

    table = pd.read_parquet(Path(__file__).resolve().parents[1] / "figures/paper-grid/data/redundancy.parquet")
    text = "\n".join(premise_lines(table, {}, {}, head_dim=32))
    assert "Rows with n ≥ 32 (the head dimension: n = 64) say nothing about the output" in text
    assert "say nothing" not in "\n".join(premise_lines(table, {}, {}, head_dim=128))


def test_a_claims_difference_along_training_is_paired_per_seed_and_its_trend_named():
    from analysis.study.report import along_trend
    from analysis.study.reproduce import along_differences

    # med16 − full-conv per training seed: step 10 → +1, +3, +2 (mean +2); step 20 → −1, −2, −3 (mean −2).
    rows = []
    for step, gaps in ((10, (1.0, 3.0, 2.0)), (20, (-1.0, -2.0, -3.0))):
        for seed, gap in enumerate(gaps):
            base = 10.0 + seed + step
            rows += [
                {
                    "run": "full-conv",
                    "train_seed": seed,
                    "sample_seed": 0,
                    "step": step,
                    "fid": base,
                    "fid_infinity": base - 1,
                    "num_samples": 500,
                },
                {
                    "run": "med16",
                    "train_seed": seed,
                    "sample_seed": 0,
                    "step": step,
                    "fid": base + gap,
                    "fid_infinity": base - 1 + gap,
                    "num_samples": 500,
                },
            ]
    differences = pd.DataFrame(
        [
            {
                "claim": "mediators vs full attention with the same conv",
                "run": "med16",
                "baseline": "full-conv",
                "metric": "fid",
            }
        ]
        * 2  # a repeated comparison is followed once
    )
    along = along_differences(pd.DataFrame(rows), differences)
    assert len(along) == 4 and set(along["metric"]) == {"fid", "fid_infinity"}
    at = along[along["metric"] == "fid_infinity"].set_index("step")
    assert at.loc[10, "difference"] == pytest.approx(2.0) and at.loc[20, "difference"] == pytest.approx(-2.0)
    half_width = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, 2 df) × sd / √n; sd of (1, 3, 2) is 1
    assert at.loc[10, "high"] - at.loc[10, "difference"] == pytest.approx(half_width)
    assert at.loc[10, "per_seed"] == "+1 +3 +2"
    assert along_trend(at.reset_index()) == "changes sign (+2 → -2); every interval includes 0"  # ±2.48 at 3 seeds
    same_sign = at.reset_index().assign(difference=[1.0, 3.0], low=[-1.0, 0.5], high=[2.0, 5.0])
    assert along_trend(same_sign) == "grows (+1 → +3); the interval excludes 0 at step 20"
    assert along_trend(same_sign.assign(difference=[3.0, 1.0])).startswith("shrinks (+3 → +1)")


def test_the_study_design_options_are_checked_and_name_their_checkpoints():
    from analysis.study.config import PRESETS, StudyConfig

    grid = PRESETS["paper-grid"]
    assert grid.data == "textures" and len(grid.train_seeds) >= 5 and grid.fid_samples >= 1000
    assert grid.along_steps == (70, 140, 210) and grid.checkpoint_every == 70
    assert grid.exploratory_train_seeds == (0, 1)
    assert len(PRESETS["default"].train_seeds) >= 3 and "full-conv" in PRESETS["default"].ablations
    with pytest.raises(ValueError, match="must be among mediator_counts"):
        StudyConfig(family_counts=(64,))
    with pytest.raises(ValueError, match="fall on a whole step"):
        StudyConfig(train_steps=10, along_training=(0.33,))
    with pytest.raises(ValueError, match="exploratory_seeds must be"):
        StudyConfig(exploratory_seeds=4)
    with pytest.raises(ValueError, match="unknown study data"):
        StudyConfig(data="cifar")
