"""The recorder: invisible to outputs, complete in what it records, bounded in what it keeps."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import tiny_model

from analysis.collect import collect_redundancy
from analysis.metrics import metric_reducer
from mediator_models.recording.recorder import record_attention
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch

CASES = [
    ("DiT-T/2", "full", None, SamplerConfig(kind="ddpm", steps=6)),
    ("DiT-T/2", "mediator", 4, SamplerConfig(kind="ddim", steps=6)),
    ("SiT-T/2", "full", None, SamplerConfig(kind="sde", steps=6)),
    ("SiT-T/2", "mediator", 4, SamplerConfig(kind="ode", method="heun", steps=3)),
]


def run(model, sampler, callback=None, batch=3):
    x_T, y, noise = start_batch(list(range(batch)), 0, model.config, None, "cpu")
    return generate(model, ProcessConfig(model.config.family), sampler, x_T, y, callback=callback, noise_fn=noise)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("name,attention,mediators,sampler", CASES)
def test_recording_leaves_samples_unchanged(name, attention, mediators, sampler, cfg_scale):
    model = tiny_model(name, attention=attention, mediators=mediators)
    sampler = SamplerConfig(**{**sampler.to_dict(), "cfg_scale": cfg_scale})
    plain, _ = run(model, sampler)
    with record_attention(model, metric_reducer()) as recorder:
        recorded, caller = run(model, sampler, recorder.callback)
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)  # the fused output is kept: bit for bit
    assert all(m.map_observer is None for m in model.attention_modules())  # detached: fused path again
    branches = {row["branch"] for row in recorder.rows()}
    assert branches == ({"cond", "uncond"} if cfg_scale != 1.0 else {"all"})
    steps = {row["step"] for row in recorder.rows()}
    assert steps == set(range(caller.nfe))


def test_rows_cover_every_step_layer_head_and_metric_with_the_sample_count():
    model = tiny_model("SiT-T/2")
    with record_attention(model, metric_reducer(("jsd", "entropy"))) as recorder:
        run(model, SamplerConfig(kind="sde", steps=4), recorder.callback, batch=5)
    rows = recorder.rows()
    assert len(rows) == 4 * 4 * 5 * 2  # steps × layers × (4 heads + their mean) × metrics
    assert {r["count"] for r in rows} == {5}
    assert {r["head"] for r in rows} == {0, 1, 2, 3, -1}
    levels = sorted({(r["step"], r["noise_level"]) for r in rows})
    assert levels[0] == (0, 1.0) and all(a[1] > b[1] for a, b in zip(levels, levels[1:]))


def test_head_average_row_is_the_mean_of_the_head_rows():
    model = tiny_model("SiT-T/2")
    with record_attention(model, metric_reducer(("entropy",))) as recorder:
        run(model, SamplerConfig(kind="sde", steps=2), recorder.callback)
    rows = [r for r in recorder.rows() if r["step"] == 1 and r["layer"] == 2]
    heads = [r["mean"] for r in rows if r["head"] >= 0]
    average = next(r for r in rows if r["head"] == -1)
    assert average["mean"] == pytest.approx(sum(heads) / 4)


def test_layer_and_head_selection_and_kept_maps(tmp_path):
    model = tiny_model("SiT-T/2", attention="mediator", mediators=4)
    with record_attention(
        model, metric_reducer(("jsd",)), layers=[3, 1], heads=[2, 0], keep_maps=[(1, 3)], keep_dir=tmp_path
    ) as recorder:  # selections given out of order are kept ascending, and the kept file says which heads it holds
        run(model, SamplerConfig(kind="sde", steps=3), recorder.callback, batch=2)
    rows = recorder.rows()
    assert {r["layer"] for r in rows} == {1, 3} and {r["head"] for r in rows} == {0, 2, -1}
    assert model.attention_modules()[0].map_observer is None
    (kept,) = tmp_path.glob("*.pt")
    payload = torch.load(kept)
    assert (payload["step"], payload["layer"], payload["kind"]) == (1, 3, "mediator") and payload["heads"] == [0, 2]
    assert payload["effective"].shape == (2, 2, 16, 16) and payload["query_to_mediator"].shape == (2, 2, 16, 4)
    torch.testing.assert_close(payload["effective"], payload["query_to_mediator"] @ payload["mediator_to_key"])


def test_recorder_detaches_even_when_sampling_fails():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(model, metric_reducer()):
            raise RuntimeError("boom")
    assert all(m.map_observer is None for m in model.attention_modules())


def test_recorder_without_the_step_callback_says_how_to_fix_it():
    model = tiny_model()
    with record_attention(model, metric_reducer()):
        with pytest.raises(RuntimeError, match="pass recorder.callback to the sampler"):
            run(model, SamplerConfig(kind="ddpm", steps=2))


def test_collection_is_independent_of_batching_and_resumes_after_interruption(tmp_path, monkeypatch):
    model = tiny_model("SiT-T/2")
    process, sampler = ProcessConfig("SiT"), SamplerConfig(kind="sde", steps=3)
    from analysis import collect as collect_module
    from analysis.collect import CollectionConfig

    one_go = collect_redundancy(model, process, sampler, CollectionConfig(samples=4, batch_size=4), progress=False)
    calls = {"n": 0}
    real_generate = collect_module.generate

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    state = tmp_path / "state.pt"
    monkeypatch.setattr(collect_module, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_redundancy(
            model, process, sampler, CollectionConfig(samples=4, batch_size=2), state_path=state, progress=False
        )
    monkeypatch.setattr(collect_module, "generate", real_generate)
    assert torch.load(state, weights_only=False)["done"] == 2
    resumed = collect_redundancy(
        model, process, sampler, CollectionConfig(samples=4, batch_size=2), state_path=state, progress=False
    )
    assert len(resumed) == len(one_go) == 3 * 4 * 5 * 3
    for column in ("mean", "std"):
        # Equal up to float rounding: kernels may sum in another order for another batch size.
        torch.testing.assert_close(
            torch.tensor(resumed[column].values), torch.tensor(one_go[column].values), atol=1e-7, rtol=1e-5
        )
    assert set(resumed["count"]) == {4}
    with pytest.raises(ValueError, match="another configuration"):
        collect_redundancy(
            model, process, sampler, CollectionConfig(samples=8, batch_size=2), state_path=state, progress=False
        )


@pytest.mark.parametrize(
    "options,message",
    [
        ({"layers": [-9]}, r"layers: takes indices from 0 up, got \[-9\]"),
        ({"layers": [7]}, r"layers: \[7\] do not exist in .*: it has layers 0..3"),
        ({"layers": []}, "layers: was given without values"),
        ({"heads": [99]}, r"heads: \[99\] do not exist in .*: it has heads 0..3"),
        ({"heads": [-1]}, "−1 is the head average"),
        ({"heads": [1, 1]}, r"heads: names \[1\] more than once"),
        ({"keep_maps": [(1, 2, 3)], "keep_dir": "x"}, r"keep_maps: takes \(step, layer\) pairs"),
        (
            {"layers": [0], "keep_maps": [(0, 2)], "keep_dir": "x"},
            r"keep_maps: \[\(0, 2\)\]: those layers are not recorded",
        ),
    ],
)
def test_bad_selections_are_refused_when_the_recorder_attaches_before_any_sampling(options, message):
    model = tiny_model("SiT-T/2")
    with pytest.raises(ValueError, match=message):
        with record_attention(model, metric_reducer(), **options):
            pytest.fail("the recorder attached")
    assert all(m.map_observer is None for m in model.attention_modules())


def test_adaptive_solvers_are_refused_so_every_row_is_one_noise_level():
    from analysis.collect import CollectionConfig

    model = tiny_model("SiT-T/2")
    with pytest.raises(ValueError, match="needs a fixed-step sampler .* --method euler or heun"):
        collect_redundancy(
            model, ProcessConfig("SiT"), SamplerConfig(kind="ode", steps=4), CollectionConfig(samples=2), progress=False
        )
    # Through the Python API the recorder itself notices a second batch evaluated at other levels.
    with record_attention(model, metric_reducer(("entropy",))) as recorder:
        run(model, SamplerConfig(kind="sde", steps=4), recorder.callback)
        with pytest.raises(ValueError, match="one row would mix noise levels"):
            run(model, SamplerConfig(kind="sde", steps=6), recorder.callback)


def test_noise_levels_seen_by_callbacks_stay_within_zero_and_one_for_dopri5():
    model = tiny_model("SiT-T/2")
    levels = []
    run(model, SamplerConfig(kind="ode", method="dopri5", steps=2), lambda info: levels.append(info.noise_level))
    assert levels and min(levels) >= 0.0 and max(levels) <= 1.0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--keep-maps", "1:2:3"], "--keep-maps takes STEP:LAYER pairs such as 0:3, got '1:2:3'"),
        (["--keep-maps", "999:1"], r"--keep-maps \[\(999, 1\)\]: this sampler evaluates steps 0..2 only"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--metrics", "bogus"], r"unknown metrics \['bogus'\]"),
        (["--heads", "99"], r"--heads \[99\] do not exist"),
        (["--layers"], "--layers was given without values"),
        (["--sampler", "ode"], "needs a fixed-step sampler"),
    ],
)
def test_bad_record_flags_fail_before_sampling_with_one_line(tmp_path, capsys, monkeypatch, flags, message):
    from analysis import collect as collect_module
    from analysis.cli import main
    from mediator_models import build_model

    checkpoint = tmp_path / "sit.pt"
    torch.save(build_model("SiT-T/2", input_size=8).state_dict(), checkpoint)
    monkeypatch.setattr(collect_module, "generate", lambda *a, **k: pytest.fail("sampling started"))
    args = ["record", "--ckpt", str(checkpoint), "--model", "SiT-T/2", "--input-size", "8", "--steps", "3", *flags]
    code = main([*args, "--out", str(tmp_path / "t.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("attnmed record: error: ") and re.search(message, err), err


@pytest.mark.slow
def test_record_under_two_ranks_gives_the_single_process_table(tmp_path):
    """`attnmed record` under two Gloo ranks (torchrun's environment): ranks split the samples, rank 0 merges."""
    import pandas as pd
    from helpers import run_two_gloo_ranks

    from analysis.cli import main
    from mediator_models import build_model

    checkpoint = tmp_path / "sit.pt"
    torch.save(build_model("SiT-T/2", input_size=8).state_dict(), checkpoint)
    args = [
        "record",
        "--ckpt",
        str(checkpoint),
        "--model",
        "SiT-T/2",
        "--input-size",
        "8",
        "--steps",
        "4",
        "--samples",
        "6",
        "--batch-size",
        "2",
        "--metrics",
        "all",
    ]
    assert main([*args, "--out", str(tmp_path / "one.parquet")]) == 0
    code = f"import sys; from analysis.cli import main; sys.exit(main({[*args, '--out', str(tmp_path / 'two.parquet')]!r}))"
    assert run_two_gloo_ranks(code) == [0, 0]
    one, two = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    assert len(one) == len(two) and set(two["count"]) == {6}
    keys = ["network", "step", "layer", "head", "branch", "metric"]
    merged = one.merge(two, on=keys, suffixes=("_one", "_two"))
    assert len(merged) == len(one)
    torch.testing.assert_close(
        torch.tensor(merged["mean_two"].values), torch.tensor(merged["mean_one"].values), atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(merged["std_two"].values), torch.tensor(merged["std_one"].values), atol=1e-6, rtol=1e-4
    )
    assert not list(tmp_path.glob(".two.parquet.state.pt*"))


@pytest.mark.parametrize("attention,mediators", [("full", None), ("mediator", 4)])
def test_a_memory_bound_changes_how_maps_are_reduced_never_what_is_recorded(attention, mediators):
    """With room for one map at a time, the layer's maps are computed and reduced map by map; the table is the
    whole layer's, sampled JSD pairs included (each map draws its pairs from its own contents)."""
    from analysis.metrics import ALL_METRICS
    from mediator_models.recording.recorder import MAP_ENTRY_BYTES

    model = tiny_model("SiT-T/2", input_size=16, attention=attention, mediators=mediators)  # 64 tokens, 4 heads
    reducer = metric_reducer(ALL_METRICS, jsd_pairs=100)  # fewer pairs than the 2016 there are: sampled
    tables = []
    for budget in (None, 64 * 64 * MAP_ENTRY_BYTES, 3 * 64 * 64 * MAP_ENTRY_BYTES):
        with record_attention(model, reducer, map_memory=budget or 2**40) as recorder:
            run(model, SamplerConfig(kind="sde", steps=2), recorder.callback, batch=3)
        tables.append({(r["step"], r["layer"], r["head"], r["metric"]): r["mean"] for r in recorder.rows()})
    for table in tables[1:]:
        assert table.keys() == tables[0].keys()
        for key, value in table.items():
            assert value == pytest.approx(tables[0][key], rel=1e-5, abs=1e-6), key


def test_a_memory_bound_below_one_map_is_refused_naming_what_one_map_needs():
    from mediator_models.storage.errors import SettingError

    model = tiny_model("SiT-T/2", input_size=16)
    with pytest.raises(SettingError, match=r"one 64×64 map and its reductions need about 128 KiB"):
        with record_attention(model, metric_reducer(), map_memory=1000) as recorder:
            run(model, SamplerConfig(kind="sde", steps=1), recorder.callback)
