"""`attnmed graft-study` end to end at toy budgets: every network of every training seed, paired differences
that are the per-seed differences of the cells, derived schedules within the adaptive rule's measured GFLOPs,
a training-free error equal to the premise measure, and a rerun that finds every stage done."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.study.grafting import GRAFT_PRESETS, GraftStudyConfig, run_graft_study


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    runs = tmp_path_factory.mktemp("graft-study")
    report = run_graft_study("quick", runs)
    return runs, report


@pytest.mark.slow
def test_the_quick_grafting_study_samples_every_network_of_every_seed_and_writes_its_report(quick_study):
    runs, report = quick_study
    data = report.parent / "data"
    cells = pd.read_csv(data / "cells.csv")
    config = GRAFT_PRESETS["quick"]
    expected = {"full", "med4", "grafted-med4", "distill50-med4", "shared-med4", "shared-full"}
    expected |= {f"{n}-{kind}" for n in ("shared", "distill50") for kind in ("adaptive", "derived")}
    assert set(cells["run"]) == expected
    assert sorted(cells.groupby("run")["train_seed"].apply(sorted).iloc[0]) == list(config.train_seeds)
    assert np.isfinite(cells["fid"]).all()
    # A difference is the mean over training seeds of the per-seed differences of the cells.
    differences = pd.read_csv(data / "differences.csv")
    row = differences[(differences["run"] == "grafted-med4") & (differences["metric"] == "fid")].iloc[0]
    by_seed = cells.pivot(index="train_seed", columns="run", values="fid")
    assert row["difference"] == pytest.approx((by_seed["grafted-med4"] - by_seed["med4"]).mean(), rel=1e-9)
    assert row["baseline"] == "med4"
    # Mediators cost fewer GFLOPs than the full attention they replace, exactly as counted.
    gflops = cells.groupby("run")["gflops_per_image"].mean()
    assert gflops["grafted-med4"] < gflops["full"] and gflops["grafted-med4"] == gflops["med4"]
    # The derived schedule fits within what the adaptive rule spent on the same seed and network.
    for name, chosen in json.loads((data / "schedules.json").read_text()).items():
        seed, network = int(name.split("-")[0].removeprefix("seed")), name.split("-", 1)[1]
        spent = cells[(cells["train_seed"] == seed) & (cells["run"] == f"{network}-derived")]["gflops_per_image"]
        assert chosen["expected_gflops"] <= chosen["budget_gflops"] + 1e-9
        assert spent.iloc[0] == pytest.approx(chosen["expected_gflops"], rel=1e-6)
    # The training-free grafted layer makes the error the premise measure predicts.
    agreement = pd.read_csv(data / "agreement.csv")
    np.testing.assert_allclose(agreement["measured"], agreement["premise"], rtol=1e-4, atol=1e-6)
    text = report.read_text()
    assert "grafted-med4 − med4" in text and "What grafting costs" in text
    assert (report.parent / "graft_forest.png").exists() and (report.parent / "graft_fid_vs_gflops.png").exists()


@pytest.mark.slow
def test_a_rerun_of_the_grafting_study_finds_every_stage_done(quick_study, capsys):
    runs, report = quick_study
    data = report.parent / "data"
    before = {name: (data / name).read_text() for name in ("cells.csv", "differences.csv", "schedules.json")}
    capsys.readouterr()
    assert run_graft_study("quick", runs) == report
    said = capsys.readouterr().out
    assert "train " not in said and "sample " not in said and "graft " not in said
    assert {name: (data / name).read_text() for name in before} == before


def test_a_grafting_study_refuses_settings_it_cannot_compare():
    with pytest.raises(ValueError, match="focus 8 must be one of the counts"):
        GraftStudyConfig(focus=8)
    with pytest.raises(ValueError, match="needs 2 ratios"):
        GraftStudyConfig(adaptive_ratios=(1.0,))
    with pytest.raises(ValueError, match="at least two training seeds"):
        GraftStudyConfig(train_seeds=(0,))


def test_the_committed_grafting_study_is_what_the_tables_code_makes_of_its_cells():
    """The committed summary and paired differences (figures/graft) are recomputed from its per-cell rows: the
    published intervals and Holm verdicts are the seed-level method's, nothing else."""
    from pathlib import Path

    from analysis.study.grafting.tables import Comparison, differences, summarize

    data = Path(__file__).resolve().parents[1] / "figures" / "graft" / "data"
    cells = pd.read_csv(data / "cells.csv")
    summary = pd.read_csv(data / "summary.csv")
    published = pd.read_csv(data / "differences.csv")
    runs = dict(zip(summary["run"], summary["schedule"]))
    comparisons = [
        Comparison(row.run, row.baseline, row.claim)
        for row in published.drop_duplicates(["run", "baseline"]).itertuples()
    ]
    remade = differences(cells, comparisons)
    pd.testing.assert_frame_equal(summarize(cells, runs), summary, check_dtype=False, rtol=1e-12)
    pd.testing.assert_frame_equal(
        remade.drop(columns="per_seed"), published.drop(columns="per_seed"), check_dtype=False, rtol=1e-12
    )
    assert (remade["per_seed"] == published["per_seed"]).all()
    assert len(set(cells["train_seed"])) == 5 and (cells["num_samples"] == 1000).all()
