"""The `attnmed` command line: tables print, bad input gives one clear line and exit code 2."""

from __future__ import annotations

from analysis.cli import main


def test_models_lists_the_registry_with_params_and_gflops(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    xl = next(line for line in out.splitlines() if line.startswith("DiT-XL/2"))
    assert xl.split()[-2:] == ["675.1", "118.62"]
    assert "SiT-S/8" in out and "DiT-T/2" not in out


def test_flops_prints_the_count_and_its_breakdown(capsys):
    assert main(["flops", "SiT-S/2", "--attention", "mediator", "--mediators", "16", "--breakdown"]) == 0
    out = capsys.readouterr().out
    assert "blocks.attention" in out and out.strip().endswith("SiT-S/2 (mediator n=16) @32: 5.54 GFLOPs")


def test_bad_mediator_count_is_one_clear_error_line(capsys):
    assert main(["flops", "SiT-S/2", "--attention", "mediator", "--mediators", "15"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnmed flops: error: mediator count 15 is not a perfect square") and "9 or 16" in err


def test_checkpoint_that_does_not_match_the_model_is_one_clear_error(tmp_path, capsys):
    import torch

    from mediator_models import build_model

    official = tmp_path / "official.pt"
    torch.save(build_model("DiT-T/2", input_size=8).state_dict(), official)
    code = main(["sample", "--ckpt", str(official), "--model", "DiT-T/4", "--input-size", "8", "--out", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("attnmed sample: error: checkpoint does not match DiT-T/4") and "patch_size" in err


def test_flops_refuses_a_zero_input_size(capsys):
    assert main(["flops", "DiT-S/2", "--input-size", "0"]) == 2
    assert "--input-size must be a positive whole number, got 0" in capsys.readouterr().err
