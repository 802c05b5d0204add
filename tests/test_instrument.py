"""The recorder: invisible to outputs, complete in what it records, bounded in what it keeps."""

from __future__ import annotations

import pytest
import torch

from analysis.collect import collect_redundancy
from analysis.metrics import metric_reducer
from helpers import tiny_model
from mediator_models.instrument import record_attention
from mediator_models.sample import start_batch
from mediator_models.sampling import ProcessConfig, SamplerConfig, generate

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
    with record_attention(model, metric_reducer(("jsd",)), layers=[1, 3], heads=[0, 2], keep_maps=[(1, 3)],
                          keep_dir=tmp_path) as recorder:  # fmt: skip
        run(model, SamplerConfig(kind="sde", steps=3), recorder.callback, batch=2)
    rows = recorder.rows()
    assert {r["layer"] for r in rows} == {1, 3} and {r["head"] for r in rows} == {0, 2, -1}
    assert model.attention_modules()[0].map_observer is None
    (kept,) = tmp_path.glob("*.pt")
    payload = torch.load(kept)
    assert (payload["step"], payload["layer"], payload["kind"]) == (1, 3, "mediator")
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
        collect_redundancy(model, process, sampler, CollectionConfig(samples=4, batch_size=2), state_path=state, progress=False)
    monkeypatch.setattr(collect_module, "generate", real_generate)
    assert torch.load(state, weights_only=False)["done"] == 2
    resumed = collect_redundancy(model, process, sampler, CollectionConfig(samples=4, batch_size=2), state_path=state,
                                 progress=False)  # fmt: skip
    assert len(resumed) == len(one_go) == 3 * 4 * 5 * 3
    for column in ("mean", "std"):
        # Equal up to float rounding: kernels may sum in another order for another batch size.
        torch.testing.assert_close(torch.tensor(resumed[column].values), torch.tensor(one_go[column].values),
                                   atol=1e-7, rtol=1e-5)  # fmt: skip
    assert set(resumed["count"]) == {4}
    with pytest.raises(ValueError, match="another configuration"):
        collect_redundancy(model, process, sampler, CollectionConfig(samples=8, batch_size=2), state_path=state, progress=False)
