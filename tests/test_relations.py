"""Redundancy between calls: a layer's change from the previous evaluation and between the guidance branches."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from analysis.collect import CollectionConfig, collect_redundancy
from analysis.relations import RELATION_METRICS, map_total_variation, output_change
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch


def test_changes_of_known_pairs():
    a = torch.randn(2, 3, 8, 4, dtype=torch.float64)
    same = output_change(a, a)
    torch.testing.assert_close(same["output_rel_l1"], torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(same["output_cosine"], torch.ones(2, 3, dtype=torch.float64))
    flipped = output_change(-a, a)
    torch.testing.assert_close(flipped["output_rel_l1"], torch.full((2, 3), 2.0, dtype=torch.float64))
    torch.testing.assert_close(flipped["output_cosine"], -torch.ones(2, 3, dtype=torch.float64))
    eye = torch.eye(6, dtype=torch.float64)
    shifted = eye.roll(1, dims=-1)
    assert float(map_total_variation(eye, eye)) == 0.0 and float(map_total_variation(eye, shifted)) == 1.0
    uniform = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    assert float(map_total_variation(eye, uniform)) == pytest.approx(5 / 6)  # ½(|1 − 1/6| + 5·1/6)


@pytest.mark.parametrize("attention,mediators", [("full", None), ("mediator", 4)])
def test_the_recorder_tables_step_and_branch_changes_as_measured_by_hand(attention, mediators):
    """Guided sampling: step_* from the second evaluation on, per branch; branch_* under "cond-uncond". The
    values equal the change of layer 0's outputs and maps computed from what the layer handed over."""
    model = tiny_model("SiT-T/2", input_size=8, attention=attention, mediators=mediators)
    sampler = SamplerConfig(kind="sde", steps=3, cfg_scale=2.0)
    seen = []
    module = model.attention_modules()[0]
    table = collect_redundancy(
        model,
        ProcessConfig("SiT"),
        sampler,
        CollectionConfig(samples=2, batch_size=2, metrics=("jsd", *RELATION_METRICS)),
        progress=False,
    )
    # The same trajectories again (the collection's noise), with an observer of layer 0 only, measured by hand.
    x_T, y, noise = start_batch([0, 1], 0, model.config, None, "cpu")
    module.map_observer = lambda maps: seen.append((maps.output().detach(), maps.effective.detach()))
    try:
        generate(model, ProcessConfig("SiT"), sampler, x_T, y, noise_fn=noise)
    finally:
        module.map_observer = None
    (out0, _), (out1, map1) = seen[0], seen[1]  # doubled batches: conditional half first
    expected_step = output_change(out1[:2], out0[:2])["output_rel_l1"].mean(-1).mean()
    expected_branch = map_total_variation(map1[:2], map1[2:]).mean(-1).mean()
    rows = table[(table["layer"] == 0) & (table["head"] == -1)]
    steps = rows[rows["metric"] == "step_output_rel_l1"]
    assert sorted(set(steps["step"])) == [1, 2] and set(steps["branch"]) == {"cond", "uncond"}
    branch = rows[rows["metric"] == "branch_map_tv"]
    assert set(branch["branch"]) == {"cond-uncond"} and sorted(set(branch["step"])) == [0, 1, 2]
    assert (rows[rows["metric"] == "step_output_cosine"]["mean"] <= 1 + 1e-9).all()
    assert not rows[rows["metric"].str.startswith(("step_", "branch_"))]["mean"].isna().any()
    measured = rows.set_index(["metric", "step", "branch"])["mean"]
    assert measured[("step_output_rel_l1", 1, "cond")] == pytest.approx(float(expected_step), rel=1e-5)
    assert measured[("branch_map_tv", 1, "cond-uncond")] == pytest.approx(float(expected_branch), rel=1e-5)


def test_changes_are_the_same_under_a_memory_bound_of_one_map_pair():
    from mediator_models.recording.recorder import MAP_ENTRY_BYTES

    model = tiny_model("SiT-T/2", input_size=16)  # 64 tokens, 4 heads
    sampler = SamplerConfig(kind="sde", steps=3, cfg_scale=2.0)
    collection = CollectionConfig(samples=2, batch_size=2, metrics=RELATION_METRICS)
    tables = [
        collect_redundancy(model, ProcessConfig("SiT"), sampler, collection, progress=False, map_memory=budget)
        for budget in (2**40, 2 * 64 * 64 * MAP_ENTRY_BYTES)
    ]
    torch.testing.assert_close(torch.tensor(tables[1]["mean"].values), torch.tensor(tables[0]["mean"].values))
