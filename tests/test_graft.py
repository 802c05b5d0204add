"""Grafting mediators onto a trained full-attention network: shared tensors copied bit for bit, the result loads
strictly, and its training-free error equals what the premise measure recovery_pooled_N predicted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model

from analysis.cli import main
from mediator_models.graft import MEDIATOR_TENSORS, graft, graft_to_folder
from mediator_models.sample import load_for_sampling
from mediator_models.sampling.generation import SamplerConfig
from mediator_models.storage.checkpoints import read_checkpoint
from mediator_models.storage.runfolder import FolderLock
from mediator_models.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A full-attention SiT-T/2 on 8-px digits (16 tokens) after a couple of dozen steps: maps that are no longer
    those of random weights."""
    out = tmp_path_factory.mktemp("graft") / "run"
    config = TrainConfig(
        model="SiT-T/2",
        data="digits",
        image_size=8,
        global_batch_size=8,
        steps=24,
        lr=1e-3,
        ema_decay=0.9,
        log_every=24,
        ckpt_every=24,
        out=str(out),
        progress=False,
    )
    return train(config) / "checkpoints" / "0000024.pt"


def official_file(tmp_path):
    path = tmp_path / "official.pt"
    torch.save(tiny_model("DiT-T/2", input_size=8).state_dict(), path)
    return path, {"model_name": "DiT-T/2", "input_size": 8}


def diffusers_folder(tmp_path):
    from test_diffusers import tiny_diffusers_dit

    folder = tmp_path / "transformer"
    tiny_diffusers_dit().save_pretrained(str(folder))
    return folder, {}


@pytest.mark.parametrize("source", ["ours", "official", "diffusers"])
def test_grafting_copies_every_shared_tensor_bit_for_bit_zeroes_the_rest_and_loads_strictly(tmp_path, trained, source):
    path, flags = {"ours": lambda _: (trained, {}), "official": official_file, "diffusers": diffusers_folder}[source](
        tmp_path
    )
    result = graft_to_folder(path, tmp_path / "out", [4, 16], samples=0, progress=False, **flags)
    assert sorted(p.name for p in result.checkpoints.values()) == ["med16.pt", "med4.pt"] and result.errors == []
    original = load_for_sampling(path, **flags).model.state_dict()
    if source == "official":  # the file's own tensors, not only what loading made of them
        assert all(torch.equal(original[k], v) for k, v in torch.load(path).items())
    for count, checkpoint in result.checkpoints.items():
        loaded = load_for_sampling(checkpoint)  # strict, like any mediator checkpoint
        assert loaded.model.config.attention == "mediator" and loaded.model.config.mediators == count
        grafted = loaded.model.state_dict()
        for key, tensor in original.items():
            assert grafted[key].dtype == tensor.dtype and torch.equal(grafted[key], tensor), key
        added = [k for k in grafted if k not in original]
        assert added and all(k.endswith(tuple(MEDIATOR_TENSORS)) and not grafted[k].any() for k in added)
        saved = read_checkpoint(checkpoint)
        assert (
            saved["graft"]["mediators"] == count
            and saved["graft"]["source_weights"] == load_for_sampling(path, **flags).weights
        )


def test_grafted_layer_with_zero_biases_and_conv_computes_the_pooled_mediator_form():
    source = tiny_model("SiT-T/2", input_size=8)
    full, mediator = source.blocks[0].attn, graft(source, 4).blocks[0].attn
    x = torch.randn(2, 16, 128)
    q, k, v = (t.reshape(2, 16, 4, 32).transpose(1, 2).double() for t in full.qkv(x).chunk(3, dim=-1))
    pooled = q.reshape(2, 4, 2, 2, 2, 2, 32).mean(dim=(3, 5)).reshape(2, 4, 4, 32)  # 4×4 grid -> 2×2 mediators
    s = 32**-0.5
    mixed = (s * q @ pooled.transpose(-2, -1)).softmax(-1) @ ((s * pooled @ k.transpose(-2, -1)).softmax(-1) @ v)
    expected = full.proj.double()(mixed.transpose(1, 2).reshape(2, 16, 128))
    torch.testing.assert_close(mediator(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_training_free_error_equals_the_premise_measure_per_layer_and_step(tmp_path, trained):
    import pandas as pd

    from analysis.collect import CollectionConfig, collect_redundancy

    sampler = SamplerConfig(kind="sde", steps=6)
    result = graft_to_folder(
        trained, tmp_path / "out", [4, 16], sampler=sampler, samples=3, batch_size=2, progress=False
    )
    loaded = load_for_sampling(trained)
    premise = collect_redundancy(
        loaded.model,
        loaded.process,
        sampler,
        CollectionConfig(samples=3, batch_size=3, metrics=("recovery_pooled_4", "recovery_pooled_16")),
        progress=False,
    )
    measured = pd.DataFrame(result.errors)
    for count in (4, 16):
        predicted = premise[premise["metric"] == f"recovery_pooled_{count}"].set_index(["step", "layer", "head"])
        errors = measured[(measured["mediators"] == count) & (measured["metric"] == "mixing_error")]
        errors = errors.set_index(["step", "layer", "head"]).reindex(predicted.index)
        assert len(predicted) == 6 * 4 * 5  # steps × layers × (4 heads and their mean)
        assert predicted["mean"].min() > 0.01  # a real error, not a vanishing one
        torch.testing.assert_close(
            torch.tensor(errors["mean"].to_numpy()), torch.tensor(predicted["mean"].to_numpy()), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(
            torch.tensor(errors["noise_level"].to_numpy()), torch.tensor(predicted["noise_level"].to_numpy())
        )
    outputs = measured[measured["metric"] == "output_error"]
    assert set(outputs["head"]) == {-1} and (outputs["mean"] > 0).all()


def test_graft_command_writes_one_network_per_count_prints_the_table_and_keeps_its_folder(tmp_path, trained, capsys):
    out = tmp_path / "out"
    command = ["graft", "--ckpt", str(trained), "--mediators", "4", "16", "--steps", "3", "--samples", "2"]
    assert main([*command, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training-free relative error per layer" in printed and str(out / "med16.pt") in printed
    assert sorted(p.name for p in out.iterdir()) == ["errors.json", "graft.json", "med16.pt", "med4.pt"]
    assert main([*command, "--out", str(out)]) == 0  # the same command again remakes the same networks
    capsys.readouterr()
    assert main(["graft", "--ckpt", str(trained), "--mediators", "4", "--steps", "3", "--out", str(out)]) == 2
    assert "mediators: folder has [4, 16], this run has [4]" in capsys.readouterr().err
    with FolderLock(out, "another graft"):
        assert main([*command, "--out", str(out)]) == 2
        assert "is in use by another run (another graft" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mediators", "5"], "attnmed graft: error: --mediators 5: mediator count 5 is not a perfect square"),
        (["--mediators", "4", "4"], "attnmed graft: error: --mediators names [4] more than once"),
        (
            ["--mediators", "4", "--samples", "-1"],
            "attnmed graft: error: --samples must be a whole number of at least 0",
        ),
        (["--mediators", "4", "--sampler", "ode"], "attnmed graft: error: --method dopri5 picks its steps per batch"),
        (["--mediators", "4", "--classes", "10"], "attnmed graft: error: --classes [10] out of range"),
        (["--mediators", "4", "--distill-steps", "-2"], "attnmed graft: error: --distill-steps must be a whole number"),
        (["--mediators", "4", "--distill-lr", "0"], "attnmed graft: error: --distill-lr must be a positive number"),
        (
            ["--mediators", "4", "--data-free"],
            "attnmed graft: error: --data-free applies to end-to-end distillation only: add --end-to-end-steps N",
        ),
        (
            ["--mediators", "4", "--end-to-end-steps", "2", "--teacher-weight", "-1"],
            "attnmed graft: error: --teacher-weight must be 0 or positive",
        ),
        (
            ["--mediators", "4", "--end-to-end-steps", "2", "--data-free", "--data", "digits"],
            "attnmed graft: error: --data-free trains on the source's own samples, but data 'digits' is named too",
        ),
        (
            ["--mediators", "4", "--end-to-end-steps", "2", "--end-to-end-ema-decay", "1"],
            "attnmed graft: error: --end-to-end-ema-decay must lie in [0, 1)",
        ),
    ],
)
def test_bad_graft_settings_are_one_line_naming_the_flag_and_leave_no_folder(tmp_path, trained, capsys, flags, message):
    assert main(["graft", "--ckpt", str(trained), *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_grafting_a_mediator_network_is_refused_naming_the_file(tmp_path, trained, capsys):
    graft_to_folder(trained, tmp_path / "out", [4], samples=0, progress=False)
    mediator = tmp_path / "out" / "med4.pt"
    assert main(["graft", "--ckpt", str(mediator), "--mediators", "4", "--out", str(tmp_path / "again")]) == 2
    assert f"{mediator} holds SiT-T/2 (mediator n=4) @8; grafting needs a full-attention" in capsys.readouterr().err


def test_layerwise_distillation_resumes_after_a_kill_to_the_same_weights_and_fits_the_source_layers(
    tmp_path, trained, monkeypatch
):
    import mediator_models.graft as grafting

    settings = dict(sampler=SamplerConfig(kind="sde", steps=3), samples=0, batch_size=2, progress=False)
    settings.update(distill_steps=4, distill_lr=3e-4, save_every=1)
    straight = graft_to_folder(trained, tmp_path / "straight", [4], **settings).checkpoints[4]
    real, calls = grafting._distill_step, []

    def killed_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(grafting, "_distill_step", killed_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        graft_to_folder(trained, tmp_path / "resumed", [4], **settings)
    assert read_checkpoint(tmp_path / "resumed" / "med4.pt")["step"] == 2
    monkeypatch.setattr(grafting, "_distill_step", real)
    resumed = graft_to_folder(trained, tmp_path / "resumed", [4], **settings).checkpoints[4]
    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key, moments in a["opt"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], b["opt"]["state"][key]["exp_avg_sq"])
    logged = (tmp_path / "resumed" / "med4.log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3, 4]

    loaded = load_for_sampling(trained)
    distilled = load_for_sampling(resumed).model
    source = loaded.model.state_dict()
    assert all(
        torch.equal(t, source[k]) for k, t in distilled.state_dict().items() if ".attn." not in k and k in source
    )
    # Fitting: repeated on the same trajectories, the layer-wise loss falls (a small rate: the grafted layers start
    # close, and AdamW's first steps move every weight by about the rate).
    student = graft(loaded.model, 4).requires_grad_(False)
    fitted = [p.requires_grad_(True) for m in student.attention_modules() for p in m.parameters()]
    opt = torch.optim.AdamW(fitted, lr=3e-5, weight_decay=0.0)
    losses = [
        grafting._distill_step(loaded.model, student, opt, loaded.process, settings["sampler"], [0, 1], 1, None, 3)
        for _ in range(4)
    ]
    assert losses[-1] < 0.99 * losses[0]
