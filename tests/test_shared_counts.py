"""One network for several mediator counts: at each count it computes what that count's own network computes, its
checkpoint round-trips strictly beside unchanged single-count layouts, training draws a count per step and resumes
bit for bit, and a schedule or the adaptive rule runs from one --ckpt, costing what the hand count says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_inputs, tiny_model

from analysis.cli import main
from mediator_models.graft import graft, graft_shared, graft_to_folder, grafted_checkpoint
from mediator_models.network.config import ModelConfig
from mediator_models.network.dit import CountView, model_from_config
from mediator_models.network.flops import config_gmacs, measured_macs, network_gmacs
from mediator_models.recording.recorder import record_attention
from mediator_models.sample import load_for_sampling
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch
from mediator_models.sampling.switching import (
    AdaptiveSwitch,
    Interval,
    LayerMixedNetwork,
    MediatorSchedule,
    SharedLayerView,
    count_configs,
    evaluation_levels,
)
from mediator_models.storage.checkpoints import CheckpointMismatchError, atomic_save, load_checkpoint, read_checkpoint
from mediator_models.train import TrainConfig, drawn_count, train

COUNTS = (4, 16, None)  # on an 8-px SiT-T/2: a 4×4 grid of 16 tokens
TABLES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")


def shared_model(counts=COUNTS, **kwargs):
    """A random SiT-T/2 serving `counts`, with bias tables large enough to change every output."""
    torch.manual_seed(0)
    model = tiny_model("SiT-T/2", input_size=8, attention="mediator", mediators=counts, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(TABLES):
                param.normal_(0, 0.5)
    return model


def single_count_network(shared, count):
    """The network of one count alone (its own single-count layout), holding the shared network's tensors."""
    config = shared.config.at_count(count)
    network = model_from_config(config)
    theirs = shared.state_dict()
    weights = {}
    for key in network.state_dict():
        if key in theirs:
            weights[key] = theirs[key].clone()
        else:  # blocks.3.attn.an_bias is the shared network's blocks.3.attn.biases.16.an_bias
            layer, table = key.rsplit("attn.", 1)
            weights[key] = theirs[f"{layer}attn.biases.{count}.{table}"].clone()
    network.load_state_dict(weights, strict=True)
    return network.eval()


def test_at_each_count_the_shared_network_computes_exactly_what_that_counts_own_network_computes():
    shared = shared_model()
    x, t, y = tiny_inputs(shared)
    singles = {c: single_count_network(shared, c) for c in COUNTS}
    outputs = {}
    with torch.no_grad():
        for count, single in singles.items():
            assert single.config.attention == ("full" if count is None else "mediator")
            assert not single.config.uses_depthwise_conv if count is None else single.config.uses_depthwise_conv
            view = shared.at_count(count)
            outputs[count] = view(x, t, y)
            assert torch.equal(outputs[count], single(x, t, y))
            with shared.counting(count):  # the context manager runs the network itself at that count
                assert torch.equal(shared(x, t, y), outputs[count])
            doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 3.0)
            assert torch.equal(view.forward_with_cfg(*doubled), single.forward_with_cfg(*doubled))
            # FLOPs follow the active count: the analytic count, and what the real forward pass performs.
            shared.use_count(count)
            assert network_gmacs(shared) == config_gmacs(single.config) == config_gmacs(view.config)
            assert measured_macs(shared) == measured_macs(single)
    assert shared.active_counts() == (None,) * 4  # left at the last count set
    assert not torch.allclose(outputs[4], outputs[16]) and not torch.allclose(outputs[16], outputs[None])
    # Per layer: one network whose layers run at their own counts is the networks of each count mixed layer by layer.
    per_layer = (4, None, 16, 4)
    mixed = LayerMixedNetwork(singles, per_layer, base=4)
    with torch.no_grad():
        assert torch.equal(shared.at_count(per_layer)(x, t, y), mixed(x, t, y))
    assert shared.active_counts() == (None,) * 4  # a view restores the counts it found
    shared.use_count(per_layer)
    assert network_gmacs(shared) == pytest.approx(mixed.gmacs, rel=1e-15)
    with pytest.raises(ValueError, match="does not serve 64 mediators; it serves 4 mediators, 16 mediators, full"):
        shared.use_count(64)
    with pytest.raises(ValueError, match="serves several counts .* config.at_count"):
        config_gmacs(shared.config)


def test_the_shared_checkpoint_round_trips_strictly_and_single_count_layouts_are_unchanged(tmp_path):
    shared = shared_model()
    path = atomic_save(grafted_checkpoint(shared, ProcessConfig("SiT"), {"made": "for a test"}), tmp_path / "s.pt")
    saved = read_checkpoint(path)
    config = ModelConfig.from_dict(json.loads(json.dumps(saved["model_config"])))  # through JSON: a list again
    assert config == shared.config and config.mediators == COUNTS
    again = load_checkpoint(model_from_config(config), path)
    assert again.state_dict().keys() == shared.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), shared.state_dict().values()))
    block = [k.removeprefix("blocks.0.attn.") for k in shared.state_dict() if k.startswith("blocks.0.attn.")]
    assert block == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "dwc.weight", "dwc.bias"] + [
        f"biases.{n}.{table}" for n in (4, 16) for table in TABLES
    ]
    # A single-count checkpoint keeps the public mediator layout (docs/reference.md §6), and neither loads as the other.
    single = tiny_model("SiT-T/2", input_size=8, attention="mediator", mediators=16)
    layout = {
        k.removeprefix("blocks.0.attn."): tuple(v.shape) for k, v in single.state_dict().items() if ".0.attn." in k
    }
    heads, grid = 4, 4
    assert layout == {
        "qkv.weight": (384, 128),
        "qkv.bias": (384,),
        "proj.weight": (128, 128),
        "proj.bias": (128,),
        "dwc.weight": (128, 1, 3, 3),
        "dwc.bias": (128,),
        "an_bias": (heads, 16, 7, 7),
        "na_bias": (heads, 16, 7, 7),
        "ah_bias": (1, heads, 16, grid, 1),
        "aw_bias": (1, heads, 16, 1, grid),
        "ha_bias": (1, heads, grid, 1, 16),
        "wa_bias": (1, heads, 1, grid, 16),
    }
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys(.|\n)*blocks.0.attn.biases.16.an_bias"):
        load_checkpoint(single, path)
    loaded = load_for_sampling(path, mediators=16)
    assert isinstance(loaded.model, CountView) and loaded.model.config == single.config
    assert load_for_sampling(path, attention="full").model.count is None
    assert load_for_sampling(path).model.count == 4  # the first count served is the default
    with pytest.raises(ValueError, match="serves 4, 16, full"):
        load_for_sampling(path, mediators=64)


def test_training_draws_a_count_per_step_reproducibly_and_resumes_bit_identically(tmp_path):
    def config(out, **changes):
        base = dict(model="SiT-T/4", data="digits", image_size=16, global_batch_size=8, steps=6, lr=1e-3)
        base.update(ema_decay=0.9, log_every=2, ckpt_every=3, keep_checkpoints=None, out=str(out), progress=False)
        return TrainConfig(**{**base, "attention": "mediator", "mediators": COUNTS, **changes})

    straight = train(config(tmp_path / "a"))
    train(config(tmp_path / "b", steps=3))
    resumed = train(config(tmp_path / "b"), resume=True)
    final = read_checkpoint(straight / "checkpoints/0000006.pt")
    other = read_checkpoint(resumed / "checkpoints/0000006.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(final[key][name], other[key][name]) for name in final[key])
    drawn = [drawn_count(COUNTS, 0, step) for step in range(6)]
    assert drawn == [drawn_count(COUNTS, 0, step) for step in range(6)] and len(set(drawn)) > 1
    labels = ["full" if c is None else str(c) for c in drawn]
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["counts"] for r in log] == [{c: labels[s : s + 2].count(c) for c in labels[s : s + 2]} for s in (0, 2, 4)]
    # A count's bias tables move only if some step trained at it: the count is drawn, not a fixed one.
    torch.manual_seed(0)
    initial = model_from_config(final["model_config"]).state_dict()
    for count in (4, 16):
        moved = not torch.equal(
            initial[f"blocks.0.attn.biases.{count}.an_bias"], final["model"][f"blocks.0.attn.biases.{count}.an_bias"]
        )
        assert moved == (count in drawn)
    assert main(["train", "--model", "SiT-T/4", "--image-size", "16", "--batch-size", "8", "--steps", "1",
                 "--mediators", "4", "16", "full", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0  # fmt: skip
    recorded = json.loads((tmp_path / "cli" / "config.json").read_text())["model"]
    assert recorded["attention"] == "mediator" and recorded["mediators"] == [4, 16, None]


def hand_block_macs(config: ModelConfig, count: int | None) -> int:
    """One block by docs/reference.md §2: full 12·N·D² + 6·D² + 2·N²·D; mediator adds 4·n·N·D + 10·N·D instead."""
    n, d = config.num_tokens, config.hidden_size
    return 12 * n * d * d + 6 * d * d + (2 * n * n * d if count is None else 4 * count * n * d + 10 * n * d)


def hand_outside_macs(config: ModelConfig) -> int:
    """Patch embedding, the timestep MLP (256 frequencies) and the final layer (adaLN and its linear)."""
    n, d, p = config.num_tokens, config.hidden_size, config.patch_size
    return n * p * p * config.in_channels * d + 256 * d + d * d + 2 * d * d + n * d * p * p * config.out_channels


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One shared checkpoint of 8-px grey images, and the three single-count checkpoints holding its tensors."""
    folder = tmp_path_factory.mktemp("shared")
    shared = shared_model(in_channels=1)
    process = ProcessConfig("SiT")
    files = {"shared": atomic_save(grafted_checkpoint(shared, process, {}), folder / "shared.pt")}
    for count in COUNTS:
        single = grafted_checkpoint(single_count_network(shared, count), process, {})
        files[count] = atomic_save(single, folder / f"{'full' if count is None else count}.pt")
    return files


SAMPLING = ["--sampler", "sde", "--steps", "8", "--num-samples", "3", "--batch-size", "2"]


@pytest.mark.parametrize(
    "switching",
    [
        MediatorSchedule.from_boundaries([4, 16, None], [0.6, 0.3], name="whole"),
        MediatorSchedule([Interval(1.0, 0.5, 4, {1: None, 3: 16}), Interval(0.5, 0.0, 16, {0: None})], "per layer"),
        "adaptive",
    ],
    ids=["schedule", "per-layer schedule", "adaptive"],
)
def test_one_shared_ckpt_samples_as_the_separate_networks_do_and_costs_the_hand_count(tmp_path, checkpoints, switching):
    if switching == "adaptive":
        flags = ["--adaptive", "--rho", "1.2", "1.0", "--warmup", "2"]
    else:
        flags = ["--schedule", str(switching.save(tmp_path / "schedule.json"))]
    separate = [arg for count in COUNTS for arg in ("--ckpt", str(checkpoints[count]))]
    assert (
        main(["sample", "--ckpt", str(checkpoints["shared"]), *SAMPLING, *flags, "--out", str(tmp_path / "one")]) == 0
    )
    assert main(["sample", *separate, *SAMPLING, *flags, "--out", str(tmp_path / "apart")]) == 0
    one, apart = (json.loads((tmp_path / name / "samples.json").read_text()) for name in ("one", "apart"))
    images = [np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("one", "apart")]
    assert np.array_equal(*images)
    assert one["per_sample"] == apart["per_sample"]  # the GFLOPs and the switches of every sample
    config = load_for_sampling(checkpoints[4]).model.config.replace(attention="full", mediators=None)
    levels = evaluation_levels(ProcessConfig("SiT"), SamplerConfig(kind="sde", steps=8))
    for sample in one["per_sample"]:
        if switching == "adaptive":  # the rule moves 4 -> 16 -> full at the evaluations it recorded
            moves = sample["switch_steps"]
            per_step = [COUNTS[sum(k >= m for m in moves)] for k in range(len(levels))]
            layer_counts = [(count,) * 4 for count in per_step]
        else:
            layer_counts = [switching.interval_at(level).layer_counts(4) for level in levels]
        hand = sum(
            hand_outside_macs(config) + sum(hand_block_macs(config, c) for c in counts) for counts in layer_counts
        )
        assert sample["gflops"] == pytest.approx(hand / 1e9, rel=1e-12)
    if switching != "adaptive":  # what the schedule expects of the shared network's counts, before sampling
        network = load_for_sampling(checkpoints["shared"]).model.network
        expected = switching.expected_gflops(levels, count_configs(network))
        assert one["gflops_per_image"] == pytest.approx(expected, rel=1e-12)


def test_the_schedule_and_the_adaptive_rule_take_the_shared_network_itself():
    shared = shared_model()
    schedule = MediatorSchedule([Interval(1.0, 0.5, 4, {2: None}), Interval(0.5, 0.0, 16)])
    choose = schedule.callback(shared)
    from mediator_models.sampling.steps import StepInfo

    x = torch.zeros(2, 4, 8, 8)
    first, second = (choose(StepInfo(0, torch.zeros(2), level, x)) for level in (0.9, 0.2))
    assert isinstance(first, SharedLayerView) and first.layer_counts == (4, 4, None, 4)
    assert isinstance(second, CountView) and second.config == shared.config.at_count(16)
    rule = AdaptiveSwitch(shared, [1.0, 1.0])
    assert [view.count for view in rule.networks] == [4, 16, None]  # fewest mediators first, full attention last
    with pytest.raises(ValueError, match="serves one count"):
        schedule.callback(tiny_model("SiT-T/2", input_size=8, attention="mediator", mediators=4))


def test_the_recorder_names_each_counts_maps_under_its_own_network():
    shared = shared_model()
    singles = {c: single_count_network(shared, c) for c in COUNTS}
    schedule = MediatorSchedule.from_boundaries([4, 16, None], [0.6, 0.3])
    sampler = SamplerConfig(kind="ode", method="euler", steps=6)

    def reducer(maps):
        return {"peak": maps.effective.amax(-1).mean(-1)}  # (B, heads)

    rows = {}
    for name, networks in (("one", shared.count_views()), ("apart", singles)):
        x_T, y, noise = start_batch([0, 1], 0, shared.config, None, "cpu")
        with torch.no_grad(), record_attention(list(networks.values()), reducer) as recorder:
            callback = schedule.callback(networks)

            def both(info, callback=callback, recorder=recorder):
                recorder.callback(info)
                return callback(info)

            generate(networks[4], ProcessConfig("SiT"), sampler, x_T, y, callback=both, noise_fn=noise)
        rows[name] = recorder.rows()
    assert rows["one"] == rows["apart"]
    levels = evaluation_levels(ProcessConfig("SiT"), sampler)
    named = {(r["network"], r["step"]) for r in rows["one"]}
    expected = {(singles[schedule.count_at(level)].config.label, step) for step, level in enumerate(levels)}
    assert named == expected and "SiT-T/2 (mediator n=16) @8" in {n for n, _ in named}


def test_graft_shared_writes_one_checkpoint_holding_at_each_count_what_graft_makes(tmp_path):
    source = tiny_model("SiT-T/2", input_size=8, in_channels=1)
    path = atomic_save(grafted_checkpoint(source, ProcessConfig("SiT"), {}), tmp_path / "full.pt")
    sampler = {"kind": "ode", "method": "euler", "steps": 4}
    common = dict(samples=2, batch_size=2, sampler=sampler, progress=False)
    one = graft_to_folder(path, tmp_path / "one", [4, 16, "full"], shared=True, **common)
    apart = graft_to_folder(path, tmp_path / "apart", [4, 16], **common)
    assert one.shared == tmp_path / "one" / "shared.pt" and one.checkpoints == {}
    assert one.errors == apart.errors  # the training-free error per count, layer and step
    network = load_for_sampling(one.shared).model.network
    assert network.config.mediators == (4, 16, None) and network.config == graft_shared(source, COUNTS).config
    x, t, y = tiny_inputs(source)
    with torch.no_grad():
        for count in (4, 16):
            alone = graft(source, count)
            mine = single_count_network(network, count).state_dict()
            assert all(torch.equal(mine[k], v) for k, v in alone.state_dict().items())
        assert torch.equal(network.at_count(None)(x, t, y), source(x, t, y))  # full attention is the source
    with pytest.raises(ValueError, match="names full attention, which is the source itself"):
        graft_to_folder(path, tmp_path / "refused", [4, "full"], **common)


def test_distilling_a_shared_graft_fits_one_drawn_count_per_step_and_resumes_bit_identically(tmp_path):
    from mediator_models.graft import distill_layers

    source = tiny_model("SiT-T/2", input_size=8, in_channels=1)
    path = atomic_save(grafted_checkpoint(source, ProcessConfig("SiT"), {}), tmp_path / "full.pt")
    one = graft_to_folder(path, tmp_path / "g", [4, 16, "full"], shared=True, samples=0, progress=False)
    straight, halted = (tmp_path / name for name in ("straight.pt", "halted.pt"))
    for copy in (straight, halted):
        copy.write_bytes(one.shared.read_bytes())
    sampler = SamplerConfig(kind="ode", method="euler", steps=3)
    common = dict(lr=1e-3, batch_size=2, save_every=1)
    distill_layers(source, straight, ProcessConfig("SiT"), sampler, steps=4, **common)
    distill_layers(source, halted, ProcessConfig("SiT"), sampler, steps=2, **common)
    distill_layers(source, halted, ProcessConfig("SiT"), sampler, steps=4, **common)
    a, b = read_checkpoint(straight), read_checkpoint(halted)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    log = [json.loads(line) for line in straight.with_suffix(".log.jsonl").read_text().splitlines()]
    drawn = [drawn_count(COUNTS, 1, step) for step in range(4)]  # the distillation's seed is the sampling seed + 1
    assert [r["mediators"] for r in log] == ["full" if c is None else c for c in drawn]
    grafted = read_checkpoint(one.shared)["model"]
    for count in (4, 16):  # a count's tables move only when a step fitted it
        key = f"blocks.0.attn.biases.{count}.an_bias"
        assert (not torch.equal(grafted[key], a["model"][key])) == (count in drawn)


@pytest.mark.slow
def test_two_rank_training_of_a_shared_network_leaves_the_other_counts_tables_out_of_each_step(tmp_path):
    """Under DDP each step's graph lacks the counts not drawn; the same count on every rank, and DDP told so."""
    from helpers import run_two_gloo_ranks

    code = (
        "from mediator_models.train import TrainConfig, train\n"
        f"train(TrainConfig(model='SiT-T/4', attention='mediator', mediators=(4, 16, None), global_batch_size=8, "
        f"steps=4, ckpt_every=2, log_every=2, out=r'{tmp_path}', progress=False))\n"
    )
    assert run_two_gloo_ranks(code) == [0, 0]
    assert read_checkpoint(tmp_path / "checkpoints/0000004.pt")["step"] == 4
