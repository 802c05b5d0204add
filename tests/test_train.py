"""Training: exact resume, divergence handling, config checks, DDP gradients, latents."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mediator_models import build_model
from mediator_models.sampling.generation import ProcessConfig
from mediator_models.storage.checkpoints import read_checkpoint
from mediator_models.train import TrainConfig, TrainingDiverged, backward_on_batch, batch_indices, train


def tiny_config(out, **changes) -> TrainConfig:
    base = dict(
        model="SiT-T/4",
        data="digits",
        image_size=16,
        global_batch_size=8,
        steps=6,
        lr=1e-3,
        ema_decay=0.9,
        log_every=2,
        ckpt_every=3,
        keep_checkpoints=None,
        out=str(out),
        progress=False,
    )
    return TrainConfig(**{**base, **changes})


def states_equal(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=0, rtol=0, msg=f"{key}.{name}")
    for (ka, va), (kb, vb) in zip(a["opt"]["state"].items(), b["opt"]["state"].items()):
        torch.testing.assert_close(va["exp_avg"], vb["exp_avg"], atol=0, rtol=0)


@pytest.mark.parametrize("model,attention,mediators", [("SiT-T/4", "full", None), ("DiT-T/4", "mediator", 4)])
def test_killed_and_resumed_run_reaches_the_same_weights(tmp_path, model, attention, mediators):
    straight = train(tiny_config(tmp_path / "a", model=model, attention=attention, mediators=mediators))
    train(tiny_config(tmp_path / "b", model=model, attention=attention, mediators=mediators, steps=3))
    resumed = train(tiny_config(tmp_path / "b", model=model, attention=attention, mediators=mediators), resume=True)
    states_equal(
        read_checkpoint(straight / "checkpoints/0000006.pt"), read_checkpoint(resumed / "checkpoints/0000006.pt")
    )
    records = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [2, 3, 4, 6]  # the first run logs its last step
    (event,) = [r for r in records if "event" in r]
    assert event["event"] == "resume" and event["step"] == 3 and event["changed"] == {"steps": {"from": 3, "to": 6}}


def test_checkpoint_holds_everything_needed(tmp_path):
    run = train(tiny_config(tmp_path, steps=3))
    checkpoint = read_checkpoint(run / "checkpoints/0000003.pt")
    assert set(checkpoint) >= {"model", "ema", "opt", "args", "model_config", "process", "step", "rng"}
    assert checkpoint["step"] == 3 and checkpoint["args"]["lr"] == 1e-3
    assert checkpoint["model_config"]["in_channels"] == 1 and checkpoint["model_config"]["input_size"] == 16
    assert not any(torch.equal(checkpoint["model"][k], checkpoint["ema"][k]) for k in ["blocks.0.attn.qkv.weight"])


def test_starting_over_an_existing_run_or_resuming_with_other_settings_is_refused(tmp_path):
    train(tiny_config(tmp_path, steps=3))
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train(tiny_config(tmp_path))
    with pytest.raises(ValueError, match=r"ema_decay: checkpoint has 0.9, command line has 0.5(.|\n)*class_dropout"):
        train(tiny_config(tmp_path, lr=1e-2, ema_decay=0.5, class_dropout_prob=0.2), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from mediator_models.sampling import transport

    original = transport.Transport.training_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        terms = original(self, *args, **kwargs)
        if calls["n"] > 4:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(transport.Transport, "training_loss", poisoned)
    with pytest.raises(
        TrainingDiverged, match=r"normal range at step 4 \(non-finite\)(.|\n)*0000003.pt(.|\n)*--resume --lr"
    ):
        train(tiny_config(tmp_path))
    assert read_checkpoint(tmp_path / "checkpoints/0000003.pt")["step"] == 3
    assert not (tmp_path / "checkpoints/0000006.pt").exists()


def test_batches_cover_epochs_and_ranks_split_the_global_batch():
    first_epoch = [batch_indices(20, 4, s, 0, 1, seed=1) for s in range(5)]
    assert sorted(int(i) for b in first_epoch for i in b) == list(range(20))
    for step in (0, 7):
        whole = batch_indices(20, 4, step, 0, 1, seed=1)
        parts = [batch_indices(20, 4, step, r, 2, seed=1) for r in range(2)]
        assert list(whole) == list(parts[0]) + list(parts[1])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batch_indices(3, 4, 0, 0, 1, seed=0)


def test_batch_that_does_not_split_into_accumulation_steps_fails_before_work(tmp_path):
    with pytest.raises(ValueError, match="does not split into 3 accumulation steps"):
        train(tiny_config(tmp_path, grad_accum=3))
    assert not (tmp_path / "checkpoints").exists()


def test_gradient_accumulation_gives_the_full_batch_gradient():
    model = build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=10, class_dropout_prob=0.0)
    process = ProcessConfig("SiT").build()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    t, noise = torch.rand(8), torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.1)
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        backward_on_batch(model, process, x, y, accum, t=t, noise=noise)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _ddp_worker(rank: int, init_file: str, data: dict, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10, class_dropout_prob=0.0)
    model.load_state_dict(data["state"])
    net = torch.nn.parallel.DistributedDataParallel(model)
    half = slice(rank * 4, (rank + 1) * 4)
    process = ProcessConfig("DiT").build()
    backward_on_batch(
        net, process, data["x"][half], data["y"][half], grad_accum=2, t=data["t"][half], noise=data["noise"][half]
    )
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_file)
    dist.destroy_process_group()


def test_two_gloo_processes_compute_the_gradient_of_one_process_on_the_full_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10, class_dropout_prob=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(0, 0.05)
    data = {
        "state": model.state_dict(),
        "x": torch.randn(8, 1, 16, 16),
        "y": torch.randint(0, 10, (8,)),
        "t": torch.randint(0, 1000, (8,)),
        "noise": torch.randn(8, 1, 16, 16),
    }
    backward_on_batch(model, ProcessConfig("DiT").build(), data["x"], data["y"], t=data["t"], noise=data["noise"])
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out_file = str(tmp_path / "grads.pt")
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), data, out_file), nprocs=2, start_method="spawn")
    got = torch.load(out_file)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_style_two_rank_training_run(tmp_path):
    """The real `train()` under two Gloo ranks set up from torchrun's environment variables."""
    from helpers import run_two_gloo_ranks

    code = (
        "from mediator_models.train import TrainConfig, train\n"
        f"train(TrainConfig(model='SiT-T/4', global_batch_size=8, steps=4, ckpt_every=2, log_every=2, out=r'{tmp_path}', progress=False))\n"
    )
    assert run_two_gloo_ranks(code) == [0, 0]
    assert read_checkpoint(tmp_path / "checkpoints/0000004.pt")["step"] == 4


def test_training_on_cached_latents_and_on_the_fly_vae(tmp_path, tiny_vae_path):
    from test_data import make_folder

    from mediator_models.data import ImageFolderSource, cache_latents, load_vae

    folder = make_folder(tmp_path / "images", sizes=((40, 40),) * 4)
    cache = cache_latents(ImageFolderSource(folder, 32), load_vae(str(tiny_vae_path)), tmp_path / "latents")
    run = train(tiny_config(tmp_path / "cached", model="SiT-T/2", data=str(cache), image_size=32, steps=2))
    assert read_checkpoint(run / "checkpoints/0000002.pt")["model_config"]["in_channels"] == 4
    run = train(
        tiny_config(
            tmp_path / "online", model="DiT-T/2", data=str(folder), image_size=32, vae=str(tiny_vae_path), steps=2
        )
    )
    config = read_checkpoint(run / "checkpoints/0000002.pt")["model_config"]
    assert (config["in_channels"], config["input_size"], config["num_classes"]) == (4, 4, 2)


def test_a_latent_cache_sets_the_image_size_and_another_one_asked_for_is_refused(tmp_path, tiny_vae_path):
    from test_data import make_folder

    from mediator_models.data import ImageFolderSource, cache_latents, load_vae
    from mediator_models.storage.errors import SettingError

    folder = make_folder(tmp_path / "images", sizes=((40, 40),) * 4)
    cache = cache_latents(ImageFolderSource(folder, 32), load_vae(str(tiny_vae_path)), tmp_path / "latents")
    run = train(tiny_config(tmp_path / "cached", model="SiT-T/2", data=str(cache), image_size=None, steps=1))
    assert json.loads((run / "config.json").read_text())["train"]["image_size"] == 32  # what the run trained at
    with pytest.raises(SettingError, match="holds latents of 32 px images"):
        train(tiny_config(tmp_path / "wrong", model="SiT-T/2", data=str(cache), image_size=16, steps=1))
    assert not (tmp_path / "wrong").exists()  # a refused start leaves no empty run folder behind


def test_a_dit_run_records_no_sit_process_settings_and_refuses_them(tmp_path, capsys):
    from analysis.cli import main

    run = train(tiny_config(tmp_path / "dit", model="DiT-T/4", steps=1))
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["interpolant"] is None and saved["prediction"] is None
    sit = json.loads(train(tiny_config(tmp_path / "sit", steps=1)).joinpath("config.json").read_text())["train"]
    assert (sit["interpolant"], sit["prediction"]) == ("linear", "velocity")  # the defaults, recorded
    out = tmp_path / "refused"
    assert main(["train", "--model", "DiT-T/4", "--prediction", "noise", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "attnmed train: error: --prediction applies to SiT models only" in err and not out.exists()


def test_resume_with_nothing_to_continue_is_refused_and_leaves_nothing(tmp_path, capsys):
    from analysis.cli import main

    out = tmp_path / "new" / "run"
    assert main(["train", "--resume", "--steps", "1", "--no-progress", "--out", str(out)]) == 2
    assert "--resume has nothing to continue" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_global_batch_that_does_not_divide_across_ranks_fails_before_work(tmp_path, monkeypatch):
    from mediator_models import train as train_module

    monkeypatch.setattr(train_module, "init_distributed", lambda: train_module.DistEnv(rank=0, world_size=3))
    with pytest.raises(ValueError, match="global batch 8 does not divide across 3 ranks; use a multiple of 3"):
        train(tiny_config(tmp_path))
    assert not tmp_path.joinpath("checkpoints").exists()


def test_a_second_run_into_the_same_folder_is_refused_at_start(tmp_path):
    from mediator_models.storage.runfolder import FolderBusyError, FolderLock

    with FolderLock(tmp_path, "attnmed train"):  # a first run, still training
        with pytest.raises(FolderBusyError, match="in use by another run"):
            train(tiny_config(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_optimizer_and_ema_updates_stops_at_a_whole_step_and_resumes_exactly(
    tmp_path, monkeypatch, signum
):
    from mediator_models import train as train_module
    from mediator_models.train import TrainingInterrupted

    straight = train(tiny_config(tmp_path / "a", ckpt_every=100))
    real_update = train_module.update_ema
    calls = {"n": 0}

    def signalled(*args, **kwargs):  # the worst moment: weights updated, EMA and step count not yet
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signum)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_module, "update_ema", signalled)
    with pytest.raises(TrainingInterrupted) as caught:
        train(tiny_config(tmp_path / "b", ckpt_every=100))
    monkeypatch.setattr(train_module, "update_ema", real_update)
    assert caught.value.signum == signum and caught.value.checkpoint.name == "0000003.pt"
    assert read_checkpoint(caught.value.checkpoint)["step"] == 3
    resumed = train(tiny_config(tmp_path / "b", ckpt_every=100), resume=True)
    states_equal(
        read_checkpoint(straight / "checkpoints/0000006.pt"), read_checkpoint(resumed / "checkpoints/0000006.pt")
    )


def test_sigterm_through_the_cli_saves_and_exits_143_and_the_resume_is_exact(tmp_path):
    import subprocess
    import sys
    import time

    args = [
        "train",
        "--model",
        "SiT-T/4",
        "--batch-size",
        "8",
        "--steps",
        "400",
        "--ckpt-every",
        "1000",
        "--log-every",
        "1",
        "--lr",
        "1e-3",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.Popen([sys.executable, "-m", "analysis.cli", *args], stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM; saved" in err and "--resume" in err
    (saved,) = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert read_checkpoint(saved)["step"] == int(saved.stem) >= 3


def test_divergence_keeps_the_checkpoint_before_it_and_a_resume_with_lower_lr_continues(tmp_path, capsys):
    from analysis.cli import main

    base = [
        "train",
        "--model",
        "SiT-T/4",
        "--batch-size",
        "8",
        "--ckpt-every",
        "1",
        "--keep-checkpoints",
        "1",
        "--log-every",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main([*base, "--steps", "4", "--lr", "1e-3"]) == 0
    assert main([*base, "--steps", "8", "--lr", "1e9", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "left its normal range at step 5" in err and "Last good checkpoint: " in err and "0000004.pt" in err
    # The checkpoint holding the exploded weights is set aside, not offered to --resume, not deleted.
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("*.pt"))] == ["0000004.pt"]
    assert (tmp_path / "checkpoints" / "diverged" / "0000005.pt").exists()
    assert main([*base, "--steps", "8", "--lr", "5e-4", "--resume"]) == 0
    final = read_checkpoint(tmp_path / "checkpoints" / "0000008.pt")
    assert final["args"]["lr"] == 5e-4
    assert max(v.abs().max().item() for v in final["model"].values()) < 100
    history = json.loads((tmp_path / "config.json").read_text())["history"]
    assert [h["changed"]["lr"]["to"] for h in history] == [1e9, 5e-4]  # both attempts from step 4, in order
    assert history[-1] == {"step": 4, "changed": {"steps": {"from": 4, "to": 8}, "lr": {"from": 1e-3, "to": 5e-4}}}
    steps = [r["step"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "event" not in r]
    assert steps == list(range(1, 9))  # no step logged twice, none from the diverged attempt


def test_a_restart_cleans_stale_temporaries_and_truncates_the_log_to_the_checkpoint(tmp_path):
    train(tiny_config(tmp_path, steps=4, ckpt_every=2, log_every=1))
    (tmp_path / "checkpoints" / "0000004.pt").unlink()  # as if killed while writing it: the log ran ahead
    stale = tmp_path / "checkpoints" / ".0000004.pt.x1y2z3.tmp"
    stale.write_bytes(b"\0" * 4096)
    train(tiny_config(tmp_path, steps=4, ckpt_every=2, log_every=1), resume=True)
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


BAD_TRAIN_FLAGS = [
    (["--steps", "0"], "--steps must be a whole number of at least 1"),
    (["--steps", "-5"], "--steps must be"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--batch-size", "-4"], "--batch-size must be"),
    (["--ckpt-every", "0"], "--ckpt-every must be"),
    (["--log-every", "0"], "--log-every must be"),
    (["--grad-accum", "0"], "--grad-accum must be"),
    (["--image-size", "0"], "--image-size must be"),
    (["--ema-decay", "2"], r"--ema-decay must lie in \[0, 1\)"),
    (["--class-dropout", "1.5"], r"--class-dropout must lie in \[0, 1\)"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be at least 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--vae", "/models/vae"], "--vae encodes an ImageFolder.*the digits are trained on as pixels: drop the VAE"),
]


@pytest.mark.parametrize("flags,message", BAD_TRAIN_FLAGS)
def test_bad_train_flags_are_one_line_naming_the_flag_before_any_work(tmp_path, capsys, flags, message):
    import re

    from analysis.cli import main

    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnmed train: error: ") and re.search(message, err) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_train_help_gives_every_flag_a_description_and_default(capsys):
    from analysis.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out.split("options:")[1]
    for flag in ("--steps", "--lr", "--ema-decay", "--class-dropout", "--grad-accum", "--keep-checkpoints", "--seed"):
        block = out[out.index(flag) :].split("\n  -")[0]
        assert "(default:" in block, f"{flag} lacks a default in --help"
