"""Schedules and the paper's adaptive rule: data in, networks per step out, costs accounted per sample."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import tiny_model

from analysis.schedule import (
    Rule,
    calibrate_adaptive,
    counts_per_step,
    derive_recovery_schedule,
    derive_schedule,
    monotone_intervals,
    recovery_curve,
    schedule_gflops,
)
from mediator_models import config_gmacs
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch
from mediator_models.sampling.switching import AdaptiveSwitch, Interval, MediatorSchedule, evaluation_levels


def test_schedule_round_trips_through_json_and_prints_readably(tmp_path):
    schedule = MediatorSchedule.from_boundaries([4, 16, None], [0.7, 0.3], name="demo")
    path = schedule.save(tmp_path / "s.json")
    assert MediatorSchedule.load(path) == schedule
    assert str(schedule) == "demo [noise level 1.00→0.70: n=4, 0.70→0.30: n=16, 0.30→0.00: full]"
    assert [schedule.count_at(v) for v in (1.0, 0.71, 0.7, 0.5, 0.3, 0.0)] == [4, 4, 16, 16, None, None]


def test_schedules_that_do_not_tile_or_use_missing_counts_are_refused():
    with pytest.raises(ValueError, match="does not tile"):
        MediatorSchedule([Interval(1.0, 0.5, 4), Interval(0.4, 0.0, 16)])
    with pytest.raises(ValueError, match="must reach 0"):
        MediatorSchedule([Interval(1.0, 0.5, 4)])
    with pytest.raises(ValueError, match=r"uses \['n=64'\] but only"):
        MediatorSchedule.constant(64).validate([4, 16])
    with pytest.raises(ValueError, match="not a schedule"):
        MediatorSchedule.from_dict({"intervals": [{"from": 1.0}]})


def test_static_schedule_picks_the_network_of_each_step_and_costs_follow():
    nets = {
        4: tiny_model("SiT-T/2", attention="mediator", mediators=4),
        16: tiny_model("SiT-T/2", attention="mediator", mediators=16),
    }
    schedule = MediatorSchedule.from_boundaries([4, 16], [0.5])
    sampler = SamplerConfig(kind="ode", method="euler", steps=10)
    x_T, y, _ = start_batch([0, 1], 0, nets[4].config, None, "cpu")
    _, caller = generate(nets[4], ProcessConfig("SiT"), sampler, x_T, y, callback=schedule.callback(nets))
    assert caller.used == [nets[4]] * 5 + [nets[16]] * 5  # levels 1.0, 0.9, ..., 0.1
    expected = 5 * config_gmacs(nets[4].config) + 5 * config_gmacs(nets[16].config)
    assert caller.gflops.tolist() == pytest.approx([expected, expected])
    levels = evaluation_levels(ProcessConfig("SiT"), sampler)
    assert schedule_gflops(schedule, levels, {c: n.config for c, n in nets.items()}) == pytest.approx(expected)


def adaptive_run(networks, indices, ratios=(1.0, 0.6)):
    switch = AdaptiveSwitch(networks, ratios, warmup=3)
    x_T, y, noise = start_batch(indices, 0, networks[0].config, None, "cpu")
    out, caller = generate(
        networks[0], ProcessConfig("SiT"), SamplerConfig(kind="sde", steps=30), x_T, y, callback=switch, noise_fn=noise
    )
    return out, switch.switch_steps, caller


@pytest.fixture(scope="module")
def three_networks():
    torch.manual_seed(0)
    return [tiny_model("SiT-T/2", attention="mediator", mediators=n) for n in (1, 4, 16)]


def test_adaptive_rule_decides_per_sample_as_if_each_ran_alone(three_networks):
    batch_out, batch_switches, caller = adaptive_run(three_networks, [0, 1, 2, 3])
    assert any(batch_switches), "the rule should switch at least once in 30 steps"
    for i in range(4):
        alone_out, alone_switches, _ = adaptive_run(three_networks, [i])
        assert alone_switches[0] == batch_switches[i]
        torch.testing.assert_close(alone_out[0], batch_out[i], atol=1e-5, rtol=1e-5)
    # The cost is accounted per sample: each evaluation costs what the sample's network at that step costs.
    gmacs = [config_gmacs(n.config) for n in three_networks]
    for i, moves in enumerate(batch_switches):
        expected = sum(gmacs[sum(1 for m in moves if m <= k)] for k in range(caller.nfe))
        assert float(caller.gflops[i]) == pytest.approx(expected)


def test_adaptive_rule_follows_the_public_warmup_and_one_way_moves(three_networks):
    _, switches, _ = adaptive_run(three_networks, [0, 1])
    for moves in switches:
        assert moves == sorted(moves) and len(moves) <= 2
        assert all(step >= 5 for step in moves)  # d_1 unused, μ from d_2..d_4, decisions from x_5 on
    with pytest.raises(ValueError, match="3 networks need 2 ratios"):
        AdaptiveSwitch(three_networks, [0.9])


def test_adaptive_rule_with_guidance_routes_both_halves(three_networks):
    switch = AdaptiveSwitch(three_networks, (1.0, 0.6))
    x_T, y, noise = start_batch([0, 1], 0, three_networks[0].config, None, "cpu")
    out, caller = generate(
        three_networks[0],
        ProcessConfig("SiT"),
        SamplerConfig(kind="sde", steps=12, cfg_scale=2.0),
        x_T,
        y,
        callback=switch,
        noise_fn=noise,
    )
    assert torch.isfinite(out).all() and caller.forward_passes == 2 * caller.nfe


def table_with(metric, values_by_level):
    rows = []
    for step, (level, value) in enumerate(values_by_level):
        for layer in range(2):
            for head in range(2):
                rows.append(
                    {
                        "step": step,
                        "noise_level": level,
                        "layer": layer,
                        "head": head,
                        "branch": "all",
                        "metric": metric,
                        "mean": value,
                    }
                )
    return pd.DataFrame(rows)


def test_energy_rank_rule_takes_the_smallest_count_that_fits_and_stays_monotone():
    assert counts_per_step([3.0, 4.0, 5.0, 20.0], [4, 16, None], Rule()) == [4, 4, 16, None]
    assert counts_per_step([20.0], [4, 16], Rule()) == [16]  # nothing fits and no full model: the largest
    table = table_with("energy_rank_0.9", [(1.0, 2), (0.8, 3), (0.6, 9), (0.4, 5), (0.2, 30), (0.05, 12)])
    schedule = derive_schedule(table, [4, 16, None], name="derived")
    # 4, 4, 16, (16: never fewer at a less noisy step), full, full
    assert [(round(i.high, 2), round(i.low, 2), i.mediators) for i in schedule.intervals] == [
        (1.0, 0.7, 4),
        (0.7, 0.3, 16),
        (0.3, 0.0, None),
    ]


def test_jsd_rule_uses_fewer_mediators_where_queries_attend_alike():
    rule = Rule(kind="jsd", thresholds=(0.1, 0.3))
    assert counts_per_step([0.05, 0.2, 0.5], [4, 16, 64], rule) == [4, 16, 64]
    with pytest.raises(ValueError, match="3 counts need 2"):
        counts_per_step([0.1], [4, 16, 64], Rule(kind="jsd", thresholds=(0.1,)))
    schedule = monotone_intervals([1.0, 0.5, 0.0], [4, 4, 4], "flat")
    assert schedule == MediatorSchedule.constant(4, "flat")


def test_calibration_meets_the_budget_with_the_most_mediators_it_allows(three_networks):
    process, sampler = ProcessConfig("SiT"), SamplerConfig(kind="sde", steps=30)
    cheapest = 30 * config_gmacs(three_networks[0].config)
    dearest = 30 * config_gmacs(three_networks[2].config)
    budget = (cheapest + dearest) / 2
    result = calibrate_adaptive(three_networks, process, sampler, budget, grid=(1.0, 0.7, 0.4), samples=2)
    assert result["gflops"] <= budget and result["ratios"] in [c["ratios"] for c in result["candidates"]]
    assert all(c["gflops"] <= result["gflops"] or c["gflops"] > budget for c in result["candidates"])
    with pytest.raises(ValueError, match="no ratios in the grid meet"):
        calibrate_adaptive(three_networks, process, sampler, cheapest / 2, grid=(0.5,), samples=1)


@pytest.mark.parametrize(
    "interval,message",
    [
        ({"from": 1.0, "to": 0.0, "mediators": 4.9}, "mediators must be a positive whole number"),
        ({"from": 1.0, "to": 0.0, "mediators": True}, "mediators must be a positive whole number"),
        ({"from": 1.0, "to": 0.0, "mediators": 0}, "mediators must be a positive whole number"),
        ({"from": float("nan"), "to": 0.0, "mediators": 4}, r"'from' must be a noise level in \[0, 1\], got NaN"),
        ({"from": 1.0, "to": -0.5, "mediators": 4}, r"'to' must be a noise level in \[0, 1\]"),
    ],
)
def test_schedule_json_with_bad_counts_or_bounds_is_refused_naming_the_file(tmp_path, interval, message):
    import json

    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"intervals": [interval]}))
    with pytest.raises(ValueError, match=f"schedule {path}: not a schedule: {message}"):
        MediatorSchedule.load(path)
    assert (
        MediatorSchedule.from_dict({"intervals": [{"from": 1.0, "to": 0.0, "mediators": 16.0}]}).intervals[0].mediators
        == 16
    )


def recovery_table(errors_by_level):
    """A table of recovery_rank_N rows: errors_by_level = [(level, {layer: {n: error}})]."""
    rows = []
    for step, (level, layers) in enumerate(errors_by_level):
        for layer, by_count in layers.items():
            for n, error in by_count.items():
                rows.append(
                    {
                        "step": step,
                        "noise_level": level,
                        "layer": layer,
                        "head": -1,
                        "branch": "all",
                        "metric": f"recovery_rank_{n}",
                        "mean": error,
                    }
                )
    return pd.DataFrame(rows)


def test_recovery_rule_takes_the_fewest_mediators_that_keep_every_layer_within_epsilon():
    easy, hard = {4: 0.05, 16: 0.01, 64: 0.001}, {4: 0.3, 16: 0.15, 64: 0.08}
    table = recovery_table(
        [
            (1.0, {0: easy, 1: easy}),
            (0.6, {0: easy, 1: {4: 0.2, 16: 0.05, 64: 0.01}}),  # layer 1 needs 16: the worst layer decides
            (0.3, {0: hard, 1: easy}),  # 64 within 0.1
            (0.1, {0: {4: 0.5, 16: 0.4, 64: 0.3}, 1: easy}),  # nothing fits: full attention
        ]
    )
    schedule = derive_recovery_schedule(table, [4, 16, 64, None], 0.1)
    assert [i.mediators for i in schedule.intervals] == [4, 16, 64, None]
    assert [round(i.low, 2) for i in schedule.intervals] == [0.8, 0.45, 0.2, 0.0]
    # Absolute: a looser ε needs fewer mediators at every step; without full attention the largest count stands in.
    loose = derive_recovery_schedule(table, [4, 16, 64], 0.35)
    assert [i.mediators for i in loose.intervals] == [4, 64]
    assert recovery_curve(table)["error"].max() == 0.5
    with pytest.raises(ValueError, match="relative error in"):
        derive_recovery_schedule(table, [4, 16], 1.5)
    with pytest.raises(ValueError, match="no recovery measure for n = \\[8\\]"):
        derive_recovery_schedule(table, [4, 8], 0.1)
    with pytest.raises(ValueError, match="no recovery_rank_N rows"):
        derive_recovery_schedule(table_with("jsd", [(1.0, 0.1)]), [4], 0.1)


def test_the_sde_tells_the_callback_its_injected_noise_and_the_drift_rule_reads_the_rest(three_networks):
    seen = []
    x_T, y, noise = start_batch([0, 1], 0, three_networks[0].config, None, "cpu")
    generate(
        three_networks[0],
        ProcessConfig("SiT"),
        SamplerConfig(kind="sde", steps=8),
        x_T,
        y,
        callback=lambda info: seen.append((info.x, info.injected)),
        noise_fn=noise,
    )
    assert seen[0][1] is None and all(injected is not None for _, injected in seen[1:])
    generate(
        three_networks[0],
        ProcessConfig("SiT"),
        SamplerConfig(kind="ode", method="euler", steps=4),
        x_T,
        y,
        callback=lambda info: seen.append(info.injected),
    )
    assert seen[-4:] == [None] * 4  # deterministic samplers add nothing
    # The trace splits d_k into the noise and the rest; the drift rule switches on the rest.
    switch = AdaptiveSwitch(three_networks, (1.0, 0.6), statistic="drift")
    _, caller = generate(
        three_networks[0],
        ProcessConfig("SiT"),
        SamplerConfig(kind="sde", steps=30),
        x_T,
        y,
        callback=switch,
        noise_fn=noise,
    )
    assert len(switch.traces) == 2 and len(switch.traces[0]) == caller.nfe - 2
    state, injected, drift = torch.tensor(switch.traces[0]).T
    assert (injected > 0).all() and (drift < state + injected).all()
    with pytest.raises(ValueError, match="unknown statistic"):
        AdaptiveSwitch(three_networks, (1.0, 0.6), statistic="clock")


def test_guided_channels_without_guidance_are_accepted_as_inactive():
    """A sweep over guidance scales starts at 1; the evaluation-levels dry run drops guidance but keeps the
    channels. Both are accepted, and the description says the setting does nothing at this scale."""
    sampler = SamplerConfig(kind="sde", steps=3, cfg_scale=1.0, guided_channels=1)
    sampler.check("SiT", in_channels=4)
    assert "guided channels 1 (inactive: no guidance)" in sampler.describe()
    guided = SamplerConfig(kind="sde", steps=3, cfg_scale=4.0, guided_channels=1)
    assert len(evaluation_levels(ProcessConfig("SiT"), guided)) == 3
    with pytest.raises(ValueError, match="guided_channels: must lie in 1..4"):
        SamplerConfig(kind="sde", steps=3, guided_channels=5).check("SiT", in_channels=4)


def test_a_table_given_as_a_schedule_is_named_as_such(tmp_path):
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "figures/data/redundancy.parquet"
    with pytest.raises(ValueError, match="redundancy.parquet is not a schedule JSON .*it is a redundancy table"):
        MediatorSchedule.load(committed)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json is not a schedule JSON .*holds no object"):
        MediatorSchedule.load(tmp_path / "list.json")
