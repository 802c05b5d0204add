"""The `attnmed` command line: tables print, bad input gives one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.cli import main


def test_models_lists_the_registry_with_params_and_gflops(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    xl = next(line for line in out.splitlines() if line.startswith("DiT-XL/2"))
    assert xl.split()[-2:] == ["675.1", "118.62"]
    assert "SiT-S/8" in out and "DiT-T/2" not in out


def test_flops_prints_the_count_and_its_breakdown(capsys):
    assert main(["flops", "SiT-S/2", "--attention", "mediator", "--mediators", "16", "--breakdown"]) == 0
    out = capsys.readouterr().out
    assert "blocks.attention" in out and out.strip().endswith("SiT-S/2 (mediator n=16) @32: 5.54 GFLOPs")


def test_bad_mediator_count_is_one_clear_error_line(capsys):
    assert main(["flops", "SiT-S/2", "--attention", "mediator", "--mediators", "15"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnmed flops: error: mediator count 15 is not a perfect square") and "9 or 16" in err


def test_checkpoint_that_does_not_match_the_model_is_one_clear_error(tmp_path, capsys):
    import torch

    from mediator_models import build_model

    official = tmp_path / "official.pt"
    torch.save(build_model("DiT-T/2", input_size=8).state_dict(), official)
    code = main(
        ["sample", "--ckpt", str(official), "--model", "DiT-T/4", "--input-size", "8", "--out", str(tmp_path / "s")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("attnmed sample: error: checkpoint does not match DiT-T/4") and "patch_size" in err


def test_flops_refuses_a_zero_input_size(capsys):
    assert main(["flops", "DiT-S/2", "--input-size", "0"]) == 2
    assert "--input-size must be a positive whole number, got 0" in capsys.readouterr().err


def _recorded_table(tmp_path):
    """A redundancy table recorded through the CLI from a small full-attention SiT (all metrics)."""
    import torch

    from mediator_models import build_model

    checkpoint = tmp_path / "sit.pt"
    torch.manual_seed(0)
    torch.save(build_model("SiT-T/2", input_size=8).state_dict(), checkpoint)
    table = tmp_path / "table.parquet"
    args = [
        "record",
        "--ckpt",
        str(checkpoint),
        "--model",
        "SiT-T/2",
        "--input-size",
        "8",
        "--steps",
        "6",
        "--samples",
        "2",
        "--batch-size",
        "2",
        "--metrics",
        "all",
        "--out",
        str(table),
    ]
    assert main(args) == 0
    return table


def test_schedule_command_derives_from_any_table_and_prints_the_cost(tmp_path, capsys):
    from mediator_models import make_config, model_gmacs
    from mediator_models.sampling.switching import MediatorSchedule

    table = _recorded_table(tmp_path)
    capsys.readouterr()
    out = tmp_path / "schedule.json"
    assert main(["schedule", str(table), "--counts", "1", "4", "full", "--tau", "0.99", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    schedule = MediatorSchedule.load(out)
    assert schedule.intervals[0].high == 1.0 and schedule.intervals[-1].low == 0.0
    assert "GFLOPs per image over the table's 6 steps" in printed and "static: n=1" in printed
    # The budget rule meets its budget: halfway between all-n=1 and all-full.
    low = 6 * model_gmacs("SiT-T/2", input_size=8, attention="mediator", mediators=1)
    high = 6 * model_gmacs("SiT-T/2", input_size=8)
    budget = (low + high) / 2
    assert (
        main(
            [
                "schedule",
                str(table),
                "--counts",
                "1",
                "4",
                "full",
                "--rule",
                "budget",
                "--budget-gflops",
                str(budget),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cost = float(capsys.readouterr().out.split("expected ")[1].split(" GFLOPs")[0])
    assert cost <= budget
    assert (
        main(
            [
                "schedule",
                str(table),
                "--counts",
                "1",
                "full",
                "--rule",
                "budget",
                "--budget-gflops",
                "0.0001",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "no schedule of" in capsys.readouterr().err
    assert make_config("SiT-T/2", input_size=8).num_tokens == 16


def test_plot_command_draws_the_figures_of_any_table(tmp_path, capsys):
    table = _recorded_table(tmp_path)
    capsys.readouterr()
    assert main(["plot", str(table), "--out", str(tmp_path / "figures")]) == 0
    written = capsys.readouterr().out.split()
    assert {p.rsplit("/", 1)[1] for p in written} == {
        "redundancy_heatmap_full.png",
        "redundancy_curves_full.png",
        "measures_by_noise.png",
    }
    assert main(["plot", str(table), "--metric", "gini", "--out", str(tmp_path / "f2")]) == 2


def test_flops_of_the_ablations_from_the_command_line(capsys):
    assert main(["flops", "SiT-S/2", "--attention", "mediator", "--mediators", "16", "--no-depthwise-conv"]) == 0
    assert main(["flops", "SiT-S/2", "--depthwise-conv"]) == 0
    assert main(["flops", "SiT-S/2", "--attention", "conv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" @")[0] for line in lines] == [
        "SiT-S/2 (mediator n=16, no conv)",
        "SiT-S/2 (full + conv)",
        "SiT-S/2 (conv only)",
    ]
    assert main(["flops", "SiT-S/2", "--attention", "conv", "--no-depthwise-conv"]) == 2
    assert "mixes no tokens" in capsys.readouterr().err


# ---- defects found by trying the newest features as a new user would ----------------------------------------

COMMITTED_TABLE = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "figures/data/redundancy.parquet")


def test_schedule_reads_the_committed_reference_table(tmp_path, capsys):
    """Published tables carry the study, not a record sidecar: the model is rebuilt from it."""
    out = tmp_path / "s.json"
    assert main(["schedule", COMMITTED_TABLE, "--counts", "4", "16", "full", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # the demo's SiT-T/2 at 16×16 over its 25 SDE evaluations: 25 × the forward GMACs (test_flops counts them)
    assert out.exists() and "static: n=4 1.294, n=16 1.333, full 1.377" in printed


def test_schedule_never_overwrites_its_table_nor_writes_into_a_folder(tmp_path, capsys):
    import shutil

    table = tmp_path / "table.parquet"
    shutil.copy(COMMITTED_TABLE, table)
    shutil.copy(COMMITTED_TABLE + ".json", str(table) + ".json")
    before = table.read_bytes()
    assert main(["schedule", str(table), "--counts", "4", "full", "--out", str(table)]) == 2
    assert "is the table being read" in capsys.readouterr().err and table.read_bytes() == before
    assert main(["schedule", str(table), "--counts", "4", "full", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_descending_jsd_thresholds_are_refused(tmp_path, capsys):
    args = ["schedule", COMMITTED_TABLE, "--rule", "jsd", "--counts", "4", "16", "full"]
    assert main([*args, "--thresholds", "0.017", "0.015", "--out", str(tmp_path / "s.json")]) == 2
    assert "must rise strictly" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--rule", "budget"], "--budget-gflops is needed by the budget rule"),
        (["--tau", "0.5"], "--tau is 0.5, but this table holds energy ranks at τ = 0.9, 0.99 only"),
        (["--rule", "recovery", "--epsilon", "2"], r"--epsilon is a relative error in \(0, 1\)"),
        (["--rule", "jsd", "--thresholds", "0.01"], "--thresholds gives 1 JSD thresholds, but 3 counts need 2"),
    ],
)
def test_schedule_settings_that_cannot_work_name_their_flag(tmp_path, capsys, flags, message):
    """The library names its parameter (SettingError); the command line names the flag that sets it."""
    import re

    out = tmp_path / "s.json"
    assert main(["schedule", COMMITTED_TABLE, "--counts", "4", "16", "full", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnmed schedule: error: ") and re.search(message, err), err
    assert not out.exists()


def test_a_table_with_missing_values_is_refused_rather_than_read_as_the_largest_count(tmp_path, capsys):
    """NaN compares false with every threshold, so a rule reading it would pick the largest count everywhere."""
    import numpy as np
    import pandas as pd

    table = pd.read_parquet(COMMITTED_TABLE)
    table.loc[(table["metric"] == "energy_rank_0.9") & (table["step"] == 3), "mean"] = np.nan
    damaged = tmp_path / "damaged.parquet"
    table.to_parquet(damaged)
    Path(str(damaged) + ".json").write_bytes(Path(COMMITTED_TABLE + ".json").read_bytes())
    assert main(["schedule", str(damaged), "--counts", "4", "full", "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "energy_rank_0.9 values are missing (NaN)" in err and "at steps [3]" in err


def test_a_closed_pipe_ends_the_listing_quietly(monkeypatch):
    """`attnmed models | head -1`: the reader is gone before the listing ends; no traceback, exit 0."""
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)
    assert main(["models", "--small"]) == 0
    closed.close()


def test_record_never_replaces_a_table_of_another_configuration(tmp_path, capsys):
    table = _recorded_table(tmp_path)  # 6 steps, all metrics
    before = table.read_bytes()
    again = ["record", "--ckpt", str(tmp_path / "sit.pt"), "--model", "SiT-T/2", "--input-size", "8"]
    again += ["--samples", "2", "--batch-size", "2", "--metrics", "all", "--out", str(table)]
    assert main([*again, "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "holds a table of another configuration" in err and "sampler:" in err and "name another --out" in err
    assert table.read_bytes() == before
    assert main([*again, "--steps", "6"]) == 0  # the same configuration remakes the same table
    Path(str(table) + ".json").unlink()
    assert main([*again, "--steps", "6"]) == 2
    assert "exists without a readable" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.lock"))  # no lock file left beside the table


def test_premise_measures_on_a_mediator_model_are_refused(tmp_path, capsys):
    import torch

    from mediator_models import build_model

    checkpoint = tmp_path / "med.pt"
    torch.save(build_model("SiT-T/2", input_size=8, attention="mediator", mediators=4).state_dict(), checkpoint)
    args = ["record", "--ckpt", str(checkpoint), "--model", "SiT-T/2", "--input-size", "8", "--attention"]
    args += ["mediator", "--mediators", "4", "--steps", "2", "--samples", "1", "--batch-size", "1"]
    assert main([*args, "--metrics", "cheap,recovery_rank_4", "--out", str(tmp_path / "t.parquet")]) == 2
    err = capsys.readouterr().err
    assert "--metrics names premise measures (recovery_rank_4), which measure full attention only" in err
    assert not (tmp_path / "t.parquet").exists()


def test_tables_that_are_no_tables_are_refused_naming_the_file(tmp_path, capsys):
    import pandas as pd

    pd.DataFrame({"step": [0], "value": [1.0]}).to_parquet(tmp_path / "other.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    for command in (
        ["schedule", "--counts", "4", "full", "--out", str(tmp_path / "s.json")],
        ["plot", "--out", str(tmp_path / "f")],
    ):
        name, *rest = command
        assert main([name, str(tmp_path), *rest]) == 2
        assert f"{tmp_path} is a folder; name the table file in it" in capsys.readouterr().err
        assert main([name, str(tmp_path / "other.parquet"), *rest]) == 2
        err = capsys.readouterr().err
        assert "other.parquet is not a redundancy table: it lacks the columns ['model', 'attention'" in err
        assert main([name, str(tmp_path / "text.parquet"), *rest]) == 2
        assert "text.parquet is not a readable parquet table" in capsys.readouterr().err


def test_paths_that_are_not_utf8_are_read_and_written(tmp_path):
    """A file name's bytes need not be UTF-8 on Linux; Python carries them escaped, pyarrow cannot take them. In a
    subprocess, as a user runs it: the printed paths are those bytes again."""
    import os
    import shutil
    import subprocess
    import sys

    table = tmp_path / os.fsdecode(b"t\xff.parquet")
    shutil.copy(COMMITTED_TABLE, table)
    shutil.copy(COMMITTED_TABLE + ".json", str(table) + ".json")
    schedule, figures = tmp_path / os.fsdecode(b"s\xfe.json"), tmp_path / os.fsdecode(b"f\xfd")
    for args in (["schedule", str(table), "--counts", "4", "full", "--out", str(schedule)], ["plot", str(table)]):
        run = subprocess.run(
            [sys.executable, "-m", "analysis.cli", *args, "--out", str(figures)][: None if args[0] == "plot" else -2],
            capture_output=True,
            env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
        )
        assert run.returncode == 0, run.stderr.decode(errors="replace")
        assert os.fsencode(str(schedule if args[0] == "schedule" else figures)) in run.stdout
    assert schedule.exists() and len(list(figures.glob("*.png"))) == 5  # a heat map per network, two more


def test_plot_titles_name_the_metric_drawn_and_refuse_what_cannot_be_drawn(tmp_path, capsys, monkeypatch):
    import numpy as np
    import pandas as pd

    from analysis import plots

    titles = {}
    real_save = plots.save

    def keep_title(fig, path):
        titles[Path(path).name] = fig.axes[0].get_title()
        real_save(fig, path)

    monkeypatch.setattr(plots, "save", keep_title)
    assert main(["plot", COMMITTED_TABLE, "--metric", "energy_rank_0.9", "--out", str(tmp_path / "f")]) == 0
    assert titles["redundancy_heatmap_full"].endswith(
        "full attention: energy rank (τ = 0.9) per layer and step (low = redundant; shared colour scale)"
    )
    assert "energy rank (τ = 0.9) of the product map" in titles["redundancy_heatmap_med16"]
    assert not any("JSD" in t for name, t in titles.items() if name.startswith("redundancy_heatmap"))

    table = pd.read_parquet(COMMITTED_TABLE)
    table.loc[table["metric"] == "jsd", "mean"] = np.nan
    nan_table = tmp_path / "nan.parquet"
    table.to_parquet(nan_table)
    assert main(["plot", str(nan_table), "--out", str(tmp_path / "g")]) == 2
    assert "jsd values are missing (NaN)" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_one_step_table_draws_its_points():
    import pandas as pd

    from analysis.plots import redundancy_curves

    table = pd.read_parquet(COMMITTED_TABLE)
    one_step = table[(table["step"] == 0) & (table["attention"] == "full")]
    fig = redundancy_curves(one_step, "jsd")
    lines = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("layer")]
    assert lines and all(line.get_marker() == "o" and len(line.get_xdata()) == 1 for line in lines)


def test_the_bound_is_recorded_and_read_by_the_recovery_rule(tmp_path, capsys):
    import pandas as pd
    import torch

    from mediator_models import build_model

    checkpoint = tmp_path / "sit.pt"
    torch.manual_seed(0)
    torch.save(build_model("SiT-T/2", input_size=8).state_dict(), checkpoint)
    table = tmp_path / "t.parquet"
    args = ["record", "--ckpt", str(checkpoint), "--model", "SiT-T/2", "--input-size", "8", "--steps", "3"]
    args += [
        "--samples",
        "2",
        "--batch-size",
        "2",
        "--metrics",
        "recovery_rank_4,recovery_bound_4",
        "--out",
        str(table),
    ]
    assert main(args) == 0
    rows = pd.read_parquet(table)
    layer_rows = rows[rows["head"] == -1].pivot_table(index=["step", "layer"], columns="metric", values="mean")
    assert (layer_rows["recovery_bound_4"] <= layer_rows["recovery_rank_4"] + 1e-9).all()
    out = tmp_path / "s.json"
    assert (
        main(
            [
                "schedule",
                str(table),
                "--counts",
                "4",
                "full",
                "--rule",
                "recovery",
                "--recovery-kind",
                "bound",
                "--epsilon",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.exists()
