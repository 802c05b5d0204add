"""Interventions: each replacement computes what it claims, `none` changes nothing, and bad requests are refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from analysis.cli import main
from analysis.collect import write_table
from analysis.intervene import (
    AttentionIntervention,
    GridConfig,
    InterventionConfig,
    Replacement,
    head_attention_macs,
    intervention_gmacs,
    measure_damage_correlations,
    pooled_mediator_output,
    run_intervention,
    run_intervention_grid,
    spearman,
    truncated_rank_output,
    window_mask,
    window_output,
)
from analysis.metrics import pooled_recovery_errors
from mediator_models.network.attention import AttentionMaps, explicit_maps, merge_heads
from mediator_models.network.config import ModelConfig, make_config
from mediator_models.sample import LoadedModel
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import StepInfo, start_batch

SDE = SamplerConfig(kind="sde", steps=6)


def grey_model():
    """A 4-layer SiT on a 4×4 token grid (16 tokens, 4 heads of width 32) drawing one-channel 8×8 images."""
    return tiny_model("SiT-T/2", input_size=8, in_channels=1)


def loaded(model=None) -> LoadedModel:
    return LoadedModel(grey_model() if model is None else model, ProcessConfig("SiT"), "memory", "digest")


def save_checkpoint(model, path):
    torch.save(
        {"model_config": model.config.to_dict(), "process": {"family": "SiT"}, "model": model.state_dict()}, path
    )
    return path


def job(replace: str, steps=(2, 4), layers=(1,), **changes) -> InterventionConfig:
    return InterventionConfig(replace=replace, steps=steps, layers=layers, **{"samples": 3, "batch_size": 2, **changes})


def qkv(batch=2, heads=3, tokens=16, width=8):
    return (torch.randn(batch, heads, tokens, width) for _ in range(3))


def states_and_final(model, sampler, indices, callback=None):
    """The state the network sees at every evaluation, and the final samples, of samples `indices`."""
    states = []

    def record(info: StepInfo):
        states.append(info.x.clone())
        return None if callback is None else callback(info)

    x_T, y, noise = start_batch(indices, 0, model.config, None, "cpu")
    final, _ = generate(model, ProcessConfig("SiT"), sampler, x_T, y, callback=record, noise_fn=noise)
    return states, final


# ---- the replaced outputs, on inputs whose answer is known --------------------------------------------------


def test_rank_one_of_a_uniform_map_is_the_map_itself():
    q, k, v = qkv()
    out = truncated_rank_output(torch.zeros_like(q), k, v, 1)  # q = 0: every row uniform, A has rank 1
    assert torch.allclose(out, v.mean(-2, keepdim=True).expand_as(v), atol=1e-6)


def test_a_rank_at_or_above_the_token_count_recovers_the_output():
    q, k, v = qkv()
    exact = explicit_maps(q, k, None) @ v
    for rank in (16, 40):
        assert torch.allclose(truncated_rank_output(q, k, v, rank), exact, atol=1e-5)
    assert not torch.allclose(truncated_rank_output(q, k, v, 2), exact, atol=1e-3)


def test_the_mediator_replacement_is_the_premise_measures_form():
    q, k, v = qkv()
    maps = explicit_maps(q, k, None)
    exact = maps @ v
    for count in (4, 16):
        replaced = pooled_mediator_output(q, k, v, count)
        error = (replaced - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))
        premise = pooled_recovery_errors(maps, q, k, v, (count,))[count]
        assert torch.allclose(error.double(), premise, atol=1e-5)


def test_window_zero_is_each_token_alone_and_a_full_window_is_full_attention():
    q, k, v = qkv()
    assert torch.allclose(window_output(q, k, v, 0), v, atol=1e-6)
    assert torch.allclose(window_output(q, k, v, 3), explicit_maps(q, k, None) @ v, atol=1e-5)
    mask = window_mask(4, 1)
    assert mask[5].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # (1, 1) and its 8 neighbours
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 4, 5]  # a corner has 3 neighbours


def test_the_hook_puts_the_mediator_form_into_the_chosen_heads_of_that_layer_only():
    model = grey_model()
    module = model.blocks[1].attn
    x = torch.randn(2, 16, model.config.hidden_size)
    seen = []
    module.map_observer = lambda maps: seen.append(maps)  # the module's own q, k, v
    with torch.no_grad():
        original = module(x)
        intervention = AttentionIntervention(model, Replacement.parse("mediator:4"), (0, 1), [1], heads=[0, 2])
        with intervention:
            intervention.callback(StepInfo(0, torch.zeros(2), 1.0, x))
            replaced = module(x)
    maps: AttentionMaps = seen[0]
    exact = maps.output()
    expected = exact.clone()
    expected[:, [0, 2]] = pooled_mediator_output(maps.queries, maps.keys, maps.values, 4)[:, [0, 2]]
    difference = (merge_heads(expected) - merge_heads(exact)) @ module.proj.weight.T  # proj is linear
    assert torch.allclose(replaced - original, difference, atol=1e-5)
    assert intervention.replaced == 1 and not module._forward_hooks  # the hook came off on exit


def test_share_cfg_gives_the_unconditional_half_the_conditional_halfs_output():
    model = grey_model()
    module = model.blocks[0].attn
    x = torch.randn(4, 16, model.config.hidden_size)  # [conditional ×2; unconditional ×2]
    with torch.no_grad():
        original = module(x)
        with AttentionIntervention(model, Replacement("share-cfg"), (0, 1), [0]) as intervention:
            intervention.callback(StepInfo(0, torch.zeros(4), 1.0, x))
            shared = module(x)
    assert torch.allclose(shared[:2], original[:2], atol=1e-6)
    assert torch.allclose(shared[2:], original[:2], atol=1e-6)


# ---- whole sampling runs -------------------------------------------------------------------------------------


def test_none_reproduces_the_unmodified_samples_bit_for_bit(tmp_path):
    from analysis.intervene import _paired_samples

    model = loaded()
    every = InterventionConfig("none", (0, 6), (0, 1, 2, 3), samples=3, batch_size=2)
    reference, intervened, _ = _paired_samples(model, SDE, every, progress=False)
    assert torch.equal(reference, intervened)
    report = run_intervention(model, SDE, every, tmp_path / "none", progress=False)
    assert [row["relative_error"] for row in report["per_sample"]] == [0.0, 0.0, 0.0]
    assert report["gflops"]["saved"] == 0.0


def test_a_full_rank_replacement_samples_what_the_unmodified_model_samples():
    model = grey_model()
    plain = states_and_final(model, SDE, [0, 1])[1]
    intervention = AttentionIntervention(model, Replacement("rank", 16), (0, 6), [0, 1, 2, 3])
    with intervention:
        replaced = states_and_final(model, SDE, [0, 1], intervention.callback)[1]
    assert intervention.replaced == 6 * 4  # every evaluation, every layer
    assert torch.allclose(replaced, plain, atol=1e-4) and not torch.equal(replaced, plain)


def test_reuse_previous_changes_only_the_steps_after_the_range_starts():
    model = grey_model()
    plain, plain_final = states_and_final(model, SDE, [0, 1])
    with AttentionIntervention(model, Replacement("reuse-previous"), (3, 5), [1, 2]) as intervention:
        reused, reused_final = states_and_final(model, SDE, [0, 1], intervention.callback)
    assert len(plain) == len(reused) == 6
    for index in range(4):  # what evaluation 3 sees was made before the range
        assert torch.equal(plain[index], reused[index]), index
    assert not torch.equal(plain[4], reused[4]) and not torch.equal(plain_final, reused_final)


def test_the_report_states_errors_with_intervals_feature_distances_and_flops(tmp_path):
    report = run_intervention(loaded(), SDE, job("mediator:4", samples=4), tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["relative_error"] == report["relative_error"]
    errors = [row["relative_error"] for row in report["per_sample"]]
    assert len(errors) == 4 and all(e > 0 for e in errors)
    summary = report["relative_error"]
    assert summary["mean"] == pytest.approx(sum(errors) / 4)
    assert summary["low"] < summary["mean"] < summary["high"] and summary["samples"] == 4
    assert report["feature_distance"]["extractor"].startswith("digits-cnn sha256")
    assert all(row["feature_distance"] >= 0 for row in report["per_sample"])
    # Hand count on 16 tokens, 4 heads of width 32, one layer, evaluations 2 and 3: full attention costs
    # 2·16²·32 = 16384 MACs per head, the 4-mediator form 4·4·16·32 + 16·32 = 8704.
    assert report["gflops"]["saved"] == pytest.approx(2 * 4 * (16384 - 8704) / 1e9)
    assert 0 < report["gflops"]["saved_share"] < 1


def test_the_flop_counts_by_hand():
    config = make_config("DiT-T/2", input_size=8)  # 16 tokens on a 4×4 grid, 4 heads of width 32
    assert head_attention_macs(Replacement("none"), config) == 2 * 16 * 16 * 32
    assert head_attention_macs(Replacement("mediator", 4), config) == 4 * 4 * 16 * 32 + 16 * 32
    assert head_attention_macs(Replacement("rank", 3), config) == 2 * 3 * 16 * 32
    # Radius 1 on a 4-wide grid: 2, 3, 3, 2 keys per row, so (2 + 3 + 3 + 2)² = 100 (query, key) pairs.
    assert head_attention_macs(Replacement("window", 1), config) == 2 * 100 * 32
    shared = intervention_gmacs(config, Replacement("share-cfg"), 5, 2, 4, guided=True)
    assert shared["attention_full"] == pytest.approx(2 * 16384 * 5 * 2 * 4 / 1e9)
    assert shared["saved"] == pytest.approx(shared["attention_full"] / 2)  # the unconditional rows are free


# ---- the command ---------------------------------------------------------------------------------------------


def cli(checkpoint, out, *extra):
    return main(
        ["intervene", "--ckpt", str(checkpoint), "--sampler-steps", "6", "--samples", "2", "--out", str(out), *extra]
    )


def test_the_command_writes_the_report_and_keeps_the_folder_to_one_configuration(tmp_path, capsys):
    checkpoint = save_checkpoint(grey_model(), tmp_path / "model.pt")
    out = tmp_path / "window"
    assert cli(checkpoint, out, "--replace", "window:1", "--steps", "1:5", "--layers", "0", "2", "--heads", "1") == 0
    printed = capsys.readouterr().out
    assert "relative error" in printed and "GFLOPs per image" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["intervention"]["replace"] == "window:1" and report["intervention"]["heads"] == [1]
    assert cli(checkpoint, out, "--replace", "window:2", "--steps", "1:5", "--layers", "0", "2") == 2
    err = capsys.readouterr().err
    assert "holds an intervention of another configuration" in err and "window:2" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replace", "rank:x", "--steps", "0:2", "--layers", "0"], "--replace takes none, rank:R, mediator:N"),
        (["--replace", "rank:2", "--steps", "4:9", "--layers", "0"], "--steps 4:9 lies outside this sampler's"),
        (["--replace", "rank:2", "--steps", "3:3", "--layers", "0"], "--steps 3:3 is empty"),
        (["--replace", "rank:2", "--steps", "0:2", "--layers", "4"], "--layers [4] do not exist"),
        (["--replace", "rank:2", "--steps", "0:2", "--layers", "0", "--heads", "9"], "--heads [9] do not exist"),
        (["--replace", "mediator:5", "--steps", "0:2", "--layers", "0"], "--replace mediator:5 needs a perfect"),
        (["--replace", "reuse-previous", "--steps", "0:2", "--layers", "0"], "--steps starts at 0"),
        (["--replace", "share-cfg", "--steps", "0:2", "--layers", "0"], "--replace share-cfg shares between"),
    ],
)
def test_refused_requests_name_the_flag_in_one_line(tmp_path, capsys, flags, message):
    checkpoint = save_checkpoint(grey_model(), tmp_path / "model.pt")
    assert cli(checkpoint, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnmed intervene: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_models_without_full_attention_are_refused(tmp_path, capsys):
    mediator = tiny_model("SiT-T/2", input_size=8, in_channels=1, attention="mediator", mediators=4)
    checkpoint = save_checkpoint(mediator, tmp_path / "mediator.pt")
    assert cli(checkpoint, tmp_path / "out", "--replace", "none", "--steps", "0:2", "--layers", "0") == 2
    assert "--ckpt holds SiT-T/2" in capsys.readouterr().err


def test_share_cfg_on_a_guided_latent_model_counts_half_the_attention_and_skips_the_digits_extractor(tmp_path):
    dit = LoadedModel(tiny_model("DiT-T/2", input_size=8), ProcessConfig("DiT"), "memory", "digest")
    sampler = SamplerConfig(kind="ddim", steps=4, cfg_scale=2.0)
    report = run_intervention(dit, sampler, job("share-cfg", steps=(0, 4), layers=(0, 3)), tmp_path, progress=False)
    assert all(row["relative_error"] > 0 for row in report["per_sample"])
    assert report["feature_distance"] is None and "no perceptual distance" in report["feature_distance_note"]
    # 4 evaluations × 2 layers × 4 heads, two rows each with guidance, of 2·16²·32 MACs: one row is saved.
    assert report["gflops"]["attention_full"] == pytest.approx(2 * 4 * 2 * 4 * 16384 / 1e9)
    assert report["gflops"]["saved"] == pytest.approx(4 * 2 * 4 * 16384 / 1e9)


def test_reuse_previous_delivers_the_previous_evaluations_output_throughout_the_range():
    model = grey_model()
    module = model.blocks[2].attn
    inputs = [torch.randn(2, 16, model.config.hidden_size) for _ in range(4)]
    outputs = []
    with torch.no_grad(), AttentionIntervention(model, Replacement("reuse-previous"), (2, 4), [2]) as intervention:
        for index, x in enumerate(inputs):
            intervention.callback(StepInfo(index, torch.zeros(2), 1.0, x))
            outputs.append(module(x))
        plain = [module.forward(x) for x in inputs[:2]]
    assert torch.allclose(outputs[2], outputs[1], atol=1e-6) and torch.allclose(outputs[3], outputs[1], atol=1e-6)
    assert torch.equal(outputs[1], plain[1]) and not torch.allclose(outputs[1], outputs[0])


# ---- a grid of interventions: which measure predicts the damage ------------------------------------------------


def planted_table(path, model_config, cells, evaluations=6, model_dict=None):
    """A redundancy table in which 'planted' equals each cell's damage at every step of its window (so its
    window average is the damage), 'negated' its negative, 'constant' one value, and head 0 rows say nothing."""
    import pandas as pd

    rows = []
    for cell in cells:
        (start, stop), layer, damage = cell["window"], cell["layer"], cell["relative_error"]["mean"]
        for step in range(start, stop):
            for metric, value in (("planted", damage), ("negated", -damage), ("constant", 0.5)):
                for head, mean in ((-1, value), (0, 7.0)):
                    rows.append(
                        dict(model=model_config.name, attention="full", mediators=0, network=model_config.label,
                             step=step, noise_level=1.0 - step / evaluations, model_time=0.0, layer=layer,
                             head=head, branch="all", metric=metric, mean=mean, std=0.0, count=2)
                    )  # fmt: skip
    rows[0]["step"] = evaluations - 1  # the table covers the sampler's evaluations exactly
    return write_table(pd.DataFrame(rows), path, {"model": model_dict or model_config.to_dict()})


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """One tiny model and its 2-window × 2-layer mediator:4 grid without a table."""
    model = loaded()
    grid = GridConfig("mediator:4", ("2",), (0, 2), samples=2, batch_size=2)
    report = run_intervention_grid(model, SDE, grid, tmp_path_factory.mktemp("grid"), progress=False)
    return model, grid, report


def test_the_grid_has_one_cell_per_window_and_layer_each_the_single_interventions_damage(grid_run, tmp_path):
    model, grid, report = grid_run
    assert [(tuple(c["window"]), c["layer"]) for c in report["cells"]] == [
        ((0, 3), 0),
        ((0, 3), 2),
        ((3, 6), 0),
        ((3, 6), 2),
    ]
    assert report["correlations"] is None and report["evaluations"] == 6
    single = run_intervention(model, SDE, grid.cell_job((3, 6), 2), tmp_path, progress=False)
    assert report["cells"][3]["relative_errors"] == [row["relative_error"] for row in single["per_sample"]]
    assert report["cells"][3]["relative_error"] == single["relative_error"]
    # One layer, 3 evaluations, 4 heads at 16384 − 8704 MACs saved each.
    assert report["cells"][3]["gflops_saved"] == pytest.approx(3 * 4 * (16384 - 8704) / 1e9)


def test_a_measure_equal_to_the_damage_has_rank_correlation_one(grid_run, tmp_path):
    model, grid, first = grid_run
    table = planted_table(tmp_path / "t.parquet", model.model.config, first["cells"])
    report = run_intervention_grid(model, SDE, grid, tmp_path / "out", table, progress=False)
    assert [c["relative_error"] for c in report["cells"]] == [c["relative_error"] for c in first["cells"]]
    by_name = {row["measure"]: row for row in report["correlations"]}
    assert by_name["planted"] == {"measure": "planted", "cells": 4, "rho": 1.0, "low": 1.0, "high": 1.0}
    assert by_name["negated"]["rho"] == -1.0 and by_name["negated"]["high"] == -1.0
    assert by_name["constant"]["rho"] is None and "constant" in by_name["constant"]["note"]
    assert report["correlations"][-1]["measure"] == "constant"  # sorted by |rho|, measures without one last
    assert report["cells"][0]["measures"]["planted"] == report["cells"][0]["relative_error"]["mean"]
    assert "bootstrap over cells" in report["interval"]


def test_spearman_and_its_bootstrap_interval_on_known_rankings():
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # one swap: 0.8
    assert spearman([1, 1, 2], [3, 2, 1]) == pytest.approx(-0.8660254)  # ties take their average rank
    damage = {(0, 1, layer): float(layer) for layer in range(8)}
    noisy = {cell: value + (0.5 if cell[2] % 2 else -0.5) * 3 for cell, value in damage.items()}
    (row,) = measure_damage_correlations({"noisy": noisy}, damage)
    assert row["low"] < row["rho"] < row["high"] <= 1 and row["cells"] == 8
    (few,) = measure_damage_correlations({"few": {(0, 1, 0): 1.0, (0, 1, 1): 2.0}}, damage)
    assert few["rho"] is None and "needs 3" in few["note"]


def grid_cli(checkpoint, out, *extra):
    return cli(checkpoint, out, "--replace", "mediator:4", "--grid", "--layers", "0", "1", *extra)


def test_the_grid_command_prints_the_measures_strongest_first(tmp_path, capsys):
    checkpoint = save_checkpoint(grey_model(), tmp_path / "model.pt")
    assert grid_cli(checkpoint, tmp_path / "g", "--windows", "0:3", "3:6") == 0
    cells = json.loads((tmp_path / "g" / "report.json").read_text())["cells"]
    config = ModelConfig.from_dict(torch.load(checkpoint)["model_config"])
    table = planted_table(tmp_path / "t.parquet", config, cells)
    capsys.readouterr()
    assert grid_cli(checkpoint, tmp_path / "g2", "--windows", "0:3", "3:6", "--table", str(table)) == 0
    printed = capsys.readouterr().out
    measures = [
        line.split()[0] for line in printed.splitlines() if line.split()[:1] in (["planted"], ["negated"], ["constant"])
    ]
    assert measures[2] == "constant" and set(measures[:2]) == {"planted", "negated"}
    assert "Spearman ρ" in printed and "GFLOPs saved" in printed


@pytest.mark.parametrize(
    "case, message",
    [
        ("other-model", "--table {table} was recorded from SiT-T/2"),
        ("other-steps", "--table {table} covers 4 evaluations, this sampler makes 6"),
    ],
)
def test_a_table_of_another_model_or_sampler_is_refused_before_sampling(tmp_path, capsys, case, message):
    model = grey_model()
    checkpoint = save_checkpoint(model, tmp_path / "model.pt")
    cells = [{"window": [0, 3], "layer": 0, "relative_error": {"mean": 0.1}}]
    other = make_config("SiT-T/2", input_size=16, in_channels=1, num_classes=10).to_dict()
    table = planted_table(
        tmp_path / "t.parquet",
        model.config,
        cells,
        evaluations=4 if case == "other-steps" else 6,
        model_dict=other if case == "other-model" else None,
    )
    assert grid_cli(checkpoint, tmp_path / "out", "--windows", "2", "--table", str(table)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnmed intervene: error: ") and message.format(table=table) in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--windows", "7"], "--windows 7: the sampler makes 6 evaluations"),
        (["--windows", "0:2", "2:2"], "--windows 2:2 is empty"),
        (["--windows", "0:3", "0:3"], "--windows repeats a window"),
        (["--windows", "2", "--steps", "0:2"], "--steps is one intervention's range"),
        ([], "--windows is required with --grid"),
    ],
)
def test_refused_grids_name_the_flag_in_one_line(tmp_path, capsys, flags, message):
    checkpoint = save_checkpoint(grey_model(), tmp_path / "model.pt")
    assert grid_cli(checkpoint, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnmed intervene: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_reuse_previous_grid_window_at_evaluation_zero_is_refused_naming_the_window(tmp_path, capsys):
    checkpoint = save_checkpoint(grey_model(), tmp_path / "model.pt")
    flags = ["--replace", "reuse-previous", "--grid", "--windows", "3", "--layers", "0"]
    assert cli(checkpoint, tmp_path / "out", *flags) == 2
    assert "--windows 0:2 starts at 0, where reuse-previous" in capsys.readouterr().err
    assert (
        cli(checkpoint, tmp_path / "out", "--replace", "none", "--steps", "0:2", "--layers", "0", "--windows", "2") == 2
    )
    assert "--windows belongs to a grid of interventions" in capsys.readouterr().err


def test_the_grid_windows_cut_the_evaluations_near_evenly():
    grid = GridConfig("none", ("4",), (0,))
    assert grid.step_windows(6) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert GridConfig("none", ("1",), (0,)).step_windows(6) == [(0, 6)]
