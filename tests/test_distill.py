"""Distilling a grafted network end to end on training's own loop: the teacher's prediction as a second target
lowers the student's error against the teacher on held-out trajectories, data-free runs train on the teacher's
own samples, a killed run resumes to the very weights of an uninterrupted one, and the result loads strictly."""

from __future__ import annotations

import json
from copy import deepcopy

import pytest
import torch
from helpers import tiny_model

from analysis.cli import main
from mediator_models.graft import SAMPLE_STREAM, TEACHER_SAMPLES, graft_to_folder
from mediator_models.network.config import ModelConfig
from mediator_models.network.dit import DiffusionTransformer
from mediator_models.sample import load_for_sampling
from mediator_models.sampling.generation import ProcessConfig, SamplerConfig, generate
from mediator_models.sampling.steps import start_batch
from mediator_models.storage.checkpoints import read_checkpoint
from mediator_models.storage.errors import SettingError
from mediator_models.train import TeacherTarget, TrainConfig, backward_on_batch, batch_indices, train

SAMPLER = SamplerConfig(kind="sde", steps=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A full-attention SiT-T/2 on 8-px digits (16 tokens) trained long enough (120 steps) that its attention
    matters: grafting 4 mediators costs it about 12% of its prediction."""
    out = tmp_path_factory.mktemp("distill") / "run"
    config = TrainConfig(
        model="SiT-T/2",
        data="digits",
        image_size=8,
        global_batch_size=8,
        steps=120,
        lr=1e-3,
        ema_decay=0.9,
        log_every=120,
        ckpt_every=120,
        out=str(out),
        progress=False,
    )
    return train(config) / "checkpoints" / "0000120.pt"


def settings(**changes):
    base = dict(sampler=SAMPLER, samples=0, batch_size=8, progress=False, distill_steps=2, end_to_end_steps=4)
    return {**base, "save_every": 1, **changes}


def test_end_to_end_distillation_lowers_the_error_against_the_teacher_on_held_out_trajectories(tmp_path, trained):
    result = graft_to_folder(
        trained, tmp_path / "out", [4], **settings(samples=8, distill_steps=20, end_to_end_steps=60, save_every=50)
    )
    error = {row["stage"]: row["prediction_error"] for row in result.stages}
    assert set(error) == {"grafted", "layers", "end_to_end"}
    assert error["grafted"] > 0.05  # a real error to remove
    assert error["layers"] < 0.9 * error["grafted"]  # layer-wise distillation lowers it ...
    assert error["end_to_end"] < 0.9 * error["layers"]  # ... and end to end lowers it further
    final = result.end_to_end[4]
    assert final == tmp_path / "out" / "end_to_end" / "med4" / "checkpoints" / "0000060.pt"
    loaded = load_for_sampling(final)  # strict, like any mediator checkpoint
    assert loaded.model.config.attention == "mediator" and loaded.model.config.mediators == 4
    state = read_checkpoint(final)
    DiffusionTransformer(ModelConfig.from_dict(state["model_config"])).load_state_dict(state["ema"], strict=True)
    assert state["args"]["teacher"]["checkpoint"] == str(trained) and state["args"]["teacher_weight"] == 10.0
    assert state["args"]["init"] == str(tmp_path / "out" / "med4.pt") and state["args"]["data"] == "digits"
    # End to end trains the whole network, not only attention.
    source = load_for_sampling(trained).model.state_dict()
    assert not torch.equal(state["model"]["blocks.0.mlp.fc1.weight"], source["blocks.0.mlp.fc1.weight"])
    records = [json.loads(line) for line in (final.parents[1] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 60] and all(0 < r["teacher_loss"] < r["loss"] for r in records)


def test_data_free_distillation_trains_on_the_teachers_own_samples(tmp_path, trained, monkeypatch):
    import mediator_models.train as train_module

    seen, real = [], train_module.backward_on_batch

    def watched(model, process, x, y, *args, **kwargs):
        seen.append((x.clone(), y.clone()))
        return real(model, process, x, y, *args, **kwargs)

    monkeypatch.setattr(train_module, "backward_on_batch", watched)
    graft_to_folder(trained, tmp_path / "out", [4], **settings(data_free=True, teacher_samples=16, end_to_end_steps=3))
    teacher = load_for_sampling(trained)
    drawn_samples, drawn_labels = [], []
    for start in (0, 8):  # batched as they were made: the same samples, to the bit
        x_T, y, noise = start_batch(list(range(start, start + 8)), SAMPLE_STREAM, teacher.model.config, None, "cpu")
        drawn_samples.append(generate(teacher.model, teacher.process, SAMPLER, x_T, y, noise_fn=noise)[0])
        drawn_labels.append(y)
    samples, y = torch.cat(drawn_samples), torch.cat(drawn_labels)
    assert len(seen) == 3
    for step, (images, labels) in enumerate(seen):
        drawn = batch_indices(16, 8, step, 0, 1, seed=0)
        torch.testing.assert_close(images, samples[drawn], atol=0, rtol=0)  # the teacher's sample of that index
        assert torch.equal(labels, y[drawn])  # with the label it was drawn for
    config = json.loads((tmp_path / "out" / "end_to_end" / "med4" / "config.json").read_text())
    assert config["train"]["data"] == str(tmp_path / "out" / TEACHER_SAMPLES) and config["train"]["flip"] is False


def test_a_killed_end_to_end_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, trained, monkeypatch):
    import mediator_models.train as train_module

    straight = graft_to_folder(trained, tmp_path / "straight", [4], **settings()).end_to_end[4]
    real, calls = train_module.update_ema, []

    def killed_in_the_third_step(*args, **kwargs):  # weights updated, nothing of step 3 saved: as kill -9 leaves it
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "update_ema", killed_in_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        graft_to_folder(trained, tmp_path / "resumed", [4], **settings())
    run = tmp_path / "resumed" / "end_to_end" / "med4"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["0000001.pt", "0000002.pt"]
    monkeypatch.setattr(train_module, "update_ema", real)
    resumed = graft_to_folder(trained, tmp_path / "resumed", [4], **settings()).end_to_end[4]
    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for index, moments in a["opt"]["state"].items():
        assert all(torch.equal(moments[name], b["opt"]["state"][index][name]) for name in ("exp_avg", "exp_avg_sq"))


def test_the_teacher_target_of_a_student_equal_to_its_teacher_is_zero_and_leaves_the_plain_step_unchanged():
    # Half the labels dropped: a student and a teacher that dropped different ones would differ.
    student = tiny_model("SiT-T/2", input_size=8, class_dropout_prob=0.5).train()
    teacher = deepcopy(student).eval()
    process = ProcessConfig("SiT").build()
    x, y = torch.randn(16, 4, 8, 8), torch.arange(16) % 10
    torch.manual_seed(3)
    plain = backward_on_batch(student, process, x, y)
    plain_grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad(set_to_none=True)
    target = TeacherTarget(teacher, 10.0, student)
    torch.manual_seed(3)
    distilled = backward_on_batch(student, process, x, y, teacher=target)
    assert float(target.take_logged()) == 0.0
    assert torch.equal(plain, distilled)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert len(grads) == len(plain_grads) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_a_teacher_target_pulls_the_student_towards_the_teacher():
    student = tiny_model("SiT-T/2", input_size=8).train()
    teacher = tiny_model("SiT-T/2", input_size=8)
    process = ProcessConfig("SiT").build()
    x, y = torch.randn(8, 4, 8, 8), torch.arange(8)
    target = TeacherTarget(teacher, 1e4, student)  # the teacher's term outweighs the diffusion loss
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    terms = []
    for _ in range(10):
        torch.manual_seed(0)  # the same x_t, t and label drops every step: only the student changes
        opt.zero_grad()
        backward_on_batch(student, process, x, y, teacher=target)
        terms.append(float(target.take_logged()))  # before this step's update
        opt.step()
    assert terms[-1] < 0.5 * terms[0]


def test_an_init_of_another_network_is_refused_naming_what_differs(tmp_path, trained):
    config = TrainConfig(
        model="SiT-T/2", attention="mediator", mediators=4, data="digits", image_size=8, global_batch_size=8,
        steps=1, out=str(tmp_path / "run"), progress=False, init=str(trained),
    )  # fmt: skip
    with pytest.raises(SettingError, match=r"attention: .* has 'full', the run 'mediator'"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_graft_command_distils_end_to_end_data_free_and_prints_each_stages_error(tmp_path, trained, capsys):
    out = tmp_path / "out"
    command = ["graft", "--ckpt", str(trained), "--mediators", "4", "--steps", "3", "--samples", "2"]
    command += ["--distill-steps", "1", "--end-to-end-steps", "2", "--data-free", "--teacher-samples", "8"]
    assert main([*command, "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "relative error of the prediction against the source on held-out trajectories" in printed
    assert "training-free" in printed and "layer-wise" in printed and "end to end" in printed
    assert str(out / "end_to_end" / "med4" / "checkpoints" / "0000002.pt") in printed
    identity = json.loads((out / "graft.json").read_text())
    assert identity["end_to_end"]["data"] == "data-free" and identity["end_to_end"]["teacher_samples"] == 8
    assert identity["end_to_end"]["ema_decay"] == 0.0  # 1 − 10/steps, at least 0


def test_end_to_end_from_a_file_that_records_no_data_asks_for_it_before_any_work(tmp_path):
    path = tmp_path / "official.pt"
    torch.save(tiny_model("DiT-T/2", input_size=8).state_dict(), path)
    with pytest.raises(SettingError, match="is needed: .* does not record the data it was trained on") as caught:
        graft_to_folder(
            path, tmp_path / "out", [4], model_name="DiT-T/2", input_size=8, **settings(sampler={"steps": 2})
        )
    assert caught.value.setting == "data" and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_end_to_end_distillation_runs_data_parallel_under_two_gloo_ranks(tmp_path, trained):
    """Rank 0 grafts and distils layer by layer while rank 1 waits; then both train end to end, each on its half of
    every batch (with its own noise, as `train` draws it per rank)."""
    from helpers import run_two_gloo_ranks

    out = tmp_path / "ranks"
    code = (
        "from mediator_models.graft import graft_to_folder\n"
        "from mediator_models.sampling.generation import SamplerConfig\n"
        f"graft_to_folder(r'{trained}', r'{out}', [4], sampler=SamplerConfig(kind='sde', steps=4), "
        "samples=0, batch_size=8, progress=False, distill_steps=2, end_to_end_steps=3, save_every=1)\n"
    )
    assert run_two_gloo_ranks(code) == [0, 0]
    assert read_checkpoint(out / "med4.pt")["step"] == 2
    final = out / "end_to_end" / "med4" / "checkpoints" / "0000003.pt"
    assert load_for_sampling(final).model.config.mediators == 4
    start, end = read_checkpoint(out / "med4.pt")["model"], read_checkpoint(final)["model"]
    assert not torch.equal(start["blocks.0.mlp.fc1.weight"], end["blocks.0.mlp.fc1.weight"])
    (record,) = [json.loads(line) for line in (final.parents[1] / "log.jsonl").read_text().splitlines()]
    assert record["step"] == 3 and record["teacher_loss"] > 0


def test_a_shared_network_distils_end_to_end_into_one_checkpoint_serving_every_count(tmp_path, trained):
    result = graft_to_folder(
        trained, tmp_path / "out", [4, 16, "full"], shared=True, **settings(samples=2, distill_steps=1)
    )
    final = result.end_to_end["shared"]
    assert final == tmp_path / "out" / "end_to_end" / "shared" / "checkpoints" / "0000004.pt"
    for count in (4, 16):
        assert load_for_sampling(final, mediators=count).model.config.mediators == count
    errors = {(row["mediators"], row["stage"]): row["prediction_error"] for row in result.stages}
    assert sorted(errors) == sorted((c, s) for c in (4, 16) for s in ("grafted", "layers", "end_to_end"))
    assert all(errors[(4, stage)] != errors[(16, stage)] for stage in ("grafted", "layers", "end_to_end"))


@pytest.mark.slow
def test_graft_killed_by_sigkill_during_end_to_end_resumes_bit_identically(tmp_path, trained):
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "analysis.cli", "graft", "--ckpt", str(trained), "--mediators", "4"]
    command += ["--steps", "4", "--samples", "0", "--distill-steps", "2", "--end-to-end-steps", "60"]
    command += ["--save-every", "7", "--data-free", "--teacher-samples", "16", "--no-progress"]
    subprocess.run([*command, "--out", str(tmp_path / "straight")], check=True, capture_output=True)
    run = tmp_path / "killed" / "end_to_end" / "med4" / "checkpoints"
    proc = subprocess.Popen([*command, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "0000014.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (run / "0000060.pt").exists()  # killed mid-run
    subprocess.run([*command, "--out", str(tmp_path / "killed")], check=True, capture_output=True)
    a = read_checkpoint(tmp_path / "straight" / "end_to_end" / "med4" / "checkpoints" / "0000060.pt")
    b = read_checkpoint(run / "0000060.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
