"""Schedules per layer: the JSON form (old files still mean what they meant), a step that runs each layer with its
own count's attention in one network, the refusal of networks that do not share everything else, costs that
follow each layer's choice, and the derivation from the per-layer premise measure."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from helpers import tiny_model

from analysis.cli import main
from analysis.schedule import derive_layer_recovery_schedule, derive_recovery_schedule
from mediator_models.graft import graft, graft_to_folder, grafted_checkpoint
from mediator_models.network.config import make_config
from mediator_models.network.flops import config_gmacs
from mediator_models.sample import LoadedModel, switching_by_schedule
from mediator_models.sampling.generation import ProcessConfig
from mediator_models.sampling.steps import StepInfo
from mediator_models.sampling.switching import Interval, LayerMixedNetwork, MediatorSchedule
from mediator_models.storage.checkpoints import atomic_save

# As `attnmed schedule` wrote schedules before per-layer intervals existed.
SCHEDULE_AS_WRITTEN_BEFORE = (
    '{"name": "demo", "intervals": [{"from": 1.0, "to": 0.7, "mediators": 4}, '
    '{"from": 0.7, "to": 0.3, "mediators": 16}, {"from": 0.3, "to": 0.0, "mediators": "full"}]}'
)


def mixed_schedule(boundary: float = 0.55) -> MediatorSchedule:
    """Above `boundary`: 4 mediators but full attention in layer 2 and 16 mediators in layer 3; below: full."""
    return MediatorSchedule([Interval(1.0, boundary, 4, {2: None, 3: 16}), Interval(boundary, 0.0, None)], name="mixed")


@pytest.fixture(scope="module")
def grafted():
    """A random full-attention SiT-T/2 (4 layers, 16 tokens) and the 4- and 16-mediator networks grafted from it."""
    source = tiny_model("SiT-T/2", input_size=8)
    return {None: source, 4: graft(source, 4), 16: graft(source, 16)}


def test_schedules_written_before_per_layer_intervals_load_and_mean_what_they_meant(tmp_path, grafted):
    path = tmp_path / "old.json"
    path.write_text(SCHEDULE_AS_WRITTEN_BEFORE)
    schedule = MediatorSchedule.load(path)
    assert not schedule.per_layer and all(i.layers == () for i in schedule.intervals)
    assert [schedule.count_at(v) for v in (1.0, 0.71, 0.7, 0.5, 0.3, 0.0)] == [4, 4, 16, 16, None, None]
    assert schedule.to_dict() == json.loads(SCHEDULE_AS_WRITTEN_BEFORE)  # saved again, it is the same file
    choose = schedule.callback(grafted)
    x = torch.zeros(2, 4, 8, 8)
    assert [choose(StepInfo(0, torch.zeros(2), v, x)) for v in (0.9, 0.5, 0.1)] == [
        grafted[4],
        grafted[16],
        grafted[None],
    ]


def test_per_layer_intervals_round_trip_through_json_and_print_readably(tmp_path):
    schedule = mixed_schedule(0.5)
    saved = json.loads(schedule.save(tmp_path / "s.json").read_text())
    assert saved["intervals"][0] == {"from": 1.0, "to": 0.5, "mediators": 4, "layers": {"2": "full", "3": 16}}
    assert "layers" not in saved["intervals"][1]
    assert MediatorSchedule.load(tmp_path / "s.json") == schedule
    assert str(schedule) == "mixed [noise level 1.00→0.50: n=4 (layer 2: full; layer 3: n=16), 0.50→0.00: full]"
    # A layer given the interval's own count is no departure from it.
    assert Interval(1.0, 0.0, 4, {0: 4, 1: 16}) == Interval(1.0, 0.0, 4, {1: 16})
    with pytest.raises(ValueError, match="'layers' keys are layer indices"):
        MediatorSchedule.from_dict({"intervals": [{"from": 1.0, "to": 0.0, "mediators": 4, "layers": {"a": 4}}]})
    with pytest.raises(ValueError, match="mediators must be a positive whole number"):
        MediatorSchedule.from_dict({"intervals": [{"from": 1.0, "to": 0.0, "mediators": 4, "layers": {"1": 2.5}}]})


def test_layers_and_counts_the_networks_do_not_have_are_refused_naming_the_file_and_the_interval(tmp_path, grafted):
    loaded = [LoadedModel(net, ProcessConfig("SiT"), f"{c}.pt") for c, net in grafted.items()]
    path = tmp_path / "s.json"
    MediatorSchedule([Interval(1.0, 0.5, 4, {7: 16}), Interval(0.5, 0.0, None)]).save(path)
    with pytest.raises(ValueError, match=f"schedule {path} interval 1.00→0.50 names layer 7, but the networks have 4"):
        switching_by_schedule(loaded, MediatorSchedule.load(path))
    MediatorSchedule([Interval(1.0, 0.5, 4), Interval(0.5, 0.0, None, {1: 64})]).save(path)
    with pytest.raises(ValueError, match=rf"schedule {path} interval 0.50→0.00 uses \['n=64'\] but only"):
        switching_by_schedule(loaded, MediatorSchedule.load(path))


def test_a_per_layer_step_runs_the_base_network_with_each_layers_attention_and_restores_it(grafted):
    choose = mixed_schedule().callback(grafted)
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 0.3), torch.tensor([1, 2])
    mixed = choose(StepInfo(0, t, 0.9, x))
    assert isinstance(mixed, LayerMixedNetwork) and choose(StepInfo(1, t, 0.8, x)) is mixed
    assert choose(StepInfo(4, t, 0.2, x)) is grafted[None]
    reference = copy.deepcopy(grafted[4])
    reference.blocks[2].attn = copy.deepcopy(grafted[None].blocks[2].attn)
    reference.blocks[3].attn = copy.deepcopy(grafted[16].blocks[3].attn)
    own = [block.attn for block in grafted[4].blocks]
    with torch.no_grad():
        out = mixed(x, t, y)
        assert torch.equal(out, reference(x, t, y))
        assert not torch.allclose(out, grafted[4](x, t, y)) and not torch.allclose(out, grafted[None](x, t, y))
        doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 4.0)
        assert torch.equal(mixed.forward_with_cfg(*doubled), reference.forward_with_cfg(*doubled))
        with pytest.raises(ValueError, match="expects inputs of shape"):
            mixed(torch.zeros(2, 4, 4, 4), t, y)
    assert [block.attn for block in grafted[4].blocks] == own  # put back, after a failed call too
    assert all(a is b for a, b in zip((block.attn for block in grafted[4].blocks), own))


def test_separately_trained_networks_are_refused_for_per_layer_schedules_but_still_switch_whole(grafted):
    apart = {None: grafted[None], 4: tiny_model("SiT-T/2", input_size=8, attention="mediator", mediators=4)}
    loaded = [
        LoadedModel(apart[None], ProcessConfig("SiT"), "full.pt"),
        LoadedModel(apart[4], ProcessConfig("SiT"), "med4.pt"),
    ]
    per_layer = MediatorSchedule([Interval(1.0, 0.0, 4, {3: None})])
    with pytest.raises(
        ValueError, match="full.pt and med4.pt differ outside attention, first in x_embedder.proj.weight"
    ):
        switching_by_schedule(loaded, per_layer)
    whole = MediatorSchedule.from_boundaries([4, None], [0.5])
    assert switching_by_schedule(loaded, whole).callback(StepInfo(0, torch.zeros(1), 0.9, torch.zeros(1))) is apart[4]


def block_macs(config, mediators: int | None) -> int:
    """One block's MACs by the formulas of flops.py's docstring (r = 4, no conv with full attention)."""
    n, d = config.num_tokens, config.hidden_size
    shared = (4 + 2 * 4) * n * d * d + 6 * d * d
    return shared + (2 * n * n * d if mediators is None else 4 * mediators * n * d + 9 * n * d + n * d)


@pytest.fixture(scope="module")
def grafted_files(tmp_path_factory):
    """A full-attention SiT-T/2 checkpoint on 8-px RGB and the 4- and 16-mediator checkpoints grafted from it."""
    folder = tmp_path_factory.mktemp("layers")
    source = tiny_model("SiT-T/2", input_size=8, in_channels=3)
    full = atomic_save(grafted_checkpoint(source, ProcessConfig("SiT"), {"made": "for a test"}), folder / "full.pt")
    result = graft_to_folder(full, folder / "grafted", [4, 16], samples=0, progress=False)
    return {None: full, **result.checkpoints}


def test_sampling_a_per_layer_schedule_records_the_gflops_of_each_layers_choice(tmp_path, grafted_files):
    schedule = mixed_schedule(0.55).save(tmp_path / "s.json")
    ckpts = [arg for path in grafted_files.values() for arg in ("--ckpt", str(path))]
    command = ["sample", *ckpts, "--sampler", "ode", "--method", "euler", "--steps", "6", "--num-samples", "2"]
    assert main([*command, "--schedule", str(schedule), "--out", str(tmp_path / "out")]) == 0
    sidecar = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert sidecar["schedule"]["intervals"][0]["layers"] == {"2": "full", "3": 16}
    # Levels 1, 5/6, 4/6 run layers (n=4, n=4, full, n=16); 3/6, 2/6, 1/6 the full network.
    config = make_config("SiT-T/2", input_size=8, in_channels=3, num_classes=10)
    full = config_gmacs(config) * 1e9
    mixed = full - 3 * block_macs(config, None) + 2 * block_macs(config, 4) + block_macs(config, 16)
    assert sidecar["gflops_per_image"] == pytest.approx((3 * mixed + 3 * full) / 1e9, rel=1e-12)
    assert [s["switch_steps"] for s in sidecar["per_sample"]] == [[3], [3]]
    from mediator_models.sampling.generation import SamplerConfig
    from mediator_models.sampling.switching import evaluation_levels

    levels = evaluation_levels(ProcessConfig("SiT"), SamplerConfig(kind="ode", method="euler", steps=6))
    configs = {
        4: config.replace(attention="mediator", mediators=4),
        16: config.replace(attention="mediator", mediators=16),
    }
    expected = MediatorSchedule.load(schedule).expected_gflops(levels, {None: config, **configs})
    assert expected == pytest.approx(sidecar["gflops_per_image"], rel=1e-12)


def test_a_schedule_naming_a_layer_the_networks_lack_is_one_line_naming_the_file(tmp_path, grafted_files, capsys):
    schedule = MediatorSchedule([Interval(1.0, 0.0, 4, {9: 16})]).save(tmp_path / "s.json")
    ckpts = [arg for path in grafted_files.values() for arg in ("--ckpt", str(path))]
    assert main(["sample", *ckpts, "--schedule", str(schedule), "--out", str(tmp_path / "out")]) == 2
    assert f"attnmed sample: error: schedule {schedule} interval 1.00→0.00 names layer 9" in capsys.readouterr().err


def layer_recovery_table(errors_by_level) -> pd.DataFrame:
    """recovery_rank_N rows of a full-attention SiT-T/2: errors_by_level = [(level, [per layer {n: error}])]."""
    rows = []
    for step, (level, layers) in enumerate(errors_by_level):
        for layer, by_count in enumerate(layers):
            for n, error in by_count.items():
                rows.append(
                    {
                        "model": "SiT-T/2",
                        "attention": "full",
                        "mediators": None,
                        "network": "full",
                        "step": step,
                        "noise_level": level,
                        "layer": layer,
                        "head": -1,
                        "branch": "all",
                        "metric": f"recovery_rank_{n}",
                        "mean": error,
                        "std": 0.0,
                    }
                )
    return pd.DataFrame(rows)


EASY, NEEDS_16, NONE_FITS = {4: 0.05, 16: 0.01, 64: 0.001}, {4: 0.2, 16: 0.05, 64: 0.01}, {4: 0.5, 16: 0.4, 64: 0.3}
LAYER_TABLE = [
    (1.0, [EASY, EASY, EASY, EASY]),
    (0.6, [EASY, NEEDS_16, EASY, EASY]),
    (0.3, [EASY, EASY, EASY, EASY]),  # layer 1 keeps 16: never fewer mediators at a less noisy step
    (0.1, [NONE_FITS, EASY, EASY, EASY]),  # layer 0: full attention
]


def test_per_layer_derivation_gives_each_layer_its_fewest_mediators_within_epsilon_monotone_per_layer():
    table = layer_recovery_table(LAYER_TABLE)
    schedule = derive_layer_recovery_schedule(table, [4, 16, 64, None], 0.1, depth=4)
    assert [(i.high, round(i.low, 2), i.mediators, i.layers) for i in schedule.intervals] == [
        (1.0, 0.8, 4, ()),
        (0.8, 0.2, 4, ((1, 16),)),
        (0.2, 0.0, 4, ((0, None), (1, 16))),
    ]
    # The whole-network rule on the same table is unchanged: the worst layer decides for all.
    whole = derive_recovery_schedule(table, [4, 16, 64, None], 0.1)
    assert [(i.mediators, i.layers) for i in whole.intervals] == [(4, ()), (16, ()), (None, ())]
    with pytest.raises(ValueError, match=r"layers \[0, 1, 2, 3\], but the model has 6"):
        derive_layer_recovery_schedule(table, [4, 16], 0.1, depth=6)
    with pytest.raises(ValueError, match="relative error in"):
        derive_layer_recovery_schedule(table, [4, 16], 1.5)


def test_schedule_command_derives_a_per_layer_schedule_and_its_cost(tmp_path, capsys):
    table = tmp_path / "table.csv"
    layer_recovery_table(LAYER_TABLE).to_csv(table, index=False)
    config = make_config("SiT-T/2", input_size=32, in_channels=1, num_classes=10)
    (tmp_path / "table.csv.json").write_text(json.dumps({"model": config.to_dict()}))
    out = tmp_path / "s.json"
    command = ["schedule", str(table), "--counts", "4", "16", "64", "full", "--rule", "recovery", "--per-layer"]
    assert main([*command, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    schedule = MediatorSchedule.load(out)
    assert schedule == derive_layer_recovery_schedule(layer_recovery_table(LAYER_TABLE), [4, 16, 64, None], 0.1)
    configs = {c: config.replace(attention="full" if c is None else "mediator", mediators=c) for c in (4, 16, None)}
    expected = schedule.expected_gflops([1.0, 0.6, 0.3, 0.1], configs)
    assert float(printed.split("expected ")[1].split(" GFLOPs")[0]) == pytest.approx(expected, rel=1e-3)
    assert "layer 0: full" in printed
    assert main(["schedule", str(table), "--counts", "4", "full", "--per-layer", "--out", str(out)]) == 2
    assert "attnmed schedule: error: --per-layer works with the recovery rule only" in capsys.readouterr().err


def test_a_guided_table_gives_each_layer_the_count_its_worse_branch_needs():
    """A guided recording holds a cond and an uncond row per (step, layer, count): a layer's count must keep both
    within ε (the whole-network rule takes the worst layer and branch likewise)."""
    table = layer_recovery_table(LAYER_TABLE)
    cond, uncond = table.assign(branch="cond"), table.assign(branch="uncond")
    worse = uncond["metric"].eq("recovery_rank_4") & uncond["layer"].eq(2)
    uncond.loc[worse, "mean"] = 0.5  # layer 2's unconditional half needs more than 4 mediators everywhere
    schedule = derive_layer_recovery_schedule(pd.concat([cond, uncond]), [4, 16, 64, None], 0.1, depth=4)
    assert all(dict(i.layers).get(2, i.mediators) not in (4,) for i in schedule.intervals)
    plain = derive_layer_recovery_schedule(pd.concat([cond, cond.assign(branch="uncond")]), [4, 16, 64, None], 0.1)
    assert plain == derive_layer_recovery_schedule(table, [4, 16, 64, None], 0.1)  # equal branches: as unguided
