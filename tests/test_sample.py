"""Sampling to disk: restartable, independent of batching, ADM npz layout, honest sidecar, clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.cli import main
from mediator_models import CheckpointMismatchError, build_model
from mediator_models.sample import load_for_sampling, sample_to_folder
from mediator_models.sampling.generation import SamplerConfig, default_sampler
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
        "000000.png",
        "000001.png",
        "costs-rank0.jsonl",
        "samples.json",
        "samples.npz",
        "sampling.json",
    ]


@pytest.mark.slow
def test_two_rank_sampling_writes_the_same_images_as_one_process(tmp_path, trained):
    """`attnmed sample` under two Gloo ranks (torchrun's environment) splits the indices and draws the same images."""
    from helpers import run_two_gloo_ranks

    args = ["sample", "--ckpt", str(trained), "--steps", "4", "--num-samples", "5", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    code = f"import sys; from analysis.cli import main; sys.exit(main({[*args, '--out', str(tmp_path / 'two')]!r}))"
    assert run_two_gloo_ranks(code) == [0, 0]
    assert sorted(p.name for p in (tmp_path / "two").glob("costs-rank*.jsonl")) == [
        "costs-rank0.jsonl",
        "costs-rank1.jsonl",
    ]
    for name, image in pngs(tmp_path / "one").items():
        np.testing.assert_array_equal(image, pngs(tmp_path / "two")[name])
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["num_samples"] == 5


def test_a_restart_with_another_configuration_is_refused_naming_the_setting(tmp_path, trained):
    loaded = load_for_sampling(trained)
    sampler = SamplerConfig(kind="sde", steps=3)
    sample_to_folder(loaded, tmp_path, num_samples=2, sampler=sampler, progress=False)
    before = pngs(tmp_path)
    for changes, setting in (
        ({"seed": 1}, "seed: folder has 0, this run has 1"),
        ({"sampler": SamplerConfig(kind="sde", steps=4)}, "sampler: folder has"),
        ({"classes": [3]}, r"classes: folder has null, this run has \[3\]"),
    ):
        arguments = {"num_samples": 2, "sampler": sampler, "progress": False, **changes}
        with pytest.raises(ValueError, match=setting) as caught:
            sample_to_folder(loaded, tmp_path, **arguments)
        assert "choose another --out" in str(caught.value)
    other = train(
        TrainConfig(model="SiT-T/4", steps=1, global_batch_size=8, out=str(tmp_path / "other"), progress=False)
    )
    with pytest.raises(ValueError, match="weights: folder has"):
        sample_to_folder(
            load_for_sampling(other / "checkpoints/0000001.pt"),
            tmp_path,
            num_samples=2,
            sampler=sampler,
            progress=False,
        )
    after = pngs(tmp_path)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)
    # The same configuration asking for more samples resumes, keeping what exists.
    assert sample_to_folder(loaded, tmp_path, num_samples=3, sampler=sampler, progress=False)["num_samples"] == 3


def test_a_concurrent_sampling_into_the_same_folder_is_refused(tmp_path, trained):
    from mediator_models.storage.runfolder import FolderBusyError, FolderLock

    with FolderLock(tmp_path, "attnmed sample"):
        with pytest.raises(FolderBusyError, match="in use by another run"):
            sample_to_folder(
                load_for_sampling(trained), tmp_path, num_samples=2, sampler=SamplerConfig(steps=2), progress=False
            )


def test_images_of_unknown_origin_are_not_mixed_in(tmp_path, trained):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "000000.png")
    with pytest.raises(ValueError, match="already holds 1 images .* but no sampling.json"):
        sample_to_folder(
            load_for_sampling(trained), tmp_path, num_samples=2, sampler=SamplerConfig(steps=2), progress=False
        )


def test_a_kill_between_cost_records_and_images_is_redone_not_a_type_error(tmp_path, trained):
    loaded = load_for_sampling(trained)
    sampler = SamplerConfig(kind="sde", steps=3)
    sample_to_folder(loaded, tmp_path, num_samples=3, sampler=sampler, progress=False)
    reference = pngs(tmp_path)
    costs = tmp_path / "costs-rank0.jsonl"
    lines = costs.read_text().splitlines()
    costs.write_text("\n".join(lines[:1]) + "\n" + lines[1][:10])  # sample 1's record cut mid-line, 2's lost
    sidecar = sample_to_folder(loaded, tmp_path, num_samples=3, sampler=sampler, progress=False)
    assert sidecar["nfe_per_image"] == 3 and sidecar["gflops_per_image"] > 0
    assert all(np.array_equal(reference[k], v) for k, v in pngs(tmp_path).items())


def test_adaptive_solvers_make_the_batch_size_part_of_the_folder_identity(tmp_path, trained):
    loaded = load_for_sampling(trained)
    sampler = SamplerConfig(kind="ode", method="dopri5", steps=2)
    sample_to_folder(loaded, tmp_path, num_samples=2, sampler=sampler, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="batch_size: folder has 2, this run has 1"):
        sample_to_folder(loaded, tmp_path, num_samples=2, sampler=sampler, batch_size=1, progress=False)


BAD_SAMPLE_FLAGS = [
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-2"], "--batch-size must be at least 1"),
    (["--classes", "99"], r"--classes \[99\] out of range: the model knows labels 0..9"),
    (["--classes", "-1"], r"--classes \[-1\] out of range"),
    (["--cfg-scale", "2", "--guided-channels", "9"], r"--guided-channels must lie in 1..1"),
    (["--model", "SiT-S/2"], r"disagrees with --model SiT-S/2 \(the checkpoint holds SiT-T/4\)"),
    (
        ["--attention", "mediator", "--mediators", "4"],
        r"--attention mediator \(the checkpoint holds full\), --mediators 4",
    ),
    (["--steps", "0"], "--steps must be at least 1"),
]


@pytest.mark.parametrize("flags,message", BAD_SAMPLE_FLAGS)
def test_bad_sample_flags_are_one_clear_line_before_any_work(tmp_path, trained, capsys, flags, message):
    import re

    assert main(["sample", "--ckpt", str(trained), *flags, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnmed sample: error: ") and re.search(message, err), err
    assert not (tmp_path / "s").exists()


def test_sample_out_naming_a_file_and_a_method_for_dit_are_refused(tmp_path, trained, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["sample", "--ckpt", str(trained), "--steps", "2", "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    official = tmp_path / "dit.pt"
    torch.save(build_model("DiT-T/2", input_size=8).state_dict(), official)
    args = ["sample", "--ckpt", str(official), "--model", "DiT-T/2", "--input-size", "8", "--method", "heun"]
    assert main([*args, "--out", str(tmp_path / "s")]) == 2
    assert "--method heun applies to SiT's sde/ode samplers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """SiT-T/4 checkpoints with 1 and 4 mediators and full attention, trained a step each."""
    out = tmp_path_factory.mktemp("trio")
    paths = {}
    for name, attention, count in (("med1", "mediator", 1), ("med4", "mediator", 4), ("full", "full", None)):
        config = TrainConfig(
            model="SiT-T/4",
            attention=attention,
            mediators=count,
            steps=1,
            global_batch_size=8,
            out=str(out / name),
            progress=False,
        )
        paths[name] = train(config) / "checkpoints/0000001.pt"
    return paths


def test_sampling_with_a_schedule_switches_networks_and_records_what_each_sample_spent(tmp_path, trio):
    from mediator_models import config_gmacs
    from mediator_models.sampling.switching import MediatorSchedule

    schedule = MediatorSchedule.from_boundaries([1, 4, None], [0.7, 0.3], name="demo").save(tmp_path / "s.json")
    args = [
        "sample",
        "--ckpt",
        str(trio["full"]),
        "--ckpt",
        str(trio["med1"]),
        "--ckpt",
        str(trio["med4"]),
        "--steps",
        "10",
        "--num-samples",
        "3",
        "--schedule",
        str(schedule),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    sidecar = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert sidecar["schedule"]["name"] == "demo" and set(sidecar["schedule"]["networks"]) == {"n=1", "n=4", "full"}
    per_sample = sidecar["per_sample"]
    assert [s["index"] for s in per_sample] == [0, 1, 2]
    assert all(len(s["switch_steps"]) == 2 for s in per_sample)  # n=1 → n=4 → full
    loaded = {name: load_for_sampling(path).model.config for name, path in trio.items()}
    assert config_gmacs(loaded["med1"]) * 10 < per_sample[0]["gflops"] < config_gmacs(loaded["full"]) * 10


def test_adaptive_sampling_switches_per_sample_one_way(tmp_path, trio):
    args = [
        "sample",
        "--ckpt",
        str(trio["med1"]),
        "--ckpt",
        str(trio["full"]),
        "--steps",
        "12",
        "--num-samples",
        "4",
        "--batch-size",
        "2",
        "--adaptive",
        "--rho",
        "1.5",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    sidecar = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert sidecar["schedule"]["order"] == ["n=1", "full"] and sidecar["schedule"]["rho"] == [1.5]
    for entry in sidecar["per_sample"]:
        assert len(entry["switch_steps"]) <= 1 and all(step >= 5 for step in entry["switch_steps"])  # after warm-up


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "several --ckpt need --schedule FILE or --adaptive"),
        (["--adaptive"], r"--rho needs 1 values with 2 networks \(n=1, full\), one per switch"),
        (["--adaptive", "--rho", "0.5", "--sampler", "ode"], "--adaptive measures .* evaluates the network once"),
        # The adaptive settings are refused without --adaptive, not ignored.
        (["--schedule", "s.json", "--warmup", "5"], r"--warmup belongs to --adaptive; add it or drop them"),
        (["--schedule", "s.json", "--distance", "l2", "--statistic", "drift"], "--distance, --statistic belong to"),
        # A warm-up as long as the run would never switch, yet the run would be labelled adaptive.
        (
            ["--adaptive", "--rho", "0.9", "--warmup", "50"],
            r"--warmup is 50, but the rule can first switch at "
            r"evaluation 52 and this sampler makes \d+: no sample would ever switch",
        ),
        (["--adaptive", "--rho", "0.9", "--warmup", "2"], r"--warmup is 2, .* at most 1, or more steps"),
    ],
)
def test_switching_flags_are_checked(tmp_path, trio, capsys, extra, message):
    args = [
        "sample",
        "--ckpt",
        str(trio["med1"]),
        "--ckpt",
        str(trio["full"]),
        "--steps",
        "4",
        *extra,
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_networks_that_cannot_be_switched_between_are_refused(tmp_path, trio, capsys):
    other = train(TrainConfig(model="SiT-T/2", steps=1, global_batch_size=8, out=str(tmp_path / "t2"), progress=False))
    args = [
        "sample",
        "--ckpt",
        str(trio["med1"]),
        "--ckpt",
        str(other / "checkpoints/0000001.pt"),
        "--adaptive",
        "--rho",
        "0.5",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot be switched with" in err and "patch_size: 4 vs 2" in err
    args = [
        "sample",
        "--ckpt",
        str(trio["full"]),
        "--ckpt",
        str(trio["full"]),
        "--adaptive",
        "--rho",
        "0.5",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 2
    assert "both hold full attention" in capsys.readouterr().err


def test_latents_are_decoded_by_the_pipelines_own_vae_and_never_written_as_images(tmp_path, capsys, tiny_vae_path):
    """A DiTPipeline folder holds its VAE; a model of latents without one, or a VAE that does not fit, is refused
    before sampling starts."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
    from PIL import Image
    from test_diffusers import tiny_diffusers_dit

    folder = tmp_path / "pipeline"
    DiTPipeline(
        transformer=tiny_diffusers_dit(),
        vae=AutoencoderKL.from_pretrained(str(tiny_vae_path)),
        scheduler=DDIMScheduler(),
    ).save_pretrained(str(folder))
    out = tmp_path / "with-vae"
    assert main(["sample", "--ckpt", str(folder), "--steps", "2", "--num-samples", "2", "--out", str(out)]) == 0
    image = Image.open(out / "000000.png")
    assert image.mode == "RGB" and image.size == (64, 64)  # 8×8 latents decoded, not written as 8×8 pixels
    assert json.loads((out / "samples.json").read_text())["decoded_with_vae"] is True

    bare = ["sample", "--ckpt", str(folder / "transformer"), "--steps", "2", "--num-samples", "1"]
    assert main([*bare, "--out", str(tmp_path / "latents")]) == 2
    assert "--vae is needed: the model draws 4-channel latents, which are no images" in capsys.readouterr().err
    assert not (tmp_path / "latents").exists()


def test_a_pixel_model_refuses_a_vae_before_sampling(tmp_path, trio, capsys, tiny_vae_path):
    args = ["sample", "--ckpt", str(trio["full"]), "--vae", str(tiny_vae_path), "--steps", "2", "--num-samples", "1"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--vae decodes 4-channel latents, but the model draws 1-channel pixels: drop the VAE" in err
    assert not (tmp_path / "out").exists()


def test_a_bare_state_dict_says_what_data_it_was_trained_on(tmp_path, capsys):
    """Plain state dicts (official DiT/SiT files) carry their channels, labels and grid in their shapes: only the
    architecture is asked for, and a wrong one is blamed on what --model sets, not on fields no flag sets."""
    from mediator_models import build_model

    bare = tmp_path / "bare.pt"
    torch.save(build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10).state_dict(), bare)
    args = ["sample", "--ckpt", str(bare), "--steps", "2", "--num-samples", "1", "--seed", "0"]
    assert main([*args, "--model", "SiT-T/2", "--out", str(tmp_path / "ok")]) == 0
    model = json.loads((tmp_path / "ok" / "samples.json").read_text())["model"]
    assert (model["in_channels"], model["num_classes"], model["input_size"]) == (1, 10, 8)
    assert main([*args, "--model", "SiT-T/4", "--out", str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err
    assert "patch_size: checkpoint has 2, model has 4" in err
    assert "in_channels" not in err.split("Likely cause")[1] and "num_classes" not in err
