"""Plans: the greedy and the exact solver choose the known answers, a plan executes through the intervention hooks
with its GFLOPs counted from what ran, and plans of another model or sampler are refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_model

from analysis.cli import main
from analysis.collect import write_table
from analysis.intervene import (
    AttentionIntervention,
    PlanCell,
    PlanOption,
    Replacement,
    greedy_plan,
    load_plan,
    make_plan,
    milp_plan,
    plan_intervention,
    table_predictions,
)
from mediator_models.network.flops import config_gmacs
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import StepInfo, start_batch
from mediator_models.storage.errors import SettingError

SDE = SamplerConfig(kind="sde", steps=6)  # 6 evaluations
# The grey model: 16 tokens on a 4×4 grid, 4 heads of width 32, 4 layers. Per head and evaluation, full attention
# costs 2·16²·32 = 16384 MACs, mediator:4 4·4·16·32 + 16·32 = 8704, window:1 2·(2+3+3+2)²·32 = 6400, reuse 0.
SAVED = {"mediator:4": 4 * (16384 - 8704), "window:1": 4 * (16384 - 6400), "reuse-previous": 4 * 16384}


def grey_model():
    torch.manual_seed(0)
    return tiny_model("SiT-T/2", input_size=8, in_channels=1)


def save_checkpoint(model, path):
    torch.save(
        {"model_config": model.config.to_dict(), "process": {"family": "SiT"}, "model": model.state_dict()}, path
    )
    return path


def hand_table(path, config, values, sampler=SDE, evaluations=6):
    """A redundancy table whose head-average rows hold `values[metric][layer]` at every step (the step relations
    from evaluation 1 on, as the recorder records them); head 0 rows hold nonsense no plan may read."""
    rows = []
    for metric, by_layer in values.items():
        first = 1 if metric.startswith("step_") else 0
        for layer, value in by_layer.items():
            for step in range(first, evaluations):
                for head, mean in ((-1, value), (0, 9.0)):
                    rows.append(
                        dict(model=config.name, attention="full", mediators=0, network=config.label, step=step,
                             noise_level=1.0 - step / evaluations, model_time=0.0, layer=layer, head=head,
                             branch="all", metric=metric, mean=mean, std=0.0, count=2)
                    )  # fmt: skip
    provenance = {"model": config.to_dict(), "process": {"family": "SiT"}, "sampler": sampler.to_dict()}
    return write_table(pd.DataFrame(rows), path, provenance)


# Layer 0: only mediators are good enough; layer 1: the window; layer 2: reuse (alternating with mediators, since
# no window may reuse a reused output); layer 3: nothing.
VALUES = {
    "recovery_pooled_4": {0: 0.05, 1: 0.3, 2: 0.05, 3: 0.3},
    "local_mass_r1": {0: 0.5, 1: 0.95, 2: 0.5, 3: 0.5},
    "step_output_rel_l1": {0: 0.5, 1: 0.5, 2: 0.01, 3: 0.5},
}
EXPECTED = {
    0: ["mediator:4"] * 6,
    1: ["window:1"] * 6,
    2: ["mediator:4", "reuse-previous"] * 3,
    3: ["full"] * 6,
}


def hand_saved_gmacs() -> float:
    """The GMACs per image the EXPECTED plan saves, counted cell by cell."""
    return sum(SAVED.get(method, 0) for methods in EXPECTED.values() for method in methods) / 1e9


def by_layer(plan) -> dict[int, list[str]]:
    methods: dict[int, list[str]] = {}
    for cell in sorted(plan["cells"], key=lambda c: (c["layer"], c["steps"])):
        methods.setdefault(cell["layer"], []).append(cell["method"])
    return methods


# ---- the solvers -----------------------------------------------------------------------------------------------


def test_greedy_takes_per_cell_the_cheapest_method_within_the_error_budget(tmp_path):
    config = grey_model().config
    table = hand_table(tmp_path / "t.parquet", config, VALUES)
    plan = make_plan([table], budget_error=0.1)
    assert by_layer(plan) == EXPECTED
    assert plan["methods"] == ["full", "mediator:4", "window:1", "reuse-previous"]
    full = 6 * config_gmacs(config)
    assert plan["gflops_per_image"]["full"] == pytest.approx(full)
    assert plan["gflops_per_image"]["expected"] == pytest.approx(full - hand_saved_gmacs())
    reuse = next(c for c in plan["cells"] if c["layer"] == 2 and c["steps"] == [1, 2])
    assert reuse["predicted_error"] == pytest.approx(0.01) and reuse["predicted_by"] == "table step_output_rel_l1"
    window = next(c for c in plan["cells"] if c["layer"] == 1 and c["steps"] == [0, 1])
    assert window["predicted_error"] == pytest.approx(0.05) and window["predicted_by"] == "table 1 − local_mass_r1"
    assert plan["sources"][0]["sha256"] and plan["sampler"] == SDE.to_dict() and plan["budget"] == {"error": 0.1}
    # A budget of 0 admits full attention only; a budget of 1 the cheapest method of each cell.
    assert set(make_plan([table], budget_error=0.0)["methods_used"]) == {"full"}
    loose = by_layer(make_plan([table], budget_error=1.0))
    assert loose[3] == ["window:1"] + ["reuse-previous", "window:1"] * 2 + ["reuse-previous"]


def test_table_predictions_average_windows_branches_and_bound_reuse_by_the_summed_step_changes():
    rows = []
    for step in range(4):
        for branch, pooled in (("cond", 0.1), ("uncond", 0.3)):
            rows.append(dict(step=step, layer=0, head=-1, branch=branch, metric="recovery_pooled_4", mean=pooled))
            rows.append(dict(step=step, layer=0, head=-1, branch=branch, metric="local_mass_r1", mean=0.6 + step / 10))
            if step:
                rows.append(dict(step=step, layer=0, head=-1, branch=branch, metric="step_output_rel_l1", mean=step))
        rows.append(dict(step=step, layer=0, head=-1, branch="cond-uncond", metric="branch_output_rel_l1", mean=0.25))
    table = pd.DataFrame(rows)
    methods = ["mediator:4", "window:1", "reuse-previous", "share-cfg"]
    got = table_predictions(table, [(0, 2), (2, 4)], [0], methods)
    assert got[(0, 2, 0, "mediator:4")][0] == pytest.approx(0.2)  # the branches' mean
    assert got[(2, 4, 0, "window:1")][0] == pytest.approx(1 - 0.85)  # 1 − the window's mean local mass
    assert got[(0, 2, 0, "share-cfg")][0] == pytest.approx(0.25)
    # Evaluation 1's output delivered at 2 and 3: errors bounded by 2 and 2 + 3, averaged.
    assert got[(2, 4, 0, "reuse-previous")][0] == pytest.approx((2 + 5) / 2)
    assert (0, 2, 0, "reuse-previous") not in got  # step 0 has no previous evaluation


def options(*triples):
    return tuple(PlanOption(method, error, saved, "hand") for method, error, saved in (("full", 0.0, 0.0), *triples))


def test_the_integer_program_finds_the_known_optimum_within_the_gflops_budget():
    cells = [
        PlanCell((0, 1), 0, options(("a", 0.3, 10.0), ("b", 0.1, 6.0))),
        PlanCell((0, 1), 1, options(("a", 0.2, 10.0), ("b", 0.05, 4.0))),
    ]
    # At most 86 of 100: save ≥ 14. Feasible pairs: (a, b) 0.35, (b, a) 0.30, (a, a) 0.50: the optimum is (b, a),
    # which greedy by error could not find (no per-cell threshold gives it).
    chosen, status = milp_plan(cells, 100.0, 86.0)
    assert [o.method for o in chosen] == ["b", "a"] and status.startswith("optimal")
    assert 100.0 - sum(o.saved for o in chosen) <= 86.0
    chosen, _ = milp_plan(cells, 100.0, 90.0)  # save ≥ 10: (b, b) at 0.15 beats (full, a) at 0.2
    assert [o.method for o in chosen] == ["b", "b"]
    assert [o.method for o in milp_plan(cells, 100.0, 100.0)[0]] == ["full", "full"]
    with pytest.raises(SettingError) as refused:
        milp_plan(cells, 100.0, 79.0)  # the cheapest plan, (a, a), costs 80
    assert refused.value.setting == "budget_gflops" and "cheapest plan the options allow (80" in refused.value.reason


def test_ties_in_error_go_to_the_cheaper_plan_and_no_layer_reuses_a_reused_output():
    free = [PlanCell((0, 1), 0, options(("free", 0.0, 5.0)))]
    assert [o.method for o in milp_plan(free, 100.0, 100.0)[0]] == ["free"]
    first, later = (
        options(("reuse-previous", 0.0, 10.0), ("m", 0.3, 5.0)),
        options(("reuse-previous", 0.0, 10.0), ("m", 0.2, 5.0)),
    )
    cells = [PlanCell((1, 2), 0, first), PlanCell((2, 3), 0, later), PlanCell((2, 3), 1, later)]
    # Save ≥ 25: reuse twice, never in both windows of layer 0; (reuse, m, reuse) at 0.2 beats (m, reuse, reuse).
    chosen, _ = milp_plan(cells, 100.0, 75.0)
    assert [o.method for o in chosen] == ["reuse-previous", "m", "reuse-previous"]
    assert [o.method for o in greedy_plan(cells, 1.0)] == ["reuse-previous", "m", "reuse-previous"]


def test_a_gflops_budget_plan_from_a_table_respects_the_budget_and_least_error(tmp_path):
    config = grey_model().config
    table = hand_table(tmp_path / "t.parquet", config, VALUES)
    full = 6 * config_gmacs(config)
    # Saving one layer's mediator:4 over all 6 evaluations, and no more: the least error does it in layer 0 or 2.
    budget = full - 6 * SAVED["mediator:4"] / 1e9
    plan = make_plan([table], budget_gflops=budget)
    # The least error that saves as much: reuse in layer 2 (0.01 for 4·16384 MACs each) at evaluations 1, 3 and 5
    # (never twice in a row) saves 3·65536 ≥ 6·30720 for 0.03; two reuses and anything else cost at least 0.12.
    assert by_layer(plan) == {0: ["full"] * 6, 1: ["full"] * 6, 2: ["full", "reuse-previous"] * 3, 3: ["full"] * 6}
    assert plan["predicted_error"]["sum"] == pytest.approx(0.03)
    assert plan["gflops_per_image"]["expected"] == pytest.approx(full - 3 * SAVED["reuse-previous"] / 1e9)
    assert plan["gflops_per_image"]["expected"] <= budget and plan["solver_status"].startswith("optimal")
    exact = make_plan([table], budget_gflops=full)
    assert set(exact["methods_used"]) == {"full"} and exact["predicted_error"]["sum"] == 0.0


def test_the_integer_program_beats_or_matches_greedy_at_greedys_own_cost(tmp_path):
    config = grey_model().config
    table = hand_table(tmp_path / "t.parquet", config, VALUES)
    greedy = make_plan([table], budget_error=0.1)
    exact = make_plan([table], budget_gflops=greedy["gflops_per_image"]["expected"] * (1 + 1e-12))
    assert exact["predicted_error"]["sum"] <= greedy["predicted_error"]["sum"] + 1e-12
    assert exact["gflops_per_image"]["expected"] <= greedy["gflops_per_image"]["expected"] * (1 + 1e-12)


def test_a_grids_measured_damage_predicts_the_cells_it_covers(tmp_path):
    config = grey_model().config
    table = hand_table(tmp_path / "t.parquet", config, VALUES)
    report = {
        "model": config.to_dict(),
        "process": {"family": "SiT", "interpolant": "linear", "prediction": "velocity", "loss_weight": None},
        "sampler": SDE.to_dict(),
        "weights": "w",
        "grid": {"replace": "mediator:4", "heads": None},
        "cells": [
            {"window": [0, 3], "layer": 0, "relative_error": {"mean": 0.5}},
            {"window": [3, 6], "layer": 0, "relative_error": {"mean": 0.01}},
        ],
    }
    grid = tmp_path / "report.json"
    grid.write_text(json.dumps(report))
    plan = make_plan([table, grid], budget_error=0.1)
    cells = {(tuple(c["steps"]), c["layer"]): c for c in plan["cells"]}
    assert sorted({w for w, _ in cells}) == [(0, 3), (3, 6)]  # the grid's windows
    assert cells[((0, 3), 0)]["method"] == "full"  # the table says 0.05, the grid measured 0.5
    assert cells[((3, 6), 0)]["method"] == "mediator:4"
    assert cells[((3, 6), 0)]["predicted_by"] == f"grid damage {grid}"
    assert cells[((0, 3), 1)]["predicted_by"] == "table 1 − local_mass_r1"  # no grid there: the table


# ---- execution ---------------------------------------------------------------------------------------------------


def final_samples(model, callback=None, indices=(0, 1)):
    x_T, y, noise = start_batch(list(indices), 0, model.config, None, "cpu")
    return generate(model, ProcessConfig("SiT"), SDE, x_T, y, callback=callback, noise_fn=noise)


def plan_of(cells, config):
    return {
        "cells": [{"steps": list(w), "layer": layer, "method": m} for (w, layer), m in cells.items()],
        "model": config.to_dict(),
    }


def test_a_plan_runs_what_the_single_intervention_runs():
    model = grey_model()
    with AttentionIntervention(model, Replacement("mediator", 4), (2, 4), [1]) as single:
        expected, _ = final_samples(model, single)
    plan = plan_of({((0, 2), 1): "full", ((2, 4), 1): "mediator:4"}, model.config)
    with plan_intervention(model, plan) as planned:
        got, caller = final_samples(model, planned)
    assert torch.equal(got, expected) and planned.replaced == 2
    saved = planned.saved_gmacs_per_image
    assert saved == pytest.approx(2 * SAVED["mediator:4"] / 1e9)
    assert float(caller.gflops[0]) == pytest.approx(6 * config_gmacs(model.config))  # the network's own count


def test_reuse_after_a_replaced_evaluation_delivers_that_replacement():
    model = grey_model()
    module = model.blocks[2].attn
    inputs = [torch.randn(2, 16, model.config.hidden_size) for _ in range(3)]
    cells = {(1, 2): Replacement("mediator", 4), (2, 2): Replacement("reuse-previous")}
    outputs = []
    with torch.no_grad(), AttentionIntervention.from_cells(model, cells) as intervention:
        for index, x in enumerate(inputs):
            intervention.callback(StepInfo(index, torch.zeros(2), 1.0, x))
            outputs.append(module(x))
        plain = module.forward(inputs[1])
    assert not torch.allclose(outputs[1], plain, atol=1e-4)  # evaluation 1 ran the mediator form
    assert torch.equal(outputs[2], outputs[1])  # and evaluation 2 delivers it, not the exact output
    # Mediator 4 at one evaluation, reuse at the next, on 2 rows for 2 images: per image the two savings.
    assert intervention.saved_gmacs_per_image == pytest.approx((SAVED["mediator:4"] + SAVED["reuse-previous"]) / 1e9)


def sample_cli(checkpoint, out, *extra):
    return main(
        ["sample", "--ckpt", str(checkpoint), "--steps", "6", "--num-samples", "3", "--batch-size", "2"]
        + ["--out", str(out), *extra]
    )


def plan_cli(table, out, *extra):
    return main(["plan", str(table), "--out", str(out), *extra])


@pytest.fixture()
def made(tmp_path):
    model = grey_model()
    checkpoint = save_checkpoint(model, tmp_path / "model.pt")
    table = hand_table(tmp_path / "t.parquet", model.config, VALUES)
    return model, checkpoint, table


def test_a_plan_of_full_attention_everywhere_samples_bit_for_bit_what_plain_sampling_does(made, tmp_path):
    model, checkpoint, table = made
    assert plan_cli(table, tmp_path / "full.json", "--budget-error", "0") == 0
    plan = load_plan(tmp_path / "full.json")
    assert set(plan["methods_used"]) == {"full"}
    plain, _ = final_samples(model)
    with plan_intervention(model, plan) as planned:
        planned_samples, _ = final_samples(model, planned)
    assert torch.equal(plain, planned_samples) and planned.replaced == 0
    assert sample_cli(checkpoint, tmp_path / "plain") == 0
    assert sample_cli(checkpoint, tmp_path / "planned", "--plan", str(tmp_path / "full.json")) == 0
    a, b = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("plain", "planned"))
    assert np.array_equal(a, b)
    costs = [
        json.loads((tmp_path / name / "samples.json").read_text())["gflops_per_image"] for name in ("plain", "planned")
    ]
    assert costs[0] == costs[1] == pytest.approx(6 * config_gmacs(model.config))


def test_a_sampled_plans_counted_gflops_equal_the_hand_count(made, tmp_path, capsys):
    model, checkpoint, table = made
    assert plan_cli(table, tmp_path / "plan.json", "--budget-error", "0.1") == 0
    printed = capsys.readouterr().out
    assert "mediator:4 9" in printed and "reuse-previous 3" in printed and "expected GFLOPs per image" in printed
    assert sample_cli(checkpoint, tmp_path / "s", "--plan", str(tmp_path / "plan.json")) == 0
    sidecar = json.loads((tmp_path / "s" / "samples.json").read_text())
    hand = 6 * config_gmacs(model.config) - hand_saved_gmacs()
    assert sidecar["gflops_per_image"] == pytest.approx(hand, rel=1e-12)
    assert [row["gflops"] for row in sidecar["per_sample"]] == pytest.approx([hand] * 3, rel=1e-12)
    assert sidecar["schedule"]["expected_gflops_per_image"] == pytest.approx(hand, rel=1e-12)
    assert sidecar["schedule"]["plan"] == str(tmp_path / "plan.json") and sidecar["schedule"]["plan_sha256"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("steps", "was made for the sampler sde 6 steps, this run samples sde 4 steps"),
        ("model", "was made for SiT-T/2"),
    ],
)
def test_a_plan_made_for_another_model_or_sampler_is_refused(made, tmp_path, capsys, case, message):
    model, checkpoint, table = made
    assert plan_cli(table, tmp_path / "plan.json", "--budget-error", "0.1") == 0
    capsys.readouterr()
    flags = ["--plan", str(tmp_path / "plan.json")]
    if case == "steps":
        code = main(["sample", "--ckpt", str(checkpoint), "--steps", "4", "--out", str(tmp_path / "s"), *flags])
    else:
        other = save_checkpoint(tiny_model("SiT-T/2", input_size=16, in_channels=1), tmp_path / "other.pt")
        code = sample_cli(other, tmp_path / "s", *flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("attnmed sample: error: --plan ") and message in err and "\n" not in err
    if case == "model":
        assert "input_size 8 ≠ 16" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget-error", "0.1", "--methods", "rank:4"], "--methods takes full, mediator:N"),
        (["--budget-error", "0.1", "--methods", "window:2"], "--methods window:2: no source predicts it"),
        (["--budget-error", "0.1", "--methods", "share-cfg"], "--methods share-cfg: no source predicts it"),
        (["--budget-error", "-1"], "--budget-error must be a finite error ≥ 0"),
        (["--budget-gflops", "0.001"], "--budget-gflops is 0.001 GFLOPs per image, below the cheapest plan"),
        (["--budget-error", "0.1", "--windows", "0:3", "2:6"], "--windows 0:3 and 2:6 overlap"),
    ],
)
def test_refused_plans_name_the_flag_in_one_line(made, tmp_path, capsys, flags, message):
    _, _, table = made
    assert plan_cli(table, tmp_path / "plan.json", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnmed plan: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "plan.json").exists()
