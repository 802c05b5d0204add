"""The atlas of a finished study's full network: grids per kind, measures ranked by their damage, plans sampled on
every training seed and compared, paired, with the trained mediator networks."""

import json

import pandas as pd
import pytest

from analysis.study import rundata
from analysis.study.atlas import GRID_KINDS, Atlas, AtlasConfig
from analysis.study.config import StudyConfig
from analysis.study.reproduce import run_study

TINY_STUDY = StudyConfig(
    model="SiT-T/2",
    mediator_counts=(4,),
    train_steps=4,
    batch_size=8,
    sampler_steps=4,
    record_samples=2,
    fid_samples=12,
    train_seeds=(0, 1),
    sample_seeds=(0,),
    adaptive_ratios=(),
    jsd_quantiles=(),
    kid_subset_size=4,
)
TINY_ATLAS = AtlasConfig(table_samples=2, grid_samples=3, budgets_of=("med4",), plan_samples=12)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    run_study("tiny", root / "runs", config=TINY_STUDY)
    run_dir = rundata.run_folder(root / "runs", "tiny", TINY_STUDY.key())
    out = root / "atlas"
    Atlas(run_dir, out, TINY_ATLAS).run()
    return run_dir, out


@pytest.mark.slow
def test_every_kind_gets_a_grid_with_its_measures_ranked_against_the_damage(atlas):
    _, out = atlas
    correlations = pd.read_csv(out / "atlas.csv")
    assert set(correlations["kind"]) == set(GRID_KINDS)
    share = json.loads((out / "grids" / "share-cfg" / "report.json").read_text())
    assert share["sampler"]["cfg_scale"] == TINY_ATLAS.cfg_scale  # sharing needs two guidance branches
    for kind in GRID_KINDS:
        report = json.loads((out / "grids" / kind / "report.json").read_text())
        evaluations = TINY_STUDY.sampler_steps - (kind == "reuse")  # reuse from the second evaluation on
        assert len(report["cells"]) == evaluations * report["model"]["depth"]
        assert all(cell["relative_error"]["mean"] >= 0 for cell in report["cells"])
    assert "## Which measure predicts the damage" in (out / "atlas.md").read_text()


@pytest.mark.slow
def test_plans_run_on_every_seeds_full_network_within_their_budget_and_pair_with_the_study(atlas):
    run_dir, out = atlas
    plans = pd.read_csv(out / "plans.csv").set_index("run")
    assert {"plan-table-med4", "plan-table+grids-med4", "med4"} <= set(plans.index)
    results = pd.read_csv(run_dir / "results.csv")
    med4 = results[(results["run"] == "med4") & (results["train_seed"] != "all")]["gflops_per_image"].mean()
    for name in ("plan-table-med4", "plan-table+grids-med4"):
        row = plans.loc[name]
        assert row["seeds"] == len(TINY_STUDY.train_seeds)
        # what the hooks saved as they ran is what the plan expected, and within med4's budget
        assert row["gflops_per_image"] == pytest.approx(row["expected_gflops_per_image"], rel=1e-9)
        assert row["gflops_per_image"] <= med4 * (1 + 1e-9)
        assert row["low"] <= row["fid_minus_full"] <= row["high"]
    # the trained run's row is the study's own paired difference
    differences = pd.read_csv(run_dir / "differences.csv")
    study_row = differences.query("run == 'med4' and baseline == 'full' and metric == 'fid'").iloc[0]
    assert plans.loc["med4", "fid_minus_full"] == pytest.approx(study_row["difference"])


@pytest.mark.slow
def test_a_second_run_resumes_and_another_configuration_is_refused(atlas):
    run_dir, out = atlas
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
    Atlas(run_dir, out, TINY_ATLAS).run()  # everything is there: nothing is drawn again
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
    from mediator_models.storage.errors import ConfigurationMismatchError

    with pytest.raises(ConfigurationMismatchError, match="grid_samples"):
        Atlas(run_dir, out, AtlasConfig(table_samples=2, grid_samples=5, budgets_of=("med4",))).run()


def test_an_unfinished_study_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="study.json"):
        Atlas(tmp_path, tmp_path / "atlas")
