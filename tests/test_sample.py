"""Sampling to disk: restartable, independent of batching, ADM npz layout, honest sidecar, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.cli import main
from mediator_models import CheckpointMismatchError, build_model
from mediator_models.sample import load_for_sampling, sample_to_folder
from mediator_models.sampling import SamplerConfig, default_sampler
from mediator_models.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(model="SiT-T/4", steps=2, global_batch_size=8, ckpt_every=2, out=str(out), progress=False)
    return train(config) / "checkpoints/0000002.pt"


def pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_samples_do_not_depend_on_batching_and_restart_keeps_what_exists(tmp_path, trained):
    loaded = load_for_sampling(trained)
    sampler = SamplerConfig(kind="sde", steps=8)
    first = sample_to_folder(loaded, tmp_path / "a", num_samples=5, sampler=sampler, batch_size=2, progress=False)
    sample_to_folder(loaded, tmp_path / "b", num_samples=5, sampler=sampler, batch_size=5, progress=False)
    assert pngs(tmp_path / "a").keys() == pngs(tmp_path / "b").keys()
    for name, image in pngs(tmp_path / "a").items():
        np.testing.assert_array_equal(image, pngs(tmp_path / "b")[name])
    # Interrupted run: two images lost; rerunning redraws exactly those.
    kept = (tmp_path / "a" / "000000.png").stat().st_mtime_ns
    before = pngs(tmp_path / "a")
    (tmp_path / "a" / "000003.png").unlink()
    (tmp_path / "a" / "000004.png").unlink()
    sample_to_folder(loaded, tmp_path / "a", num_samples=5, sampler=sampler, batch_size=2, progress=False)
    assert (tmp_path / "a" / "000000.png").stat().st_mtime_ns == kept
    for name, image in pngs(tmp_path / "a").items():
        np.testing.assert_array_equal(image, before[name])
    assert first["nfe_per_image"] == 8


def test_npz_is_in_the_adm_layout_and_sidecar_records_the_cost(tmp_path, trained):
    loaded = load_for_sampling(trained)
    sampler = SamplerConfig(kind="ode", method="euler", steps=4, cfg_scale=2.0)
    sidecar = sample_to_folder(loaded, tmp_path, num_samples=3, sampler=sampler, classes=[7], progress=False)
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    saved = json.loads((tmp_path / "samples.json").read_text())
    assert saved == sidecar and saved["sampler"]["cfg_scale"] == 2.0 and saved["classes"] == [7]
    per_forward = loaded.model.config
    from mediator_models import config_gmacs

    assert saved["nfe_per_image"] == 4
    assert saved["gflops_per_image"] == pytest.approx(2 * 4 * config_gmacs(per_forward))  # CFG doubles it


def test_official_state_dicts_need_the_model_name_and_must_match_it(tmp_path):
    official = tmp_path / "official.pt"
    torch.save(build_model("DiT-T/2", input_size=8).state_dict(), official)
    with pytest.raises(ValueError, match="pass --model"):
        load_for_sampling(official)
    loaded = load_for_sampling(official, model_name="DiT-T/2", input_size=8)
    assert loaded.process.family == "DiT" and default_sampler("DiT").kind == "ddpm"
    with pytest.raises(CheckpointMismatchError, match="patch_size: checkpoint has 2, model has 4"):
        load_for_sampling(official, model_name="DiT-T/4", input_size=8)


def test_unknown_sampler_fails_before_any_work(tmp_path, trained, capsys):
    code = main(["sample", "--ckpt", str(trained), "--sampler", "ddpm", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "--sampler ddpm does not apply to a SiT model; choose one of ('sde', 'ode')" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sample_command_writes_the_folder(tmp_path, trained):
    assert main(["sample", "--ckpt", str(trained), "--steps", "3", "--num-samples", "2", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "000000.png", "000001.png", "costs-rank0.jsonl", "samples.json", "samples.npz", "sampling.json"]  # fmt: skip


@pytest.mark.slow
def test_two_rank_sampling_writes_the_same_images_as_one_process(tmp_path, trained):
    """`attnmed sample` under two Gloo ranks (torchrun's environment) splits the indices and draws the same images."""
    from helpers import run_two_gloo_ranks

    args = ["sample", "--ckpt", str(trained), "--steps", "4", "--num-samples", "5", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    code = f"import sys; from analysis.cli import main; sys.exit(main({[*args, '--out', str(tmp_path / 'two')]!r}))"
    assert run_two_gloo_ranks(code) == [0, 0]
    assert sorted(p.name for p in (tmp_path / "two").glob("costs-rank*.jsonl")) == ["costs-rank0.jsonl", "costs-rank1.jsonl"]
    for name, image in pngs(tmp_path / "one").items():
        np.testing.assert_array_equal(image, pngs(tmp_path / "two")[name])
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["num_samples"] == 5
